"""Samplers by name: inference schedulers built from a model's training noise schedule.

One home for which diffusers scheduler each name of :data:`volgen.defaults.SCHEDULERS` means and how it is
configured (trailing timesteps, x0 thresholding, zero terminal SNR), and for one denoising step with or
without a generator. The pipeline (:mod:`volgen.pipeline`) and multi-axis sampling (:mod:`volgen.multiaxis`)
use these.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor

from volgen.defaults import SCHEDULERS
from volgen.errors import VolgenError

#: The keys of a scheduler config that describe the model's noise schedule (what training fixed). A sampler
#: chosen by name is built from these only, so it does not matter which sampler the config came from.
NOISE_SCHEDULE_KEYS: tuple[str, ...] = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
    "steps_offset",
    "clip_sample",
    "clip_sample_range",
)


def make_scheduler(name: str, config: dict):
    """An inference scheduler by name, built from the model's training schedule (same betas, same T).

    ``ddim`` runs with η = 0; ``dpmsolver++`` is the multistep DPM-Solver++ of order 2 (``dpmsolver++3m``:
    order 3; ``sde-dpmsolver++``: its stochastic variant); ``unipc`` is UniPC (order 2, with corrector) and
    ``deis`` DEIS (order 2). Timesteps are spaced "trailing" so the first step starts from pure noise at
    t = T-1 even with few steps. DDPM and DDIM clip their x0 prediction to [-1, 1] (``clip_sample`` of the
    training schedule) and the multistep solvers threshold it the same way: with linear betas ᾱ_T ≈ 4e-5, so
    the x0 predicted at the first steps is ill-conditioned and unclipped it turns a short schedule into noise.
    Euler has no such option; it needs a well-trained model. A zero-terminal-SNR schedule reaches each solver
    through its ``rescale_betas_zero_snr`` option, or (DEIS, which has none) as the rescaled betas themselves,
    with the last ᾱ clamped to 2⁻²⁴ as diffusers' multistep solvers do.

    Args:
        name: One of :data:`SCHEDULERS`.
        config: Any scheduler config of the model (only :data:`NOISE_SCHEDULE_KEYS` are used).
    """
    base = {k: v for k, v in dict(config).items() if k in NOISE_SCHEDULE_KEYS}
    x0_clip = {"thresholding": True, "sample_max_value": 1.0}  # like DDPM/DDIM's clip_sample
    if name == "ddpm":
        return DDPMScheduler.from_config(base, timestep_spacing="trailing")
    if name == "ddim":
        return DDIMScheduler.from_config(base, timestep_spacing="trailing", set_alpha_to_one=True)
    if name in ("dpmsolver++", "dpmsolver++3m", "sde-dpmsolver++"):
        return DPMSolverMultistepScheduler.from_config(
            base,
            algorithm_type="sde-dpmsolver++" if name == "sde-dpmsolver++" else "dpmsolver++",
            solver_order=3 if name == "dpmsolver++3m" else 2,
            timestep_spacing="trailing",
            **x0_clip,
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(base, timestep_spacing="trailing", **x0_clip)
    if name == "deis":
        if base.get("rescale_betas_zero_snr"):
            base = {**base, "trained_betas": _zero_snr_betas(base), "rescale_betas_zero_snr": False}
        return DEISMultistepScheduler.from_config(base, timestep_spacing="trailing", **x0_clip)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    raise VolgenError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


@functools.cache
def _step_takes(scheduler_class: type, argument: str) -> bool:
    return argument in inspect.signature(scheduler_class.step).parameters


def draws_step_noise(scheduler: Any) -> bool:
    """Whether each ``step`` adds fresh noise that can be given to it (``variance_noise``): the SDE
    DPM-Solvers. DDPM adds noise too, but its ``step`` draws it itself; DDIM (η = 0) and the ODE solvers add
    none."""
    algorithm = str(getattr(scheduler.config, "algorithm_type", ""))
    return _step_takes(type(scheduler), "variance_noise") and algorithm.startswith("sde-")


def scheduler_step(
    scheduler: Any,
    model_output: Tensor,
    t: Tensor,
    sample: Tensor,
    generator: Any,
    noise: Callable[[], Tensor] | None = None,
) -> Tensor:
    """One ``scheduler.step``; the generator goes to the samplers that draw noise (DDPM, SDE solvers) and is
    left out for deterministic ones whose ``step`` takes none (UniPC, DEIS). ``noise`` (called only for a
    sampler that :func:`draws_step_noise`) makes the step's fresh noise, shaped like ``sample``: the sampling
    loop correlates it between slices as it does the initial noise."""
    kwargs: dict[str, Any] = {}
    if _step_takes(type(scheduler), "generator"):
        kwargs["generator"] = generator
    if noise is not None and draws_step_noise(scheduler):
        kwargs["variance_noise"] = noise()
    return scheduler.step(model_output, t, sample, **kwargs).prev_sample


def _zero_snr_betas(config: dict) -> list[float]:
    """The betas of a zero-terminal-SNR schedule, the last ᾱ clamped to 2⁻²⁴ (finite σ for ODE solvers)."""
    schedule = DDPMScheduler.from_config(config)  # applies rescale_betas_zero_snr
    alphas_cumprod = schedule.alphas_cumprod.double().clone()
    alphas_cumprod[-1] = 2.0**-24
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1.0 - alphas_cumprod / previous).tolist()
