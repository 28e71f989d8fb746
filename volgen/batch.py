"""Batch conversion: a folder or manifest of segmentations into synthetic volumes, resumable and sharded.

``volgen batch INPUT OUT_DIR`` calls :func:`volgen.api.generate` once per work item (a case and a sample
index); this module only decides *what* to generate, *where* to write it and *whether* it is already done:

- **Cases** come from a folder (every segmentation file in it, and every subfolder holding DICOM files) or a
  CSV/YAML manifest (segmentation path, optional case id, reference and per-case ``seed``, ``keep``, ``drop``,
  ``strength``; relative paths are relative to the manifest). Case ids name the outputs, so they must be
  unique (also ignoring case, for case-insensitive file systems).
- **Seeds** derive from the base seed and the case id, never from a position (:func:`derive_seed`). A case
  gives the same volume whether it runs alone, in another order or on another shard.
- **Resuming**: an item is skipped when its outputs and sidecar exist and the sidecar records the same model
  weights, settings, output format and input contents (:func:`unfinished_reason`); otherwise it is redone.
  Outputs are written atomically by the I/O layer; hidden temporary files an interrupted run left behind
  (``.volgen-tmp-*``) are removed at the start, for this process's items only.
- **Failures** of one item (a bad input, too little memory) are recorded and the run goes on.
- **Sharding**: the work items, sorted by (case, sample), are dealt round-robin to ``count`` shards. A shard
  is ``--shard i/n`` (independent jobs, e.g. a SLURM array) combined with the rank of an accelerate/torchrun
  process group. Each shard writes ``manifest.shard-K-of-N.csv``; the shards' rows are merged into
  ``manifest.csv`` (by the main process after all ranks finished, by each independent shard when it finishes,
  or on demand with :func:`merge_manifests`).
- **Layouts**: ``flat`` writes ``OUT_DIR/CASE.nii.gz`` (+ ``CASE.json`` sidecar); ``nnunet`` writes an nnU-Net
  v2 raw dataset ``OUT_DIR/DatasetNNN_NAME/{imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz, dataset.json}``
  with the labels remapped to the model's contiguous class indices.

Library code: it logs and reports through a :class:`BatchObserver`, it never prints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from volgen.api import GenerateSettings
from volgen.config import StrictModel, read_yaml, validate
from volgen.errors import ConfigError, InputError, VolgenError
from volgen.io.atomic import TEMP_PREFIX, atomic_write
from volgen.io.volumes import INPUT_EXTENSIONS
from volgen.types import PathLike

if TYPE_CHECKING:
    from volgen.models import LoadedModel, ModelMetadata
    from volgen.pipeline import Progress

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
#: Columns of ``manifest.csv`` (and of the shard manifests).
MANIFEST_COLUMNS = ("case", "sample", "input", "outputs", "seed", "status", "seconds", "error")
STATUSES = ("done", "skipped", "failed")
LAYOUTS = ("flat", "nnunet")
#: Output formats and the file ending each gets (a DICOM series is a folder).
FORMAT_ENDINGS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom": ""}
#: How long a rank waits for the others at the end of a multi-process run (ranks finish at different times).
BARRIER_TIMEOUT = timedelta(days=7)

_CASE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SHARD_MANIFEST = re.compile(r"^manifest\.shard-(\d+)-of-(\d+)\.csv$")
# atomic_write / atomic_directory temporary names: TEMP_PREFIX, 8 hex digits, an optional tag, ".", final name
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{8}(?:-old)?\.(?P<final>.+)$")
_SEGMENTATION_EXTENSIONS = tuple(sorted(INPUT_EXTENSIONS, key=len, reverse=True))


# ------------------------------------------------------------------------------------------------- cases


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
    """

    id: str
    segmentation: Path
    reference: Path | None = None
    seed: int | None = None
    keep: tuple[str, ...] | None = None
    drop: tuple[str, ...] | None = None
    strength: float | None = None


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
        if self.case is not None and not _CASE_ID.match(self.case):
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
        if entry.is_dir():
            if _looks_like_dicom_folder(entry):
                cases.append(Case(id=case_id_for(entry), segmentation=entry))
            else:
                logger.info("skipping folder %s: no DICOM files in it", entry)
        elif entry.is_file() and _is_segmentation_file(entry):
            cases.append(Case(id=case_id_for(entry), segmentation=entry))
    return cases


