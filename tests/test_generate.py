"""`volgen generate` end to end with a tiny model: geometry, determinism, λ, outputs, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import assert_same_geometry, make_volume, rotation

from volgen import defaults, io
from volgen.api import GenerateSettings, generate
from volgen.cli.app import _register, app
from volgen.errors import InputError, LabelError, ResourceError, VolgenError

_register()
runner = CliRunner()
FAST = GenerateSettings(num_inference_steps=2, scheduler="ddim")


@pytest.fixture
def seg_path(tmp_path):
    seg = make_volume("label", size=(20, 14, 9), spacing=(0.8, 1.1, 2.5), direction=rotation())
    path = tmp_path / "seg.nii.gz"
    io.write_volume(seg, path)
    return path


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_output_has_the_exact_input_geometry(seg_path, tiny_model_dir, tmp_path):
    out = tmp_path / "out.nrrd"
    result = generate(seg_path, out, model=tiny_model_dir, settings=FAST)
    generated = sitk.ReadImage(str(out))
    seg = sitk.ReadImage(str(seg_path))
    assert generated.GetSize() == seg.GetSize()
    assert_same_geometry(generated, seg)
    assert generated.GetPixelID() == sitk.sitkFloat32  # MR model
    assert result.sidecar == tmp_path / "out.nrrd.json"


def test_same_seed_gives_identical_bytes_and_batch_size_does_not_matter(seg_path, tiny_model_dir, tmp_path):
    paths = []
    for name, batch in (("a", 1), ("b", 7), ("c", 16)):
        settings = GenerateSettings(num_inference_steps=2, seed=11, slice_batch_size=batch)
        paths.append(tmp_path / f"{name}.nii.gz")
        generate(seg_path, paths[-1], model=tiny_model_dir, settings=settings)
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in paths]
    assert np.array_equal(arrays[0], arrays[1])
    assert np.array_equal(arrays[0], arrays[2])
    other = tmp_path / "d.nii.gz"
    generate(seg_path, other, model=tiny_model_dir, settings=GenerateSettings(num_inference_steps=2, seed=12))
    assert not np.array_equal(arrays[0], sitk.GetArrayFromImage(sitk.ReadImage(str(other))))


def test_strength_zero_returns_the_reference(seg_path, tiny_model_dir, tmp_path):
    seg = sitk.ReadImage(str(seg_path))
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in seg.GetSize()[::-1]), indexing="ij")
    smooth = sitk.GetImageFromArray((100 + 400 * (x + y) + 200 * z).astype(np.float32))
    smooth.CopyInformation(seg)
    ref = tmp_path / "ref.nii.gz"
    io.write_volume(smooth, ref)
    out = tmp_path / "lam0.nii.gz"
    generate(
        seg_path,
        out,
        model=tiny_model_dir,
        reference=ref,
        settings=GenerateSettings(num_inference_steps=4, strength=0.0),
    )
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.array_equal(got, sitk.GetArrayFromImage(smooth))  # the reference's own values, exactly
    sidecar = json.loads((tmp_path / "lam0.nii.gz.json").read_text())
    assert sidecar["settings"]["strength"] == 0.0
    assert sidecar["reference"] == str(ref)


def test_cli_json_progress_and_complete_sidecar(seg_path, tiny_model_dir, tmp_path):
    out = tmp_path / "syn.nii.gz"
    png = tmp_path / "syn.png"
    result = _cli(
        "generate",
        seg_path,
        "-o",
        out,
        "--model",
        tiny_model_dir,
        "--steps",
        3,
        "--seed",
        4,
        "--drop",
        "spleen",
        "--progress",
        "json",
        "--preview",
        png,
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    sidecar = json.loads((tmp_path / "syn.nii.gz.json").read_text())
    for key in ("volgen_version", "model", "settings", "classes_kept", "seconds", "segmentation", "output"):
        assert key in sidecar
    assert sidecar["model"]["weights_sha256"] and sidecar["model"]["id"]
    s = sidecar["settings"]
    assert (s["seed"], s["scheduler"], s["num_inference_steps"], s["noise_correlation"], s["strength"]) == (
        4,
        "dpmsolver++",
        3,
        defaults.NOISE_CORRELATION,
        1.0,
    )
    assert sidecar["classes_kept"] == ["liver", "kidney"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dicom_output_passes_dciodvfy(seg_path, tiny_model_dir, tmp_path):
    out = tmp_path / "dicom_out"
    generate(seg_path, out, model=tiny_model_dir, settings=FAST, output_format="dicom")
    files = sorted(out.iterdir())
    assert len(files) == sitk.ReadImage(str(seg_path)).GetSize()[2]
    report = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    back = io.read_image(out)
    assert_same_geometry(back, sitk.ReadImage(str(seg_path)), atol=1e-4)


def test_existing_output_is_refused_and_left_untouched(seg_path, tiny_model_dir, tmp_path):
    out = tmp_path / "exists.nii.gz"
    out.write_bytes(b"keep me")
    result = _cli("generate", seg_path, "-o", out, "--model", tiny_model_dir, "--steps", 1)
    assert result.exit_code == 1
    assert "exists" in result.output and str(out) in result.output
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.nii.gz", "seg.nii.gz"]


def _write(image, path):
    io.write_volume(image, path)
    return path


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing", "not found"),
        ("unknown_labels", "unknown to label map"),
        ("float_labels", "non-integer"),
        ("two_d", "2D"),
        ("bad_scheduler", "unknown scheduler"),
        ("strength_high", "[0, 1]"),
        ("reference_geometry", "geometry differs"),
        ("max_memory", "above the limit"),
        ("unknown_class", "unknown class 'lung'"),
        ("missing_folder", "folder"),
        ("steps_beyond_schedule", "--steps must be at most the model's 1000 training timesteps, got 1001"),
        ("seed_negative", "--seed must be an integer in 0..9223372036854775807, got -1"),
        ("seed_too_large", "--seed must be an integer in 0..9223372036854775807, got 9223372036854775808"),
        ("max_memory_inf", "--max-memory must be a positive size"),
        ("max_memory_nan", "--max-memory must be a positive size"),
        ("cuda_without_cuda", "--device cuda: no CUDA device is available"),
        ("precision", "--precision must be"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    case, phrase, seg_path, tiny_model_dir, tmp_path, monkeypatch
):
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    out = out_dir / "out.nii.gz"
    seg = sitk.ReadImage(str(seg_path))
    args = ["generate", seg_path, "-o", out, "--model", tiny_model_dir, "--steps", 1]
    if case == "missing":
        args[1] = tmp_path / "nope.nii.gz"
    elif case == "unknown_labels":
        bad = sitk.Cast(seg, sitk.sitkUInt8) * 3  # values 3, 6, 9: 6 and 9 unknown
        args[1] = _write(bad, tmp_path / "unknown.nii.gz")
    elif case == "float_labels":
        args[1] = _write(sitk.Cast(seg, sitk.sitkFloat32) * 0.5, tmp_path / "float.nii.gz")
    elif case == "two_d":
        args[1] = tmp_path / "flat.nii.gz"
        sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(args[1]))
    elif case == "bad_scheduler":
        args += ["--scheduler", "heun"]
    elif case == "strength_high":
        args += ["--strength", "1.5"]
    elif case == "reference_geometry":
        ref = make_volume("image", size=(20, 14, 9), spacing=(1.0, 1.0, 1.0))
        args += ["--reference", _write(ref, tmp_path / "ref.nii.gz"), "--strength", "0.5"]
    elif case == "max_memory":
        args += ["--max-memory", "1M"]
    elif case == "unknown_class":
        args += ["--keep", "liver,lung"]
    elif case == "missing_folder":
        args[3] = tmp_path / "no" / "such" / "out.nii.gz"
    elif case == "steps_beyond_schedule":
        args += ["--steps", "1001"]
    elif case == "seed_negative":
        args += ["--seed", "-1"]
    elif case == "seed_too_large":
        args += ["--seed", str(2**63)]
    elif case in ("max_memory_inf", "max_memory_nan"):
        args += ["--max-memory", case.rsplit("_", 1)[1]]
    elif case == "cuda_without_cuda":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args += ["--device", "cuda"]
    elif case == "precision":
        args += ["--precision", "fp8"]
    result = _cli(*args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and phrase in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_library_errors_are_typed(seg_path, tiny_model_dir, tmp_path):
    with pytest.raises(ResourceError):
        generate(seg_path, tmp_path / "o.nii.gz", model=tiny_model_dir, settings=FAST, max_memory=1000)
    with pytest.raises(LabelError):
        generate(
            seg_path,
            tmp_path / "o.nii.gz",
            model=tiny_model_dir,
            settings=GenerateSettings(num_inference_steps=1, keep=["lung"]),
        )
    with pytest.raises(InputError):
        generate(tmp_path / "missing.nii.gz", tmp_path / "o.nii.gz", model=tiny_model_dir, settings=FAST)
    with pytest.raises(VolgenError):
        generate(
            seg_path,
            tmp_path / "o.nii.gz",
            model=tiny_model_dir,
            settings=GenerateSettings(noise_correlation=1.0),
        )


def test_unknown_labels_background_option(seg_path, tiny_model_dir, tmp_path):
    seg = sitk.ReadImage(str(seg_path))
    bad = _write(sitk.Cast(seg, sitk.sitkUInt8) * 3, tmp_path / "unknown.nii.gz")
    result = _cli(
        "generate",
        bad,
        "-o",
        tmp_path / "o.nii.gz",
        "--model",
        tiny_model_dir,
        "--steps",
        1,
        "--unknown-labels",
        "background",
        "--progress",
        "none",
    )
    assert result.exit_code == 0, result.output


def test_reference_geometry_error_says_what_differs(seg_path, tiny_model_dir, tmp_path):
    ref = make_volume("image", size=(20, 14, 9), spacing=(1.0, 1.0, 1.0))
    args = ["generate", seg_path, "-o", tmp_path / "o.nii.gz", "--model", tiny_model_dir, "--steps", 1]
    result = _cli(*args, "--reference", _write(ref, tmp_path / "ref.nii.gz"), "--strength", "0.5")
    assert result.exit_code == 1
    line = " ".join(result.output.split())  # rich may wrap the one line
    assert (
        "geometry differs from the segmentation" in line and "spacing (1, 1, 1) vs (0.8, 1.1, 2.5) mm" in line
    )
    assert "size" not in line and "origin" not in line and "direction" not in line  # the same: not reported
    result = _cli(*args, "--reference", tmp_path / "ref.nii.gz", "--strength", "0.5", "--resample-reference")
    assert result.exit_code == 0, result.output


def test_help_shows_the_default_output_name(wide_help):
    result = runner.invoke(app, ["generate", "--help"])
    assert "SEGMENTATION_synthetic.nii.gz" in " ".join(result.output.split())


def test_a_failing_preview_is_one_warning_and_the_volume_stays(
    seg_path, tiny_model_dir, tmp_path, monkeypatch
):
    import volgen.preview

    def no_matplotlib(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(volgen.preview, "save_montage", no_matplotlib)
    out = tmp_path / "o.nii.gz"
    args = [
        "generate",
        seg_path,
        "-o",
        out,
        "--model",
        tiny_model_dir,
        "--steps",
        1,
        "--preview",
        tmp_path / "p.png",
    ]
    result = _cli(*args, "--progress", "none")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "matplotlib" in warnings[0]
    assert out.is_file() and (tmp_path / "o.nii.gz.json").is_file() and not (tmp_path / "p.png").exists()
    result = _cli(*args, "--progress", "json", "--overwrite")
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events][-2:] == ["warning", "done"] and events[-1]["preview"] is None
