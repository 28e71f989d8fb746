"""Metrics: faithfulness (does the image follow the mask?) and 3D consistency (is it smooth through-plane?).

Arrays are numpy ``(z, y, x)`` as SimpleITK gives them, on one grid; masks hold class indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from volgen.labels import LabelMap
from volgen.types import PathLike

AXES = ("z", "y", "x")


def mean_abs_step(volume: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Mean ``|v[i+1] - v[i]|`` along ``axis`` over neighbour pairs that are both inside ``mask > 0``."""
    v = np.asarray(volume, dtype=np.float64)
    m = np.asarray(mask) > 0
    n = v.shape[axis]
    if n < 2:
        return float("nan")
    a = np.take(v, range(1, n), axis=axis)
    b = np.take(v, range(n - 1), axis=axis)
    inside = np.take(m, range(1, n), axis=axis) & np.take(m, range(n - 1), axis=axis)
    if not inside.any():
        return float("nan")
    return float(np.abs(a - b)[inside].mean())


def smoothness(volume: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """:func:`mean_abs_step` along each array axis (``z``, ``y``, ``x``)."""
    return {name: mean_abs_step(volume, mask, axis) for axis, name in enumerate(AXES)}


@dataclass
class Consistency:
    """Through-plane smoothness of a generated volume against a real one on the same mask.

    ``ratio[axis]`` = generated / real mean absolute neighbour difference along that axis (1.0 is ideal;
    above 1 means streaks or flicker). ``anisotropy`` = ratio along the slice axis / mean in-plane ratio: a
    2D model flickering through-plane shows a value well above 1 even when its texture is off overall.
    """

    generated: dict[str, float]
    real: dict[str, float]
    slice_axis: str = "z"
    ratio: dict[str, float] = field(init=False)
    anisotropy: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = {k: self.generated[k] / self.real[k] if self.real[k] else float("nan") for k in AXES}
        in_plane = [self.ratio[k] for k in AXES if k != self.slice_axis]
        self.anisotropy = self.ratio[self.slice_axis] / float(np.mean(in_plane))


def consistency(
    generated: np.ndarray, real: np.ndarray, mask: np.ndarray, *, slice_axis: str = "z"
) -> Consistency:
    """Compare :func:`smoothness` of a generated and a real volume inside ``mask > 0`` (the body)."""
    return Consistency(
        generated=smoothness(generated, mask), real=smoothness(real, mask), slice_axis=slice_axis
    )


def dice(prediction: np.ndarray, target: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    """Dice per class between two class-index arrays (NaN where a class is in neither)."""
    result = {}
    for c in classes:
        p, t = prediction == c, target == c
        denominator = p.sum() + t.sum()
        result[int(c)] = float(2.0 * (p & t).sum() / denominator) if denominator else float("nan")
    return result


class IntensitySegmenter:
    """A segmenter for data whose classes are told apart by intensity (e.g. T1 brain tissues).

    Fitted on a real image and its mask: each class is described by the median of its intensities; a voxel
    is assigned the class with the nearest median. For the Colin27 tissue labels (derived by intensity
    clustering) this is the natural segmenter; for anatomy that intensity cannot separate use a learned one.
    """

    def __init__(self) -> None:
        self.classes: np.ndarray | None = None
        self.medians: np.ndarray | None = None

    def fit(self, image: np.ndarray, mask: np.ndarray) -> IntensitySegmenter:
        classes = np.unique(mask)
        medians = np.array([np.median(image[mask == c]) for c in classes], dtype=np.float64)
        order = np.argsort(medians)
        self.classes, self.medians = classes[order], medians[order]
        return self

    def predict(self, image: np.ndarray) -> np.ndarray:
        if self.medians is None or self.classes is None:
            raise RuntimeError("fit the segmenter first")
        cuts = (self.medians[1:] + self.medians[:-1]) / 2.0
        return self.classes[np.searchsorted(cuts, np.asarray(image, dtype=np.float64))]


# ------------------------------------------------------------------------------------------------------------
# Evaluating a set of generated volumes (``volgen evaluate``)
#
# Definitions used throughout:
# - Dice per class between two class-index volumes (:func:`dice`); a class present in neither volume is NaN
#   ("not applicable") and left out of every mean - it never counts as 1 or 0.
# - faithfulness = Dice(m_gen^pred, m): the segmenter's prediction on the generated volume against the mask
#   the volume was generated from (the paper's metric); with a real volume also agreement =
#   Dice(m_gen^pred, m_real^pred) and the segmenter's own score on the real volume, Dice(m_real^pred, m),
#   which bounds what faithfulness can reach with that segmenter.
# - consistency: :func:`consistency` inside the body (mask > 0), generated against real, per array axis.
# - intensity realism: per class median and quartiles of the generated and the real volume's voxels (the
#   volumes' own units: HU for CT).

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: How many voxels per real volume the intensity segmenter is fitted on (an even subsample).
INTENSITY_FIT_VOXELS = 2_000_000


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


class VolumeSegmenter(Protocol):
    """What ``volgen evaluate`` needs from a segmenter: class indices on the image's own grid."""

    name: str

    def segment(self, image: Any) -> np.ndarray:
        """``image``: a SimpleITK image (physical units). Returns class indices ``(z, y, x)`` on its grid."""
        ...


class IntensityVolumeSegmenter:
    """:class:`IntensitySegmenter` fitted on real volumes and their masks, pooled over all cases."""

    name = "intensity (nearest class median, fitted on the real volumes)"

    def __init__(self, segmenter: IntensitySegmenter) -> None:
        self.segmenter = segmenter

    @classmethod
    def fit(cls, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> IntensityVolumeSegmenter:
        """Fit on ``(image, class_indices)`` array pairs (an even subsample of each volume's voxels)."""
        images, masks = [], []
        for image, mask in pairs:
            step = max(1, image.size // INTENSITY_FIT_VOXELS)
            images.append(np.asarray(image, dtype=np.float32).ravel()[::step])
            masks.append(np.asarray(mask).ravel()[::step])
        if not images:
            raise ValueError("no real volumes to fit the intensity segmenter on")
        return cls(IntensitySegmenter().fit(np.concatenate(images), np.concatenate(masks)))

    def segment(self, image: Any) -> np.ndarray:
        import SimpleITK as sitk

        return self.segmenter.predict(sitk.GetArrayViewFromImage(image))


class CommandSegmenter:
    """An external program that segments a volume file, e.g. TotalSegmentator for CT.

    ``template`` is a command line with ``{input}`` and ``{output}`` placeholders (run without a shell, split
    like a POSIX shell would). volgen writes the image as NIfTI to ``{input}`` in a temporary folder, runs the
    command, reads the label volume it wrote to ``{output}`` (``.nii.gz``) and remaps its values with
    ``label_map`` (values the map does not know become background); without a label map the values are used
    as they are. The output must be on the input's grid.

    Example: ``TotalSegmentator -i {input} -o {output} --ml --roi_subset liver spleen``.
    """

    def __init__(self, template: str, label_map: LabelMap | None = None, *, timeout: float | None = None):
        import shlex

        from volgen.errors import VolgenError

        if "{input}" not in template or "{output}" not in template:
            raise VolgenError(
                f"--segmenter-command needs {{input}} and {{output}} placeholders: {template!r}"
            )
        try:
            self.argv = shlex.split(template)
        except ValueError as e:
            raise VolgenError(f"--segmenter-command: cannot split {template!r}: {e}") from None
        self.template = template
        self.label_map = label_map
        self.timeout = timeout
        self.name = f"command: {template}"

    def segment(self, image: Any) -> np.ndarray:
        import shutil
        import subprocess
        import tempfile

        import SimpleITK as sitk

        from volgen.errors import InputError, VolgenError
        from volgen.io import Geometry, read_label, write_volume

        with tempfile.TemporaryDirectory(prefix="volgen-seg-") as tmp:
            source, target = Path(tmp) / "input.nii.gz", Path(tmp) / "output.nii.gz"
            write_volume(image, source)
            argv = [a.replace("{input}", str(source)).replace("{output}", str(target)) for a in self.argv]
            if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
                raise VolgenError(f"--segmenter-command: program not found: {argv[0]}")
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise VolgenError(f"--segmenter-command failed to run: {e}") from None
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                last = lines[-1] if lines else "(no output)"
                raise VolgenError(f"--segmenter-command exited with {done.returncode}: {last}")
            if not target.exists():
                raise VolgenError(f"--segmenter-command wrote nothing to {{output}} ({self.template})")
            labels = read_label(target)
            if not Geometry.of(labels).close_to(Geometry.of(image), atol=1e-3):
                raise InputError(target, "the segmenter command's output is not on its input's grid")
            values = sitk.GetArrayFromImage(labels)
        if self.label_map is None:
            return values
        return self.label_map.remap(values, unknown="background", source=self.template)


def _class_stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "iqr": float("nan")}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25)}


def _mean_of(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def array_slice_axis(image: Any, slice_axis: str) -> str:
    """The array axis (``z``, ``y`` or ``x`` of the ``(z, y, x)`` array) closest to a world slice axis.

    ``slice_axis`` is the generator's: ``axial`` (world S/I), ``coronal`` (A/P) or ``sagittal`` (L/R).
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    world_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[slice_axis]
    voxel_axis = int(np.argmax(np.abs(direction[world_axis])))
    return AXES[2 - voxel_axis]


@dataclass
class CaseEvaluation:
    """Metrics of one case; dicts are keyed by class name (foreground; ``intensity`` also background)."""

    case: str
    faithfulness: dict[str, float]
    agreement: dict[str, float] | None = None
    segmenter_on_real: dict[str, float] | None = None
    consistency: Consistency | None = None
    intensity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        values = getattr(self, metric)
        return float("nan") if values is None else _mean_of(values.values())


@dataclass
class EvaluationReport:
    """Per-case metrics, their means over cases, and one example slice for the figure."""

    cases: list[CaseEvaluation]
    class_names: list[str]
    segmenter: str
    slice_axis: str
    units: str
    example: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Means over cases: per class and overall, for every metric that the cases have."""
        out: dict[str, Any] = {"cases": len(self.cases)}
        for metric in ("faithfulness", "agreement", "segmenter_on_real"):
            rows = [getattr(c, metric) for c in self.cases if getattr(c, metric) is not None]
            if not rows:
                out[metric] = None
                continue
            per_class = {n: _mean_of(r.get(n, float("nan")) for r in rows) for n in self.class_names[1:]}
            out[metric] = {"per_class": per_class, "mean": _mean_of(c.mean(metric) for c in self.cases)}
        with_real = [c.consistency for c in self.cases if c.consistency is not None]
        out["consistency"] = (
            {
                "ratio": {a: _mean_of(c.ratio[a] for c in with_real) for a in AXES},
                "anisotropy": _mean_of(c.anisotropy for c in with_real),
            }
            if with_real
            else None
        )
        intensity: dict[str, Any] = {}
        for name in self.class_names:
            entry: dict[str, Any] = {}
            for which in ("generated", "real"):
                stats = [c.intensity[name][which] for c in self.cases if c.intensity.get(name, {}).get(which)]
                if stats:
                    entry[which] = {k: _mean_of(s[k] for s in stats) for k in ("median", "q25", "q75", "iqr")}
            if entry:
                intensity[name] = entry
        out["intensity"] = intensity
        return out

    def to_dict(self) -> dict[str, Any]:
        cases = []
        for c in self.cases:
            item: dict[str, Any] = {
                "case": c.case,
                "faithfulness": {"per_class": c.faithfulness, "mean": c.mean("faithfulness")},
            }
            for metric in ("agreement", "segmenter_on_real"):
                values = getattr(c, metric)
                item[metric] = None if values is None else {"per_class": values, "mean": c.mean(metric)}
            item["consistency"] = (
                None
                if c.consistency is None
                else {
                    "ratio": c.consistency.ratio,
                    "anisotropy": c.consistency.anisotropy,
                    "generated": c.consistency.generated,
                    "real": c.consistency.real,
                }
            )
            item["intensity"] = c.intensity
            cases.append(item)
        return _json_safe(
            {
                "segmenter": self.segmenter,
                "classes": self.class_names,
                "slice_axis": self.slice_axis,
                "intensity_units": self.units,
                "definitions": {
                    "faithfulness": "Dice(m_gen^pred, m): segmenter on the generated volume vs the mask",
                    "agreement": "Dice(m_gen^pred, m_real^pred): segmenter on generated vs on real",
                    "segmenter_on_real": "Dice(m_real^pred, m): the segmenter's own score on the real volume",
                    "consistency": "mean |v[i+1]-v[i]| inside mask>0 along each array axis, generated/real",
                    "nan": "a class in neither volume has no Dice (null); means leave it out",
                },
                "summary": self.summary(),
                "cases": cases,
            }
        )


def _json_safe(value: Any) -> Any:
    """NaN and infinities -> ``None`` (JSON has no NaN); numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_cases(
    cases: Sequence[EvaluationCase],
    segmenter: VolumeSegmenter | Literal["intensity"],
    *,
    label_map: LabelMap | None = None,
    slice_axis: str = "axial",
    modality: str = "MR",
    unknown_labels: str = "error",
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Faithfulness, agreement with real, 3D consistency and intensity realism of generated volumes.

    Args:
        cases: From :func:`find_evaluation_cases`.
        segmenter: A :class:`VolumeSegmenter` (e.g. :class:`volgen.segmenter.Segmenter`,
            :class:`CommandSegmenter`) or ``"intensity"``: an :class:`IntensityVolumeSegmenter` fitted on the
            cases' real volumes (every case needs one then).
        label_map: Remaps the masks (and a command segmenter's output) to class indices; ``None`` uses the
            label values as they are (a learned segmenter's own label map is used when this is ``None``).
        slice_axis: The generator's slice axis (``axial``, ``coronal``, ``sagittal``), to name the
            through-plane axis in the consistency ratios.
        modality: ``CT`` reports intensities as HU; ``MR`` in the volumes' own arbitrary units.
        unknown_labels: Mask values the label map does not know: ``error`` or ``background``.
        progress: Called with a short message per case.

    Raises:
        InputError: unreadable volumes, a generated or real volume not on its segmentation's grid, mask values
            unknown to the label map.
        VolgenError: ``"intensity"`` without real volumes; a learned segmenter whose classes differ from the
            label map.
    """
    import SimpleITK as sitk

    from volgen.errors import InputError, VolgenError
    from volgen.io import Geometry, read_image, read_label

    if not cases:
        raise VolgenError("no cases to evaluate")
    own_map = getattr(segmenter, "label_map", None)
    if label_map is None and isinstance(own_map, LabelMap):
        label_map = own_map
    elif (
        label_map is not None
        and isinstance(own_map, LabelMap)
        and own_map.class_names != label_map.class_names
    ):
        raise VolgenError(
            f"the segmenter's classes ({', '.join(own_map.class_names)}) differ from the label map's "
            f"({', '.join(label_map.class_names)})"
        )

    def load(case: EvaluationCase) -> tuple[Any, np.ndarray, Any, Any]:
        seg = read_label(case.segmentation)
        raw = sitk.GetArrayViewFromImage(seg)
        if label_map is not None:
            mask = label_map.remap(raw, unknown=unknown_labels, source=case.segmentation)  # type: ignore[arg-type]
        else:
            mask = np.array(raw)
        grid = Geometry.of(seg)
        gen = read_image(case.generated)
        if not Geometry.of(gen).close_to(grid, atol=1e-3):
            raise InputError(
                case.generated,
                f"not on the grid of its segmentation {case.segmentation} ({_grids(gen, seg)})",
            )
        real = None
        if case.real is not None:
            real = read_image(case.real)
            if not Geometry.of(real).close_to(grid, atol=1e-3):
                raise InputError(
                    case.real,
                    f"not on the grid of its segmentation {case.segmentation} ({_grids(real, seg)})",
                )
        return seg, mask, gen, real

    if isinstance(segmenter, str):
        if segmenter != "intensity":
            raise VolgenError(f"unknown segmenter {segmenter!r}")
        missing = [c.case for c in cases if c.real is None]
        if missing:
            raise VolgenError(
                "the intensity segmenter is fitted on real volumes: every case needs one "
                f"(missing for {', '.join(missing[:5])})"
            )
        pairs = []
        for case in cases:
            _, mask, _, real = load(case)
            pairs.append((sitk.GetArrayViewFromImage(real), mask))
        segmenter = IntensityVolumeSegmenter.fit(pairs)

    results: list[CaseEvaluation] = []
    example: dict[str, np.ndarray] = {}
    all_classes: set[int] = set(range(1, label_map.num_classes)) if label_map is not None else set()
    case_classes: list[list[int]] = []
    names: dict[int, str] = (
        dict(enumerate(label_map.class_names)) if label_map is not None else {0: "background"}
    )
    for case in cases:
        if progress is not None:
            progress(f"{case.case}: segmenting")
        seg, mask, gen_image, real_image = load(case)
        gen = sitk.GetArrayFromImage(gen_image)
        pred_gen = np.asarray(segmenter.segment(gen_image))
        pred_real = None if real_image is None else np.asarray(segmenter.segment(real_image))
        if label_map is None:
            found = {int(v) for v in np.unique(mask)} | {int(v) for v in np.unique(pred_gen)}
            all_classes |= found - {0}
            names.update({v: str(v) for v in found if v != 0})
        classes = sorted(all_classes)
        case_classes.append(classes)

        def named(scores: dict[int, float]) -> dict[str, float]:
            return {names[c]: v for c, v in scores.items()}

        item = CaseEvaluation(case=case.case, faithfulness=named(dice(pred_gen, mask, classes)))
        real = None
        if real_image is not None:
            real = sitk.GetArrayFromImage(real_image)
            item.agreement = named(dice(pred_gen, pred_real, classes))
            item.segmenter_on_real = named(dice(pred_real, mask, classes))
            axis = array_slice_axis(seg, slice_axis)
            item.consistency = consistency(gen, real, mask > 0, slice_axis=axis)
        for c in [0, *classes]:
            inside = mask == c
            if not inside.any():
                continue
            item.intensity[names[c]] = {
                "voxels": int(inside.sum()),
                "generated": _class_stats(gen[inside]),
                "real": None if real is None else _class_stats(real[inside]),
            }
        if not example:
            example = _example_slices(mask, gen, real, pred_gen, array_slice_axis(seg, slice_axis))
        results.append(item)

    class_names = [names[c] for c in [0, *sorted(all_classes)]]
    return EvaluationReport(
        cases=results,
        class_names=class_names,
        segmenter=getattr(segmenter, "name", type(segmenter).__name__),
        slice_axis=slice_axis,
        units="HU" if modality == "CT" else "a.u. (volume units)",
        example=example,
    )


def _grids(a: Any, b: Any) -> str:
    return f"size {tuple(a.GetSize())} vs {tuple(b.GetSize())}, spacing " + (
        f"{tuple(round(s, 4) for s in a.GetSpacing())} vs {tuple(round(s, 4) for s in b.GetSpacing())}"
    )


def _example_slices(
    mask: np.ndarray, gen: np.ndarray, real: np.ndarray | None, pred: np.ndarray, axis: str
) -> dict[str, np.ndarray]:
    """The slice (along the generator's slice axis) with the most foreground, from each volume."""
    dim = AXES.index(axis)
    others = tuple(d for d in range(3) if d != dim)
    index = int(np.argmax((mask > 0).sum(axis=others)))
    out = {
        "segmentation": np.take(mask, index, axis=dim),
        "generated": np.take(gen, index, axis=dim),
        "prediction": np.take(pred, index, axis=dim),
    }
    if real is not None:
        out["real"] = np.take(real, index, axis=dim)
    return {k: np.asarray(v) for k, v in out.items()}


def write_report(
    report: EvaluationReport, out_dir: PathLike, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``evaluation.json`` and ``evaluation.png`` into ``out_dir`` (created if missing), atomically.

    The figure: per-class Dice bars (faithfulness, agreement, segmenter on real), per-class intensity medians
    with quartile whiskers (generated vs real), and one example slice: segmentation, real, generated and the
    segmenter's prediction on the generated slice.
    """
    import json

    from volgen.errors import OutputError
    from volgen.io import atomic_write, check_output_path

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "exists and is not a folder")
    if not out_dir.parent.is_dir():
        raise OutputError(out_dir, f"folder {out_dir.parent} does not exist")
    json_path, png_path = out_dir / "evaluation.json", out_dir / "evaluation.png"
    for path in (json_path, png_path):
        if out_dir.exists():
            check_output_path(path, overwrite=overwrite)
    out_dir.mkdir(exist_ok=True)
    with atomic_write(json_path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    with atomic_write(png_path, overwrite=overwrite) as tmp:
        _figure(report, tmp)
    return json_path, png_path


def _figure(report: EvaluationReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from volgen.preview import add_class_legend, label_rgb

    summary = report.summary()
    fg = report.class_names[1:]
    fig = plt.figure(figsize=(13, 8), constrained_layout=True)
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[0, :2])
    metrics = [
        ("faithfulness", "Dice(m_gen^pred, m)"),
        ("agreement", "Dice(m_gen^pred, m_real^pred)"),
        ("segmenter_on_real", "Dice(m_real^pred, m)"),
    ]
    metrics = [(k, label) for k, label in metrics if summary.get(k)]
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(fg))
    for i, (key, label) in enumerate(metrics):
        values = [summary[key]["per_class"].get(n, float("nan")) for n in fg]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, np.nan_to_num(values), width, label=label)
    ax.set_xticks(x, fg, rotation=30, ha="right")
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice per class (mean over {len(report.cases)} case(s))")
    ax.legend(fontsize=7, loc="upper center", ncol=3)

    ax = fig.add_subplot(grid[0, 2:])
    names = [n for n in report.class_names if n in summary["intensity"]]
    x = np.arange(len(names))
    for i, which in enumerate(("generated", "real")):
        stats = [summary["intensity"][n].get(which) for n in names]
        if not any(stats):
            continue
        med = np.array([s["median"] if s else np.nan for s in stats])
        low = np.array([s["median"] - s["q25"] if s else 0.0 for s in stats])
        high = np.array([s["q75"] - s["median"] if s else 0.0 for s in stats])
        ax.errorbar(x + (i - 0.5) * 0.2, med, yerr=[low, high], fmt="o", capsize=3, label=which)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel(f"intensity ({report.units})")
    ax.set_title("median and quartiles per class")
    ax.legend(fontsize=8)

    ex = report.example
    panels = [("segmentation", True), ("real", False), ("generated", False), ("prediction", True)]
    panels = [(k, is_label) for k, is_label in panels if k in ex]
    images = [ex[k] for k, is_label in panels if not is_label]
    if images:
        lo, hi = np.percentile(np.concatenate([i.ravel() for i in images]), [0.5, 99.5])
    else:
        lo, hi = 0.0, 1.0
    for i, (key, is_label) in enumerate(panels):
        ax = fig.add_subplot(grid[1, i])
        view = np.flipud(ex[key])
        if is_label:  # the class colours of every volgen figure (volgen.preview)
            ax.imshow(label_rgb(view), interpolation="nearest")
        else:
            ax.imshow(view, cmap="gray", vmin=lo, vmax=hi)
        title = {"prediction": "segmenter on generated"}.get(key, key)
        ax.set_title(f"{title} ({report.cases[0].case})", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"volgen evaluate: {report.segmenter}", fontsize=10)
    add_class_legend(fig, report.class_names, loc="outside lower center")
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# Hardware efficiency


def unet_forward_flops(unet: Any, batch_size: int = 1) -> int:
    """Floating-point operations of one forward of a ``UNet2DModel`` on ``batch_size`` slices.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2; convolutions,
    matrix products and attention are counted, element-wise work is not), on zeros of the UNet's input shape
    at time step 500.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = unet.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    parameter = next(unet.parameters())
    x = torch.zeros((batch_size, config.in_channels, *size), dtype=parameter.dtype, device=parameter.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, 500)
    return int(counter.get_total_flops())
