"""The training objective: the UNet's target under the schedule's parametrisation, Min-SNR weighting."""

from __future__ import annotations

from typing import Any

import torch

from volgen.errors import VolgenError


def diffusion_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the UNet's output and its target under ``scheduler``'s parametrisation.

    The target is the noise for ``epsilon`` and the velocity ``√ᾱ·ε - √(1-ᾱ)·x0`` (``get_velocity``) for
    ``v_prediction``. With ``snr_gamma`` each sample is weighted by Min-SNR-γ: ``min(SNR, γ) / SNR`` for ε and
    ``min(SNR, γ) / (SNR + 1)`` for v, which equals the x0-space weight ``min(SNR, γ)`` in both.
    """
    import torch.nn.functional as F

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    elif prediction_type == "epsilon":
        target = noise
    else:
        raise VolgenError(f"training supports epsilon and v_prediction, not {prediction_type!r}")
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas).clamp_min(1e-12)
    clipped = snr.clamp(max=snr_gamma)
    weight = clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-12)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()
