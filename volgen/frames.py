"""The slicing frame: bring a segmentation (and an optional image) from its own grid to the slice model's,
and bring a generated volume back onto the exact input grid.

Going in (TorchIO): reorient to RAS+ (``ToCanonical``), resample in-plane to a square isotropic pixel that
fits the whole field of view into ``slice_size x slice_size`` (nearest for the label map, linear for the
image; the through-plane spacing is kept, so the number of slices does not change), then pad/crop to exactly
``slice_size`` (labels padded with background, images with their minimum). Then slices are taken along the
model's slice axis. Going back: the generated volume gets the frame's affine and is resampled with
SimpleITK onto the input image's grid, so size, spacing, origin and direction are exactly the input's.

A native-resolution model (``pixel_spacing`` in its metadata) uses :func:`to_native_frame` instead: the
segmentation's own field of view at the model's pixel spacing, whole slices of any size.

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
        exact: The frame's voxels are the input's own (a native frame at the input's spacing, padded only):
            going back is then a copy (nearest neighbour at coinciding points), never an interpolation.
    """

    labels: Tensor
    image: Tensor | None
    affine: np.ndarray
    slice_axis: str
    exact: bool = False

    def to_sitk(self, slices: Tensor | np.ndarray) -> sitk.Image:
        """Slices ``(N, H, W)`` of this frame as a SimpleITK image with the frame's geometry (float32)."""
        slices = torch.as_tensor(np.asarray(slices, dtype=np.float32))
        volume = slices_to_volume(slices, self.slice_axis).contiguous()
        return tio.io.nib_to_sitk(volume[None].numpy(), self.affine)

    def to_grid(
        self,
        slices: Tensor | np.ndarray,
        classes: sitk.Image,
        *,
        default: float = 0.0,
        resampling: str = "linear",
    ) -> sitk.Image:
        """Slices ``(N, H, W)`` of this frame put on the exact geometry of ``classes`` (the class image the
        frame was made from): a copy of coinciding voxels where the frame is ``exact``, else
        :func:`back_to_grid`."""
        if self.exact:
            return resample_to_grid(self.to_sitk(slices), classes, label=True, default=default)
        labels = self.to_sitk(self.labels) if resampling == "mask" else None
        return back_to_grid(self.to_sitk(slices), labels, classes, resampling=resampling, default=default)


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
    label_img = tio.ToCanonical()(sitk_to_torchio(labels, label=True))
    pixel = fitted_pixel(
        label_img.spatial_shape, label_img.spacing, slice_axis=slice_axis, slice_size=slice_size
    )
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


def fitted_pixel(shape, spacing, *, slice_axis: str, slice_size: int) -> float:
    """The fitted frame's pixel (mm): the larger in-plane field of view of a RAS volume of ``shape`` voxels
    of ``spacing`` mm, over ``slice_size``."""
    in_plane = [d for d in range(3) if d != _permutation(slice_axis)[0]]
    return max(float(shape[d]) * float(spacing[d]) for d in in_plane) / slice_size


def resample_to_grid(
    image: sitk.Image, grid: sitk.Image, *, label: bool = False, default: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto ``grid``'s exact size, spacing, origin and direction (linear or nearest)."""
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, float(default), image.GetPixelID())


def back_to_grid(
    image: sitk.Image,
    labels: sitk.Image | None,
    classes: sitk.Image,
    *,
    resampling: str,
    default: float = 0.0,
) -> sitk.Image:
    """A generated ``image`` from its frame onto the grid of the class image ``classes``, as ``volgen generate
    --resampling`` says: ``mask`` (:func:`mask_guided_resample`, ``labels`` the class indices in the frame)
    or ``linear`` (:func:`resample_to_grid`)."""
    if resampling == "mask":
        assert labels is not None, "mask-guided resampling needs the frame's class indices"
        return mask_guided_resample(image, labels, classes, default=default)
    return resample_to_grid(image, classes, default=default)


#: Below this share of a class among the frame pixels that interpolate a grid voxel, the voxel takes the
#: plain linear value (the class is too thin for the frame: nothing of it to interpolate from).
MIN_CLASS_WEIGHT = 1e-3
#: σ, in voxels of the segmentation's grid, of the partial-volume blend at class boundaries in
#: :func:`mask_guided_resample` (0: hard boundaries, the label map's own voxel steps).
EDGE_SIGMA = 0.5


