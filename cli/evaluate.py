"""``volgen evaluate`` (faithfulness, consistency, intensity realism), ``volgen train-segmenter`` and
``volgen evaluate-downstream`` (segmenters trained on real, synthetic and both, tested on real images)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from volgen import defaults
from volgen.cli.app import app, console, err_console, handle_errors, shown
from volgen.cli.options import (
    GuidanceOption,
    ModelOption,
    ProgressMode,
    RhoOption,
    SchedulerOption,
    StepsOption,
    UnknownLabelsOption,
    build_settings,
    notify_model,
    warn,
)


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _stat(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median']:.4g} [{stats['q25']:.4g}, {stats['q75']:.4g}]"


@app.command()
@handle_errors
def evaluate(
    cases: Annotated[
        Path,
        typer.Argument(
            help="CSV/YAML manifest (segmentation, generated[, real][, case]) or a folder with labels/, "
            "generated/ and optionally images/ (real volumes)."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Folder for evaluation.json, evaluation.png and planes.png.")
    ],
    segmenter: Annotated[
        str | None,
        typer.Option(
            help="A segmenter folder (volgen train-segmenter), or 'intensity': nearest class median fitted "
            "on the real volumes."
        ),
    ] = None,
    segmenter_command: Annotated[
        str | None,
        typer.Option(
            help="External segmenter: a command line with {input} and {output} (NIfTI paths), e.g. "
            "'TotalSegmentator -i {input} -o {output} --ml'."
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="Label map that maps the masks' values to classes: a YAML file, a preset name, or a model "
            "(folder or name, e.g. 'default'). Default: the segmenter's, else the label map of the model "
            "that generated the volumes (from their sidecars), else class numbers."
        ),
    ] = None,
    slice_axis: Annotated[
        str, typer.Option(help="The generator's slice axis: axial, coronal or sagittal.")
    ] = "axial",
    modality: Annotated[str, typer.Option(help="MR or CT (CT intensities are reported as HU).")] = "MR",
    unknown_labels: Annotated[
        str, typer.Option(help="Mask values the label map does not know: 'error' or 'background'.")
    ] = "error",
    planes: Annotated[
        bool,
        typer.Option(
            help="Per-plane consistency metrics and planes.png for cases with a real volume (about 10 "
            "float64 copies of a volume in memory at once; --no-planes for very large volumes)."
        ),
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace evaluation.json/png in OUT_DIR.")] = False,
) -> None:
    """Score generated volumes: faithfulness Dice, 3D consistency in every plane and intensity realism.

    With real volumes, a per-plane table compares generated with real in the axial, coronal and sagittal
    planes (neighbour differences inside and outside the body, texture correlation, power spectra, feature
    distance) and planes.png shows both side by side in all three planes.

    Example: volgen evaluate cases.csv eval/ --segmenter models/colin27-segmenter
    """
    from volgen.errors import VolgenError
    from volgen.evaluation import CommandSegmenter, evaluate_cases, find_evaluation_cases, write_report

    if (segmenter is None) == (segmenter_command is None):
        raise VolgenError(
            "choose one segmenter: --segmenter FOLDER, --segmenter intensity or --segmenter-command 'CMD'"
        )
    if slice_axis not in ("axial", "coronal", "sagittal"):
        raise VolgenError(f"--slice-axis must be axial, coronal or sagittal, got {slice_axis!r}")
    modality = modality.upper()
    if modality not in ("MR", "CT"):
        raise VolgenError(f"--modality must be MR or CT, got {modality!r}")
    if unknown_labels not in ("error", "background"):
        raise VolgenError(f"--unknown-labels must be error or background, got {unknown_labels!r}")
    label_map = _label_map(labels) if labels is not None else None
    found = find_evaluation_cases(cases)
    if label_map is None and (segmenter_command is not None or segmenter == "intensity"):
        label_map = _label_map_of_generator(found)
    if segmenter_command is not None:
        seg = CommandSegmenter(segmenter_command, label_map)
    elif segmenter == "intensity":
        seg = "intensity"
    else:
        from volgen.segmenter import load_segmenter

        seg = load_segmenter(Path(segmenter))

    with console.status("evaluating", spinner="dots") as status:
        report = evaluate_cases(
            found,
            seg,
            label_map=label_map,
            slice_axis=slice_axis,
            modality=modality,
            unknown_labels=unknown_labels,
            planes=planes,
            progress=lambda message: status.update(message),
        )
    json_path, png_path, planes_path = write_report(report, out_dir, overwrite=overwrite)
    _render(report)
    _render_planes(report)
    written = ", ".join(str(p) for p in (json_path, png_path, planes_path) if p is not None)
    console.print(f"wrote {shown(written)}", highlight=False)


def _label_map(labels: str):
    """``--labels``: a model folder or embedded model name gives its label map; otherwise a YAML file or a
    preset name (:func:`volgen.labels.load_label_map`)."""
    from volgen.default_model import embedded_model
    from volgen.labels import load_label_map
    from volgen.models import METADATA_FILE, read_metadata

    path = Path(labels)
    if (path / METADATA_FILE).is_file() or (not path.exists() and embedded_model(labels) is not None):
        return read_metadata(labels).label_map
    return load_label_map(labels)


def _label_map_of_generator(found):
    """The label map of the model that generated the cases (their sidecars), said on stderr; ``None``."""
    from volgen.evaluation.cases import generating_model

    model = generating_model(found)
    if model is None:
        return None
    folder, label_map = model
    err_console.print(
        f"[yellow]note:[/] classes named by the label map of {shown(folder)}, the model in the "
        "generated volumes' sidecars (--labels to choose another)",
        highlight=False,
        soft_wrap=True,
    )
    return label_map


def _render(report) -> None:
    summary = report.summary()
    cases = Table(title=shown(f"per case (segmenter: {report.segmenter})"), title_justify="left")
    for column in ("case", "faithfulness", "vs real pred", "seg. on real", "ratio z", "y", "x", "anisotropy"):
        cases.add_column(column, justify="left" if column == "case" else "right")
    for c in report.cases:
        ratio = c.consistency.ratio if c.consistency else {}
        cases.add_row(
            shown(c.case),
            _f(c.mean("faithfulness")),
            _f(c.mean("agreement")),
            _f(c.mean("segmenter_on_real")),
            _f(ratio.get("z")),
            _f(ratio.get("y")),
            _f(ratio.get("x")),
            _f(c.consistency.anisotropy if c.consistency else None),
        )
    if len(report.cases) > 1:
        cons = summary["consistency"] or {"ratio": {}, "anisotropy": None}
        cases.add_row(
            "[bold]mean",
            *(_f((summary[m] or {}).get("mean")) for m in ("faithfulness", "agreement", "segmenter_on_real")),
            *(_f(cons["ratio"].get(a)) for a in ("z", "y", "x")),
            _f(cons["anisotropy"]),
        )
    console.print(cases)

    classes = Table(
        title=shown(f"per class, mean over cases (Dice; intensity median [q25, q75], {report.units})"),
        title_justify="left",
    )
    for column in ("class", "faithfulness", "vs real pred", "seg. on real", "generated", "real"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for name in report.class_names:
        dices = [
            "-" if name == "background" or not summary[m] else _f(summary[m]["per_class"].get(name))
            for m in ("faithfulness", "agreement", "segmenter_on_real")
        ]
        stats = summary["intensity"].get(name, {})
        classes.add_row(
            shown(name), *dices, shown(_stat(stats.get("generated"))), shown(_stat(stats.get("real")))
        )
    console.print(classes)
    if summary["consistency"]:
        axis = report.cases[0].consistency.slice_axis if report.cases[0].consistency else "z"
        console.print(
            f"consistency: generated/real mean |neighbour difference| inside the body per array axis; 1.0 is "
            f"ideal; '{axis}' is the slice ({report.slice_axis}) axis",
            highlight=False,
        )


#: Columns of the per-plane table: (summary key, header).
_PLANE_COLUMNS = (
    ("step_ratio_body", "step body"),
    ("step_ratio_background", "step bg"),
    ("texture_ratio", "texture"),
    ("high_frequency_ratio", "HF power"),
    ("spectral_distance", "spectrum dist."),
    ("feature_distance", "feature dist."),
)


def _render_planes(report) -> None:
    planes = report.plane_summary()
    if not planes:
        return
    title = f"per plane, generated vs real (mean over {len(report.cases)} case(s); worst case in brackets)"
    table = Table(title=shown(title), title_justify="left")
    table.add_column("plane (⊥ axis)", justify="left")
    for _, header in _PLANE_COLUMNS:
        table.add_column(header, justify="right")
    for axis, entry in planes.items():
        cells = []
        for key, _ in _PLANE_COLUMNS:
            worst = entry.get(key + "_worst")
            show_worst = len(report.cases) > 1 and worst is not None
            cells.append(_f(entry[key]) + (f" [{_f(worst)}]" if show_worst else ""))
        table.add_row(shown(f"{entry['plane']} (⊥ {axis})"), *cells)
    console.print(table)
    floors = [c.planes[a].feature_floor for c in report.cases if c.planes for a in planes]
    console.print(
        "step: mean |neighbour difference| along the axis, inside the body and outside it (bg); texture: "
        "correlation of neighbouring planes' high-pass residuals; HF power: power at >= 0.25 cycles/voxel; "
        "ratios generated/real, 1.0 ideal (texture > 1: copied texture, streaks; < 1: flicker). Distances: 0 "
        f"ideal; feature distance of real even vs odd planes: {_f(float(sum(floors) / len(floors)))}",
        highlight=False,
    )


@app.command("train-segmenter")
@handle_errors
def train_segmenter(
    data: Annotated[
        Path, typer.Argument(help="Training data: a CSV/YAML manifest or a folder with images/ and labels/.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The segmenter folder to write.")],
    labels: Annotated[str, typer.Option(help="Label map (YAML or preset name, e.g. colin27).")],
    steps: Annotated[int, typer.Option(min=1, help="Optimisation steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per step.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate (cosine decay).")] = 1e-3,
    slice_size: Annotated[int, typer.Option(help="Slice size in pixels (square).")] = 64,
    slice_axis: Annotated[str, typer.Option(help="axial, coronal or sagittal.")] = "axial",
    channels: Annotated[str, typer.Option(help="UNet widths per level, comma-separated.")] = "16,32,64",
    modality: Annotated[str, typer.Option(help="MR (percentile normalisation) or CT (HU window).")] = "MR",
    unknown_labels: Annotated[
        str, typer.Option(help="Label values the label map does not know: 'error' or 'background'.")
    ] = "error",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Train a small 2D segmentation UNet on real data, for `volgen evaluate --segmenter`.

    Example: volgen train-segmenter data/colin27 -o models/colin27-segmenter --labels colin27 --steps 1000
    """
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from volgen.config import describe_validation_error
    from volgen.errors import VolgenError
    from volgen.segmenter import SegmenterConfig
    from volgen.segmenter import train_segmenter as run

    try:
        widths = [int(c) for c in channels.split(",") if c.strip()]
    except ValueError:
        raise VolgenError(f"--channels must be comma-separated integers, got {channels!r}") from None
    try:
        config = SegmenterConfig(
            label_map=labels,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            slice_size=slice_size,
            slice_axis=slice_axis,
            channels=widths,
            modality=modality.upper(),
            unknown_labels=unknown_labels,
            seed=seed,
        )
    except ValidationError as e:
        raise VolgenError(f"invalid option: {describe_validation_error(e)}") from None

    columns = (
        TextColumn("[bold]segmenter"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("train", total=config.steps, loss=float("nan"))
        result = run(
            data,
            output,
            config,
            overwrite=overwrite,
            progress=lambda step, total, loss: bar.update(task, completed=step, loss=loss),
        )
    scores = ", ".join(f"{k} {_f(v)}" for k, v in result.train_dice.items())
    console.print(
        f"trained {result.steps} steps on {result.slices} slices in {result.seconds:.0f} s, "
        f"final loss {result.final_loss:.4f}",
        highlight=False,
    )
    console.print(f"Dice on the training slices: {scores}", highlight=False)
    console.print(f"segmenter: {shown(result.folder)}", highlight=False)


@app.command("evaluate-downstream")
@handle_errors
def evaluate_downstream(
    data: Annotated[
        Path,
        typer.Argument(
            help="Real image/label pairs: a folder with images/ and labels/, an nnU-Net raw dataset "
            "(imagesTr/, labelsTr/) or a CSV/YAML manifest (image,label[,case]). With --test: the training "
            "pairs; with --split: all pairs."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder for downstream.json/csv/png, the synthetic images (synthetic/seed-S) and finished "
            "runs (runs/); a rerun reuses what is there."
        ),
    ],
    test: Annotated[
        Path | None, typer.Option(help="The real test pairs (a folder or manifest like DATA).")
    ] = None,
    split: Annotated[
        Path | None,
        typer.Option(
            help="A split of DATA: JSON/YAML with 'train' and 'test' lists of case ids, or nnU-Net's "
            "splits_final.json (--fold; its val cases are the test cases)."
        ),
    ] = None,
    fold: Annotated[int, typer.Option(min=0, help="The fold of an nnU-Net splits_final.json.")] = 0,
    model: ModelOption = None,
    seeds: Annotated[
        int, typer.Option(min=1, help="Repetitions; seed s is the generation and the segmenter seed.")
    ] = 3,
    synthetic_multiples: Annotated[
        str,
        typer.Option(help="Synthetic images per training label to compare, comma-separated (e.g. 1,2,4)."),
    ] = "1",
    segmenter: Annotated[
        str, typer.Option(help="volgen (a small 2D UNet, CPU) or nnunet (nnU-Net v2, needs nnUNetv2_train).")
    ] = "volgen",
    segmenter_steps: Annotated[int, typer.Option(min=1, help="volgen segmenter: optimisation steps.")] = 1000,
    segmenter_batch_size: Annotated[int, typer.Option(min=1, help="volgen segmenter: slices per step.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="volgen segmenter: AdamW learning rate.")] = 1e-3,
    channels: Annotated[str, typer.Option(help="volgen segmenter: UNet widths per level.")] = "16,32,64",
    nnunet_configuration: Annotated[
        str, typer.Option(help="nnU-Net configuration (2d, 3d_fullres, ...).")
    ] = "2d",
    nnunet_epochs: Annotated[
        int, typer.Option(min=1, help="nnU-Net epochs (a trainer nnUNetTrainer_<N>epochs must exist).")
    ] = 50,
    steps: StepsOption = None,
    scheduler: SchedulerOption = defaults.SCHEDULER,
    noise_correlation: RhoOption = defaults.NOISE_CORRELATION,
    guidance_scale: GuidanceOption = None,
    device: Annotated[str, typer.Option(help="Generation device: auto, cpu or cuda.")] = defaults.DEVICE,
    unknown_labels: UnknownLabelsOption = defaults.UNKNOWN_LABELS,
) -> None:
    """Downstream utility: train the same segmenter on real, synthetic and real + synthetic pairs, test each
    on real test pairs.

    Synthetic images are generated for the training labels only (through volgen batch, N seeds); every
    condition gets the same segmenter, budget and seed. Reports Dice per class, the mean and the worst seed,
    and writes downstream.json, downstream.csv and downstream.png.

    Example: volgen evaluate-downstream data/colin27 runs/downstream --split split.json --seeds 8
    """
    from volgen.default_model import resolve_model
    from volgen.errors import VolgenError
    from volgen.evaluation.downstream import (
        DownstreamOptions,
        read_split,
        run_downstream,
        write_downstream_report,
    )

    def integers(text: str, option: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise VolgenError(f"{option} must be comma-separated integers, got {text!r}") from None
        if not values:
            raise VolgenError(f"{option} is empty")
        return values

    settings = build_settings(
        steps=steps,
        scheduler=scheduler,
        noise_correlation=noise_correlation,
        guidance_scale=guidance_scale,
        unknown_labels=unknown_labels,
    )
    model_dir = resolve_model(model)
    options = DownstreamOptions(
        model=model_dir,
        seeds=seeds,
        multiples=integers(synthetic_multiples, "--synthetic-multiples"),
        settings=settings,
        segmenter=segmenter,
        steps=segmenter_steps,
        batch_size=segmenter_batch_size,
        learning_rate=learning_rate,
        channels=integers(channels, "--channels"),
        nnunet_configuration=nnunet_configuration,
        nnunet_epochs=nnunet_epochs,
        device=device,
        unknown_labels=unknown_labels,
    )
    options.check()
    found = read_split(data, test=test, split=split, fold=fold)
    notify_model(model_dir, ProgressMode.rich)
    with console.status("downstream evaluation", spinner="dots") as status:
        report = run_downstream(found, out_dir, options, progress=lambda message: status.update(message))
    for message in report.warnings:
        warn(message, ProgressMode.rich)
    _render_downstream(report)
    written = write_downstream_report(report, out_dir)
    console.print(f"wrote {shown(', '.join(str(p) for p in written))}", highlight=False)


def _render_downstream(report) -> None:
    summary = report.summary()
    seeds = max((entry["seeds"] for entry in summary.values()), default=0)
    table = Table(
        title=shown(f"Dice on the real test cases ({len(report.settings.get('test_cases', []))} case(s), "
                     f"{seeds} seed(s)): mean over seeds [worst seed]"),
        title_justify="left",
    )  # fmt: skip
    table.add_column("trained on", justify="left")
    for name in [*report.class_names, "mean"]:
        table.add_column(shown(name), justify="right")
    table.add_column("× real", justify="right")
    for condition, entry in summary.items():
        cells = [f"{_f(entry['mean'][n])} [{_f(entry['worst'][n])}]" for n in [*report.class_names, "mean"]]
        table.add_row(shown(condition), *cells, _f(entry["ratio"], 2))
    console.print(table)
