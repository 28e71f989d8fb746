"""Native-resolution models: trained on crops at a pixel spacing, generating whole slices on the input
grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_training import LABELS_YAML, make_case, write_config
from volumes import assert_same_geometry, rotation

from volgen.frames import native_grid, to_native_frame

PIXEL = 1.1  # the training cases' y spacing: x (0.8 mm) is resampled, y is kept


@pytest.fixture(scope="module")
def native_model(tmp_path_factory) -> Path:
    """A tiny native model (16 px crops at 1.1 mm) trained for a few steps on two synthetic cases."""
    from volgen.training import TrainConfig, train

    folder = tmp_path_factory.mktemp("native")
    make_case(folder / "data", "case0", seed=0, size=(30, 26, 9))
    make_case(folder / "data", "case1", seed=1, size=(30, 26, 9))
    (folder / "labels.yaml").write_text(LABELS_YAML, encoding="utf-8")
    config = write_config(
        folder,
        output_dir="native",
        data={"frame": "native", "pixel_spacing": PIXEL},
        max_steps=4,
        checkpoint_every=4,
        preview_every=4,
    )
    return train(TrainConfig.from_yaml(config)).model_dir


def _segmentation(size=(37, 29, 6), spacing=(0.7, 1.3, 2.2)) -> sitk.Image:
    """Labels 0, 1, 2, 7 on an oblique anisotropic grid whose in-plane size is no multiple of 8."""
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    labels = np.zeros((nz, ny, nx), np.uint8)
    labels[((x - nx / 2) / 10.0) ** 2 + ((y - ny / 2) / 8.0) ** 2 < 1] = 1
    labels[1:5, 2:9, 24:33] = 2
    labels[1:3, 2:5, 24:28] = 7
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(spacing)
    image.SetOrigin((3.5, -7.25, 11.0))
    image.SetDirection(rotation())
    return image


def test_native_model_records_its_spacing(native_model):
    from volgen.models import read_metadata

    meta = read_metadata(native_model)
    assert meta.pixel_spacing == pytest.approx(PIXEL) and meta.slice_size == 16


def test_native_generation_is_on_the_input_grid_deterministic_and_batch_independent(native_model):
    from volgen.generation import GenerateSettings, VolumeGenerator

    generator = VolumeGenerator(native_model, device="cpu")
    seg = _segmentation()
    frame = generator.frame.to_frame(generator.classes(seg))
    assert frame.labels.shape[1] % 2 == 0 and frame.labels.shape[2] % 2 == 0
    assert frame.labels.shape[1] > 16 and frame.labels.shape[2] > 16  # whole slices, not crops
    assert generator.frame.plane(seg) == tuple(frame.labels.shape[1:])  # the memory estimate's slice size

    def run(seed: int, sbs: int) -> np.ndarray:
        settings = GenerateSettings(seed=seed, num_inference_steps=3, slice_batch_size=sbs)
        out = generator.generate(seg, settings=settings).image
        assert_same_geometry(out, seg, atol=0)
        return sitk.GetArrayFromImage(out)

    a = run(1, 8)
    assert np.array_equal(a, run(1, 8))
    assert np.array_equal(a, run(1, 16))  # independent of the slice batch
    assert not np.array_equal(a, run(2, 8))
    assert np.isfinite(a).all() and a.std() > 0


def test_segmentations_of_different_sizes_generated_together_match_alone(native_model):
    from volgen.generation import GenerateSettings, GenerationRequest, VolumeGenerator

    generator = VolumeGenerator(native_model, device="cpu")
    settings = GenerateSettings(seed=3, num_inference_steps=2)
    small, large = _segmentation(), _segmentation(size=(45, 23, 5), spacing=(1.1, 1.1, 3.0))
    together = generator.generate_many(
        [GenerationRequest(small, settings), GenerationRequest(large, settings)]
    )
    for seg, out in zip((small, large), together, strict=True):
        alone = generator.generate(seg, settings=settings).image
        assert np.array_equal(sitk.GetArrayFromImage(alone), sitk.GetArrayFromImage(out.image))


def test_matching_spacing_pads_without_interpolating():
    seg = _segmentation(size=(21, 13, 4), spacing=(1.1, 1.1, 2.0))
    image = sitk.Cast(seg, sitk.sitkFloat32) * 10.0 + 5.0
    frame = to_native_frame(seg, image, pixel_spacing=1.1, slice_axis="axial", multiple=8)
    assert frame.exact and tuple(frame.labels.shape[1:]) in ((16, 24), (24, 16))
    # the frame's voxels are the input's own, padded: the same histogram plus background
    values, counts = np.unique(sitk.GetArrayFromImage(seg), return_counts=True)
    fvalues, fcounts = np.unique(frame.labels.numpy(), return_counts=True)
    assert np.array_equal(values, fvalues) and np.array_equal(counts[1:], fcounts[1:])
    assert torch.equal(frame.image[frame.labels > 0], frame.labels[frame.labels > 0].float() * 10 + 5)


def test_native_grid_resamples_in_plane_only():
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    shape, grid, exact = native_grid((100, 30, 7), affine, pixel_spacing=1.0, slice_axis="axial", multiple=8)
    assert not exact and shape == (56, 64, 7)  # 50 px of 1 mm padded to 56; 60 px padded to 64; slices kept
    np.testing.assert_allclose(np.sqrt((grid[:3, :3] ** 2).sum(0)), [1.0, 1.0, 3.0])


def test_bad_native_config_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from volgen.cli.app import _register, app

    _register()
    (tmp_path / "labels.yaml").write_text(LABELS_YAML, encoding="utf-8")
    config = write_config(tmp_path, data={"frame": "native"})
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pixel_spacing" in lines[0]


def _untrained_native(folder: Path, preset: str = "tiny") -> Path:
    """An untrained native model folder (1 mm pixels) of ``preset``: memory does not depend on weights."""
    from volgen.labels import load_label_map
    from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet, save_model

    config = UNetConfig.preset(preset)
    meta = ModelMetadata(
        name="native-untrained",
        label_map=load_label_map("colin27"),
        slice_size=config.sample_size,
        pixel_spacing=1.0,
    )
    return save_model(folder / preset, build_unet(config, meta), build_training_scheduler(), meta)


def test_memory_estimate_of_a_512_slice_volume_is_at_its_own_size(tmp_path):
    from volgen.errors import ResourceError
    from volgen.generation import GenerateSettings, VolumeGenerator
    from volgen.io import Geometry

    generator = VolumeGenerator(_untrained_native(tmp_path, "small"), device="cpu")
    place = {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0), "direction": rotation()}
    grid, half = Geometry(size=(512, 512, 300), **place), Geometry(size=(256, 256, 300), **place)
    settings = GenerateSettings(slice_batch_size=16)
    assert generator.frame.plane(grid) == (512, 512)
    need = generator.memory_needed(grid, settings)
    volume_arrays = 8 * 4 * 300 * 512 * 512  # the frame's volume arrays alone
    assert volume_arrays < need < 16 * volume_arrays
    assert 3 < need / generator.memory_needed(half, settings) < 5  # grows with the slice's pixels
    # "auto" fits the budget: a smaller budget, a smaller slice batch; above it, a clear refusal
    auto = GenerateSettings(slice_batch_size="auto")
    roomy = generator.plan(grid, auto, max_memory=need * 4).slice_batch_size
    tight = generator.plan(grid, auto, max_memory=int(need * 0.9)).slice_batch_size
    assert tight < roomy
    with pytest.raises(ResourceError, match="max-memory"):
        generator.check_memory(grid, settings, max_memory=need // 2)


def test_dry_run_times_a_native_model_at_the_segmentations_own_slice_size(tmp_path):
    """A native model's slices are the segmentation's size; the estimate must not scale the model's own
    slice size by pixels (attention grows faster): it times a forward at the grid's slice size."""
    from volgen.batch.dryrun import estimate_generation, measure_time_model
    from volgen.generation import GenerateSettings, VolumeGenerator
    from volgen.io import Geometry

    generator = VolumeGenerator(_untrained_native(tmp_path), device="cpu")
    settings = GenerateSettings(num_inference_steps=2, slice_batch_size=8)
    place = {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0), "direction": rotation()}
    grid = Geometry(size=(40, 24, 5), **place)
    time_model = measure_time_model(generator, slice_batch_size=8)
    timed = []
    measure = time_model.measure_plane
    time_model.measure_plane = lambda plane: timed.append(plane) or measure(plane)
    first = estimate_generation(generator, grid, settings, time_model)
    again = estimate_generation(generator, grid, settings, time_model)
    plane = generator.frame.plane(grid)
    assert timed == [tuple(plane)]  # timed once at the grid's own (padded) slice size, then reused
    per_forward = time_model.per_plane[tuple(plane)]
    expected = time_model.seconds(first.forwards, 40 * 24 * 5, plane)
    assert first.seconds == again.seconds == pytest.approx(expected)
    assert f"{plane[0]}x{plane[1]}" in time_model.how and per_forward > 0


