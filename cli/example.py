"""``volgen example``: copy the example segmentation shipped with volgen (no checkout needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from volgen.cli.app import app, console, handle_errors
from volgen.cli.checks import EXAMPLE_NAME, copy_example


@app.command()
@handle_errors
def example(
    path: Annotated[
        Path,
        typer.Argument(help="Where to copy it: a file name (.nii.gz), or a folder to put it in."),
    ] = Path("."),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Copy the example segmentation (Colin27 tissues, 2 mm, NIfTI; 57 KB) to PATH.

    Without copying: volgen generate example -o synthetic.nii.gz
    """
    from volgen.io import printable

    written = copy_example(path, overwrite=overwrite)
    console.print(f"[green]wrote[/] {printable(written)}", highlight=False)
    console.print(
        f"next: volgen generate {printable(written)} -o synthetic.nii.gz --preview synthetic.png "
        f"(or volgen generate {EXAMPLE_NAME} ... without a copy)",
        highlight=False,
        soft_wrap=True,
    )
