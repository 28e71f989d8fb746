"""``volgen train`` (train a slice model from a YAML config) and ``volgen import-checkpoint``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from volgen.cli.app import app, console, err_console, handle_errors, shown


def _is_main_process() -> bool:
    """Whether this is rank 0 of a torchrun / accelerate launch (or a plain single process)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Show volgen's log records on stderr (INFO with ``verbose``, else WARNING) while the command runs."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("volgen")
    handler = RichHandler(console=err_console, show_path=False, markup=False)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    previous = logger.level
    logger.addHandler(handler)
    if verbose and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _train_with_progress(cfg, resume: bool, run_train):
    """Run training under a rich progress bar (loss, lr, steps/s, ETA); return its result."""
    from collections import deque

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.2f} steps/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task("train", total=cfg.training.max_steps, loss=float("nan"), lr=0.0, rate=0.0)
        state = {"first": None}
        recent: deque[float] = deque(maxlen=50)

        def report(step: int, total: int, loss: float, lr: float) -> None:
            import time

            now = time.monotonic()
            if state["first"] is None:
                state["first"] = (step, now)
            first_step, first_time = state["first"]
            rate = (step - first_step) / (now - first_time) if now > first_time else 0.0
            recent.append(loss)
            smoothed = sum(recent) / len(recent)  # the mean of the last 50 steps: one step's loss is noisy
            bar.update(task, completed=step, total=total, loss=smoothed, lr=lr, rate=rate)

        result = run_train(cfg, resume=resume, progress=report)
    return result


@app.command()
@handle_errors
def train(
    config: Annotated[Path, typer.Argument(help="Training config (YAML); see configs/train/.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest checkpoint in the output folder.")
    ] = False,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override training.max_steps.")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(min=0.0, help="Stop after this many minutes (checkpoint and export).")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Override output_dir.")
    ] = None,
    unknown_labels: Annotated[
        str | None,
        typer.Option(
            help="Override data.unknown_labels: 'error' or 'background' for values the label map lacks."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log checkpoints, previews and losses.")
    ] = False,
) -> None:
    """Train a segmentation-guided slice model; the result is a model folder for `volgen generate --model`.

    Several processes: torchrun --nproc_per_node N -m volgen train CONFIG

    or: accelerate launch -m volgen train CONFIG (training.batch_size is the global batch).
    """
    from pydantic import ValidationError

    from volgen.config import describe_validation_error
    from volgen.errors import ConfigError
    from volgen.training import TrainConfig
    from volgen.training import train as run_train

    cfg = TrainConfig.from_yaml(config)
    try:
        if max_steps is not None:
            cfg.training.max_steps = max_steps
        if max_minutes is not None:
            cfg.training.max_minutes = max_minutes if max_minutes > 0 else None
        if unknown_labels is not None:
            cfg.data.unknown_labels = unknown_labels
    except ValidationError as e:  # an override out of range
        raise ConfigError(config, describe_validation_error(e)) from None
    if output_dir is not None:
        cfg.output_dir = output_dir.resolve()
    _check_training_data(Path(cfg.data.source), str(cfg.data.label_map))

    main = _is_main_process()
    with _logging(verbose or (main and not console.is_terminal)):
        if not main:
            run_train(cfg, resume=resume)
            return
        result = _train_with_progress(cfg, resume, run_train)

    stop = " (stopped by --max-minutes)" if result.stopped_early else ""
    console.print(f"trained {result.steps} steps{stop}, final loss {result.final_loss:.4f}", highlight=False)
    console.print(f"losses: {shown(result.losses_csv)}", highlight=False)
    if result.previews:
        console.print(f"preview: {shown(result.previews[-1])}", highlight=False)
    console.print(f"model: {shown(result.model_dir)}", highlight=False)


def _check_training_data(source: Path, label_map: str) -> None:
    """Missing training data: say how to make it (the Colin27 configs read what prepare.py writes)."""
    from volgen.errors import ConfigError

    if source.exists():
        return
    if "colin27" in label_map or "colin27" in source.name:
        hint = f"create it first: python examples/colin27/prepare.py {source}"
    else:
        hint = (
            "data.source must be a folder with images/ and labels/, or a CSV/YAML manifest (the Colin27 "
            "example makes one: python examples/colin27/prepare.py data/colin27)"
        )
    raise ConfigError(source, f"training data not found; {hint}")


def _parse_window(text: str | None) -> tuple[float, float] | None:
    from volgen.errors import VolgenError

    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise VolgenError(f"--ct-window must be LOW,HIGH in HU (e.g. -1000,1000), got {text!r}") from None
    if not high > low:
        raise VolgenError(f"--ct-window: HIGH must be greater than LOW, got {text!r}")
    return low, high


@app.command("import-checkpoint")
@handle_errors
def import_checkpoint(
    source: Annotated[
        Path, typer.Argument(help="A mazurowski-lab/segmentation-guided-diffusion model folder.")
    ],
    labels: Annotated[
        Path, typer.Option("--labels", help="Label map YAML (or preset name) of the checkpoint.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The volgen model folder to write.")],
    modality: Annotated[str, typer.Option(help="MR or CT: how to map intensities back.")] = "MR",
    ct_window: Annotated[
        str | None, typer.Option("--ct-window", help="CT: the HU window the PNGs were made with, LOW,HIGH.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name (default: the source folder's name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Turn a reference-implementation checkpoint (seed mask encoding) into a volgen model, no retraining.

    Example: volgen import-checkpoint ddpm-breast_mri-256-segguided --labels breast.yaml -o models/breast
    """
    from volgen.checkpoint_import import import_checkpoint as run_import
    from volgen.errors import VolgenError

    modality = modality.upper()
    if modality not in ("MR", "CT"):
        raise VolgenError(f"--modality must be MR or CT, got {modality!r}")
    folder = run_import(
        source,
        labels,
        output,
        modality=modality,
        ct_window=_parse_window(ct_window),
        name=name,
        overwrite=overwrite,
    )
    console.print(f"model: {shown(folder)}", highlight=False)