def test_info_names_the_native_frame(native_model):
    from typer.testing import CliRunner

    from volgen.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, ["info", str(native_model)])
    assert result.exit_code == 0 and "native: whole slices at 1.1 mm" in " ".join(result.output.split())


def test_generate_notes_a_model_pixel_coarser_than_the_segmentation(native_model, tmp_path):
    """A native model at 1.1 mm on a segmentation of 0.7 mm in-plane: one note naming both spacings (its
    detail between comes from resampling); none where the segmentation has the model's own spacing."""
    from typer.testing import CliRunner

    from volgen import io
    from volgen.cli.app import _register, app

    _register()
    fine, own = tmp_path / "fine.nii.gz", tmp_path / "own.nii.gz"
    io.write_volume(_segmentation(), fine)
    io.write_volume(_segmentation(spacing=(PIXEL, PIXEL, 2.2)), own)
    said = {}
    for path in (fine, own):
        result = CliRunner().invoke(app, ["generate", str(path), "--model", str(native_model), "--dry-run"])
        assert result.exit_code == 0, result.output
        said[path] = " ".join(result.output.split())
    assert "model makes 1.1 mm pixels (native frame)" in said[fine] and "slices have 0.7 mm" in said[fine]
    assert "mm pixels" not in said[own]


def test_native_training_resumes_exactly(native_model):
    """Crop positions come from the run's seed per step: an interrupted run resumed repeats it exactly."""
    from volgen.training import TrainConfig, train

    folder = native_model.parents[1]
    config = TrainConfig.from_yaml(folder / "native.yaml")
    whole = train(config.model_copy(update={"output_dir": folder / "whole"}))
    assert whole.steps == 4

    class Interrupt(Exception):
        pass

    def stop_at_three(step, total, loss, lr):
        if step == 3:  # after the checkpoint at step 2
            raise Interrupt

    training = config.training.model_copy(update={"checkpoint_every": 2})
    interrupted = config.model_copy(update={"output_dir": folder / "interrupted", "training": training})
    with pytest.raises(Interrupt):
        train(interrupted, progress=stop_at_three)
    resumed = train(interrupted, resume=True)
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=0, atol=1e-6)