def _read_csv_manifest(path: Path) -> list[tuple[str, Any]]:
    """Rows of a CSV manifest as (where, data) pairs; empty cells are left out."""
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
            raise ConfigError(path, "empty CSV; expected a header row with at least a 'segmentation' column")
        columns = [c.strip().lower() for c in header]
        unknown = [c for c in columns if c not in ManifestEntry.model_fields]
        if unknown:
            known = ", ".join(ManifestEntry.model_fields)
            raise ConfigError(path, f"unknown column {unknown[0]!r}; columns are: {known}")
        if "segmentation" not in columns:
            raise ConfigError(path, "no 'segmentation' column")
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(columns):
                raise ConfigError(
                    path, f"line {reader.line_num}: {len(row)} cells but {len(columns)} columns"
                )
            data = {c: cell.strip() for c, cell in zip(columns, row, strict=False) if cell.strip()}
            rows.append((f"line {reader.line_num}", data))
    except csv.Error as e:
        raise ConfigError(path, f"line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _read_yaml_manifest(path: Path) -> list[tuple[str, Any]]:
    data = read_yaml(path)
    if isinstance(data, dict) and set(data) == {"cases"}:
        data = data["cases"]
    if not isinstance(data, list):
        raise ConfigError(
            path, "expected a list of cases (or a mapping with one key 'cases' holding the list)"
        )
    return [(f"case {i + 1}", entry) for i, entry in enumerate(data)]


def _case_from_entry(entry: ManifestEntry, base: Path) -> Case:
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
    )


