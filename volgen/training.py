"""Training the slice model: an accelerate loop with mask ablation, EMA, exact resume and multi-process DDP.

The loop follows Konz et al. (MICCAI 2024): ε-prediction with an MSE loss on the DDPM training schedule
(T = 1000, linear betas), the condition built from each sample's 2.5D mask context after per-sample mask
ablation (:mod:`volgen.conditioning`, the same code sampling uses), AdamW with linear warmup and cosine
decay, gradient clipping and an EMA of the weights, which is what gets exported.

Determinism. Everything random in a step - which slices form the batch, the timesteps, the noise and the
ablation - is drawn from generators seeded by ``(seed, step)``, never from a running iterator. So:

- a run resumed from a checkpoint repeats an uninterrupted run step for step (same losses, same weights,
  bit for bit on the CPU; GPU kernels may add last-bit differences);
- with N processes, every rank draws the same *global* batch of ``training.batch_size`` samples and takes
  its own contiguous slice of it; DDP averages the gradients, so N processes train (up to floating-point
  summation order) the same model as one process.

Uniform sampling walks through seeded permutations of all slices (every slice once per epoch);
``data.foreground_weight > 0`` draws slices with replacement, weighted towards slices with anatomy.

Running on several processes (one machine or many; accelerate honours torchrun's environment)::

    torchrun --nproc_per_node N -m volgen train CONFIG.yaml
    accelerate launch -m volgen train CONFIG.yaml          # after `accelerate config`
    torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m volgen train CONFIG.yaml

``training.batch_size`` is the global batch and must be divisible by the number of processes. Only the main
process writes files (checkpoints, previews, the exported model); every process reads the training data, and
``output_dir`` must be on a filesystem all processes share (each writes its RNG state into the checkpoint).
A checkpoint can be resumed with another number of processes; resuming with a larger ``max_steps`` extends a
finished run on the cosine schedule of the new ``max_steps``. ``max_minutes`` counts the training loop of
this call (not data preparation, not earlier calls).

On disk, under ``output_dir``::

    checkpoints/step-000500/   accelerate state (model.safetensors, optimizer, LR scheduler, RNG) plus
                               ema.safetensors and trainer_state.json (step, loss history, config)
    previews/step-000500.png   mask | real | generated (EMA weights, DDIM) for a few slices of one volume
    model/                     the exported model folder (EMA weights), loadable by volgen.models.load_model
    config.yaml                the resolved config (absolute paths), written when training starts
    losses.csv                 step, loss, lr for every step (rewritten at every checkpoint)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from volgen.config import StrictModel, load_yaml, save_yaml
from volgen.errors import ConfigError, OutputError, VolgenError
from volgen.models import IntensityMapping, UNetConfig
from volgen.types import Encoding, Modality, PathLike, UnknownLabels

logger = logging.getLogger(__name__)

#: Progress callback: ``(step, max_steps, loss, lr)`` after every optimisation step (main process only).
ProgressCallback = Callable[[int, int, float, float], None]

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
PREVIEW_SLICES = 4

# Independent random streams derived from (seed, stream, step).
_STREAM_DATA = 0
_STREAM_NOISE = 1
_STREAM_ABLATION = 2


# ----------------------------------------------------------------------------------------------------
# Config


class DataConfig(StrictModel):
    """Training data: where it is, which label map, how intensities map to [-1, 1]."""

    source: Path
    label_map: str
    modality: Modality = "MR"
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    #: Multi-axis training (volgen.multiaxis): slices along each of these axes, in the isotropic cube frame,
    #: with the axis in the condition vector. Empty (default): ``slice_axis`` only, in the usual frame.
    slice_axes: list[Literal["axial", "coronal", "sagittal"]] = Field(default_factory=list)
    unknown_labels: UnknownLabels = "error"
    foreground_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError("data.percentiles must satisfy 0 <= low < high <= 100")
        if not self.ct_window[1] > self.ct_window[0]:
            raise ValueError("data.ct_window must be [low, high] with high > low")
        axes = self.slice_axes
        if axes and (len(set(axes)) != len(axes) or self.slice_axis not in axes):
            raise ValueError("data.slice_axes must be distinct and include data.slice_axis")
        return self

    def intensity_mapping(self, windows: list[tuple[float, float]] | None = None) -> IntensityMapping:
        """The model's intensity mapping. MR: ``low``/``high`` are the mean of the volumes' windows."""
        if self.modality == "CT":
            return IntensityMapping.ct(*self.ct_window)
        if not windows:
            return IntensityMapping(modality="MR", percentiles=self.percentiles)
        low = float(np.mean([w[0] for w in windows]))
        high = float(np.mean([w[1] for w in windows]))
        return IntensityMapping(
            modality="MR", percentiles=self.percentiles, low=low, high=max(high, low + 1e-3)
        )


class ModelSection(StrictModel):
    """The model to train: an architecture preset (or a full ``unet:``), the encoding and 2.5D context."""

    preset: str | None = None
    unet: UNetConfig | None = None
    encoding: Encoding = "onehot"
    context_slices: int = Field(1, ge=0, le=8)
    name: str = "volgen-model"
    description: str = ""
    #: Tell the model which classes each condition specifies (ablated classes unspecified); see
    #: :class:`volgen.conditioning.ConditionLayout`. ``False`` trains a model of the older kind.
    specified_flags: bool = True
    #: Context neighbours outside the volume: the edge slice repeated, or all-background (older models).
    context_padding: Literal["background", "replicate"] = "replicate"
    #: What the UNet predicts: ``epsilon`` (the paper, older models) or ``v_prediction``.
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    #: Rescale the betas to zero terminal SNR (needs ``v_prediction``).
    zero_terminal_snr: bool = True

    @model_validator(mode="after")
    def _check_schedule(self) -> ModelSection:
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("model.zero_terminal_snr needs model.prediction_type: v_prediction")
        return self

    def condition_layout(self):
        """The model's :class:`~volgen.conditioning.ConditionLayout`, or ``None`` for an older-kind model."""
        from volgen.conditioning import ConditionLayout

        if not self.specified_flags and self.context_padding == "background":
            return None
        return ConditionLayout(specified_flags=self.specified_flags, context_padding=self.context_padding)

    @model_validator(mode="before")
    @classmethod
    def _one_architecture(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("preset") is not None and data.get("unet") is not None:
                raise ValueError("give either model.preset or model.unet, not both")
            if data.get("preset") is None and data.get("unet") is None:
                data = {**data, "preset": "small"}
        return data

    def unet_config(self) -> UNetConfig:
        """The UNet architecture (the preset read from ``configs/models``, or ``unet`` itself)."""
        return self.unet if self.unet is not None else UNetConfig.preset(str(self.preset))


class TrainingSection(StrictModel):
    """Optimisation, schedule and bookkeeping. ``batch_size`` is the global batch over all processes."""

    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2.0e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ablation_p: float = Field(0.5, ge=0, le=1)
    #: Offset noise (Guttenberg 2023): this much per-sample constant noise added to the Gaussian noise.
    offset_noise: float = Field(0.0, ge=0, le=1)
    #: Min-SNR-γ loss weighting (Hang et al. 2023); ``None`` weighs every timestep equally.
    snr_gamma: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(500, ge=1)
    preview_every: int = Field(500, ge=0, description="0: a preview at the end only")
    preview_steps: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads an unquoted `no` as false


class TrainConfig(StrictModel):
    """A training run (YAML). Relative paths in a YAML file are relative to that file."""

    output_dir: Path
    data: DataConfig
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)

    @classmethod
    def from_yaml(cls, path: PathLike) -> TrainConfig:
        """Read a training config; ``output_dir``, ``data.source`` and a label map path resolve against it."""
        config = load_yaml(path, cls)
        return config.resolve_paths(Path(path).resolve().parent)

    def resolve_paths(self, base: PathLike) -> TrainConfig:
        """A copy with relative paths made absolute against ``base``."""
        base = Path(base)
        config = self.model_copy(deep=True)
        config.output_dir = (base / config.output_dir).resolve()
        config.data.source = (base / config.data.source).resolve()
        label_map = config.data.label_map
        if Path(label_map).suffix.lower() in (".yaml", ".yml") or "/" in label_map or os.sep in label_map:
            config.data.label_map = str((base / label_map).resolve())
        return config


