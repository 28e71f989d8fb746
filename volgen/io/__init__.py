"""volgen's I/O layer: the only code that knows file formats.

Reads segmentations and images (NIfTI, NRRD, Slicer ``.seg.nrrd``, MetaImage, DICOM series folders,
DICOM SEG) into 3D SimpleITK images with their geometry (LPS, mm, indices ``(x, y, z)``), checks them
and writes volumes back (NIfTI, NRRD, MetaImage, synthetic DICOM series) atomically with the same
geometry. Problems with inputs raise :class:`~volgen.errors.InputError`, problems with outputs
:class:`~volgen.errors.OutputError`; both name the path and give one short reason.
"""

from __future__ import annotations

from volgen.io._common import printable
from volgen.io.atomic import (
    atomic_directory,
    atomic_write,
    check_output_path,
    remove_stale_temporaries,
    stale_temporaries,
)
from volgen.io.dicom import (
    PATIENT_INFO_KEYS,
    SYNTHETIC_STATEMENT,
    DicomSeries,
    list_dicom_series,
    patient_info_of,
    write_dicom_series,
)
from volgen.io.files import file_identity, file_sha256, remove_output, remove_replaced
from volgen.io.geometry import Geometry
from volgen.io.naming import FORMAT_ENDINGS, sidecar_path
from volgen.io.paths import check_apart, check_output, check_readable, overlap, resolve
from volgen.io.torchio_bridge import from_torchio, to_torchio
from volgen.io.volumes import (
    INPUT_EXTENSIONS,
    OUTPUT_EXTENSIONS,
    VolumeInfo,
    describe,
    output_format,
    read_header,
    read_image,
    read_label,
    read_volume,
    verify_written,
    write_volume,
)

__all__ = [
    "FORMAT_ENDINGS",
    "INPUT_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
    "PATIENT_INFO_KEYS",
    "SYNTHETIC_STATEMENT",
    "DicomSeries",
    "Geometry",
    "VolumeInfo",
    "atomic_directory",
    "atomic_write",
    "check_apart",
    "check_output",
    "check_output_path",
    "check_readable",
    "describe",
    "file_identity",
    "file_sha256",
    "from_torchio",
    "list_dicom_series",
    "output_format",
    "overlap",
    "patient_info_of",
    "printable",
    "read_header",
    "read_image",
    "read_label",
    "read_volume",
    "remove_output",
    "remove_replaced",
    "remove_stale_temporaries",
    "resolve",
    "sidecar_path",
    "stale_temporaries",
    "to_torchio",
    "verify_written",
    "write_dicom_series",
    "write_volume",
]
