"""What a new user meets in the first hour (issue 25): models by name everywhere, errors before torch loads,
one note line, the shipped example, λ's steps said, the dry run of generate, batch's plan table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import make_volume

from volgen import defaults, io
from volgen.cli.app import _register, app
from volgen.default_model import embedded_models, resolve_model
from volgen.errors import ModelError

_register()
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def seg_path(tmp_path):
    path = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label", size=(12, 10, 6), spacing=(1.5, 1.2, 3.0)), path)
    return path


@pytest.fixture
def colin_seg(tmp_path):
    """A small segmentation in the embedded model's label values (0..4), 6 slices."""
    image = sitk.GetImageFromArray(_labels(6, 20, 20))
    image.SetSpacing((2.0, 2.0, 2.0))
    path = tmp_path / "colin_small.nii.gz"
    io.write_volume(image, path)
    return path


def _labels(z: int, y: int, x: int):
    import numpy as np

    a = np.zeros((z, y, x), np.uint8)
    a[:, 2:-2, 2:-2] = 1
    a[:, 4:-4, 4:-4] = 2
    a[:, 6:-6, 6:-6] = 3
    a[:, 8:-8, 8:-8] = 4
    return a


# ---------------------------------------------------------------------------------- 1. models by name


def test_model_names_resolve_in_one_place(tmp_path, monkeypatch):
    assert resolve_model(None) == defaults.MODEL_DIR
    assert resolve_model("default") == defaults.MODEL_DIR
    assert set(embedded_models()) >= {"colin27-small"}
    assert resolve_model("colin27-small") == embedded_models()["colin27-small"]
    with pytest.raises(
        ModelError, match=r"model folder not found \(embedded models by name: default, colin27"
    ):
        resolve_model("no-such-model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert resolve_model("default") == Path("default")  # a folder of that name wins, as for volgen info


def test_load_model_and_read_metadata_take_names():
    from volgen.models import load_model, read_metadata

    assert read_metadata("default").name == read_metadata(defaults.MODEL_DIR).name
    assert load_model("colin27-small").path == embedded_models()["colin27-small"]


def test_a_1mm_segmentation_is_pointed_to_the_embedded_1mm_model(tmp_path):
    """The embedded 2 mm default on a 1 mm segmentation says so and names the embedded 1 mm model, which
    makes its pixels and runs the sampling it asks for (12 steps, guidance 1.25) without options."""
    image = sitk.GetImageFromArray(_labels(3, 20, 20))
    image.SetSpacing((1.0, 1.0, 1.5))
    seg = tmp_path / "colin_1mm.nii.gz"
    io.write_volume(image, seg)
    said = {}
    for model in (None, "colin27-native-1mm"):
        extra = [] if model is None else ["--model", model]
        result = _cli("generate", seg, *extra, "--dry-run", "--device", "cpu")
        assert result.exit_code == 0, result.output
        said[model] = " ".join(result.output.split())
    assert "makes 2 mm pixels" in said[None] and "--model colin27-native-1mm" in said[None]
    assert "own sampling defaults" not in said[None]
    assert "mm pixels" not in said["colin27-native-1mm"]
    assert "own sampling defaults: --steps 12 --guidance-scale 1.25" in said["colin27-native-1mm"]


@pytest.mark.parametrize("name", sorted(embedded_models()))
def test_generate_with_the_model_by_name(colin_seg, tmp_path, name):
    """Every embedded model (the fitted 64 px frame and the native 2 mm one) generates the example by name,
    on the segmentation's grid."""
    out = tmp_path / "out.nii.gz"
    result = _cli(
        "generate", colin_seg, "-o", out, "--model", name, "--steps", 1, "--guidance-scale", 1,
        "--progress", "none",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(io.sidecar_path(out).read_text(encoding="utf-8"))
    from volgen.models import weights_hash

    assert sidecar["model"]["weights_sha256"] == weights_hash(embedded_models()[name])
    written, segmentation = sitk.ReadImage(str(out)), sitk.ReadImage(str(colin_seg))
    assert written.GetSize() == segmentation.GetSize() and written.GetSpacing() == segmentation.GetSpacing()


def test_batch_and_generate_dry_runs_take_default(colin_seg, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    colin_seg.rename(cases / "a.nii.gz")
    result = _cli("batch", cases, tmp_path / "out", "--model", "default", "--steps", 2, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    result = _cli("generate", cases / "a.nii.gz", "--model", "default", "--dry-run")
    assert result.exit_code == 0, result.output


def test_slicer_helper_resolves_names_through_volgen(tmp_path):
    sys.path.insert(0, str(ROOT / "plugins" / "slicer" / "VolGen"))
    from VolGenLib import model_folder

    assert model_folder("default", sys.executable) == defaults.MODEL_DIR
    assert model_folder("colin27-small", sys.executable) == embedded_models()["colin27-small"]
    assert model_folder("", sys.executable) == defaults.MODEL_DIR
    assert model_folder(str(tmp_path), sys.executable) == tmp_path
    assert model_folder("no-such-model", sys.executable) is None


# ------------------------------------------------------------------------------- 2. errors before torch


def _run_cli_without_torch(args: list[str], cwd: Path) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter; the exit code, stderr and whether torch was imported."""
    program = (
        "import sys\n"
        "from volgen.cli.app import main\n"
        f"sys.argv = ['volgen', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('TORCH', 'torch' in sys.modules, 'CODE', code)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True, env=env)
    last = done.stdout.strip().splitlines()[-1].split()
    return int(last[3]), done.stderr, last[1] == "True"


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing_input", "file not found"),
        ("missing_model", "model folder not found (embedded models by name"),
        ("bad_scheduler", "scheduler"),
        ("existing_output", "exists"),
        ("unknown_format", "format"),
        ("missing_reference", "file not found"),
        ("unknown_class", "lung"),
    ],
)
def test_errors_come_before_torch_and_the_note(case, phrase, seg_path, tmp_path):
    out = tmp_path / "out.nii.gz"
    args = ["generate", str(seg_path), "-o", str(out)]
    if case == "missing_input":
        args[1] = str(tmp_path / "nope.nii.gz")
    elif case == "missing_model":
        args += ["--model", "no-such-model"]
    elif case == "bad_scheduler":
        args += ["--scheduler", "heun"]
    elif case == "existing_output":
        out.write_bytes(b"mine")
    elif case == "unknown_format":
        args += ["--format", "jpeg"]
    elif case == "missing_reference":
        args += ["--reference", str(tmp_path / "ref.nii.gz"), "--strength", "0.5"]
    elif case == "unknown_class":
        args += ["--drop", "lung"]
    code, stderr, torch_loaded = _run_cli_without_torch(args, tmp_path)
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], stderr
    assert not torch_loaded, "torch was imported before the error"
    assert case == "existing_output" or not out.exists()


@pytest.mark.parametrize("case", ["missing_input", "missing_model"])
def test_batch_errors_come_before_torch_and_the_note(case, seg_path, tmp_path):
    args = ["batch", str(seg_path.parent), str(tmp_path / "out")]
    if case == "missing_input":
        args[1] = str(tmp_path / "no_such_folder")
    else:
        args += ["--model", "no-such-model"]
    code, stderr, torch_loaded = _run_cli_without_torch(args, tmp_path)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert not torch_loaded and not (tmp_path / "out").exists()


def test_the_embedded_model_note_is_one_line_after_the_checks(colin_seg, tmp_path):
    result = _cli("generate", colin_seg, "-o", tmp_path / "o.nii.gz", "--dry-run", terminal_width=80)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    note = f"note: embedded model {defaults.MODEL_DIR.name}"
    assert len(notes) == 1 and notes[0].startswith(note), result.stderr
    assert notes[0].endswith("real use needs --model trained on real data")

    quiet = _cli("generate", colin_seg, "-o", tmp_path / "o.nii.gz", "--dry-run", "--quiet")
    assert quiet.exit_code == 0 and "note" not in quiet.stderr, quiet.stderr

    events = _cli("generate", colin_seg, "-o", tmp_path / "o.nii.gz", "--dry-run", "--progress", "json")
    assert events.exit_code == 0 and "note" not in events.stderr, events.stderr
    kinds = [json.loads(line)["event"] for line in events.stdout.splitlines()]
    assert kinds[0] == "notice" and "plan" in kinds

    missing = _cli("generate", tmp_path / "missing.nii.gz")
    assert missing.exit_code == 1 and "note:" not in missing.output


# ------------------------------------------------------------------------------------ 3. the example


def test_the_example_is_package_data_and_copied_by_volgen_example(tmp_path):
    from volgen.cli.checks import example_path

    shipped = example_path()
    assert shipped.read_bytes() == (ROOT / "examples" / "colin27_tissues_2mm.nii.gz").read_bytes()
    result = _cli("example", tmp_path)
    assert result.exit_code == 0, result.output
    copy = tmp_path / shipped.name
    assert copy.read_bytes() == shipped.read_bytes()
    again = _cli("example", tmp_path)
    assert again.exit_code == 1 and "exists" in again.output
    named = _cli("example", tmp_path / "seg.nii.gz")
    assert named.exit_code == 0 and (tmp_path / "seg.nii.gz").read_bytes() == shipped.read_bytes()


def test_generate_example_needs_no_checkout_and_writes_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _cli("generate", "example", "--dry-run", "--quiet", terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "colin27_tissues_2mm.nii.gz" in result.stdout and "91" in result.stdout  # its 91 axial slices
    from volgen.cli.checks import example_or

    seg, out = example_or(Path("example"), None)
    assert seg.name == "colin27_tissues_2mm.nii.gz" and out == Path("colin27_tissues_2mm_synthetic.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ 6. λ's steps


def test_strength_says_how_many_steps_run(seg_path, tiny_model_dir, tmp_path, wide_help):
    ref = tmp_path / "ref.nii.gz"
    image = make_volume("image", size=(12, 10, 6), spacing=(1.5, 1.2, 3.0))
    io.write_volume(image, ref)
    out = tmp_path / "out.nii.gz"
    result = _cli(
        "generate", seg_path, "-o", out, "--model", tiny_model_dir, "--reference", ref, "--strength", 0.4,
        "--steps", 5, "--progress", "none",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads(io.sidecar_path(out).read_text(encoding="utf-8"))["timesteps"]
    assert run == 2
    assert "λ 0.4: 2 of 5 steps" in result.stderr

    help_text = _cli("generate", "--help").output
    assert "λ 0.4 --steps 5: 2 steps" in " ".join(help_text.split())


# -------------------------------------------------------------------------- 7, 9. the plans and tables


def test_generate_dry_run_is_batchs_estimate_and_writes_nothing(seg_path, tiny_model_dir, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "case_with_a_rather_long_name_that_used_to_wrap.nii.gz").write_bytes(seg_path.read_bytes())
    before = sorted(tmp_path.rglob("*"))
    common = ["--model", tiny_model_dir, "--steps", 5, "--device", "cpu", "--seed", 3]
    gen = _cli("generate", seg_path, "--dry-run", "--progress", "json", *common)
    assert gen.exit_code == 0, gen.output
    batch = _cli("batch", cases, tmp_path / "out", "--dry-run", "--progress", "json", *common)
    assert batch.exit_code == 0, batch.output
    assert sorted(tmp_path.rglob("*")) == before
    (g,) = [e for e in map(json.loads, gen.stdout.splitlines()) if e["event"] == "plan"]
    (b,) = [e for e in map(json.loads, batch.stdout.splitlines()) if e["event"] == "plan"]
    for key in ("slices", "steps", "passes", "slice_forwards", "steps_asked"):
        assert g[key] == b[key], key
    assert g["steps"] == g["steps_asked"] == 5
    assert g["slice_forwards"] >= g["steps"] * g["passes"] * g["slices"]

    table = _cli("batch", cases, tmp_path / "out", "--dry-run", *common)  # not a terminal: CliRunner
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if "case_with_a_rather_long_name" in line)
    assert "case_with_a_rather_long_name_that_used_to_wrap" in row  # one line, not wrapped at 80 columns
    header = next(line for line in table.stdout.splitlines() if "slices" in line and "steps" in line)
    cells = [c.strip() for c in row.split("│")]
    names = [c.strip() for c in header.split("┃")]
    assert cells[names.index("steps")] == "5" and cells[names.index("passes/step")] in ("1", "2")
    assert "×" not in cells[names.index("slices")]


# ---------------------------------------------------------------------- 10. evaluate names the classes


def test_evaluate_names_classes_from_the_generating_model(tiny_model_dir, tmp_path):
    root = tmp_path / "eval"
    for sub in ("labels", "generated", "images"):
        (root / sub).mkdir(parents=True)
    for k in range(2):
        seg = make_volume("label", size=(12, 10, 6), spacing=(1.5, 1.2, 3.0), seed=k)
        io.write_volume(seg, root / "labels" / f"c{k}.nii.gz")
        io.write_volume(
            make_volume("image", size=(12, 10, 6), spacing=(1.5, 1.2, 3.0), seed=k),
            root / "images" / f"c{k}.nii.gz",
        )
        result = _cli(
            "generate", root / "labels" / f"c{k}.nii.gz", "-o", root / "generated" / f"c{k}.nii.gz",
            "--model", tiny_model_dir, "--steps", 1, "--progress", "none",
        )  # fmt: skip
        assert result.exit_code == 0, result.output

    named = _cli(
        "evaluate", root, tmp_path / "e1", "--segmenter", "intensity", "--no-planes", terminal_width=200
    )
    assert named.exit_code == 0, named.output
    report = json.loads((tmp_path / "e1" / "evaluation.json").read_text(encoding="utf-8"))
    assert report["classes"] == ["background", "liver", "kidney", "spleen"], report["classes"]
    assert "label map of" in named.stderr and "liver" in named.stdout

    by_name = _cli(
        "evaluate",
        root,
        tmp_path / "e2",
        "--segmenter",
        "intensity",
        "--no-planes",
        "--labels",
        tiny_model_dir,
    )
    assert by_name.exit_code == 0, by_name.output
    report = json.loads((tmp_path / "e2" / "evaluation.json").read_text(encoding="utf-8"))
    assert report["classes"][1:] == ["liver", "kidney", "spleen"]

    for sidecar in (root / "generated").glob("*.json"):
        sidecar.unlink()
    numbered = _cli("evaluate", root, tmp_path / "e3", "--segmenter", "intensity", "--no-planes")
    assert numbered.exit_code == 0, numbered.output
    report = json.loads((tmp_path / "e3" / "evaluation.json").read_text(encoding="utf-8"))
    assert "liver" not in report["classes"]


# ------------------------------------------------------------------------------- 8. the time claims


def test_the_readme_separates_install_time_from_generation_time():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text[text.index("## Quick start") : text.index("## How good is it")]
    assert "installing (`pip install torch==2.13.0 && pip install -e .`" in quick
    assert "generating (`volgen generate …` alone" in quick and "load of" in quick
    assert "about a minute" not in text and "10–25 s" not in text
