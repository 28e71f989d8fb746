"""The denoising loop, and the plan it reads.

A run is resolved once into a :class:`SamplingPlan` (timesteps after λ, guidance and slicing axis per step,
slice batch, precision, the number of network forwards); :func:`denoise` executes it. Single-axis sampling and
multi-axis sampling (``cycle``, ``late``: :func:`volgen.multiaxis.axis_schedule`) are the same loop: the plan
says which axis each step slices along, and a :class:`StackFrame` reslices the state for that step.

Per step the network runs over the slices of every volume in chunks (:meth:`volgen.denoiser.Denoiser.predict`)
and ``scheduler.step`` runs once per volume on the whole volume: multistep schedulers keep one history and
stochastic ones draw one noise tensor per volume (the SDE DPM-Solver's correlated between slices like the
initial noise; DDPM's step draws its own, independent per slice), so the result does not depend on the chunk
size, and on the CPU each volume of a stack is bitwise the one a run for it alone gives.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from volgen import defaults
from volgen.denoiser import UNGUIDED, Denoiser, chunks, padded_slices
from volgen.errors import VolgenError
from volgen.frames import ModelFrame, slices_to_volume, volume_to_slices
from volgen.schedulers import scheduler_step

__all__ = [
    "Progress",
    "SamplingPlan",
    "StackFrame",
    "background_rho_for",
    "background_weight",
    "correlated_noise",
    "denoise",
    "noise_rhos",
    "smooth_through_plane",
    "smooth_x0",
    "volume_noise",
]


@dataclass(frozen=True)
class Progress:
    """One progress report: ``slices_done`` of ``slices_total`` slice-forwards over all steps."""

    step: int
    steps: int
    slices_done: int
    slices_total: int


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a run does, resolved once from the settings and the model.

    Attributes:
        timesteps: The timesteps denoised (after λ: only those ``<= t*``; empty when none is reached).
        guidance: The classifier-free guidance ``w`` of each step (1: one pass, unguided).
        axes: The slicing axis of each step; ``None`` entries slice the volumes as given (single-axis).
        primary: The axis the state is kept along (the first of the full axis schedule; ``None``:
            single-axis).
        slice_batch_size: Slices per chunk (all volumes together).
        num_slices: Slices per step, all volumes together.
        device: Where the network runs.
        autocast_dtype: Autocast dtype of the network (``None``: float32).
        num_inference_steps: Steps of the full schedule.
        strength: λ.
        noise_correlation: ρ of the initial noise along the primary axis (its coarse scales).
        fine_noise_correlation: ρ of the initial noise's fine in-plane scales (:func:`correlated_noise`).
        x0_smoothing: σ (slices) of the through-plane smoothing of the x0 prediction (0: off).
        background_fine_noise_correlation: The fine ρ in the background, away from every labelled class
            (:func:`background_weight`); ``None``: ``fine_noise_correlation`` everywhere.
    """

    timesteps: tuple[int, ...]
    guidance: tuple[float, ...]
    axes: tuple[str | None, ...]
    primary: str | None
    slice_batch_size: int
    num_slices: int
    device: str
    autocast_dtype: torch.dtype | None
    num_inference_steps: int
    strength: float
    noise_correlation: float
    fine_noise_correlation: float
    x0_smoothing: float
    background_fine_noise_correlation: float | None = None

    @property
    def background_rho(self) -> float | None:
        """The background's own fine ρ where it differs from the fine ρ, else ``None`` (one noise)."""
        value = self.background_fine_noise_correlation
        return None if value == self.fine_noise_correlation else value

    @property
    def steps(self) -> int:
        """Steps that run."""
        return len(self.timesteps)

    @property
    def start_timestep(self) -> int:
        """Where denoising starts (``t*``; -1 when nothing is denoised)."""
        return self.timesteps[0] if self.timesteps else -1

    @property
    def guidance_scale(self) -> float:
        """The guidance of the guided steps (1 when no step is guided)."""
        return next((w for w in self.guidance if w != UNGUIDED), UNGUIDED)

    @property
    def passes(self) -> tuple[int, ...]:
        """Network passes of each step: 2 where guided (conditional and unconditional), else 1."""
        return tuple(1 if w == UNGUIDED else 2 for w in self.guidance)

    @property
    def forwards(self) -> int:
        """Slice-forwards of the network over the run (chunks padded to whole granules, × 2 when guided)."""
        padded = sum(
            padded_slices(stop - start) for start, stop in chunks(self.num_slices, self.slice_batch_size)
        )
        return padded * sum(self.passes)


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


