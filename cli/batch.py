"""``volgen batch``: a folder or manifest of segmentations into synthetic volumes, resumable and sharded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from volgen import defaults
from volgen.cli.app import app, console, err_console, handle_errors, print_table, shown
from volgen.cli.generate import (
    AxisScheduleOption,
    BackgroundRhoOption,
    FineRhoOption,
    GuidanceOption,
    LateFractionOption,
    ModelOption,
    ProgressMode,
    QuietOption,
    ResamplingOption,
    RhoOption,
    SchedulerOption,
    SliceAxesOption,
    SliceBatchOption,
    StepsOption,
    UnknownLabelsOption,
    command_settings,
    emit_json,
    notify_model,
    notify_sampling,
)
from volgen.cli.plan import duration as _duration

if TYPE_CHECKING:
    from volgen.batch import BatchResult, ItemEstimate, ItemRecord, TimeModel


@app.command()
@handle_errors
def batch(
    input: Annotated[
        Path,
        typer.Argument(help="Folder of segmentations (DICOM series in subfolders), or a CSV/YAML manifest."),
    ],
    out_dir: Annotated[Path | None, typer.Argument(help="Output folder (created).")] = None,
    model: ModelOption = None,
    strength: Annotated[
        float,
        typer.Option(
            help="λ in [0, 1] (below 1 needs a 'reference' per case in the manifest; runs only the steps "
            "below λ, about λ × --steps: the dry run shows them)."
        ),
    ] = defaults.STRENGTH,
    keep: Annotated[
        str | None, typer.Option(help="Comma-separated classes to keep; the rest become background.")
    ] = None,
    drop: Annotated[
        str | None, typer.Option(help="Comma-separated classes to drop (become background).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Base seed; each case's seed derives from it and the case id.")
    ] = defaults.SEED,
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
    slice_batch_size: SliceBatchOption = defaults.SLICE_BATCH_SIZE,
    unknown_labels: UnknownLabelsOption = defaults.UNKNOWN_LABELS,
    samples_per_case: Annotated[
        int,
        typer.Option(
            help="Synthetic volumes per segmentation (outputs CASE_s0, CASE_s1, ...), generated together."
        ),
    ] = 1,
    output_format: Annotated[str, typer.Option("--format", help="nifti, nrrd, mha or dicom.")] = "nifti",
    layout: Annotated[
        str, typer.Option(help="flat (OUT_DIR/CASE.nii.gz) or nnunet (an nnU-Net v2 raw dataset).")
    ] = "flat",
    dataset_id: Annotated[int | None, typer.Option(help="nnU-Net dataset id (1-999).")] = None,
    dataset_name: Annotated[str | None, typer.Option(help="nnU-Net dataset name (DatasetNNN_NAME).")] = None,
    shard: Annotated[
        str | None, typer.Option(help="Do shard i of n (i/n, from 0), e.g. a SLURM array task.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="List cases, outputs and time/memory estimates; write nothing.")
    ] = False,
    merge: Annotated[
        bool, typer.Option(help="Merge the shard manifests of OUT_DIR into manifest.csv and exit.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda (one GPU per process under torchrun).")
    ] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 if native), fp32, fp16 or bf16.")] = "auto",
    max_memory: Annotated[
        str | None, typer.Option(help="Fail cases needing more than this (e.g. 8G); default 80% of free.")
    ] = None,
    copy_patient_info: Annotated[
        bool, typer.Option(help="DICOM output from DICOM input: copy patient identifiers.")
    ] = False,
    progress: Annotated[
        ProgressMode, typer.Option(help="rich bars, json lines on stdout, or none.")
    ] = ProgressMode.rich,
    quiet: QuietOption = False,
) -> None:
    """Convert every segmentation of INPUT into a synthetic volume in OUT_DIR.

    Resumable: run it again and finished cases are skipped (checked against their sidecars).

    A failing case is recorded in OUT_DIR/manifest.csv and the run goes on; the exit code is then 1.

    Scale out with --shard i/n (e.g. a SLURM array) or `torchrun --nproc_per_node N -m volgen batch ...`.
    """
    import logging

    from volgen.batch import BatchOptions, parse_shard
    from volgen.batch.cases import read_cases
    from volgen.default_model import resolve_model
    from volgen.generation import parse_memory, resolve_device
    from volgen.models import read_metadata

    if merge or out_dir is None:
        _merge_only(input, out_dir, merge, progress)
        return
    read_cases(input)  # the input (folder or manifest) first, before torch loads: a wrong path fails at once
    model_dir = resolve_model(model)  # a folder, or an embedded model by name
    options = BatchOptions(
        model=None if model is None else model_dir,
        settings=command_settings(locals()),
        samples_per_case=samples_per_case,
        output_format=output_format.lower(),
        layout=layout.lower(),
        dataset_id=dataset_id,
        dataset_name=dataset_name,
        device=device,
        precision=precision,
        max_memory=parse_memory(max_memory),
        copy_patient_info=copy_patient_info,
    )
    options.check()
    shard_spec = parse_shard(shard) if shard is not None else (0, 1)
    metadata = read_metadata(model_dir)
    resolve_device(device)  # a device this machine has, before any case is read
    if quiet:
        progress = ProgressMode.none if progress == ProgressMode.rich else progress
    else:
        notify_model(model_dir, progress)
        notify_sampling(metadata, options.settings, progress)
    logging.getLogger("volgen.api").setLevel(logging.ERROR)

    if dry_run:
        _dry_run(input, out_dir, options, shard_spec, progress)
        return
    _run(input, out_dir, options, shard_spec, progress)


# --------------------------------------------------------------------------------------------------- run


def _run(source: Path, out_dir: Path, options: Any, shard: tuple[int, int], progress: ProgressMode) -> None:
    from volgen.batch import process_group, run_batch

    group = process_group(options.device)
    mode = progress if group.is_main or progress == ProgressMode.json else ProgressMode.none
    # SIGTERM/SIGHUP unwind like Ctrl-C through handle_errors (cli.app), which covers the whole command
    if mode == ProgressMode.rich:
        with _RichObserver() as observer:
            result = run_batch(source, out_dir, options, shard=shard, observer=observer, group=group)
    else:
        observer = _JsonObserver(group.rank) if mode == ProgressMode.json else None
        result = run_batch(source, out_dir, options, shard=shard, observer=observer, group=group)
    if mode == ProgressMode.json:
        emit_json(
            event="summary",
            rank=group.rank,
            done=result.count("done"),
            skipped=result.count("skipped"),
            failed=result.count("failed"),
            elsewhere=len(result.elsewhere),
            seconds=round(result.seconds, 2),
            volumes_per_hour=round(result.volumes_per_hour, 2),
            manifest=str(result.manifest),
            dataset_json=None if result.dataset_json is None else str(result.dataset_json),
        )
    elif mode == ProgressMode.rich or group.is_main:
        _print_summary(result)
    group.barrier()  # ranks exit together: torchrun stops the others when one exits non-zero
    if not result.ok:
        raise typer.Exit(1)


def _print_summary(result: BatchResult) -> None:
    from rich.table import Table

    table = Table(title="volgen batch")
    for name in ("done", "skipped", "failed", "total time", "volumes/hour"):
        table.add_column(name, justify="right")
    failed = result.count("failed")
    table.add_row(
        f"[green]{result.count('done')}[/]",
        str(result.count("skipped")),
        f"[red]{failed}[/]" if failed else "0",
        _duration(result.seconds),
        f"{result.volumes_per_hour:.1f}",
    )
    console.print(table)
    for record in result.records:
        if record.status == "failed":
            console.print(
                f"[red]failed[/] {_shown(record.case)} (sample {record.sample}): {_shown(record.error)}",
                highlight=False,
            )
    if result.elsewhere:
        console.print(
            f"{len(result.elsewhere)} items were left to another run working on "
            f"{_shown(result.manifest.parent)}",
            highlight=False,
        )
    console.print(f"manifest: {_shown(result.manifest)}", highlight=False)
    if result.dataset_json is not None:
        console.print(f"nnU-Net dataset: {_shown(result.dataset_json.parent)}", highlight=False)


_shown = shown  # the one helper every terminal line goes through (volgen.cli.app.shown)


class _JsonObserver:
    """Progress as JSON lines on stdout (``--progress json``), each with the process's rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.started_at = time.perf_counter()

    def started(self, items: Any, *, total: int, shard: tuple[int, int]) -> None:
        emit_json(
            event="batch_start", rank=self.rank, items=len(items), total=total, shard=f"{shard[0]}/{shard[1]}"
        )

    def item_started(self, item: Any, index: int, count: int) -> None:
        self.item_at = time.perf_counter()
        emit_json(
            event="case_start",
            rank=self.rank,
            case=item.case.id,
            sample=item.sample,
            index=index + 1,
            count=count,
        )

    def item_progress(self, item: Any, p: Any) -> None:
        emit_json(
            event="progress",
            rank=self.rank,
            case=item.case.id,
            sample=item.sample,
            step=p.step + 1,
            steps=p.steps,
            slices_done=p.slices_done,
            slices_total=p.slices_total,
            fraction=round(p.slices_done / max(1, p.slices_total), 4),
            elapsed=round(time.perf_counter() - self.item_at, 2),
        )

    def item_finished(self, item: Any, record: ItemRecord, index: int, count: int) -> None:
        emit_json(
            event="case_done",
            rank=self.rank,
            case=record.case,
            sample=record.sample,
            status=record.status,
            seconds=round(record.seconds, 2),
            outputs=record.outputs,
            error=record.error or None,
            index=index + 1,
            count=count,
        )


