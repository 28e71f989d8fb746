"""Back from the model's frame onto the segmentation's grid: mask-guided (the default) or linear."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import make_volume, rotation

from volgen import defaults, io
from volgen.frames import to_native_frame, to_slice_frame


def _segmentation() -> sitk.Image:
    """Nested boxes 0-3 on an oblique grid much finer in-plane than a 16 px frame of it."""
    return make_volume("label", size=(40, 34, 7), spacing=(0.6, 0.9, 2.5), direction=rotation(), n_labels=3)


def _far_from_other_classes(seg: sitk.Image, mm: float, *, in_plane: bool) -> np.ndarray:
    """Voxels more than ``mm`` from every voxel of another class and from the volume's sides (where linear
    interpolation fades into the frame's padding); ``in_plane``: distances within each slice only."""
    classes = np.pad(sitk.GetArrayFromImage(seg).astype(np.int16), 1, constant_values=-1)
    spacing = list(seg.GetSpacing())
    if in_plane:
        spacing[2] = 1e6
    far = np.ones(classes.shape, bool)
    for c in np.unique(classes).tolist():
        inside = sitk.GetImageFromArray((classes == c).astype(np.uint8))
        inside.SetSpacing(spacing)
        distance = sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(
                inside, insideIsPositive=True, useImageSpacing=True, squaredDistance=False
            )
        )
        far &= ~((classes == c) & (distance <= mm))
    return far[1:-1, 1:-1, 1:-1]


def test_each_voxel_is_interpolated_from_its_own_class_only():
    """A frame image that is constant per class comes back constant per class, at the segmentation's own
    boundaries (blended over ``edge_sigma`` voxels there): background next to the anatomy stays background.
    Linear interpolation mixes the classes over a frame pixel."""
    from volgen.frames import mask_guided_resample

    seg = _segmentation()
    frame = to_slice_frame(seg, slice_size=16, slice_axis="axial")
    values = frame.labels.float() * 100 + 7
    truth = sitk.GetArrayFromImage(seg) * 100.0 + 7
    labels, image = frame.to_sitk(frame.labels), frame.to_sitk(values)
    hard = sitk.GetArrayFromImage(mask_guided_resample(image, labels, seg, edge_sigma=0))
    np.testing.assert_allclose(hard, truth, atol=1e-3)
    guided = sitk.GetArrayFromImage(frame.to_grid(values, seg, resampling="mask"))  # the default blend
    linear = sitk.GetArrayFromImage(frame.to_grid(values, seg))
    inner = _far_from_other_classes(seg, 2.0 * max(seg.GetSpacing()), in_plane=False)
    np.testing.assert_allclose(guided[inner], truth[inner], atol=1e-3)
    blended = ~np.isclose(guided, truth, atol=1e-3)
    assert 0 < blended.mean() < np.mean(~np.isclose(linear, truth, atol=1e-3))
    background = sitk.GetArrayFromImage(seg) == 0
    # the blend reaches less far into the background than a frame pixel of linear interpolation
    assert np.percentile(guided[background], 95) < np.percentile(linear[background], 95)
    assert guided[background].max() < 0.5 * linear[background].max()


def test_a_native_frame_at_the_segmentations_spacing_is_copied_either_way():
    seg = make_volume("label", size=(21, 13, 4), spacing=(1.1, 1.1, 2.0), n_labels=3)
    image = sitk.Cast(seg, sitk.sitkFloat32) * 10.0 + 5.0
    frame = to_native_frame(seg, image, pixel_spacing=1.1, slice_axis="axial", multiple=8)
    assert frame.exact and frame.image is not None
    noisy = frame.image.numpy() + np.random.default_rng(0).normal(0, 3, frame.image.shape).astype(np.float32)
    a = sitk.GetArrayFromImage(frame.to_grid(noisy, seg, resampling="mask"))
    b = sitk.GetArrayFromImage(frame.to_grid(noisy, seg))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("axes", [None, ["axial", "coronal", "sagittal"]], ids=["slices", "cube"])
def test_resampling_changes_only_voxels_next_to_a_class_boundary(axes, tiny_model_dir, multiaxis_model_dir):
    """Generated volumes: mask-guided and linear resampling agree wherever every frame pixel around a voxel
    has its class, and differ next to class boundaries; the sidecar settings record which was used."""
    from volgen.generation import GenerateSettings, VolumeGenerator

    model = tiny_model_dir if axes is None else multiaxis_model_dir
    generator = VolumeGenerator(model, device="cpu")
    seg = make_volume("label", size=(64, 56, 12), spacing=(0.5, 0.6, 2.5), direction=rotation(), n_labels=2)
    common = {"seed": 4, "num_inference_steps": 2, "scheduler": "ddim", "slice_axes": axes}
    guided = generator.generate(seg, settings=GenerateSettings(**common)).image
    linear = generator.generate(seg, settings=GenerateSettings(**common, resampling="linear")).image
    a, b = sitk.GetArrayFromImage(guided), sitk.GetArrayFromImage(linear)
    assert guided.GetSize() == seg.GetSize() and np.isfinite(a).all()
    fov = max(n * s for n, s in zip(seg.GetSize(), seg.GetSpacing(), strict=True))
    pixel = fov / 16  # the frame's pixel (the cube's voxel), mm
    interior = _far_from_other_classes(seg, 1.5 * pixel, in_plane=axes is None)
    assert interior.sum() > 100
    np.testing.assert_allclose(a[interior], b[interior], rtol=0, atol=1e-3 * float(np.ptp(b)))
    assert not np.allclose(a[~interior], b[~interior], rtol=0, atol=1e-3 * float(np.ptp(b)))


def test_resampling_option_in_the_cli_and_the_sidecar(tmp_path):
    from volgen.cli.app import _register, app

    _register()
    runner = CliRunner()
    seg = tmp_path / "seg.nii.gz"
    io.write_volume(_segmentation(), seg)
    bad_out = tmp_path / "out.nii.gz"
    bad = runner.invoke(app, ["generate", str(seg), "-o", str(bad_out), "--resampling", "cubic"])
    assert bad.exit_code != 0 and "--resampling must be one of mask, linear" in bad.output
    assert not bad_out.exists()
    out = tmp_path / "linear.nii.gz"
    ok = runner.invoke(
        app,
        [
            "generate",
            str(seg),
            "-o",
            str(out),
            "--steps",
            "1",
            "--resampling",
            "LINEAR",
            "--progress",
            "none",
        ],
    )
    assert ok.exit_code == 0, ok.output
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["settings"]["resampling"] == "linear"
    assert defaults.RESAMPLING == "mask"
