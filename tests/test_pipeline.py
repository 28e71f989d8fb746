"""The volume pipeline: invariants on a tiny untrained UNet."""

from __future__ import annotations

import pytest
import torch

from volgen.errors import VolgenError
from volgen.models import load_model
from volgen.pipeline import SCHEDULERS, SegmentationToVolumePipeline, build_pipeline, correlated_noise


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    meta = loaded.metadata
    return SegmentationToVolumePipeline(
        loaded.unet,
        loaded.scheduler,
        encoding=meta.encoding,
        context_slices=meta.context_slices,
        num_classes=meta.num_classes,
        slice_axis=meta.slice_axis,
    )


@pytest.fixture(scope="module")
def labels():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 4, (11, 16, 16), generator=g)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs_and_is_independent_of_slice_batch_size(pipe, labels, scheduler):
    a = pipe(labels, num_inference_steps=3, seed=5, scheduler=scheduler, slice_batch_size=1).volume
    b = pipe(labels, num_inference_steps=3, seed=5, scheduler=scheduler, slice_batch_size=7).volume
    assert a.shape == labels.shape
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_x0_smoothing_is_independent_of_slice_batch_size_and_smooths(pipe, labels):
    from volgen.pipeline import smooth_through_plane

    a = pipe(labels, num_inference_steps=3, seed=5, x0_smoothing=1.0, slice_batch_size=1).volume
    b = pipe(labels, num_inference_steps=3, seed=5, x0_smoothing=1.0, slice_batch_size=16).volume
    assert torch.equal(a, b)
    x = torch.randn(9, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = smooth_through_plane(x, 1.0)
    assert y.shape == x.shape
    assert (y[1:] - y[:-1]).abs().mean() < 0.6 * (x[1:] - x[:-1]).abs().mean()
    constant = torch.ones(5, 1, 2, 2)
    assert torch.allclose(smooth_through_plane(constant, 2.0), constant)


def test_same_seed_same_volume_other_seed_differs(pipe, labels):
    a = pipe(labels, num_inference_steps=2, seed=1).volume
    b = pipe(labels, num_inference_steps=2, seed=1).volume
    c = pipe(labels, num_inference_steps=2, seed=2).volume
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_correlated_noise_statistics():
    g = torch.Generator().manual_seed(0)
    n = correlated_noise((64, 1, 32, 32), 0.9, g)
    assert abs(float(n.std()) - 1.0) < 0.05
    corr = torch.corrcoef(torch.stack([n[:-1].flatten(), n[1:].flatten()]))[0, 1]
    assert abs(float(corr) - 0.9) < 0.02
    independent = correlated_noise((64, 1, 32, 32), 0.0, torch.Generator().manual_seed(0))
    corr0 = torch.corrcoef(torch.stack([independent[:-1].flatten(), independent[1:].flatten()]))[0, 1]
    assert abs(float(corr0)) < 0.02


def _split(n: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (Z, C, H, W) as its coarse and fine in-plane parts (a hard split at ``scale`` cycles/pixel)."""
    f2 = torch.fft.fftfreq(n.shape[-2])[:, None] ** 2 + torch.fft.fftfreq(n.shape[-1])[None, :] ** 2
    spectrum = torch.fft.fft2(n.double())
    coarse = torch.fft.ifft2(spectrum * (f2 < (scale / 4) ** 2)).real
    fine = torch.fft.ifft2(spectrum * (f2 > (3 * scale) ** 2)).real
    return coarse, fine


def _neighbour_corr(x: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x[:-1].flatten(), x[1:].flatten()]))[0, 1])


def test_two_scale_noise_keeps_coarse_structure_and_decorrelates_fine_detail():
    """The default initial noise: coarse scales correlated between slices with ρ, fine detail with the fine ρ;
    every slice still white, unit-variance noise; one ρ at both scales is the earlier noise, byte for byte."""
    shape = (96, 1, 64, 64)
    n = correlated_noise(shape, 0.95, torch.Generator().manual_seed(0), fine_rho=0.0, scale=0.08)
    assert n.dtype == torch.float32 and n.shape == shape
    assert abs(float(n.mean())) < 0.02 and abs(float(n.std()) - 1.0) < 0.03
    per_slice = n.flatten(1).std(dim=1)
    assert float(per_slice.min()) > 0.85 and float(per_slice.max()) < 1.15
    # white in-plane: neighbouring pixels of a slice are uncorrelated
    in_plane = torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1]
    assert abs(float(in_plane)) < 0.02
    coarse, fine = _split(n, 0.08)
    assert _neighbour_corr(coarse) > 0.9  # the anatomy's large shapes do not flicker
    assert abs(_neighbour_corr(fine)) < 0.05  # fine texture is not copied to the next slice
    # one ρ at every scale: exactly the single-ρ recursion (the same bytes as before for a given seed)
    single = correlated_noise(shape, 0.95, torch.Generator().manual_seed(0))
    same = correlated_noise(shape, 0.95, torch.Generator().manual_seed(0), fine_rho=0.95)
    assert torch.equal(single, same)
    _, fine_single = _split(single, 0.08)
    assert _neighbour_corr(fine_single) > 0.9
    with pytest.raises(VolgenError, match="fine noise correlation"):
        correlated_noise(shape, 0.9, fine_rho=1.0)


def test_fine_noise_correlation_is_a_setting_that_reaches_the_noise(pipe, labels):
    """On bare tensors (no slice spacing) the default ``auto`` is one ρ at every scale, the earlier noise;
    another fine ρ gives another volume; the same settings give the same volume."""
    from volgen.generation import GenerateSettings, SettingsError

    run = dict(num_inference_steps=2, seed=3, noise_correlation=0.9)
    default = pipe(labels, **run).volume
    assert torch.equal(default, pipe(labels, **run, fine_noise_correlation="auto").volume)
    assert torch.equal(default, pipe(labels, **run, fine_noise_correlation=0.9).volume)
    assert not torch.equal(default, pipe(labels, **run, fine_noise_correlation=0.0).volume)
    with pytest.raises(SettingsError, match="--fine-noise-correlation"):
        GenerateSettings(fine_noise_correlation=1.5)


def test_strength_zero_returns_reference_and_strength_runs_fewer_steps(pipe, labels):
    reference = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = pipe(labels, reference=reference, strength=0.0, num_inference_steps=10)
    assert torch.equal(out.volume, reference)
    partial = pipe(labels, reference=reference, strength=0.4, num_inference_steps=10, scheduler="ddim")
    assert partial.start_timestep <= 400
    assert 0 < len(partial.timesteps) < 10
    full = pipe(labels, num_inference_steps=10, scheduler="ddim")
    assert len(full.timesteps) == 10


def test_dropped_classes_reach_the_unet_as_background(pipe, labels):
    """With spleen (class 3) dropped, the condition equals the one of a mask where spleen is background."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 1:].clone()))
    try:
        pipe(labels, num_inference_steps=1, keep=[1, 2], slice_batch_size=16)
        dropped = seen[:]
        seen.clear()
        pipe(labels.masked_fill(labels == 3, 0), num_inference_steps=1, slice_batch_size=16)
        background = seen[:]
    finally:
        hook.remove()
    assert (labels == 3).any()
    assert all(torch.equal(a, b) for a, b in zip(dropped, background, strict=True))
    # spleen's onehot channels are all zero in every context slice
    channels_per_slice = 3
    spleen = dropped[0][:, channels_per_slice - 1 :: channels_per_slice]
    assert spleen.abs().sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"strength": 1.5}, "strength"),
        ({"strength": 0.5}, "reference"),
        ({"scheduler": "heun"}, "unknown scheduler"),
        ({"noise_correlation": 1.0}, "noise correlation"),
        ({"slice_batch_size": 0}, "slice_batch_size"),
    ],
)
def test_bad_arguments_are_clear_errors(pipe, labels, kwargs, phrase):
    with pytest.raises(VolgenError, match=phrase):
        pipe(labels, num_inference_steps=1, **kwargs)