class _RichObserver:
    """Two bars on stderr: cases done/total with ETA, and the current case's slices × steps."""

    def __enter__(self) -> _RichObserver:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        self.bar.__enter__()
        self.cases = self.bar.add_task("[bold]cases", total=None, unit="cases")
        self.slices = self.bar.add_task("", total=None, unit="slices×steps", visible=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def started(self, items: Any, *, total: int, shard: tuple[int, int]) -> None:
        note = f" (shard {shard[0]}/{shard[1]} of {total} items)" if shard[1] > 1 else ""
        self.bar.update(self.cases, total=len(items), description=f"[bold]cases{note}")

    def item_started(self, item: Any, index: int, count: int) -> None:
        name = (
            item.case.id
            if item.sample == 0 and item.name == item.case.id
            else f"{item.case.id} #{item.sample}"
        )
        self.bar.reset(self.slices, description=f"  {name}", visible=False)  # shown from its first report

    def item_progress(self, item: Any, p: Any) -> None:
        self.bar.update(self.slices, total=p.slices_total, completed=p.slices_done, visible=True)

    def item_finished(self, item: Any, record: ItemRecord, index: int, count: int) -> None:
        self.bar.update(self.slices, visible=False)
        self.bar.advance(self.cases)
        if record.status == "failed":
            self.bar.console.print(
                f"[red]failed[/] {_shown(record.case)}: {_shown(record.error)}", highlight=False
            )


# ------------------------------------------------------------------------------------------------- merge


def _merge_only(input: Path, out_dir: Path | None, merge: bool, progress: ProgressMode) -> None:
    """``--merge OUT_DIR`` (given as INPUT); without ``--merge`` a missing OUT_DIR is an error."""
    from volgen.errors import VolgenError

    if not merge:
        raise VolgenError("missing OUT_DIR: volgen batch INPUT OUT_DIR")
    if out_dir is not None:
        raise VolgenError("--merge takes only OUT_DIR: volgen batch --merge OUT_DIR")
    _merge(input, progress)


def _merge(out_dir: Path, progress: ProgressMode) -> None:
    from volgen.batch import MANIFEST_NAME, merge_manifests

    records = merge_manifests(out_dir)
    counts = {s: sum(r.status == s for r in records) for s in ("done", "skipped", "failed")}
    if progress == ProgressMode.json:
        emit_json(event="merged", manifest=str(out_dir / MANIFEST_NAME), items=len(records), **counts)
    else:
        console.print(
            f"merged {len(records)} items into {_shown(out_dir / MANIFEST_NAME)}: {counts['done']} done, "
            f"{counts['skipped']} skipped, {counts['failed']} failed",
            highlight=False,
        )
    if counts["failed"]:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------- dry run


def _dry_run(
    source: Path, out_dir: Path, options: Any, shard: tuple[int, int], progress: ProgressMode
) -> None:
    from volgen.batch import (
        estimate_plan,
        make_generator,
        measure_time_model,
        prepare,
        select_shard,
        total_seconds,
    )

    plan, loaded = prepare(source, out_dir, options)
    items = select_shard(plan.items, *shard)
    generator = make_generator(loaded, options.device, options)
    time_model = measure_time_model(generator, slice_batch_size=options.settings.slice_batch_size)
    estimates = estimate_plan(plan, generator, time_model, items)
    if progress == ProgressMode.json:
        for e in estimates:
            emit_json(
                event="plan",
                case=e.item.case.id,
                sample=e.item.sample,
                input=str(e.item.case.segmentation),
                outputs=[str(p) for p in e.item.outputs],
                seed=e.item.settings.seed,
                state=e.state,
                slices=e.slices,
                steps=e.steps,
                steps_asked=e.item.settings.num_inference_steps,
                passes=e.passes,
                slice_forwards=e.forwards,
                seconds=None if e.seconds is None else round(e.seconds, 2),
                peak_bytes=e.peak_bytes,
            )
        emit_json(
            event="estimate",
            items=len(estimates),
            seconds=round(total_seconds(estimates), 2),
            peak_bytes=max((e.peak_bytes or 0 for e in estimates), default=0),
            how=time_model.how,
        )
        return
    _print_plan(estimates, time_model, plan.out_dir)


def _print_plan(estimates: list[ItemEstimate], time_model: TimeModel, out_dir: Path) -> None:
    from rich.table import Table

    from volgen.batch import total_seconds
    from volgen.cli.plan import steps_shown

    table = Table(title=f"volgen batch --dry-run: {len(estimates)} items -> {_shown(out_dir)}")
    table.add_column("case", overflow="fold")
    table.add_column("seed", justify="right", no_wrap=True)
    table.add_column("input", overflow="fold")
    table.add_column("output", overflow="fold")
    table.add_column("slices", justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("passes/step", justify="right", no_wrap=True)
    table.add_column("slice-forwards", justify="right", no_wrap=True)
    table.add_column("time", justify="right")
    table.add_column("memory", justify="right")
    table.add_column("state")
    for e in estimates:
        item = e.item
        table.add_row(
            item.case.id if item.name == item.case.id else f"{item.case.id} #{item.sample}",
            str(item.settings.seed),
            _shown(item.case.segmentation.name),
            _shown(_relative(item.output, out_dir)),
            "" if e.slices is None else str(e.slices),
            "" if e.steps is None else steps_shown(e.steps, item.settings.num_inference_steps),
            "" if e.passes is None else str(e.passes),
            "" if e.forwards is None else f"{e.forwards:,}",
            "" if e.seconds is None else _duration(e.seconds),
            "" if e.peak_bytes is None else f"{e.peak_bytes / 2**20:.0f} MiB",
            f"[red]{_shown(e.state)}[/]" if e.state.startswith("would fail") else _shown(e.state),
        )
    print_table(table)
    peak = max((e.peak_bytes or 0 for e in estimates), default=0)
    console.print(
        f"estimated total: {_duration(total_seconds(estimates))} in one process; largest peak memory "
        f"{peak / 2**20:.0f} MiB (this process with the model loaded + volume arrays + one chunk's "
        "activations + an allowance for writing)",
        highlight=False,
    )
    console.print(
        f"time model: {time_model.how}; steps: denoising steps run (λ < 1 runs fewer than asked); "
        "passes/step: UNet passes per step (2: guided); slice-forwards: slices padded to chunks of 8 × steps "
        "× passes",
        highlight=False,
        soft_wrap=True,
    )
    console.print("nothing was written (dry run)", highlight=False)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)