def read_cases(source: PathLike) -> list[Case]:
    """The cases of a folder or a CSV/YAML manifest, sorted by case id.

    Args:
        source: A folder or a manifest. A folder: every ``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``,
            ``.mha``, ``.mhd`` or ``.dcm`` file in it and every subfolder holding DICOM files, each one case
            named after the file or subfolder (hidden entries are ignored; subfolders are not searched
            further). A manifest: a ``.csv`` with a header row, or a ``.yaml`` list of mappings, with the keys
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
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            rows = _read_csv_manifest(path)
        elif suffix in (".yaml", ".yml"):
            rows = _read_yaml_manifest(path)
        else:
            raise InputError(
                path,
                "expected a folder of segmentations or a .csv/.yaml manifest "
                "(for a single segmentation use `volgen generate`)",
            )
        cases = []
        for where, data in rows:
            try:
                entry = validate(data, ManifestEntry, source=path)
            except ConfigError as e:
                raise ConfigError(path, f"{where}: {e.problem}") from None
            cases.append(_case_from_entry(entry, path.parent))
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


# ------------------------------------------------------------------------------------------------- seeds


def derive_seed(base_seed: int, case_id: str, sample: int = 0) -> int:
    """The seed of one sample of one case: the first 31 bits of ``sha256(f"{base_seed}:{case_id}:{sample}")``.

    It depends on nothing else (not the position of the case, the other cases or the shard), so a case's
    output is reproducible on its own.
    """
    digest = hashlib.sha256(f"{base_seed}:{case_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# -------------------------------------------------------------------------------------------------- plan


@dataclass
class BatchOptions:
    """Everything about a batch run except its cases.

    Attributes:
        model: Model folder; ``None`` is the embedded default model.
        settings: The generation settings of every case; ``settings.seed`` is the base seed the per-case seeds
            derive from (:func:`derive_seed`).
        samples_per_case: Synthetic volumes per segmentation (different seeds).
        output_format: ``nifti``, ``nrrd``, ``mha`` or ``dicom``.
        layout: ``flat`` or ``nnunet``.
        dataset_id: nnU-Net dataset id (1-999), with ``layout="nnunet"``.
        dataset_name: nnU-Net dataset name, with ``layout="nnunet"``.
        device: ``auto``, ``cpu`` or ``cuda`` (a multi-process run gives each rank its own GPU).
        precision: As :func:`volgen.api.generate`.
        max_memory: As :func:`volgen.api.generate` (bytes).
        copy_patient_info: DICOM output from DICOM input: copy patient identifiers.
    """

    model: Path | None = None
    settings: GenerateSettings = field(default_factory=GenerateSettings)
    samples_per_case: int = 1
    output_format: str = "nifti"
    layout: str = "flat"
    dataset_id: int | None = None
    dataset_name: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_memory: int | None = None
    copy_patient_info: bool = False

    def check(self) -> None:
        """Raise :class:`VolgenError` for inconsistent options."""
        if self.samples_per_case < 1:
            raise VolgenError(f"--samples-per-case must be >= 1, got {self.samples_per_case}")
        if self.output_format not in FORMAT_ENDINGS:
            raise VolgenError(f"unknown --format {self.output_format!r}; use {', '.join(FORMAT_ENDINGS)}")
        if self.layout not in LAYOUTS:
            raise VolgenError(f"unknown --layout {self.layout!r}; use {' or '.join(LAYOUTS)}")
        if self.layout == "nnunet":
            if self.dataset_id is None or self.dataset_name is None:
                raise VolgenError("--layout nnunet needs --dataset-id and --dataset-name")
            if not 1 <= self.dataset_id <= 999:
                raise VolgenError(f"--dataset-id must be in 1..999 (nnU-Net), got {self.dataset_id}")
            if not _DATASET_NAME.match(self.dataset_name):
                raise VolgenError(f"--dataset-name {self.dataset_name!r}: use letters, digits, '_' or '-'")
            if self.output_format == "dicom":
                raise VolgenError("--layout nnunet writes NIfTI, NRRD or MHA files, not DICOM")
        elif self.dataset_id is not None or self.dataset_name is not None:
            raise VolgenError("--dataset-id and --dataset-name go with --layout nnunet")

    @property
    def dataset_folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


@dataclass
class WorkItem:
    """One volume to generate: a sample of a case, its settings and its output paths."""

    case: Case
    sample: int
    name: str
    settings: GenerateSettings
    output: Path
    sidecar: Path
    label: Path | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.case.id, self.sample)

    @property
    def outputs(self) -> list[Path]:
        """The output, its sidecar and (nnU-Net layout) the label file."""
        return [self.output, self.sidecar] + ([self.label] if self.label is not None else [])


@dataclass
class BatchPlan:
    """The work items of a run (all shards) and where they go."""

    out_dir: Path
    items: list[WorkItem]
    options: BatchOptions
    metadata: ModelMetadata
    dataset_dir: Path | None = None

    def folders(self) -> list[Path]:
        """Folders outputs are written to."""
        return sorted({p.parent for item in self.items for p in item.outputs} | {self.out_dir})


def item_settings(base: GenerateSettings, case: Case, sample: int) -> GenerateSettings:
    """The settings of one sample of one case: the run's, with the derived seed and the case's overrides."""
    seed = case.seed + sample if case.seed is not None else derive_seed(base.seed, case.id, sample)
    settings = replace(base, seed=seed)
    if case.keep is not None or case.drop is not None:
        settings = replace(
            settings,
            keep=None if case.keep is None else list(case.keep),
            drop=None if case.drop is None else list(case.drop),
        )
    if case.strength is not None:
        settings = replace(settings, strength=case.strength)
    return settings


def plan_batch(
    cases: Sequence[Case], out_dir: PathLike, options: BatchOptions, metadata: ModelMetadata
) -> BatchPlan:
    """Work items and output paths for ``cases``; checks what can be checked before generating anything.

    Raises:
        VolgenError: Inconsistent options; a case selects unknown classes, or has λ < 1 without a reference;
            two outputs collide, or an output would replace an input.
    """
    from volgen.api import sidecar_path

    options.check()
    out_dir = Path(out_dir)
    ending = FORMAT_ENDINGS[options.output_format]
    dataset_dir = out_dir / options.dataset_folder_name if options.layout == "nnunet" else None
    items = []
    for case in cases:
        for sample in range(options.samples_per_case):
            settings = item_settings(options.settings, case, sample)
            try:
                metadata.label_map.selection(keep=settings.keep, drop=settings.drop)
            except VolgenError as e:
                raise VolgenError(f"case {case.id!r}: {e}") from None
            if settings.strength < 1.0 and case.reference is None:
                raise VolgenError(
                    f"case {case.id!r}: λ (strength) {settings.strength} < 1 needs a reference image "
                    "(a 'reference' column in the manifest)"
                )
            name = case.id if options.samples_per_case == 1 else f"{case.id}_s{sample}"
            if dataset_dir is not None:
                output = dataset_dir / "imagesTr" / f"{name}_0000{ending}"
                label = dataset_dir / "labelsTr" / f"{name}{ending}"
            else:
                output, label = out_dir / f"{name}{ending}", None
            items.append(
                WorkItem(
                    case=case,
                    sample=sample,
                    name=name,
                    settings=settings,
                    output=output,
                    sidecar=sidecar_path(output),
                    label=label,
                )
            )
    items.sort(key=lambda it: it.key)
    inputs = {_absolute(p) for c in cases for p in (c.segmentation, c.reference) if p is not None}
    seen: set[str] = set()
    for item in items:
        for path in item.outputs:
            folded = str(_absolute(path)).casefold()
            if folded in seen:
                raise VolgenError(f"two outputs would be written to {path}; rename a case")
            seen.add(folded)
            if _absolute(path) in inputs:
                raise VolgenError(f"output {path} would replace an input; choose another OUT_DIR")
    return BatchPlan(
        out_dir=out_dir, items=items, options=options, metadata=metadata, dataset_dir=dataset_dir
    )


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)`` (shard index from 0)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise VolgenError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise VolgenError(f"--shard {text}: need 0 <= i < n")
    return index, count


def select_shard(items: Sequence[WorkItem], index: int, count: int) -> list[WorkItem]:
    """Shard ``index`` of ``count``: the items sorted by (case, sample), dealt round-robin.

    Every item is in exactly one shard; which one depends only on the sorted list of work items.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad shard {index}/{count}")
    ordered = sorted(items, key=lambda it: it.key)
    return [item for i, item in enumerate(ordered) if i % count == index]


