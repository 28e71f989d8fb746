"""Checks of model folders and of user-given numbers that would otherwise fail late, hang or mislead.

Each check raises a :class:`~volgen.errors.VolgenError` subclass with one line; callers run them where the
value enters (model loading, settings), before any work:

- :func:`check_model_files`: every file a model folder is read from is a regular file (a FIFO as
  ``scheduler_config.json`` would block), and the scheduler config is a usable schedule (at least 2
  timesteps, finite betas in (0, 1)).
- :func:`check_finite_weights`: no NaN/Inf in the loaded weights (they give an all-zero volume).

Settings (seed, steps, memory sizes, devices) are validated where settings are built
(:mod:`volgen.generation.settings`, :meth:`volgen.generation.VolumeGenerator.check`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from volgen.errors import ModelError, VolgenError
from volgen.io.paths import check_readable
from volgen.types import PathLike

__all__ = ["MODEL_FILES", "check_finite_weights", "check_model_files", "check_schedule_config"]

#: Files of a model folder that volgen (and diffusers' ``from_pretrained``) read.
MODEL_FILES = (
    "volgen.json",
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
_SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
_MAX_CONFIG_BYTES = 1 << 20


def check_model_files(folder: PathLike) -> None:
    """Check a model folder's files by ``stat`` before anything opens them, then its schedule.

    Raises:
        ModelError: A file is a FIFO, socket, device or folder; the scheduler config is not a usable schedule.
    """
    folder = Path(folder)
    for name in MODEL_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            try:
                check_readable(path, folder_ok=False)
            except VolgenError as exc:
                raise ModelError(path, str(getattr(exc, "problem", exc))) from None
    check_schedule_config(folder / _SCHEDULER_CONFIG)


def check_schedule_config(path: Path) -> None:
    """Refuse a scheduler config that cannot give a schedule: fewer than 2 training timesteps, or betas that
    are not finite numbers in (0, 1). A missing or unreadable file is left to the loader to report.

    Raises:
        ModelError: Naming the file and the value.
    """
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelError(path, "larger than 1 MiB; not a scheduler config")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return
    if not isinstance(config, dict):
        raise ModelError(path, "not a scheduler config (expected a JSON object)")
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ModelError(path, f"num_train_timesteps must be an integer >= 2, got {steps!r}")
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if value is not None and not _probability(value):
            raise ModelError(path, f"{key} must be a finite number in (0, 1), got {value!r}")
    betas = config.get("trained_betas")
    if betas is not None and (
        not isinstance(betas, list) or len(betas) != steps or not all(_probability(b) for b in betas)
    ):
        raise ModelError(
            path, f"trained_betas must be {steps} finite numbers in (0, 1) (one per training timestep)"
        )


def _probability(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value < 1
    )


def check_finite_weights(module: Any, folder: PathLike) -> None:
    """Refuse weights holding NaN or Inf (a damaged or diverged model writes an all-zero volume).

    Args:
        module: A ``torch.nn.Module`` (the loaded UNet).
        folder: The model folder, for the message.

    Raises:
        ModelError: Naming the first tensor with a non-finite value.
    """
    import torch

    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelError(folder, f"the UNet weights hold NaN/Inf (in {name}); the model is damaged")
