"""Voxel metrics: Dice, an intensity segmenter, and neighbour-difference smoothness along array axes.

Arrays are numpy ``(z, y, x)`` as SimpleITK gives them, on one grid; masks hold class indices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

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


def dice_on_test(prediction: np.ndarray, target: np.ndarray, classes: int) -> dict[int, float]:
    """Dice per foreground class index; a class absent from the test labels has none (NaN), as MONAI's
    ``DiceMetric(ignore_empty=True)``: a test case without a class cannot say how well it is segmented."""
    scores = dice(prediction, target, range(1, classes))
    return {c: v if bool((target == c).any()) else float("nan") for c, v in scores.items()}


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