# ------------------------------------------------------------------------------------------------ resume


def _sha256(path: Path | None) -> str | None:
    """As the sidecar records it: the file's SHA-256, ``None`` for no file or a folder."""
    if path is None or path.is_dir():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _comparable_settings(settings: Any) -> Any:
    """Settings as JSON data, without ``slice_batch_size`` (it does not change the result)."""
    if not isinstance(settings, dict):
        return settings
    data = json.loads(json.dumps(settings))
    data.pop("slice_batch_size", None)
    return data


def unfinished_reason(item: WorkItem, *, weights_sha256: str, output_format: str) -> str | None:
    """Why ``item`` must be (re)done, or ``None`` when its outputs are complete and current.

    Complete: the output (a non-empty folder for DICOM), the label (nnU-Net layout) and the sidecar exist, and
    the sidecar records the same model weights, output format and settings (``slice_batch_size`` aside), and
    the SHA-256 of the segmentation and reference files (DICOM folders are not hashed).
    """
    if output_format == "dicom":
        if not (item.output.is_dir() and any(item.output.iterdir())):
            return "no output"
    elif not item.output.is_file():
        return "no output"
    if item.label is not None and not item.label.is_file():
        return "no label file"
    try:
        sidecar = json.loads(item.sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no sidecar"
    except (OSError, ValueError):
        return "unreadable sidecar"
    if not isinstance(sidecar, dict):
        return "unreadable sidecar"
    model = sidecar.get("model") if isinstance(sidecar.get("model"), dict) else {}
    if model.get("weights_sha256") != weights_sha256:
        return "made with another model"
    if sidecar.get("format") != output_format:
        return "another output format"
    if _comparable_settings(sidecar.get("settings")) != _comparable_settings(asdict(item.settings)):
        return "other settings"
    try:
        if sidecar.get("segmentation_sha256") != _sha256(item.case.segmentation):
            return "the segmentation changed"
        if sidecar.get("reference_sha256") != _sha256(item.case.reference):
            return "the reference changed"
    except OSError:
        return "input unreadable"
    return None


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def remove_stale_temporaries(folders_and_names: dict[Path, set[str]]) -> list[Path]:
    """Remove temporary files/folders an interrupted run left behind for the given final names.

    Args:
        folders_and_names: Folder -> final names written there. Only temporaries whose name ends with one of
            these (``.volgen-tmp-<8 hex>[-old].<final name>``, as :mod:`volgen.io.atomic` makes them) are
            removed, so other shards writing into the same folders are not disturbed.

    Returns:
        The removed paths.
    """
    removed = []
    for folder, names in folders_and_names.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = _TEMP_NAME.match(entry.name)
            if match and match["final"] in names:
                _remove(entry)
                removed.append(entry)
                logger.info("removed %s (left by an interrupted run)", entry)
    return removed


# ---------------------------------------------------------------------------------------------- manifest


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
        return {
            "case": self.case,
            "sample": str(self.sample),
            "input": self.input,
            "outputs": ";".join(self.outputs),
            "seed": str(self.seed),
            "status": self.status,
            "seconds": f"{self.seconds:.3f}",
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: dict[str, str]) -> ItemRecord:
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


def write_manifest(path: Path, records: Iterable[ItemRecord]) -> Path:
    """Write records as CSV (sorted by case and sample), atomically."""
    rows = sorted(records, key=lambda r: r.key)
    # backslashreplace: a file name that is not UTF-8 (held as surrogates by Python) is written escaped
    with (
        atomic_write(path, overwrite=True) as tmp,
        tmp.open("w", newline="", encoding="utf-8", errors="backslashreplace") as f,
    ):
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.to_row() for r in rows)
    return path


