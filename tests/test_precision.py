"""Precision on the CPU: bf16 (autocast, channels-last input) where the CPU has native bf16, fp32 on request.

fp32 stays the bytes it was (tests/test_engine.py pins them against a plain loop); bf16 keeps the engine's
invariants: the result does not depend on the slice batch, and sample k of a stack is seed + k alone.
"""

from __future__ import annotations

import pytest
import torch

from volgen.denoiser import Denoiser, runs_autocast, uses_channels_last
from volgen.generation import device as device_module
from volgen.generation.device import autocast_dtype, cpu_has_native_bf16
from volgen.generation.settings import SettingsError
from volgen.pipeline import SegmentationToVolumePipeline

CPU = torch.device("cpu")
STEPS = 3


@pytest.fixture(scope="module")
def pipe(flagged_model_dir) -> SegmentationToVolumePipeline:
    return SegmentationToVolumePipeline.from_pretrained(flagged_model_dir)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.randint(0, 4, (13, 16, 16), generator=torch.Generator().manual_seed(2))


def run(pipe, labels, dtype, **kwargs):
    options = {"num_inference_steps": STEPS, "scheduler": "dpmsolver++", "guidance_scale": 1.5, "seed": 3}
    with torch.no_grad():
        return pipe(labels, autocast_dtype=dtype, **(options | kwargs))


def test_cpu_precision_is_resolved_from_the_setting_and_the_cpu(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16.__wrapped__(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16.__wrapped__(str(cpuinfo))
    assert not cpu_has_native_bf16.__wrapped__(str(tmp_path / "missing"))
    for native in (True, False):
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        assert autocast_dtype(CPU, "auto") == (torch.bfloat16 if native else None)
        assert autocast_dtype(CPU, "fp32") is None  # forced fp32: the old bytes
        assert autocast_dtype(CPU, "fp16") is None  # no fp16 on the CPU: float32, as before
        assert autocast_dtype(CPU, "bf16") == torch.bfloat16
    with pytest.raises(SettingsError, match="--precision must be"):
        autocast_dtype(CPU, "fp8")
    assert runs_autocast(CPU, torch.bfloat16) and not runs_autocast(CPU, torch.float16)
    assert uses_channels_last(CPU, torch.bfloat16) and not uses_channels_last(CPU, None)
    assert not uses_channels_last(CPU, torch.float16)


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


def test_the_generator_runs_bf16_by_default_only_where_the_cpu_has_it(tiny_model_dir, monkeypatch):
    from volgen.generation import VolumeGenerator

    for native, expected in ((True, "bfloat16"), (False, "fp32")):
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        assert VolumeGenerator(tiny_model_dir, device="cpu").precision == expected
        assert VolumeGenerator(tiny_model_dir, device="cpu", precision="fp32").precision == "fp32"
