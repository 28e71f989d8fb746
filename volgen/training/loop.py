"""The training loop: set up the model and data from a config, run the steps, checkpoint, export.

One step: the global batch's slices (and their augmentation) from :class:`StepBatchSampler`, the noise,
timesteps and mask ablation from :func:`step_noise`, the condition built by :mod:`volgen.conditioning` (the
code sampling uses: masks after ablation, "specified" flags of the kept classes), the loss of
:func:`volgen.training.objective.diffusion_loss`, AdamW at the rate of :mod:`volgen.training.schedule`,
gradient clipping and an EMA of the weights, which is what gets exported.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from volgen.augmentation import Augmenter, AugmentingCollate
from volgen.config import save_yaml
from volgen.data import apply_edge_cuts, apply_inplane_cuts, erase_classes
from volgen.errors import ConfigError, OutputError, VolgenError
from volgen.multiaxis import MultiAxisSliceDataset, layout_with_axes
from volgen.training.checkpoint import (
    CHECKPOINTS,
    TRAINER_STATE,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from volgen.training.config import TrainConfig, first_difference, resume_relevant
from volgen.training.dataset import TrainingData, prepare_training_data
from volgen.training.history import write_losses
from volgen.training.objective import diffusion_loss
from volgen.training.outputs import check_output_dir
from volgen.training.preview import ema_unet, write_preview
from volgen.training.randomness import (
    StepBatchSampler,
    seed_step_dropout,
    step_edge_cuts,
    step_erasures,
    step_inplane_cuts,
    step_noise,
)
from volgen.training.schedule import set_learning_rate
from volgen.training.signals import StopOnSignal
from volgen.types import PathLike

logger = logging.getLogger(__name__)

#: Progress callback: ``(step, max_steps, loss, lr)`` after every optimisation step (main process only).
ProgressCallback = Callable[[int, int, float, float], None]


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


@dataclass
class _Run:
    """Everything a running training holds."""

    config: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    ema: Any
    scheduler: Any
    metadata: Any
    data: TrainingData
    loader: Any
    local: slice
    image_shape: tuple[int, int, int]
    start_step: int
    end_step: int
    history: dict[str, list[float]]
    checkpoint: Path | None
    previews: list[Path] = field(default_factory=list)

    @cached_property
    def dropout(self) -> float:
        return self.config.model.unet_config().dropout

    @cached_property
    def erased(self) -> list[int]:
        """Class indices of ``data.erase_classes``."""
        return [self.data.label_map.class_index(n) for n in self.config.data.erase_classes]

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def resolve_resume(config: TrainConfig, resume: bool | PathLike) -> Path | None:
    """The checkpoint to continue from (``None``: start afresh); refuses to overwrite an earlier run."""
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


def _check_label_map(config: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume when the label map (the file's content, not its path) changed since the checkpoint:
    a class added or removed changes the UNet's inputs, values moved between classes change their meaning."""
    from volgen.labels import LabelMap, label_map_change, load_label_map

    saved = read_trainer_state(checkpoint).get("label_map")
    if saved is None:  # written before the label map was recorded
        return
    change = label_map_change(LabelMap.model_validate(saved), load_label_map(config.data.label_map))
    if change:
        raise ConfigError(
            config.data.label_map,
            f"changed since checkpoint {checkpoint} ({change}); resume needs the label map it was "
            "trained with",
        )


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = config.training
    cuda = torch.cuda.is_available()
    mixed_precision = cfg.mixed_precision
    if mixed_precision != "no" and not cuda:
        logger.warning("mixed_precision=%s needs a GPU; training in float32 on the CPU", mixed_precision)
        mixed_precision = "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(
            None,
            f"training.batch_size {cfg.batch_size} must be divisible by the number of processes "
            f"({accelerator.num_processes})",
        )
    set_seed(cfg.seed)
    return accelerator


def _metadata(config: TrainConfig, data: TrainingData):
    from volgen.models import ModelMetadata

    unet_config = config.model.unet_config()
    return ModelMetadata(
        name=config.model.name,
        description=config.model.description,
        label_map=data.label_map,
        encoding=config.model.encoding,
        context_slices=config.model.context_slices,
        slice_size=unet_config.sample_size,
        slice_axis=config.data.slice_axis,
        pixel_spacing=config.data.pixel_spacing,
        intensity=data.intensity,
        trained_on=data.description,
        condition=layout_with_axes(config.model.condition_layout(), config.data.slice_axes),
        sampling=config.sampling,
    )


