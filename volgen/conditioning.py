"""How a segmentation reaches the slice model: encodings, 2.5D context, mask ablation, class selection.

This is the one place that turns class indices into conditioning channels; training and sampling both call
:func:`condition_slices`, so they cannot drift apart.

Shapes: a volume of class indices is ``(Z, H, W)`` with slices along the model's slice axis first; a stack
of context slices is ``(B, S, H, W)`` with ``S = 2K + 1`` (slices ``z-K .. z+K``); the condition fed to the
UNet is ``(B, S * channels_per_slice, H, W)``, slice-major (all channels of slice ``z-K`` first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from volgen.config import StrictModel
from volgen.defaults import AXIS_NAMES
from volgen.types import Encoding

if TYPE_CHECKING:  # torch loads in the functions that use it: model metadata (ConditionLayout) stays light
    import torch
    from torch import Tensor

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


def context_stack(
    volume: Tensor, z: Tensor | Sequence[int], context_slices: int, padding: str = "background"
) -> Tensor:
    """Gather slices ``z-K .. z+K`` for each ``z``.

    Args:
        volume: ``(Z, H, W)`` integer class indices.
        z: ``(B,)`` slice indices.
        context_slices: K.
        padding: Neighbours outside the volume are ``background`` (0) or ``replicate`` (the edge slice).

    Returns:
        ``(B, 2K+1, H, W)`` class indices, same dtype as ``volume``.
    """
    import torch

    z = torch.as_tensor(z, dtype=torch.long, device=volume.device)
    offsets = torch.arange(-context_slices, context_slices + 1, device=volume.device)
    index = z[:, None] + offsets[None, :]  # (B, S)
    inside = (index >= 0) & (index < volume.shape[0])
    stack = volume[index.clamp(0, volume.shape[0] - 1)]  # (B, S, H, W)
    if padding == "replicate":
        return stack
    if padding != "background":
        raise ValueError(f"unknown context padding {padding!r}; expected background or replicate")
    return stack * inside[:, :, None, None].to(stack.dtype)


def draw_ablation(batch: int, num_classes: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Mask ablation (Algorithm 1 of Konz et al.): which classes each sample loses.

    Each foreground class of each sample is removed independently with probability ``p``; background is
    never removed.

    Returns:
        ``(B, C)`` bool, ``True`` where the class is removed from that sample's condition.
    """
    import torch

    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ablation probability must be in [0, 1], got {p}")
    removed = torch.rand((batch, num_classes), generator=generator) < p
    removed[:, 0] = False
    return removed


def selection_to_removed(keep: Sequence[int], num_classes: int) -> Tensor:
    """A class selection at inference as a removal row: ``(C,)`` bool, ``True`` for dropped classes."""
    import torch

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
    import torch

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
    import torch

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
    padding: str = "background",
) -> Tensor:
    """The UNet's conditioning channels for slices ``z`` of a class-index volume.

    Args:
        volume: ``(Z, H, W)`` class indices.
        z: ``(B,)`` slice indices.
        num_classes: C, background included.
        encoding: ``onehot`` or ``seed``.
        context_slices: K; the condition covers slices ``z-K .. z+K``.
        removed: ``(B, C)`` (per-sample ablation) or ``(C,)`` (a class selection) bool of removed classes.
        padding: Context outside the volume: ``background`` or ``replicate`` (see :class:`ConditionLayout`).

    Returns:
        ``(B, (2K+1) * channels_per_slice, H, W)`` float32.
    """
    stack = remove_classes(context_stack(volume, z, context_slices, padding), removed)
    return encode(stack, num_classes, encoding)


# ----------------------------------------------------------------------------------------------------
# Which classes the condition specifies (and, for multi-axis models, the slice axis)


