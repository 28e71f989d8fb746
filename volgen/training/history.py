"""The loss history: ``losses.csv`` (step, loss, learning rate)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from volgen.types import PathLike


def write_losses(path: Path, losses: list[float], lrs: list[float]) -> None:
    from volgen.io import atomic_write

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss", "lr"])
    for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True), start=1):
        writer.writerow([i, repr(loss), repr(lr)])
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_text(buffer.getvalue(), encoding="utf-8")


def read_losses(path: PathLike) -> list[float]:
    """The loss column of a ``losses.csv`` written by :func:`train`."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]
