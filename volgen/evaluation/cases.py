"""Finding evaluation cases: (segmentation, generated[, real]) triples from a manifest or a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volgen.types import PathLike

if TYPE_CHECKING:
    from volgen.labels import LabelMap

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: How many voxels per real volume the intensity segmenter is fitted on (an even subsample).


@dataclass(frozen=True)
class EvaluationCase:
    """One (segmentation, generated[, real]) triple on disk, all on the segmentation's grid."""

    case: str
    segmentation: Path
    generated: Path
    real: Path | None = None


def _strip_suffix(name: str) -> str:
    for suffix in (".seg.nrrd", *VOLUME_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_evaluation_cases(source: PathLike) -> list[EvaluationCase]:
    """Cases from a manifest or a folder.

    - CSV with columns ``segmentation,generated[,real][,case]`` or YAML ``cases: [{segmentation, generated,
      real, case}]``; relative paths are relative to the manifest; ``real`` may be empty for some cases.
    - A folder with ``labels/NAME.nii.gz`` (segmentations), ``generated/NAME.nii.gz`` (or
      ``generated/NAME_synthetic.nii.gz``, what ``volgen generate`` names it) and optionally
      ``images/NAME.nii.gz`` (real volumes): the training-data layout plus a ``generated/`` folder. Any of
      ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``.

    Raises:
        ConfigError: a malformed manifest, files that do not exist, duplicate case ids, no cases.
    """
    import csv

    from volgen.config import read_yaml
    from volgen.errors import ConfigError

    source = Path(source)
    if source.is_dir():
        return _evaluation_cases_from_folder(source)
    if not source.exists():
        raise ConfigError(source, "evaluation cases not found (a CSV/YAML manifest or a folder)")
    if source.suffix.lower() == ".csv":
        try:
            with source.open(newline="", encoding="utf-8") as f:
                rows: Any = [
                    {k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)
                ]
        except (UnicodeDecodeError, csv.Error) as e:
            raise ConfigError(source, f"not a readable CSV manifest: {e}") from None
    elif source.suffix.lower() in (".yaml", ".yml"):
        data = read_yaml(source)
        rows = data.get("cases") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ConfigError(
                source, "a YAML manifest needs a 'cases' list of {segmentation, generated[, real]}"
            )
    else:
        raise ConfigError(source, "unknown manifest type; use .csv, .yaml or a folder (labels/, generated/)")
    cases = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("segmentation") or not row.get("generated"):
            raise ConfigError(source, f"entry {number} needs 'segmentation' and 'generated'")
        unknown = set(row) - {"segmentation", "generated", "real", "case"}
        if unknown:
            raise ConfigError(source, f"entry {number}: unknown key '{sorted(unknown)[0]}'")
        paths = {k: source.parent / str(row[k]) for k in ("segmentation", "generated", "real") if row.get(k)}
        for key, path in paths.items():
            if not path.exists():
                raise ConfigError(source, f"entry {number}: {key} not found: {path}")
        case = str(row.get("case") or _strip_suffix(paths["segmentation"].name))
        cases.append(EvaluationCase(case, paths["segmentation"], paths["generated"], paths.get("real")))
    if not cases:
        raise ConfigError(source, "the manifest lists no cases")
    seen: set[str] = set()
    for c in cases:
        if c.case in seen:
            raise ConfigError(source, f"duplicate case id {c.case!r}")
        seen.add(c.case)
    return cases


def _evaluation_cases_from_folder(folder: Path) -> list[EvaluationCase]:
    from volgen.errors import ConfigError

    labels, generated, images = folder / "labels", folder / "generated", folder / "images"
    if not labels.is_dir() or not generated.is_dir():
        raise ConfigError(
            folder, "an evaluation folder needs labels/ (segmentations) and generated/ (optional: images/)"
        )

    def find(where: Path, name: str, extra: str = "") -> Path | None:
        for stem in (name, name + extra) if extra else (name,):
            for suffix in VOLUME_SUFFIXES:
                if (where / (stem + suffix)).is_file():
                    return where / (stem + suffix)
        return None

    cases = []
    for segmentation in sorted(labels.iterdir()):
        name = _strip_suffix(segmentation.name)
        if name == segmentation.name:
            continue
        gen = find(generated, name, "_synthetic")
        if gen is None:
            raise ConfigError(folder, f"segmentation {segmentation.name} has no volume in generated/")
        real = find(images, name) if images.is_dir() else None
        cases.append(EvaluationCase(name, segmentation, gen, real))
    if not cases:
        raise ConfigError(folder, "no segmentations in labels/")
    return cases


def generating_model(cases: list[EvaluationCase]) -> tuple[Path, LabelMap] | None:
    """The model folder that generated every case and its label map, read from the generated volumes'
    sidecars, to name the classes when no label map is given. ``None`` unless every case has a readable
    sidecar naming the same model, which still exists, and every case was generated with unknown label
    values refused (so every mask value is in that label map)."""
    from volgen import defaults
    from volgen.errors import VolgenError
    from volgen.generation.sidecar import EMBEDDED_DEFAULT, Sidecar
    from volgen.io.naming import sidecar_path
    from volgen.models import read_metadata

    folders = set()
    for case in cases:
        path = sidecar_path(case.generated)
        if not path.is_file():
            return None
        try:
            sidecar = Sidecar.read(path)
        except VolgenError:
            return None
        if sidecar.settings.get("unknown_labels", "error") != "error":
            return None
        recorded = sidecar.model.path
        folders.add(defaults.MODEL_DIR if recorded == EMBEDDED_DEFAULT else Path(recorded))
    if len(folders) != 1:
        return None
    (folder,) = folders
    try:
        return folder, read_metadata(folder).label_map
    except VolgenError:
        return None