def _loader(config: TrainConfig, data: TrainingData, metadata, accelerator, start_step: int, end_step: int):
    """The data loader of steps ``start_step .. end_step - 1`` (this process's share of each batch)."""
    from volgen.data import SliceDataset

    cfg = config.training
    padding = metadata.condition.context_padding if metadata.condition is not None else "background"
    crop = None if metadata.pixel_spacing is None else metadata.slice_size  # native: crops of the UNet's size
    dataset = (
        SliceDataset(data.volumes, config.model.context_slices, padding=padding, crop_size=crop)
        if data.axes is None
        else MultiAxisSliceDataset(data.volumes, data.axes, config.model.context_slices, padding)
    )
    augmenter = None
    if config.augmentation.enabled:
        augmentation = config.augmentation
        if data.axes is not None and 2 in data.axes:  # sagittal slices: left-right is through-plane
            augmentation = augmentation.model_copy(update={"flip_left_right": False})
        augmenter = Augmenter(
            augmentation,
            slice_size=metadata.slice_size,
            modality=metadata.intensity.modality,
            slice_axis=metadata.slice_axis,
        )
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
        augment_seeds=augmenter is not None or crop is not None,
        samples_per_draw=config.augmentation.samples_per_draw,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=AugmentingCollate(augmenter) if augmenter is not None else None,
    )
    return loader, sampler.local_slice()


def _setup(config: TrainConfig, checkpoint: Path | None) -> _Run:
    """Build the accelerator, data, model, optimiser and EMA; restore ``checkpoint`` if given."""
    from diffusers.training_utils import EMAModel

    from volgen.models import build_training_scheduler, build_unet

    cfg = config.training
    if checkpoint is not None:
        saved_config = TrainConfig.model_validate(read_trainer_state(checkpoint)["config"])
        difference = first_difference(resume_relevant(saved_config), resume_relevant(config))
        if difference:
            raise ConfigError(
                checkpoint, f"was written with a different '{difference}'; resume needs the same value"
            )
        _check_label_map(config, checkpoint)
    accelerator = _accelerator(config)
    data = prepare_training_data(config)
    metadata = _metadata(config, data)
    torch.manual_seed(cfg.seed)
    unet = build_unet(config.model.unet_config(), metadata)
    scheduler = build_training_scheduler(
        prediction_type=config.model.prediction_type, zero_terminal_snr=config.model.zero_terminal_snr
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay)
    ema.to(device=accelerator.device)

    start_step, history = 0, {"loss": [], "lr": []}
    if checkpoint is not None:
        saved = load_checkpoint(accelerator, ema, checkpoint, accelerator.device)
        start_step = int(saved["step"])
        history = {"loss": list(saved["losses"])[:start_step], "lr": list(saved["lrs"])[:start_step]}
        logger.info("resumed from %s at step %d", checkpoint, start_step)
    end_step = max(cfg.max_steps, start_step)
    loader, local = _loader(config, data, metadata, accelerator, start_step, end_step)
    size = metadata.slice_size
    return _Run(
        config=config,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        ema=ema,
        scheduler=scheduler,
        metadata=metadata,
        data=data,
        loader=loader,
        local=local,
        image_shape=(1, size, size),
        start_step=start_step,
        end_step=end_step,
        history=history,
        checkpoint=checkpoint,
    )


