"""The run's manifest: one CSV row per work item (``manifest.csv``, or one file per shard).

The manifest is a log: each finished item is *appended* as one row (one ``write`` under an exclusive lock, so
concurrent runs on one folder do not interleave), never rewritten per item. A row is keyed by what its item
produces (``output``, the output path relative to OUT_DIR: two nnU-Net datasets in one folder may share case
ids); a reader takes the last row of each output; :func:`compact_manifest` rewrites the file once, sorted, one
row per item, at the end of a run. Cells that a spreadsheet would read as a formula are written with a
leading ``'`` (:func:`volgen.io.manifest.spreadsheet_safe`) and read back without it.

The log heals: an append that finds the file cut mid-row (a full disk, a power loss) starts on a new line,
and the reader skips such a torn row with a warning; a file re-saved by a spreadsheet (UTF-8 byte order
mark, CRLF line ends) reads as written.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import IO

from volgen.errors import InputError, OutputError
from volgen.io.atomic import atomic_write
from volgen.io.manifest import from_spreadsheet_safe, spreadsheet_safe
from volgen.io.paths import check_readable
from volgen.types import PathLike

MANIFEST_NAME = "manifest.csv"
#: Columns of ``manifest.csv`` (and of the shard manifests).
MANIFEST_COLUMNS = ("case", "sample", "output", "input", "outputs", "seed", "status", "seconds", "error")
#: Columns a row must have to be read (``output`` came later: older rows are keyed by case and sample).
_REQUIRED = ("case", "sample", "input", "outputs", "seed", "status")
STATUSES = ("done", "skipped", "failed")
#: Bytes at the end of a manifest an append looks at for a row cut short (rows are far shorter).
_TAIL = 1 << 16

logger = logging.getLogger("volgen.batch")
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
        outputs: Output paths relative to OUT_DIR (output, sidecar, label) as written (none when failed).
        seed: The seed used.
        status: ``done``, ``skipped`` (complete from an earlier run) or ``failed``.
        seconds: Wall time of the item.
        error: The error of a failed item (one line).
        output: The item's output path relative to OUT_DIR, also when it failed: what identifies the row
            (:attr:`target`).
    """

    case: str
    sample: int
    input: str
    outputs: list[str]
    seed: int
    status: str
    seconds: float = 0.0
    error: str = ""
    output: str = ""

    @property
    def key(self) -> tuple[str, int]:
        """(case, sample): the order rows are listed in."""
        return (self.case, self.sample)

    @property
    def target(self) -> str:
        """What the row is about: the output it produces (rows of other outputs are other items, even of
        the same case id)."""
        return self.output or f"{self.case}:{self.sample}"  # rows of an older volgen: by case and sample

    def to_row(self) -> dict[str, str]:
        """The CSV cells (text cells made spreadsheet-safe)."""
        return {
            "case": spreadsheet_safe(self.case),
            "sample": str(self.sample),
            "output": spreadsheet_safe(self.output),
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
            seconds=float(row.get("seconds") or 0),
            error=row.get("error") or "",
            output=row.get("output") or "",
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
    process replaced the file (:func:`compact_manifest`) while this one waited for the lock.

    Raises:
        OutputError: ``path`` is not a regular file (a FIFO would take the rows, or block).
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OutputError(path, "is not a regular file; volgen keeps its batch manifest there")
    while True:
        f = open(path, "a+b")  # noqa: SIM115 - closed below
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
    """Append one row to the manifest ``path`` (with the header when the file is new or empty).

    The row starts on a new line also when the file was cut mid-row; a quoted cell the cut left open is
    closed first, so the torn row stays one row (which the reader skips) and cannot swallow this one.

    Raises:
        OutputError: The manifest cannot be written (read-only folder, full disk).
    """
    try:
        with _locked(path) as f:
            size = f.seek(0, os.SEEK_END)
            text = _csv_text([record], header=size == 0)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
            if tail and not tail.endswith((b"\n", b"\r")):  # cut mid-row: end that row first
                torn = tail[tail.rfind(b"\n") + 1 :]
                text = ('"\n' if torn.count(b'"') % 2 else "\n") + text  # a quote left open is closed
            f.write(_encode(text))
            f.flush()
    except OSError as e:
        raise OutputError(path, f"cannot write the manifest ({e.strerror or e})") from None


def _ordered(records: Iterable[ItemRecord]) -> list[ItemRecord]:
    """Sorted by case, sample and output; a row of an older volgen (no ``output``) is dropped where a row
    of this one records the same case and sample."""
    records = list(records)
    current = {r.key for r in records if r.output}
    return sorted((r for r in records if r.output or r.key not in current), key=lambda r: (r.key, r.target))


def write_manifest(path: Path, records: Iterable[ItemRecord]) -> Path:
    """Write records as CSV (sorted by case, sample and output), atomically (replacing the file)."""
    rows = _ordered(records)
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
    """Read a manifest: the last row of each item (output), sorted by case, sample and output.

    A byte order mark and CRLF line ends (a spreadsheet's save) are read as written. A row that does not
    parse - cut short by a full disk or a power loss during an append, also a torn header of a file's
    first append - is skipped with a warning: its item is checked again by the next run.

    Raises:
        InputError: Missing, unreadable, or not a volgen batch manifest (another header).
    """
    path = Path(path)
    try:
        check_readable(path, folder_ok=False, what="manifest")
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    except InputError:
        raise
    except OSError as e:
        raise InputError(path, f"cannot read the manifest ({e.strerror or e})") from None
    if not text.strip():
        return []  # created, or cut before its first row
    lines = csv.reader(StringIO(text, newline=""))
    try:
        header = [c.strip().lower() for c in next(lines, [])]
        full = ",".join(MANIFEST_COLUMNS)
        if all(c in header for c in _REQUIRED):
            names = header
        elif header and full.startswith(",".join(header)):  # the first append was cut in the header
            logger.warning("%s: the header row is cut short (an interrupted write); read as volgen's", path)
            names = list(MANIFEST_COLUMNS)
        else:
            missing = [c for c in _REQUIRED if c not in header]
            raise InputError(path, f"not a volgen batch manifest (no {missing[0]!r} column)")
        latest: dict[str, ItemRecord] = {}
        for row in lines:
            if not any(cell.strip() for cell in row):
                continue
            try:
                record = ItemRecord.from_row(dict(zip(names, row, strict=False)))
                if record.status not in STATUSES:
                    raise ValueError(f"unknown status {record.status!r}")
            except (KeyError, ValueError, TypeError, AttributeError):
                logger.warning(
                    "%s, line %d: skipped a row cut short (an interrupted write?)", path, lines.line_num
                )
                continue
            latest[record.target] = record
    except csv.Error as e:
        logger.warning("%s, line %d: skipped the rest (%s)", path, lines.line_num, e)
    return _ordered(latest.values())


def shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index:03d}-of-{count:03d}.csv"


