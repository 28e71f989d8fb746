"""The command line shell: help, version, info on every input kind, error lines and --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner
from volumes import make_volume

from volgen import __version__, io
from volgen.cli.app import _register, app

_register()
runner = CliRunner()


def test_help_lists_the_commands_quickly():
    result = subprocess.run(
        [sys.executable, "-m", "volgen", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("generate", "info", "train", "import-checkpoint"):
        assert command in result.stdout
    # --help must not pay for torch/diffusers
    probe = "import sys; import volgen.cli.app as a; a._register(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("fmt", ["seg.nii.gz", "seg.nrrd", "dicom"])
def test_info_on_a_segmentation(tmp_path, fmt):
    seg = make_volume("label", size=(12, 10, 7), spacing=(0.7, 0.9, 2.5))
    path = tmp_path / fmt
    io.write_volume(seg, path, format="dicom" if fmt == "dicom" else None)
    result = runner.invoke(app, ["info", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    for fact in ("12 x 10 x 7", "(0.7, 0.9, 2.5)", "segmentation", "volume (ml)", "origin", "direction"):
        assert fact in out, fact
    expected = {"seg.nii.gz": "NIfTI", "seg.nrrd": "NRRD", "dicom": "DICOM series"}[fmt]
    assert expected in out


def test_info_names_classes_with_a_label_map(tmp_path):
    labels = tmp_path / "labels.yaml"
    labels.write_text("classes: {liver: 1, kidney: 2}\n")
    path = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label"), path)
    result = runner.invoke(app, ["info", str(path), "--labels", str(labels)], terminal_width=200)
    assert result.exit_code == 0
    assert "liver" in result.output and "kidney" in result.output
    assert "unknown to the label map" in result.output  # label 3 is not in the map


def test_info_on_a_dicom_seg(tmp_path):
    """A DICOM SEG made with highdicom from a CT series volgen wrote."""
    import highdicom as hd
    import numpy as np
    import pydicom

    ct = make_volume("ct", size=(12, 10, 4))
    series = tmp_path / "ct"
    io.write_volume(ct, series, format="dicom", modality="CT")
    sources = sorted((pydicom.dcmread(p) for p in series.iterdir()), key=lambda d: int(d.InstanceNumber))
    mask = np.zeros((len(sources), 10, 12), dtype=bool)
    mask[1:3, 2:6, 3:9] = True
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="liver",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    result = runner.invoke(app, ["info", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "DICOM SEG" in result.output and "liver" in result.output


def test_info_on_a_model_folder(tiny_model_dir):
    result = runner.invoke(app, ["info", str(tiny_model_dir)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for fact in ("tiny-test", "liver", "onehot", "16 x 16 px", "DDPM T=1000"):
        assert fact in result.output


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    result = runner.invoke(app, ["info", str(missing)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "missing.nii.gz" in result.output
    debug = runner.invoke(app, ["--debug", "info", str(missing)])
    assert (
        debug.exit_code != 0 and debug.exception is not None and not isinstance(debug.exception, SystemExit)
    )
