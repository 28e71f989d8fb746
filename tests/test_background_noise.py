"""The background's own fine noise ρ (``--rho-fine-background``): grain in air independent between slices
(no streaks in reslices) while the noise near every labelled voxel stays what it was."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
import torch

from volgen.frames import ModelFrame
from volgen.generation import GenerateSettings, SettingsError
from volgen.sampling import (
    SamplingPlan,
    background_rho_for,
    background_weight,
    correlated_noise,
    volume_noise,
)

RHO, FINE = 0.995, 0.95


def plan(background: float | None) -> SamplingPlan:
    return SamplingPlan(
        timesteps=(999,),
        guidance=(1.0,),
        axes=(None,),
        primary=None,
        slice_batch_size=4,
        num_slices=24,
        device="cpu",
        autocast_dtype=None,
        num_inference_steps=1,
        strength=1.0,
        noise_correlation=RHO,
        fine_noise_correlation=FINE,
        x0_smoothing=0.0,
        background_fine_noise_correlation=background,
    )


def labels() -> torch.Tensor:
    """24 slices of 32 x 32: a labelled block (classes 1 and 2) in the middle of every slice."""
    volume = torch.zeros(24, 32, 32, dtype=torch.long)
    volume[:, 12:20, 12:16] = 1
    volume[:, 12:20, 16:20] = 2
    return volume


def detail_correlation(noise: torch.Tensor, where: torch.Tensor, dim: int) -> float:
    """Correlation of the fine detail (minus a 5-pixel box mean in-plane) between neighbours along ``dim``
    of ``(Z, H, W)``, over the voxels ``where`` both neighbours are."""
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    detail = noise - smooth
    a, b = detail.narrow(dim, 0, detail.shape[dim] - 1), detail.narrow(dim, 1, detail.shape[dim] - 1)
    both = where.narrow(dim, 0, where.shape[dim] - 1) & where.narrow(dim, 1, where.shape[dim] - 1)
    return float(torch.corrcoef(torch.stack([a[both], b[both]]))[0, 1])


def test_background_weight_is_zero_near_labels_one_far_away_and_dropped_classes_are_background():
    weight = background_weight(labels(), margin=2, ramp=4)[:, 0]
    assert weight.shape == (24, 32, 32) and weight.min() >= 0 and weight.max() <= 1
    assert (weight[:, 10:22, 10:22] == 0).all()  # the block and 2 pixels around it
    assert (weight[:, :6, :] == 1).all() and (weight[:, :, 26:] == 1).all()  # 6+ pixels out
    ramp = weight[5, 16, 20:26]
    assert (ramp[1:] >= ramp[:-1]).all() and 0 < ramp[2] < 1  # smooth, rising outwards

    dropped = background_weight(labels(), torch.tensor([False, False, True]), margin=2, ramp=4)[:, 0]
    assert (dropped[:, 12:20, 14] == 0).all()  # class 1 and its margin
    assert (dropped[:, 12:20, 19] > 0).all()  # class 2 shown as background: away from class 1, it is air

    assert (background_weight(torch.zeros(3, 8, 8, dtype=torch.long)) == 1).all()


def test_noise_near_labels_is_unchanged_and_grain_far_away_is_independent_between_slices():
    shape = (24, 1, 32, 32)
    weight = background_weight(labels())
    ours = volume_noise(plan(0.0), shape, torch.Generator().manual_seed(3), weight)[:, 0]
    before = correlated_noise(shape, RHO, torch.Generator().manual_seed(3), fine_rho=FINE)[:, 0]
    near, far = weight[:, 0] == 0, weight[:, 0] == 1
    assert torch.equal(ours[near], before[near])
    # far from the labels: fine detail alike between slices before (streaks), independent now, as in-plane
    assert detail_correlation(before, far, 0) > 0.6
    assert abs(detail_correlation(ours, far, 0)) < 0.15
    assert abs(detail_correlation(ours, far, 1)) < 0.15
    assert 0.9 < float(ours[far].std()) < 1.1 and 0.9 < float(ours[~near & ~far].std()) < 1.1
    # None, or the fine ρ itself: the noise as before, bytes and all
    for same in (None, FINE):
        again = volume_noise(plan(same), shape, torch.Generator().manual_seed(3), weight)[:, 0]
        assert torch.equal(again, before)


def test_settings_take_the_models_background_rho_unless_told_and_refuse_bad_values():
    class Sampling:
        steps, guidance_scale, background_fine_noise_correlation = None, None, "auto"

    class Model:
        sampling = Sampling()

    assert GenerateSettings().for_model(Model()).background_fine_noise_correlation == "auto"
    told = GenerateSettings(background_fine_noise_correlation=0.5).for_model(Model())
    assert told.background_fine_noise_correlation == 0.5
    same = GenerateSettings(background_fine_noise_correlation="same").for_model(Model())
    assert same.background_fine_noise_correlation == "same" and same.for_model(Model()) == same
    for bad in (1.0, -0.1, "often", float("nan")):
        with pytest.raises(SettingsError, match="--rho-fine-background"):
            GenerateSettings(background_fine_noise_correlation=bad)


def grid(spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    image.SetSpacing(spacing)
    return image


def test_auto_is_zero_for_slices_a_pixel_apart_and_the_fine_rho_for_slices_half_a_pixel_apart():
    frame = ModelFrame(64, "axial", pixel_spacing=2.0)
    assert background_rho_for("auto", FINE, frame, grid((2.0, 2.0, 2.0))) == 0.0
    assert background_rho_for("auto", FINE, frame, grid((1.0, 1.0, 3.0))) == 0.0
    assert background_rho_for("auto", FINE, frame, grid((1.0, 1.0, 1.0))) == pytest.approx(FINE)
    assert background_rho_for("auto", FINE, frame, grid((1.0, 1.0, 1.5))) == pytest.approx(FINE / 2)
    assert background_rho_for(0.3, FINE, frame, grid((1.0, 1.0, 1.0))) == 0.3
    for none in (None, "same"):
        assert background_rho_for(none, FINE, frame, grid((2.0, 2.0, 2.0))) is None
    assert background_rho_for("auto", FINE) is None  # bare tensors: no frame, no spacing
