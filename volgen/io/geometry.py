"""The geometry of a volume: what places its voxel grid in physical space.

Conventions (as SimpleITK / ITK / DICOM):

- Physical coordinates are in millimetres in the LPS frame (x to the patient's left, y to the posterior,
  z to the superior).
- ``size``, ``spacing`` and the columns of ``direction`` follow the image index order ``(x, y, z)``.
  Note that ``sitk.GetArrayFromImage`` returns arrays indexed ``(z, y, x)``.
- ``direction`` holds 9 values, row-major: column ``j`` (values ``direction[j]``, ``direction[3 + j]``,
  ``direction[6 + j]``) is the unit vector along index axis ``j``. The physical position of the centre
  of voxel ``(i, j, k)`` is ``origin + D @ diag(spacing) @ (i, j, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["Geometry"]


@dataclass(frozen=True)
class Geometry:
    """Everything that places a 3D voxel grid in space (LPS, mm).

    Attributes:
        size: Number of voxels along ``(x, y, z)``.
        spacing: Voxel spacing in mm along ``(x, y, z)``.
        origin: Physical position (LPS, mm) of the centre of voxel ``(0, 0, 0)``.
        direction: 9 direction cosines, row-major as SimpleITK stores them; column ``j`` is the unit
            vector of index axis ``j`` in LPS.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """Read the geometry of a 3D SimpleITK image.

        Args:
            image: A 3D image (any pixel type).

        Returns:
            Its geometry.

        Raises:
            ValueError: If the image is not 3D.
        """
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply(self, image: sitk.Image) -> None:
        """Copy spacing, origin and direction onto ``image`` (in place).

        Args:
            image: A 3D image whose size equals :attr:`size`.

        Raises:
            ValueError: If the image's size differs from :attr:`size`.
        """
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"image size {tuple(image.GetSize())} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def close_to(self, other: Geometry, *, atol: float = 1e-4) -> bool:
        """Whether two geometries describe the same grid.

        Args:
            other: The geometry to compare with.
            atol: Absolute tolerance for spacing and origin (mm) and for the direction cosines.

        Returns:
            True if the sizes are equal and spacing, origin and direction agree within ``atol``.
        """
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )

    def GetSize(self) -> tuple[int, int, int]:  # noqa: N802 - SimpleITK's name
        """The size, as ``sitk.Image.GetSize`` gives it: a geometry stands in for an image wherever only the
        grid matters (memory and time estimates from a header, before any voxel is read)."""
        return self.size

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802 - SimpleITK's name
        """The direction, as ``sitk.Image.GetDirection`` gives it."""
        return self.direction

    def GetSpacing(self) -> tuple[float, float, float]:  # noqa: N802 - SimpleITK's name
        """The spacing, as ``sitk.Image.GetSpacing`` gives it."""
        return self.spacing

    def GetOrigin(self) -> tuple[float, float, float]:  # noqa: N802 - SimpleITK's name
        """The origin, as ``sitk.Image.GetOrigin`` gives it."""
        return self.origin

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction as a 3x3 array; column ``j`` is the LPS unit vector of index axis ``j``."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(np.prod(self.spacing))

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 matrix that maps a voxel index ``(i, j, k, 1)`` (x, y, z order) to LPS mm."""
        out = np.eye(4)
        out[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        out[:3, 3] = self.origin
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: ``size``, ``spacing``, ``origin`` (lists) and ``direction`` (9 floats)."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }
