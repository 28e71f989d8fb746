"""MRML side of the VolGen module: nodes to NIfTI files and back. No Qt, no ``slicer.app``.

Everything here works on MRML nodes and a scene only, through storage nodes and the (static) methods of
``vtkSlicerSegmentationsModuleLogic``, so it runs both inside Slicer and headless with the ``slicer-core``
wheel (Slicer's MRML libraries without the GUI), where the project's tests exercise it.

Coordinates: MRML nodes are in RAS; NIfTI files are written and read by Slicer's ITK-based storage node,
which converts to and from the file's LPS, so a volume written and read back has the same IJK-to-RAS
matrix (up to float32 rounding in the file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
from VolGenLib.models import Segment, SegmentMapping, segment_label_values
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

#: Grid tolerance (mm and direction cosines) for "the reference is on the input's grid".
GRID_TOLERANCE = 1e-3


class InputError(ValueError):
    """The chosen nodes cannot be used as they are; the message says what to change."""


def is_segmentation(node: object) -> bool:
    """``node`` is a ``vtkMRMLSegmentationNode``."""
    return node is not None and bool(node.IsA("vtkMRMLSegmentationNode"))  # type: ignore[attr-defined]


def is_labelmap(node: object) -> bool:
    """``node`` is a ``vtkMRMLLabelMapVolumeNode``."""
    return node is not None and bool(node.IsA("vtkMRMLLabelMapVolumeNode"))  # type: ignore[attr-defined]


def segments_of(segmentation_node, *, visible_only: bool = True) -> list[Segment]:
    """The segments of a segmentation node, in order (only those shown, when ``visible_only``).

    A segment without a display node, or with visibility unknown, counts as visible.
    """
    segmentation = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        if visible_only and display is not None and not display.GetSegmentVisibility(segment_id):
            continue
        segment = segmentation.GetSegment(segment_id)
        value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else None
        segments.append(Segment(id=segment_id, name=segment.GetName() or segment_id, label_value=value))
    return segments


def ijk_to_ras(node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix (mm; directions times spacing, then the origin)."""
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def dimensions(node) -> tuple[int, int, int]:
    """Voxels ``(i, j, k)`` of a volume node's image data (``(0, 0, 0)`` without image data)."""
    image = node.GetImageData()
    return (0, 0, 0) if image is None else tuple(int(d) for d in image.GetDimensions())  # type: ignore[return-value]


def same_grid(a, b, *, atol: float = GRID_TOLERANCE) -> bool:
    """Two volume nodes share size, spacing, origin and direction (and parent transform)."""
    return (
        dimensions(a) == dimensions(b)
        and np.allclose(ijk_to_ras(a), ijk_to_ras(b), rtol=0.0, atol=atol)
        and a.GetTransformNodeID() == b.GetTransformNodeID()
    )


def voxels(node) -> np.ndarray:
    """A copy of a volume node's voxels as a numpy array ``(k, j, i)`` (single component)."""
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"{node.GetName()}: the volume has no image data")
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


@dataclass
class ExportReport:
    """What :func:`export_inputs` wrote and decided.

    Attributes:
        input: The label volume written (NIfTI).
        reference: The reference written, or ``None``.
        mapping: Segment -> label value choice (segmentation inputs only).
        notes: Messages for the user (segments left out, ...).
    """

    input: Path
    reference: Path | None = None
    mapping: SegmentMapping | None = None
    notes: list[str] = field(default_factory=list)


def write_volume(node, path: str | Path, *, compress: bool = True) -> Path:
    """Write a scalar or labelmap volume node to a file (NIfTI by the ``.nii.gz`` extension).

    A standalone storage node does the writing, so the node's own storage node (where it was loaded
    from) is left alone.
    """
    path = Path(path)
    if node.GetImageData() is None:
        raise InputError(f"{node.GetName()}: the volume has no image data")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node) or not path.is_file():
        raise OSError(f"cannot write {node.GetName()} to {path}")
    return path


