"""Classifier-free guidance (``--guidance-scale``): the condition against "nothing specified", only for models
with "specified" flags; older models generate as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from volumes import make_volume, rotation

from volgen import defaults, io
from volgen.api import GenerateSettings, VolumeGenerator
from volgen.cli.app import _register, app
from volgen.conditioning import selection_to_removed
from volgen.errors import VolgenError
from volgen.models import (
    load_model,
)
from volgen.pipeline import build_pipeline

_register()
STEPS = 4  # the default guidance interval guides the last of 4 steps
FAST = ["--steps", str(STEPS), "--device", "cpu", "--progress", "none"]


def pipeline(folder: Path):
    loaded = load_model(folder)
    return build_pipeline(loaded.unet, loaded.scheduler, loaded.metadata)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.randint(0, 4, (11, 16, 16), generator=torch.Generator().manual_seed(7))


def test_guided_output_is_the_unconditional_plus_w_times_the_difference(flagged_model_dir, labels):
    pipe = pipeline(flagged_model_dir)
    x = torch.randn((11, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    nothing = selection_to_removed([], 4)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:3, -3:, 0, 0]))
    try:
        cond = pipe.predict_noise(x, t, labels, guidance_scale=1.0, slice_batch_size=16)
        assert len(seen) == 2 and all(torch.all(s == 1.0) for s in seen)  # one pass, every class specified
        seen.clear()
        uncond = pipe.predict_noise(x, t, labels, removed=nothing, guidance_scale=1.0, slice_batch_size=16)
        guided = pipe.predict_noise(x, t, labels, guidance_scale=3.0, slice_batch_size=16)
    finally:
        handle.remove()
    # the guided call runs both passes: everything specified, then nothing specified
    assert [bool(torch.all(s == 1.0)) for s in seen[2:]] == [True, True, False, False]
    assert torch.all(seen[-1] == 0.0)
    assert torch.equal(guided, uncond + 3.0 * (cond - uncond))
    assert not torch.equal(guided, cond)
    # 0: the unconditional model itself
    assert torch.equal(pipe.predict_noise(x, t, labels, guidance_scale=0.0), uncond)


def test_guidance_default_determinism_and_slice_batch_independence(flagged_model_dir, labels):
    pipe = pipeline(flagged_model_dir)

    def run(**kwargs):
        return pipe(labels, num_inference_steps=STEPS, seed=3, **kwargs).volume

    default = run()
    assert torch.equal(default, run(guidance_scale=defaults.GUIDANCE_SCALE))
    assert torch.equal(default, run(guidance_scale=defaults.GUIDANCE_SCALE, slice_batch_size=3))
    assert not torch.equal(default, run(guidance_scale=1.0))
    # keep/drop: the condition loses the dropped classes, the guidance still runs against nothing specified
    assert not torch.equal(run(keep=[1, 3]), run(keep=[1, 3], guidance_scale=1.0))
    start, stop = defaults.GUIDANCE_INTERVAL  # guided steps (of the default interval) cost two passes
    passes = sum(2 if start <= k / STEPS < stop else 1 for k in range(STEPS))
    assert STEPS < passes < 2 * STEPS
    assert pipe.slice_forwards(11, num_inference_steps=STEPS, slice_batch_size=8) == passes * 16
    assert (
        pipe.slice_forwards(11, num_inference_steps=STEPS, slice_batch_size=8, guidance_scale=1) == STEPS * 16
    )
    every = pipe.slice_forwards(
        11, num_inference_steps=STEPS, slice_batch_size=8, guidance_interval=(0.0, 1.0)
    )
    assert every == 2 * STEPS * 16


def test_older_models_are_unguided_and_refuse_guidance(tiny_model_dir, labels):
    pipe = pipeline(tiny_model_dir)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        default = pipe(labels, num_inference_steps=2, seed=3, slice_batch_size=16).volume
    finally:
        handle.remove()
    assert len(calls) == 2 * 2  # 2 steps of 2 forwards of 8 slices: one pass
    assert torch.equal(default, pipe(labels, num_inference_steps=2, seed=3, guidance_scale=1.0).volume)
    with pytest.raises(VolgenError, match="no 'specified' flags"):
        pipe(labels, num_inference_steps=2, seed=3, guidance_scale=2.0)
    for bad in (-0.5, defaults.MAX_GUIDANCE_SCALE + 1, float("nan"), True, "2"):
        with pytest.raises(VolgenError, match="guidance scale"):
            pipeline(tiny_model_dir).resolve_guidance_scale(bad)


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("guidance-seg") / "seg.nii.gz"
    volume = make_volume(
        "label", size=(14, 12, 7), spacing=(0.9, 1.2, 2.5), direction=rotation(0.1, 0.05, 0.3)
    )
    io.write_volume(volume, path)
    return path


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_records_the_guidance_that_ran_and_refuses_it_for_older_models(
    seg, flagged_model_dir, tiny_model_dir, tmp_path
):
    def generate(name: str, model: Path, *extra: object):
        out = tmp_path / name
        result = cli("generate", seg, "-o", out, "--model", model, *FAST, *extra)
        return result, out

    result, out = generate("default.nii.gz", flagged_model_dir)
    assert result.exit_code == 0, result.output
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["settings"]["guidance_scale"] is None  # asked: the model's default
    assert sidecar["guidance_scale"] == defaults.GUIDANCE_SCALE  # ran
    start, stop = defaults.GUIDANCE_INTERVAL  # on the steps of the default interval
    assert sidecar["guided_steps"] == sum(start <= k / STEPS < stop for k in range(STEPS)) > 0
    result, explicit = generate(
        "explicit.nii.gz", flagged_model_dir, "--guidance-scale", defaults.GUIDANCE_SCALE
    )
    assert result.exit_code == 0 and explicit.read_bytes() == out.read_bytes()
    result, off = generate("off.nii.gz", flagged_model_dir, "--guidance-scale", "1")
    assert json.loads(Path(f"{off}.json").read_text())["guidance_scale"] == 1.0
    assert json.loads(Path(f"{off}.json").read_text())["guided_steps"] == 0
    assert off.read_bytes() != out.read_bytes()

    result, old = generate("old.nii.gz", tiny_model_dir)
    assert result.exit_code == 0 and json.loads(Path(f"{old}.json").read_text())["guidance_scale"] == 1.0
    result, never = generate("never.nii.gz", tiny_model_dir, "--guidance-scale", "2")
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "--guidance-scale" in line and "'tiny-test'" in line
    assert not never.exists()
    result, _ = generate("bad.nii.gz", flagged_model_dir, "--guidance-scale", "-1")
    assert result.exit_code != 0 and "--guidance-scale must be in [0, 20]" in result.output


def test_time_estimate_counts_both_passes(seg, flagged_model_dir):
    generator = VolumeGenerator(flagged_model_dir, device="cpu")
    labels = io.read_label(seg)
    guided = generator.slice_forwards(labels, GenerateSettings(num_inference_steps=STEPS))
    unguided = generator.slice_forwards(
        labels, GenerateSettings(num_inference_steps=STEPS, guidance_scale=1.0)
    )
    start, stop = defaults.GUIDANCE_INTERVAL  # the guided steps of the default interval count twice
    assert guided == unguided // STEPS * sum(2 if start <= k / STEPS < stop else 1 for k in range(STEPS))
    assert guided > unguided
