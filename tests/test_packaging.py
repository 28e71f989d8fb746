"""The wheel holds what a non-editable install needs (every package, model, configs) and nothing else,
and pyproject.toml declares every third-party package volgen imports."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    # build from a clean copy: setuptools reuses a stale build/ folder of the working tree
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("volgen", "cli", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)],
        check=True,
        cwd=out,
    )
    (wheel,) = out.glob("volgen-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _packages(folder: Path, installed_as: str) -> set[str]:
    return {
        installed_as + "/" + str(init.parent.relative_to(folder)).replace("\\", "/")
        if init.parent != folder
        else installed_as
        for init in folder.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_wheel_ships_every_package(wheel_names):
    expected = _packages(ROOT / "volgen", "volgen") | _packages(ROOT / "cli", "volgen/cli")
    expected |= _packages(ROOT / "configs", "volgen/configs")
    assert "volgen/io" in expected  # the package a hand-written list once forgot
    for package in sorted(expected):
        assert f"{package}/__init__.py" in wheel_names, f"{package} is not in the wheel"


def test_wheel_ships_data(wheel_names):
    assert "volgen/py.typed" in wheel_names
    for path in (ROOT / "volgen" / "default_model").rglob("*"):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".md"}:
            name = path.relative_to(ROOT).as_posix()
            assert name in wheel_names, f"default model file {name} is not in the wheel"
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert "volgen/" + path.relative_to(ROOT).as_posix() in wheel_names


def test_wheel_has_no_tests_or_repository_data(wheel_names):
    top = {name.split("/")[0] for name in wheel_names}
    assert top == {"volgen", "volgen-0.1.0.dist-info"} or all(
        t == "volgen" or t.endswith(".dist-info") for t in top
    ), top
    for name in wheel_names:
        assert not name.startswith(("tests/", "volgen/tests/", "benchmarks/", "examples/", "plugins/"))
        assert "__pycache__" not in name and not name.endswith(".pyc")


# import name -> distribution name where they differ
_DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow", "SimpleITK": "simpleitk"}
# imported only when present, behind an ImportError guard (GPU extra)
_OPTIONAL = {"xformers"}


def _imported_top_level(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = set()
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        declared.add(name.strip().lower().replace("_", "-"))
    stdlib = set(sys.stdlib_module_names)
    imported = _imported_top_level(ROOT / "volgen") | _imported_top_level(ROOT / "cli")
    third_party = {n for n in imported if n not in stdlib and n not in {"volgen", "__future__"}} - _OPTIONAL
    missing = {n for n in third_party if _DISTRIBUTION.get(n, n).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    assert "matplotlib" in third_party  # the check sees the preview's import
