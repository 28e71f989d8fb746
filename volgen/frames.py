"""The slicing frame: bring a segmentation (and an optional image) from its own grid to the slice model's,
and bring a generated volume back onto the exact input grid.

Going in (TorchIO): reorient to RAS+ (``ToCanonical``), resample in-plane to a square isotropic pixel that
fits the whole field of view into ``slice_size x slice_size`` (nearest for the label map, linear for the
image; the through-plane spacing is kept, so the number of slices does not change), then pad/crop to exactly
``slice_size`` (labels padded with background, images with their minimum). Then slices are taken along the
model's slice axis. Going back: the generated volume gets the frame's affine and is resampled with
SimpleITK onto the input image's grid, so size, spacing, origin and direction are exactly the input's.

Tensor layouts: TorchIO tensors are ``(C, X, Y, Z)`` in RAS+; slice tensors are ``(N, H, W)`` with N along
the slice axis: axial ``(Z, Y, X)``, coronal ``(Y, Z, X)``, sagittal ``(X, Z, Y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torch import Tensor

#: For each slice axis: the RAS tensor dim the slices run along and the permutation (X, Y, Z) -> (N, H, W).
_PERMUTATIONS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


def _permutation(slice_axis: str) -> tuple[int, int, int]:
    try:
        return _PERMUTATIONS[slice_axis]
    except KeyError:
        raise ValueError(
            f"unknown slice axis {slice_axis!r}; expected one of {list(_PERMUTATIONS)}"
        ) from None


def volume_to_slices(volume: Tensor, slice_axis: str) -> Tensor:
    """``(X, Y, Z)`` RAS volume -> ``(N, H, W)`` slices along ``slice_axis`` (a view, no copy)."""
    return volume.permute(*_permutation(slice_axis))


def slices_to_volume(slices: Tensor, slice_axis: str) -> Tensor:
    """Exact inverse of :func:`volume_to_slices`."""
    inverse = tuple(int(i) for i in np.argsort(_permutation(slice_axis)))
    return slices.permute(*inverse)


def sitk_to_torchio(image: sitk.Image, *, label: bool) -> tio.Image:
    """A SimpleITK image (LPS) as a TorchIO image (RAS), geometry kept."""
    tensor, affine = tio.io.sitk_to_nib(image)
    cls = tio.LabelMap if label else tio.ScalarImage
    return cls(tensor=torch.as_tensor(np.ascontiguousarray(tensor)), affine=affine)


@dataclass
class SliceFrame:
    """A volume in the model's slicing frame.

    Attributes:
        labels: ``(N, H, W)`` class indices (uint8), N along the slice axis.
        image: ``(N, H, W)`` physical intensities (float32) of the optional image, else ``None``.
        affine: The frame's 4x4 RAS affine (of the ``(X, Y, Z)`` TorchIO tensor).
        slice_axis: ``axial``, ``coronal`` or ``sagittal``.
    """

    labels: Tensor
    image: Tensor | None
    affine: np.ndarray
    slice_axis: str

    def to_sitk(self, slices: Tensor | np.ndarray) -> sitk.Image:
        """Slices ``(N, H, W)`` of this frame as a SimpleITK image with the frame's geometry (float32)."""
        slices = torch.as_tensor(np.asarray(slices, dtype=np.float32))
        volume = slices_to_volume(slices, self.slice_axis).contiguous()
        return tio.io.nib_to_sitk(volume[None].numpy(), self.affine)


def to_slice_frame(
    labels: sitk.Image, image: sitk.Image | None = None, *, slice_size: int, slice_axis: str
) -> SliceFrame:
    """Resample a class-index label volume (and an image on the same grid) into the slicing frame.

    Args:
        labels: Class indices (integer image), any orientation and spacing.
        image: Physical intensities on the same grid as ``labels`` (or ``None``).
        slice_size: Model slice size (pixels, square).
        slice_axis: ``axial``, ``coronal`` or ``sagittal``.
    """
    permutation = _permutation(slice_axis)
    in_plane = [d for d in range(3) if d != permutation[0]]
    label_img = tio.ToCanonical()(sitk_to_torchio(labels, label=True))
    fov = np.array(label_img.spatial_shape) * np.array(label_img.spacing)
    pixel = float(max(fov[in_plane])) / slice_size
    spacing = [pixel] * 3
    spacing[permutation[0]] = float(label_img.spacing[permutation[0]])
    target_shape = [slice_size] * 3
    target_shape[permutation[0]] = label_img.spatial_shape[permutation[0]]

    resample = tio.Resample(tuple(spacing))
    label_img = tio.CropOrPad(tuple(target_shape), padding_mode=0)(resample(label_img))
    image_slices = None
    if image is not None:
        image_img = tio.ToCanonical()(sitk_to_torchio(sitk.Cast(image, sitk.sitkFloat32), label=False))
        image_img = tio.CropOrPad(tuple(target_shape), padding_mode="minimum")(resample(image_img))
        image_slices = volume_to_slices(image_img.data[0].float(), slice_axis).contiguous()
    label_slices = volume_to_slices(label_img.data[0].to(torch.uint8), slice_axis).contiguous()
    return SliceFrame(labels=label_slices, image=image_slices, affine=label_img.affine, slice_axis=slice_axis)


def resample_to_grid(
    image: sitk.Image, grid: sitk.Image, *, label: bool = False, default: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto ``grid``'s exact size, spacing, origin and direction (linear or nearest)."""
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, float(default), image.GetPixelID())
