"""Volume sampling: a segmentation-guided 2D diffusion model run over a whole volume, slice by slice.

The pipeline knows tensors only (no paths, no SimpleITK). Its input is a volume of class indices
``(Z, H, W)`` in the model's slicing frame (slices along the model's slice axis first, each ``H x W`` of the
model's slice size), or with ``slice_axes`` an ``(X, Y, Z)`` cube sliced along another axis at each step; its
output is the generated volume in the same layout, in model space [-1, 1].

The pipeline holds the model (``unet``, ``scheduler``, the condition settings in its config), resolves a
call's settings once into a :class:`~volgen.sampling.SamplingPlan` (:meth:`SegmentationToVolumePipeline.plan`)
and executes it with the one denoising loop (:func:`volgen.sampling.denoise`) and the one denoiser
(:class:`volgen.denoiser.Denoiser`).

Several volumes (samples of one segmentation with other seeds, or other segmentations) can be generated in
one call: their slices are stacked so every UNet forward serves all of them, while each volume keeps its own
noise, generator, scheduler state and conditioning (its 2.5D context never reaches into another volume). On
the CPU each volume is bitwise the one a call for it alone gives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from volgen import defaults, sampling
from volgen.conditioning import ConditionLayout, model_axes, selection_to_removed
from volgen.denoiser import BATCH_GRANULE, UNGUIDED, Denoiser, uses_channels_last
from volgen.errors import VolgenError
from volgen.sampling import Progress, SamplingPlan, correlated_noise, denoise, smooth_through_plane
from volgen.schedulers import NOISE_SCHEDULE_KEYS, make_scheduler, scheduler_step

__all__ = [
    "BATCH_GRANULE",
    "NOISE_SCHEDULE_KEYS",
    "Progress",
    "SamplingPlan",
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
        pixel_spacing: float | None = None,
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
        if pixel_spacing is not None:  # a native-resolution model: whole slices of any size (volgen.frames)
            self.register_to_config(pixel_spacing=float(pixel_spacing))

    @property
    def condition_layout(self) -> ConditionLayout | None:
        """The model's :class:`~volgen.conditioning.ConditionLayout` (``None``: mask channels only)."""
        condition = self.config.get("condition")
        return None if condition is None else ConditionLayout.model_validate(condition)

    def condition_for(self, removed: Tensor | None, batch: int, axis: int | None = None) -> Tensor | None:
        """The ``(batch, D)`` condition vector: kept classes specified, dropped ones not (or ``None``)."""
        return self.denoiser().vector(removed, batch, axis)

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

        from volgen.models import METADATA_FILE, load_model

        folder = Path(folder)
        if (folder / METADATA_FILE).is_file():  # a volgen model folder: load it with all its checks
            loaded = load_model(folder)
            schedule = scheduler if scheduler is not None else loaded.scheduler
            pipe = build_pipeline(loaded.unet, schedule, loaded.metadata)
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
        self, slice_batch_size: int | str, num_slices: int, *, budget_bytes: int | None = None, plane=None
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
            slice_size=int(config.sample_size) if plane is None else plane,
            condition_channels=int(config.in_channels) - int(config.out_channels),
            block_channels=tuple(config.block_out_channels),
            cap=defaults.AUTO_SLICE_BATCH_CPU if device.type == "cpu" else defaults.AUTO_SLICE_BATCH_GPU,
        )

    def plan(
        self,
        num_slices: int,
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        strength: float = 1.0,
        slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] = defaults.GUIDANCE_INTERVAL,
        slice_axes: Sequence[str] | None = None,
        noise_correlation: float = DEFAULT_NOISE_CORRELATION,
        fine_noise_correlation: float | str = defaults.FINE_NOISE_CORRELATION,
        background_fine_noise_correlation: float | None = defaults.BACKGROUND_FINE_NOISE_CORRELATION,
        x0_smoothing: float = DEFAULT_X0_SMOOTHING,
        autocast_dtype: torch.dtype | None = None,
        budget_bytes: int | None = None,
    ) -> SamplingPlan:
        """Resolve a run over ``num_slices`` slices per step (all its volumes) into a :class:`SamplingPlan`.

        The one place settings become a run: timesteps after λ (:meth:`set_timesteps`, which also sets them
        on ``self.scheduler``), the guidance of each step (:meth:`resolve_guidance_scale`), the slicing axis
        of each step, the slice batch (:meth:`resolve_slice_batch_size`). Dry runs, memory and time
        estimates, progress totals and sidecars read the plan.

        Args:
            guidance_interval: ``(start, stop)``: guidance runs on the steps whose position ``k / N`` in the
                full schedule of ``N`` steps is in ``[start, stop)`` (0: the noisiest step); the others are
                one unguided pass.
            slice_axes: The slicing axis of every step of the full schedule (multi-axis sampling; labels are
                then ``(X, Y, Z)`` RAS cubes); ``None``: the volumes' own slices.
        """
        timesteps = self.set_timesteps(num_inference_steps, strength)
        steps = len(timesteps)
        if slice_axes is not None and len(slice_axes) != num_inference_steps:
            raise VolgenError(f"give one slice axis per step ({num_inference_steps}), got {len(slice_axes)}")
        axes = (None,) * steps if slice_axes is None else tuple(slice_axes)[len(slice_axes) - steps :]
        guidance = self.resolve_guidance_scale(guidance_scale)
        start, stop = guidance_interval
        if not 0.0 <= start <= stop <= 1.0:
            raise VolgenError(
                f"guidance interval must satisfy 0 <= start <= stop <= 1, got {guidance_interval}"
            )
        first = num_inference_steps - steps  # the position of the first step run in the full schedule
        positions = [(first + i) / num_inference_steps for i in range(steps)]
        return SamplingPlan(
            timesteps=tuple(t.item() for t in timesteps),
            guidance=tuple(guidance if start <= k < stop else UNGUIDED for k in positions),
            axes=axes,
            primary=None if slice_axes is None else slice_axes[0],
            slice_batch_size=self.resolve_slice_batch_size(
                slice_batch_size, num_slices, budget_bytes=budget_bytes
            ),
            num_slices=num_slices,
            device=str(self.unet.device),
            autocast_dtype=autocast_dtype,
            num_inference_steps=num_inference_steps,
            strength=strength,
            noise_correlation=noise_correlation,
            fine_noise_correlation=sampling.fine_rho_for(fine_noise_correlation, noise_correlation),
            x0_smoothing=x0_smoothing,
            background_fine_noise_correlation=background_fine_noise_correlation,
        )

    def slice_forwards(self, num_slices: int, **settings) -> int:
        """UNet slice-forwards a run over ``num_slices`` slices costs (:attr:`SamplingPlan.forwards`: steps
        run × slices padded per chunk, × 2 when guided); ``settings`` as for :meth:`plan`.

        ``num_slices`` counts every volume of the run: volumes generated together share their chunks.
        """
        return self.plan(num_slices, **settings).forwards

    def denoiser(self, autocast_dtype: torch.dtype | None = None) -> Denoiser:
        """The :class:`~volgen.denoiser.Denoiser` of this pipeline's UNet and condition settings."""
        return Denoiser(
            self.unet,
            num_classes=self.config.num_classes,
            encoding=self.config.encoding,
            context_slices=self.config.context_slices,
            layout=self.condition_layout,
            slice_axis=self.config.slice_axis,
            autocast_dtype=autocast_dtype,
            channels_last=uses_channels_last(self.unet.device, autocast_dtype),
        )

    def _validate(self, labels: Tensor, reference: Tensor | None, strength: float, cube: bool) -> None:
        size = self.unet.config.sample_size
        if cube and tuple(labels.shape) != (size, size, size):
            raise VolgenError(f"labels must be a ({size}, {size}, {size}) cube, got {tuple(labels.shape)}")
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.config.get("pixel_spacing") is not None and not cube:  # native: whole slices of any size
            if labels.ndim != 3 or labels.shape[1] % factor or labels.shape[2] % factor:
                raise VolgenError(f"labels must be (Z, H, W), H and W multiples of {factor}: {labels.shape}")
        elif labels.ndim != 3 or tuple(labels.shape[1:]) != (size, size):
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
        guidance_scale: float | None = UNGUIDED,
    ) -> Tensor:
        """The UNet's output for a volume (or stack of volumes) at timestep ``t``: the settings resolved
        (:meth:`resolve_slice_batch_size`, :meth:`resolve_guidance_scale`), then
        :meth:`volgen.denoiser.Denoiser.predict` (see there for the arguments)."""
        return self.denoiser(autocast_dtype).predict(
            model_input,
            t,
            labels,
            slice_batch_size=self.resolve_slice_batch_size(slice_batch_size, model_input.shape[0]),
            removed=removed,
            guidance_scale=self.resolve_guidance_scale(guidance_scale),
            axis=axis,
            on_chunk=on_chunk,
        )

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
        fine_noise_correlation: float | str = defaults.FINE_NOISE_CORRELATION,
        background_fine_noise_correlation: float | None = defaults.BACKGROUND_FINE_NOISE_CORRELATION,
        x0_smoothing: float = DEFAULT_X0_SMOOTHING,
        keep: Sequence[int] | None = None,
        reference: Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | None = None,
        strength: float = 1.0,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] = defaults.GUIDANCE_INTERVAL,
        slice_axes: Sequence[str] | None = None,
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
                a tensor or a numpy array; or a list or tuple of them (``Z`` may differ), one per volume. With
                ``slice_axes``: ``(X, Y, Z)`` RAS cubes of ``slice_size`` along every axis.
            num_inference_steps: Denoising steps over the full schedule (λ < 1 runs the last ``≈λ·N``).
            generator: Source of all randomness (a list: one per volume); ``seed`` makes them when ``None``.
            seed: Seed for a fresh CPU generator (ignored when ``generator`` is given); for several volumes a
                list, one per volume, or one number: volume ``i`` uses ``seed + i``.
            scheduler: Convenience: ``pipe.set_scheduler(scheduler)`` before the run (it stays set).
                ``None`` uses ``self.scheduler`` as it is.
            slice_batch_size: Slices per UNet forward, or ``"auto"`` (:meth:`resolve_slice_batch_size`; the
                slices of all volumes count); does not change the result.
            noise_correlation: ρ of the initial noise along the (first) slice axis (its coarse scales).
            fine_noise_correlation: ρ of its fine in-plane scales (:func:`volgen.sampling.correlated_noise`).
            background_fine_noise_correlation: The fine ρ in the background, away from every kept class
                (:func:`volgen.sampling.background_weight`); ``None``: ``fine_noise_correlation`` everywhere.
            x0_smoothing: σ (in slices) of a Gaussian applied along each step's slice axis to the clean-image
                (x0) prediction, before the scheduler uses it; 0 turns it off.
            keep: Foreground class indices kept in the condition (the rest become background); ``None``: all.
            reference: Real image in model space [-1, 1], registered to ``labels`` and in their layout (for
                λ); a list, one per volume, with a list of labels.
            strength: λ in [0, 1]: 0 returns ``reference``, 1 generates freely.
            guidance_scale: Classifier-free guidance ``w`` towards the condition (1: off, one UNet pass per
                step; ``None``: :data:`volgen.defaults.GUIDANCE_SCALE` for a model with "specified" flags, off
                for older models; see :meth:`resolve_guidance_scale`).
            guidance_interval: ``(start, stop)``: the steps guided, by position in the schedule (see
                :meth:`plan`; default :data:`volgen.defaults.GUIDANCE_INTERVAL`, the last 30 %).
            slice_axes: Multi-axis sampling: the slicing axis of every step of the full schedule
                (:func:`volgen.multiaxis.axis_schedule`; its length is ``num_inference_steps``).
            autocast_dtype: ``torch.float16``/``torch.bfloat16`` to run the UNet under autocast (CUDA;
                on the CPU ``torch.bfloat16``, with channels-last input: see
                :func:`volgen.denoiser.uses_channels_last`).
            callback: Called with a :class:`Progress` after every UNet chunk (slices of all volumes).
            output_type: ``"pt"`` (CPU tensors) or ``"np"`` (numpy arrays).

        Returns:
            :class:`VolumeGenerationOutput` with the volume(s) in model space.
        """
        if scheduler is not None:
            self.set_scheduler(scheduler)
        volumes = labels if isinstance(labels, list | tuple) else [labels]
        plan = self.plan(
            sum(int(v.shape[0]) if getattr(v, "ndim", 0) else 0 for v in volumes),
            num_inference_steps=num_inference_steps,
            strength=strength,
            slice_batch_size=slice_batch_size,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            slice_axes=slice_axes,
            noise_correlation=noise_correlation,
            fine_noise_correlation=fine_noise_correlation,
            background_fine_noise_correlation=background_fine_noise_correlation,
            x0_smoothing=x0_smoothing,
            autocast_dtype=autocast_dtype,
        )
        return self.run(
            plan,
            labels,
            generator=generator,
            seed=seed,
            reference=reference,
            keep=keep,
            callback=callback,
            output_type=output_type,
        )

    @torch.no_grad()
    def run(
        self,
        plan: SamplingPlan,
        labels: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        reference: Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | None = None,
        keep: Sequence[int] | None = None,
        callback: Callable[[Progress], None] | None = None,
        output_type: str = "pt",
    ) -> VolumeGenerationOutput:
        """Execute a :meth:`plan` with ``self.scheduler``: check the inputs against it, then run the one
        denoising loop (:func:`volgen.sampling.denoise`). Arguments as for :meth:`__call__`."""
        several = isinstance(labels, list | tuple)
        volumes = [torch.as_tensor(v) for v in labels] if several else [torch.as_tensor(labels)]
        count = len(volumes)
        if count == 0:
            raise VolgenError("labels: give at least one volume")
        references = _per_volume(reference, count, several, "reference")
        references = [None if r is None else torch.as_tensor(r) for r in references]
        generators = _generators(generator, seed, count)
        for volume, ref in zip(volumes, references, strict=True):
            self._validate(volume, ref, plan.strength, cube=plan.primary is not None)
        if plan.primary is not None:
            self._check_axes([plan.primary, *plan.axes])
        if sum(v.shape[0] for v in volumes) != plan.num_slices:
            raise VolgenError(
                f"the plan is for {plan.num_slices} slices per step, the labels hold another count"
            )
        device = self.unet.device
        timesteps = self.set_timesteps(plan.num_inference_steps, plan.strength, device=device)
        removed = None if keep is None else selection_to_removed(keep, self.config.num_classes)
        results = denoise(
            plan,
            self.denoiser(plan.autocast_dtype),
            self.scheduler,
            timesteps,
            [v.to(device=device, dtype=torch.long) for v in volumes],
            generators,
            references=references,
            removed=removed,
            out_channels=self.unet.config.out_channels,
            callback=callback,
        )
        return _output(results, output_type, timesteps=list(plan.timesteps), start=plan.start_timestep)

    def _check_axes(self, slice_axes: Sequence[str]) -> None:
        """Refuse a slice axis the model was not trained on."""
        trained = model_axes(self.condition_layout, self.config.slice_axis)
        unknown = sorted(set(slice_axes) - set(trained))
        if unknown:
            raise VolgenError(
                f"the model was trained on {', '.join(trained)} slices, not {', '.join(unknown)}"
            )


def build_pipeline(unet: Any, scheduler: Any, metadata: Any, *, scheduler_name: str | None = None):
    """The pipeline of a UNet, a noise schedule and a :class:`~volgen.models.ModelMetadata`'s pipeline
    settings (the one place it is assembled: loading, training previews and generation all use it).

    Args:
        scheduler_name: A sampler name (:data:`volgen.defaults.SCHEDULERS`); ``None`` keeps ``scheduler``.
    """
    from volgen.models import pipeline_settings

    pipe = SegmentationToVolumePipeline(unet=unet, scheduler=scheduler, **pipeline_settings(metadata))
    if scheduler_name is not None:
        pipe.set_scheduler(scheduler_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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

    from volgen.models import check_safe_folder, load_unet_and_schedule

    if not folder.is_dir():
        raise VolgenError(f"{folder}: not a folder")
    check_safe_folder(folder)
    try:
        config = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VolgenError(f"{folder}: cannot load the pipeline ({first})") from None
    unet, schedule = load_unet_and_schedule(folder)
    keys = ("encoding", "context_slices", "num_classes", "slice_axis")
    settings = {k: config[k] for k in keys if isinstance(config, dict) and k in config}
    return unet, schedule, settings
