"""Manifests: the one reader of case lists (CSV or YAML) and the cell rules of the CSV files volgen writes.

:func:`read_rows` reads a manifest a user wrote (``volgen batch``, ``volgen train``, ``volgen evaluate``):
a ``.csv`` with a header row, or a ``.yaml`` list of mappings (optionally under one key ``cases``). Each row
comes back as ``(where, data)`` with lower-case keys and empty cells left out, ready for a pydantic model.

:func:`spreadsheet_safe` / :func:`from_spreadsheet_safe` keep the CSV files volgen writes (``manifest.csv``)
from being read as formulas by spreadsheet programs (a cell starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return gets a leading ``'``), and undo it when volgen reads them back.
"""

from __future__ import annotations

import csv
from collections.abc import Collection
from io import StringIO
from pathlib import Path
from typing import Any

from volgen.errors import ConfigError, InputError
from volgen.types import PathLike

__all__ = ["from_spreadsheet_safe", "read_rows", "spreadsheet_safe"]

#: Largest manifest read (a manifest is a list of paths; more is a mistake or an attack).
MAX_MANIFEST_BYTES = 64 << 20
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def read_rows(
    path: PathLike, *, columns: Collection[str] | None = None, required: str = "segmentation"
) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a CSV or YAML manifest.

    Args:
        path: A ``.csv``, ``.yaml`` or ``.yml`` file.
        columns: Allowed column names (CSV; YAML keys are left to the caller's model); ``None`` allows any.
        required: A column every CSV manifest must have.

    Returns:
        ``(where, data)`` per row: ``where`` is "line N" (CSV) or "case N" (YAML) for messages; CSV keys are
        lower case and stripped, cells stripped, empty cells left out.

    Raises:
        ConfigError: Not UTF-8, not valid CSV/YAML, unknown or missing columns, a row with more cells than
            columns, a YAML document that is not a list of cases, a file that is too large or not a file.
    """
    from volgen.io.paths import check_readable

    path = Path(path)
    try:
        info = check_readable(path, folder_ok=False, what="manifest")
    except InputError as exc:
        raise ConfigError(path, exc.problem) from None
    if info.st_size > MAX_MANIFEST_BYTES:
        raise ConfigError(path, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path, columns, required)
    if suffix in (".yaml", ".yml"):
        return _yaml_rows(path)
    raise ConfigError(path, "unknown manifest type; use .csv or .yaml")


def _csv_rows(path: Path, columns: Collection[str] | None, required: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(path, "not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read the file ({e.strerror or e})") from None
    reader = csv.reader(StringIO(text))
    try:
        header = next(reader, None)
        if not header:
            raise ConfigError(path, f"empty CSV; expected a header row with at least a {required!r} column")
        names = [c.strip().lower() for c in header]
        if columns is not None:
            unknown = [c for c in names if c not in columns]
            if unknown:
                raise ConfigError(path, f"unknown column {unknown[0]!r}; columns are: {', '.join(columns)}")
        if required not in names:
            raise ConfigError(path, f"no {required!r} column")
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(names):
                raise ConfigError(path, f"line {reader.line_num}: {len(row)} cells but {len(names)} columns")
            data = {c: cell.strip() for c, cell in zip(names, row, strict=False) if cell.strip()}
            rows.append((f"line {reader.line_num}", data))
    except csv.Error as e:
        raise ConfigError(path, f"line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _yaml_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    from volgen.config import read_yaml

    data = read_yaml(path)
    if isinstance(data, dict) and set(data) == {"cases"}:
        data = data["cases"]
    if not isinstance(data, list):
        raise ConfigError(
            path, "expected a list of cases (or a mapping with one key 'cases' holding the list)"
        )
    return [(f"case {i + 1}", entry) for i, entry in enumerate(data)]


def spreadsheet_safe(cell: str) -> str:
    """``cell`` as volgen writes it to a CSV: a leading ``'`` when it would start a spreadsheet formula."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def from_spreadsheet_safe(cell: str) -> str:
    """Undo :func:`spreadsheet_safe`."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell
