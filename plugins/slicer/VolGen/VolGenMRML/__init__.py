"""MRML-side functions of the VolGen module (nodes ⇄ NIfTI files), importable without Qt.

Kept apart from :mod:`VolGenLib` (which imports no Slicer at all) and from ``VolGen.py`` (Qt), so the
project's tests can run them headless with the ``slicer-core`` wheel.
"""

from __future__ import annotations

from .generation import NodeGeneration, Outcome
from .volumes import (
    GRID_TOLERANCE,
    ExportReport,
    InputError,
    dimensions,
    export_inputs,
    has_reference_geometry,
    ijk_to_ras,
    import_result,
    is_labelmap,
    is_segmentation,
    labelmap_from_segmentation,
    labelmap_node_from_array,
    read_volume,
    same_grid,
    segments_of,
    voxels,
    write_volume,
)

__all__ = [
    "GRID_TOLERANCE",
    "ExportReport",
    "InputError",
    "NodeGeneration",
    "Outcome",
    "dimensions",
    "export_inputs",
    "has_reference_geometry",
    "ijk_to_ras",
    "import_result",
    "is_labelmap",
    "is_segmentation",
    "labelmap_from_segmentation",
    "labelmap_node_from_array",
    "read_volume",
    "same_grid",
    "segments_of",
    "voxels",
    "write_volume",
]
