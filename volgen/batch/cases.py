"""The cases of a batch run: from a folder of segmentations or a CSV/YAML manifest.

A case is one segmentation with its id (which names its outputs) and per-case overrides. Case ids must be
unique, also ignoring upper/lower case (case-insensitive file systems).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from volgen.config import StrictModel, validate
from volgen.errors import ConfigError, InputError
from volgen.io.manifest import read_rows
from volgen.io.naming import INPUT_EXTENSIONS
from volgen.types import PathLike

logger = logging.getLogger("volgen.batch")

CASE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SEGMENTATION_EXTENSIONS = tuple(sorted(INPUT_EXTENSIONS, key=len, reverse=True))


@dataclass(frozen=True)
class Case:
    """One segmentation to convert, with its per-case overrides (``None``: use the run's setting).

    Attributes:
        id: Unique name of the case; names its outputs.
        segmentation: A label volume (file, DICOM folder or DICOM SEG).
        reference: A real image on the segmentation's grid, for λ < 1.
        seed: The exact seed of sample 0 (sample ``k`` uses ``seed + k``) instead of a derived one.
        keep: Classes to keep; replaces the run's keep/drop selection.
        drop: Classes to drop; replaces the run's keep/drop selection.
        strength: λ for this case.
        origin: Where the case was given, for messages (``cases.csv, line 3``); ``None`` for a folder's file.
    """

    id: str
    segmentation: Path
    reference: Path | None = None
    seed: int | None = None
    keep: tuple[str, ...] | None = None
    drop: tuple[str, ...] | None = None
    strength: float | None = None
    origin: str | None = field(default=None, compare=False)


class ManifestEntry(StrictModel):
    """One row of a CSV manifest or one entry of a YAML manifest."""

    segmentation: str = Field(min_length=1)
    case: str | None = None
    reference: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    keep: list[str] | None = None
    drop: list[str] | None = None
    strength: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("case", "segmentation", "reference", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError(f"{value!r} holds a NUL byte; not a file name")
        return (
            str(value).strip()
            if isinstance(value, int | float | str) and not isinstance(value, bool)
            else value
        )

    @field_validator("keep", "drop", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [n for n in re.split(r"[,;\s]+", value) if n]
        return value

    @model_validator(mode="after")
    def _check(self) -> ManifestEntry:
        if self.keep is not None and self.drop is not None:
            raise ValueError("give either keep or drop classes, not both")
        if self.case is not None and not CASE_ID.match(self.case):
            raise ValueError(
                f"case id {self.case!r} must be letters, digits, '.', '_' or '-' (not starting with '.')"
            )
        return self


def case_id_for(path: PathLike) -> str:
    """A case id from a file or folder name: known extensions removed, other characters replaced by ``_``."""
    name = Path(path).name
    lower = name.lower()
    for ext in _SEGMENTATION_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-")
    return name or "case"


def _is_segmentation_file(path: Path) -> bool:
    return path.name.lower().endswith(_SEGMENTATION_EXTENSIONS)


def _looks_like_dicom_folder(folder: Path, probe: int = 8) -> bool:
    """A folder holding ``.dcm`` files, or files with the DICOM magic (``DICM`` at byte 128)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if any(p.name.lower().endswith(".dcm") for p in files):
        return True
    for path in files[:probe]:
        try:
            with path.open("rb") as f:
                if f.read(132)[128:132] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def _cases_in_folder(folder: Path) -> list[Case]:
    cases = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.exists():
            # a dead link (an unmounted share) or a loop of links: a case that fails, never a silent skip
            cases.append(Case(id=case_id_for(entry), segmentation=entry))
        elif entry.is_dir():
            if _looks_like_dicom_folder(entry):
                cases.append(Case(id=case_id_for(entry), segmentation=entry))
            else:
                logger.info("skipping folder %s: no DICOM files in it", entry)
        elif entry.is_file() and _is_segmentation_file(entry):
            cases.append(Case(id=case_id_for(entry), segmentation=entry))
    return cases


def _case_from_entry(entry: ManifestEntry, base: Path, origin: str) -> Case:
    def resolve(text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else base / p

    segmentation = resolve(entry.segmentation)
    return Case(
        id=entry.case if entry.case is not None else case_id_for(segmentation),
        segmentation=segmentation,
        reference=None if entry.reference is None else resolve(entry.reference),
        seed=entry.seed,
        keep=None if entry.keep is None else tuple(entry.keep),
        drop=None if entry.drop is None else tuple(entry.drop),
        strength=entry.strength,
        origin=origin,
    )


def read_cases(source: PathLike) -> list[Case]:
    """The cases of a folder or a CSV/YAML manifest, sorted by case id.

    Args:
        source: A folder or a manifest. A folder: every ``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``,
            ``.mha``, ``.mhd`` or ``.dcm`` file in it and every subfolder holding DICOM files, each one case
            named after the file or subfolder (hidden entries are ignored; subfolders are not searched
            further; a dead link or a loop of links is a case, which fails). A manifest: a ``.csv`` with a
            header row, or a ``.yaml`` list of mappings, with the keys
            ``segmentation`` (required), ``case``, ``reference``, ``seed``, ``keep``, ``drop``, ``strength``;
            relative paths are relative to the manifest's folder.

    Returns:
        The cases.

    Raises:
        InputError: The source is missing, holds no segmentation, or two cases share an id.
        ConfigError: A manifest is invalid (unknown column or key, bad value); the message names the row.
    """
    path = Path(source)
    if path.is_dir():
        cases = _cases_in_folder(path)
        if not cases:
            raise InputError(
                path, "no segmentations found (.nii.gz, .nii, .nrrd, .mha, .mhd, .dcm or DICOM folders)"
            )
        what = "files"
    elif path.is_file() or (path.exists() and not path.is_dir()):
        if path.suffix.lower() not in (".csv", ".yaml", ".yml"):
            raise InputError(
                path,
                "expected a folder of segmentations or a .csv/.yaml manifest "
                "(for a single segmentation use `volgen generate`)",
            )
        rows = read_rows(path, columns=tuple(ManifestEntry.model_fields), required="segmentation")
        cases = []
        for where, data in rows:
            try:
                entry = validate(data, ManifestEntry, source=path)
            except ConfigError as e:
                raise ConfigError(path, f"{where}: {e.problem}") from None
            cases.append(_case_from_entry(entry, path.parent, f"{path}, {where}"))
        if not cases:
            raise ConfigError(path, "the manifest lists no cases")
        what = "manifest entries"
    else:
        raise InputError(path, "not found")
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.id.casefold(), []).append(case)
    for group in by_id.values():
        if len(group) > 1:
            shown = ", ".join(str(c.segmentation) for c in group[:3])
            raise (ConfigError if what == "manifest entries" else InputError)(
                path,
                f"duplicate case id {group[0].id!r} ({what} {shown}); case ids name the outputs and must be "
                "unique (also ignoring upper/lower case)",
            )
    return sorted(cases, key=lambda c: c.id)
