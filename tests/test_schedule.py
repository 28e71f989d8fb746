"""The zero-terminal-SNR v-prediction schedule: training target, sampling with every scheduler, λ."""

from __future__ import annotations

import pytest
import torch

from volgen.pipeline import SCHEDULERS, SegmentationToVolumePipeline
from volgen.sampling import smooth_x0


@pytest.fixture(scope="module")
def vpred_pipe(tmp_path_factory):
    from volgen.conditioning import ConditionLayout
    from volgen.labels import LabelMap
    from volgen.models import (
        ModelMetadata,
        UNetConfig,
        build_training_scheduler,
        build_unet,
        load_model,
        save_model,
    )

    torch.manual_seed(0)
    label_map = LabelMap(name="test", classes={"a": [1], "b": [2], "c": [3]})
    meta = ModelMetadata(
        name="vpred", label_map=label_map, slice_size=16, context_slices=1, condition=ConditionLayout()
    )
    schedule = build_training_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)
    folder = save_model(
        tmp_path_factory.mktemp("m") / "vpred", build_unet(UNetConfig.preset("tiny"), meta), schedule, meta
    )
    loaded = load_model(folder)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert float(loaded.scheduler.alphas_cumprod[-1]) == 0.0  # ᾱ_T = 0: the last step is pure noise
    return SegmentationToVolumePipeline(
        loaded.unet,
        loaded.scheduler,
        encoding="onehot",
        context_slices=1,
        num_classes=4,
        condition=loaded.metadata.condition.model_dump(mode="json"),
    )


@pytest.fixture(scope="module")
def labels():
    return torch.randint(0, 4, (9, 16, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_samples_a_vpred_zero_snr_model(vpred_pipe, labels, scheduler):
    a = vpred_pipe(labels, num_inference_steps=3, seed=2, scheduler=scheduler, slice_batch_size=2).volume
    b = vpred_pipe(labels, num_inference_steps=3, seed=2, scheduler=scheduler, slice_batch_size=16).volume
    assert a.shape == labels.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert out_timesteps_start_at_pure_noise(vpred_pipe, labels, scheduler)


def out_timesteps_start_at_pure_noise(pipe, labels, scheduler) -> bool:
    out = pipe(labels, num_inference_steps=2, seed=0, scheduler=scheduler)
    return out.timesteps[0] == pipe.scheduler.config.num_train_timesteps - 1


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_strength_interpolates_towards_the_reference_under_the_new_schedule(vpred_pipe, labels, scheduler):
    reference = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    same = vpred_pipe(labels, seed=0, scheduler=scheduler, reference=reference, strength=0.0).volume
    assert torch.equal(same, reference)
    distances = []
    for strength in (0.1, 0.5, 1.0):
        out = vpred_pipe(
            labels,
            num_inference_steps=10,
            seed=0,
            scheduler=scheduler,
            reference=reference,
            strength=strength,
        )
        assert torch.isfinite(out.volume).all()
        distances.append(float((out.volume - reference).abs().mean()))
    assert distances[0] < distances[1] < distances[2]


def test_x0_smoothing_with_v_prediction_keeps_a_smooth_prediction_unchanged(vpred_pipe):
    """Smoothing maps v -> x0 -> v: an x0 prediction that is constant through-plane comes back as it was."""
    x0 = torch.full((6, 1, 16, 16), 0.3)
    noise = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(600)
    vpred_pipe.set_scheduler("ddpm")  # a sampler set by an earlier test stays set on the pipeline
    sched = vpred_pipe.scheduler
    x_t = sched.add_noise(x0, noise, t)
    v = sched.get_velocity(x0, noise, t)
    again = smooth_x0(v, x_t, t, 1.5, sched)
    torch.testing.assert_close(again, v, atol=1e-4, rtol=1e-4)


def test_training_loss_targets_the_velocity_and_min_snr_weights():
    from volgen.models import build_training_scheduler
    from volgen.training import diffusion_loss

    sched = build_training_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 300, 700, 999])
    v = sched.get_velocity(x0, noise, t)
    assert float(diffusion_loss(v, x0, noise, t, sched)) == 0.0
    assert float(diffusion_loss(noise, x0, noise, t, sched)) > 0.0
    weighted = diffusion_loss(v + 1.0, x0, noise, t, sched, snr_gamma=5.0)
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    expected = (snr.clamp(max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(weighted, expected.float())
    with pytest.raises(Exception, match="v_prediction"):
        build_training_scheduler(zero_terminal_snr=True)
