"""``volgen generate``: one segmentation in, one synthetic volume out."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from volgen.cli.app import app, console, err_console, handle_errors

# Options shared by `generate` and `batch` (same names, help and meaning).
SchedulerOption = Annotated[str, typer.Option(help="ddpm, ddim, dpmsolver++ or euler.")]
StepsOption = Annotated[int, typer.Option(help="Denoising steps.")]
RhoOption = Annotated[
    float,
    typer.Option("--noise-correlation", "--rho", help="ρ: initial-noise correlation between slices."),
]
SliceBatchOption = Annotated[int, typer.Option(help="Slices per UNet forward (does not change the result).")]
UnknownLabelsOption = Annotated[
    str, typer.Option(help="Label values the model does not know: 'error' or 'background'.")
]


class ProgressMode(str, Enum):
    rich = "rich"
    json = "json"
    none = "none"


def split_names(text: str | None) -> list[str] | None:
    """``"liver,kidney"`` -> ``["liver", "kidney"]``; ``None`` stays ``None``."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names


def build_settings(
    *,
    seed: int,
    scheduler: str,
    steps: int,
    noise_correlation: float,
    strength: float,
    keep: str | None,
    drop: str | None,
    unknown_labels: str,
    precision: str,
    slice_batch_size: int,
    x0_smoothing: float = 0.0,
):
    """The generation settings shared by ``generate`` and ``batch``, from their command-line values."""
    from volgen.api import GenerateSettings
    from volgen.errors import VolgenError

    if unknown_labels not in ("error", "background"):
        raise VolgenError(f"--unknown-labels must be 'error' or 'background', got {unknown_labels!r}")
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise VolgenError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    return GenerateSettings(
        seed=seed,
        scheduler=scheduler,
        num_inference_steps=steps,
        noise_correlation=noise_correlation,
        x0_smoothing=x0_smoothing,
        strength=strength,
        keep=split_names(keep),
        drop=split_names(drop),
        unknown_labels=unknown_labels,
        slice_batch_size=slice_batch_size,
    )


def notify_default_model(progress: ProgressMode) -> None:
    """Say, once, that the embedded default model is in use and what it was trained on."""
    from volgen.api import default_model_dir
    from volgen.models import read_metadata

    note = (
        f"using the embedded default model, trained on {read_metadata(default_model_dir()).trained_on}; "
        "real use needs --model trained on real data"
    )
    if progress == ProgressMode.json:
        emit_json(event="notice", message=note)
    else:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)


def emit_json(**event: object) -> None:
    """One JSON object per line on stdout (the contract with the Slicer module and other programs)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


@app.command()
@handle_errors
def generate(
    segmentation: Annotated[
        Path, typer.Argument(help="Label volume: NIfTI, NRRD, MHA, DICOM folder or DICOM SEG.")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output volume (format by extension) or DICOM folder."),
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Model folder (default: the embedded model).")] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Real image on the segmentation's grid, for adjustable anatomy (λ).")
    ] = None,
    strength: Annotated[
        float, typer.Option(help="λ in [0, 1]: 0 returns the reference, 1 generates freely.")
    ] = 1.0,
    keep: Annotated[
        str | None, typer.Option(help="Comma-separated classes to keep; the rest become background.")
    ] = None,
    drop: Annotated[
        str | None, typer.Option(help="Comma-separated classes to drop (become background).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    scheduler: SchedulerOption = "dpmsolver++",
    steps: StepsOption = 20,
    noise_correlation: RhoOption = 0.99,
    x0_smoothing: Annotated[
        float, typer.Option(help="σ in slices of through-plane smoothing of the x0 prediction (0: off).")
    ] = 0.0,
    slice_batch_size: SliceBatchOption = 16,
    unknown_labels: UnknownLabelsOption = "error",
    output_format: Annotated[
        str | None, typer.Option("--format", help="nifti, nrrd, mha or dicom (default: by extension).")
    ] = None,
    preview: Annotated[
        Path | None, typer.Option(help="Also write a PNG montage of input and result.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16 (CUDA autocast).")] = "auto",
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
) -> None:
    """Generate a synthetic image volume whose anatomy follows SEGMENTATION, on the same grid."""
    import logging

    from volgen.api import generate as run_generate
    from volgen.api import parse_memory
    from volgen.errors import VolgenError

    settings = build_settings(
        seed=seed,
        scheduler=scheduler,
        steps=steps,
        noise_correlation=noise_correlation,
        x0_smoothing=x0_smoothing,
        strength=strength,
        keep=keep,
        drop=drop,
        unknown_labels=unknown_labels,
        precision=precision,
        slice_batch_size=slice_batch_size,
    )
    if model is None:
        notify_default_model(progress)
    logging.getLogger("volgen.api").setLevel(logging.ERROR)

    kwargs = dict(
        model=model,
        settings=settings,
        reference=reference,
        output_format=output_format,
        overwrite=overwrite,
        preview=preview,
        device=device,
        precision=precision,
        max_memory=parse_memory(max_memory),
        copy_patient_info=copy_patient_info,
    )
    if progress == ProgressMode.json:
        started = time.perf_counter()
        emit_json(event="start", segmentation=str(segmentation))

        def report(p) -> None:
            fraction = p.slices_done / max(1, p.slices_total)
            elapsed = time.perf_counter() - started
            emit_json(
                event="progress",
                step=p.step + 1,
                steps=p.steps,
                slices_done=p.slices_done,
                slices_total=p.slices_total,
                fraction=round(fraction, 4),
                elapsed=round(elapsed, 2),
            )

        try:
            result = run_generate(segmentation, output, progress=report, **kwargs)
        except VolgenError as e:
            emit_json(event="error", message=str(e))
            raise
        emit_json(
            event="done",
            output=str(result.output),
            sidecar=str(result.sidecar),
            preview=None if result.preview is None else str(result.preview),
            seconds=round(result.seconds, 2),
        )
        return

    if progress == ProgressMode.none:
        result = run_generate(segmentation, output, **kwargs)
    else:
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
                bar.update(task, total=p.slices_total, completed=p.slices_done)

            result = run_generate(segmentation, output, progress=report, **kwargs)
    console.print(
        f"[green]wrote[/] {result.output}  ({result.seconds:.1f} s on {result.device})", highlight=False
    )
    if result.preview is not None:
        console.print(f"[green]preview[/] {result.preview}", highlight=False)
