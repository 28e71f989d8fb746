"""Where and how the UNet runs: device, precision, attention kernels (memory: :mod:`volgen.memory`)."""

from __future__ import annotations

import logging
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


def autocast_dtype(device: Any, precision: str = defaults.PRECISION) -> Any:
    """The autocast dtype of the UNet (``None``: float32): on CUDA ``auto``/``bf16`` is bfloat16 (float16
    where bf16 is unsupported) and ``fp16`` is float16; the CPU always runs float32."""
    import torch

    check_precision(precision)
    if getattr(device, "type", "cpu") != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare_unet(unet: Any, device: Any) -> Any:
    """Move the UNet to ``device``; on CUDA use channels-last memory and xformers attention if usable."""
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