def read_volume(path: str | Path, node, *, name: str | None = None):
    """Read a volume file into an existing volume node (replacing its image data and geometry).

    The node is left without a storage node: the file is temporary, and Slicer offers to save the node
    like any new data.
    """
    path = Path(path)
    if not path.is_file():
        raise OSError(f"no such file: {path}")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)  # do not read a "series" of similarly named files from the temp folder
    if not storage.ReadData(node):
        raise OSError(f"cannot read {path}")
    if name:
        node.SetName(name)
    return node


def has_reference_geometry(segmentation_node) -> bool:
    """The segmentation records the grid it was drawn on (Segment Editor and .seg.nrrd files set it)."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return bool(segmentation_node.GetSegmentation().GetConversionParameter(name))


def labelmap_from_segmentation(
    segmentation_node,
    mapping: SegmentMapping,
    *,
    reference_volume_node=None,
    segment_order: Sequence[str] | None = None,
):
    """A labelmap volume node holding the mapped segments with their chosen label values.

    The grid is the reference volume's when given, else the segmentation's reference geometry, else (a
    segmentation without one) the box around all exported segments. Each segment is exported on that grid
    and painted in segment order: where segments overlap, the later one wins, as in Slicer's own export.

    Args:
        segmentation_node: The segmentation.
        mapping: Segment ID -> label value (:func:`VolGenLib.segment_label_values`).
        reference_volume_node: Volume whose grid the labelmap gets (e.g. the reference image).
        segment_order: Segment IDs in painting order (default: the segmentation's order).

    Returns:
        A ``vtkMRMLLabelMapVolumeNode`` that is not in the scene (write it, then drop it).
    """
    if not mapping.values:
        raise InputError(
            "none of the segments matches a class of the model: rename them after the model's classes"
        )
    scene = segmentation_node.GetScene()
    if scene is None:
        raise InputError(f"{segmentation_node.GetName()}: the segmentation is not in a scene")
    order = [s for s in (segment_order or _segment_ids(segmentation_node)) if s in mapping.values]
    temporaries = []

    def export(segment_ids, reference, extent_mode):
        node = slicer.vtkMRMLLabelMapVolumeNode()
        node.SetName(scene.GenerateUniqueName("volgen-export"))
        node.SetHideFromEditors(True)
        scene.AddNode(node)
        temporaries.append(node)
        ids = vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, node, reference, extent_mode
        )
        if not ok or node.GetImageData() is None:
            raise InputError(
                f"cannot export segments {', '.join(segment_ids)} of {segmentation_node.GetName()}"
            )
        return node

    try:
        grid = reference_volume_node
        if grid is None:  # fix one grid for all segments first
            mode = (
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
                if has_reference_geometry(segmentation_node)
                else slicer.vtkSegmentation.EXTENT_UNION_OF_SEGMENTS
            )
            grid = export(order, None, mode)
        labels = np.zeros(voxels(grid).shape, dtype=np.int16)
        matrix = ijk_to_ras(grid)
        for segment_id in order:
            mask = voxels(export([segment_id], grid, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)) != 0
            if mask.shape != labels.shape:
                raise InputError(f"segment {segment_id!r} was exported to another grid")
            labels[mask] = mapping.values[segment_id]
    finally:
        for node in temporaries:
            display = node.GetDisplayNode()
            scene.RemoveNode(node)
            if display is not None and display.GetScene() is not None:
                scene.RemoveNode(display)
    return labelmap_node_from_array(labels, matrix, name=f"{segmentation_node.GetName()}-labels")


def labelmap_node_from_array(labels: np.ndarray, ijk_to_ras_matrix: np.ndarray, *, name: str = "labels"):
    """A ``vtkMRMLLabelMapVolumeNode`` (not in a scene) from integer voxels ``(k, j, i)`` and IJK-to-RAS."""
    labels = np.ascontiguousarray(labels)
    image = vtkImageData()
    image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    array = numpy_support.numpy_to_vtk(labels.ravel(), deep=True)
    image.GetPointData().SetScalars(array)
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetName(name)
    node.SetAndObserveImageData(image)
    matrix = vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(ijk_to_ras_matrix[i][j]))
    node.SetIJKToRASMatrix(matrix)
    return node


def _segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def export_inputs(
    input_node,
    input_path: str | Path,
    *,
    classes: dict[str, list[int]],
    reference_node=None,
    reference_path: str | Path | None = None,
    visible_only: bool = True,
) -> ExportReport:
    """Write the generation's input (and reference) as NIfTI files for ``volgen generate``.

    Args:
        input_node: A segmentation node (its segments are matched to the model's classes by name, see
            :func:`VolGenLib.segment_label_values`) or a labelmap volume node (written as it is).
        input_path: Where to write the label volume.
        classes: The model's label map (class name -> label values).
        reference_node: Optional scalar volume (the real image for λ). A segmentation is exported on its
            grid; a labelmap must already share it.
        reference_path: Where to write the reference (required with ``reference_node``).
        visible_only: Export only the segments shown (like Slicer's "export visible segments").

    Returns:
        The :class:`ExportReport`.

    Raises:
        InputError: with a message for the user when the nodes cannot be used.
    """
    if input_node is None:
        raise InputError("choose an input segmentation or labelmap volume")
    if reference_node is not None and reference_path is None:
        raise ValueError("reference_path is required with a reference node")
    notes: list[str] = []
    mapping = None
    if is_segmentation(input_node):
        segments = segments_of(input_node, visible_only=visible_only)
        if not segments:
            raise InputError(f"{input_node.GetName()}: no (visible) segments to export")
        mapping = segment_label_values(segments, classes)
        if reference_node is None and not has_reference_geometry(input_node):
            notes.append(
                f"{input_node.GetName()} has no reference geometry: the output covers the segments' "
                "bounding box (choose a reference image, or set the geometry in Segment Editor, to see more)"
            )
        if mapping.unmatched:
            notes.append(
                "left out (no class of this model has their name or label value): "
                + ", ".join(mapping.unmatched)
                + f"; the model's classes are: {', '.join(classes)}"
            )
        labelmap = labelmap_from_segmentation(input_node, mapping, reference_volume_node=reference_node)
        labelmap.SetAndObserveTransformNodeID(None)
        written = write_volume(labelmap, input_path)
    elif is_labelmap(input_node):
        if reference_node is not None and not same_grid(input_node, reference_node):
            raise InputError(
                f"the reference {reference_node.GetName()} is not on the grid of {input_node.GetName()}: "
                "resample it (Resample Scalar/Vector/DWI Volume module), or use a segmentation as input: "
                "a segmentation is exported on the reference's grid"
            )
        written = write_volume(input_node, input_path)
    elif input_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(
            f"{input_node.GetName()} is a scalar volume, not a segmentation: convert it to a labelmap"
            " (Data module: right-click → Convert to label map) or pick the segmentation"
        )
    else:
        raise InputError(
            f"{input_node.GetName()}: not a segmentation or labelmap volume ({input_node.GetClassName()})"
        )
    reference = write_volume(reference_node, reference_path) if reference_node is not None else None
    return ExportReport(input=written, reference=reference, mapping=mapping, notes=notes)


def import_result(path: str | Path, output_node, *, like=None, name: str | None = None):
    """Read the generated volume into ``output_node``, under the input's parent transform.

    Args:
        path: The file ``volgen generate`` wrote.
        output_node: A ``vtkMRMLScalarVolumeNode`` (its image data and geometry are replaced).
        like: The input node: the output goes under the same parent transform.
        name: New name of the output node.
    """
    read_volume(path, output_node, name=name)
    if like is not None:
        output_node.SetAndObserveTransformNodeID(like.GetTransformNodeID())
    return output_node