def smooth_x0(eps: Tensor, model_input: Tensor, t: Tensor, sigma: float, scheduler) -> Tensor:
    """Smooth the x0 prediction through-plane and return the network output that predicts it.

    ``model_input`` is the noisy volume in the variance-preserving scaling the network sees (every
    scheduler's ``scale_model_input`` maps its own parametrisation to it), so
    ``x0 = (x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t)`` holds for all of them (``v`` is mapped the same way).
    """
    alpha = scheduler.alphas_cumprod[int(t)].to(eps.device, torch.float32)
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    x_t = model_input.float()
    if scheduler.config.prediction_type == "v_prediction":  # eps holds v = a·ε - s·x0
        x0 = smooth_through_plane((a * x_t - s * eps).clamp(-1.0, 1.0), sigma)
        return a * (x_t - a * x0) / s - s * x0
    x0 = (x_t - s * eps) / a
    x0 = smooth_through_plane(x0.clamp(-1.0, 1.0), sigma)
    return (x_t - a * x0) / s


def fine_rho_for(value: float | str, rho: float, frame: ModelFrame | None = None, labels=None) -> float:
    """The fine-scale ρ of a run: ``value`` itself, or for ``"auto"`` the one the model ``frame``'s table
    (:attr:`~volgen.frames.ModelFrame.fine_noise_by_spacing`: :data:`volgen.defaults.FINE_NOISE_BY_SPACING`,
    or ``NATIVE_FINE_NOISE_BY_SPACING`` for a native frame) gives for the spacing of the ``labels``' slices
    (no frame, as for bare tensors: ``rho``, one ρ at every scale)."""
    if value != defaults.AUTO_FINE_NOISE:
        return float(value)
    if frame is None or labels is None:
        return rho
    spacings, rhos = zip(*frame.fine_noise_by_spacing, strict=True)
    return float(np.interp(frame.slice_spacing(labels), spacings, rhos))


def background_rho_for(
    value: float | str | None, fine: float, frame: ModelFrame | None = None, labels=None
) -> float | None:
    """The background's own fine ρ of a run (:func:`background_weight`), ``None`` for none (the fine ρ
    everywhere): ``value`` itself, or for ``"auto"`` by the ratio of the ``labels``' slice spacing to the
    model ``frame``'s in-plane pixel (:data:`volgen.defaults.BACKGROUND_AUTO_RATIOS`: ``fine`` at half a
    pixel or less, 0 from a pixel on; no frame, as for bare tensors: ``None``)."""
    if value is None or value == defaults.SAME_FINE_NOISE:
        return None
    if value != defaults.AUTO_FINE_NOISE:
        return float(value)
    if frame is None or labels is None:
        return None
    ratio = frame.slice_spacing(labels) / frame.pixel(labels)[0]
    return float(np.interp(ratio, defaults.BACKGROUND_AUTO_RATIOS, (fine, 0.0)))


def noise_rhos(settings, frame: ModelFrame, labels) -> tuple[float, float | None]:
    """The fine ρ and the background's own fine ρ (:func:`fine_rho_for`, :func:`background_rho_for`) of a run
    of ``settings`` (:class:`volgen.generation.GenerateSettings`) over the segmentations ``labels``, which
    must agree (``auto`` follows each one's slice spacing)."""
    found = set()
    for segmentation in labels:
        fine = fine_rho_for(settings.fine_noise_correlation, settings.noise_correlation, frame, segmentation)
        air = background_rho_for(settings.background_fine_noise_correlation, fine, frame, segmentation)
        found.add((fine, air))
    if len(found) > 1:
        given = ", ".join(f"{fine:g} / {'same' if air is None else format(air, 'g')}" for fine, air in found)
        raise VolgenError(
            f"slice spacings give other fine ρ (fine / background: {given}): generate them apart, or "
            "set --rho-fine and --rho-fine-background"
        )
    return found.pop()


