"""Safe loading: nothing in volgen's source can run code hidden in a file it reads.

A static check walks the syntax tree of every Python file of the package (``volgen/``, ``cli/``,
``plugins/``) and fails on: pickle-family modules, ``torch.load`` without ``weights_only=True``, builtin
``eval``/``exec``/``compile``/``__import__``, non-safe YAML loading, ``shell=True`` and ``os.system``/
``os.popen``, ``numpy.load(allow_pickle=True)``, model ``from_pretrained`` without ``use_safetensors=True``,
and remote/custom pipeline code. A finding that is legitimate goes into :data:`ALLOWED` with its reason.

A behavioural check feeds a real malicious pickle (it would create a file when unpickled) to every command
that loads weights and checks it is refused without being opened.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner
from volumes import make_volume

from volgen import io
from volgen.cli.app import _register, app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("volgen", "cli", "plugins")

#: (file relative to the repository, rule) -> why that finding is acceptable. Empty: none is needed.
ALLOWED: dict[tuple[str, str], str] = {}

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}
UNSAFE_YAML_CALLS = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
UNSAFE_YAML_NAMES = {
    "Loader",
    "UnsafeLoader",
    "FullLoader",
    "CLoader",
    "CUnsafeLoader",
    "CFullLoader",
    "Constructor",
    "UnsafeConstructor",
    "FullConstructor",
}
SHELL_CALLS = {"system", "popen", "execv", "execve", "execvp", "execl", "execlp", "spawnv", "spawnl"}


def _name(node: ast.AST) -> str:
    """Dotted name of ``a.b.c`` (the last parts only for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _name(node.func) + "()"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(source: str, filename: str = "<source>") -> list[tuple[int, str, str]]:
    """Unsafe constructs in Python ``source``: ``(line, rule, code)`` for each."""
    findings: list[tuple[int, str, str]] = []

    def found(node: ast.AST, rule: str) -> None:
        findings.append((getattr(node, "lineno", 0), rule, ast.unparse(node)[:120]))

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found(node, "pickle")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if root in PICKLE_MODULES:
                found(node, "pickle")
            if root == "yaml" and {a.name for a in node.names} & (UNSAFE_YAML_CALLS | UNSAFE_YAML_NAMES):
                found(node, "yaml")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found(node, "torch.load")
        elif isinstance(node, ast.Attribute):
            if _name(node.value) == "yaml" and node.attr in UNSAFE_YAML_NAMES:
                found(node, "yaml")
        elif isinstance(node, ast.Call):
            func = _name(node.func)
            last = func.rsplit(".", 1)[-1]
            if isinstance(node.func, ast.Name) and node.func.id in CODE_BUILTINS:
                found(node, "eval/exec")
            if func in ("torch.load", "torch.serialization.load") and not _is_true(
                _keyword(node, "weights_only")
            ):
                found(node, "torch.load")
            if func in ("torch.jit.load", "torch.hub.load", "torch.package.PackageImporter"):
                found(node, "torch.load")
            if func.startswith("yaml.") and last in UNSAFE_YAML_CALLS:
                found(node, "yaml")
            if _keyword(node, "shell") is not None and not (
                isinstance(_keyword(node, "shell"), ast.Constant) and _keyword(node, "shell").value is False
            ):
                found(node, "shell")
            if func.startswith("os.") and last in SHELL_CALLS:
                found(node, "shell")
            if (
                last == "load"
                and func.split(".")[0] in ("np", "numpy")
                and not (
                    _keyword(node, "allow_pickle") is None
                    or (
                        isinstance(_keyword(node, "allow_pickle"), ast.Constant)
                        and not _keyword(node, "allow_pickle").value
                    )
                )
            ):
                found(node, "pickle")
            if last in ("read_pickle", "loads") and func.split(".")[0] in ("pd", "pandas", "pickle"):
                found(node, "pickle")
            if last == "from_pretrained":
                receiver = func.rsplit(".", 1)[0]
                if (
                    _keyword(node, "trust_remote_code") is not None
                    or _keyword(node, "custom_pipeline") is not None
                ):
                    found(node, "remote code")
                elif receiver.endswith("Pipeline"):
                    found(node, "remote code")  # model_index.json names the classes to import
                elif not receiver.endswith("Scheduler") and not _is_true(_keyword(node, "use_safetensors")):
                    found(node, "safetensors")
    return findings


def package_sources() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py") if ".git" not in p.parts)


def test_the_scan_sees_the_package() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in package_sources()}
    assert {"volgen/models.py", "volgen/config.py", "cli/app.py"} <= names
    assert any(n.startswith("plugins/") for n in names)


