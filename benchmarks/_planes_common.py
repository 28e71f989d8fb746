"""Shared by the quality benchmarks (planes, planes_heldout, heldout_slab, unseen_subject): score volumes,
summarise over seeds, send a real image through a model's slicing frame."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # volgen from this source tree when it is not installed (a GPU box)
    sys.path.insert(0, str(ROOT))

from volgen import defaults  # noqa: E402
from volgen.evaluation import IntensitySegmenter, dice, plane_consistency  # noqa: E402
from volgen.frames import ModelFrame, resample_to_grid  # noqa: E402

AXES = ("z", "y", "x")
#: Air at least this far (voxels) from every labelled voxel is where :func:`air_grain` looks.
AIR_DISTANCE = 6
GRAIN_KEYS = ("grain_corr_z", "grain_corr_inplane")


def detail_correlation(volume: np.ndarray, where: np.ndarray) -> list[float]:
    """How alike the fine detail of ``volume`` (minus its 5-voxel box mean) is between neighbouring voxels
    that are both ``where``: the correlation along each array axis (z, y, x); NaN where the detail is flat
    (a real skull-stripped image's air) or absent."""
    v = volume.astype(np.float64)
    detail = v - sitk.GetArrayFromImage(sitk.BoxMean(sitk.GetImageFromArray(v), [2, 2, 2]))
    corr = []
    for axis in range(3):
        head, tail = [slice(None)] * 3, [slice(None)] * 3
        head[axis], tail[axis] = slice(None, -1), slice(1, None)
        both = where[tuple(head)] & where[tuple(tail)]
        a, b = detail[tuple(head)][both], detail[tuple(tail)][both]
        ok = a.size > 1 and a.std() > 0 and b.std() > 0
        corr.append(float(np.corrcoef(a, b)[0, 1]) if ok else float("nan"))
    return corr


def air_grain(volume: np.ndarray, labels: np.ndarray, distance: float = AIR_DISTANCE) -> dict[str, float]:
    """:func:`detail_correlation` in the air over ``distance`` voxels from every labelled voxel, along the
    slice axis (the array's first axis, z) and in-plane (mean over y and x). Grain alike along z and not
    in-plane is a streak in every reslice."""
    far = sitk.SignedMaurerDistanceMap(
        sitk.GetImageFromArray((labels > 0).astype(np.uint8)), insideIsPositive=False, useImageSpacing=False
    )
    corr = detail_correlation(volume, sitk.GetArrayFromImage(far) > distance)
    return {"grain_corr_z": corr[0], "grain_corr_inplane": float(np.mean(corr[1:]))}


def slice_frame_round_trip(
    labels: sitk.Image,
    real: sitk.Image,
    slice_size: int,
    slice_axis: str = "axial",
    pixel_spacing: float | None = None,
    resampling: str = defaults.RESAMPLING,
) -> sitk.Image:
    """The real image through a model's slicing frame and back: what a perfect generator of that frame
    returns (the ceiling of a comparison at the model's resolution). ``pixel_spacing``: a native-resolution
    model's frame (:class:`volgen.frames.ModelFrame`); ``resampling``: back as ``volgen generate
    --resampling`` brings a volume (``mask``: each voxel from its own class's frame pixels)."""
    frame = ModelFrame(slice_size, slice_axis, pixel_spacing).to_frame(labels, real)
    assert frame.image is not None
    if frame.exact:  # a copy either way
        return resample_to_grid(frame.to_sitk(frame.image), sitk.Cast(real, sitk.sitkFloat32))
    return frame.to_grid(frame.image, labels, resampling=resampling)


#: The "done" ranges of issue #22 (through-plane texture), per axis: neighbour-difference ratio and
#: texture-correlation ratio against the real image, both [0.8, 1.25] (the step range was (0.85, 1.2) before).
STEP_RANGE, TEXTURE_RANGE = (0.8, 1.25), (0.8, 1.25)


def score(
    generated: np.ndarray,
    real: np.ndarray,
    mask: np.ndarray,
    segmenter: IntensitySegmenter,
    classes: range,
    direction=None,
) -> dict:
    """Faithfulness, background error and per-plane metrics of one generated volume against its real one."""
    d = dice(segmenter.predict(generated), mask, classes)
    body = mask > 0
    low, high = np.percentile(real[body], [1, 99])
    background = float(np.mean(generated[~body]) - np.mean(real[~body])) / float(high - low)
    planes = plane_consistency(generated, real, mask, direction=direction)
    row = {
        "dice": {int(k): v for k, v in d.items()},
        "mean_dice": float(np.nanmean(list(d.values()))),
        "background_error": background,
        "planes": {a: m.summary() | {"feature_floor": m.feature_floor} for a, m in planes.items()},
        **air_grain(generated, mask),
    }
    row["step_in_range"] = all(
        STEP_RANGE[0] <= row["planes"][a]["step_ratio_body"] <= STEP_RANGE[1] for a in AXES
    )
    row["texture_in_range"] = all(
        TEXTURE_RANGE[0] <= row["planes"][a]["texture_ratio"] <= TEXTURE_RANGE[1] for a in AXES
    )
    row["in_range"] = row["step_in_range"] and row["texture_in_range"]
    return row


def _worst_ratio(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return max(finite, key=lambda v: abs(math.log(v))) if finite else float("nan")


def table(groups: dict[str, list[dict]], *, split_ranges: bool = False) -> str:
    """A Markdown table: one row per setting, mean [worst seed] over its seeds.

    ``split_ranges``: also count the seeds whose step ratios alone, and whose texture ratios alone, are in
    range along every axis (before the seeds with both)."""
    header = (
        "| setting | seeds | Dice mean [worst] | bg error mean [worst] | step ratio z / y / x "
        "| step ratio bg z / y / x | texture ratio z / y / x | feature dist. z / y / x | "
        + ("step in range | texture in range | " if split_ranges else "")
        + "seeds in range | air grain corr. z / in-plane |"
    )
    lines = [header, "|---" * (12 if split_ranges else 10) + "|"]
    for name, rows in groups.items():

        def per_axis(key: str, worst: bool = True, rows=rows) -> str:
            cells = []
            for a in AXES:
                values = [r["planes"][a][key] for r in rows]
                mean = float(np.nanmean(values))
                cells.append(f"{mean:.2f}" + (f" [{_worst_ratio(values):.2f}]" if worst else ""))
            return " / ".join(cells)

        dices = [r["mean_dice"] for r in rows]
        bg = [r["background_error"] for r in rows]
        worst_bg = max(bg, key=abs)
        lines.append(
            f"| {name} | {len(rows)} | {np.mean(dices):.3f} [{min(dices):.3f}] | {np.mean(bg):+.3f} "
            f"[{worst_bg:+.3f}] | {per_axis('step_ratio_body')} | {per_axis('step_ratio_background', False)} "
            f"| {per_axis('texture_ratio')} | {per_axis('feature_distance', False)} | "
            + (
                f"{sum(r['step_in_range'] for r in rows)}/{len(rows)} | "
                f"{sum(r['texture_in_range'] for r in rows)}/{len(rows)} | "
                if split_ranges
                else ""
            )
            + f"{sum(r['in_range'] for r in rows)}/{len(rows)} | "
            + " / ".join(f"{np.nanmean([r[k] for r in rows]):.2f}" for k in GRAIN_KEYS)
            + " |"
        )
    return "\n".join(lines)
