"""Volume sampling: a segmentation-guided 2D diffusion model run over a whole volume, slice by slice.

The pipeline knows tensors only (no paths, no SimpleITK). Its input is a volume of class indices
``(Z, H, W)`` in the model's slicing frame (slices along the model's slice axis first, each ``H x W`` of the
model's slice size); its output is the generated volume ``(Z, H, W)`` in model space [-1, 1].

Per step the UNet runs over the slices in chunks of ``slice_batch_size`` and ``scheduler.step`` runs once on
the whole volume: multistep schedulers keep one history and stochastic ones draw one noise tensor for the
volume, so the result does not depend on the chunk size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from torch import Tensor

from volgen.conditioning import (
    ConditionLayout,
    condition_slices,
    condition_vector,
    selection_to_removed,
    specified_from_removed,
    unet_condition,
)
from volgen.errors import VolgenError

logger = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = ("ddpm", "ddim", "dpmsolver++", "euler")
DEFAULT_SCHEDULER = "dpmsolver++"
DEFAULT_STEPS = 20
DEFAULT_NOISE_CORRELATION = 0.99
DEFAULT_X0_SMOOTHING = 0.0
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
        volume: ``(Z, H, W)`` float32 on the CPU, model space [-1, 1].
        timesteps: The timesteps that were run (fewer than the schedule's when ``strength < 1``).
        start_timestep: The noise level the run started from (``t*``; -1 when nothing was denoised).
    """

    volume: Tensor
    timesteps: list[int] = field(default_factory=list)
    start_timestep: int = -1


