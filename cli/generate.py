"""``volgen generate``: one segmentation in, one synthetic volume out (or ``--samples N`` of them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from volgen import defaults
from volgen.cli.app import all_or_nothing, app, console, err_console, handle_errors, shown
from volgen.cli.checks import check_generation, example_or
from volgen.cli.options import (  # noqa: F401 - re-exported for volgen.cli.batch
    AxisScheduleOption,
    BackgroundRhoOption,
    FineRhoOption,
    GuidanceOption,
    LateFractionOption,
    ModelOption,
    PrecisionOption,
    ProgressMode,
    QuietOption,
    ResamplingOption,
    RhoOption,
    SchedulerOption,
    SliceAxesOption,
    SliceBatchOption,
    StepsNote,
    StepsOption,
    StrengthOption,
    UnknownLabelsOption,
    X0SmoothingOption,
    build_settings,
    command_settings,
    emit_json,
    notify_model,
    notify_resolution,
    notify_sampling,
    split_names,
    warn,
)
from volgen.io.naming import DEFAULT_OUTPUT_HELP


@app.command()
@handle_errors
def generate(
    segmentation: Annotated[
        Path,
        typer.Argument(
            help="Label volume: NIfTI, NRRD, MHA, DICOM folder or DICOM SEG; 'example': the example "
            "segmentation shipped with volgen."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=f"Output volume (format by extension) or DICOM folder. Default: {DEFAULT_OUTPUT_HELP}.",
        ),
    ] = None,
    model: ModelOption = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Real image for adjustable anatomy (λ), on the segmentation's grid."),
    ] = None,
    resample_reference: Annotated[
        bool,
        typer.Option(help="Resample --reference onto the segmentation's grid (linear) if its grid differs."),
    ] = False,
    strength: StrengthOption = defaults.STRENGTH,
    keep: Annotated[
        str | None, typer.Option(help="Comma-separated classes to keep; the rest become background.")
    ] = None,
    drop: Annotated[
        str | None, typer.Option(help="Comma-separated classes to drop (become background).")
    ] = None,
    seed: Annotated[int, typer.Option(help=f"Random seed, 0..{defaults.MAX_SEED}.")] = defaults.SEED,
    samples: Annotated[
        int,
        typer.Option(
            help="Volumes to generate together, seeds SEED, SEED+1, ...; written as OUTPUT_s0.EXT, "
            "OUTPUT_s1.EXT, ... (one: OUTPUT), each with its sidecar."
        ),
    ] = defaults.SAMPLES,
    scheduler: SchedulerOption = defaults.SCHEDULER,
    steps: StepsOption = None,
    noise_correlation: RhoOption = defaults.NOISE_CORRELATION,
    fine_noise_correlation: FineRhoOption = defaults.FINE_NOISE_CORRELATION,
    background_fine_noise_correlation: BackgroundRhoOption = None,
    guidance_scale: GuidanceOption = None,
    slice_axes: SliceAxesOption = defaults.SLICE_AXES,  # type: ignore[assignment]
    axis_schedule: AxisScheduleOption = defaults.AXIS_SCHEDULE,
    late_fraction: LateFractionOption = defaults.LATE_FRACTION,
    resampling: ResamplingOption = defaults.RESAMPLING,
    x0_smoothing: X0SmoothingOption = defaults.X0_SMOOTHING,
    slice_batch_size: SliceBatchOption = defaults.SLICE_BATCH_SIZE,
    unknown_labels: UnknownLabelsOption = defaults.UNKNOWN_LABELS,
    output_format: Annotated[
        str | None, typer.Option("--format", help="nifti, nrrd, mha or dicom (default: by extension).")
    ] = None,
    preview: Annotated[
        Path | None,
        typer.Option(help="Also write a PNG montage (optional: if it fails, the volume is kept; a warning)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = defaults.DEVICE,
    precision: PrecisionOption = defaults.PRECISION,
    max_memory: Annotated[
        str | None, typer.Option(help="Refuse volumes needing more than this (e.g. 8G); default 80% of free.")
    ] = None,
    copy_patient_info: Annotated[
        bool, typer.Option(help="DICOM output: copy patient identifiers from a DICOM input.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    progress: Annotated[
        ProgressMode, typer.Option(help="rich bar, json lines on stdout, or none.")
    ] = ProgressMode.rich,
    quiet: QuietOption = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Check everything, then show the plan (slices, steps, UNet passes) and the time and memory "
            "estimates of volgen batch --dry-run; write nothing."
        ),
    ] = False,
) -> None:
    """Generate a synthetic image volume whose anatomy follows SEGMENTATION, on the same grid.

    SEGMENTATION 'example' is the example segmentation shipped with volgen (volgen example PATH copies it).

    Paths, formats and options are checked before the model loads. --dry-run then loads the model, times one
    UNet forward and shows the plan (slices, steps, UNet passes) with time and memory estimates, writing
    nothing.
    """
    import logging

    from volgen.generation import generate_samples, parse_memory
    from volgen.generation.files import output_identities

    segmentation, output = example_or(segmentation, output)
    asked = command_settings(locals())
    checked = check_generation(
        segmentation,
        output,
        model=model,
        reference=reference,
        samples=samples,
        preview=preview,
        output_format=output_format,
        overwrite=overwrite,
        precision=precision,
        settings=asked,
    )
    limit = parse_memory(max_memory)
    mode = ProgressMode.none if quiet and progress == ProgressMode.rich else progress
    if not quiet:
        notify_model(checked.model, mode)
        notify_sampling(checked.metadata, asked, mode)
        notify_resolution(checked.metadata, checked.grid, mode, checked.model)
    if dry_run:
        from volgen.cli.plan import generation_plan

        generation_plan(checked, device=device, precision=precision, max_memory=limit, progress=mode)
        return
    kwargs: dict[str, Any] = dict(
        samples=samples,
        model=checked.model if model is not None else None,
        settings=checked.settings,
        reference=reference,
        resample_reference=resample_reference,
        output_format=output_format,
        overwrite=overwrite,
        preview=preview,
        device=device,
        precision=precision,
        max_memory=limit,
        copy_patient_info=copy_patient_info,
    )
    logging.getLogger("volgen.generation").setLevel(logging.ERROR)  # the CLI renders notes and warnings

    steps_note = StepsNote(checked.settings, mode, quiet=quiet)
    before = output_identities(segmentation, output, samples=samples, preview=preview)
    with all_or_nothing(before) as finished:  # a signal after the last write: success, not half a result
        if mode == ProgressMode.json:
            _run_json(segmentation, output, kwargs, generate_samples, steps_note, finished)
            steps_note.finish()
            return
        if mode == ProgressMode.none:
            results = generate_samples(segmentation, output, progress=steps_note.report, **kwargs)
        else:
            results = _run_rich(segmentation, output, kwargs, generate_samples, steps_note)
        finished()
        steps_note.finish()
        if quiet:  # warnings only
            for message in (m for result in results for m in result.warnings):
                warn(message, progress)
            return
        for result in results:
            console.print(
                f"[green]wrote[/] {shown(result.output)}  ({result.seconds:.1f} s on {result.device})",
                highlight=False,
                soft_wrap=True,  # one line however long the path: programs read it
            )
            if result.preview is not None:
                console.print(f"[green]preview[/] {shown(result.preview)}", highlight=False, soft_wrap=True)
            for message in result.warnings:
                warn(message, progress)


def _run_json(
    segmentation: Path,
    output: Path | None,
    kwargs: dict[str, Any],
    run_generate: Any,
    note: StepsNote,
    finished: Any,
) -> list[Any]:
    """``--progress json``: start, progress, warning, done (or error) events, one JSON object a line.

    ``done`` names the output and sidecar (the first sample's) and lists every sample's in ``outputs`` and
    ``sidecars``; ``seconds`` is the whole run."""
    from volgen.errors import VolgenError

    started = time.perf_counter()
    emit_json(event="start", segmentation=str(segmentation))

    def report(p) -> None:
        note.report(p)
        emit_json(
            event="progress",
            step=p.step + 1,
            steps=p.steps,
            slices_done=p.slices_done,
            slices_total=p.slices_total,
            fraction=round(p.slices_done / max(1, p.slices_total), 4),
            elapsed=round(time.perf_counter() - started, 2),
        )

    try:
        results = run_generate(segmentation, output, progress=report, **kwargs)
    except VolgenError as e:
        emit_json(event="error", message=str(e))
        raise
    finished()
    for result in results:
        for message in result.warnings:
            warn(message, ProgressMode.json)
    first = results[0]
    emit_json(
        event="done",
        output=str(first.output),
        sidecar=str(first.sidecar),
        preview=None if first.preview is None else str(first.preview),
        seconds=round(results[-1].seconds, 2),
        outputs=[str(r.output) for r in results],
        sidecars=[str(r.sidecar) for r in results],
    )
    return results


def _run_rich(
    segmentation: Path, output: Path | None, kwargs: dict[str, Any], run_generate: Any, note: StepsNote
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("slices×steps"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("generate", total=None)

        def report(p) -> None:
            note.report(p)
            bar.update(task, total=p.slices_total, completed=p.slices_done)

        return run_generate(segmentation, output, progress=report, **kwargs)
