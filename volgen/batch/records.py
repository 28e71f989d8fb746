"""The run's manifest: one CSV row per work item (``manifest.csv``, or one file per shard).

The manifest is a log: each finished item is *appended* as one row (one ``write`` under an exclusive lock, so
concurrent runs on one folder do not interleave), never rewritten per item. A reader takes the last row of
each (case, sample); :func:`compact_manifest` rewrites the file once, sorted, one row per item, at the end of
a run. Cells that a spreadsheet would read as a formula are written with a leading ``'``
(:func:`volgen.io.manifest.spreadsheet_safe`) and read back without it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import IO

from volgen.errors import InputError
from volgen.io.atomic import atomic_write
from volgen.io.manifest import from_spreadsheet_safe, spreadsheet_safe
from volgen.types import PathLike

MANIFEST_NAME = "manifest.csv"
#: Columns of ``manifest.csv`` (and of the shard manifests).
MANIFEST_COLUMNS = ("case", "sample", "input", "outputs", "seed", "status", "seconds", "error")
STATUSES = ("done", "skipped", "failed")
_SHARD_MANIFEST = re.compile(r"^manifest\.shard-(\d+)-of-(\d+)\.csv$")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks (one run per folder there)
    fcntl = None  # type: ignore[assignment]


@dataclass
class ItemRecord:
    """One row of the manifest: what happened to one work item.

    Attributes:
        case: Case id.
        sample: Sample index.
        input: The segmentation.
        outputs: Output paths relative to OUT_DIR (output, sidecar, label).
        seed: The seed used.
        status: ``done``, ``skipped`` (complete from an earlier run) or ``failed``.
        seconds: Wall time of the item.
        error: The error of a failed item (one line).
    """

    case: str
    sample: int
    input: str
    outputs: list[str]
    seed: int
    status: str
    seconds: float = 0.0
    error: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.case, self.sample)

    def to_row(self) -> dict[str, str]:
        """The CSV cells (text cells made spreadsheet-safe)."""
        return {
            "case": spreadsheet_safe(self.case),
            "sample": str(self.sample),
            "input": spreadsheet_safe(self.input),
            "outputs": spreadsheet_safe(";".join(self.outputs)),
            "seed": str(self.seed),
            "status": self.status,
            "seconds": f"{self.seconds:.3f}",
            "error": spreadsheet_safe(self.error),
        }

    @classmethod
    def from_row(cls, row: dict[str, str]) -> ItemRecord:
        row = {k: from_spreadsheet_safe(v) if isinstance(v, str) else v for k, v in row.items()}
        return cls(
            case=row["case"],
            sample=int(row["sample"]),
            input=row["input"],
            outputs=[p for p in row["outputs"].split(";") if p],
            seed=int(row["seed"]),
            status=row["status"],
            seconds=float(row["seconds"] or 0),
            error=row.get("error") or "",
        )


def _csv_text(records: Iterable[ItemRecord], *, header: bool) -> str:
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(r.to_row() for r in records)
    # a file name that is not UTF-8 (held as surrogates by Python) is written escaped
    return buffer.getvalue()


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[bytes]]:
    """``path`` opened for appending (created if missing) under an exclusive lock; reopened when another
    process replaced the file (:func:`compact_manifest`) while this one waited for the lock."""
    while True:
        f = open(path, "ab")  # noqa: SIM115 - closed below
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield f
                return
        finally:
            f.close()  # also releases the lock


def append_record(path: Path, record: ItemRecord) -> None:
    """Append one row to the manifest ``path`` (with the header when the file is new or empty)."""
    with _locked(path) as f:
        header = f.seek(0, os.SEEK_END) == 0
        f.write(_encode(_csv_text([record], header=header)))
        f.flush()


def write_manifest(path: Path, records: Iterable[ItemRecord]) -> Path:
    """Write records as CSV (sorted by case and sample), atomically (replacing the file)."""
    rows = sorted(records, key=lambda r: r.key)
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_bytes(_encode(_csv_text(rows, header=True)))
    return path


def compact_manifest(path: Path) -> list[ItemRecord]:
    """Rewrite a manifest log as one row per item (the last one), sorted; return the records.

    Holds the log's lock while it reads and replaces it, so no concurrent append is lost.
    """
    if not path.is_file():
        return []
    with _locked(path):
        records = read_manifest(path)
        write_manifest(path, records)
    return records


def read_manifest(path: PathLike) -> list[ItemRecord]:
    """Read a manifest: the last row of each (case, sample), sorted by case and sample."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            latest = {}
            for row in csv.DictReader(f):
                record = ItemRecord.from_row(row)
                latest[record.key] = record
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputError(path, f"not a volgen batch manifest ({e})") from None
    return sorted(latest.values(), key=lambda r: r.key)


def shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index:03d}-of-{count:03d}.csv"


def shard_manifests(out_dir: PathLike) -> list[Path]:
    """The shard manifests in ``out_dir``, oldest first (by modification time)."""
    folder = Path(out_dir)
    found = [p for p in folder.iterdir() if _SHARD_MANIFEST.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def merge_manifests(out_dir: PathLike) -> list[ItemRecord]:
    """Merge the shard manifests of ``out_dir`` into ``manifest.csv``; return its records.

    An item listed by several shard manifests (left from runs with another number of shards) takes its row
    from the most recently written one. nnU-Net ``dataset.json`` files in ``out_dir`` get their
    ``numTraining`` recounted.

    Raises:
        InputError: ``out_dir`` holds no shard manifests.
    """
    out_dir = Path(out_dir)
    parts = shard_manifests(out_dir)
    if not parts:
        raise InputError(out_dir, "no shard manifests (manifest.shard-*-of-*.csv) to merge")
    merged: dict[tuple[str, int], ItemRecord] = {}
    for part in parts:
        for record in read_manifest(part):
            merged[record.key] = record
    records = sorted(merged.values(), key=lambda r: r.key)
    write_manifest(out_dir / MANIFEST_NAME, records)
    from volgen.batch.nnunet import refresh_dataset_json

    for dataset_json in sorted(out_dir.glob("Dataset*_*/dataset.json")):
        refresh_dataset_json(dataset_json.parent)
    return records