def correlated_noise(
    shape: Sequence[int],
    rho: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    fine_rho: float | None = None,
    scale: float = defaults.NOISE_SCALE,
) -> Tensor:
    """Gaussian noise for a whole volume ``(Z, C, H, W)``, correlated along the slice axis (dim 0).

    One ρ (``fine_rho`` ``None`` or equal to ``rho``): ``n[0] = e[0]``,
    ``n[z] = rho * n[z-1] + sqrt(1 - rho^2) * e[z]``: every slice has unit variance and neighbouring slices
    have correlation ``rho`` (0 gives independent slices).

    Two scales: the same recursion runs on each in-plane spatial frequency ``f`` (cycles per pixel) of the
    slices' 2D Fourier transform, with ``ρ(f) = fine_rho + (rho - fine_rho) · exp(-f² / (2 scale²))``: coarse
    structure is correlated with ``rho`` (no flicker of the anatomy's large shapes), fine detail with
    ``fine_rho`` (no texture copied from slice to slice). Every frequency keeps unit power, so each slice is
    still white Gaussian noise of unit variance, as the network expects.

    Drawn on the CPU from one generator, so the same seed gives the same noise on every device.
    """
    for name, value in (("noise correlation", rho), ("fine noise correlation", fine_rho)):
        if value is not None and not 0.0 <= value < 1.0:
            raise VolgenError(f"{name} must be in [0, 1), got {value}")
    e = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    if shape[0] < 2:
        return e
    if fine_rho is None or fine_rho == rho:
        if rho == 0.0:
            return e
        noise = torch.empty_like(e)
        noise[0] = e[0]
        keep = math.sqrt(1.0 - rho * rho)
        for z in range(1, shape[0]):
            noise[z] = rho * noise[z - 1] + keep * e[z]
        return noise
    height, width = shape[-2], shape[-1]
    f2 = torch.fft.fftfreq(height, dtype=torch.float64)[:, None] ** 2
    f2 = f2 + torch.fft.fftfreq(width, dtype=torch.float64)[None, :] ** 2
    r = fine_rho + (rho - fine_rho) * torch.exp(-f2 / (2.0 * scale * scale))
    keep = torch.sqrt(1.0 - r * r)
    spectrum = torch.fft.fft2(e.double())
    for z in range(1, shape[0]):
        spectrum[z] = r * spectrum[z - 1] + keep * spectrum[z]
    return torch.fft.ifft2(spectrum).real.to(dtype).contiguous()


def background_weight(
    labels: Tensor,
    removed: Tensor | None = None,
    *,
    margin: int = defaults.BACKGROUND_MARGIN,
    ramp: int = defaults.BACKGROUND_RAMP,
) -> Tensor:
    """How far each voxel of ``(Z, H, W)`` class indices is into the background, ``(Z, 1, H, W)`` in [0, 1]:
    0 within ``margin`` voxels (pixels, and slices) of a labelled voxel, 1 from ``margin + ramp`` voxels on,
    smooth in between. Background is class 0 and the ``removed`` classes (``(C,)`` bool, as
    :func:`volgen.conditioning.selection_to_removed` gives: shown as background)."""
    labelled = labels != 0
    if removed is not None:  # (C,) bool, True for the classes shown as background
        labelled &= ~removed.to(labels.device)[labels]
    near = labelled.float()[None, None]
    half = ramp // 2
    reach = margin + half
    if reach:
        near = torch.nn.functional.max_pool3d(near, 2 * reach + 1, stride=1, padding=reach)
    if half:  # the edges replicated: a volume may have fewer slices than the kernel
        near = torch.nn.functional.pad(near, (half,) * 6, mode="replicate")
        near = torch.nn.functional.avg_pool3d(near, 2 * half + 1, stride=1)
    return (1.0 - near[0, 0]).clamp(0.0, 1.0)[:, None]