def _resume_relevant(config: TrainConfig) -> dict[str, Any]:
    """The parts of a config that must not change when resuming (they change what the steps compute)."""
    dump = config.model_dump(mode="json")
    training = {
        k: dump["training"][k]
        for k in (
            "batch_size",
            "learning_rate",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "ema_decay",
            "ablation_p",
            "offset_noise",
            "snr_gamma",
            "seed",
            "mixed_precision",
        )
    }
    return {"data": dump["data"], "model": dump["model"], "training": training}


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


# ----------------------------------------------------------------------------------------------------
# Per-step randomness


def step_seed(seed: int, stream: int, step: int) -> int:
    """A 63-bit seed for one random stream of one step (or epoch), independent of the others."""
    state = np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, stream, step))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's share of each step's global batch, derived from ``(seed, step)`` only.

    Args:
        num_samples: Dataset length.
        batch_size: Global batch size (all processes together).
        seed: Run seed.
        start_step: First step (0-based) to yield; ``end_step`` is exclusive.
        weights: Per-sample weights (draw with replacement, ``WeightedRandomSampler``-style) or ``None``
            (uniform: seeded permutations, every sample once per epoch).
        rank, world_size: This process's slice of the global batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        start_step: int,
        end_step: int,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                None, f"training.batch_size {batch_size} must be divisible by {world_size} processes"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.rank = rank
        self.world_size = world_size
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            gen = _generator(self.seed, _STREAM_DATA, epoch)
            self._permutations[epoch] = torch.randperm(self.num_samples, generator=gen)
        return self._permutations[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of ``step``."""
        if self.weights is not None:
            gen = _generator(self.seed, _STREAM_DATA, step)
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen).tolist()
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self._permutation(p // self.num_samples)[p % self.num_samples]) for p in positions]

    def local_slice(self) -> slice:
        share = self.batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def __iter__(self):
        for step in range(self.start_step, self.end_step):
            yield self.global_indices(step)[self.local_slice()]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


def step_noise(
    step: int,
    *,
    seed: int,
    batch_size: int,
    shape: tuple[int, ...],
    num_train_timesteps: int,
    num_classes: int,
    ablation_p: float,
    offset_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch's noise ``(B, *shape)``, timesteps ``(B,)`` and ablation ``(B, C)`` of one step.

    ``offset_noise > 0`` adds a per-sample, per-channel constant ``offset_noise * N(0, 1)`` to the noise.
    """
    from volgen.conditioning import draw_ablation

    gen = _generator(seed, _STREAM_NOISE, step)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
    noise = torch.randn((batch_size, *shape), generator=gen)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn((batch_size, shape[0], 1, 1), generator=gen)
    removed = draw_ablation(
        batch_size, num_classes, ablation_p, generator=_generator(seed, _STREAM_ABLATION, step)
    )
    return noise, timesteps, removed


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


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass
class TrainingData:
    """The prepared training set."""

    volumes: list[Any]
    label_map: Any
    intensity: IntensityMapping
    description: str
    #: Multi-axis data: the axis code of each volume (see :class:`volgen.multiaxis.MultiAxisSliceDataset`).
    axes: list[int] | None = None


def prepare_training_data(config: TrainConfig) -> TrainingData:
    """Find, read, check and resample every case into the slicing frame (see :mod:`volgen.data`)."""
    from volgen.data import find_cases, prepare_case
    from volgen.labels import load_label_map

    data = config.data
    label_map = load_label_map(data.label_map)
    if config.model.encoding == "seed" and label_map.num_classes > 256:
        raise ConfigError(data.label_map, "the seed encoding holds at most 255 foreground classes")
    slice_size = config.model.unet_config().sample_size
    cases = find_cases(data.source)
    provisional = data.intensity_mapping()
    volumes = []
    if len(data.slice_axes) > 1:  # multi-axis: one volume per (case, axis), the model's slice_axis first
        from volgen.multiaxis import axis_code, prepare_case_axes

        order = [data.slice_axis, *(a for a in data.slice_axes if a != data.slice_axis)]
        for case in cases:
            volumes += prepare_case_axes(
                case,
                label_map=label_map,
                intensity=provisional,
                slice_size=slice_size,
                axes=order,
                unknown_labels=data.unknown_labels,
            )
        intensity = data.intensity_mapping([v.window for v in volumes])
        description = f"{len(cases)} case(s) from {data.source}, slices along {', '.join(order)}"
        axes = [axis_code(v.case.rsplit(":", 1)[1]) for v in volumes]
        return TrainingData(volumes, label_map, intensity, description, axes=axes)
    for case in cases:
        volume = prepare_case(
            case,
            label_map=label_map,
            intensity=provisional,
            slice_size=slice_size,
            slice_axis=data.slice_axis,
            unknown_labels=data.unknown_labels,
        )
        if not bool((volume.labels > 0).any()):
            logger.warning("case %s has no foreground in label map '%s'", case.case, label_map.name)
        volumes.append(volume)
    intensity = data.intensity_mapping([v.window for v in volumes])
    names = ", ".join(c.case for c in cases[:5]) + (" ..." if len(cases) > 5 else "")
    description = f"{len(cases)} case(s) from {data.source} ({names})"
    logger.info(
        "prepared %s: %d slices of %d px", description, sum(v.labels.shape[0] for v in volumes), slice_size
    )
    return TrainingData(volumes=volumes, label_map=label_map, intensity=intensity, description=description)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


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


def _read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise ConfigError(checkpoint, f"not a training checkpoint (no {TRAINER_STATE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(path, f"not valid JSON: {e}") from None


def _save_checkpoint(
    accelerator, ema, output_dir: Path, step: int, history: dict[str, list[float]], config: TrainConfig
) -> Path:
    """Write a checkpoint atomically (temporary folder, then rename); keep the last ``KEEP_CHECKPOINTS``."""
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


def _load_checkpoint(accelerator, ema, checkpoint: Path, device) -> dict[str, Any]:
    from safetensors.torch import load_file

    trainer_state = _read_trainer_state(checkpoint)
    accelerator.load_state(str(checkpoint))
    tensors = load_file(str(checkpoint / EMA_WEIGHTS))
    shadow = [tensors[k] for k in sorted(tensors)]
    if len(shadow) != len(ema.shadow_params):
        raise ConfigError(checkpoint, "the checkpoint's EMA weights do not match the model")
    ema.load_state_dict({**trainer_state["ema"], "shadow_params": shadow})
    ema.to(device=device)
    return trainer_state


# ----------------------------------------------------------------------------------------------------
# Preview and export


def preview_slices(labels: torch.Tensor, count: int = PREVIEW_SLICES) -> list[int]:
    """``count`` slice indices spread over the anatomy: quantiles of the cumulative foreground per slice."""
    n = labels.shape[0]
    foreground = (labels > 0).reshape(n, -1).sum(dim=1).double()
    if float(foreground.sum()) == 0:
        picks = np.linspace(0, n - 1, count + 2)[1:-1]
    else:
        cumulative = torch.cumsum(foreground, 0) / foreground.sum()
        quantiles = [(i + 1) / (count + 1) for i in range(count)]
        picks = [int(torch.searchsorted(cumulative, torch.tensor(q, dtype=torch.float64))) for q in quantiles]
    return sorted({int(min(max(p, 0), n - 1)) for p in picks})


def _ema_unet(accelerator, model, ema):
    """A fresh float32 UNet holding the EMA weights, on the training device (no DDP or autocast wrappers)."""
    from diffusers import UNet2DModel

    trained = accelerator.unwrap_model(model)
    unet = UNet2DModel.from_config(trained.config)
    unet.load_state_dict(trained.state_dict())
    ema.copy_to(unet.parameters())
    return unet.to(device=next(trained.parameters()).device, dtype=torch.float32).eval()


def write_preview(
    path: Path,
    unet,
    scheduler,
    volume,
    *,
    num_classes: int,
    encoding: str,
    context_slices: int,
    steps: int,
    seed: int,
    title: str = "",
    condition: dict | None = None,
) -> Path:
    """Generate a few slices of ``volume`` with DDIM and save a PNG grid (mask | real | generated).

    Each picked slice is generated inside a block of its ``2K+1`` context slices (the others are only there to
    give the centre slice its true context), with independent noise per slice.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volgen.conditioning import context_stack
    from volgen.io import atomic_write
    from volgen.pipeline import SegmentationToVolumePipeline

    zs = preview_slices(volume.labels)
    s = 2 * context_slices + 1
    padding = condition["context_padding"] if condition is not None else "background"
    blocks = context_stack(volume.labels, zs, context_slices, padding).reshape(-1, *volume.labels.shape[1:])
    pipe = SegmentationToVolumePipeline(
        unet=unet,
        scheduler=scheduler,
        encoding=encoding,
        context_slices=context_slices,
        num_classes=num_classes,
        condition=condition,
    )
    out = pipe(blocks.long(), num_inference_steps=steps, seed=seed, scheduler="ddim", noise_correlation=0.0)
    generated = out.volume[context_slices::s]

    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    palette = colormaps["tab10"].colors
    class_colours = ListedColormap(
        ["black", *(palette[i % len(palette)] for i in range(max(num_classes - 1, 1)))]
    )
    fig = Figure(figsize=(6.0, 2.0 * len(zs) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(zs), 3, squeeze=False)
    for row, z in enumerate(zs):
        panels = [
            (volume.labels[z].numpy(), {"cmap": class_colours, "vmin": -0.5, "vmax": class_colours.N - 0.5}),
            (volume.image[z].numpy(), {"cmap": "gray", "vmin": -1, "vmax": 1}),
            (generated[row].numpy(), {"cmap": "gray", "vmin": -1, "vmax": 1}),
        ]
        for col, (img, kwargs) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(img, origin="lower", interpolation="nearest", **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(("mask", "real", "generated")[col], fontsize=9)
        axes[row][0].set_ylabel(f"slice {z}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return path


def _write_losses(path: Path, losses: list[float], lrs: list[float]) -> None:
    from volgen.io import atomic_write

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss", "lr"])
    for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True), start=1):
        writer.writerow([i, repr(loss), repr(lr)])
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_text(buffer.getvalue(), encoding="utf-8")


def read_losses(path: PathLike) -> list[float]:
    """The loss column of a ``losses.csv`` written by :func:`train`."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------------
# Stopping on a signal


class StopOnSignal:
    """While active, the first SIGINT/SIGTERM only asks the training loop to stop; a second one stops at once.

    The loop checks :meth:`agreed` after every step: it saves a checkpoint there and raises
    ``KeyboardInterrupt``, so ``volgen train --resume`` continues from that very step. With several processes
    the main process's request decides for all (every rank stops after the same step). Outside the main
    thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s: stopping after this step with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, accelerator: Any) -> bool:
        """Whether to stop after this step (the main process's request, broadcast to every process)."""
        if accelerator.num_processes == 1:
            return self.requested
        from accelerate.utils import broadcast

        flag = torch.tensor([self.requested], device=accelerator.device)
        return bool(broadcast(flag, from_process=0).item())


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model_dir: The exported model folder (EMA weights).
        steps: Optimisation steps done in total (including those before a resume).
        final_loss: Mean loss over the last (up to) 100 steps.
        losses: The loss of every step, step 1 first (global batch mean over all processes).
        losses_csv: ``losses.csv`` (step, loss, lr).
        config_path: The resolved config written next to the model.
        previews: Preview PNGs written by this call.
        checkpoint: The last checkpoint.
        stopped_early: Whether ``max_minutes`` ended the run before ``max_steps``.
    """

    model_dir: Path
    steps: int
    final_loss: float
    losses: list[float]
    losses_csv: Path
    config_path: Path
    previews: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None
    stopped_early: bool = False


def _resolve_resume(config: TrainConfig, resume: bool | PathLike) -> Path | None:
    output_dir = config.output_dir
    if resume is False or resume is None:
        if list_checkpoints(output_dir) or (output_dir / "model").exists():
            raise OutputError(
                output_dir,
                "already holds a training run; resume it (--resume) or choose another --output-dir",
            )
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("no checkpoint in %s; starting from step 0", output_dir / CHECKPOINTS)
            return None
        return found[-1]
    checkpoint = Path(resume)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise ConfigError(checkpoint, f"not a training checkpoint (no {TRAINER_STATE})")
    return checkpoint


def train(
    config: TrainConfig, *, resume: bool | PathLike = False, progress: ProgressCallback | None = None
) -> TrainResult:
    """Train a slice model and export it to ``config.output_dir / "model"``.

    Args:
        config: The run's config (absolute paths, see :meth:`TrainConfig.from_yaml`).
        resume: ``True`` continues from the latest checkpoint in ``output_dir`` (from step 0 if there is
            none); a path continues from that checkpoint folder; ``False`` starts afresh and refuses an
            ``output_dir`` that already holds a run.
        progress: Called as ``progress(step, max_steps, loss, lr)`` after every step on the main process.

    Returns:
        A :class:`TrainResult` (the same paths on every process).

    Raises:
        ConfigError, InputError: bad config or training data (the message names the file).
        OutputError: ``output_dir`` already holds a run and ``resume`` is false.
        KeyboardInterrupt: SIGINT or SIGTERM during the loop, raised once the step under way is finished and
            its checkpoint saved (:class:`StopOnSignal`); ``resume=True`` continues from there.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from volgen import __version__
    from volgen.conditioning import (
        encode,
        remove_classes,
        specified_from_removed,
        unet_condition,
    )
    from volgen.data import SliceDataset
    from volgen.models import ModelMetadata, build_training_scheduler, build_unet, save_model
    from volgen.multiaxis import MultiAxisSliceDataset, layout_with_axes, per_sample_condition_vector

    cfg = config.training
    output_dir = Path(config.output_dir)
    checkpoint = _resolve_resume(config, resume)
    start_step, history = 0, {"loss": [], "lr": []}
    if checkpoint is not None:
        saved = _read_trainer_state(checkpoint)
        saved_config = TrainConfig.model_validate(saved["config"])
        difference = _first_difference(_resume_relevant(saved_config), _resume_relevant(config))
        if difference:
            raise ConfigError(
                checkpoint, f"was written with a different '{difference}'; resume needs the same value"
            )

    cuda = torch.cuda.is_available()
    mixed_precision = cfg.mixed_precision
    if mixed_precision != "no" and not cuda:
        logger.warning("mixed_precision=%s needs a GPU; training in float32 on the CPU", mixed_precision)
        mixed_precision = "no"
    accelerator = Accelerator(
        mixed_precision=mixed_precision, cpu=not cuda, step_scheduler_with_optimizer=False
    )
    device = accelerator.device
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(
            None,
            f"training.batch_size {cfg.batch_size} must be divisible by the number of processes "
            f"({accelerator.num_processes})",
        )
    set_seed(cfg.seed)

    data = prepare_training_data(config)
    unet_config = config.model.unet_config()
    metadata = ModelMetadata(
        name=config.model.name,
        description=config.model.description,
        label_map=data.label_map,
        encoding=config.model.encoding,
        context_slices=config.model.context_slices,
        slice_size=unet_config.sample_size,
        slice_axis=config.data.slice_axis,
        intensity=data.intensity,
        trained_on=data.description,
        condition=layout_with_axes(config.model.condition_layout(), config.data.slice_axes),
    )
    num_classes = metadata.num_classes
    padding = metadata.condition.context_padding if metadata.condition is not None else "background"
    dataset = (
        SliceDataset(data.volumes, config.model.context_slices, padding=padding)
        if data.axes is None
        else MultiAxisSliceDataset(data.volumes, data.axes, config.model.context_slices, padding)
    )

    torch.manual_seed(cfg.seed)
    unet = build_unet(unet_config, metadata)
    noise_scheduler = build_training_scheduler(
        prediction_type=config.model.prediction_type, zero_terminal_snr=config.model.zero_terminal_snr
    )
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay)
    ema.to(device=device)

    if checkpoint is not None:
        saved = _load_checkpoint(accelerator, ema, checkpoint, device)
        start_step = int(saved["step"])
        history = {"loss": list(saved["losses"])[:start_step], "lr": list(saved["lrs"])[:start_step]}
        # the learning rate of the next step from this run's schedule (it differs from the saved one only when
        # max_steps changed, e.g. to extend a finished run)
        inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
        for group, base, factor in zip(optimizer.param_groups, inner.base_lrs, inner.lr_lambdas, strict=True):
            group["lr"] = base * factor(inner.last_epoch)
        logger.info("resumed from %s at step %d", checkpoint, start_step)
    end_step = max(cfg.max_steps, start_step)

    weights = (
        dataset.sampling_weights(config.data.foreground_weight) if config.data.foreground_weight > 0 else None
    )
    sampler = StepBatchSampler(
        len(dataset),
        cfg.batch_size,
        seed=cfg.seed,
        start_step=start_step,
        end_step=end_step,
        weights=weights,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=cuda
    )
    local = sampler.local_slice()
    image_shape = (1, unet_config.sample_size, unet_config.sample_size)

    model_dir = output_dir / "model"
    config_path = output_dir / "config.yaml"
    losses_csv = output_dir / "losses.csv"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, config_path)
    accelerator.wait_for_everyone()
    previews: list[Path] = []
    preview_volume = data.volumes[0]

    def preview(step: int) -> None:
        if accelerator.is_main_process:
            path = output_dir / "previews" / f"step-{step:06d}.png"
            write_preview(
                path,
                _ema_unet(accelerator, model, ema),
                noise_scheduler,
                preview_volume,
                num_classes=num_classes,
                encoding=metadata.encoding,
                context_slices=metadata.context_slices,
                steps=cfg.preview_steps,
                seed=cfg.seed,
                title=f"{metadata.name}: step {step} (EMA, DDIM)",
                condition=None if metadata.condition is None else metadata.condition.model_dump(mode="json"),
            )
            previews.append(path)
            logger.info("wrote preview %s", path)
        accelerator.wait_for_everyone()

    model.train()
    step = start_step
    last_checkpoint = checkpoint
    last_preview = -1
    stopped_early = False
    started = time.monotonic()
    signals = StopOnSignal()
    with signals:  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, then stop (KeyboardInterrupt)
        for batch in loader:
            noise, timesteps, removed = step_noise(
                step,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                shape=image_shape,
                num_train_timesteps=num_train_timesteps,
                num_classes=num_classes,
                ablation_p=cfg.ablation_p,
                offset_noise=cfg.offset_noise,
            )
            x0 = batch["image"].to(device, non_blocking=True)
            noise, timesteps, removed = noise[local].to(device), timesteps[local].to(device), removed[local]
            cond = encode(
                remove_classes(batch["context"].to(device), removed), num_classes, metadata.encoding
            )
            # ablated classes are flagged unspecified (the same per-sample ablation as the masks)
            specified = specified_from_removed(removed, removed.shape[0], num_classes)
            # multi-axis data: each sample's slice axis in its vector (volgen.multiaxis)
            vector = per_sample_condition_vector(specified, batch.get("axis"), metadata.condition)
            cond = unet_condition(cond, vector)
            x_t = noise_scheduler.add_noise(x0, noise, timesteps)
            with accelerator.autocast():
                pred = model(torch.cat([x_t, cond], dim=1), timesteps).sample
            loss = diffusion_loss(pred, x0, noise, timesteps, noise_scheduler, cfg.snr_gamma)
            accelerator.backward(loss)
            if cfg.grad_clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = float(optimizer.param_groups[0]["lr"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(accelerator.unwrap_model(model).parameters())
            step += 1

            step_loss = (
                float(accelerator.reduce(loss.detach(), reduction="mean"))
                if accelerator.num_processes > 1
                else float(loss.detach())
            )
            if not math.isfinite(step_loss):
                raise VolgenError(f"the loss became {step_loss} at step {step}; lower training.learning_rate")
            history["loss"].append(step_loss)
            history["lr"].append(lr)
            if accelerator.is_main_process:
                if step % cfg.log_every == 0:
                    recent = history["loss"][-cfg.log_every :]
                    logger.info("step %d/%d loss %.4f lr %.2e", step, end_step, sum(recent) / len(recent), lr)
                if progress is not None:
                    progress(step, end_step, step_loss, lr)

            if cfg.max_minutes is not None and step < end_step:
                stop = torch.tensor([time.monotonic() - started >= cfg.max_minutes * 60.0], device=device)
                if accelerator.num_processes > 1:
                    from accelerate.utils import broadcast

                    stop = broadcast(stop, from_process=0)
                stopped_early = bool(stop.item())
            interrupted = signals.agreed(accelerator)
            if step % cfg.checkpoint_every == 0 or step == end_step or stopped_early or interrupted:
                last_checkpoint = _save_checkpoint(accelerator, ema, output_dir, step, history, config)
                if accelerator.is_main_process:
                    _write_losses(losses_csv, history["loss"], history["lr"])
            if interrupted:
                logger.warning(
                    "interrupted after step %d; saved checkpoint %s (continue with --resume)",
                    step,
                    last_checkpoint,
                )
                raise KeyboardInterrupt(f"training interrupted after step {step}")
            if (cfg.preview_every and step % cfg.preview_every == 0) or step == end_step or stopped_early:
                preview(step)
                last_preview = step
            if stopped_early:
                logger.info("max_minutes reached after %d steps", step)
                break

    if last_preview != step:
        preview(step)
    losses = history["loss"]
    tail = losses[-100:]
    final_loss = float(sum(tail) / len(tail)) if tail else float("nan")
    if accelerator.is_main_process:
        metadata.training = {
            "steps": step,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "ablation_p": cfg.ablation_p,
            "prediction_type": config.model.prediction_type,
            "zero_terminal_snr": config.model.zero_terminal_snr,
            "offset_noise": cfg.offset_noise,
            "snr_gamma": cfg.snr_gamma,
            "ema_decay": cfg.ema_decay,
            "seed": cfg.seed,
            "final_loss": final_loss,
            "num_processes": accelerator.num_processes,
            "architecture": config.model.preset or "custom",
            "volgen_version": __version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        unet_cpu = _ema_unet(accelerator, model, ema).to("cpu")
        save_model(model_dir, unet_cpu, noise_scheduler, metadata, overwrite=True)
        _write_losses(losses_csv, losses, history["lr"])
        logger.info("exported %s (%d steps, final loss %.4f)", model_dir, step, final_loss)
    accelerator.wait_for_everyone()
    return TrainResult(
        model_dir=model_dir,
        steps=step,
        final_loss=final_loss,
        losses=list(losses),
        losses_csv=losses_csv,
        config_path=config_path,
        previews=previews,
        checkpoint=last_checkpoint,
        stopped_early=stopped_early,
    )
