"""The sampling engine: one denoiser, one loop, one plan; CPU results pinned against a reference loop (fp32),
and the engine's invariants (slice batch, samples) in bf16 too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from volgen import defaults
from volgen.conditioning import condition_slices, condition_vector, unet_condition
from volgen.denoiser import BATCH_GRANULE, Denoiser
from volgen.pipeline import SegmentationToVolumePipeline

STEPS = 3


@pytest.fixture(scope="module")
def pipe(flagged_model_dir) -> SegmentationToVolumePipeline:
    """The tiny v-prediction model with "specified" flags (conftest): guidable, 2.5D context 1."""
    return SegmentationToVolumePipeline.from_pretrained(flagged_model_dir)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.randint(0, 4, (16, 16, 16), generator=torch.Generator().manual_seed(5))


def reference_loop(
    pipe, labels: torch.Tensor, seed: int, guidance: float, interval: tuple[float, float]
) -> torch.Tensor:
    """The sampling algorithm written out plainly (DDIM, ρ = 0, one chunk of 16 slices, the UNet run in the
    CPU's fixed granules, guidance on the steps ``k`` with ``k / STEPS`` in ``interval``): what the engine
    must give bit for bit on the CPU in float32."""
    pipe.set_scheduler("ddim")
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    layout, classes = pipe.condition_layout, pipe.config.num_classes
    x = torch.randn((16, 1, 16, 16), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    options = {"num_classes": classes, "encoding": "onehot", "context_slices": 1, "padding": "replicate"}
    masks = condition_slices(labels, torch.arange(16), **options)
    everything = torch.ones(classes, dtype=torch.bool)
    everything[0] = False
    nothing = condition_slices(labels, torch.arange(16), removed=everything, **options)
    cond = unet_condition(masks, condition_vector(torch.ones(16, classes - 1), layout=layout))
    uncond = unet_condition(nothing, condition_vector(torch.zeros(16, classes - 1), layout=layout))

    def unet(x_in, c, t):
        parts = torch.cat([x_in, c], dim=1).split(BATCH_GRANULE)
        return torch.cat([pipe.unet(p, t).sample for p in parts])

    for k, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        eps = unet(x_in, cond, t)
        if guidance != 1.0 and interval[0] <= k / STEPS < interval[1]:
            eps_u = unet(x_in, uncond, t)
            eps = eps_u + guidance * (eps - eps_u)
        x = sched.step(eps, t, x).prev_sample
    return x[:, 0].clamp(-1.0, 1.0)


@pytest.mark.parametrize(
    ("guidance", "interval"), [(1.0, (0.0, 1.0)), (2.0, (0.0, 1.0)), (2.0, (0.5, 1.0)), (2.0, (0.0, 0.5))]
)
def test_cpu_result_is_bitwise_the_reference_loop(pipe, labels, guidance, interval):
    """float32 (the pipeline's default; ``--precision fp32``): the same bytes as before bf16 and guidance
    intervals came, for every step range guided."""
    with torch.no_grad():
        expected = reference_loop(pipe, labels, seed=4, guidance=guidance, interval=interval)
        out = pipe(
            labels,
            seed=4,
            num_inference_steps=STEPS,
            scheduler="ddim",
            noise_correlation=0.0,
            x0_smoothing=0.0,
            guidance_scale=guidance,
            guidance_interval=interval,
            slice_batch_size=16,
            autocast_dtype=None,
        )
    assert torch.equal(out.volume, expected)


def test_samples_are_their_seeds_and_guidance_is_one_batched_forward(pipe, labels, monkeypatch):
    calls = []
    original = Denoiser.forward

    def forward(self, x, t, condition):
        calls.append(x.shape[0])
        return original(self, x, t, condition)

    monkeypatch.setattr(Denoiser, "forward", forward)
    kwargs = {"num_inference_steps": STEPS, "scheduler": "ddim", "guidance_scale": 1.5}
    kwargs["guidance_interval"] = (0.0, 1.0)  # every step guided
    kwargs["slice_batch_size"] = 16
    together = pipe([labels, labels[:5]], seed=[7, 8], **kwargs).volumes
    plan = pipe.plan(21, **{k: v for k, v in kwargs.items() if k != "scheduler"})
    # every forward is one CPU granule; chunks of 16 + 5 slices cost 16 + 8, twice (guided)
    assert set(calls) == {BATCH_GRANULE} and len(calls) * BATCH_GRANULE == plan.forwards == STEPS * 24 * 2
    assert torch.equal(together[0], pipe(labels, seed=7, **kwargs).volume)
    assert torch.equal(together[1], pipe(labels[:5], seed=8, **kwargs).volume)


def test_plan_is_frozen_and_resolved_once(pipe, labels, monkeypatch):
    plan = pipe.plan(16, num_inference_steps=4, strength=0.5, slice_batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.slice_batch_size = 4  # type: ignore[misc]
    assert plan.steps == len(plan.guidance) == len(plan.axes) == 2
    assert plan.start_timestep == plan.timesteps[0]
    assert plan.guidance_scale == pipe.resolve_guidance_scale(None) and plan.axes == (None, None)
    multi = pipe.plan(16, num_inference_steps=4, slice_axes=["axial"] * 4, guidance_scale=1.0)
    start, stop = defaults.GUIDANCE_INTERVAL  # steps 2 and 3 of 4 run: guided where the interval says
    assert plan.passes == tuple(2 if start <= k / 4 < stop else 1 for k in (2, 3))
    assert multi.primary == "axial" and multi.forwards == 4 * 16 and plan.forwards == sum(plan.passes) * 16
    resolved = []
    original = SegmentationToVolumePipeline.resolve_guidance_scale
    monkeypatch.setattr(
        SegmentationToVolumePipeline,
        "resolve_guidance_scale",
        lambda self, w: resolved.append(w) or original(self, w),
    )
    pipe(labels, seed=0, num_inference_steps=2)
    assert len(resolved) == 1  # once per run, not per step or chunk


def test_training_and_sampling_call_the_network_through_the_denoiser(pipe, labels):
    """Training's condition for a sample equals the sampler's for the same slice and removal."""
    denoiser = pipe.denoiser()
    context = torch.stack([labels[3], labels[4], labels[5]])[None]  # slice 4 and its neighbours
    removed = torch.tensor([[False, False, True, False]])
    train_cond = denoiser.training_condition(context, removed)
    vector = denoiser.vector(removed[0], 1)
    sample_cond = denoiser.volume_condition([labels], [0, 16], 4, 5, removed[0], vector)
    assert torch.equal(train_cond, sample_cond)


def run(pipe, labels, dtype, **kwargs):
    """A guided DPM-Solver++ run (every step guided) with the network under ``dtype`` autocast."""
    options = {"num_inference_steps": STEPS, "scheduler": "dpmsolver++", "guidance_scale": 1.5, "seed": 3}
    options["guidance_interval"] = (0.0, 1.0)
    with torch.no_grad():
        return pipe(labels, autocast_dtype=dtype, **(options | kwargs))


def test_bf16_on_the_cpu_runs_bf16_channels_last(pipe, labels, monkeypatch):
    seen = []
    original = Denoiser.forward

    def forward(self, x, t, condition):
        seen.append((self.channels_last, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, x, t, condition)

    monkeypatch.setattr(Denoiser, "forward", forward)
    bf16 = run(pipe, labels, torch.bfloat16).volume
    assert set(seen) == {(True, True, torch.bfloat16)}
    seen.clear()
    fp32 = run(pipe, labels, None).volume
    assert {s[:2] for s in seen} == {(False, False)}
    assert not torch.equal(bf16, fp32)  # it really ran in another precision ...
    assert (bf16 - fp32).abs().mean() < 0.05  # ... and computed the same thing


def test_bf16_on_the_cpu_keeps_batch_independence_and_samples(pipe, labels):
    reference = run(pipe, labels, torch.bfloat16, slice_batch_size=16).volume
    for batch in (1, 5, 8, 13):
        assert torch.equal(run(pipe, labels, torch.bfloat16, slice_batch_size=batch).volume, reference)
    stack = run(pipe, [labels, labels[:6], labels], torch.bfloat16, seed=[3, 4, 5], slice_batch_size=7)
    assert torch.equal(stack.volumes[0], reference)
    assert torch.equal(stack.volumes[1], run(pipe, labels[:6], torch.bfloat16, seed=4).volume)
    assert torch.equal(stack.volumes[2], run(pipe, labels, torch.bfloat16, seed=5).volume)