def _step(run: _Run, batch: dict[str, torch.Tensor], step: int) -> tuple[float, float]:
    """One optimisation step (0-based ``step``); returns the global batch's mean loss and the rate used."""
    from volgen.denoiser import Denoiser

    cfg, metadata, accelerator = run.config.training, run.metadata, run.accelerator
    device = accelerator.device
    num_classes = metadata.num_classes
    noise, timesteps, removed = step_noise(
        step,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        shape=run.image_shape,
        num_train_timesteps=int(run.scheduler.config.num_train_timesteps),
        num_classes=num_classes,
        ablation_p=cfg.ablation_p,
        offset_noise=cfg.offset_noise,
        full_mask_p=cfg.full_mask_p,
    )
    cuts = step_edge_cuts(
        step,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        p=run.config.data.edge_cut_p,
        context_slices=run.config.model.context_slices,
    )
    local = run.local
    noise, timesteps, removed = noise[local].to(device), timesteps[local].to(device), removed[local]
    context, x0 = apply_edge_cuts(
        batch["context"].to(device), batch["image"].to(device, non_blocking=True), cuts[local]
    )
    inplane = step_inplane_cuts(
        step,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        p=run.config.data.inplane_cut_p,
        weights=run.config.data.inplane_cut_weights(),
    )
    context, x0 = apply_inplane_cuts(context, x0, inplane[local])
    erase = step_erasures(step, seed=cfg.seed, batch_size=cfg.batch_size, p=run.config.data.erase_p)
    context, x0 = erase_classes(context, x0, erase[local], run.erased)
    denoiser = Denoiser(
        run.model,
        num_classes=num_classes,
        encoding=metadata.encoding,
        context_slices=metadata.context_slices,
        layout=metadata.condition,
        slice_axis=metadata.slice_axis,
    )
    # ablated classes are flagged unspecified (the same per-sample ablation as the masks); multi-axis data:
    # each sample's slice axis in its vector
    cond = denoiser.training_condition(context, removed, batch.get("axis"))
    x_t = run.scheduler.add_noise(x0, noise, timesteps)
    if run.dropout:
        seed_step_dropout(cfg.seed, step, accelerator.process_index)
    with accelerator.autocast():
        pred = denoiser.forward(x_t, timesteps, cond)
    loss = diffusion_loss(pred, x0, noise, timesteps, run.scheduler, cfg.snr_gamma)
    accelerator.backward(loss)
    if cfg.grad_clip is not None and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = set_learning_rate(run.optimizer, cfg.learning_rate, step, cfg.warmup_steps, run.end_step)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.step(accelerator.unwrap_model(run.model).parameters())
    if accelerator.num_processes > 1:
        return float(accelerator.reduce(loss.detach(), reduction="mean")), lr
    return float(loss.detach()), lr


def _preview(run: _Run, step: int) -> None:
    accelerator, metadata = run.accelerator, run.metadata
    if accelerator.is_main_process:
        path = run.output_dir / "previews" / f"step-{step:06d}.png"
        write_preview(
            path,
            ema_unet(accelerator, run.model, run.ema),
            run.scheduler,
            run.data.volumes[0],
            num_classes=metadata.num_classes,
            encoding=metadata.encoding,
            context_slices=metadata.context_slices,
            steps=run.config.training.preview_steps,
            seed=run.config.training.seed,
            title=f"{metadata.name}: step {step} (EMA, DDIM)",
            condition=None if metadata.condition is None else metadata.condition.model_dump(mode="json"),
            pixel_spacing=metadata.pixel_spacing,
        )
        run.previews.append(path)
        logger.info("wrote preview %s", path)
    accelerator.wait_for_everyone()


