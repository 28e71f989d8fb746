"""``volgen generate --slice-axes`` / ``--axis-schedule``: multi-axis sampling through the CLI, the API and
batch; the default (the model's own axis) unchanged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import assert_same_geometry, make_volume, rotation

from volgen import defaults, io
from volgen.api import GenerateSettings, VolumeGenerator, generate
from volgen.cli.app import _register, app
from volgen.denoiser import Denoiser
from volgen.errors import VolgenError
from volgen.multiaxis import axis_schedule

_register()
AXES = "axial,coronal,sagittal"
FAST = ["--steps", "3", "--device", "cpu", "--progress", "none"]


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    """Anisotropic (1.1, 1.3, 1.6 mm), oblique: every axis is usable in a 16 px cube (voxel 1.0 mm)."""
    path = tmp_path_factory.mktemp("axes") / "seg.nii.gz"
    volume = make_volume(
        "label", size=(14, 12, 10), spacing=(1.1, 1.3, 1.6), direction=rotation(0.1, 0.05, 0.4)
    )
    io.write_volume(volume, path)
    return path


@pytest.fixture(scope="module")
def reference(seg) -> Path:
    path = seg.parent / "reference.nii.gz"
    labels = io.read_label(seg)
    image = make_volume("image", size=labels.GetSize(), spacing=labels.GetSpacing())
    image.CopyInformation(labels)
    io.write_volume(image, path)
    return path


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def generate_cli(seg: Path, out: Path, model: Path, *extra: object) -> tuple[bytes, dict]:
    result = cli("generate", seg, "-o", out, "--model", model, *FAST, "--overwrite", *extra)
    assert result.exit_code == 0, result.output
    return out.read_bytes(), json.loads(Path(f"{out}.json").read_text())


def test_cli_multiaxis_keeps_the_grid_is_deterministic_and_batch_independent(
    seg, multiaxis_model_dir, tmp_path
):
    def run(name: str, *extra: object) -> tuple[bytes, dict]:
        return generate_cli(seg, tmp_path / name, multiaxis_model_dir, "--slice-axes", AXES, *extra)

    first, sidecar = run("a.nii.gz", "--seed", "3", "--rho", "0")
    # the file holds the input's geometry as NIfTI stores it (float32 quaternion), exactly as today's output
    assert_same_geometry(io.read_image(tmp_path / "a.nii.gz"), io.read_label(seg), atol=1e-6)
    values = sitk.GetArrayFromImage(io.read_image(tmp_path / "a.nii.gz"))
    assert np.isfinite(values).all() and values.std() > 0
    assert run("b.nii.gz", "--seed", "3", "--rho", "0")[0] == first
    assert run("c.nii.gz", "--seed", "3", "--rho", "0", "--slice-batch-size", "5")[0] == first
    assert run("d.nii.gz", "--seed", "4", "--rho", "0")[0] != first
    assert run("e.nii.gz", "--seed", "3", "--rho", "0.9")[0] != first  # ρ combines with it
    single = generate_cli(seg, tmp_path / "f.nii.gz", multiaxis_model_dir, "--seed", "3", "--rho", "0")
    assert single[0] != first  # the default slices along the model's own axis, in its own frame
    assert_same_geometry(io.read_image(tmp_path / "a.nii.gz"), io.read_image(tmp_path / "f.nii.gz"), atol=0)
    # in memory: the segmentation's grid bit for bit
    labels = io.read_label(seg)
    volume = VolumeGenerator(multiaxis_model_dir, device="cpu").generate(
        labels, settings=GenerateSettings(num_inference_steps=2, slice_axes=AXES.split(","))
    )
    assert_same_geometry(volume.image, labels, atol=0)

    assert sidecar["settings"]["slice_axes"] == AXES.split(",")
    assert sidecar["settings"]["axis_schedule"] == "cycle"
    assert sidecar["slice_axes"] == AXES.split(",")
    assert sidecar["axis_schedule"] == ["axial", "coronal", "sagittal"]
    assert sidecar["cube_voxel_mm"] == pytest.approx(1.0)
    assert single[1]["settings"]["slice_axes"] is None
    assert single[1]["slice_axes"] == ["axial"] and single[1]["cube_voxel_mm"] is None


def test_default_is_the_models_own_axis_byte_for_byte(seg, tiny_model_dir, tmp_path):
    default, sidecar = generate_cli(seg, tmp_path / "default.nii.gz", tiny_model_dir, "--seed", "2")
    own, _ = generate_cli(
        seg, tmp_path / "own.nii.gz", tiny_model_dir, "--seed", "2", "--slice-axes", "axial"
    )
    assert own == default  # a single-axis model asked for its own axis: the same single-axis sampling
    assert sidecar["axis_schedule"] == ["axial"] * 3 and sidecar["cube_voxel_mm"] is None


class Recorder:
    """Counts the UNet slice-forwards of each axis code (``None``: the model's own axis)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[int | None, int]] = []
        original = Denoiser.predict

        def predict(denoiser, model_input, *args, **kwargs):
            self.calls.append((kwargs.get("axis"), model_input.shape[0]))
            return original(denoiser, model_input, *args, **kwargs)

        monkeypatch.setattr(Denoiser, "predict", predict)


def passes_per_slice(steps: int) -> int:
    """UNet passes per slice of a run of ``steps`` steps at the default guidance of a model with "specified"
    flags: two on the steps in ``defaults.GUIDANCE_INTERVAL`` (step ``k`` at position ``k / steps``), one on
    the others."""
    start, stop = defaults.GUIDANCE_INTERVAL
    return sum(2 if start <= k / steps < stop else 1 for k in range(steps))


@pytest.mark.parametrize(
    ("schedule", "fraction", "steps", "expected"),
    [
        ("cycle", 0.5, 4, [0, 1, 2, 0]),
        ("late", 0.5, 4, [0, 0, 1, 2]),
        ("late", 0.25, 4, [0, 0, 0, 1]),
        ("late", 0.0, 3, [0, 0, 0]),
    ],
)
def test_each_schedule_slices_as_it_says_with_the_unet_evaluations_of_single_axis(
    schedule, fraction, steps, expected, seg, multiaxis_model_dir, monkeypatch
):
    generator = VolumeGenerator(multiaxis_model_dir, device="cpu")
    settings = GenerateSettings(
        num_inference_steps=steps, slice_axes=AXES.split(","), axis_schedule=schedule, late_fraction=fraction
    )
    recorder = Recorder(monkeypatch)
    reports = []
    out = generator.generate(io.read_label(seg), settings=settings, progress=reports.append)
    assert [axis for axis, _ in recorder.calls] == expected  # one UNet pass per step, along its axis
    assert all(slices == 16 for _, slices in recorder.calls)  # a cube side each
    assert out.axis_schedule == [("axial", "coronal", "sagittal")[a] for a in expected]
    assert reports[-1].slices_done == reports[-1].slices_total == steps * 16
    # the same number of UNet evaluations as single-axis sampling of the cube (two passes on the guided
    # steps: a model with "specified" flags is guided by default)
    assert generator.slice_forwards(io.read_label(seg), settings) == 16 * passes_per_slice(steps)
    multi_forwards = sum(slices for _, slices in recorder.calls)
    recorder.calls.clear()
    generator.generate(
        io.read_label(seg), settings=GenerateSettings(num_inference_steps=steps, slice_axes=["axial"])
    )
    assert recorder.calls == [(0, 16)] * steps
    assert sum(slices for _, slices in recorder.calls) == multi_forwards


def test_axis_schedule_counts():
    axes = ("axial", "coronal", "sagittal")
    assert Counter(axis_schedule(axes, 10)) == {"axial": 4, "coronal": 3, "sagittal": 3}
    late = axis_schedule(axes, 10, kind="late", late_fraction=0.3)
    assert late == ["axial"] * 7 + ["coronal", "sagittal", "axial"]
    assert axis_schedule(axes, 10, kind="late", late_fraction=1.0)[:3] == ["coronal", "sagittal", "axial"]
    assert axis_schedule(("coronal",), 4, kind="late") == ["coronal"] * 4
    assert len(axis_schedule(axes, 7, kind="late", late_fraction=0.5)) == 7


def test_strength_keep_drop_and_x0_smoothing_with_multiaxis(seg, reference, multiaxis_model_dir, tmp_path):
    base = ["--slice-axes", AXES, "--steps", "4", "--axis-schedule", "late", "--late-fraction", "0.5"]
    free, _ = generate_cli(seg, tmp_path / "free.nii.gz", multiaxis_model_dir, *base)
    half, sidecar = generate_cli(
        seg,
        tmp_path / "half.nii.gz",
        multiaxis_model_dir,
        *base,
        "--reference",
        reference,
        "--strength",
        "0.5",
    )
    assert half != free
    assert 0 < sidecar["start_timestep"] <= 500 and sidecar["timesteps"] == 2
    assert sidecar["axis_schedule"] == ["coronal", "sagittal"]  # the tail of the full late schedule
    assert (
        generate_cli(
            seg,
            tmp_path / "half2.nii.gz",
            multiaxis_model_dir,
            *base,
            "--reference",
            reference,
            "--strength",
            "0.5",
        )[0]
        == half
    )
    zero = tmp_path / "zero.nii.gz"
    generate_cli(seg, zero, multiaxis_model_dir, *base, "--reference", reference, "--strength", "0")
    real = sitk.GetArrayFromImage(io.read_image(reference))
    assert np.allclose(sitk.GetArrayFromImage(io.read_image(zero)), real)  # λ = 0 is the reference

    dropped, sidecar = generate_cli(
        seg, tmp_path / "drop.nii.gz", multiaxis_model_dir, *base, "--drop", "kidney"
    )
    assert dropped != free and sidecar["classes_kept"] == ["liver", "spleen"]
    smoothed, _ = generate_cli(seg, tmp_path / "x0.nii.gz", multiaxis_model_dir, *base, "--x0-smoothing", "1")
    assert smoothed != free


def test_thick_slices_leave_axes_out_and_the_sidecar_says_so(multiaxis_model_dir, tmp_path):
    seg = tmp_path / "thick.nii.gz"
    io.write_volume(make_volume("label", n_labels=3), seg)  # (0.7, 0.9, 2.5) mm: only axial slices usable
    _, sidecar = generate_cli(seg, tmp_path / "thick_out.nii.gz", multiaxis_model_dir, "--slice-axes", AXES)
    assert sidecar["slice_axes"] == ["axial"] and sidecar["axis_schedule"] == ["axial"] * 3
    assert sidecar["settings"]["slice_axes"] == AXES.split(",")
    assert_same_geometry(io.read_image(tmp_path / "thick_out.nii.gz"), io.read_label(seg), atol=1e-6)


def test_clear_errors(seg, tiny_model_dir, multiaxis_model_dir, tmp_path):
    out = tmp_path / "never.nii.gz"
    result = cli("generate", seg, "-o", out, "--model", tiny_model_dir, *FAST, "--slice-axes", AXES)
    assert result.exit_code == 1
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert "'tiny-test'" in line and str(tiny_model_dir) in line and "axial slices only" in line
    assert "not coronal, sagittal" in line
    for extra, message in [
        (["--slice-axes", "axial,oblique"], "unknown axis 'oblique'"),
        (["--slice-axes", "axial,axial"], "names an axis twice"),
        (["--slice-axes", ","], "non-empty"),
        (["--axis-schedule", "sometimes"], "--axis-schedule must be one of cycle, late"),
        (["--late-fraction", "1.5"], "--late-fraction must be in [0, 1]"),
    ]:
        result = cli("generate", seg, "-o", out, "--model", multiaxis_model_dir, *FAST, *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(VolgenError, match="trained on axial slices only"):
        generate(seg, out, model=tiny_model_dir, settings=GenerateSettings(slice_axes=["sagittal"]))
    with pytest.raises(VolgenError, match="--slice-axes"):
        GenerateSettings(slice_axes="axial")  # a list, not a string


def test_memory_and_time_estimates_count_the_cube(seg, multiaxis_model_dir):
    generator = VolumeGenerator(multiaxis_model_dir, device="cpu")
    labels = io.read_label(seg)
    multi = GenerateSettings(num_inference_steps=2, slice_axes=AXES.split(","))
    single = GenerateSettings(num_inference_steps=2)
    # a model with "specified" flags is guided by default (two passes on the guided steps)
    assert generator.slice_forwards(labels, multi) == 16 * passes_per_slice(
        2
    )  # a 16³ cube: 16 slices per step
    assert generator.slice_forwards(labels, single) == 16 * passes_per_slice(
        2
    )  # 10 axial slices padded to 16
    assert generator.memory_needed(labels, multi) > generator.memory_needed(labels, single)


def test_batch_treats_other_axes_as_other_settings(seg, multiaxis_model_dir, tmp_path):
    from volgen.batch import read_manifest

    cases = tmp_path / "cases"
    cases.mkdir()
    io.write_volume(io.read_label(seg), cases / "a.nii.gz")
    out = tmp_path / "out"

    def batch(*extra: str) -> dict:
        result = cli("batch", cases, out, "--model", multiaxis_model_dir, "--steps", "2", "--device", "cpu",
                     "--progress", "none", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        return {r.case: r.status for r in read_manifest(out / "manifest.csv")}

    assert batch("--slice-axes", AXES) == {"a": "done"}
    sidecar = json.loads((out / "a.nii.gz.json").read_text())
    assert sidecar["slice_axes"] == AXES.split(",") and sidecar["axis_schedule"] == ["axial", "coronal"]
    assert batch("--slice-axes", AXES) == {"a": "skipped"}
    assert batch("--slice-axes", AXES, "--slice-batch-size", "3") == {"a": "skipped"}
    assert batch("--slice-axes", "axial,coronal") == {"a": "done"}
    assert batch("--slice-axes", "axial,coronal", "--axis-schedule", "late") == {"a": "done"}
    assert batch("--slice-axes", "axial,coronal", "--axis-schedule", "late", "--late-fraction", "1") == {
        "a": "done"
    }
    assert batch() == {"a": "done"}  # the model's own axis
    assert batch() == {"a": "skipped"}

    # a sidecar written before these settings existed was made with their defaults: still current
    sidecar = json.loads((out / "a.nii.gz.json").read_text())
    for key in ("slice_axes", "axis_schedule", "late_fraction"):
        del sidecar["settings"][key]
    (out / "a.nii.gz.json").write_text(json.dumps(sidecar))
    assert batch() == {"a": "skipped"}
    assert batch("--slice-axes", AXES) == {"a": "done"}
