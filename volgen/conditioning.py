"""How a segmentation reaches the slice model: encodings, 2.5D context, mask ablation, class selection.

This is the one place that turns class indices into conditioning channels; training and sampling both call
:func:`condition_slices`, so they cannot drift apart.

Shapes: a volume of class indices is ``(Z, H, W)`` with slices along the model's slice axis first; a stack
of context slices is ``(B, S, H, W)`` with ``S = 2K + 1`` (slices ``z-K .. z+K``); the condition fed to the
UNet is ``(B, S * channels_per_slice, H, W)``, slice-major (all channels of slice ``z-K`` first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from volgen.types import Encoding

ENCODINGS: tuple[str, ...] = ("onehot", "seed")


def channels_per_slice(num_classes: int, encoding: Encoding) -> int:
    """Conditioning channels per slice: ``C-1`` for ``onehot``, 1 for ``seed``."""
    if encoding == "onehot":
        return num_classes - 1
    if encoding == "seed":
        return 1
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def condition_channels(num_classes: int, encoding: Encoding, context_slices: int) -> int:
    """Total conditioning channels: ``(2K+1) * channels_per_slice``."""
    return (2 * context_slices + 1) * channels_per_slice(num_classes, encoding)


def context_stack(volume: Tensor, z: Tensor | Sequence[int], context_slices: int) -> Tensor:
    """Gather slices ``z-K .. z+K`` for each ``z``; neighbours outside the volume are background (0).

    Args:
        volume: ``(Z, H, W)`` integer class indices.
        z: ``(B,)`` slice indices.
        context_slices: K.

    Returns:
        ``(B, 2K+1, H, W)`` class indices, same dtype as ``volume``.
    """
    z = torch.as_tensor(z, dtype=torch.long, device=volume.device)
    offsets = torch.arange(-context_slices, context_slices + 1, device=volume.device)
    index = z[:, None] + offsets[None, :]  # (B, S)
    inside = (index >= 0) & (index < volume.shape[0])
    stack = volume[index.clamp(0, volume.shape[0] - 1)]  # (B, S, H, W)
    return stack * inside[:, :, None, None].to(stack.dtype)


def draw_ablation(batch: int, num_classes: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Mask ablation (Algorithm 1 of Konz et al.): which classes each sample loses.

    Each foreground class of each sample is removed independently with probability ``p``; background is
    never removed.

    Returns:
        ``(B, C)`` bool, ``True`` where the class is removed from that sample's condition.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ablation probability must be in [0, 1], got {p}")
    removed = torch.rand((batch, num_classes), generator=generator) < p
    removed[:, 0] = False
    return removed


def selection_to_removed(keep: Sequence[int], num_classes: int) -> Tensor:
    """A class selection at inference as a removal row: ``(C,)`` bool, ``True`` for dropped classes."""
    removed = torch.ones(num_classes, dtype=torch.bool)
    removed[0] = False
    removed[list(keep)] = False
    return removed


def remove_classes(stack: Tensor, removed: Tensor | None) -> Tensor:
    """Set the removed classes to background, the same way for every context slice of a sample.

    Args:
        stack: ``(B, S, H, W)`` class indices.
        removed: ``(B, C)`` or ``(C,)`` bool, ``True`` for removed classes; ``None`` keeps everything.
    """
    if removed is None or not bool(removed.any()):
        return stack
    removed = removed.to(stack.device)
    if removed.ndim == 1:
        removed = removed.expand(stack.shape[0], -1)
    batch = torch.arange(stack.shape[0], device=stack.device)[:, None, None, None]
    drop = removed[batch, stack.long()]  # (B, S, H, W): is this voxel's class removed for its sample?
    return stack.masked_fill(drop, 0)


def encode(stack: Tensor, num_classes: int, encoding: Encoding) -> Tensor:
    """Encode class indices as conditioning channels.

    Args:
        stack: ``(B, S, H, W)`` class indices in ``0..C-1``.
        num_classes: C, background included.
        encoding: ``onehot`` (one binary channel per foreground class) or ``seed`` (``class / 255``).

    Returns:
        ``(B, S * channels_per_slice, H, W)`` float32.
    """
    b, s, h, w = stack.shape
    if encoding == "seed":
        return stack.float() / 255.0
    if encoding == "onehot":
        classes = torch.arange(1, num_classes, device=stack.device)
        onehot = stack.long()[:, :, None] == classes[None, None, :, None, None]  # (B, S, C-1, H, W)
        return onehot.reshape(b, s * (num_classes - 1), h, w).float()
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def condition_slices(
    volume: Tensor,
    z: Tensor | Sequence[int],
    *,
    num_classes: int,
    encoding: Encoding,
    context_slices: int,
    removed: Tensor | None = None,
) -> Tensor:
    """The UNet's conditioning channels for slices ``z`` of a class-index volume.

    Args:
        volume: ``(Z, H, W)`` class indices.
        z: ``(B,)`` slice indices.
        num_classes: C, background included.
        encoding: ``onehot`` or ``seed``.
        context_slices: K; the condition covers slices ``z-K .. z+K``.
        removed: ``(B, C)`` (per-sample ablation) or ``(C,)`` (a class selection) bool of removed classes.

    Returns:
        ``(B, (2K+1) * channels_per_slice, H, W)`` float32.
    """
    stack = remove_classes(context_stack(volume, z, context_slices), removed)
    return encode(stack, num_classes, encoding)
