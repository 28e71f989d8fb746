"""Checkpoints: ``checkpoints/step-NNNNNN/`` with the accelerate state, the EMA weights and the trainer state.

Written atomically (a temporary folder, then a rename); the last ``KEEP_CHECKPOINTS`` are kept."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from volgen.errors import ConfigError
from volgen.training.config import TrainConfig
from volgen.types import PathLike

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"


def list_checkpoints(output_dir: PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise ConfigError(checkpoint, f"not a training checkpoint (no {TRAINER_STATE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(path, f"not valid JSON: {e}") from None


def save_checkpoint(
    accelerator,
    ema,
    output_dir: Path,
    step: int,
    history: dict[str, list[float]],
    config: TrainConfig,
    label_map: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically (temporary folder, then rename); keep the last ``KEEP_CHECKPOINTS``.

    The trainer state records the config and the label map (as read, not its path): resuming compares both.
    """
    from safetensors.torch import save_file

    root = output_dir / CHECKPOINTS
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = ema.state_dict()
        shadow = state.pop("shadow_params")
        save_file(
            {f"{i:05d}": p.detach().cpu().contiguous() for i, p in enumerate(shadow)}, str(tmp / EMA_WEIGHTS)
        )
        trainer_state = {
            "step": step,
            "ema": state,
            "losses": history["loss"],
            "lrs": history["lr"],
            "num_processes": accelerator.num_processes,
            "config": config.model_dump(mode="json"),
            "label_map": label_map,
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ema, checkpoint: Path, device) -> dict[str, Any]:
    from safetensors.torch import load_file

    trainer_state = read_trainer_state(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except RuntimeError as e:  # torch's "size mismatch for ...": a checkpoint older than its label map record
        if "size mismatch" not in str(e):
            raise
        raise ConfigError(
            checkpoint, "its weights do not fit the model this config builds (was the label map changed?)"
        ) from None
    tensors = load_file(str(checkpoint / EMA_WEIGHTS))
    shadow = [tensors[k] for k in sorted(tensors)]
    if len(shadow) != len(ema.shadow_params):
        raise ConfigError(checkpoint, "the checkpoint's EMA weights do not match the model")
    ema.load_state_dict({**trainer_state["ema"], "shadow_params": shadow})
    ema.to(device=device)
    return trainer_state
