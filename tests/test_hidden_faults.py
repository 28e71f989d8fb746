"""Faults a hidden corpus found (issue 25), outside batch conversion: each test reproduced its fault first.

Outputs that collide with each other, a signal after the outputs are in place, DICOM of left-handed grids,
tracebacks instead of one line, and names or values printed wrong. ``docs/reliability.md`` lists them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import Workspace
from test_hostile import invoke, one_error_line, snapshot


@pytest.fixture
def workspace(tmp_path, tiny_model_dir) -> Workspace:
    return Workspace(tmp_path, tiny_model_dir)


# ------------------------------------------------------------------------- outputs against each other


@pytest.mark.parametrize("preview", ["sidecar", "output"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_preview_named_like_the_runs_own_sidecar_or_output_is_refused(
    workspace: Workspace, preview: str, overwrite: bool
) -> None:
    """``--preview`` naming the run's sidecar (or ``-o``) used to replace it, exit 0."""
    invocation = workspace.generate(workspace.good_segmentation())
    out = workspace.out / "syn.nii.gz"
    if overwrite:  # a finished earlier run: its output and sidecar must survive the refused one
        assert invoke(*invocation.args).exit_code == 0
    target = {"sidecar": workspace.out / "syn.nii.gz.json", "output": out}[preview]
    extra = ["--preview", str(target)] + (["--overwrite"] if overwrite else [])
    before = snapshot(workspace.root)
    line = one_error_line(invoke(*invocation.args, *extra))
    assert f"the preview is the {preview}" in line and "choose another preview" in line, line
    assert snapshot(workspace.root) == before


def test_samples_whose_previews_collide_with_another_samples_outputs_are_refused(
    workspace: Workspace,
) -> None:
    """With ``--samples 2``, a preview ``syn.nii.gz`` is numbered like the outputs (``syn_s0.nii.gz``)."""
    invocation = workspace.generate(workspace.good_segmentation())
    before = snapshot(workspace.root)
    line = one_error_line(
        invoke(*invocation.args, "--samples", "2", "--preview", str(workspace.out / "syn.nii.gz"))
    )
    assert "syn_s0.nii.gz" in line and "the preview is the output" in line, line
    assert snapshot(workspace.root) == before


def test_check_apart_names_how_outputs_collide(tmp_path: Path) -> None:
    from volgen import io
    from volgen.errors import OutputError

    io.check_apart([("output", tmp_path / "a"), ("sidecar", tmp_path / "a.json"), ("preview", None)])
    with pytest.raises(OutputError, match="the preview lies inside the output"):
        io.check_apart([("output", tmp_path / "series"), ("preview", tmp_path / "series" / "p.png")])
    (tmp_path / "link").symlink_to(tmp_path / "a.json")
    with pytest.raises(OutputError, match="the preview is the sidecar"):
        io.check_apart([("sidecar", tmp_path / "a.json"), ("preview", tmp_path / "link")])


# ------------------------------------------------------------------------- every format, same physical points


def _read_back(path: Path):
    """An output read with SimpleITK (not volgen's reader), with its step in values (0: exact). A DICOM folder
    goes through GDCM's slice sorting; MR intensities are its stored values times the slope of the Real World
    Value Mapping (which SimpleITK does not apply) plus the intercept."""
    import pydicom
    import SimpleITK as sitk

    if not path.is_dir():
        return sitk.ReadImage(str(path)), 0.0
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(path))
    reader.SetFileNames(files)
    image = sitk.Cast(reader.Execute(), sitk.sitkFloat64)
    item = pydicom.dcmread(files[0]).RealWorldValueMappingSequence[0]
    slope, intercept = float(item.RealWorldValueSlope), float(item.RealWorldValueIntercept)
    return image * slope + intercept, slope


