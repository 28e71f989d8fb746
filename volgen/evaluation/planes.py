"""Per-plane 3D consistency: does a generated volume look like the real one in every plane?

A 2D model run slice by slice can match the real volume in its own slicing plane and still fail in the two
reslices: copied texture shows as streaks along the slice axis, independent slices as flicker. Each metric
here is computed for each array axis ``a`` of ``(z, y, x)`` arrays, i.e. for the family of planes
perpendicular to ``a`` (for an axially sliced volume: ``z`` = axial planes, ``y`` = coronal, ``x`` =
sagittal), generated against real on the same grid and mask:

- **neighbour difference** along ``a``: mean ``|v[i+1] - v[i]|`` over neighbour pairs inside the body
  (mask > 0), and over pairs outside it (the background: grey or noisy air shows up here). Ratio
  generated / real; outside the body both sides get a floor of 1 % of the real body's intensity range
  (p99 - p1), so a clean real background (exact zeros) against a clean generated one is 1.0, not 0 / 0.
- **texture correlation** along ``a``: each plane's high-pass residual (the plane minus its Gaussian blur with
  σ = 1 voxel, in-plane), correlated between neighbouring planes (Pearson, pooled over all pairs, pixels
  inside the body in both and at least 2 voxels from a boundary between classes, where the residual would be
  the anatomy's edge rather than texture). Real tissue texture is partly shared by neighbouring slices (e.g.
  0.6 on a 1 mm head CT); copied texture (streaks) drives it towards 1, independent draws (flicker) towards 0.
  Ratio generated / real.
- **power spectrum** of the planes: radially averaged 2D power spectrum (each plane's mean removed, Hann
  window), averaged over planes with at least 5 % body. Summaries: the ratio of high-frequency power
  (radial frequency ≥ 0.25 cycles/voxel; blur < 1, added noise > 1) and the log-spectral distance
  (RMS over frequency bins of log10 generated / real; 0 is ideal).
- **feature distance** of the planes (:mod:`volgen.evaluation.features`): a Fréchet distance between the
  feature distributions of the generated and the real planes, in the spirit of MAISI's per-plane FID.

All ratios are 1.0 (and distances 0) for a volume against itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from volgen.evaluation.features import plane_feature_distance
from volgen.evaluation.metrics import AXES

#: Background floor of the neighbour-difference ratio, as a fraction of the real body's p1-p99 range.
BACKGROUND_FLOOR = 0.01
#: σ (voxels) of the in-plane Gaussian blur whose residual is the texture.
TEXTURE_SIGMA = 1.0
#: Radial frequency (cycles/voxel) from which power counts as high-frequency.
HIGH_FREQUENCY = 0.25
#: Planes with less body than this fraction are left out of spectra and features.
MIN_BODY_FRACTION = 0.05
SPECTRUM_BINS = 16


@dataclass
class PlaneMetrics:
    """Metrics for the planes perpendicular to one array axis (``axis``), generated against real.

    ``plane`` names the anatomical plane when the image geometry tells it (``axial``, ``coronal``,
    ``sagittal``), else ``"⊥ z"`` etc. Spectra are lists of :data:`SPECTRUM_BINS` mean powers, bin centres in
    ``frequencies`` (cycles/voxel).
    """

    axis: str
    plane: str
    step_body: dict[str, float]
    step_background: dict[str, float]
    texture: dict[str, float]
    high_frequency_ratio: float
    spectral_distance: float
    feature_distance: float
    feature_floor: float
    frequencies: list[float] = field(default_factory=list)
    spectrum: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The headline numbers: ratios (1.0 ideal) and distances (0 ideal)."""
        return {
            "step_ratio_body": self.step_body["ratio"],
            "step_ratio_background": self.step_background["ratio"],
            "texture_ratio": self.texture["ratio"],
            "high_frequency_ratio": self.high_frequency_ratio,
            "spectral_distance": self.spectral_distance,
            "feature_distance": self.feature_distance,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Keys of :meth:`PlaneMetrics.summary`, in table order.
SUMMARY_KEYS = (
    "step_ratio_body",
    "step_ratio_background",
    "texture_ratio",
    "high_frequency_ratio",
    "spectral_distance",
    "feature_distance",
)


def _pairs(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    n = array.shape[axis]
    return np.take(array, range(1, n), axis=axis), np.take(array, range(n - 1), axis=axis)


def mean_step(volume: np.ndarray, region: np.ndarray, axis: int) -> float:
    """Mean ``|v[i+1] - v[i]|`` along ``axis`` over neighbour pairs with both voxels in ``region`` (bool)."""
    if volume.shape[axis] < 2:
        return float("nan")
    a, b = _pairs(np.asarray(volume, dtype=np.float64), axis)
    ra, rb = _pairs(region, axis)
    inside = ra & rb
    return float(np.abs(a - b)[inside].mean()) if inside.any() else float("nan")


def _gaussian_1d(volume: np.ndarray, axis: int, sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    pad = [(0, 0)] * volume.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(volume, pad, mode="reflect" if volume.shape[axis] > radius else "edge")
    n = volume.shape[axis]
    out = np.zeros_like(volume)
    for k, w in enumerate(kernel):
        out += w * np.take(padded, range(k, k + n), axis=axis)
    return out


def high_pass(volume: np.ndarray, axis: int, sigma: float = TEXTURE_SIGMA) -> np.ndarray:
    """Each plane perpendicular to ``axis`` minus its in-plane Gaussian blur (σ in voxels)."""
    v = np.asarray(volume, dtype=np.float64)
    blurred = v
    for other in (d for d in range(3) if d != axis):
        blurred = _gaussian_1d(blurred, other, sigma)
    return v - blurred


def class_interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Voxels of a foreground class whose neighbours up to ``radius`` voxels along every axis share its class.

    The high-pass residual at a boundary between classes is the boundary itself (anatomy, equal in real and
    generated volumes); away from boundaries it is the texture that the texture correlation is about.
    """
    mask = np.asarray(mask)
    interior = mask > 0
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        for shift in range(1, radius + 1):
            if n <= shift:
                return np.zeros(mask.shape, dtype=bool)
            a, b = np.take(mask, range(shift, n), axis=axis), np.take(mask, range(n - shift), axis=axis)
            same = a == b
            edge = [slice(None)] * mask.ndim
            edge[axis] = slice(shift, None)
            interior[tuple(edge)] &= same
            edge[axis] = slice(None, n - shift)
            interior[tuple(edge)] &= same
            edge[axis] = slice(None, shift)
            interior[tuple(edge)] = False
            edge[axis] = slice(n - shift, None)
            interior[tuple(edge)] = False
    return interior


def texture_correlation(volume: np.ndarray, region: np.ndarray, axis: int) -> float:
    """Correlation of neighbouring planes' high-pass residuals (planes ⊥ ``axis``) over ``region`` (bool).

    :func:`plane_consistency` passes :func:`class_interior` of the mask: inside the body, away from the
    boundaries between classes.
    """
    if volume.shape[axis] < 2:
        return float("nan")
    a, b = _pairs(high_pass(volume, axis), axis)
    ba, bb = _pairs(region, axis)
    inside = ba & bb
    if inside.sum() < 2:
        return float("nan")
    x, y = a[inside], b[inside]
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _planes_with_body(body: np.ndarray, axis: int) -> np.ndarray:
    others = tuple(d for d in range(3) if d != axis)
    return np.flatnonzero(body.mean(axis=others) >= MIN_BODY_FRACTION)


def radial_spectrum(volume: np.ndarray, axis: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean radially averaged power spectrum of the planes ``index`` perpendicular to ``axis``.

    Returns:
        ``(frequencies, power)``: :data:`SPECTRUM_BINS` bin centres in cycles/voxel (0 .. 0.5) and the mean
        power per bin (each plane's mean removed, 2D Hann window).
    """
    planes = np.moveaxis(np.asarray(volume, dtype=np.float64), axis, 0)[index]
    planes = planes - planes.mean(axis=(1, 2), keepdims=True)
    h, w = planes.shape[1:]
    planes = planes * np.outer(np.hanning(h), np.hanning(w))[None]
    power = (np.abs(np.fft.fft2(planes)) ** 2).mean(axis=0)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.sqrt(fy**2 + fx**2)
    edges = np.linspace(0.0, 0.5, SPECTRUM_BINS + 1)
    which = np.digitize(radius, edges) - 1
    valid = (which >= 0) & (which < SPECTRUM_BINS)
    sums = np.bincount(which[valid], weights=power[valid], minlength=SPECTRUM_BINS)
    counts = np.bincount(which[valid], minlength=SPECTRUM_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    return (edges[:-1] + edges[1:]) / 2.0, mean


def _spectrum_summary(
    frequencies: np.ndarray, generated: np.ndarray, real: np.ndarray
) -> tuple[float, float]:
    high = frequencies >= HIGH_FREQUENCY
    real_high = float(np.nansum(real[high]))
    ratio = float(np.nansum(generated[high])) / real_high if real_high > 0 else float("nan")
    usable = (frequencies > 0) & (generated > 0) & (real > 0)
    if not usable.any():
        return ratio, float("nan")
    distance = float(np.sqrt(np.mean(np.log10(generated[usable] / real[usable]) ** 2)))
    return ratio, distance


def _ratio(generated: float, real: float, floor: float = 0.0) -> float:
    denominator = real + floor
    if not math.isfinite(generated) or not math.isfinite(real) or denominator <= 0:
        return float("nan")
    return (generated + floor) / denominator


def plane_names(direction: tuple[float, ...] | None) -> dict[str, str]:
    """Anatomical name of the planes perpendicular to each array axis, from a 3x3 row-major direction.

    The voxel axis behind array axis ``z`` is the image's third index; its world direction (a column of the
    direction matrix) closest to L/R, A/P or S/I makes the planes sagittal, coronal or axial. Without a
    direction the names are ``⊥ z``, ``⊥ y``, ``⊥ x``.
    """
    if direction is None:
        return {a: f"⊥ {a}" for a in AXES}
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    world_names = ("sagittal", "coronal", "axial")
    names = {}
    for array_axis, name in enumerate(AXES):
        voxel_axis = 2 - array_axis
        names[name] = world_names[int(np.argmax(np.abs(matrix[:, voxel_axis])))]
    if len(set(names.values())) < 3:  # a very oblique grid: no clear plane names
        return {a: f"⊥ {a}" for a in AXES}
    return names


def plane_consistency(
    generated: np.ndarray,
    real: np.ndarray,
    mask: np.ndarray,
    *,
    direction: tuple[float, ...] | None = None,
    features: bool = True,
) -> dict[str, PlaneMetrics]:
    """Per-plane metrics of a generated volume against a real one on the same grid.

    Args:
        generated: ``(z, y, x)`` intensities.
        real: ``(z, y, x)`` intensities, same shape and units.
        mask: ``(z, y, x)`` class indices (or a body mask): the body is ``mask > 0``.
        direction: The grid's 3x3 row-major direction cosines, to name the planes (see :func:`plane_names`).
        features: Also compute the feature distance (the slowest part).

    Returns:
        :class:`PlaneMetrics` per array axis ``z``, ``y``, ``x``.
    """
    generated = np.asarray(generated, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    if generated.shape != real.shape or real.shape != np.shape(mask) or real.ndim != 3:
        raise ValueError(
            f"generated {generated.shape}, real {real.shape} and mask {np.shape(mask)} must be one 3D grid"
        )
    body = np.asarray(mask) > 0
    background = ~body
    interior = class_interior(mask)
    low, high = np.percentile(real[body], [1, 99]) if body.any() else (float(real.min()), float(real.max()))
    floor = BACKGROUND_FLOOR * float(high - low)
    names = plane_names(direction)
    out = {}
    for axis, name in enumerate(AXES):
        step_body = {"generated": mean_step(generated, body, axis), "real": mean_step(real, body, axis)}
        step_body["ratio"] = _ratio(step_body["generated"], step_body["real"])
        step_bg = {
            "generated": mean_step(generated, background, axis),
            "real": mean_step(real, background, axis),
        }
        step_bg["ratio"] = _ratio(step_bg["generated"], step_bg["real"], floor)
        texture = {
            "generated": texture_correlation(generated, interior, axis),
            "real": texture_correlation(real, interior, axis),
        }
        texture["ratio"] = _ratio(texture["generated"], texture["real"])
        index = _planes_with_body(body, axis)
        frequencies, spectrum_gen = radial_spectrum(generated, axis, index)
        _, spectrum_real = radial_spectrum(real, axis, index)
        hf_ratio, lsd = _spectrum_summary(frequencies, spectrum_gen, spectrum_real)
        distance, floor_distance = (
            plane_feature_distance(generated, real, axis, index, (low, high))
            if features
            else (np.nan, np.nan)
        )
        out[name] = PlaneMetrics(
            axis=name,
            plane=names[name],
            step_body=step_body,
            step_background=step_bg,
            texture=texture,
            high_frequency_ratio=hf_ratio,
            spectral_distance=lsd,
            feature_distance=float(distance),
            feature_floor=float(floor_distance),
            frequencies=[float(f) for f in frequencies],
            spectrum={"generated": spectrum_gen.tolist(), "real": spectrum_real.tolist()},
        )
    return out
