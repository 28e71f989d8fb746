"""Internals shared by the readers: the raw read result and the checks every input goes through."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volgen.errors import InputError

logger = logging.getLogger("volgen.io")

#: Inputs whose header claims more voxels than this are refused before any data is read.
MAX_VOXELS = 2**31

#: Human-readable format names, as :class:`volgen.io.VolumeInfo` reports them.
NIFTI = "NIfTI"
NRRD = "NRRD"
METAIMAGE = "MetaImage"
DICOM_SERIES = "DICOM series"
DICOM_SEG = "DICOM SEG"
SLICER_SEG = "Slicer segmentation"


@dataclass
class Loaded:
    """What a reader returns before the label/image rules are applied.

    Attributes:
        image: A 3D single-component image with its geometry; metadata cleared.
        format: One of the format names above.
        is_segmentation: True when the format itself says the volume is a segmentation (DICOM SEG,
            Slicer ``.seg.nrrd``).
        label_names: Names of label values where the file gives them (segment names).
        nonfinite: The file holds NaN/Inf values that the reader replaced (ITK's NIfTI reader reads them
            as 0); the label and image rules refuse such inputs.
    """

    image: sitk.Image
    format: str
    is_segmentation: bool = False
    label_names: dict[int, str] = field(default_factory=dict)
    nonfinite: bool = False


def clear_metadata(image: sitk.Image) -> sitk.Image:
    """Remove every metadata entry (file headers may hold patient identifiers); return ``image``."""
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Hide ITK's warnings (printed to stderr, e.g. GDCM's "No Series were found") while in the block.

    Library code must not print; ITK's warnings cannot be routed to logging, and volgen checks what
    they warn about itself. (ITK's warning switch is process-wide.)
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with _stderr_to_log():
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 (MetaIO's "Cannot open data file", GDCM's notes) to
    the debug log instead of the terminal, where volgen promises one line per error."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4096).decode("utf-8", "replace").strip()
            if text:
                logger.debug("ITK said: %s", text)


def itk_reason(exc: BaseException) -> str:
    """The last informative line of a SimpleITK/ITK exception message (for debug logs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def display_path(path: object) -> str:
    """``path`` as printable text: bytes that are not UTF-8 shown as ``\\xNN`` (as ``ls -b`` does)."""
    text = str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def printable(text: object) -> str:
    """``text`` safe to print on a terminal, in one line: control characters (newlines, escape sequences,
    C1 codes) and bidirectional overrides shown as ``\\n``, ``\\x1b``, ``\\u202e``; bytes that are not UTF-8
    as ``\\xNN`` (:func:`display_path`). A file name can then neither forge a second line nor drive the
    terminal."""
    out = []
    for char in display_path(text):
        code = ord(char)
        if char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in _BIDI:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def is_utf8(path: object) -> bool:
    """Whether ``path`` is valid UTF-8 text.

    Python spells the bytes of a name that are not UTF-8 as lone surrogates (``os.fsdecode``); SimpleITK
    cannot take such a string (its C++ layer aborts the whole process), so volgen refuses those paths first.
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: The problem reported for a path that is not valid UTF-8.
NOT_UTF8 = "path is not valid UTF-8; rename it (SimpleITK cannot open such names)"


def check_voxel_count(path: Path, size: tuple[int, ...], components: int = 1) -> None:
    """Refuse zero-size dimensions and absurd sizes before data is read.

    Raises:
        InputError: "empty image (a dimension has size 0)" or "header claims N voxels ...".
    """
    if any(int(s) <= 0 for s in size):
        raise InputError(path, f"empty image (a dimension has size 0: {tuple(int(s) for s in size)})")
    count = int(np.prod([int(s) for s in size], dtype=np.float64)) * max(1, components)
    if count > MAX_VOXELS:
        raise InputError(path, f"header claims {count} voxels, more than volgen reads ({MAX_VOXELS})")


#: Largest departure from orthonormality accepted in a direction matrix (|D^T D - I|, element-wise). File
#: formats store direction cosines as float32 (NIfTI) or as short decimal strings (DICOM), so exact
#: orthonormality cannot be asked for; a sheared or scaled direction is refused, never straightened.
ORTHONORMAL_TOLERANCE = 1e-3

#: Largest coordinate or spacing (mm) accepted in a header: 10 km; anything beyond is a damaged header.
MAX_COORDINATE_MM = 1e7


def check_geometry(
    path: Path,
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    direction: tuple[float, ...],
) -> None:
    """Refuse a header whose geometry is not finite, has a spacing <= 0, or a direction that is not a
    rotation (orthonormal columns within :data:`ORTHONORMAL_TOLERANCE`).

    Raises:
        InputError: "non-finite origin", "spacing must be positive", "direction is not orthonormal", ...
    """
    values = np.asarray([*spacing, *origin, *direction], dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputError(path, "header holds NaN/Inf in its geometry (spacing, origin or direction)")
    if any(s <= 0 for s in spacing):
        raise InputError(path, f"voxel spacing must be positive, got {tuple(float(s) for s in spacing)}")
    if np.abs(values[: len(spacing) + len(origin)]).max() > MAX_COORDINATE_MM:
        raise InputError(path, "header claims a spacing or origin beyond 10 km; damaged header?")
    n = len(spacing)
    if len(direction) == n * n:
        matrix = np.asarray(direction, dtype=np.float64).reshape(n, n)
        error = float(np.abs(matrix.T @ matrix - np.eye(n)).max())
        if error > ORTHONORMAL_TOLERANCE:
            raise InputError(
                path,
                f"direction matrix is not orthonormal (off by {error:.2g}; sheared or scaled axes); volgen "
                "does not straighten it silently: resample the volume to an orthogonal grid first",
            )


def check_shape(path: Path, dimension: int, size: tuple[int, ...], components: int) -> None:
    """Check that a header describes a 3D single-component volume of sensible size.

    Args:
        path: The input, for messages.
        dimension: Number of spatial dimensions.
        size: Voxels per dimension.
        components: Values per voxel.

    Raises:
        InputError: For 2D, 4D (or higher), multi-component and empty or oversized images.
    """
    check_voxel_count(path, size, components)
    if dimension == 2:
        raise InputError(path, "2D image; expected a 3D volume")
    if dimension != 3:
        raise InputError(path, f"{dimension}D image; expected a 3D volume")
    if min(int(s) for s in size) < 2:
        shown = "x".join(str(int(s)) for s in size)
        raise InputError(
            path, f"volume of {shown} voxels; expected a 3D volume with at least 2 voxels along each axis"
        )
    if components != 1:
        raise InputError(
            path, f"multi-component image ({components} values per voxel, e.g. RGB); expected one value"
        )
