"""Hand volumes to TorchIO and take them back, geometry included.

TorchIO tensors are ``(C, W, H, D)`` = ``(C, x, y, z)`` with a 4x4 RAS+ affine; SimpleITK images are
``(x, y, z)`` with LPS origin and direction. The conversion (LPS <-> RAS flip of the first two axes)
is TorchIO's own (:func:`torchio.io.sitk_to_nib`, :func:`torchio.io.nib_to_sitk`), so volumes read by
volgen and by TorchIO agree exactly. TorchIO is imported lazily (it imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from volgen.types import VolumeKind

if TYPE_CHECKING:
    import torchio

__all__ = ["from_torchio", "to_torchio"]


def to_torchio(image: sitk.Image, *, kind: VolumeKind) -> torchio.LabelMap | torchio.ScalarImage:
    """Wrap a 3D SimpleITK image as a TorchIO image.

    Args:
        image: A 3D single-component image (as :func:`volgen.io.read_volume` returns).
        kind: "label" gives a :class:`torchio.LabelMap` (nearest-neighbour in TorchIO transforms),
            "image" a :class:`torchio.ScalarImage`.

    Returns:
        The TorchIO image: tensor ``(1, x, y, z)`` (TorchIO turns ``uint16`` into ``int32`` and
        ``uint32`` into ``int64``, as torch lacks those types), RAS+ affine in mm.

    Raises:
        ValueError: If ``kind`` is unknown or the image is not 3D single-component.
    """
    import torchio as tio

    if kind not in ("label", "image"):
        raise ValueError(f"kind must be 'label' or 'image', got {kind!r}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3D single-component image")
    data, affine = tio.io.sitk_to_nib(image)
    cls = tio.LabelMap if kind == "label" else tio.ScalarImage
    return cls(tensor=data, affine=affine)


def from_torchio(tio_image: torchio.Image) -> sitk.Image:
    """Turn a single-channel TorchIO image back into a 3D SimpleITK image (the inverse of
    :func:`to_torchio`).

    Args:
        tio_image: A :class:`torchio.LabelMap` or :class:`torchio.ScalarImage` with one channel.

    Returns:
        The image with LPS geometry. A LabelMap follows volgen's label rules (``UInt8``/``UInt16``/
        ``UInt32``, non-negative integers); a ScalarImage keeps the tensor's dtype.

    Raises:
        ValueError: More than one channel.
        volgen.errors.InputError: A LabelMap whose values break the label rules.
    """
    import torchio as tio

    from volgen.io.volumes import _as_label

    if tio_image.num_channels != 1:
        raise ValueError(f"expected a single-channel image, got {tio_image.num_channels} channels")
    data = tio_image.data.numpy()
    affine = np.asarray(tio_image.affine, dtype=np.float64)
    image = tio.io.nib_to_sitk(data, affine, force_3d=True)
    if isinstance(tio_image, tio.LabelMap):
        return _as_label(image, tio_image.path or "<torchio LabelMap>")
    return image
