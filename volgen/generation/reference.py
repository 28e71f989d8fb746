"""A reference image for adjustable anatomy (λ): checked against, or resampled onto, the segmentation grid."""

from __future__ import annotations

from typing import Any

import numpy as np

from volgen.errors import InputError
from volgen.types import PathLike

#: Geometries closer than this (mm, and direction cosines) count as the same grid.
GEOMETRY_TOLERANCE = 1e-3


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def geometry_difference(image: Any, grid: Any, atol: float = GEOMETRY_TOLERANCE) -> str | None:
    """What differs between two images' grids (``None`` when they are the same within ``atol``).

    Example: ``"size (181, 217, 181) vs (91, 109, 91); spacing (1, 1, 1) vs (2, 2, 2) mm"``.
    """
    parts = []
    if tuple(image.GetSize()) != tuple(grid.GetSize()):
        parts.append(f"size {tuple(image.GetSize())} vs {tuple(grid.GetSize())}")
    for name, unit, ours, theirs in (
        ("spacing", " mm", image.GetSpacing(), grid.GetSpacing()),
        ("origin", " mm (LPS)", image.GetOrigin(), grid.GetOrigin()),
        ("direction", "", image.GetDirection(), grid.GetDirection()),
    ):
        if not np.allclose(ours, theirs, atol=atol, rtol=0.0):
            parts.append(f"{name} {_fmt(ours)} vs {_fmt(theirs)}{unit}")
    return "; ".join(parts) or None


def resample_onto(reference: Any, grid: Any) -> Any:
    """Linear resampling of a reference (float32) onto ``grid``'s exact voxels; outside it: its minimum.

    Returns ``None`` when the two do not overlap at all.
    """
    import SimpleITK as sitk

    floating = sitk.Cast(reference, sitk.sitkFloat32)
    background = float(sitk.GetArrayViewFromImage(floating).min()) if reference.GetNumberOfPixels() else 0.0
    mask = sitk.Image(reference.GetSize(), sitk.sitkUInt8) + 1
    mask.CopyInformation(reference)
    covered = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(covered).any():
        return None
    out = sitk.Resample(floating, grid, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    out.CopyInformation(grid)
    return out


def match_reference(
    reference: Any,
    grid: Any,
    *,
    resample: bool = False,
    source: PathLike | None = None,
    segmentation: PathLike | None = None,
) -> Any:
    """The reference on the segmentation's grid: checked (the default) or resampled (``resample=True``).

    Raises:
        InputError: The grids differ (the message says what differs) and ``resample`` is off, or the
            reference does not overlap the segmentation at all.
    """
    difference = geometry_difference(reference, grid)
    if difference is None:
        return reference
    against = "the segmentation" if segmentation is None else f"the segmentation {segmentation}"
    if not resample:
        raise InputError(
            source,
            f"geometry differs from {against}: {difference}. Register it to the segmentation, or pass "
            "--resample-reference to resample it onto the segmentation's grid (linear)",
        )
    resampled = resample_onto(reference, grid)
    if resampled is None:
        raise InputError(source, f"does not overlap {against} in physical space ({difference})")
    return resampled
