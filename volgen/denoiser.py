"""The denoiser: the one code that runs the slice network.

:class:`Denoiser` turns (noisy slices, timestep, condition) into the network's output. It builds the network's
input - the noisy slice, the mask channels of the slice and its 2.5D context, the "specified" flags and the
slice axis of a multi-axis model (:mod:`volgen.conditioning`) - and owns how the network runs: classifier-free
guidance as one batched forward (conditional and unconditional halves concatenated), the fixed-size CPU
forwards that keep results independent of the slice batch, precision (autocast) and channels-last input (a
network compiled in place with ``net.compile()`` runs compiled). Training's loss (:mod:`volgen.training.loop`)
and every sampler (:mod:`volgen.sampling`) call it, so the two cannot drift apart.

Extending volgen: a ControlNet adds its residuals in :meth:`Denoiser.forward`; a latent model encodes and
decodes around it (see ``docs/architecture.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from volgen import defaults
from volgen.conditioning import (
    ConditionLayout,
    condition_slices,
    condition_vector,
    encode,
    remove_classes,
    selection_to_removed,
    specified_from_removed,
    unet_condition,
)
from volgen.errors import VolgenError

__all__ = [
    "BATCH_GRANULE",
    "UNGUIDED",
    "Denoiser",
    "padded_slices",
    "per_sample_condition_vector",
    "runs_autocast",
    "uses_channels_last",
]

logger = logging.getLogger(__name__)

UNGUIDED = 1.0
#: The network always runs on a multiple of this many slices (a short chunk is padded with empty slices). CPU
#: kernels (oneDNN convolutions, GEMM) give bitwise different per-sample results for different batch sizes
#: (small multiples of 4 agree, but 16 and more take other code paths), so on the CPU every forward is exactly
#: this many slices: the volume does not depend on the slice batch. (GPUs run whole chunks; see
#: docs/reliability.md for what that means for determinism.)
BATCH_GRANULE = 8


def padded_slices(n: int) -> int:
    """Slices a chunk of ``n`` costs: it is padded up to a multiple of :data:`BATCH_GRANULE`."""
    return n + (-n % BATCH_GRANULE)


def runs_autocast(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Whether the network runs under autocast: any reduced dtype on a GPU, bfloat16 only on the CPU (a
    float16 request there runs float32, as it always has)."""
    if autocast_dtype is None:
        return False
    return device.type != "cpu" or autocast_dtype == torch.bfloat16