def test_no_unsafe_loading_in_the_package() -> None:
    problems = []
    for path in package_sources():
        relative = path.relative_to(ROOT).as_posix()
        for line, rule, code in scan(path.read_text(encoding="utf-8"), relative):
            if (relative, rule) not in ALLOWED:
                problems.append(f"{relative}:{line}: {rule}: {code}")
    assert not problems, "unsafe constructs (fix them, or justify them in ALLOWED):\n" + "\n".join(problems)


def test_every_allowed_exception_is_still_needed() -> None:
    seen = {
        (p.relative_to(ROOT).as_posix(), rule)
        for p in package_sources()
        for _, rule, _ in scan(p.read_text(encoding="utf-8"))
    }
    assert set(ALLOWED) <= seen, sorted(set(ALLOWED) - seen)


@pytest.mark.parametrize(
    ("code", "rule"),
    [
        ("import pickle", "pickle"),
        ("from joblib import load", "pickle"),
        ("import numpy as np\nnp.load(f, allow_pickle=True)", "pickle"),
        ("import torch\ntorch.load(f)", "torch.load"),
        ("import torch\ntorch.load(f, weights_only=False)", "torch.load"),
        ("eval(text)", "eval/exec"),
        ("exec(code)", "eval/exec"),
        ("import yaml\nyaml.load(text)", "yaml"),
        ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml"),
        ("import yaml\nyaml.unsafe_load(text)", "yaml"),
        ("from yaml import load", "yaml"),
        ("import subprocess\nsubprocess.run(cmd, shell=True)", "shell"),
        ("import subprocess\nsubprocess.run(cmd, shell=flag)", "shell"),
        ("import os\nos.system(cmd)", "shell"),
        ("UNet2DModel.from_pretrained(folder)", "safetensors"),
        ("UNet2DModel.from_pretrained(folder, use_safetensors=False)", "safetensors"),
        ("DiffusionPipeline.from_pretrained(folder)", "remote code"),
        ("UNet2DModel.from_pretrained(f, use_safetensors=True, trust_remote_code=True)", "remote code"),
    ],
)
def test_the_scan_catches(code: str, rule: str) -> None:
    assert rule in [r for _, r, _ in scan(code)]


@pytest.mark.parametrize(
    "code",
    [
        "import torch\ntorch.load(f, weights_only=True)",
        "import yaml\nyaml.safe_load(text)",
        "import subprocess\nsubprocess.run([exe, arg], shell=False)",
        "model.eval()",
        "import re\nre.compile('x')",
        "UNet2DModel.from_pretrained(folder, subfolder='unet', use_safetensors=True)",
        "DDPMScheduler.from_pretrained(folder, subfolder='scheduler')",
        "import numpy as np\nnp.load(f)",
    ],
)
def test_the_scan_lets_safe_code_pass(code: str) -> None:
    assert scan(code) == []


# ----------------------------------------------------------------------------------------------- behaviour


class _Payload:
    """Unpickling this creates the file ``marker``: what a malicious checkpoint does (with worse commands)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious(folder: Path, marker: Path) -> None:
    """Replace the safetensors weights of a model folder by a pickle with a payload."""
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    with (folder / "unet" / "diffusion_pytorch_model.bin").open("wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f)


@pytest.mark.parametrize("command", ["generate", "info", "import-checkpoint"])
def test_a_malicious_pickle_is_refused_unopened(command, tiny_model_dir, tmp_path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "pwned"
    _malicious(model, marker)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live: unpickling runs it
    assert probe.exists()
    seg = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label"), seg)
    args = {
        "generate": ["generate", seg, "-o", tmp_path / "o.nii.gz", "--model", model, "--progress", "none"],
        "info": ["info", model],
        "import-checkpoint": ["import-checkpoint", model, "--labels", "colin27", "-o", tmp_path / "imported"],
    }[command]
    _register()
    result = CliRunner().invoke(typer.main.get_command(app), [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "holds pickle weights (unet/diffusion_pytorch_model.bin)" in result.output
    assert not marker.exists()
    assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "imported").exists()
