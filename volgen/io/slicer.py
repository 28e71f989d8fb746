"""3D Slicer segmentation files (``.seg.nrrd``).

Slicer stores a segmentation as an NRRD labelmap plus ``SegmentN_*`` header fields (``_Name``,
``_LabelValue``, ``_Layer``, ...). Since Slicer 4.11 overlapping segments go to separate *layers*: the
file is then 4D, a list axis of layers before the 3 spatial axes, which SimpleITK reads as a 3D image
with one component per layer. volgen needs one label per voxel, so layers are merged when no voxel is
set in two layers; otherwise the file is refused ("overlapping segments").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volgen.errors import InputError
from volgen.io._common import SLICER_SEG, Loaded, clear_metadata

__all__ = ["Segment", "is_slicer_segmentation", "segments_from_metadata", "slicer_segmentation"]

logger = logging.getLogger(__name__)

_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(\w+)$")


@dataclass(frozen=True)
class Segment:
    """One segment declared in a ``.seg.nrrd`` header.

    Attributes:
        index: N of the ``SegmentN_`` fields.
        name: ``SegmentN_Name`` (or the ID when there is no name).
        label_value: ``SegmentN_LabelValue``: the voxel value of the segment in its layer (1 when absent,
            as in files written before label values were stored).
        layer: ``SegmentN_Layer`` (0 when absent).
    """

    index: int
    name: str
    label_value: int
    layer: int


def is_slicer_segmentation(keys: tuple[str, ...] | list[str]) -> bool:
    """Whether NRRD header keys (SimpleITK metadata keys) contain Slicer ``SegmentN_`` fields."""
    return any(_SEGMENT_KEY.match(k) for k in keys)


def segments_from_metadata(meta: dict[str, str]) -> list[Segment]:
    """The segments declared in a ``.seg.nrrd`` header, in segment order.

    Args:
        meta: Header fields (SimpleITK metadata of the NRRD).

    Returns:
        The segments, by increasing N; malformed numbers are given as -1.
    """
    fields: dict[int, dict[str, str]] = {}
    for key, value in meta.items():
        match = _SEGMENT_KEY.match(key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = value
    segments = []
    for index in sorted(fields):
        f = fields[index]
        try:
            label_value = int(f.get("LabelValue", "1").strip())
            layer = int(f.get("Layer", "0").strip())
        except ValueError:
            label_value, layer = -1, -1
        name = f.get("Name", f.get("ID", f"Segment_{index}")).strip()
        segments.append(Segment(index=index, name=name, label_value=label_value, layer=layer))
    return segments


def slicer_segmentation(path: Path, image: sitk.Image) -> Loaded:
    """Turn a SimpleITK-read ``.seg.nrrd`` into one 3D label image.

    Args:
        path: The file, for messages.
        image: What SimpleITK read: 3D scalar (one layer) or 3D with one component per layer.

    Returns:
        The merged label volume (``UInt8``/``UInt16``/``UInt32``), with segment names by label value.

    Raises:
        InputError: "overlapping segments" when a voxel is set in two layers; malformed segment fields.
    """
    meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    segments = segments_from_metadata(meta)
    if any(s.label_value < 0 or s.layer < 0 for s in segments):
        raise InputError(path, "malformed SegmentN_LabelValue/_Layer fields in the .seg.nrrd header")
    n_layers = image.GetNumberOfComponentsPerPixel()
    if n_layers == 1:
        out = clear_metadata(image)
        names = {s.label_value: s.name for s in segments}
        return Loaded(image=out, format=SLICER_SEG, is_segmentation=True, label_names=names)

    layers = sitk.GetArrayViewFromImage(image)  # (z, y, x, layer)
    if not np.issubdtype(layers.dtype, np.integer):
        raise InputError(path, f"layered segmentation with non-integer voxel type {layers.dtype}")
    overlap = int(np.count_nonzero(np.count_nonzero(layers, axis=-1) > 1))
    if overlap:
        raise InputError(
            path,
            f"overlapping segments: {overlap} voxels belong to more than one layer; volgen needs "
            "one label per voxel (export a labelmap without overlaps)",
        )
    declared = {(s.layer, s.label_value) for s in segments}
    values = [v for _, v in declared]
    keep_values = len(values) == len(set(values))
    if keep_values:
        mapping = {(layer, value): value for layer, value in declared}
    else:  # the same label value in different layers: renumber segments 1..N in segment order
        mapping = {(s.layer, s.label_value): i + 1 for i, s in enumerate(segments)}
        logger.info("%s: label values repeat across layers; segments renumbered 1..%d", path, len(segments))
    max_out = max(mapping.values(), default=0)
    out_dtype = np.uint8 if max_out < 256 else np.uint16 if max_out < 65536 else np.uint32
    merged = np.zeros(layers.shape[:-1], dtype=out_dtype)
    for layer in range(n_layers):
        data = layers[..., layer]
        present = np.unique(data)
        for value in present[present != 0]:
            key = (layer, int(value))
            if key not in mapping:  # no name, no meaning (and maybe beyond the merged type's range)
                raise InputError(path, f"layer {layer} holds value {int(value)} that no segment declares")
            merged[data == value] = mapping[key]
    out = sitk.GetImageFromArray(merged)
    out.CopyInformation(image)
    names = {mapping[(s.layer, s.label_value)]: s.name for s in segments}
    return Loaded(image=out, format=SLICER_SEG, is_segmentation=True, label_names=names)
