"""A per-plane feature distance that runs offline: fixed random convolutional features and a Fréchet distance.

MAISI scores 3D generators by an FID per plane (XY, YZ, ZX slices through an ImageNet or medical network).
Those weights are downloads; volgen needs a judge that works on an air-gapped machine and gives the same
number everywhere. :class:`RandomConvFeatures` is a small convolutional network whose weights are drawn once
from a fixed seed (never trained): three 3x3/5x5 convolution + ReLU layers at three scales (receptive fields
about 5, 14 and 32 pixels of a 64 x 64 plane), each summarised by the mean and standard deviation of every
channel over the plane.

What it can see: local intensity statistics, contrast, edge and texture energy at those three scales, grain
and blur, banding and streaks within a plane, wrong brightness of large regions. Random features of this
kind are known to track texture statistics well (they are the basis of random-feature texture synthesis).
What it cannot see: anything learned from data (whether anatomy is plausible, right organ shapes), structure
larger than about half a plane, and where in the plane a texture sits (pooling discards position). Its values
are not comparable with any published FID; compare volumes with each other, and with ``feature_floor``:
the distance between the even and the odd planes of the real volume, the spread one real volume has with
itself.
"""

from __future__ import annotations

import numpy as np

#: Seed of the random weights: part of the metric's definition, never change it.
FEATURE_SEED = 20240601
#: Planes are resized to this many pixels square before the network.
FEATURE_SIZE = 64
_LAYERS = ((1, 8, 5), (8, 16, 3), (16, 24, 3))  # (in, out, kernel)


class RandomConvFeatures:
    """Deterministic random convolutional features of 2D planes (see the module docstring).

    Call with ``(N, H, W)`` planes already scaled to about [0, 1]; returns ``(N, 98)`` features.
    """

    def __init__(self, seed: int = FEATURE_SEED, size: int = FEATURE_SIZE) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.size = size
        self.weights = []
        for c_in, c_out, k in _LAYERS:
            w = torch.randn((c_out, c_in, k, k), generator=generator, dtype=torch.float64)
            w -= w.mean(dim=(1, 2, 3), keepdim=True)  # zero-mean filters: edges and texture, ...
            w /= w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.weights.append(w)
        # ... and the plane's mean intensity as the first layer's extra channel (brightness is seen).
        self.dim = 2 * sum(c_out for _, c_out, _ in _LAYERS) + 2

    def __call__(self, planes: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.asarray(planes, dtype=np.float64))[:, None]
        if x.shape[0] == 0:
            return np.zeros((0, self.dim))
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        stats = [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        for i, w in enumerate(self.weights):
            x = F.relu(F.conv2d(x, w, padding=w.shape[-1] // 2))
            stats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
            if i < len(self.weights) - 1:
                x = F.avg_pool2d(x, 2)
        return torch.cat(stats, dim=1).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``.

    ``|μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½)``; the trace of the matrix square root is the sum of the square
    roots of the eigenvalues of ``Σa Σb`` (real and non-negative up to rounding for covariance matrices).
    """
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu = a.mean(axis=0) - b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    root_trace = float(np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum())
    value = float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2.0 * root_trace)
    return max(value, 0.0)


_EXTRACTOR: RandomConvFeatures | None = None


def _extractor() -> RandomConvFeatures:
    global _EXTRACTOR
    if _EXTRACTOR is None:
        _EXTRACTOR = RandomConvFeatures()
    return _EXTRACTOR


def plane_feature_distance(
    generated: np.ndarray,
    real: np.ndarray,
    axis: int,
    index: np.ndarray,
    window: tuple[float, float],
) -> tuple[float, float]:
    """Fréchet distance of the planes ``index`` perpendicular to ``axis``, generated against real.

    Both volumes are scaled with the same ``window`` (the real body's p1, p99) to [0, 1] (not clipped); the
    features of the two sets compared are standardised with their pooled mean and standard deviation per
    feature (0 for identical sets; two fully separated sets approach ``2 x`` the feature count).

    Returns:
        ``(distance, floor)``: generated vs real, and the real volume's even planes vs its odd planes.
    """
    low, high = window
    scale = 1.0 / (high - low) if high > low else 1.0

    def features(volume: np.ndarray, which: np.ndarray) -> np.ndarray:
        planes = np.moveaxis(volume, axis, 0)[which]
        return _extractor()((planes - low) * scale)

    if len(index) < 4:
        return float("nan"), float("nan")
    real_features = features(real, index)
    generated_features = features(generated, index)

    def standardised(*sets: np.ndarray) -> list[np.ndarray]:
        # by the spread of the sets compared, pooled: a distance in units of their joint variation, bounded
        # even where the real planes hardly differ from each other (a thin slab)
        pooled = np.concatenate(sets)
        centre, spread = pooled.mean(axis=0), pooled.std(axis=0) + 1e-12
        return [(s - centre) / spread for s in sets]

    distance = frechet_distance(*standardised(generated_features, real_features))
    floor = frechet_distance(*standardised(real_features[0::2], real_features[1::2]))
    return distance, floor