def _written(path: Path) -> tuple[int, str]:
    """Sort key: modification time (-1: empty or gone), then name."""
    try:
        info = path.stat()
    except OSError:
        return (-1, path.name)
    return (info.st_mtime_ns if info.st_size else -1, path.name)


def shard_manifests(out_dir: PathLike) -> list[Path]:
    """The shard manifests in ``out_dir``, oldest first (by modification time)."""
    folder = Path(out_dir)
    found = [p for p in folder.iterdir() if _SHARD_MANIFEST.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=_written)


def is_reserved(name: str) -> bool:
    """Whether ``name`` (an entry of OUT_DIR) is the run's manifest or a shard manifest: no output may be."""
    folded = name.casefold()
    return folded == MANIFEST_NAME or _SHARD_MANIFEST.match(folded) is not None


def fold_finished_shards(out_dir: Path, live: Iterable[Path] = ()) -> None:
    """After a whole run: fold the shard manifests of finished shard jobs into ``manifest.csv`` and remove
    them; those of jobs still running (``live``) stay for their own merge.

    A row of a shard manifest is kept only for an item ``manifest.csv`` has no row of (this whole run's rows
    are newer): no row is lost.
    """
    manifest = out_dir / MANIFEST_NAME
    running = {p.name for p in live}
    parts = [p for p in shard_manifests(out_dir) if p.name not in running]
    if not parts:
        return
    try:
        with _locked(manifest):
            merged = {r.target: r for r in read_manifest(manifest)}
            for part in parts:
                with _locked(part):  # an append waits, then goes to a new file
                    for record in read_manifest(part):
                        merged.setdefault(record.target, record)
                    write_manifest(manifest, merged.values())
                    part.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(manifest, f"cannot write the manifest ({e.strerror or e})") from None


def merge_manifests(out_dir: PathLike) -> list[ItemRecord]:
    """Merge the shard manifests of ``out_dir`` into ``manifest.csv``; return its records.

    The rows ``manifest.csv`` already holds stay (an earlier whole run, other shards' merges): an item listed
    by several manifests takes its row from the most recently written one. ``manifest.csv`` is read and
    replaced under its lock, so a concurrent run's append is not lost. nnU-Net ``dataset.json`` files in
    ``out_dir`` get their ``numTraining`` recounted.

    Raises:
        InputError: ``out_dir`` holds no shard manifests.
    """
    out_dir = Path(out_dir)
    parts = shard_manifests(out_dir)
    if not parts:
        raise InputError(out_dir, "no shard manifests (manifest.shard-*-of-*.csv) to merge")
    manifest = out_dir / MANIFEST_NAME
    try:
        with _locked(manifest):
            merged: dict[str, ItemRecord] = {}
            for part in sorted([*parts, manifest], key=_written):
                for record in read_manifest(part):
                    merged[record.target] = record
            records = _ordered(merged.values())
            write_manifest(manifest, records)
    except OSError as e:
        raise OutputError(manifest, f"cannot write the manifest ({e.strerror or e})") from None
    from volgen.batch.nnunet import refresh_dataset_json

    for dataset_json in sorted(out_dir.glob("Dataset*_*/dataset.json")):
        refresh_dataset_json(dataset_json.parent)
    return records