def test_pipeline_config_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    again = SegmentationToVolumePipeline.from_pretrained(tmp_path / "p")
    for key in ("encoding", "context_slices", "num_classes", "slice_axis"):
        assert again.config[key] == pipe.config[key]


def test_the_scheduler_set_on_the_pipeline_is_the_one_used(tiny_model_dir, labels):
    """The diffusers way of swapping samplers works; choosing by name sets the same component."""
    from diffusers import DDIMScheduler

    pipe = SegmentationToVolumePipeline.from_pretrained(tiny_model_dir)
    pipe.set_scheduler("ddim")
    by_name = pipe(labels, num_inference_steps=2, seed=4).volume
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_scheduler("euler")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    swapped = pipe(labels, num_inference_steps=2, seed=4)
    assert swapped.timesteps == [500, 0]  # leading spacing: the swapped-in scheduler ran
    assert not torch.equal(swapped.volume, by_name)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    trailing = pipe(labels, num_inference_steps=2, seed=4)
    assert trailing.timesteps == [999, 499]
    assert torch.equal(trailing.volume, by_name)  # the same sampler as set_scheduler("ddim")


def test_from_pretrained_loads_a_volgen_model_folder(tiny_model_dir, labels):
    from volgen.defaults import SCHEDULER

    loaded = load_model(tiny_model_dir)
    pipe = SegmentationToVolumePipeline.from_pretrained(tiny_model_dir)
    assert pipe.config.num_classes == loaded.metadata.num_classes
    assert pipe.config.slice_axis == loaded.metadata.slice_axis
    assert not pipe.unet.training and pipe.unet.dtype == torch.float32
    by_hand = build_pipeline(loaded.unet, loaded.scheduler, loaded.metadata, scheduler_name=SCHEDULER)
    a = pipe(labels, num_inference_steps=2, seed=9).volume
    b = by_hand(labels, num_inference_steps=2, seed=9).volume
    assert torch.equal(a, b)


