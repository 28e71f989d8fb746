"""The result of ``volgen evaluate``: per-case metrics, their means over cases, JSON and files on disk.

Definitions used throughout:

- Dice per class between two class-index volumes (:func:`~volgen.evaluation.metrics.dice`); a class present in
  neither volume is NaN ("not applicable") and left out of every mean - it never counts as 1 or 0.
- faithfulness = Dice(m_gen^pred, m): the segmenter's prediction on the generated volume against the mask the
  volume was generated from (the paper's metric); with a real volume also agreement =
  Dice(m_gen^pred, m_real^pred) and the segmenter's own score on the real volume, Dice(m_real^pred, m), which
  bounds what faithfulness can reach with that segmenter.
- consistency: :func:`~volgen.evaluation.metrics.consistency` inside the body (mask > 0), generated against
  real, per array axis; ``planes``: the per-plane metrics of :mod:`volgen.evaluation.planes`.
- intensity realism: per class median and quartiles of the generated and the real volume's voxels (the
  volumes' own units: HU for CT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volgen.evaluation.metrics import AXES, Consistency
from volgen.evaluation.planes import SUMMARY_KEYS, PlaneMetrics
from volgen.types import PathLike


def _class_stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "iqr": float("nan")}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25)}


def _mean_of(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class CaseEvaluation:
    """Metrics of one case; dicts are keyed by class name (foreground; ``intensity`` also background)."""

    case: str
    faithfulness: dict[str, float]
    agreement: dict[str, float] | None = None
    segmenter_on_real: dict[str, float] | None = None
    consistency: Consistency | None = None
    planes: dict[str, PlaneMetrics] | None = None
    intensity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        values = getattr(self, metric)
        return float("nan") if values is None else _mean_of(values.values())


@dataclass
class EvaluationReport:
    """Per-case metrics, their means over cases, and example slices for the figures.

    ``example`` holds one slice along the generator's slice axis (segmentation, real, generated, prediction);
    ``reslices`` one plane per array axis through the body's centre, of the first case with a real volume:
    ``{"real": {"z": ..., "y": ..., "x": ...}, "generated": {...}}``, with ``spacing`` (mm, ``(z, y, x)``).
    """

    cases: list[CaseEvaluation]
    class_names: list[str]
    segmenter: str
    slice_axis: str
    units: str
    example: dict[str, np.ndarray] = field(default_factory=dict)
    reslices: dict[str, Any] = field(default_factory=dict)

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
        out["planes"] = self.plane_summary()
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

    def plane_summary(self) -> dict[str, Any] | None:
        """Per array axis: plane name, and mean / worst case of each per-plane headline number.

        "Worst" is the case furthest from the ideal: from 1.0 for ratios (in log terms), the largest distance.
        """
        with_planes = [c.planes for c in self.cases if c.planes]
        if not with_planes:
            return None
        out: dict[str, Any] = {}
        for axis in AXES:
            entry: dict[str, Any] = {"plane": with_planes[0][axis].plane}
            for key in SUMMARY_KEYS:
                values = [p[axis].summary()[key] for p in with_planes]
                finite = [v for v in values if v is not None and math.isfinite(v)]
                entry[key] = _mean_of(finite)
                if finite:
                    is_ratio = "ratio" in key
                    entry[key + "_worst"] = max(
                        finite, key=lambda v, r=is_ratio: abs(math.log(v)) if r and v > 0 else v
                    )
            out[axis] = entry
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
            item["planes"] = None if not c.planes else {a: m.to_dict() for a, m in c.planes.items()}
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
                    "planes": "per array axis: neighbour-difference ratio inside the body and outside it "
                    "(background, floor 1 % of the real range), texture correlation ratio (high-pass "
                    "residuals of neighbouring planes), high-frequency power ratio and log-spectral distance "
                    "of the planes, Frechet distance of fixed random-conv features of the planes "
                    "(feature_floor: real even vs odd planes); ratios 1.0 and distances 0 are ideal",
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


def write_report(
    report: EvaluationReport, out_dir: PathLike, *, overwrite: bool = False
) -> tuple[Path, Path, Path | None]:
    """Write ``evaluation.json``, ``evaluation.png`` and ``planes.png`` into ``out_dir``, atomically.

    ``evaluation.png`` (:func:`~volgen.evaluation.figure.summary_figure`): Dice bars, intensities per class,
    an example slice. ``planes.png`` (:func:`~volgen.evaluation.figure.planes_figure`, only when a case had a
    real volume): real and generated reslices side by side in all three planes and their power spectra.

    Returns:
        The paths of the JSON, the summary figure and the planes figure (``None`` without a real volume).
    """
    import json

    from volgen.errors import OutputError
    from volgen.evaluation.figure import planes_figure, summary_figure
    from volgen.io import atomic_write, check_output_path

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "exists and is not a folder")
    if not out_dir.parent.is_dir():
        raise OutputError(out_dir, f"folder {out_dir.parent} does not exist")
    json_path, png_path, planes_path = (
        out_dir / n for n in ("evaluation.json", "evaluation.png", "planes.png")
    )
    for path in (json_path, png_path, planes_path):
        if out_dir.exists():
            check_output_path(path, overwrite=overwrite)
    out_dir.mkdir(exist_ok=True)
    with atomic_write(json_path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    with atomic_write(png_path, overwrite=overwrite) as tmp:
        summary_figure(report, tmp)
    if not report.reslices:
        return json_path, png_path, None
    with atomic_write(planes_path, overwrite=overwrite) as tmp:
        planes_figure(report, tmp)
    return json_path, png_path, planes_path