def uses_channels_last(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Whether the network gets channels-last input: on CUDA (with a channels-last network,
    :func:`volgen.generation.device.prepare_unet`), and on the CPU in bfloat16, where oneDNN's bf16
    convolutions are fastest in that layout. A float32 CPU run keeps the contiguous layout, so its results
    stay the same bytes."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and runs_autocast(device, autocast_dtype)


def chunks(num_slices: int, slice_batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of ``slice_batch_size`` slices over ``num_slices`` slices."""
    return [(s, min(s + slice_batch_size, num_slices)) for s in range(0, num_slices, slice_batch_size)]


def per_sample_condition_vector(
    specified: Tensor, axes: Tensor | None, layout: ConditionLayout | None
) -> Tensor | None:
    """The condition vector for a batch whose samples come from different slice axes.

    Args:
        specified: ``(B, C-1)`` "specified" flags.
        axes: ``(B,)`` axis codes (0 axial, 1 coronal, 2 sagittal), or ``None`` for single-axis data.
        layout: The model's layout; with several ``axes`` the vector ends with the one-hot of each sample's.
    """
    if layout is None or len(layout.axes) <= 1 or axes is None:
        return condition_vector(specified, layout=layout)
    parts = [condition_vector(specified[axes == a], axis=a, layout=layout) for a in layout.axes]
    out = torch.empty(specified.shape[0], layout.dim(specified.shape[1] + 1))
    for a, part in zip(layout.axes, parts, strict=True):
        if part is not None and part.shape[0]:
            out[axes.cpu() == a] = part.cpu()
    return out


@dataclass
class Denoiser:
    """A slice network with what its input is made of.

    Attributes:
        net: The network (``diffusers.UNet2DModel`` or one that is called the same way:
            ``net(sample, timestep).sample``), possibly wrapped (``accelerate``, ``torch.compile``).
        num_classes: Classes including background.
        encoding: Mask encoding (``onehot`` / ``scalar``, see :func:`volgen.conditioning.encode`).
        context_slices: 2.5D context: slices on each side of the current one in its mask channels.
        layout: The condition vector (``None``: mask channels only).
        slice_axis: The model's own slice axis (its axis code when a multi-axis model is not told one).
        autocast_dtype: Run the network under autocast with this dtype (on the CPU: bfloat16 only, see
            :func:`runs_autocast`).
        channels_last: Give the network channels-last input (:func:`uses_channels_last`).
    """

    net: torch.nn.Module
    num_classes: int
    encoding: str = "onehot"
    context_slices: int = 1
    layout: ConditionLayout | None = None
    slice_axis: str = "axial"
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def padding(self) -> str:
        """How the 2.5D context is padded at a volume's ends."""
        return self.layout.context_padding if self.layout is not None else "background"

    # -- the network's input -------------------------------------------------------------------------------

    def vector(self, removed: Tensor | None, batch: int, axis: int | None = None) -> Tensor | None:
        """The ``(batch, D)`` condition vector: kept classes specified, removed ones not (or ``None``)."""
        specified = specified_from_removed(removed, batch, self.num_classes)
        layout = self.layout
        if axis is None and layout is not None and len(layout.axes) > 1:  # multi-axis model: its slice_axis
            axis = defaults.AXIS_NAMES.index(self.slice_axis)
            axis = axis if axis in layout.axes else layout.axes[0]
        return condition_vector(specified, axis=axis, layout=layout)

    def training_condition(self, context: Tensor, removed: Tensor, axes: Tensor | None = None) -> Tensor:
        """The condition channels of a training batch: per-sample removal and slice axis.

        Args:
            context: ``(B, 2k+1, H, W)`` class indices of each slice and its context.
            removed: ``(B, C)`` bool, classes shown as background (and flagged unspecified).
            axes: ``(B,)`` axis codes for multi-axis data, else ``None``.
        """
        mask_channels = encode(remove_classes(context, removed), self.num_classes, self.encoding)
        specified = specified_from_removed(removed, removed.shape[0], self.num_classes)
        return unet_condition(mask_channels, per_sample_condition_vector(specified, axes, self.layout))

    def volume_condition(
        self,
        volumes: Sequence[Tensor],
        starts: Sequence[int],
        start: int,
        stop: int,
        removed: Tensor | None,
        vector: Tensor | None,
    ) -> Tensor:
        """The condition channels of the stacked slices ``start:stop`` of several volumes: each slice
        conditioned on its own volume (its 2.5D context never reaches into another volume)."""
        parts = []
        for volume, first, end in zip(volumes, starts[:-1], starts[1:], strict=True):
            if first < stop and start < end:  # this volume's slices in the chunk, in its own frame
                index = torch.arange(max(start, first) - first, min(stop, end) - first, device=volume.device)
                parts.append(
                    condition_slices(
                        volume,
                        index,
                        num_classes=self.num_classes,
                        encoding=self.encoding,
                        context_slices=self.context_slices,
                        removed=removed,
                        padding=self.padding,
                    )
                )
        cond = parts[0] if len(parts) == 1 else torch.cat(parts)
        return unet_condition(cond, None if vector is None else vector.expand(stop - start, -1))

    # -- running the network --------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        """The network's output for noisy slices ``x`` ``(B, 1, H, W)`` and their condition channels.

        This is the one call of the network (training and sampling); a ControlNet adds its residuals here.
        """
        net_in = torch.cat([x, condition.to(x.dtype)], dim=1)
        if self.channels_last:
            net_in = net_in.contiguous(memory_format=torch.channels_last)
        return self.net(net_in, t).sample

    def run(self, x: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        """:meth:`forward` on whole granules, in the denoiser's precision: fixed-size forwards on the CPU,
        one forward on a GPU; float32 out."""
        device = x.device
        use_autocast = runs_autocast(device, self.autocast_dtype)
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=use_autocast):
            if device.type == "cpu":  # fixed-size forwards: see BATCH_GRANULE
                parts = zip(x.split(BATCH_GRANULE), condition.split(BATCH_GRANULE), strict=True)
                return torch.cat([self.forward(xp, t, cp) for xp, cp in parts]).float()
            return self.forward(x, t, condition).float()

    def predict(
        self,
        model_input: Tensor,
        t: Tensor,
        labels: Tensor | Sequence[Tensor],
        *,
        slice_batch_size: int,
        removed: Tensor | None = None,
        guidance_scale: float = UNGUIDED,
        axis: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Tensor:
        """The network's output for a whole volume (or a stack of volumes) at timestep ``t``, in chunks.

        Args:
            model_input: ``(Z, C, H, W)`` noisy slices as the network sees them (``scale_model_input``); for
                several volumes their slices one after the other.
            t: The timestep.
            labels: ``(Z, H, W)`` class indices (long) on the network's device, or one ``(Z_i, H, W)`` per
                volume of the stack: each slice is conditioned on its own volume (2.5D context included).
            slice_batch_size: Slices per chunk; each chunk is padded to a multiple of :data:`BATCH_GRANULE`,
                so the result does not depend on it.
            removed: Classes shown as background (see :func:`volgen.conditioning.selection_to_removed`).
            guidance_scale: ``w``; other than 1, each chunk also runs with nothing specified - in the same
                forward, the halves concatenated - and the output is ``ε_∅ + w·(ε_c − ε_∅)``.
            axis: Slicing axis code for a multi-axis model's condition vector (``None``: its slice axis).
            on_chunk: Called with the number of slices after every chunk.
        """
        device = model_input.device
        volumes = [labels] if isinstance(labels, Tensor) else list(labels)
        starts = np.cumsum([0] + [v.shape[0] for v in volumes]).tolist()
        if starts[-1] != model_input.shape[0]:
            raise VolgenError(f"labels hold {starts[-1]} slices, the model input {model_input.shape[0]}")
        passes = [removed]  # the condition, then (guided) nothing specified
        if guidance_scale != UNGUIDED:
            passes.append(selection_to_removed([], self.num_classes))
        vectors = [self.vector(r, 1, axis) for r in passes]  # (1, D) each, the same for every slice
        vectors = [None if v is None else v.to(device) for v in vectors]
        eps = torch.empty_like(model_input)
        for start, stop in chunks(model_input.shape[0], slice_batch_size):
            n = stop - start
            pad = padded_slices(n) - n
            xs, conds = [], []
            for pass_removed, vector in zip(passes, vectors, strict=True):
                cond = self.volume_condition(volumes, starts, start, stop, pass_removed, vector)
                xs.append(_pad(model_input[start:stop], pad))
                conds.append(_pad(cond.to(model_input.dtype), pad))
            out = self.run(torch.cat(xs), t, torch.cat(conds)).split(n + pad)
            eps[start:stop] = (
                out[0][:n] if len(out) == 1 else out[1][:n] + guidance_scale * (out[0][:n] - out[1][:n])
            )
            if on_chunk is not None:
                on_chunk(n)
        return eps


def _pad(x: Tensor, pad: int) -> Tensor:
    """``x`` with ``pad`` zero slices appended."""
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