def test_random_crop_takes_image_and_context_together():
    from volgen.data import random_crop

    image = torch.arange(30 * 40, dtype=torch.float32).reshape(1, 30, 40)
    context = torch.stack([image[0] + k for k in range(3)]).long()
    a = random_crop({"image": image, "context": context}, 16, seed=5)
    assert a["image"].shape == (1, 16, 16) and a["context"].shape == (3, 16, 16)
    assert torch.equal(a["context"][0].float(), a["image"][0])  # the same window of both
    assert torch.equal(a["image"], random_crop({"image": image, "context": context}, 16, seed=5)["image"])
    corners = {
        random_crop({"image": image, "context": context}, 16, seed=s)["image"][0, 0, 0] for s in range(8)
    }
    assert len({float(c) for c in corners}) > 1  # positions vary with the seed


def test_scale_augmentation_adds_each_case_at_larger_pixels(tmp_path):
    """``data.pixel_spacing_scales``: every case also at ``pixel_spacing × factor``, its anatomy smaller in
    pixels by that factor; a fitted frame refuses it in one line."""
    from volgen.training import TrainConfig
    from volgen.training.dataset import prepare_training_data

    make_case(tmp_path / "data", "case0", seed=0, size=(30, 26, 9))
    (tmp_path / "labels.yaml").write_text(LABELS_YAML, encoding="utf-8")
    native = {"frame": "native", "pixel_spacing": PIXEL}
    plain = prepare_training_data(TrainConfig.from_yaml(write_config(tmp_path, output_dir="a", data=native)))
    scaled = prepare_training_data(
        TrainConfig.from_yaml(
            write_config(tmp_path, output_dir="b", data={**native, "pixel_spacing_scales": [1.0, 2.0]})
        )
    )
    assert len(scaled.volumes) == 2 * len(plain.volumes) and scaled.cases == plain.cases == ["case0"]
    assert torch.equal(scaled.volumes[0].labels, plain.volumes[0].labels)
    anatomy = [int((v.labels > 0).sum()) for v in scaled.volumes]
    assert anatomy[1] == pytest.approx(anatomy[0] / 4, rel=0.25)  # half the size along both in-plane axes
    with pytest.raises(Exception, match="pixel_spacing_scales needs data.frame: native"):
        TrainConfig.from_yaml(
            write_config(tmp_path, output_dir="c", data={"pixel_spacing_scales": [1.0, 2.0]})
        )
