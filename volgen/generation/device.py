"""Where and how the UNet runs: device, precision, attention kernels (memory: :mod:`volgen.memory`)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from volgen import defaults
from volgen.generation.settings import SettingsError, check_precision
from volgen.memory import available_memory, estimate_memory, memory_limit  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


def resolve_device(device: str = defaults.DEVICE) -> Any:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error (one line)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise SettingsError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise SettingsError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SettingsError(f"--device must be auto, cpu or cuda, got {device!r}") from None


#: CPU flags of native bfloat16 arithmetic (x86: AVX512-BF16, AMX-BF16), read from /proc/cpuinfo.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bfloat16 natively (a flag of :data:`NATIVE_BF16_FLAGS`); ``False``
    where it cannot be told (no ``/proc/cpuinfo``: not Linux), and bf16 would be emulated and slower."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {
        f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()
    }
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(device: Any, precision: str = defaults.PRECISION) -> Any:
    """The autocast dtype of the UNet (``None``: float32).

    CUDA: ``auto``/``bf16`` is bfloat16 (float16 where bf16 is unsupported) and ``fp16`` is float16. CPU:
    ``bf16`` is bfloat16 (channels-last, :func:`volgen.denoiser.uses_channels_last`), ``auto`` is bfloat16 on
    a CPU with native bf16 (:func:`cpu_has_native_bf16`) and float32 elsewhere; ``fp32`` and ``fp16`` run
    float32 (the same bytes as before bf16 came to the CPU).
    """
    import torch

    check_precision(precision)
    kind = getattr(device, "type", "cpu")
    if precision == "fp32":
        return None
    if kind == "cpu":
        native = precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    if kind != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare_unet(unet: Any, device: Any) -> Any:
    """Move the UNet to ``device``; on CUDA use channels-last memory and xformers attention if usable (on the
    CPU the weights stay as loaded: a bf16 run gives channels-last input only, and the bf16 copies autocast
    makes of the weights are reordered by oneDNN either way)."""
    import torch

    unet = unet.to(device)
    if getattr(device, "type", "cpu") == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
        enable_xformers(unet)
    return unet


def enable_xformers(unet: Any) -> None:
    """xformers attention on CUDA when installed; PyTorch's SDPA (diffusers' default) otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        unet.enable_xformers_memory_efficient_attention()
        logger.info("using xformers attention")
    except Exception as e:  # noqa: BLE001 - xformers builds often mismatch torch; SDPA is the fallback
        logger.warning("xformers is installed but unusable (%s); using PyTorch SDPA", e)
