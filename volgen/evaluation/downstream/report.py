"""The downstream report: one result per (condition, seed), the summary over seeds, JSON, CSV and a figure."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volgen.types import PathLike

JSON_NAME, CSV_NAME, FIGURE_NAME = "downstream.json", "downstream.csv", "downstream.png"


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class RunResult:
    """One segmenter (one condition, one seed) tested on the real test pairs.

    Attributes:
        dice: ``{test case: {class name: Dice}}`` (NaN: the class is in neither prediction nor mask).
        train_cases: Training volumes (real and synthetic).
        train_slices: Training slices in the slicing frame (0 for nnU-Net).
        seconds: Training and testing time.
    """

    condition: str
    seed: int
    dice: dict[str, dict[str, float]]
    train_cases: int
    train_slices: int
    seconds: float

    def per_class(self) -> dict[str, float]:
        """Dice per class, mean over the test cases."""
        names = next(iter(self.dice.values())).keys() if self.dice else []
        return {n: _nanmean([case[n] for case in self.dice.values()]) for n in names}

    @property
    def mean(self) -> float:
        """Mean Dice over the foreground classes (each a mean over the test cases)."""
        return _nanmean(list(self.per_class().values()))

    def save(self, path: Path, key: str) -> None:
        from volgen.io import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, overwrite=True) as tmp:
            tmp.write_text(
                json.dumps({"key": key, **_json_safe(asdict(self), None)}, indent=1) + "\n", encoding="utf-8"
            )

    @classmethod
    def load(cls, path: Path, key: str) -> RunResult | None:
        """A result saved with the same key, else ``None`` (missing, unreadable, or made differently)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.pop("key") != key:
                return None
            data["dice"] = {
                case: {n: float("nan") if v is None else float(v) for n, v in per.items()}
                for case, per in data["dice"].items()
            }
            return cls(**data)
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class DownstreamReport:
    """Every run of a downstream evaluation and the settings it ran with."""

    conditions: list[str]
    class_names: list[str]
    runs: list[RunResult]
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per condition: per class and ``mean``, the mean over seeds and the worst seed; ``ratio``: the mean
        Dice against ``real``'s (1.0: as good as real training data)."""
        result: dict[str, dict[str, Any]] = {}
        for condition in self.conditions:
            runs = [r for r in self.runs if r.condition == condition]
            if not runs:
                continue
            table = {n: [r.per_class()[n] for r in runs] for n in self.class_names}
            table["mean"] = [r.mean for r in runs]
            result[condition] = {
                "seeds": len(runs),
                "mean": {n: _nanmean(v) for n, v in table.items()},
                "worst": {
                    n: min((x for x in v if not math.isnan(x)), default=float("nan"))
                    for n, v in table.items()
                },
            }
        real = result.get("real", {}).get("mean", {}).get("mean")
        for entry in result.values():
            mean = entry["mean"]["mean"]
            entry["ratio"] = mean / real if real and not math.isnan(mean) else float("nan")
        return result

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "settings": self.settings,
                "warnings": self.warnings,
                "classes": self.class_names,
                "summary": self.summary(),
                "runs": [{**asdict(r), "per_class": r.per_class(), "mean": r.mean} for r in self.runs],
            }
        )

    def csv_text(self) -> str:
        """One row per condition, seed and class (``mean``: over the classes); test cases averaged."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["condition", "seed", "class", "dice", "train_cases", "train_slices"])
        for r in self.runs:
            for name, value in [*r.per_class().items(), ("mean", r.mean)]:
                writer.writerow(
                    [
                        r.condition,
                        r.seed,
                        name,
                        "" if math.isnan(value) else f"{value:.5f}",
                        r.train_cases,
                        r.train_slices,
                    ]
                )
        return buffer.getvalue()


def _json_safe(value: Any, digits: int | None = 6) -> Any:
    """``value`` with NaN as ``None`` and floats rounded to ``digits`` (``None``: exact)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value if digits is None else round(value, digits)
    if isinstance(value, dict):
        return {str(k): _json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, digits) for v in value]
    return value


def downstream_figure(report: DownstreamReport, path: Path) -> None:
    """Bars per class (and the mean) for every condition: the mean over seeds, a tick at the worst seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.summary()
    conditions = [c for c in report.conditions if c in summary]
    scored = [n for n in report.class_names if any(not math.isnan(summary[c]["mean"][n]) for c in conditions)]
    groups = [*scored, "mean"]  # classes no test case contains have no bars
    width = 0.8 / max(1, len(conditions))
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.2), constrained_layout=True)
    for i, condition in enumerate(conditions):
        means = np.array([summary[condition]["mean"][g] for g in groups], dtype=float)
        worst = np.array([summary[condition]["worst"][g] for g in groups], dtype=float)
        offset = x + (i - (len(conditions) - 1) / 2) * width
        ax.bar(
            offset, np.nan_to_num(means), width, label=f"{condition} ({summary[condition]['seeds']} seeds)"
        )
        ax.errorbar(offset, np.nan_to_num(means), yerr=[np.nan_to_num(means - worst), np.zeros_like(means)],
                    fmt="none", ecolor="black", capsize=2, linewidth=0.8)  # fmt: skip
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice on the real test cases")
    ax.set_title(
        "Trained on real, synthetic and both; tested on real\n(bar: mean over seeds, whisker: worst seed)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_downstream_report(report: DownstreamReport, out_dir: PathLike) -> tuple[Path, Path, Path]:
    """Write ``downstream.json``, ``downstream.csv`` and ``downstream.png`` into ``out_dir`` (atomically;
    they are the run's results and are replaced by a rerun)."""
    from volgen.io import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / JSON_NAME, out_dir / CSV_NAME, out_dir / FIGURE_NAME
    with atomic_write(paths[0], overwrite=True) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    with atomic_write(paths[1], overwrite=True) as tmp:
        tmp.write_text(report.csv_text(), encoding="utf-8")
    with atomic_write(paths[2], overwrite=True) as tmp:
        downstream_figure(report, Path(tmp))
    return paths