def volume_noise(
    plan: SamplingPlan, shape: Sequence[int], generator: torch.Generator, background: Tensor | None
) -> Tensor:
    """The noise of a whole volume ``(Z, C, H, W)`` along the plan's primary axis (the initial noise, and a
    stochastic sampler's fresh noise of each step): :func:`correlated_noise` with the plan's ρ,
    and where ``background`` (:func:`background_weight`) is above 0 blended with noise of the background's
    fine ρ, drawn after it (``sqrt(1 - b)·n + sqrt(b)·n_bg``: unit variance everywhere; where ``b`` is 0
    the values the plan gives without a background)."""
    noise = correlated_noise(shape, plan.noise_correlation, generator, fine_rho=plan.fine_noise_correlation)
    if background is None or plan.background_rho is None:
        return noise
    other = correlated_noise(shape, plan.noise_correlation, generator, fine_rho=plan.background_rho)
    b = background.to(noise.dtype)
    return torch.where(b > 0, (1.0 - b).sqrt() * noise + b.sqrt() * other, noise)


@dataclass(frozen=True)
class StackFrame:
    """How the loop's state - each volume as ``(N, 1, H, W)`` slices along ``primary`` - is seen by a step.

    ``primary=None`` (single-axis): volumes are given as slices already and every step sees them as they are.
    Otherwise volumes are ``(X, Y, Z)`` RAS cubes and a step along ``axis`` sees them resliced along it
    (:func:`volgen.frames.volume_to_slices`).
    """

    primary: str | None = None

    def slices(self, volume: Tensor, axis: str | None) -> Tensor:
        """A volume as given -> ``(N, H, W)`` slices along ``axis``."""
        return volume if axis is None else volume_to_slices(volume, axis).contiguous()

    def volume(self, slices: Tensor) -> Tensor:
        """``(N, H, W)`` slices along ``primary`` -> the volume as given."""
        return slices if self.primary is None else slices_to_volume(slices, self.primary).contiguous()

    def view(self, state: Tensor, axis: str | None) -> Tensor:
        """The state ``(N, 1, H, W)`` along ``primary`` as slices along ``axis``."""
        if axis == self.primary:
            return state
        return self.slices(self.volume(state[:, 0]), axis)[:, None]

    def back(self, slices: Tensor, axis: str | None) -> Tensor:
        """Slices ``(N, 1, H, W)`` along ``axis`` as the state's slices along ``primary``."""
        if axis == self.primary:
            return slices
        return self.slices(slices_to_volume(slices[:, 0], axis), self.primary)[:, None]


