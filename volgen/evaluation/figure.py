"""Figures of ``volgen evaluate``: the summary (Dice, intensities, an example slice) and the three planes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from volgen.evaluation.metrics import AXES

if TYPE_CHECKING:
    from volgen.evaluation.report import EvaluationReport


def summary_figure(report: EvaluationReport, path: Path) -> None:
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


def _window(images: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in images])
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def planes_figure(report: EvaluationReport, path: Path) -> None:
    """Real and generated reslices in all three planes through the body's centre, and the planes' spectra.

    Rows: real, generated, radially averaged power spectra (log scale; solid generated, dashed real, mean over
    cases). Columns: the planes perpendicular to array axes z, y, x, named by the image geometry. Each plane
    is shown with its physical aspect ratio, the second array axis of the plane vertical and flipped so that a
    standard axial volume shows superior up in the coronal and sagittal reslices.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reslices, spacing = report.reslices, report.reslices.get("spacing", (1.0, 1.0, 1.0))
    lo, hi = _window([*reslices["real"].values(), *reslices["generated"].values()])
    names = reslices.get("planes", {a: a for a in AXES})
    fig, axes = plt.subplots(3, 3, figsize=(12, 11), constrained_layout=True)
    for column, axis in enumerate(AXES):
        rows, cols = (d for d in range(3) if d != AXES.index(axis))
        aspect = spacing[rows] / spacing[cols]
        for row, which in enumerate(("real", "generated")):
            ax = axes[row, column]
            view = reslices[which][axis]
            ax.imshow(np.flipud(view) if axis != "z" else view, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            ax.set_title(f"{which}: {names[axis]} (⊥ {axis}, {reslices['case']})", fontsize=9)
            ax.axis("off")
        ax = axes[2, column]
        summary = [c.planes[axis] for c in report.cases if c.planes]
        frequencies = np.array(summary[0].frequencies)
        for which, style in (("generated", "-"), ("real", "--")):
            power = np.nanmean([np.array(p.spectrum[which], dtype=np.float64) for p in summary], axis=0)
            ax.semilogy(frequencies, power, style, label=which)
        s = report.plane_summary()[axis]  # type: ignore[index]
        ax.set_title(
            f"{names[axis]}: step {s['step_ratio_body']:.2f} / bg {s['step_ratio_background']:.2f}, "
            f"texture {s['texture_ratio']:.2f}, HF {s['high_frequency_ratio']:.2f}",
            fontsize=8,
        )
        ax.set_xlabel("radial frequency (cycles/voxel)")
        ax.set_ylabel("power")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"volgen evaluate: real vs generated in three planes ({len(report.cases)} case(s); ratios "
        "generated/real along the axis ⊥ each plane, 1.0 ideal)",
        fontsize=10,
    )
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