def mask_guided_resample(
    image: sitk.Image,
    labels: sitk.Image,
    classes: sitk.Image,
    *,
    default: float = 0.0,
    edge_sigma: float | None = None,
) -> sitk.Image:
    """Resample a generated ``image`` from its frame onto the grid of ``classes``, each class interpolated
    only from the frame pixels of that class.

    ``labels`` are the class indices in the frame (``image``'s geometry), ``classes`` the class indices on
    the target grid. For each class ``c`` the frame's ``image * [labels == c]`` and ``[labels == c]`` are
    resampled linearly onto the grid and divided: a normalised interpolation that never mixes classes. A
    voxel takes its class's value, blended at class boundaries with its neighbours' over a Gaussian of
    ``edge_sigma`` voxels (default :data:`EDGE_SIGMA`; the segmentation's own resolution, as a scanner's
    partial volume), so boundaries
    are where the segmentation puts them, not blurred over a frame pixel: background next to the anatomy stays
    background where the mask shrinks or splits. A class with less than :data:`MIN_CLASS_WEIGHT` among a
    voxel's frame neighbours (thinner than a frame pixel) contributes the linear value there.
    """
    edge_sigma = EDGE_SIGMA if edge_sigma is None else edge_sigma
    plain = resample_to_grid(image, classes, default=default)
    linear = sitk.GetArrayFromImage(plain).astype(np.float32)
    target = sitk.GetArrayFromImage(classes)
    frame_labels = np.rint(sitk.GetArrayFromImage(labels))
    frame_image = sitk.GetArrayFromImage(image).astype(np.float32)
    margin = int(np.ceil(3 * edge_sigma))
    total = np.zeros(target.shape, np.float32)
    share = np.zeros(target.shape, np.float32)
    for c, (start, size) in _class_boxes(classes, target).items():
        lo = [max(0, a - margin) for a in start[::-1]]  # array order (z, y, x)
        hi = [min(n, a + b + margin) for a, b, n in zip(start[::-1], size[::-1], target.shape, strict=True)]
        sub = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        region = target[sub] == c
        ref = sitk.RegionOfInterest(classes, [hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]], lo[::-1])
        member = (frame_labels == c).astype(np.float32)
        weight = _resampled_like(member, labels, ref)
        value = _resampled_like(frame_image * member, labels, ref)
        own = np.where(weight >= MIN_CLASS_WEIGHT, value / np.maximum(weight, MIN_CLASS_WEIGHT), linear[sub])
        soft = region.astype(np.float32)
        if edge_sigma > 0:
            soft = _gaussian(soft, edge_sigma)
        total[sub] += soft * own
        share[sub] += soft
    out = np.where(share > 1e-6, total / np.maximum(share, 1e-6), linear)
    result = sitk.GetImageFromArray(out.astype(sitk.GetArrayViewFromImage(plain).dtype, copy=False))
    result.CopyInformation(plain)
    return result


