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
    copy_source(src)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)],
        check=True,
        cwd=out,
    )
    (wheel,) = out.glob("volgen-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def copy_source(src: Path) -> None:
    """What a release builds from: the packages, the example data, the metadata files and the licence."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("volgen", "cli", "configs", "examples"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)


def test_license_is_apache_2_in_the_repository_the_wheel_and_the_sdist(wheel_names, tmp_path):
    import tarfile

    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice
    assert "volgen-0.1.0.dist-info/licenses/LICENSE" in wheel_names
    src = tmp_path / "src"
    src.mkdir()
    copy_source(src)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})",
        ],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (sdist,) = tmp_path.glob("volgen-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        metadata = tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith("/PKG-INFO")))
        pkg_info = metadata.read().decode("utf-8")
    assert "LICENSE" in names and "examples/colin27_tissues_2mm.nii.gz" in names
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info


def test_wheel_ships_the_example_segmentation_and_not_the_example_scripts(wheel_names):
    from volgen.examples import EXAMPLE

    assert f"volgen/examples/{EXAMPLE}" in wheel_names
    assert "volgen/examples/__init__.py" in wheel_names
    assert not any(n.startswith("volgen/examples/colin27/") for n in wheel_names)


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
