"""``volgen models``: the models embedded in the package, by name, with their cards."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from volgen.cli.app import app, console, handle_errors, shown


@app.command()
@handle_errors
def models(
    card: Annotated[
        str | None, typer.Option(help="Print this embedded model's card (its README.md), e.g. 'default'.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the embedded models (usable by name: `volgen info NAME`) and where they are."""
    from volgen.api import default_model_dir
    from volgen.default_model import CARD_FILE, DEFAULT_NAME, embedded_model, embedded_models
    from volgen.errors import InputError
    from volgen.models import read_metadata

    if card is not None:
        folder = embedded_model(card)
        if folder is None:
            raise InputError(card, "no embedded model of that name (volgen models lists them)")
        console.print((folder / CARD_FILE).read_text(encoding="utf-8"), markup=False, highlight=False)
        return
    default = default_model_dir().resolve()
    rows, metas = [], []
    for name, folder in embedded_models().items():
        meta = read_metadata(folder)
        metas.append(meta)
        rows.append(
            {
                "name": name,
                "default": folder.resolve() == default,
                "description": meta.description,
                "trained_on": meta.trained_on,
                "classes": meta.label_map.class_names,
                "pixel_spacing": meta.pixel_spacing,
                "slice_size": meta.slice_size,
                "sampling": meta.sampling.model_dump(mode="json"),
                "path": str(folder),
                "card": str(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None,
            }
        )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="embedded models", title_justify="left")
    for column in ("name", "slices", "sampling", "classes", "trained on", "folder"):
        table.add_column(column, overflow="fold")
    for row, meta in zip(rows, metas, strict=True):
        name = row["name"] + (f" ({DEFAULT_NAME})" if row["default"] else "")
        pixel = meta.pixel_spacing
        slices = f"{meta.slice_size} px, fitted" if pixel is None else f"native, {pixel:g} mm"
        table.add_row(
            shown(name),
            slices,
            shown(meta.sampling.options() or "volgen's"),
            shown(", ".join(row["classes"])),
            shown(row["trained_on"]),
            shown(row["path"]),
        )
    console.print(table)
    console.print(
        f"Details: volgen info NAME (e.g. volgen info {DEFAULT_NAME}); card: volgen models --card NAME",
        highlight=False,
    )
