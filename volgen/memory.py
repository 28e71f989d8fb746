"""The memory a generation needs, and the slice batch that fits: one home for the estimate.

Tensors and devices only (no files): the pipeline asks it to choose ``slice_batch_size="auto"``, the
generation layer to refuse volumes above ``--max-memory``, the batch dry run for its peak. The estimate
counts float32 (autocast halves activations; counting them in float32 errs on the safe side).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from volgen import defaults

#: The UNet runs on multiples of this many slices (:data:`volgen.pipeline.BATCH_GRANULE`): the smallest chunk
#: "auto" chooses, and the slack the estimate allows for padding a chunk.
GRANULE = 8


#: A slice's size: ``H = W`` pixels (the fitted frame), or ``(H, W)`` (a native-resolution frame).
SliceSize = int | tuple[int, int]


def plane_pixels(slice_size: SliceSize) -> int:
    """Pixels of one slice of ``slice_size``."""
    if isinstance(slice_size, int):
        return slice_size * slice_size
    return int(slice_size[0]) * int(slice_size[1])


def volume_bytes(slices: int, slice_size: SliceSize) -> int:
    """Volume arrays in the model's frame (noisy volume, model output, scheduler history, noise, reference):
    ~8 float32 copies of ``slices x H x W`` (``slices`` over all volumes generated together)."""
    return 8 * 4 * slices * plane_pixels(slice_size)


def chunk_slice_bytes(
    *, slice_size: SliceSize, condition_channels: int, block_channels: Sequence[int]
) -> int:
    """UNet activations one slice of a chunk needs: ~12 float32 maps per level at each level's resolution and
    width, plus its conditioning channels."""
    plane = plane_pixels(slice_size)
    activations = sum(12 * 4 * width * plane // (4**level) for level, width in enumerate(block_channels))
    return activations + 4 * (1 + condition_channels) * plane


#: float32 copies of the input grid held at once: the labels, the output and its physical copy, and at the
#: peak of mask-guided resampling (:func:`volgen.frames.mask_guided_resample`) its linear fallback, the
#: running blend and its weights and one class's interpolated value, weight and share (8.5 copies measured
#: on 512 x 512 x 64 with 11 classes).
INPUT_GRID_COPIES = 10


def input_grid_bytes(input_voxels: int) -> int:
    """Arrays on the input grid: :data:`INPUT_GRID_COPIES` float32 copies of ``input_voxels`` (over all
    volumes generated together)."""
    return INPUT_GRID_COPIES * 4 * input_voxels


def estimate_memory(
    *,
    slices: int,
    slice_size: SliceSize,
    condition_channels: int,
    slice_batch_size: int,
    block_channels: Sequence[int],
    input_voxels: int,
) -> int:
    """Bytes a generation needs beyond the model weights, estimated before allocating anything.

    Volume arrays (:func:`volume_bytes`), one chunk's UNet activations (:func:`chunk_slice_bytes` for
    ``slice_batch_size`` slices plus :data:`GRANULE` of padding) and the input-grid arrays
    (:func:`input_grid_bytes`). ``slices`` and ``input_voxels`` count every volume generated together.
    """
    per_slice = chunk_slice_bytes(
        slice_size=slice_size, condition_channels=condition_channels, block_channels=block_channels
    )
    chunk = min(slice_batch_size, slices) + GRANULE
    return int(volume_bytes(slices, slice_size) + chunk * per_slice + input_grid_bytes(input_voxels))


def fit_slice_batch_size(
    budget_bytes: int,
    *,
    slices: int,
    slice_size: SliceSize,
    condition_channels: int,
    block_channels: Sequence[int],
    input_voxels: int = 0,
    cap: int,
) -> int:
    """The largest slice batch (a multiple of :data:`GRANULE`, at least one granule, at most ``cap`` and no
    more than the slices, padded) whose :func:`estimate_memory` stays within ``budget_bytes``.

    When not even one granule fits, one granule is returned: the memory check then refuses the volume with
    its estimate (the chunk size cannot help).
    """
    per_slice = chunk_slice_bytes(
        slice_size=slice_size, condition_channels=condition_channels, block_channels=block_channels
    )
    room = budget_bytes - volume_bytes(slices, slice_size) - input_grid_bytes(input_voxels)
    fits = room // max(1, per_slice) - GRANULE
    padded_slices = max(GRANULE, slices + (-slices % GRANULE))
    limit = min(int(fits), cap, padded_slices)
    return max(GRANULE, limit - limit % GRANULE)


def available_memory(device: Any) -> int:
    """Free memory on ``device`` (bytes): available RAM on the CPU (``psutil``), free memory on CUDA
    (``torch.cuda.mem_get_info``)."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def memory_limit(device: Any, max_memory: int | None = None) -> int:
    """``max_memory``, or :data:`volgen.defaults.MEMORY_FRACTION` of what is free on ``device`` (bytes)."""
    if max_memory is not None:
        return int(max_memory)
    return int(defaults.MEMORY_FRACTION * available_memory(device))