class ConditionLayout(StrictModel):
    """The per-sample condition vector a model takes besides its mask channels (stored in ``volgen.json``).

    Mask ablation alone makes an all-background condition ambiguous: "air" and "a class was removed here"
    look the same. A model with ``specified_flags`` also gets, per sample, one flag per foreground class:
    1 = the mask specifies this class (its absence from a region means "not there"), 0 = the class was
    ablated in training or dropped at generation (its absence means nothing). With every class specified,
    background means background.

    Attributes:
        specified_flags: Whether the vector holds the ``C-1`` "specified" flags.
        axes: Slice axes the model was trained on (0 axial, 1 coronal, 2 sagittal); with more than one the
            vector ends with a one-hot of the current axis' position in ``axes``.
        context_padding: What the 2.5D context holds for neighbours outside the volume: ``background``
            (all-zero masks, the behaviour of older models) or ``replicate`` (the edge slice repeated, so the
            first and last slices of a cropped volume see the anatomy continue, as they did in training).
    """

    specified_flags: bool = True
    axes: tuple[int, ...] = ()
    context_padding: Literal["background", "replicate"] = "background"

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError("axes must be distinct slice axes 0 (axial), 1 (coronal), 2 (sagittal)")
        return axes

    def dim(self, num_classes: int) -> int:
        """Length D of the condition vector for ``num_classes`` classes (background included)."""
        return (num_classes - 1 if self.specified_flags else 0) + (
            len(self.axes) if len(self.axes) > 1 else 0
        )


def condition_vector(
    specified: Tensor, *, axis: int | None = None, layout: ConditionLayout | None
) -> Tensor | None:
    """The per-sample condition vector: the "specified" flags, then a one-hot of the slice axis.

    Args:
        specified: ``(B, C-1)`` bool or float, 1 where the condition specifies the foreground class.
        axis: The slice axis of these samples (an entry of ``layout.axes``); needed when there are several.
        layout: The model's :class:`ConditionLayout`; ``None`` (older models) gives ``None``.

    Returns:
        ``(B, D)`` float32 with ``D = layout.dim(C)``, or ``None`` when ``D = 0``.
    """
    import torch

    if layout is None:
        return None
    parts = []
    if layout.specified_flags:
        parts.append(specified.float())
    if len(layout.axes) > 1:
        if axis not in layout.axes:
            raise ValueError(f"axis {axis!r} is not one of the model's axes {layout.axes}")
        onehot = torch.zeros(specified.shape[0], len(layout.axes), device=specified.device)
        onehot[:, layout.axes.index(axis)] = 1.0
        parts.append(onehot)
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def specified_from_removed(removed: Tensor | None, batch: int, num_classes: int) -> Tensor:
    """``(B, C-1)`` "specified" flags (float) from a removal: ``(B, C)``, ``(C,)`` or ``None`` (none)."""
    import torch

    if removed is None:
        return torch.ones(batch, num_classes - 1)
    removed = removed.cpu()
    if removed.ndim == 1:
        removed = removed.expand(batch, -1)
    return (~removed[:, 1:]).float()


def unet_condition(mask_channels: Tensor, vector: Tensor | None) -> Tensor:
    """What the UNet gets besides the noisy slice: the mask channels, then the condition vector.

    The vector enters as ``D`` constant channels (``diffusers.UNet2DModel`` has no vector class embedding),
    so a model with a :class:`ConditionLayout` has ``D`` more input channels than one without.

    Args:
        mask_channels: ``(B, M, H, W)`` from :func:`encode` / :func:`condition_slices`.
        vector: ``(B, D)`` from :func:`condition_vector`, or ``None``.

    Returns:
        ``(B, M + D, H, W)``.
    """
    import torch

    if vector is None:
        return mask_channels
    b, _, h, w = mask_channels.shape
    planes = vector.to(mask_channels.device, mask_channels.dtype)[:, :, None, None].expand(b, -1, h, w)
    return torch.cat([mask_channels, planes], dim=1)


def model_axes(layout: ConditionLayout | None, slice_axis: str) -> tuple[str, ...]:
    """The slice axes a model was trained on: its layout's axes, else its one ``slice_axis``."""
    if layout is not None and len(layout.axes) > 1:
        return tuple(AXIS_NAMES[a] for a in layout.axes)
    return (slice_axis,)