def test_numpy_labels_and_reference_are_accepted(pipe, labels):
    reference = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a = pipe(labels.numpy().astype("uint8"), num_inference_steps=2, seed=1, output_type="np")
    b = pipe(labels, num_inference_steps=2, seed=1)
    assert (a.volume == b.volume.numpy()).all()
    c = pipe(labels.numpy(), reference=reference.numpy(), strength=0.5, num_inference_steps=4, seed=1)
    d = pipe(labels, reference=reference, strength=0.5, num_inference_steps=4, seed=1)
    assert torch.equal(c.volume, d.volume)
    with pytest.raises(VolgenError, match="integer"):
        pipe(labels.numpy().astype("float32"), num_inference_steps=1)


def test_timestep_selection_is_one_method(pipe):
    pipe.set_scheduler("ddim")
    assert pipe.set_timesteps(4).tolist() == [999, 749, 499, 249]
    assert pipe.set_timesteps(4, strength=0.5).tolist() == [499, 249]
    assert pipe.set_timesteps(4, strength=0.0).tolist() == []
    # 11 slices in chunks of 4 -> 4 + 4 + 3 slices, each chunk padded to 8: 24 slice-forwards per step
    assert pipe.slice_forwards(11, num_inference_steps=4, strength=0.5, slice_batch_size=4) == 2 * 24
    with pytest.raises(VolgenError, match=r"1\.\.1000"):
        pipe.set_timesteps(1001)


def test_from_pretrained_imports_nothing_the_folder_names(pipe, tmp_path):
    """model_index.json names classes to import; volgen's from_pretrained never imports them."""
    import json

    pipe.save_pretrained(tmp_path / "p")
    index = tmp_path / "p" / "model_index.json"
    config = json.loads(index.read_text())
    config["unet"] = ["evil_module_that_does_not_exist", "Payload"]
    index.write_text(json.dumps(config))
    again = SegmentationToVolumePipeline.from_pretrained(tmp_path / "p")
    assert type(again.unet).__name__ == "UNet2DModel"
    (tmp_path / "p" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(VolgenError, match="pickle"):
        SegmentationToVolumePipeline.from_pretrained(tmp_path / "p")
