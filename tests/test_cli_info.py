"""`volgen info` and `volgen models`: embedded models by name, uint8 MRIs are intensity images."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import make_volume

from volgen import io
from volgen.api import default_model_dir
from volgen.cli.app import _register, app
from volgen.cli.info import looks_like_intensities

_register()
runner = CliRunner()


def _uint8_mri(seed: int = 0) -> sitk.Image:
    """A uint8 'MRI': smooth head-like intensities with noise, 0 outside (about 200 distinct values)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:20, 0:24, 0:28].astype(np.float32)
    r = np.sqrt(((z - 10) / 9) ** 2 + ((y - 12) / 11) ** 2 + ((x - 14) / 13) ** 2)
    values = np.where(r < 1, 60 + 120 * (1 - r) + rng.normal(0, 15, r.shape), 0)
    image = sitk.GetImageFromArray(np.clip(values, 0, 255).astype(np.uint8))
    reference = make_volume("label", size=(28, 24, 20))
    image.CopyInformation(reference)
    return image


def _many_labels() -> sitk.Image:
    """A segmentation with 40 classes in blocks (TotalSegmentator-like count): still a segmentation."""
    labels = np.zeros((20, 24, 40), np.uint8)
    for k in range(40):
        labels[2:18, 2:22, k] = k + 1
    labels[:, :, ::2] = labels[:, :, 1::2]  # each class two voxels wide
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(make_volume("label", size=(40, 24, 20)))
    return image


def test_a_uint8_mri_is_an_intensity_image_not_255_labels(tmp_path):
    path = tmp_path / "t1.nii.gz"
    io.write_volume(_uint8_mri(), path)
    assert io.describe(path).is_label  # the file-format rule alone would call it a segmentation
    result = runner.invoke(app, ["info", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "intensity image" in result.output
    assert "volume (ml)" not in result.output  # no label table
    result = runner.invoke(app, ["info", str(path), "--json"], terminal_width=200)
    assert json.loads(result.output)["is_label"] is False


def test_segmentations_stay_segmentations(tmp_path):
    for name, image in {"many.nii.gz": _many_labels(), "few.nii.gz": make_volume("label")}.items():
        path = tmp_path / name
        io.write_volume(image, path)
        result = runner.invoke(app, ["info", str(path)], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "segmentation" in result.output and "intensity image" not in result.output


def test_looks_like_intensities():
    assert looks_like_intensities(sitk.GetArrayFromImage(_uint8_mri()))
    assert not looks_like_intensities(sitk.GetArrayFromImage(_many_labels()))
    assert not looks_like_intensities(np.zeros((3, 4, 5), np.uint8))


def test_info_default_shows_the_embedded_model():
    result = runner.invoke(app, ["info", "default", "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["name"] == default_model_dir().name
    by_folder_name = runner.invoke(app, ["info", default_model_dir().name, "--json"], terminal_width=200)
    assert json.loads(by_folder_name.output)["weights_sha256"] == data["weights_sha256"]
    table = runner.invoke(app, ["info", "default"], terminal_width=200)
    assert "│ card " in table.output  # the model card's path


def test_info_on_the_folder_of_models_names_them():
    result = runner.invoke(app, ["info", str(default_model_dir().parent)], terminal_width=300)
    assert result.exit_code == 1
    assert "folder of models" in result.output and default_model_dir().name in result.output
    assert "volgen info default" in result.output


def test_info_on_a_missing_file_lists_the_embedded_names(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope.nii.gz")], terminal_width=300)
    assert result.exit_code == 1
    assert "file not found" in result.output and "default" in result.output


def test_a_file_named_like_a_model_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_bytes(b"not a volume")
    result = runner.invoke(app, ["info", "default"], terminal_width=300)
    assert result.exit_code == 1 and "colin27" not in result.output


def test_models_lists_the_embedded_model_with_its_card():
    result = runner.invoke(app, ["models", "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    (row,) = [r for r in json.loads(result.output) if r["default"]]
    assert row["name"] == default_model_dir().name
    assert row["classes"][0] == "background"
    # each model's slices and own sampling: what tells the embedded models apart
    fine = next(r for r in json.loads(result.output) if r["name"] == "colin27-native-1mm")
    assert (row["pixel_spacing"], fine["pixel_spacing"]) == (2.0, 1.0)
    own = {"steps": 12, "guidance_scale": 1.25, "background_fine_noise_correlation": "auto"}
    assert fine["sampling"] == own and row["sampling"]["steps"] is None
    table = runner.invoke(app, ["models"]).output
    assert "slices" in table and "sampling" in table and "--steps 12" in table
    card = runner.invoke(app, ["models", "--card", "default"], terminal_width=200)
    assert card.exit_code == 0
    assert (default_model_dir() / "README.md").read_text(encoding="utf-8").splitlines()[0] in card.output
    assert runner.invoke(app, ["models", "--card", "nope"]).exit_code == 1
