"""``volgen info``: what a volume or a model folder holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from volgen.cli.app import app, console, handle_errors, shown

#: Integer volumes with more distinct values than this are checked for being intensities (labels: a few
#: regions of constant value; intensities: values that change between most neighbouring voxels).
_CHECK_ABOVE_VALUES = 20
#: Below this fraction of equal neighbours (along x, both outside the background) a volume is intensities.
#: Measured: Colin27 T1 (uint8, 249 values) 0.09; its 2 mm tissue segmentation 0.89.
_LABEL_MIN_EQUAL_NEIGHBOURS = 0.5


def looks_like_intensities(array) -> bool:
    """Whether a non-negative integer volume (``(z, y, x)`` array) is an intensity image rather than a
    label map: in a segmentation most neighbouring foreground voxels share their value, in an image
    (a uint8 MRI, say) most do not."""
    import numpy as np

    values = np.asarray(array)
    found, counts = np.unique(values, return_counts=True)
    background = found[counts.argmax()]  # the most common value
    left, right = values[..., :-1], values[..., 1:]
    both = (left != background) & (right != background)
    if not both.any():
        return False
    return float((left[both] == right[both]).mean()) < _LABEL_MIN_EQUAL_NEIGHBOURS


def _fmt(values, digits: int = 4) -> str:
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"


@app.command()
@handle_errors
def info(
    path: Annotated[
        Path,
        typer.Argument(
            help="A volume (NIfTI, NRRD, MHA, DICOM folder, DICOM SEG), a model folder, or the name of an "
            "embedded model ('default'; see volgen models)."
        ),
    ],
    labels: Annotated[
        Path | None, typer.Option(help="Label map YAML (or preset name) to name the classes.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a volume's format, geometry, value range and labels, or a model folder's metadata."""
    from volgen.default_model import DEFAULT_NAME, FOLDER, embedded_model, embedded_models
    from volgen.errors import InputError
    from volgen.models import METADATA_FILE

    names = ", ".join([DEFAULT_NAME, *embedded_models()])
    if not path.exists():
        folder = embedded_model(str(path))
        if folder is None:
            raise InputError(path, f"file not found (embedded models by name: {names})")
        path = folder  # an embedded model by name; a file of that name would have won
    if path.is_dir() and (path / METADATA_FILE).is_file():
        _model_info(path, as_json)
        return
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if (p / METADATA_FILE).is_file())
        if inside:
            hint = f"; by name: volgen info {DEFAULT_NAME}" if path.resolve() == FOLDER else ""
            raise InputError(path, f"a folder of models, not a model: pick one of {', '.join(inside)}{hint}")
    _volume_info(path, labels, as_json)


def _volume_info(path: Path, labels: Path | None, as_json: bool) -> None:
    from volgen.io import describe
    from volgen.labels import load_label_map

    label_map = load_label_map(labels) if labels is not None else None
    info = describe(path)
    if info.is_label and not info.label_names and len(info.label_counts) > _CHECK_ABOVE_VALUES:
        import SimpleITK as sitk

        from volgen.io import read_volume

        if looks_like_intensities(sitk.GetArrayFromImage(read_volume(path, kind="image"))):
            info = describe(path, kind="image")  # e.g. a uint8 MRI, not a segmentation with 255 labels
    names: dict[int, str] = dict(info.label_names)
    if label_map is not None:
        for value, index in label_map.value_to_class().items():
            names[value] = label_map.class_names[index]
    if as_json:
        data = info.to_dict()
        if names:
            data["label_names"] = {str(k): v for k, v in names.items()}
        console.print_json(json.dumps(data))
        return
    g = info.geometry
    table = Table(title=shown(path), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", info.format)
    table.add_row("size (x, y, z)", " x ".join(map(str, g.size)))
    table.add_row("spacing (mm)", _fmt(g.spacing))
    table.add_row("origin (mm, LPS)", _fmt(g.origin))
    table.add_row("direction", _fmt(g.direction, 3))
    table.add_row("dtype", info.dtype)
    table.add_row("value range", f"{info.min:g} .. {info.max:g}")
    table.add_row("kind", "segmentation" if info.is_label else "intensity image")
    console.print(table)
    if info.is_label:
        counts = Table(title="labels", title_justify="left")
        for column in ("value", "name", "voxels", "volume (ml)"):
            counts.add_column(column, justify="right" if column != "name" else "left")
        for value, count in sorted(info.label_counts.items()):
            name = shown(names.get(value, "background" if value == 0 else ""))  # names come from the file
            if label_map is not None and value not in label_map.value_to_class():
                name = "[red]unknown to the label map[/]"
            counts.add_row(str(value), name, f"{count:,}", f"{info.volume_ml(value):.2f}")
        console.print(counts)


def _model_info(path: Path, as_json: bool) -> None:
    from volgen.models import load_model

    loaded = load_model(path)
    meta = loaded.metadata
    unet = loaded.unet.config
    params = sum(p.numel() for p in loaded.unet.parameters())
    if as_json:
        data = meta.model_dump(mode="json")
        data.update(model_id=loaded.model_id, parameters=params, weights_sha256=loaded.weights_sha256)
        console.print_json(json.dumps(data))
        return
    table = Table(title=f"model {shown(path)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("name", meta.name),
        ("id", loaded.model_id),
        ("description", meta.description),
        ("trained on", meta.trained_on),
        ("classes", ", ".join(f"{i}={n}" for i, n in enumerate(meta.label_map.class_names))),
        ("encoding", meta.encoding),
        ("context slices", str(meta.context_slices)),
        (
            "slice",
            f"{meta.slice_size} x {meta.slice_size} px, {meta.slice_axis}"
            if meta.pixel_spacing is None
            else f"native: whole slices at {meta.pixel_spacing:g} mm (trained on {meta.slice_size} px "
            f"crops), {meta.slice_axis}",
        ),
        *_trained_axes_row(meta),
        (
            "intensity",
            f"{meta.intensity.modality} {meta.intensity.low:g} .. {meta.intensity.high:g}"
            + (f" (percentiles {meta.intensity.percentiles})" if meta.intensity.modality == "MR" else " HU"),
        ),
        ("sampling", meta.sampling.options() or "volgen's defaults (volgen generate --help)"),
        ("UNet", f"{params:,} parameters, blocks {tuple(unet.block_out_channels)}, in {unet.in_channels} ch"),
        (
            "schedule",
            f"DDPM T={loaded.scheduler.config.num_train_timesteps}, "
            f"{loaded.scheduler.config.beta_schedule} betas",
        ),
    ]
    card = path / "README.md"
    if card.is_file():
        rows.append(("card", str(card)))
    for key, value in meta.training.items():
        if isinstance(value, str | int | float):
            rows.append((f"training.{key}", str(value)))
    for key, value in rows:  # names, descriptions and paths come from the model folder
        table.add_row(shown(key), shown(value))
    console.print(table)


def _trained_axes_row(meta: Any) -> list[tuple[str, str]]:
    """A multi-axis model's slice axes (what ``volgen generate --slice-axes`` accepts); none for one axis."""
    from volgen.multiaxis import model_axes

    axes = model_axes(meta.condition, meta.slice_axis)
    if len(axes) < 2:
        return []
    return [("slice axes", f"{', '.join(axes)} (volgen generate --slice-axes {','.join(axes)})")]