def make_scheduler(name: str, config: dict):
    """An inference scheduler by name, built from the model's training schedule (same betas, same T).

    ``ddim`` runs with η = 0; ``dpmsolver++`` is the multistep DPM-Solver++ (order 2). Timesteps are spaced
    "trailing" so the first step starts from pure noise at t = T-1 even with few steps. DDPM and DDIM clip
    their x0 prediction to [-1, 1] (``clip_sample`` of the training schedule) and DPM-Solver++ thresholds it
    the same way: with linear betas ᾱ_T ≈ 4e-5, so the x0 predicted at the first steps is ill-conditioned and
    unclipped it turns a short schedule into noise. Euler has no such option; it needs a well-trained model.
    """
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if name == "ddpm":
        return DDPMScheduler.from_config(base, timestep_spacing="trailing")
    if name == "ddim":
        return DDIMScheduler.from_config(base, timestep_spacing="trailing", set_alpha_to_one=True)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            base,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            thresholding=True,  # clip x0 predictions to model space [-1, 1], like DDPM/DDIM's clip_sample
            sample_max_value=1.0,
        )
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    raise VolgenError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


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
    channels) and ``scheduler`` (the training noise schedule). The scalar settings (encoding, 2.5D context,
    class names, slice axis) are part of the pipeline's config and round-trip through ``save_pretrained``.
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

    def _validate(
        self, labels: Tensor, reference: Tensor | None, strength: float, slice_batch_size: int
    ) -> None:
        size = self.unet.config.sample_size
        if labels.ndim != 3 or tuple(labels.shape[1:]) != (size, size):
            raise VolgenError(f"labels must be (Z, {size}, {size}) class indices, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
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
        if slice_batch_size < 1:
            raise VolgenError(f"slice_batch_size must be >= 1, got {slice_batch_size}")

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

    @torch.no_grad()
    def __call__(
        self,
        labels: Tensor,
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        slice_batch_size: int = 16,
        noise_correlation: float = DEFAULT_NOISE_CORRELATION,
        x0_smoothing: float = DEFAULT_X0_SMOOTHING,
        keep: Sequence[int] | None = None,
        reference: Tensor | None = None,
        strength: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        callback: Callable[[Progress], None] | None = None,
        output_type: str = "pt",
    ) -> VolumeGenerationOutput:
        """Generate a volume.

        Args:
            labels: ``(Z, H, W)`` integer class indices in the model's slicing frame (``H = W`` = slice size).
            num_inference_steps: Denoising steps over the full schedule (λ < 1 runs the last ``≈λ·N``).
            generator: Source of all randomness; ``seed`` makes one when it is ``None``.
            seed: Seed for a fresh CPU generator (ignored when ``generator`` is given).
            scheduler: ``ddpm``, ``ddim`` (η = 0), ``dpmsolver++`` or ``euler``.
            slice_batch_size: Slices per UNet forward; does not change the result.
            noise_correlation: ρ of the initial noise along the slice axis.
            x0_smoothing: σ (in slices) of a Gaussian applied along the slice axis to the clean-image (x0)
                prediction at every step, before the scheduler uses it; 0 turns it off.
            keep: Foreground class indices kept in the condition (the rest become background); ``None``: all.
            reference: ``(Z, H, W)`` real image in model space [-1, 1], registered to ``labels`` (for λ).
            strength: λ in [0, 1]: 0 returns ``reference``, 1 generates freely.
            autocast_dtype: ``torch.float16``/``torch.bfloat16`` to run the UNet under autocast (CUDA).
            callback: Called with a :class:`Progress` after every UNet chunk.
            output_type: ``"pt"`` (a CPU tensor) or ``"np"`` (a numpy array).

        Returns:
            :class:`VolumeGenerationOutput` with the volume in model space.
        """
        self._validate(labels, reference, strength, slice_batch_size)
        device = self.unet.device
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        num_classes = self.config.num_classes
        removed = None if keep is None else selection_to_removed(keep, num_classes)
        layout = self.condition_layout
        padding = layout.context_padding if layout is not None else "background"
        vector = self.condition_for(removed, 1)  # (1, D): the same for every slice
        labels = labels.to(device)

        sched = make_scheduler(scheduler, self.scheduler.config)
        sched.set_timesteps(num_inference_steps, device=device)
        timesteps = sched.timesteps
        total_t = self.scheduler.config.num_train_timesteps
        t_star = round(strength * total_t)
        if strength < 1.0:
            timesteps = timesteps[timesteps <= t_star]
        z = labels.shape[0]
        shape = (z, self.unet.config.out_channels, *labels.shape[1:])
        noise = correlated_noise(shape, noise_correlation, generator).to(device)

        if strength < 1.0:
            ref = reference.to(device=device, dtype=torch.float32)[:, None]
            if len(timesteps) == 0:
                out = ref[:, 0].float().cpu()
                return VolumeGenerationOutput(volume=out if output_type == "pt" else out.numpy())
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(len(sched.timesteps) - len(timesteps))
            x = sched.add_noise(ref, noise, timesteps[:1])
        else:
            x = noise * sched.init_noise_sigma

        steps = len(timesteps)
        slices_total = steps * z
        done = 0
        use_autocast = autocast_dtype is not None and device.type != "cpu"
        for i, t in enumerate(timesteps):
            model_input = sched.scale_model_input(x, t)
            eps = torch.empty_like(x)
            for start in range(0, z, slice_batch_size):
                stop = min(start + slice_batch_size, z)
                index = torch.arange(start, stop, device=device)
                cond = condition_slices(
                    labels,
                    index,
                    num_classes=num_classes,
                    encoding=self.config.encoding,
                    context_slices=self.config.context_slices,
                    removed=removed,
                    padding=padding,
                )
                cond = unet_condition(cond, None if vector is None else vector.expand(stop - start, -1))
                cond = cond.to(model_input.dtype)
                unet_in = torch.cat([model_input[start:stop], cond], dim=1)
                pad = -(stop - start) % BATCH_GRANULE
                if pad:
                    unet_in = torch.cat([unet_in, unet_in.new_zeros(pad, *unet_in.shape[1:])])
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                    if device.type == "cpu":  # fixed-size forwards: see BATCH_GRANULE
                        out = torch.cat([self.unet(part, t).sample for part in unet_in.split(BATCH_GRANULE)])
                    else:
                        out = self.unet(unet_in, t).sample
                eps[start:stop] = out[: stop - start].float()
                done += stop - start
                if callback is not None:
                    callback(Progress(step=i, steps=steps, slices_done=done, slices_total=slices_total))
            if x0_smoothing > 0:
                eps = self._smooth_x0(eps, model_input, t, x0_smoothing)
            x = sched.step(eps, t, x, generator=generator).prev_sample
        volume = x[:, 0].float().clamp(-1.0, 1.0).cpu()
        return VolumeGenerationOutput(
            volume=volume if output_type == "pt" else volume.numpy(),
            timesteps=[int(t) for t in timesteps],
            start_timestep=int(timesteps[0]),
        )