def read_manifest(path: PathLike) -> list[ItemRecord]:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [ItemRecord.from_row(row) for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(path, f"not a volgen batch manifest ({e})") from None


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
    for dataset_json in sorted(out_dir.glob("Dataset*_*/dataset.json")):
        refresh_dataset_json(dataset_json.parent)
    return records


# ------------------------------------------------------------------------------------------------ nnU-Net


def count_training_cases(dataset_dir: Path, file_ending: str) -> int:
    """Cases of an nnU-Net raw dataset: ``imagesTr/X_0000<ending>`` files that have ``labelsTr/X<ending>``."""
    images = dataset_dir / "imagesTr"
    if not images.is_dir():
        return 0
    suffix = f"_0000{file_ending}"
    count = 0
    for image in images.iterdir():
        if image.name.endswith(suffix) and not image.name.startswith("."):
            if (dataset_dir / "labelsTr" / (image.name[: -len(suffix)] + file_ending)).is_file():
                count += 1
            else:
                logger.warning("%s has no label file in labelsTr", image)
    return count


def nnunet_dataset_json(
    metadata: ModelMetadata, *, name: str, file_ending: str, num_training: int
) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json``: channel names, labels by name (background 0), numTraining, file ending."""
    modality = metadata.intensity.modality
    return {
        "name": name,
        "description": f"Synthetic {modality} images generated by volgen from segmentations (model "
        f"{metadata.name}); labelsTr holds the input segmentations remapped to class indices",
        "channel_names": {"0": "CT" if modality == "CT" else "MRI"},
        "labels": {class_name: index for index, class_name in enumerate(metadata.label_map.class_names)},
        "numTraining": num_training,
        "file_ending": file_ending,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_dataset_json(plan: BatchPlan) -> Path | None:
    """Write ``dataset.json`` of an nnU-Net layout, counting the complete image/label pairs on disk."""
    if plan.dataset_dir is None:
        return None
    ending = FORMAT_ENDINGS[plan.options.output_format]
    data = nnunet_dataset_json(
        plan.metadata,
        name=plan.dataset_dir.name,
        file_ending=ending,
        num_training=count_training_cases(plan.dataset_dir, ending),
    )
    path = plan.dataset_dir / "dataset.json"
    _write_json(path, data)
    return path


def refresh_dataset_json(dataset_dir: Path) -> None:
    """Recount ``numTraining`` of an existing ``dataset.json``."""
    path = dataset_dir / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ending = data["file_ending"]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("cannot read %s; not updated", path)
        return
    data["numTraining"] = count_training_cases(dataset_dir, ending)
    _write_json(path, data)


def _write_label(item: WorkItem, plan: BatchPlan) -> None:
    """The nnU-Net label file: the segmentation remapped to class indices (uint8), on its own grid."""
    import SimpleITK as sitk

    from volgen import io

    seg = io.read_label(item.case.segmentation)
    classes = plan.metadata.label_map.remap(
        sitk.GetArrayViewFromImage(seg), unknown=item.settings.unknown_labels, source=item.case.segmentation
    )
    label = sitk.GetImageFromArray(classes)
    label.CopyInformation(seg)
    io.write_volume(label, item.label, overwrite=True, format=plan.options.output_format)


# ------------------------------------------------------------------------------------------------ running


class BatchObserver:
    """Receives the events of a run (the CLI renders them); every method does nothing by default."""

    def started(self, items: Sequence[WorkItem], *, total: int, shard: tuple[int, int]) -> None:
        """Before the first item: this process's items, the number of items of all shards, this shard."""

    def item_started(self, item: WorkItem, index: int, count: int) -> None:
        """An item starts (``index`` from 0 of ``count`` items of this process)."""

    def item_progress(self, item: WorkItem, progress: Progress) -> None:
        """After every UNet chunk of a generating item."""

    def item_finished(self, item: WorkItem, record: ItemRecord, index: int, count: int) -> None:
        """An item is done, skipped or failed (its record is in the manifest)."""


@dataclass
class BatchResult:
    """What a run did.

    Attributes:
        records: Rows of the run's items: this shard's for an independent ``--shard`` job, all ranks' for a
            multi-process run (every rank reports the whole run), all items otherwise.
        seconds: Wall time of this process.
        manifest: ``OUT_DIR/manifest.csv``.
        dataset_json: nnU-Net ``dataset.json`` (``None`` for the flat layout).
    """

    records: list[ItemRecord]
    seconds: float
    manifest: Path
    dataset_json: Path | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.records)

    @property
    def volumes_per_hour(self) -> float:
        """Generated (not skipped) volumes per hour of wall time."""
        return self.count("done") * 3600.0 / self.seconds if self.seconds > 0 else 0.0


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, VolgenError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def run_items(
    plan: BatchPlan,
    items: Sequence[WorkItem],
    *,
    loaded: LoadedModel,
    manifest: Path,
    device: str,
    observer: BatchObserver | None = None,
) -> list[ItemRecord]:
    """Convert ``items`` one after the other, writing ``manifest`` after each; return their records.

    Removes the items' stale temporaries first. A failing item is recorded (and its stale outputs removed)
    and the run goes on; ``KeyboardInterrupt`` stops it (finished items stay recorded).
    """
    from volgen.api import generate

    observer = observer or BatchObserver()
    for folder in plan.folders():
        folder.mkdir(parents=True, exist_ok=True)
    names: dict[Path, set[str]] = {manifest.parent: {manifest.name}}
    for item in items:
        for path in item.outputs:
            names.setdefault(path.parent, set()).add(path.name)
    remove_stale_temporaries(names)

    fmt = plan.options.output_format
    records: list[ItemRecord] = []
    for index, item in enumerate(items):
        observer.item_started(item, index, len(items))
        started = time.perf_counter()
        reason = unfinished_reason(item, weights_sha256=loaded.weights_sha256, output_format=fmt)
        error = ""
        if reason is None:
            status = "skipped"
        else:
            logger.info("%s sample %d: generating (%s)", item.case.id, item.sample, reason)
            try:
                if item.label is not None:
                    _write_label(item, plan)
                generate(
                    item.case.segmentation,
                    item.output,
                    model=plan.options.model,
                    settings=item.settings,
                    reference=item.case.reference,
                    output_format=fmt,
                    overwrite=True,
                    device=device,
                    precision=plan.options.precision,
                    max_memory=plan.options.max_memory,
                    copy_patient_info=plan.options.copy_patient_info,
                    loaded=loaded,
                    progress=lambda p, item=item: observer.item_progress(item, p),
                )
                status = "done"
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the run; it is recorded
                logger.debug("%s sample %d failed", item.case.id, item.sample, exc_info=True)
                for path in item.outputs:  # stale outputs of an earlier run must not pass as results
                    _remove(path)
                status, error = "failed", _one_line(exc)
        outputs = [] if status == "failed" else [_relative(p, plan.out_dir) for p in item.outputs]
        record = ItemRecord(
            case=item.case.id,
            sample=item.sample,
            input=str(item.case.segmentation),
            outputs=outputs,
            seed=item.settings.seed,
            status=status,
            seconds=time.perf_counter() - started,
            error=error,
        )
        records.append(record)
        write_manifest(manifest, records)
        observer.item_finished(item, record, index, len(items))
    return records