def _time_is_up(run: _Run, step: int, started: float) -> bool:
    """Whether ``max_minutes`` has passed (the main process decides for all)."""
    max_minutes = run.config.training.max_minutes
    if max_minutes is None or step >= run.end_step:
        return False
    stop = torch.tensor([time.monotonic() - started >= max_minutes * 60.0], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        stop = broadcast(stop, from_process=0)
    return bool(stop.item())


def _export(run: _Run, step: int, final_loss: float) -> Path:
    """Write the EMA weights as a model folder (main process)."""
    from volgen import __version__
    from volgen.models import save_model

    config, cfg = run.config, run.config.training
    model_dir = run.output_dir / "model"
    if run.accelerator.is_main_process:
        run.metadata.training = {
            "steps": step,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "ablation_p": cfg.ablation_p,
            "full_mask_p": cfg.full_mask_p,
            "prediction_type": config.model.prediction_type,
            "zero_terminal_snr": config.model.zero_terminal_snr,
            "offset_noise": cfg.offset_noise,
            "snr_gamma": cfg.snr_gamma,
            "augmentation": config.augmentation.enabled,
            "empty_slices": config.data.empty_slices,
            "edge_cut_p": config.data.edge_cut_p,
            "inplane_cut_p": config.data.inplane_cut_p,
            "inplane_cut_kinds": dict(config.data.inplane_cut_kinds),
            "pixel_spacing_scales": list(config.data.pixel_spacing_scales),
            "erase_classes": list(config.data.erase_classes),
            "erase_p": config.data.erase_p,
            "cases": list(run.data.cases or []),  # every case id (trained_on names the first five)
            "ema_decay": cfg.ema_decay,
            "seed": cfg.seed,
            "final_loss": final_loss,
            "num_processes": run.accelerator.num_processes,
            "architecture": config.model.preset or "custom",
            "volgen_version": __version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        unet_cpu = ema_unet(run.accelerator, run.model, run.ema).to("cpu")
        save_model(model_dir, unet_cpu, run.scheduler, run.metadata, overwrite=True)
        write_losses(run.output_dir / "losses.csv", run.history["loss"], run.history["lr"])
        logger.info("exported %s (%d steps, final loss %.4f)", model_dir, step, final_loss)
    run.accelerator.wait_for_everyone()
    return model_dir


def _record(run: _Run, step: int, loss: float, lr: float, progress: ProgressCallback | None) -> None:
    if not math.isfinite(loss):
        raise VolgenError(f"the loss became {loss} at step {step}; lower training.learning_rate")
    run.history["loss"].append(loss)
    run.history["lr"].append(lr)
    if run.accelerator.is_main_process:
        every = run.config.training.log_every
        if step % every == 0:
            recent = run.history["loss"][-every:]
            logger.info("step %d/%d loss %.4f lr %.2e", step, run.end_step, sum(recent) / len(recent), lr)
        if progress is not None:
            progress(step, run.end_step, loss, lr)


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
        OutputError: ``output_dir`` already holds a run and ``resume`` is false; it is a file; it is,
            contains or lies inside an input, or would overwrite the config file
            (:func:`volgen.training.outputs.check_output_dir`).
        KeyboardInterrupt: SIGINT or SIGTERM during the loop, raised once the step under way is finished and
            its checkpoint saved (:class:`StopOnSignal`); ``resume=True`` continues from there.
    """
    cfg = config.training
    check_output_dir(config, resume=resume is not False and resume is not None)
    run = _setup(config, resolve_resume(config, resume))
    accelerator, output_dir = run.accelerator, run.output_dir
    config_path, losses_csv = output_dir / "config.yaml", output_dir / "losses.csv"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, config_path)
    accelerator.wait_for_everyone()

    run.model.train()
    step, last_preview, stopped_early = run.start_step, -1, False
    started = time.monotonic()
    signals = StopOnSignal()
    with signals:  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, then stop (KeyboardInterrupt)
        for batch in run.loader:
            loss, lr = _step(run, batch, step)
            step += 1
            _record(run, step, loss, lr, progress)
            stopped_early = _time_is_up(run, step, started)
            interrupted = signals.agreed(accelerator)
            if step % cfg.checkpoint_every == 0 or step == run.end_step or stopped_early or interrupted:
                run.checkpoint = save_checkpoint(
                    accelerator, run.ema, output_dir, step, run.history, config, run.data.label_map.to_dict()
                )
                if accelerator.is_main_process:
                    write_losses(losses_csv, run.history["loss"], run.history["lr"])
            if interrupted:
                logger.warning(
                    "interrupted after step %d; saved checkpoint %s (continue with --resume)",
                    step,
                    run.checkpoint,
                )
                raise KeyboardInterrupt(f"training interrupted after step {step}")
            if (cfg.preview_every and step % cfg.preview_every == 0) or step == run.end_step or stopped_early:
                _preview(run, step)
                last_preview = step
            if stopped_early:
                logger.info("max_minutes reached after %d steps", step)
                break

    if last_preview != step:
        _preview(run, step)
    tail = run.history["loss"][-100:]
    final_loss = float(sum(tail) / len(tail)) if tail else float("nan")
    model_dir = _export(run, step, final_loss)
    return TrainResult(
        model_dir=model_dir,
        steps=step,
        final_loss=final_loss,
        losses=list(run.history["loss"]),
        losses_csv=losses_csv,
        config_path=config_path,
        previews=run.previews,
        checkpoint=run.checkpoint,
        stopped_early=stopped_early,
    )
