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


# ===================================================================================== data safety (issue 16)
#
# Nothing lost, nothing wrong: outputs never replace inputs (links resolved), writes are verified before they
# take their final name, --copy-patient-info reads the series it generates from, concurrent batch runs
# cooperate, the dry run's memory is honest. The one-line errors of hostile inputs are in tests/hostile.

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from volgen.errors import InputError, OutputError  # noqa: E402

_register()
COMMAND = typer.main.get_command(app)


def run_cli(*args: object):
    return CliRunner().invoke(COMMAND, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (content) and folder (None) under ``root``, links not followed."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[str(Path(folder, name).relative_to(root))] = None
        for name in files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = (
                os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            )
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def cases(tmp_path) -> Path:
    folder = tmp_path / "segs"
    folder.mkdir()
    for k, name in enumerate(["a", "b", "c", "d"]):
        io.write_volume(make_volume("label", seed=k), folder / f"{name}.nii.gz")
    return folder


# ----------------------------------------------------------------------------------------------- paths


def test_batch_into_a_link_to_its_input_folder_changes_nothing(cases, tiny_model_dir, tmp_path) -> None:
    link = tmp_path / "out_link"
    link.symlink_to(cases)
    before = tree(cases)
    result = run_cli("batch", cases, link, "--model", tiny_model_dir, "--steps", "1", "--progress", "none")
    assert result.exit_code == 1 and "is the input folder" in result.output, result.output
    assert tree(cases) == before


def test_generate_never_overwrites_its_input_reference_or_model(tiny_model_dir, tmp_path) -> None:
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    seg = data / "seg.nii.gz"
    io.write_volume(make_volume("label"), seg)
    (data / "notes.txt").write_text("unrelated")
    ref = data / "ref.nii.gz"
    io.write_volume(make_volume("image"), ref)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before_data, before_model = tree(data), tree(model)
    common = ["--model", model, "--steps", "1", "--device", "cpu", "--progress", "none", "--overwrite"]
    attempts = {
        "the output is the input": [seg, "-o", seg],
        "the output contains the input": [seg, "-o", data, "--format", "dicom"],
        "the output is the reference": [seg, "-o", ref, "--reference", ref, "--strength", "0.5"],
        "lies inside the model folder": [seg, "-o", model / "volgen.nii"],
    }
    for expected, args in attempts.items():
        result = run_cli("generate", *args, *common)
        assert result.exit_code == 1 and expected in result.output, (expected, result.output)
        assert "Traceback" not in result.output
    assert tree(data) == before_data and tree(model) == before_model


def test_a_folder_volgen_did_not_write_is_never_replaced(tmp_path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"not volgen's")
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="volgen did not write"):
        io.write_volume(make_volume("ct"), folder, format="dicom", modality="CT", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["IM0001.dcm", "thesis.tex"]
    assert not io.remove_output(folder) and folder.exists()
    # a series volgen wrote may be replaced
    series = tmp_path / "series"
    io.write_volume(make_volume("ct"), series, format="dicom", modality="CT")
    io.write_volume(make_volume("ct", seed=1), series, format="dicom", modality="CT", overwrite=True)
    from volgen.io.paths import is_volgen_folder

    assert is_volgen_folder(series) and not is_volgen_folder(folder)


def test_overlap_resolves_links(tmp_path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert io.overlap(tmp_path / "link", tmp_path / "real") == "is"
    assert io.overlap(tmp_path / "link" / "x.nii", tmp_path / "real") == "lies inside"
    assert io.overlap(tmp_path, tmp_path / "link" / "seg.nii.gz") == "contains"
    assert io.overlap(tmp_path / "other", tmp_path / "real") is None


def test_generate_dot_inside_a_dicom_folder(tiny_model_dir, tmp_path, monkeypatch) -> None:
    series = tmp_path / "series"
    io.write_volume(make_volume("label"), series, format="dicom", modality="MR")  # a label map as DICOM
    monkeypatch.chdir(series)
    result = run_cli(
        "generate", ".", "--model", tiny_model_dir, "--steps", "1", "--device", "cpu", "--progress", "none"
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "series_synthetic.nii.gz").is_file()  # next to the folder, named after it


# ---------------------------------------------------------------------------------------- verified writes

_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["volgen", *sys.argv[2:]]
    from volgen.cli.app import main
    main()
    """
)


def _limited(limit: int, *args: object) -> subprocess.CompletedProcess:
    """``volgen ARGS`` in a process whose files may not grow beyond ``limit`` bytes (a full disk)."""
    return subprocess.run(
        [sys.executable, "-c", _LIMITED, str(limit), *map(str, args)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip


def test_a_write_cut_short_is_an_error_not_a_result(tmp_path) -> None:
    big = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(24, 64, 64)).astype(np.float32))
    io.write_volume(big, tmp_path / "noise.nii")  # 393 KiB, incompressible as .nii.gz too
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        import SimpleITK as sitk
        from volgen import io
        from volgen.errors import OutputError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        image = sitk.ReadImage({str(tmp_path / "noise.nii")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        for name in ("out.nii", "out.nii.gz", "out.nrrd", "out.mha", "out.mhd"):
            try:
                io.write_volume(image, {str(tmp_path)!r} + "/" + name)
            except OutputError as e:
                print("refused", name, e.problem)
            else:
                print("WROTE", name)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("refused") for line in lines), proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.nii"]  # nothing half-written, no temporary


def test_generate_and_batch_under_a_file_size_limit(tiny_model_dir, tmp_path) -> None:
    seg = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label", size=(40, 40, 24)), seg)
    out = tmp_path / "out"
    out.mkdir()
    fast = ["--model", tiny_model_dir, "--steps", "1", "--device", "cpu", "--progress", "none"]
    proc = _limited(60_000, "generate", seg, "-o", out / "syn.nii", *fast)  # 153,952 bytes needed
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "incomplete" in lines[0], lines
    assert list(out.iterdir()) == []  # no volume, no sidecar, no temporary file

    cases = tmp_path / "cases"
    cases.mkdir()
    seg.rename(cases / "big.nii.gz")
    batch_out = tmp_path / "batch"
    proc = _limited(15_000, "batch", cases, batch_out, "--format", "nrrd", *fast)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    records = {r.case: r for r in _read_manifest(batch_out)}
    assert records["big"].status == "failed" and "big.nrrd: could not write" in records["big"].error
    assert not (batch_out / "big.nrrd").exists() and not (batch_out / "big.json").exists()
    result = run_cli("batch", cases, batch_out, "--format", "nrrd", *fast)  # room again: redone, not skipped
    assert result.exit_code == 0, result.output
    assert {r.case: r.status for r in _read_manifest(batch_out)} == {"big": "done"}


def test_dicom_under_a_file_size_limit_is_one_line(tiny_model_dir, tmp_path) -> None:
    """The limit reached inside a slice's pixel data: pydicom re-raises the error with the tag and a whole
    traceback in its message, which used to follow the error line."""
    seg = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label", size=(64, 64, 6)), seg)
    out = tmp_path / "out"
    out.mkdir()
    fast = ["--model", tiny_model_dir, "--steps", "1", "--device", "cpu", "--progress", "none"]
    proc = _limited(5_000, "generate", seg, "-o", out / "series", "--format", "dicom", *fast)  # 8 KiB a slice
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [f"error: {out / 'series'}: could not write DICOM files: File too large"], lines
    assert list(out.iterdir()) == []


def _read_manifest(out: Path):
    from volgen.batch import read_manifest

    return read_manifest(out / "manifest.csv")


# -------------------------------------------------------------------------------------- patient information


def _patient_series(folder: Path, name: object, pid: str, frame: str) -> list[Path]:
    io.write_volume(make_volume("ct"), folder, format="dicom", modality="CT")
    files = sorted(folder.glob("IM*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.FrameOfReferenceUID = name, pid, frame
        ds.save_as(path)
    return files


def test_copy_patient_info_reads_the_series_it_generates_from(tmp_path) -> None:
    folder = tmp_path / "series"
    _patient_series(folder, ["Doe^Jane", "Doe^J"], "P1", "1.2.3.4")
    stray = tmp_path / "other"
    (other,) = _patient_series(stray, "Roe^Richard", "P2", "9.9.9")[:1]
    (folder / "AAA_stray.dcm").write_bytes(other.read_bytes())  # sorts first, another patient...
    ds = pydicom.dcmread(folder / "AAA_stray.dcm")
    ds.SeriesInstanceUID = "1.2.3.999"  # ...in another series
    ds.save_as(folder / "AAA_stray.dcm")
    info = io.patient_info_of(folder, series=pydicom.dcmread(folder / "IM0001.dcm").SeriesInstanceUID)
    assert info["PatientName"] == ["Doe^Jane", "Doe^J"] and info["PatientID"] == "P1"
    assert info["FrameOfReferenceUID"] == "1.2.3.4"
    assert set(info) <= set(io.dicom.COPIED_KEYS) and "ReferringPhysicianName" not in info

    out = tmp_path / "synthetic"
    io.write_volume(make_volume("ct"), out, format="dicom", modality="CT", patient_info=info)
    written = pydicom.dcmread(sorted(out.iterdir())[0])
    assert list(written.PatientName) == ["Doe^Jane", "Doe^J"]  # multi-valued, not "[Doe^Jane, Doe^J]"
    assert written.FrameOfReferenceUID == "1.2.3.4"


def test_copy_patient_info_ignores_dicomdir_and_refuses_disagreeing_files(tmp_path) -> None:
    folder = tmp_path / "series"
    files = _patient_series(folder, "Doe^Jane", "P1", "1.2.3.4")
    (folder / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)
    assert io.patient_info_of(folder)["PatientID"] == "P1"
    ds = pydicom.dcmread(files[2])
    ds.PatientID = "P2"
    ds.save_as(files[2])
    with pytest.raises(InputError, match="disagree on PatientID"):
        io.patient_info_of(folder)
    with pytest.raises(InputError, match="needs a DICOM input"):
        seg = tmp_path / "seg.nii.gz"
        io.write_volume(make_volume("label"), seg)
        io.patient_info_of(seg)


# ---------------------------------------------------------------------------------------- resource limits


def test_header_is_checked_against_the_memory_budget_before_any_voxel_is_read(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    big = sitk.Image([400, 400, 300], sitk.sitkUInt8)  # 48 M voxels of background: a ~50 KiB .nii.gz
    big.SetSpacing((0.5, 0.5, 0.5))
    sitk.WriteImage(big, str(cases / "big.nii.gz"), True)
    assert io.read_header(cases / "big.nii.gz").size == (400, 400, 300)

    def refuse(*args, **kwargs):
        raise AssertionError("voxel data was read")

    monkeypatch.setattr(io, "read_label", refuse)
    monkeypatch.setattr(io, "read_volume", refuse)
    out = tmp_path / "out"
    result = run_cli(
        "batch", cases, out, "--model", tiny_model_dir, "--steps", "1", "--device", "cpu",
        "--progress", "none", "--max-memory", "100M",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    (record,) = _read_manifest(out)
    assert record.status == "failed" and "needs about" in record.error and "--max-memory" in record.error


def test_dry_run_peak_memory_is_not_below_the_real_peak(cases, tiny_model_dir, tmp_path) -> None:
    fast = ["--model", str(tiny_model_dir), "--steps", "2", "--device", "cpu"]
    dry = subprocess.run(
        [sys.executable, "-m", "volgen", "batch", str(cases), str(tmp_path / "dry"), *fast, "--dry-run",
         "--progress", "json"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    events = [json.loads(line) for line in dry.stdout.splitlines() if line.startswith("{")]
    estimate = next(e for e in events if e["event"] == "estimate")["peak_bytes"]
    # The peak resident size of the real run, measured by a small parent: a child forked straight from this
    # (large) pytest process would count the parent's pages it shared before exec.
    measure = textwrap.dedent(
        """
        import os, subprocess, sys
        child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)  # Linux: KiB
        """
    )
    real = [
        sys.executable,
        "-m",
        "volgen",
        "batch",
        str(cases),
        str(tmp_path / "real"),
        *fast,
        "--progress",
        "none",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", measure, *real], capture_output=True, text=True, env=_env(), timeout=300
    )
    code, measured = (int(v) for v in proc.stdout.split())
    assert code == 0, proc.stderr
    assert estimate >= measured, (estimate / 2**20, measured / 2**20)


# -------------------------------------------------------------------------------------------- concurrency


def test_two_batch_runs_on_one_folder_generate_each_case_once(cases, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "volgen", "batch", str(cases), str(out), "--model", str(tiny_model_dir),
               "--steps", "2", "--device", "cpu", "--progress", "json"]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
            for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    done: dict[str, int] = {}
    for stdout, _ in outputs:
        for event in (json.loads(line) for line in stdout.splitlines() if line.startswith("{")):
            if event["event"] == "case_done" and event["status"] == "done":
                done[event["case"]] = done.get(event["case"], 0) + 1
    assert done == {"a": 1, "b": 1, "c": 1, "d": 1}  # every case generated by exactly one run
    # the manifest's last row of each case: done, or skipped by the run that came to it after it was done
    assert {r.case for r in _read_manifest(out)} == set("abcd")
    assert {r.status for r in _read_manifest(out)} <= {"done", "skipped"}
    assert not (out / ".volgen-claims").exists()


def test_a_claim_is_exclusive_and_a_dead_runs_claim_is_taken_over(tmp_path) -> None:
    from volgen.batch import claim
    from volgen.batch.claims import CLAIMS_FOLDER, claim_file_name

    held = claim(tmp_path, "case")
    assert held is not None and claim(tmp_path, "case") is None  # held (also against another process)
    probe = subprocess.run(
        [sys.executable, "-c", f"from volgen.batch import claim; from pathlib import Path; "
         f"print(claim(Path({str(tmp_path)!r}), 'case') is None)"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == "True", probe.stderr
    held.release()
    # a run killed while it held a claim: the file stays, its lock died with the process
    killed = subprocess.run(
        [sys.executable, "-c", f"import os; from volgen.batch import claim; from pathlib import Path; "
         f"c = claim(Path({str(tmp_path)!r}), 'case'); os._exit(9)"],
        env=_env(), timeout=60,
    )  # fmt: skip
    assert killed.returncode == 9 and (tmp_path / CLAIMS_FOLDER / claim_file_name("case")).exists()
    again = claim(tmp_path, "case")
    assert again is not None
    again.release()


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_is_appended_and_formula_cells_are_neutralised(tmp_path) -> None:
    from volgen.batch import ItemRecord, append_record, compact_manifest, read_manifest

    path = tmp_path / "manifest.csv"
    evil = ItemRecord(case="x", sample=0, input="=HYPERLINK(1)", outputs=[], seed=1, status="failed",
                      error="@SUM(A1) -2 +3")  # fmt: skip
    append_record(path, evil)
    first = path.read_bytes()
    append_record(
        path, ItemRecord(case="x", sample=0, input="+in", outputs=["x.nii.gz"], seed=1, status="done")
    )
    assert path.read_bytes().startswith(first)  # appended, the first row untouched
    cells = [line.split(",") for line in path.read_text().splitlines()[1:]]
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in cells for cell in row)
    (record,) = read_manifest(path)  # the last row of an item wins
    assert record.status == "done" and record.input == "+in"
    compact_manifest(path)
    assert len(path.read_text().splitlines()) == 2
    assert read_manifest(path)[0].input == "+in"
    append_record(path, evil)
    assert read_manifest(path)[0].error == "@SUM(A1) -2 +3"


# ------------------------------------------------------------------------------------------------ signals


def test_sighup_cleans_up_like_sigterm(cases, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "volgen", "batch", str(cases), str(out), "--model", str(tiny_model_dir),
         "--steps", "50", "--device", "cpu", "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    for line in process.stdout:
        if '"event": "progress"' in line:
            break
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    left = [p for p in out.rglob("*") if p.name.startswith(".volgen-tmp-") or p.suffix == ".claim"]
    assert left == []


@pytest.mark.parametrize(
    ("name", "header", "data"),
    [
        ("seg.mhd", "ElementDataFile = seg.raw\n", b"\0" * 100),  # data file too short: MetaIO complains
        ("seg.mha", "ElementDataFile = gone.raw\n", None),  # data file missing
    ],
)
def test_itk_prints_nothing_of_its_own(name, header, data, tmp_path) -> None:
    """ITK/MetaIO write to file descriptor 2 directly (past Python); volgen keeps that off the terminal."""
    text = "ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_UCHAR\n" + header
    (tmp_path / name).write_text(text)
    if data is not None:
        (tmp_path / "seg.raw").write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-m", "volgen", "info", str(tmp_path / name)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines


def test_a_folder_volgen_may_not_write_into_is_one_line(tmp_path, monkeypatch) -> None:
    """A read-only output folder (simulated: the tests may run as root, who may write anywhere)."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setattr(Path, "touch", refuse)
    with pytest.raises(OutputError, match=r"cannot create files in .* \(Permission denied\)"):
        io.write_volume(make_volume("ct"), tmp_path / "series", format="dicom", modality="CT")
    with pytest.raises(OutputError, match=r"cannot create files in .* \(Permission denied\)"):
        io.write_volume(make_volume("ct"), tmp_path / "ct.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_batch_on_a_cuda_device_this_machine_lacks(cases, tiny_model_dir, tmp_path) -> None:
    result = run_cli("batch", cases, tmp_path / "out", "--model", tiny_model_dir, "--device", "cuda:0")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "no CUDA device is available" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_batch_never_appends_to_its_input_manifest(cases, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.csv"  # the user's manifest, where the run's own manifest would go
    manifest.write_text("segmentation\n" + "\n".join(str(p) for p in sorted(cases.iterdir())) + "\n")
    before = manifest.read_bytes()
    result = run_cli("batch", manifest, out, "--model", tiny_model_dir, "--steps", "1", "--progress", "none")
    assert result.exit_code == 1 and "is the manifest" in result.output, result.output
    assert manifest.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["manifest.csv"]


def test_claims_without_file_locks(tmp_path, monkeypatch) -> None:
    """File systems without locks: a claim is the file's exclusive creation; a dead process's claim on this
    host is taken over, a live one's is not."""
    import errno
    import socket

    from volgen.batch import claims

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(claims.fcntl, "flock", no_locks)
    held = claims.claim(tmp_path, "case")
    assert held is not None and not held.locked
    assert claims.claim(tmp_path, "case") is None  # this (live) process holds it
    held.release()
    assert not (tmp_path / claims.CLAIMS_FOLDER / claims.claim_file_name("case")).exists()

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "since": 0}
    (tmp_path / claims.CLAIMS_FOLDER / claims.claim_file_name("case")).write_text(json.dumps(stale))
    again = claims.claim(tmp_path, "case")
    assert again is not None  # the dead process's claim was taken over
    again.release()