@dataclass
class ProcessGroup:
    """This process's place in an accelerate/torchrun launch (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    device: str = "auto"
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def process_group(device: str = "auto") -> ProcessGroup:
    """Join the process group when launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1).

    Uses ``accelerate.PartialState``: gloo on CPU (``device="cpu"`` or no CUDA), NCCL with one GPU per rank
    otherwise. The barrier timeout is long (:data:`BARRIER_TIMEOUT`) because ranks finish their shards at
    different times.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    if world <= 1:
        return ProcessGroup(device=device)
    import torch
    from accelerate import PartialState

    if device == "cuda" and not torch.cuda.is_available():
        raise VolgenError("--device cuda: no CUDA device is available")
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    rank_device = "cpu" if cpu else str(state.device)
    return ProcessGroup(rank=state.process_index, world=state.num_processes, device=rank_device, state=state)


def prepare(source: PathLike, out_dir: PathLike, options: BatchOptions) -> tuple[BatchPlan, LoadedModel]:
    """Read the cases, load the model once and plan the run (nothing is written)."""
    from volgen.api import default_model_dir
    from volgen.models import load_model

    source, out_dir = Path(source), Path(out_dir)
    if source.is_dir() and _absolute(source) == _absolute(out_dir):
        raise VolgenError(f"OUT_DIR {out_dir} is the input folder; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise VolgenError(f"OUT_DIR {out_dir} exists and is not a folder")
    options.check()
    cases = read_cases(source)
    loaded = load_model(options.model if options.model is not None else default_model_dir())
    return plan_batch(cases, out_dir, options, loaded.metadata), loaded


def run_batch(
    source: PathLike,
    out_dir: PathLike,
    options: BatchOptions,
    *,
    shard: tuple[int, int] = (0, 1),
    observer: BatchObserver | None = None,
    group: ProcessGroup | None = None,
) -> BatchResult:
    """Convert every case of ``source`` (a folder or manifest) into ``out_dir``.

    Args:
        source: See :func:`read_cases`.
        out_dir: Output folder (created).
        options: Model, settings, samples, format, layout.
        shard: ``(i, n)``: do shard ``i`` of ``n`` (independent jobs, e.g. a SLURM array).
        observer: Receives progress events.
        group: The process group (default: :func:`process_group`, which joins a torchrun/accelerate launch).
            With ``world`` ranks, rank ``r`` of shard ``i/n`` does shard ``i*world + r`` of ``n*world``.

    Returns:
        :class:`BatchResult`; ``ok`` is False when an item failed.
    """
    started = time.perf_counter()
    plan, loaded = prepare(source, out_dir, options)
    group = group or process_group(options.device)
    shard_index, shard_count = shard
    index, count = shard_index * group.world + group.rank, shard_count * group.world
    mine = select_shard(plan.items, index, count)
    if observer is not None:
        observer.started(mine, total=len(plan.items), shard=(index, count))
    out = plan.out_dir
    manifest = out / MANIFEST_NAME
    if count == 1:
        records = run_items(
            plan, mine, loaded=loaded, manifest=manifest, device=group.device, observer=observer
        )
        for stale in shard_manifests(out):  # superseded by this whole run's manifest.csv
            stale.unlink(missing_ok=True)
        return BatchResult(
            records=records,
            seconds=time.perf_counter() - started,
            manifest=manifest,
            dataset_json=write_dataset_json(plan),
        )

    part = out / shard_manifest_name(index, count)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(part, [])  # clears rows an earlier run left in this shard's manifest
    records = run_items(plan, mine, loaded=loaded, manifest=part, device=group.device, observer=observer)
    group.barrier()
    if group.is_main:
        merge_manifests(out)
        write_dataset_json(plan)
    group.barrier()
    dataset_json = None if plan.dataset_dir is None else plan.dataset_dir / "dataset.json"
    if group.world > 1:  # every rank reports on the whole run of its --shard group
        expected = {
            it.key: it
            for r in range(group.world)
            for it in select_shard(plan.items, shard_index * group.world + r, count)
        }
        merged = {rec.key: rec for rec in read_manifest(manifest) if rec.key in expected}
        records = [
            merged.get(key)
            or ItemRecord(
                case=key[0],
                sample=key[1],
                input=str(it.case.segmentation),
                outputs=[],
                seed=it.settings.seed,
                status="failed",
                error="no record from its process",
            )
            for key, it in sorted(expected.items())
        ]
    return BatchResult(
        records=records, seconds=time.perf_counter() - started, manifest=manifest, dataset_json=dataset_json
    )


# ------------------------------------------------------------------------------------------------ dry run


@dataclass
class TimeModel:
    """Seconds per item ≈ ``overhead + slice_forwards × seconds_per_slice_forward``; ``how`` says how."""

    seconds_per_slice_forward: float
    overhead_seconds: float
    seconds_per_input_voxel: float
    how: str

    def seconds(self, forwards: int, input_voxels: int) -> float:
        return (
            self.overhead_seconds
            + input_voxels * self.seconds_per_input_voxel
            + forwards * self.seconds_per_slice_forward
        )


@dataclass
class ItemEstimate:
    """A dry-run line: the item, its slices and slice-forwards, estimated time and peak memory, and state."""

    item: WorkItem
    state: str
    slices: int | None = None
    forwards: int | None = None
    seconds: float | None = None
    peak_bytes: int | None = None


def measure_time_model(loaded: LoadedModel, *, slice_batch_size: int, device: str = "auto") -> TimeModel:
    """Time one UNet forward of a padded chunk of ``slice_batch_size`` slices (after one warm-up forward).

    fp32; I/O and resampling are an assumed 1 s per item plus 0.1 µs per input voxel.
    """
    import torch

    from volgen.api import resolve_device
    from volgen.pipeline import BATCH_GRANULE

    dev = resolve_device(device)
    unet = loaded.unet.to(dev)
    size = loaded.metadata.slice_size
    batch = slice_batch_size + (-slice_batch_size % BATCH_GRANULE)
    x = torch.zeros(batch, unet.config.in_channels, size, size, device=dev)
    t = torch.tensor(500, device=dev)
    with torch.no_grad():
        unet(x, t)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        begin = time.perf_counter()
        unet(x, t)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_slice = (time.perf_counter() - begin) / batch
    how = (
        f"measured: one UNet forward of {batch} slices of {size}x{size} on {dev} (fp32) took "
        f"{per_slice * 1000:.2f} ms per slice; assumed: 1 s + 0.1 µs per input voxel for I/O and resampling"
    )
    return TimeModel(
        seconds_per_slice_forward=per_slice, overhead_seconds=1.0, seconds_per_input_voxel=1e-7, how=how
    )


def slice_forwards(loaded: LoadedModel, settings: GenerateSettings, slices: int) -> int:
    """UNet slice-forwards of one volume: steps run (fewer for λ < 1) × slices padded per chunk."""
    from volgen.pipeline import BATCH_GRANULE, make_scheduler

    scheduler = make_scheduler(settings.scheduler, loaded.scheduler.config)
    scheduler.set_timesteps(settings.num_inference_steps)
    timesteps = scheduler.timesteps
    if settings.strength < 1.0:
        t_star = round(settings.strength * loaded.scheduler.config.num_train_timesteps)
        timesteps = timesteps[timesteps <= t_star]
    sbs = settings.slice_batch_size
    padded = sum(n + (-n % BATCH_GRANULE) for n in (min(sbs, slices - s) for s in range(0, slices, sbs)))
    return len(timesteps) * padded


def estimate_plan(
    plan: BatchPlan, loaded: LoadedModel, time_model: TimeModel, items: Sequence[WorkItem] | None = None
) -> list[ItemEstimate]:
    """Dry run: read each segmentation (nothing is written) and estimate time and peak memory per item.

    Peak memory is :func:`volgen.api.estimate_memory` plus the model's weights (fp32). The state says whether
    the item would be skipped (complete), generated, or fails to read.
    """
    import numpy as np

    from volgen import io
    from volgen.api import estimate_memory, slices_along

    meta = loaded.metadata
    weights = sum(p.numel() * p.element_size() for p in loaded.unet.parameters())
    cache: dict[Path, tuple[int, int] | str] = {}
    estimates = []
    for item in items if items is not None else plan.items:
        seg = item.case.segmentation
        if seg not in cache:
            try:
                image = io.read_label(seg)
                cache[seg] = (slices_along(image, meta.slice_axis), int(np.prod(image.GetSize())))
            except VolgenError as e:
                cache[seg] = _one_line(e)
        info = cache[seg]
        if isinstance(info, str):
            estimates.append(ItemEstimate(item=item, state=f"would fail: {info}"))
            continue
        slices, voxels = info
        reason = unfinished_reason(
            item, weights_sha256=loaded.weights_sha256, output_format=plan.options.output_format
        )
        state = (
            "complete (skip)" if reason is None else ("to do" if reason == "no output" else f"redo: {reason}")
        )
        forwards = slice_forwards(loaded, item.settings, slices)
        peak = weights + estimate_memory(
            slices=slices,
            slice_size=meta.slice_size,
            condition_channels=meta.condition_channels,
            slice_batch_size=item.settings.slice_batch_size,
            block_channels=loaded.unet.config.block_out_channels,
            input_voxels=voxels,
        )
        estimates.append(
            ItemEstimate(
                item=item,
                state=state,
                slices=slices,
                forwards=forwards,
                seconds=0.0 if reason is None else time_model.seconds(forwards, voxels),
                peak_bytes=peak,
            )
        )
    return estimates


def total_seconds(estimates: Iterable[ItemEstimate]) -> float:
    return math.fsum(e.seconds or 0.0 for e in estimates)
