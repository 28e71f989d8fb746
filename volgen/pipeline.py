"""Volume sampling: a segmentation-guided 2D diffusion model run over a whole volume, slice by slice.

The pipeline knows tensors only (no paths, no SimpleITK). Its input is a volume of class indices
``(Z, H, W)`` in the model's slicing frame (slices along the model's slice axis first, each ``H x W`` of the
model's slice size); its output is the generated volume ``(Z, H, W)`` in model space [-1, 1].

Per step the UNet runs over the slices in chunks of ``slice_batch_size`` and ``scheduler.step`` runs once on
the whole volume: multistep schedulers keep one history and stochastic ones draw one noise tensor for the
volume, so the result does not depend on the chunk size.

Several volumes (samples of one segmentation with other seeds, or other segmentations) can be generated in
one call: their slices are stacked so every UNet forward serves all of them, while each volume keeps its own
noise, generator, scheduler state and conditioning (its 2.5D context never reaches into another volume). On
the CPU each volume is bitwise the one a call for it alone gives.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from torch import Tensor

from volgen import defaults
from volgen.conditioning import (
    ConditionLayout,
    condition_slices,
    condition_vector,
    selection_to_removed,
    specified_from_removed,
    unet_condition,
)
from volgen.errors import VolgenError
from volgen.schedulers import NOISE_SCHEDULE_KEYS, make_scheduler, scheduler_step

__all__ = [
    "NOISE_SCHEDULE_KEYS",
    "Progress",
    "SegmentationToVolumePipeline",
    "VolumeGenerationOutput",
    "correlated_noise",
    "make_scheduler",
    "scheduler_step",
    "smooth_through_plane",
]

logger = logging.getLogger(__name__)

SCHEDULERS = defaults.SCHEDULERS
DEFAULT_SCHEDULER = defaults.SCHEDULER
DEFAULT_STEPS = defaults.STEPS
DEFAULT_NOISE_CORRELATION = defaults.NOISE_CORRELATION
DEFAULT_X0_SMOOTHING = defaults.X0_SMOOTHING
UNGUIDED = 1.0
#: The UNet always runs on a multiple of this many slices (a short chunk is padded with empty slices). CPU
#: kernels (oneDNN convolutions, GEMM) give bitwise different per-sample results for different batch sizes
#: (small multiples of 4 agree, but 16 and more take other code paths), so on the CPU every forward is exactly
#: this many slices: the volume does not depend on ``slice_batch_size``. (GPUs run whole chunks; see
#: docs/reliability.md for what that means for determinism.)
BATCH_GRANULE = 8


@dataclass(frozen=True)
class Progress:
    """One progress report: ``slices_done`` of ``slices_total`` slice-forwards over all steps."""

    step: int
    steps: int
    slices_done: int
    slices_total: int


@dataclass
class VolumeGenerationOutput:
    """What the pipeline returns.

    Attributes:
        volume: ``(Z, H, W)`` float32 on the CPU, model space [-1, 1] (the first of ``volumes``).
        volumes: Every volume of the call, in the order of the labels (and seeds) given.
        timesteps: The timesteps that were run (fewer than the schedule's when ``strength < 1``).
        start_timestep: The noise level the run started from (``t*``; -1 when nothing was denoised).
    """

    volume: Tensor
    volumes: list[Tensor] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    start_timestep: int = -1


def smooth_through_plane(x: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of ``(Z, C, H, W)`` along the slice axis (dim 0), σ in slices, edges replicated."""
    if sigma <= 0 or x.shape[0] < 2:
        return x
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    columns = x.movedim(0, -1).reshape(-1, 1, x.shape[0])  # (C*H*W, 1, Z)
    padded = torch.nn.functional.pad(columns, (radius, radius), mode="replicate")
    smoothed = torch.nn.functional.conv1d(padded, kernel.view(1, 1, -1))
    return smoothed.reshape(*x.shape[1:], x.shape[0]).movedim(-1, 0)


def correlated_noise(
    shape: Sequence[int],
    rho: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian noise for a whole volume, correlated along the slice axis (dim 0).

    ``n[0] = e[0]``, ``n[z] = rho * n[z-1] + sqrt(1 - rho^2) * e[z]``: every slice has unit variance and
    neighbouring slices have correlation ``rho`` (0 gives independent slices). Drawn on the CPU from one
    generator, so the same seed gives the same noise on every device.
    """
    if not 0.0 <= rho < 1.0:
        raise VolgenError(f"noise correlation must be in [0, 1), got {rho}")
    e = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    if rho == 0.0 or shape[0] < 2:
        return e
    noise = torch.empty_like(e)
    noise[0] = e[0]
    keep = math.sqrt(1.0 - rho * rho)
    for z in range(1, shape[0]):
        noise[z] = rho * noise[z - 1] + keep * e[z]
    return noise


class SegmentationToVolumePipeline(DiffusionPipeline):
    """Generate an image volume whose anatomy follows a label volume, with a 2D segmentation-guided UNet.

    Registered modules: ``unet`` (``diffusers.UNet2DModel`` taking the noisy slice and the conditioning
    channels) and ``scheduler``, the sampler every call uses. Swap it the diffusers way
    (``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``) or by name
    (``pipe.set_scheduler("ddim")``, which also sets the options volgen's samplers need: see
    :func:`make_scheduler`). The scalar settings (encoding, 2.5D context, number of classes, slice axis) are
    the pipeline's config: they are stored in ``model_index.json`` and round-trip through ``save_pretrained``
    and :meth:`from_pretrained`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet,
        scheduler,
        encoding: str = "onehot",
        context_slices: int = 1,
        num_classes: int = 2,
        slice_axis: str = "axial",
        condition: dict | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            encoding=encoding, context_slices=context_slices, num_classes=num_classes, slice_axis=slice_axis
        )
        if condition is not None:  # models without a condition vector keep their config as it was
            self.register_to_config(
                condition=ConditionLayout.model_validate(condition).model_dump(mode="json")
            )

    @property
    def condition_layout(self) -> ConditionLayout | None:
        """The model's :class:`~volgen.conditioning.ConditionLayout` (``None``: mask channels only)."""
        condition = self.config.get("condition")
        return None if condition is None else ConditionLayout.model_validate(condition)

    def condition_for(self, removed: Tensor | None, batch: int, axis: int | None = None) -> Tensor | None:
        """The ``(batch, D)`` condition vector: kept classes specified, dropped ones not (or ``None``)."""
        specified = specified_from_removed(removed, batch, self.config.num_classes)
        layout = self.condition_layout
        if axis is None and layout is not None and len(layout.axes) > 1:  # multi-axis model: its slice_axis
            axis = ("axial", "coronal", "sagittal").index(self.config.slice_axis)
            axis = axis if axis in layout.axes else layout.axes[0]
        return condition_vector(specified, axis=axis, layout=layout)

    def resolve_guidance_scale(self, guidance_scale: float | None) -> float:
        """The guidance a run uses: ``None`` is :data:`volgen.defaults.GUIDANCE_SCALE` for a model with
        "specified" flags and 1 (unguided) for one without; a model without flags cannot be guided.

        Raises:
            VolgenError: Not a number in ``[0, MAX_GUIDANCE_SCALE]``, or guidance for a model without flags.
        """
        layout = self.condition_layout
        flagged = layout is not None and layout.specified_flags
        if guidance_scale is None:
            return defaults.GUIDANCE_SCALE if flagged else UNGUIDED
        top = defaults.MAX_GUIDANCE_SCALE
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
            raise VolgenError(f"guidance scale must be a number in [0, {top:g}], got {guidance_scale!r}")
        if not 0.0 <= guidance_scale <= top:
            raise VolgenError(f"guidance scale must be in [0, {top:g}], got {guidance_scale!r}")
        if guidance_scale != UNGUIDED and not flagged:
            raise VolgenError(
                f"guidance scale {guidance_scale:g}: this model has no 'specified' flags (an older model), "
                "so it cannot be told 'nothing specified'; use 1 (off)"
            )
        return float(guidance_scale)

    @classmethod
    def from_pretrained(cls, folder, *, scheduler=None) -> SegmentationToVolumePipeline:
        """Load a volgen model folder, or a folder this pipeline's ``save_pretrained`` wrote.

        Unlike ``DiffusionPipeline.from_pretrained`` this never imports the classes ``model_index.json``
        names (a folder cannot make volgen import code): the UNet is a ``UNet2DModel`` read from safetensors
        only (float32, eval mode) and the scheduler config is read as the model's noise schedule.

        Args:
            folder: A local folder (volgen model folder, or ``save_pretrained`` output).
            scheduler: A scheduler instance to use; ``None`` builds volgen's default sampler
                (:data:`DEFAULT_SCHEDULER`) on the folder's noise schedule.
        """
        from pathlib import Path

        from volgen.models import METADATA_FILE, load_model, pipeline_settings

        folder = Path(folder)
        if (folder / METADATA_FILE).is_file():  # a volgen model folder: load it with all its checks
            loaded = load_model(folder)
            unet, schedule, settings = loaded.unet, loaded.scheduler, pipeline_settings(loaded.metadata)
        else:
            unet, schedule, settings = _load_parts(folder)
        pipe = cls(unet=unet, scheduler=scheduler if scheduler is not None else schedule, **settings)
        if scheduler is None:
            pipe.set_scheduler(DEFAULT_SCHEDULER)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def set_scheduler(self, name: str) -> None:
        """Use the sampler ``name`` (one of :data:`SCHEDULERS`), built on the model's noise schedule."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    def set_timesteps(
        self, num_inference_steps: int, strength: float = 1.0, device: torch.device | str | None = None
    ) -> Tensor:
        """Set the scheduler's timesteps for a run and return the ones that run will denoise.

        With ``strength`` λ < 1 the run starts from the reference noised to ``t* = round(λ T)`` and denoises
        only the scheduled timesteps ``<= t*`` (none when λ is 0 or below the last one); this is the one place
        that choice is made (the batch dry run asks it too).

        Raises:
            VolgenError: ``num_inference_steps`` outside ``1..T`` or λ outside [0, 1].
        """
        total = int(self.scheduler.config.num_train_timesteps)
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
            raise VolgenError(
                f"num_inference_steps (--steps) must be an integer in 1..{total} (the model's training "
                f"timesteps), got {steps!r}"
            )
        if not 0.0 <= strength <= 1.0:
            raise VolgenError(f"strength (λ) must be in [0, 1], got {strength}")
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        if strength < 1.0:
            timesteps = timesteps[timesteps <= round(strength * total)]
            if len(timesteps) and hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(len(self.scheduler.timesteps) - len(timesteps))
        return timesteps

    def resolve_slice_batch_size(
        self, slice_batch_size: int | str, num_slices: int, *, budget_bytes: int | None = None
    ) -> int:
        """The slice batch a run over ``num_slices`` slices (all its volumes) uses.

        A whole number is used as it is; ``"auto"`` is the largest multiple of :data:`BATCH_GRANULE` whose
        memory estimate (:func:`volgen.memory.fit_slice_batch_size`) fits ``budget_bytes`` (default:
        :data:`volgen.defaults.MEMORY_FRACTION` of the free memory of the UNet's device), at most
        :data:`volgen.defaults.AUTO_SLICE_BATCH_CPU` on the CPU (which runs every chunk as forwards of
        :data:`BATCH_GRANULE` slices: larger chunks gain nothing there) and
        :data:`volgen.defaults.AUTO_SLICE_BATCH_GPU` on CUDA. Either way the result does not depend on it.

        Raises:
            VolgenError: Neither ``"auto"`` nor an integer >= 1.
        """
        sbs = slice_batch_size
        if sbs != defaults.AUTO_SLICE_BATCH:
            if isinstance(sbs, bool) or not isinstance(sbs, int) or sbs < 1:
                raise VolgenError(f"slice_batch_size must be an integer >= 1 or 'auto', got {sbs!r}")
            return sbs
        from volgen.memory import fit_slice_batch_size, memory_limit

        device = self.unet.device
        config = self.unet.config
        return fit_slice_batch_size(
            memory_limit(device) if budget_bytes is None else budget_bytes,
            slices=num_slices,
            slice_size=int(config.sample_size),
            condition_channels=int(config.in_channels) - int(config.out_channels),
            block_channels=tuple(config.block_out_channels),
            cap=defaults.AUTO_SLICE_BATCH_CPU if device.type == "cpu" else defaults.AUTO_SLICE_BATCH_GPU,
        )

    def slice_forwards(
        self,
        num_slices: int,
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        strength: float = 1.0,
        slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE,
        guidance_scale: float | None = None,
    ) -> int:
        """UNet slice-forwards a run over ``num_slices`` slices costs: steps run × slices padded per chunk
        (× 2 when guided).

        ``num_slices`` counts every volume of the run: volumes generated together share their chunks.
        """
        steps = len(self.set_timesteps(num_inference_steps, strength))
        sbs = self.resolve_slice_batch_size(slice_batch_size, num_slices)
        padded = sum(_padded(stop - start) for start, stop in _chunks(num_slices, sbs))
        passes = 1 if self.resolve_guidance_scale(guidance_scale) == UNGUIDED else 2
        return steps * padded * passes

    def _validate(self, labels: Tensor, reference: Tensor | None, strength: float) -> None:
        size = self.unet.config.sample_size
        if labels.ndim != 3 or tuple(labels.shape[1:]) != (size, size):
            raise VolgenError(f"labels must be (Z, {size}, {size}) class indices, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise VolgenError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_classes):
            raise VolgenError(f"class indices must be in 0..{self.config.num_classes - 1}")
        if not 0.0 <= strength <= 1.0:
            raise VolgenError(f"strength (λ) must be in [0, 1], got {strength}")
        if strength < 1.0 and reference is None:
            raise VolgenError("strength < 1 interpolates towards a reference: pass reference=")
        if reference is not None and tuple(reference.shape) != tuple(labels.shape):
            raise VolgenError(
                f"reference shape {tuple(reference.shape)} != labels shape {tuple(labels.shape)}"
            )

    def _smooth_x0(self, eps: Tensor, model_input: Tensor, t: Tensor, sigma: float) -> Tensor:
        """Smooth the x0 prediction through-plane and return the ε that predicts it.

        ``model_input`` is the noisy volume in the variance-preserving scaling the UNet sees (every
        scheduler's ``scale_model_input`` maps its own parametrisation to it), so
        ``x0 = (x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t)`` holds for all of them.
        """
        alpha = self.scheduler.alphas_cumprod[int(t)].to(eps.device, torch.float32)
        a, s = alpha.sqrt(), (1 - alpha).sqrt()
        x_t = model_input.float()
        if self.scheduler.config.prediction_type == "v_prediction":  # eps holds v = a·ε - s·x0
            x0 = smooth_through_plane((a * x_t - s * eps).clamp(-1.0, 1.0), sigma)
            return a * (x_t - a * x0) / s - s * x0
        x0 = (x_t - s * eps) / a
        x0 = smooth_through_plane(x0.clamp(-1.0, 1.0), sigma)
        return (x_t - a * x0) / s

    def _forward(self, unet_in: Tensor, t: Tensor, autocast_dtype: torch.dtype | None) -> Tensor:
        """The UNet on one chunk, padded to a multiple of :data:`BATCH_GRANULE` slices (float32 out)."""
        device, n = unet_in.device, unet_in.shape[0]
        pad = _padded(n) - n
        if pad:
            unet_in = torch.cat([unet_in, unet_in.new_zeros(pad, *unet_in.shape[1:])])
        use_autocast = autocast_dtype is not None and device.type != "cpu"
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            if device.type == "cpu":  # fixed-size forwards: see BATCH_GRANULE
                out = torch.cat([self.unet(part, t).sample for part in unet_in.split(BATCH_GRANULE)])
            else:
                out = self.unet(unet_in, t).sample
        return out[:n].float()

    def _chunk_condition(
        self,
        volumes: list[Tensor],
        starts: list[int],
        start: int,
        stop: int,
        removed: Tensor | None,
        padding: str,
    ) -> Tensor:
        """The mask channels of the stacked slices ``start:stop``: each slice conditioned on its own volume
        (its 2.5D context never reaches into another volume)."""
        parts = []
        for volume, first, end in zip(volumes, starts[:-1], starts[1:], strict=True):
            if first < stop and start < end:  # this volume's slices in the chunk, in its own frame
                index = torch.arange(max(start, first) - first, min(stop, end) - first, device=volume.device)
                parts.append(
                    condition_slices(
                        volume,
                        index,
                        num_classes=self.config.num_classes,
                        encoding=self.config.encoding,
                        context_slices=self.config.context_slices,
                        removed=removed,
                        padding=padding,
                    )
                )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def predict_noise(
        self,
        model_input: Tensor,
        t: Tensor,
        labels: Tensor | Sequence[Tensor],
        *,
        removed: Tensor | None = None,
        slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE,
        autocast_dtype: torch.dtype | None = None,
        on_chunk: Callable[[int], None] | None = None,
        axis: int | None = None,
        guidance_scale: float = UNGUIDED,
    ) -> Tensor:
        """The UNet's output for the whole volume (or stack of volumes) at timestep ``t``, run in chunks of
        ``slice_batch_size``.

        Args:
            model_input: ``(Z, C, H, W)`` noisy volume as the UNet sees it (``scheduler.scale_model_input``);
                for several volumes their slices one after the other, ``Z = Z_1 + Z_2 + ...``.
            t: The timestep.
            labels: ``(Z, H, W)`` class indices (long) on the UNet's device, or one ``(Z_i, H, W)`` tensor per
                volume of the stack: each slice is conditioned on its own volume (2.5D context included).
            removed: Classes shown to the UNet as background (see :func:`selection_to_removed`).
            slice_batch_size: Slices per forward, or ``"auto"`` (:meth:`resolve_slice_batch_size`); each
                forward is padded to a multiple of :data:`BATCH_GRANULE`, so the result does not depend on it.
            autocast_dtype: Run the UNet under autocast with this dtype (not on the CPU).
            on_chunk: Called with the number of slices after every chunk.
            axis: Slicing axis code for a multi-axis model's condition vector (``None``: its slice axis).
            guidance_scale: ``w``; other than 1, each chunk also runs with nothing specified (every class
                removed and flagged unspecified) and the output is ``ε_∅ + w·(ε_c − ε_∅)`` (a model with
                "specified" flags only: see :meth:`resolve_guidance_scale`).
        """
        device = model_input.device
        volumes = [labels] if isinstance(labels, Tensor) else list(labels)
        starts = np.cumsum([0] + [v.shape[0] for v in volumes]).tolist()
        if starts[-1] != model_input.shape[0]:
            raise VolgenError(f"labels hold {starts[-1]} slices, the model input {model_input.shape[0]}")
        sbs = self.resolve_slice_batch_size(slice_batch_size, model_input.shape[0])
        layout = self.condition_layout
        padding = layout.context_padding if layout is not None else "background"
        guidance_scale = self.resolve_guidance_scale(guidance_scale)
        passes = [removed]  # the condition, then (guided) nothing specified
        if guidance_scale != UNGUIDED:
            passes.append(selection_to_removed([], self.config.num_classes))
        vectors = [self.condition_for(r, 1, axis) for r in passes]  # (1, D) each, the same for every slice
        vectors = [None if v is None else v.to(device) for v in vectors]
        eps = torch.empty_like(model_input)
        for start, stop in _chunks(model_input.shape[0], sbs):
            outs = []
            for pass_removed, vector in zip(passes, vectors, strict=True):
                cond = self._chunk_condition(volumes, starts, start, stop, pass_removed, padding)
                cond = unet_condition(cond, None if vector is None else vector.expand(stop - start, -1))
                unet_in = torch.cat([model_input[start:stop], cond.to(model_input.dtype)], dim=1)
                outs.append(self._forward(unet_in, t, autocast_dtype))
            eps[start:stop] = outs[0] if len(outs) == 1 else outs[1] + guidance_scale * (outs[0] - outs[1])
            if on_chunk is not None:
                on_chunk(stop - start)
        return eps

    @torch.no_grad()
    def __call__(
        self,
        labels: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        scheduler: str | None = None,
        slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE,
        noise_correlation: float = DEFAULT_NOISE_CORRELATION,
        x0_smoothing: float = DEFAULT_X0_SMOOTHING,
        keep: Sequence[int] | None = None,
        reference: Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | None = None,
        strength: float = 1.0,
        guidance_scale: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        callback: Callable[[Progress], None] | None = None,
        output_type: str = "pt",
    ) -> VolumeGenerationOutput:
        """Generate a volume (or several at once) with ``self.scheduler``.

        Several volumes: give ``labels`` as a list (the same labels several times for several samples of one
        segmentation) with one seed or generator per volume. Their slices share every UNet forward; each
        volume keeps its own noise, generator and scheduler state, so on the CPU it is bitwise what a call
        for it alone gives.

        Args:
            labels: ``(Z, H, W)`` integer class indices in the model's slicing frame (``H = W`` = slice size),
                a tensor or a numpy array; or a list or tuple of them (``Z`` may differ), one per volume.
            num_inference_steps: Denoising steps over the full schedule (λ < 1 runs the last ``≈λ·N``).
            generator: Source of all randomness (a list: one per volume); ``seed`` makes them when ``None``.
            seed: Seed for a fresh CPU generator (ignored when ``generator`` is given); for several volumes a
                list, one per volume, or one number: volume ``i`` uses ``seed + i``.
            scheduler: Convenience: ``pipe.set_scheduler(scheduler)`` before the run (it stays set).
                ``None`` uses ``self.scheduler`` as it is.
            slice_batch_size: Slices per UNet forward, or ``"auto"`` (:meth:`resolve_slice_batch_size`; the
                slices of all volumes count); does not change the result.
            noise_correlation: ρ of the initial noise along the slice axis.
            x0_smoothing: σ (in slices) of a Gaussian applied along the slice axis to the clean-image (x0)
                prediction at every step, before the scheduler uses it; 0 turns it off.
            keep: Foreground class indices kept in the condition (the rest become background); ``None``: all.
            reference: ``(Z, H, W)`` real image in model space [-1, 1], registered to ``labels`` (for λ); a
                list, one per volume, with a list of labels.
            strength: λ in [0, 1]: 0 returns ``reference``, 1 generates freely.
            guidance_scale: Classifier-free guidance ``w`` towards the condition (1: off, one UNet pass per
                step; ``None``: :data:`volgen.defaults.GUIDANCE_SCALE` for a model with "specified" flags, off
                for older models; see :meth:`resolve_guidance_scale`).
            autocast_dtype: ``torch.float16``/``torch.bfloat16`` to run the UNet under autocast (CUDA).
            callback: Called with a :class:`Progress` after every UNet chunk (slices of all volumes).
            output_type: ``"pt"`` (CPU tensors) or ``"np"`` (numpy arrays).

        Returns:
            :class:`VolumeGenerationOutput` with the volume(s) in model space.
        """
        several = isinstance(labels, list | tuple)
        volumes = [torch.as_tensor(v) for v in labels] if several else [torch.as_tensor(labels)]
        count = len(volumes)
        if count == 0:
            raise VolgenError("labels: give at least one volume")
        references = _per_volume(reference, count, several, "reference")
        references = [None if r is None else torch.as_tensor(r) for r in references]
        generators = _generators(generator, seed, count)
        if scheduler is not None:
            self.set_scheduler(scheduler)
        for volume, ref in zip(volumes, references, strict=True):
            self._validate(volume, ref, strength)
        guidance_scale = self.resolve_guidance_scale(guidance_scale)
        total = sum(v.shape[0] for v in volumes)
        slice_batch_size = self.resolve_slice_batch_size(slice_batch_size, total)
        device = self.unet.device
        removed = None if keep is None else selection_to_removed(keep, self.config.num_classes)
        volumes = [v.to(device=device, dtype=torch.long) for v in volumes]
        timesteps = self.set_timesteps(num_inference_steps, strength, device=device)
        # one scheduler per volume: multistep solvers keep a history, and the step index, per volume
        schedulers = [self.scheduler] + [copy.deepcopy(self.scheduler) for _ in volumes[1:]]
        out_channels = self.unet.config.out_channels

        xs = []
        for volume, ref, gen, sched in zip(volumes, references, generators, schedulers, strict=True):
            shape = (volume.shape[0], out_channels, *volume.shape[1:])
            noise = correlated_noise(shape, noise_correlation, gen).to(device)
            if strength < 1.0:
                ref = ref.to(device=device, dtype=torch.float32)[:, None]
                xs.append(ref if len(timesteps) == 0 else sched.add_noise(ref, noise, timesteps[:1]))
            else:
                xs.append(noise * sched.init_noise_sigma)
        if len(timesteps) == 0:  # λ too small to reach a timestep: the references are the answer
            done_volumes = [x[:, 0].float().cpu() for x in xs]
            return _output(done_volumes, output_type, timesteps=[], start=-1)

        steps, done = len(timesteps), 0
        for i, t in enumerate(timesteps):

            def on_chunk(n: int, step: int = i) -> None:
                nonlocal done
                done += n
                if callback is not None:
                    callback(Progress(step=step, steps=steps, slices_done=done, slices_total=steps * total))

            model_inputs = [sched.scale_model_input(x, t) for sched, x in zip(schedulers, xs, strict=True)]
            eps_all = self.predict_noise(
                model_inputs[0] if count == 1 else torch.cat(model_inputs),
                t,
                volumes,
                removed=removed,
                slice_batch_size=slice_batch_size,
                autocast_dtype=autocast_dtype,
                on_chunk=on_chunk,
                guidance_scale=guidance_scale,
            )
            eps_parts = eps_all.split([v.shape[0] for v in volumes])
            for k, (sched, model_input, eps, gen) in enumerate(
                zip(schedulers, model_inputs, eps_parts, generators, strict=True)
            ):
                if x0_smoothing > 0:
                    eps = self._smooth_x0(eps, model_input, t, x0_smoothing)
                xs[k] = scheduler_step(sched, eps, t, xs[k], gen)
        results = [x[:, 0].float().clamp(-1.0, 1.0).cpu() for x in xs]
        return _output(results, output_type, timesteps=[int(t) for t in timesteps], start=int(timesteps[0]))


def _per_volume(value: Any, count: int, several: bool, name: str) -> list[Any]:
    """``value`` (``None``, one item, or with several volumes a list) as one entry per volume."""
    if value is None:
        return [None] * count
    if not several:
        return [value]
    if not isinstance(value, list | tuple) or len(value) != count:
        raise VolgenError(f"{name}: give a list with one per volume ({count}) when labels is a list")
    return list(value)


def _generators(generator: Any, seed: Any, count: int) -> list[torch.Generator]:
    """One generator per volume: the ones given, or fresh CPU generators seeded ``seed`` (+ i), or a list."""
    if generator is not None:
        generators = list(generator) if isinstance(generator, list | tuple) else [generator]
        if len(generators) != count:
            raise VolgenError(f"generator: give one per volume ({count}), got {len(generators)}")
        return generators
    if isinstance(seed, list | tuple):
        if len(seed) != count:
            raise VolgenError(f"seed: give one per volume ({count}), got {len(seed)}")
        seeds = [int(s) for s in seed]
    else:
        base = 0 if seed is None else int(seed)
        seeds = [base + i for i in range(count)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _output(volumes: list[Tensor], output_type: str, *, timesteps: list[int], start: int):
    converted = volumes if output_type == "pt" else [v.numpy() for v in volumes]
    return VolumeGenerationOutput(
        volume=converted[0], volumes=converted, timesteps=timesteps, start_timestep=start
    )


def _load_parts(folder) -> tuple[object, object, dict]:
    """UNet (safetensors), noise schedule and pipeline settings of a ``save_pretrained`` folder."""
    import json

    from volgen.models import check_safe_folder

    if not folder.is_dir():
        raise VolgenError(f"{folder}: not a folder")
    check_safe_folder(folder)
    try:
        config = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        schedule = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VolgenError(f"{folder}: cannot load the pipeline ({first})") from None
    keys = ("encoding", "context_slices", "num_classes", "slice_axis")
    settings = {k: config[k] for k in keys if isinstance(config, dict) and k in config}
    return unet.float().eval(), schedule, settings


def _chunks(num_slices: int, slice_batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the UNet chunks over ``num_slices`` slices."""
    return [(s, min(s + slice_batch_size, num_slices)) for s in range(0, num_slices, slice_batch_size)]


def _padded(n: int) -> int:
    """Slices a chunk of ``n`` costs: it is padded up to a multiple of :data:`BATCH_GRANULE`."""
    return n + (-n % BATCH_GRANULE)
