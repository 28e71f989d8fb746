"""Precision on the CPU: bf16 (autocast, channels-last input) where the CPU has native bf16, fp32 on request.

fp32 stays the bytes it was and bf16 keeps the engine's invariants (tests/test_engine.py).
"""

from __future__ import annotations

import pytest
import torch

from volgen.denoiser import runs_autocast, uses_channels_last
from volgen.generation import device as device_module
from volgen.generation.device import autocast_dtype, cpu_has_native_bf16
from volgen.generation.settings import SettingsError

CPU = torch.device("cpu")


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


def test_the_generator_runs_bf16_by_default_only_where_the_cpu_has_it(tiny_model_dir, monkeypatch):
    from volgen.generation import VolumeGenerator

    for native, expected in ((True, "bfloat16"), (False, "fp32")):
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        assert VolumeGenerator(tiny_model_dir, device="cpu").precision == expected
        assert VolumeGenerator(tiny_model_dir, device="cpu", precision="fp32").precision == "fp32"
