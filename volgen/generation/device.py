"""Where and how the UNet runs: device, precision, attention kernels, and the memory a volume needs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from volgen import defaults
from volgen.generation.settings import SettingsError, check_precision

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


def estimate_memory(
    *,
    slices: int,
    slice_size: int,
    condition_channels: int,
    slice_batch_size: int,
    block_channels: Sequence[int],
    input_voxels: int,
) -> int:
    """Bytes a generation needs beyond the model weights, estimated before allocating anything.

    Volume arrays (noisy volume, model output, scheduler history, noise, reference: ~8 float32 copies of
    ``slices x size²``), one chunk's UNet activations (~ 12 float32 maps per level and slice, at each
    level's resolution and width, plus its conditioning), and the input-grid arrays (labels, resampled
    output and its physical copy: ~4 float32 copies of the input voxels).
    """
    plane = slice_size * slice_size
    volume_arrays = 8 * 4 * slices * plane
    activations = 0
    for level, width in enumerate(block_channels):
        activations += 12 * 4 * width * plane // (4**level)
    chunk = min(slice_batch_size, slices) + 8
    chunk_bytes = chunk * (activations + 4 * (1 + condition_channels) * plane)
    return int(volume_arrays + chunk_bytes + 4 * 4 * input_voxels)


def available_memory(device: Any) -> int:
    """Free memory on ``device`` (bytes): available RAM on the CPU, free GPU memory on CUDA."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def memory_limit(device: Any, max_memory: int | None = None) -> int:
    """``max_memory``, or :data:`volgen.defaults.MEMORY_FRACTION` of what is free on ``device``."""
    if max_memory is not None:
        return int(max_memory)
    return int(defaults.MEMORY_FRACTION * available_memory(device))
