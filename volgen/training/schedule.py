"""The learning-rate schedule: linear warmup, then cosine decay to zero at ``max_steps``.

The rate is a pure function of the step, set on the optimiser before every step: a resumed run (also one
resumed with a larger ``max_steps``, which extends a finished run on the new cosine) gets its rates from the
step alone, with no scheduler state to restore or edit.
"""

from __future__ import annotations

import math
from typing import Any


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The factor of the base rate at 0-based ``step``: ``step / warmup`` during warmup, then a half cosine.

    The same curve as diffusers' ``get_cosine_schedule_with_warmup`` (one half cycle).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: Any, base_lr: float, step: int, warmup_steps: int, max_steps: int) -> float:
    """Set every parameter group's rate for ``step`` (0-based); returns it."""
    lr = base_lr * lr_factor(step, warmup_steps, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
