"""Checking a volume file before any voxel is read: its header, its size, the files it names.

:func:`read_header` gives a volume's grid from its header alone (nothing decompressed), for memory checks
before reading. The readers of :mod:`volgen.io.volumes` open every file through :func:`open_file`, so the same
checks guard every read: regular files only (a FIFO blocks), a known format, a consistent NIfTI header, a
3D single-component volume of sensible size with at least 2 voxels per axis, finite geometry and an
orthonormal direction, detached data files (``.nrrd``, ``.mhd``, ``.mha``) that exist and are regular files.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volgen.errors import InputError
from volgen.io import dicom_read as _dicom
from volgen.io._common import (
    DICOM_SERIES,
    NIFTI,
    NOT_UTF8,
    NRRD,
    SLICER_SEG,
    check_geometry,
    check_shape,
    check_voxel_count,
    display_path,
    is_utf8,
    itk_reason,
    quiet_itk,
)
from volgen.io._nifti import check_nifti
from volgen.io._nifti import read_header as _nifti_header
from volgen.io.geometry import Geometry
from volgen.io.naming import INPUT_EXTENSIONS, extension
from volgen.io.paths import check_readable
from volgen.io.slicer import is_slicer_segmentation
from volgen.types import PathLike

__all__ = ["format_word", "open_file", "read_header"]

logger = logging.getLogger("volgen.io.volumes")


def open_file(path: Path, *, series: str | None, scan: bool) -> tuple[sitk.ImageFileReader | None, str, bool]:
    """Check a file's header (and, with ``scan``, a NIfTI file's whole data) before any pixel is read.

    Returns:
        ``(reader, format, nonfinite)``: an ITK reader whose header information is read and checked; ``None``
        for DICOM (a folder or a ``.dcm`` file), which :mod:`volgen.io.dicom` reads.
    """
    if not is_utf8(path):
        raise InputError(display_path(path), NOT_UTF8)
    info = check_readable(path)
    if stat.S_ISDIR(info.st_mode):
        return None, DICOM_SERIES, False
    try:
        with path.open("rb") as f:
            head = f.read(540)
    except OSError as exc:
        raise InputError(path, f"cannot open the file ({exc.strerror or exc})") from exc
    if info.st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")

    ext = extension(path)
    if ext == ".dcm" or (ext not in INPUT_EXTENSIONS and head[128:132] == b"DICM"):
        return None, "DICOM", False
    if ext not in INPUT_EXTENSIONS:
        known = ", ".join(e for e in INPUT_EXTENSIONS if e != ".dcm")
        shown = ext or "no extension"
        raise InputError(path, f"unknown file type ({shown}); expected {known}, a DICOM folder or DICOM SEG")
    fmt = INPUT_EXTENSIONS[ext]
    nonfinite = False
    if fmt == NIFTI:
        gz = ext.endswith(".gz")
        if gz and head[:2] != b"\x1f\x8b":
            raise InputError(path, "corrupt gzip data (not gzip-compressed)")
        if scan:
            nonfinite = check_nifti(path, gz=gz)
        else:  # the header only (for .nii.gz: its first 540 decompressed bytes)
            _nifti_header(path, _gunzip_head(path) if gz else head)
    if ext in (".mhd", ".mha"):
        _check_mhd_data_file(path)
    if fmt in (NRRD, SLICER_SEG):
        _check_nrrd_data_files(path)

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        logger.debug("ITK could not read the header of %s: %s", path, itk_reason(exc))
        raise InputError(
            path, f"not a valid {format_word(fmt)} file (corrupt header or wrong format)"
        ) from exc
    size = tuple(int(s) for s in reader.GetSize())
    dimension = reader.GetDimension()
    components = reader.GetNumberOfComponents()
    slicer = fmt in (NRRD, SLICER_SEG) and is_slicer_segmentation(reader.GetMetaDataKeys())
    squeeze = dimension == 4 and size[3] == 1
    if slicer:  # layers arrive as components
        check_shape(path, dimension, size, 1)
        check_voxel_count(path, size, components)
    else:
        check_shape(path, 3 if squeeze else dimension, size[:3] if squeeze else size, components)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dimension, dimension)[:3, :3]
    check_geometry(
        path,
        tuple(reader.GetSpacing())[:3],
        tuple(reader.GetOrigin())[:3],
        tuple(float(v) for v in direction.ravel()),
    )
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(path, "complex-valued image; expected real values")
    return reader, fmt, nonfinite


def read_header(path: PathLike, *, series: str | None = None) -> Geometry:
    """The grid of a volume from its header only: no voxel data is read or decompressed.

    Use it to check sizes against a memory budget before reading (a few KiB of ``.nii.gz`` can hold
    gigabytes of voxels). Every check of the header that :func:`read_volume` makes is made here too.

    Args:
        path: Any input :func:`read_volume` accepts.
        series: SeriesInstanceUID, for DICOM folders.

    Returns:
        Size, spacing, origin and direction (LPS, mm).

    Raises:
        InputError: As :func:`read_volume`, for what the header shows.
    """
    path = Path(path)
    reader, _, _ = open_file(path, series=series, scan=False)
    if reader is None:
        if path.is_dir():
            return _dicom.series_geometry(path, series=series)
        return Geometry.of(_dicom.read_dicom_file(path).image)
    size = tuple(int(s) for s in reader.GetSize())[:3]
    n = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(n, n)[:3, :3]
    return Geometry(
        size=size,  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in reader.GetSpacing()[:3]),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in reader.GetOrigin()[:3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _gunzip_head(path: Path, size: int = 540) -> bytes:
    """The first ``size`` bytes of a gzip file, decompressed (nothing more is decompressed)."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            return f.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(path, "corrupt gzip data (damaged or truncated .gz file)") from exc


def _check_nrrd_data_files(path: Path) -> None:
    """Check the detached data file(s) a ``.nrrd`` header names: they must be regular files (a FIFO there
    would block the reader forever)."""
    try:
        with path.open("rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError as exc:
        raise InputError(path, f"cannot open the file ({exc.strerror or exc})") from exc
    lines = text.split("\n\n", 1)[0].splitlines()
    for index, line in enumerate(lines):
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() not in ("data file", "datafile"):
            continue
        value = value.lstrip("=").strip()
        if value.upper().startswith("LIST"):
            names = [n.strip() for n in lines[index + 1 :] if n.strip()]
        elif "%" in value:
            return  # a numbered pattern; ITK reports missing parts itself
        else:
            names = [value]
        for name in names:
            data = Path(name) if Path(name).is_absolute() else path.parent / name
            check_readable(data, folder_ok=False, what="data file the .nrrd names")
        return


def _check_mhd_data_file(path: Path) -> None:
    """Check that the data file a ``.mhd`` header names exists (MetaIO prints to stderr otherwise)."""
    try:
        with path.open("rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError as exc:
        raise InputError(path, f"cannot open the file ({exc.strerror or exc})") from exc
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            single = name and name.upper() not in ("LOCAL", "LIST") and "%" not in name and " " not in name
            if single:
                data = path.parent / name
                what = f"data file the {path.suffix.lower()} names"
                if not (data.exists() or data.is_symlink()):
                    raise InputError(path, f"the {what} is missing ({name})")
                check_readable(data, folder_ok=False, what=what)
            return


def format_word(fmt: str) -> str:
    return "NRRD" if fmt == SLICER_SEG else fmt