@pytest.mark.parametrize("flip", [None, 0, 2], ids=["right-handed", "left-handed-x", "left-handed-z"])
def test_every_output_format_has_the_same_values_at_the_same_physical_points(
    workspace: Workspace, flip: int | None
) -> None:
    """A (left-handed) oblique segmentation generated into every format: sampled at the physical centre of
    every segmentation voxel, each output holds the values the NIfTI output holds there."""
    import numpy as np
    from volumes import make_volume, rotation

    direction = np.asarray(rotation()).reshape(3, 3)
    if flip is not None:
        direction[:, flip] *= -1
    seg_image = make_volume("label", direction=direction.ravel())
    seg = workspace.write(seg_image, "lh.nii.gz")
    outputs = {
        "nifti": workspace.out / "o.nii.gz",
        "nrrd": workspace.out / "o.nrrd",
        "mha": workspace.out / "o.mha",
        "dicom": workspace.out / "series",
    }
    for fmt, out in outputs.items():
        args = workspace.generate(seg).args
        args[3] = str(out)
        result = invoke(*args, "--steps", "2", *(["--format", "dicom"] if fmt == "dicom" else []))
        assert result.exit_code == 0, result.output
    images = {fmt: _read_back(out) for fmt, out in outputs.items()}
    points = [
        seg_image.TransformIndexToPhysicalPoint((i, j, k))
        for i in range(seg_image.GetWidth())
        for j in range(seg_image.GetHeight())
        for k in range(seg_image.GetDepth())
    ]

    def sample(image) -> np.ndarray:
        values = []
        for point in points:
            index = [round(c) for c in image.TransformPhysicalPointToContinuousIndex(point)]
            assert all(0 <= index[a] < image.GetSize()[a] for a in range(3)), (point, index)
            values.append(image.GetPixel(index))
        return np.asarray(values, dtype=np.float64)

    reference = sample(images["nifti"][0])
    assert np.ptp(reference) > 0
    for fmt, (image, step) in images.items():  # DICOM MR: floats on a 16-bit scale, half a step off at most
        np.testing.assert_allclose(sample(image), reference, rtol=0, atol=step * 0.51, err_msg=fmt)


# ------------------------------------------------------------------------- tracebacks and stray lines


def test_unknown_keys_in_a_model_config_print_no_diffusers_lines(tiny_model_dir, tmp_path: Path) -> None:
    """diffusers' own "config attributes ... are not expected" lines used to reach stderr."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("unet/config.json", "scheduler/scheduler_config.json"):
        config = json.loads((model / name).read_text(encoding="utf-8"))
        config["bogus_key"] = 1
        (model / name).write_text(json.dumps(config), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSERS_VERBOSITY"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "volgen", "info", str(model)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "tiny-test" in proc.stdout


@pytest.mark.parametrize("name", ["seg.nii", "seg.nii.gz"])
def test_a_segmentation_truncated_while_it_is_read(workspace: Workspace, monkeypatch, name: str) -> None:
    """The file is cut short after volgen's own scan and before ITK reads the voxels: ITK fills what is
    missing without complaint, so this used to generate from a half-empty segmentation with exit 0."""
    from volumes import make_volume

    import volgen.io.volumes as volume_io
    from volgen import io

    seg = workspace.root / name
    io.write_volume(make_volume("label", size=(40, 40, 20)), seg)
    real_open, opened = volume_io.open_file, []

    def open_then_truncate(path, **kwargs):
        found = real_open(path, **kwargs)  # header read, data scanned: complete
        opened.append(path)
        data = seg.read_bytes()
        seg.write_bytes(data[: len(data) * 2 // 3])
        return found

    monkeypatch.setattr(volume_io, "open_file", open_then_truncate)
    line = one_error_line(invoke(*workspace.generate(seg).args))
    assert name in line and "changed while it was read" in line, line
    assert opened and list(workspace.out.iterdir()) == []


# ------------------------------------------------------------------------- words on the terminal

HOSTILE_NAME = "[red]x\x1b[2J\x1b]0;pwned\x07"  # rich markup, a clear-screen and a window-title escape
SHOWN_NAME = "[red]x\\x1b[2J\\x1b]0;pwned\\x07"


def test_wrote_and_preview_lines_show_hostile_file_names_as_text(workspace: Workspace) -> None:
    """Output and preview names used to reach the terminal raw: markup applied, escape sequences sent."""
    args = workspace.generate(workspace.good_segmentation()).args
    args[3] = str(workspace.out / f"{HOSTILE_NAME}.nii.gz")
    result = invoke(*args, "--preview", str(workspace.out / f"{HOSTILE_NAME}.png"))
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    lines = result.output.splitlines()
    assert any(line.startswith("wrote ") and f"{SHOWN_NAME}.nii.gz" in line for line in lines), lines
    assert any(line.startswith("preview ") and f"{SHOWN_NAME}.png" in line for line in lines), lines


def test_info_table_title_shows_a_hostile_file_name_as_text(workspace: Workspace) -> None:
    import shutil

    seg = workspace.root / f"{HOSTILE_NAME}.nii.gz"
    shutil.copy(workspace.good_segmentation(), seg)
    result = invoke("info", seg)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert f"{SHOWN_NAME}.nii.gz" in result.output.replace("\n", "")