def denoise(
    plan: SamplingPlan,
    denoiser: Denoiser,
    scheduler,
    timesteps: Tensor,
    labels: Sequence[Tensor],
    generators: Sequence[torch.Generator],
    *,
    references: Sequence[Tensor | None] | None = None,
    removed: Tensor | None = None,
    out_channels: int = 1,
    callback: Callable[[Progress], None] | None = None,
) -> list[Tensor]:
    """Run a plan: the one denoising loop of volgen.

    Args:
        plan: The run.
        denoiser: The network and its input.
        scheduler: The sampler (copied per volume: multistep solvers keep a history per volume).
        timesteps: The plan's timesteps as ``scheduler`` holds them (set for the run, on the device).
        labels: One volume of class indices (long, on the device) per generated volume, in the frame's
            layout (single-axis: ``(Z, H, W)`` slices; multi-axis: ``(X, Y, Z)`` cubes).
        generators: One per volume, the source of all its randomness.
        references: For λ < 1, one real volume per volume in model space (same layout as ``labels``).
        removed: Classes shown as background in the condition.
        out_channels: The network's output channels.
        callback: Called with a :class:`Progress` after every chunk (slices of all volumes).

    Returns:
        The volumes in model space, float32 on the CPU, in the frame's layout (clamped to [-1, 1] unless
        nothing was denoised: then the references as given).
    """
    frame = StackFrame(plan.primary)
    device = torch.device(plan.device)
    references = list(references) if references is not None else [None] * len(labels)
    if len(timesteps) != plan.steps:
        raise VolgenError(f"the scheduler holds {len(timesteps)} timesteps, the plan {plan.steps}")
    schedulers = [scheduler] + [copy.deepcopy(scheduler) for _ in labels[1:]]
    xs, backgrounds = [], []
    for volume, ref, gen, sched in zip(labels, references, generators, schedulers, strict=True):
        first = frame.slices(volume, plan.primary)
        background = None
        if plan.background_rho is not None:
            background = background_weight(first, removed).cpu()
        backgrounds.append(background)
        noise = volume_noise(plan, (first.shape[0], out_channels, *first.shape[1:]), gen, background)
        noise = noise.to(device)
        if plan.strength < 1.0:
            ref = frame.slices(ref.to(device=device, dtype=torch.float32), plan.primary)[:, None]
            xs.append(ref if not plan.steps else sched.add_noise(ref, noise, timesteps[:1]))
        else:
            xs.append(noise * sched.init_noise_sigma)
    if not plan.steps:  # λ too small to reach a timestep: the references are the answer
        return [frame.volume(x[:, 0].float()).cpu() for x in xs]

    along = {axis: [frame.slices(v, axis) for v in labels] for axis in dict.fromkeys(plan.axes)}
    done, total = 0, plan.steps * plan.num_slices
    for i, (t, axis, w) in enumerate(zip(timesteps, plan.axes, plan.guidance, strict=True)):

        def on_chunk(n: int, step: int = i) -> None:
            nonlocal done
            done += n
            if callback is not None:
                callback(Progress(step=step, steps=plan.steps, slices_done=done, slices_total=total))

        views = [frame.view(s.scale_model_input(x, t), axis) for s, x in zip(schedulers, xs, strict=True)]
        eps_parts = _predict(
            denoiser,
            views,
            t,
            along[axis],
            slice_batch_size=plan.slice_batch_size,
            removed=removed,
            guidance_scale=w,
            axis=_axis_code(denoiser, axis),
            on_chunk=on_chunk,
        )
        for k, (sched, view, eps, gen) in enumerate(
            zip(schedulers, views, eps_parts, generators, strict=True)
        ):
            if plan.x0_smoothing > 0:
                eps = smooth_x0(eps, view, t, plan.x0_smoothing, sched)
            noise = functools.partial(_step_noise, plan, xs[k], gen, backgrounds[k])
            xs[k] = scheduler_step(sched, frame.back(eps, axis), t, xs[k], gen, noise)
    return [frame.volume(x[:, 0].float().clamp(-1.0, 1.0)).cpu() for x in xs]


def _step_noise(
    plan: SamplingPlan, sample: Tensor, generator: torch.Generator, background: Tensor | None
) -> Tensor:
    """A stochastic sampler's fresh noise for one step, correlated between the slices like the initial noise
    (independent per slice, SDE DPM-Solver's own noise flickers along the slice axis)."""
    noise = volume_noise(plan, sample.shape, generator, background)
    return noise.to(device=sample.device, dtype=sample.dtype)


def _predict(
    denoiser: Denoiser, views: list[Tensor], t: Tensor, labels: list[Tensor], **settings
) -> list[Tensor]:
    """The network's output for each volume's view: volumes of one in-plane size share every chunk (those of
    native-resolution frames may differ in size: each size is its own stack)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, view in enumerate(views):
        groups.setdefault(tuple(view.shape[-2:]), []).append(k)
    out: list[Tensor] = list(views)
    for members in groups.values():
        stack = [views[k] for k in members]
        eps = denoiser.predict(
            stack[0] if len(stack) == 1 else torch.cat(stack), t, [labels[k] for k in members], **settings
        )
        for k, part in zip(members, eps.split([v.shape[0] for v in stack]), strict=True):
            out[k] = part
    return out


def _axis_code(denoiser: Denoiser, axis: str | None) -> int | None:
    """The axis code of a multi-axis model's condition vector (``None``: the model's own axis)."""
    layout = denoiser.layout
    if axis is None or layout is None or len(layout.axes) <= 1:
        return None
    return defaults.AXIS_NAMES.index(axis)