def _class_boxes(classes: sitk.Image, target: np.ndarray) -> dict[int, tuple[list[int], list[int]]]:
    """Each class's bounding box on the grid, ``{class: (start, size)}`` in SimpleITK's (x, y, z) index
    order, found in one pass; background (0), when present, gets the whole grid."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(classes, sitk.sitkUInt32) if classes.GetPixelID() != sitk.sitkUInt32 else classes)
    boxes = {}
    if bool((target == 0).any()):
        boxes[0] = ([0, 0, 0], list(classes.GetSize()))
    for label in stats.GetLabels():
        box = stats.GetBoundingBox(label)
        boxes[int(label)] = (list(box[:3]), list(box[3:]))
    return boxes


def _gaussian(array: np.ndarray, sigma: float) -> np.ndarray:
    """``array`` smoothed by a Gaussian of ``sigma`` voxels along every axis (zero outside)."""
    smoothed = sitk.DiscreteGaussian(
        sitk.GetImageFromArray(array), variance=sigma**2, maximumKernelWidth=64, useImageSpacing=False
    )
    return sitk.GetArrayFromImage(smoothed)


def _resampled_like(array: np.ndarray, geometry: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """``array`` with ``geometry``'s grid, resampled linearly onto ``ref``'s (outside: 0), as an array."""
    moving = sitk.GetImageFromArray(array)
    moving.CopyInformation(geometry)
    out = sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


#: In-plane spacings within this relative difference of a native model's pixel count as equal: the slices are
#: then only padded, never interpolated.
SPACING_TOLERANCE = 1e-3


def native_grid(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    *,
    pixel_spacing: float,
    slice_axis: str,
    multiple: int = 1,
    min_size: int = 0,
) -> tuple[tuple[int, int, int], np.ndarray, bool]:
    """The grid of a native-resolution frame for a RAS+ volume of ``shape`` with ``affine``.

    In-plane, the field of view is resampled to square pixels of ``pixel_spacing`` mm (centred; unchanged
    where the volume's spacing already is that, within :data:`SPACING_TOLERANCE`) and padded, centred, to a
    multiple of ``multiple`` and at least ``min_size`` pixels; the slices (their count and spacing) are kept.
    Returns the frame's ``(X, Y, Z)`` shape, its 4x4 RAS affine, and whether its voxels are the input's own
    (padding only: no interpolation needed either way).
    """
    dim = _permutation(slice_axis)[0]
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    new_shape, new_affine, exact = list(shape), np.array(affine, dtype=np.float64), True
    for d in (d for d in range(3) if d != dim):
        ratio = pixel_spacing / float(spacing[d])  # input voxels per frame pixel
        same = abs(ratio - 1.0) <= SPACING_TOLERANCE
        ratio = 1.0 if same else ratio
        resampled = int(shape[d]) if same else max(1, round(shape[d] / ratio))
        size = max(resampled, min_size)
        size += -size % multiple
        pad = (size - resampled) // 2
        start = (shape[d] - 1) / 2 - (resampled - 1) / 2 * ratio - pad * ratio  # input index of pixel 0
        new_affine[:3, 3] += np.asarray(affine)[:3, d] * start
        new_affine[:3, d] = np.asarray(affine)[:3, d] * ratio
        new_shape[d], exact = size, exact and same
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), new_affine, exact


def _pad_into(data: Tensor, shape: tuple[int, ...], value: float) -> Tensor:
    """``(X, Y, Z)`` ``data`` centred in a tensor of ``shape`` filled with ``value`` (as in native_grid)."""
    out = data.new_full(shape, value)
    starts = [(s - n) // 2 for s, n in zip(shape, data.shape, strict=True)]
    out[tuple(slice(a, a + n) for a, n in zip(starts, data.shape, strict=True))] = data
    return out


def to_native_frame(
    labels: sitk.Image,
    image: sitk.Image | None = None,
    *,
    pixel_spacing: float,
    slice_axis: str,
    multiple: int = 1,
    min_size: int = 0,
) -> SliceFrame:
    """Bring a class-index label volume (and an image on its grid) into a native-resolution frame.

    Reoriented to RAS+ like :func:`to_slice_frame`; in-plane, resampled to ``pixel_spacing`` mm (nearest for
    labels, linear for the image; not at all when the spacing already matches) and padded to a multiple of
    ``multiple`` (the UNet's downsampling) and at least ``min_size`` pixels (labels with background, the
    image with its minimum): see :func:`native_grid`. :func:`resample_to_grid` brings a result back.

    Args:
        labels: Class indices (integer image), any orientation and spacing.
        image: Physical intensities on the same grid as ``labels`` (or ``None``).
        pixel_spacing: The model's in-plane pixel (mm).
        slice_axis: ``axial``, ``coronal`` or ``sagittal``.
    """
    label_img = tio.ToCanonical()(sitk_to_torchio(labels, label=True))
    shape, affine, exact = native_grid(
        tuple(label_img.spatial_shape),
        label_img.affine,
        pixel_spacing=pixel_spacing,
        slice_axis=slice_axis,
        multiple=multiple,
        min_size=min_size,
    )
    image_img = None
    if image is not None:
        image_img = tio.ToCanonical()(sitk_to_torchio(sitk.Cast(image, sitk.sitkFloat32), label=False))
    if exact:
        label_data = _pad_into(label_img.data[0], shape, 0)
        image_data = None
        if image_img is not None:
            image_data = _pad_into(image_img.data[0].float(), shape, float(image_img.data.min()))
    else:
        resample = tio.Resample((shape, affine))
        label_data = resample(label_img).data[0]
        image_data = None if image_img is None else resample(image_img).data[0].float()
    image_slices = None if image_data is None else volume_to_slices(image_data, slice_axis).contiguous()
    label_slices = volume_to_slices(label_data.to(torch.uint8), slice_axis).contiguous()
    return SliceFrame(
        labels=label_slices, image=image_slices, affine=affine, slice_axis=slice_axis, exact=exact
    )


def native_plane(
    labels: sitk.Image, *, pixel_spacing: float, slice_axis: str, multiple: int = 1, min_size: int = 0
) -> tuple[int, int]:
    """``(H, W)`` of the slices :func:`to_native_frame` makes of ``labels``, from its geometry alone."""
    shape, world_spacing = _world_grid(labels)
    grid, _, _ = native_grid(
        (shape[0], shape[1], shape[2]),
        np.diag([*world_spacing, 1.0]),
        pixel_spacing=pixel_spacing,
        slice_axis=slice_axis,
        multiple=multiple,
        min_size=min_size,
    )
    _, rows, columns = _permutation(slice_axis)
    return grid[rows], grid[columns]


def _world_grid(labels: sitk.Image) -> tuple[list[int], list[float]]:
    """Size and spacing (mm) of ``labels`` along each RAS axis, from its geometry alone: each voxel axis to
    its closest RAS axis, the clearest first (as reorienting does)."""
    affine = tio.io.get_ras_affine_from_sitk(labels)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    closeness = np.abs(affine[:3, :3] / spacing)  # (world axis, voxel axis)
    shape, world_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for _ in range(3):
        w, j = np.unravel_index(int(np.argmax(closeness)), closeness.shape)
        shape[w], world_spacing[w] = int(labels.GetSize()[j]), float(spacing[j])
        closeness[w, :], closeness[:, j] = -1.0, -1.0
    return shape, world_spacing


#: A frame pixel more than this factor coarser than a segmentation's finest in-plane spacing earns a note
#: (:meth:`ModelFrame.resolution_note`): its finest detail then comes from resampling, not from the model.
COARSER_PIXEL = 1.25


@dataclass(frozen=True)
class ModelFrame:
    """How a model slices volumes: the fitted frame (:func:`to_slice_frame`, ``pixel_spacing`` ``None``) or
    the native-resolution frame (:func:`to_native_frame`, padded to a multiple of ``multiple`` pixels)."""

    slice_size: int
    slice_axis: str
    pixel_spacing: float | None = None
    multiple: int = 1

    @classmethod
    def of(cls, metadata, unet_config=None) -> ModelFrame:
        """The frame of a model: its :class:`~volgen.models.ModelMetadata` and its UNet's config (``None``:
        from the metadata alone, without the padding multiple: enough for the pixel and the notes)."""
        factor = 1 if unet_config is None else 2 ** (len(unet_config.block_out_channels) - 1)
        return cls(metadata.slice_size, metadata.slice_axis, metadata.pixel_spacing, factor)

    def to_frame(self, labels: sitk.Image, image: sitk.Image | None = None) -> SliceFrame:
        """``labels`` (and ``image``) in this frame."""
        if self.pixel_spacing is None:
            return to_slice_frame(labels, image, slice_size=self.slice_size, slice_axis=self.slice_axis)
        spacing, axis, multiple = self.pixel_spacing, self.slice_axis, self.multiple
        return to_native_frame(labels, image, pixel_spacing=spacing, slice_axis=axis, multiple=multiple)

    def slice_spacing(self, labels: sitk.Image) -> float:
        """The spacing (mm) of ``labels``' slices along this frame's slice axis: the spacing of the image
        axis closest to it (the frame keeps the through-plane spacing)."""
        row = _permutation(self.slice_axis)[0]  # the world axis the slices run along (same index in LPS)
        direction = np.asarray(labels.GetDirection(), dtype=float).reshape(3, 3)
        return float(labels.GetSpacing()[int(np.argmax(np.abs(direction[row])))])

    @property
    def fine_noise_by_spacing(self) -> tuple[tuple[float, float], ...]:
        """``--rho-fine auto``'s table for this frame (:data:`volgen.defaults.FINE_NOISE_BY_SPACING`, or
        ``NATIVE_FINE_NOISE_BY_SPACING`` for a native frame, whose fine noise is finer anatomy)."""
        from volgen import defaults

        native = self.pixel_spacing is not None
        return defaults.NATIVE_FINE_NOISE_BY_SPACING if native else defaults.FINE_NOISE_BY_SPACING

    def pixel(self, labels: sitk.Image) -> tuple[float, float]:
        """``(frame pixel, finest in-plane spacing of labels)`` in mm: the model's pixel spacing, or for the
        fitted frame the field of view over ``slice_size`` (as :func:`to_slice_frame` resamples)."""
        shape, spacing = _world_grid(labels)
        finest = min(spacing[d] for d in range(3) if d != _permutation(self.slice_axis)[0])
        if self.pixel_spacing is not None:
            return float(self.pixel_spacing), finest
        return fitted_pixel(shape, spacing, slice_axis=self.slice_axis, slice_size=self.slice_size), finest

    def resolution_note(self, labels: sitk.Image) -> str | None:
        """One line when this frame's pixels are coarser than ``labels``' in-plane spacing (more than
        :data:`COARSER_PIXEL` times): the detail between comes from resampling back onto the grid."""
        pixel, finest = self.pixel(labels)
        if pixel <= COARSER_PIXEL * finest:
            return None
        made = "native" if self.pixel_spacing is not None else f"fitted {self.slice_size} px"
        return (
            f"the model makes {pixel:.3g} mm pixels ({made} frame) and the segmentation's slices have "
            f"{finest:.3g} mm: detail finer than {pixel:.3g} mm comes from resampling onto its grid "
            f"(--resampling), not from the model; a native model trained at {finest:.3g} mm makes it "
            "(docs/resolution.md)"
        )

    def plane(self, labels: sitk.Image) -> int | tuple[int, int]:
        """The size of ``labels``' slices in this frame (``H = W`` or ``(H, W)``; for memory estimates)."""
        if self.pixel_spacing is None:
            return self.slice_size
        return native_plane(
            labels, pixel_spacing=self.pixel_spacing, slice_axis=self.slice_axis, multiple=self.multiple
        )
