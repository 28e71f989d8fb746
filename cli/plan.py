"""``volgen generate --dry-run``: the plan and the estimates of ``volgen batch --dry-run`` for one input.

The model is loaded (the estimate times one UNet forward); nothing is written and no voxel data is read.
The estimate is :func:`volgen.batch.dryrun.estimate_generation`, the one batch's dry run makes per item.
"""

from __future__ import annotations

from typing import Any

from volgen.cli.app import console, print_table, shown
from volgen.cli.checks import CheckedGeneration
from volgen.cli.options import ProgressMode, emit_json


def duration(seconds: float) -> str:
    """Seconds as ``12.3 s``, ``m:ss`` or ``h:mm:ss``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def generation_plan(
    checked: CheckedGeneration,
    *,
    device: str,
    precision: str,
    max_memory: int | None,
    progress: ProgressMode,
) -> Any:
    """Estimate ``checked`` (every sample) and show it: a table, or ``plan`` and ``estimate`` JSON events."""
    from volgen.batch.dryrun import estimate_generation, measure_time_model
    from volgen.generation import VolumeGenerator

    settings = checked.settings
    generator = VolumeGenerator(checked.model, device=device, precision=precision)
    generator.check(settings, reference=checked.reference is not None)
    time_model = measure_time_model(generator, slice_batch_size=settings.slice_batch_size)
    cost = estimate_generation(
        generator, checked.grid, settings, time_model, volumes=checked.samples, max_memory=max_memory
    )
    seconds = cost.seconds * checked.samples
    if progress == ProgressMode.json:
        emit_json(
            event="plan",
            input=str(checked.segmentation),
            samples=checked.samples,
            slices=cost.slices,
            steps=cost.steps,
            steps_asked=settings.num_inference_steps,
            passes=cost.passes,
            slice_forwards=cost.forwards,
            seconds=round(cost.seconds, 2),
            peak_bytes=cost.peak_bytes,
        )
        emit_json(
            event="estimate",
            items=checked.samples,
            seconds=round(seconds, 2),
            peak_bytes=cost.peak_bytes,
            how=time_model.how,
        )
        return cost
    from rich.table import Table

    table = Table(title=f"volgen generate --dry-run: {checked.samples} volume(s)")
    for name in ("input", "slices", "steps", "passes/step", "slice-forwards", "time", "memory"):
        table.add_column(name, justify="left" if name == "input" else "right", no_wrap=name != "input")
    table.add_row(
        shown(checked.segmentation.name),
        str(cost.slices),
        steps_shown(cost.steps, settings.num_inference_steps),
        str(cost.passes),
        f"{cost.forwards:,}",
        duration(seconds),
        f"{cost.peak_bytes / 2**20:.0f} MiB",
    )
    print_table(table)
    console.print(
        f"model: {shown(checked.model)}; passes/step: UNet passes per step (2: guided); slice-forwards: "
        f"slices padded to chunks of 8 × steps × passes; time model: {time_model.how}",
        highlight=False,
        soft_wrap=True,
    )
    console.print("nothing was written (dry run)", highlight=False)
    return cost


def steps_shown(run: int, asked: int) -> str:
    """The steps column: ``10``, or ``2 of 5`` when λ < 1 runs fewer than asked."""
    return str(run) if run == asked else f"{run} of {asked}"
