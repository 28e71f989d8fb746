"""Synthetic test volumes with awkward geometry, made at test time.

Import from any test (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    from volumes import make_volume, rotation

Defaults are chosen so that geometry bugs show: anisotropic spacing ``(0.7, 0.9, 2.5)`` mm, a non-zero
origin, an oblique direction (a proper rotation, not an axis permutation) and a non-cubic size
``(12, 10, 7)`` voxels ``(x, y, z)``, so that swapped axes change the shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import SimpleITK as sitk

SIZE = (12, 10, 7)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-112.25, 87.5, -43.75)


def rotation(ax: float = 0.3, ay: float = -0.2, az: float = 0.5) -> tuple[float, ...]:
    """A rotation matrix R = Rz(az) Ry(ay) Rx(ax) (angles in radians), row-major, 9 values.

    The default (about 17, -11 and 29 degrees) is oblique: no column is along a world axis.
    """
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


def make_volume(
    kind: Literal["label", "image", "ct"] = "image",
    *,
    size: Sequence[int] = SIZE,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    direction: Sequence[float] | None = None,
    n_labels: int = 3,
    seed: int = 0,
) -> sitk.Image:
    """Build a small 3D SimpleITK image with oblique, anisotropic geometry.

    Args:
        kind: "label": ``UInt8`` labels 0..n_labels (nested boxes, so each label is present and the
            volume is not symmetric under flips); "image": ``Float32`` smooth ramp plus noise with
            non-integer values (MR-like, range about 0..1000); "ct": ``Int16`` values in HU
            (-1000..1500, whole numbers).
        size: Voxels ``(x, y, z)``.
        spacing: mm ``(x, y, z)``.
        origin: LPS mm of voxel (0, 0, 0).
        direction: 9 row-major direction cosines; default :func:`rotation()`.
        n_labels: Number of foreground labels for "label".
        seed: Seed of the noise.

    Returns:
        The image, indexed ``(x, y, z)`` (its numpy array is ``(z, y, x)``).
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in size)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    if kind == "label":
        array = np.zeros((nz, ny, nx), dtype=np.uint8)
        for label in range(1, n_labels + 1):
            # boxes shrinking towards the high-index corner: asymmetric in every axis
            lo = [int(s * label / (n_labels + 2)) for s in (nz, ny, nx)]
            array[lo[0] :, lo[1] :, lo[2] :] = label
    elif kind == "image":
        ramp = 10.0 * x + 37.0 * y + 101.0 * z
        array = (ramp + rng.normal(0.0, 5.0, ramp.shape) + 0.25).astype(np.float32)
    elif kind == "ct":
        array = np.clip(-1000 + 23 * x + 61 * y + 211 * z + rng.integers(-20, 20, x.shape), -1000, 1500)
        array = array.astype(np.int16)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(rotation() if direction is None else [float(d) for d in direction])
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    """Assert equal size and spacing, origin and direction within ``atol`` (mm / cosines)."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol)


def array(image: sitk.Image) -> np.ndarray:
    """A copy of the image's voxels, ``(z, y, x)``."""
    return sitk.GetArrayFromImage(image)
