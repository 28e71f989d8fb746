"""DICOM reading: listing the series of a folder, reading one (or a DICOM SEG) as a volume, its grid from the
headers alone, and the patient information ``--copy-patient-info`` copies from the series read.

Geometry conventions as :mod:`volgen.io.dicom`: LPS, mm; x = column, y = row, z = slice.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from volgen.errors import InputError
from volgen.io._common import (
    DICOM_SEG,
    DICOM_SERIES,
    MAX_VOXELS,
    NOT_UTF8,
    ORTHONORMAL_TOLERANCE,
    Loaded,
    clear_metadata,
    display_path,
    is_utf8,
    itk_reason,
    quiet_itk,
)
from volgen.io.geometry import Geometry
from volgen.io.paths import check_readable
from volgen.types import PathLike

__all__ = [
    "COPIED_KEYS",
    "SEGMENTATION_STORAGE",
    "DicomSeries",
    "list_dicom_series",
    "patient_info_of",
    "read_dicom_file",
    "read_dicom_folder",
    "read_dicom_seg",
    "series_geometry",
]

logger = logging.getLogger("volgen.io.dicom")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: What ``--copy-patient-info`` copies from the source series (:func:`patient_info_of`): the patient's
#: identity, the study and the frame of reference, so the synthetic series files with its source and registers
#: with it.
#: Nothing else (physicians, institution, descriptions) is ever copied.
COPIED_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "FrameOfReferenceUID",
)

#: LUTLabel of the Real World Value Mapping volgen writes (and reads back: :func:`volgen_mr_mapping`).
_MR_LUT_LABEL = "VOLGEN_MR"


@dataclass(frozen=True)
class DicomSeries:
    """One series found in a folder.

    Attributes:
        uid: SeriesInstanceUID.
        description: SeriesDescription ("" when absent).
        modality: Modality ("" when absent), e.g. "CT", "MR", "SEG".
        files: The series' files, sorted by GDCM (by position along the slice normal).
    """

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]

    def summary(self) -> str:
        """One line: UID, description, modality and file count."""
        n = len(self.files)
        unit = "file" if self.modality == "SEG" else "slice"
        return f'{self.uid} "{self.description}" ({self.modality or "?"}, {n} {unit}{"s" if n != 1 else ""})'


def _header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise InputError(path, "unreadable DICOM header (corrupt file?)") from exc


def list_dicom_series(folder: PathLike) -> list[DicomSeries]:
    """List the DICOM series directly in ``folder`` (subfolders are not searched).

    Args:
        folder: A folder.

    Returns:
        The series, in GDCM's order; empty when the folder holds no DICOM files.

    Raises:
        InputError: The folder cannot be scanned or a header cannot be read.
    """
    folder = Path(folder)
    _check_folder_entries(folder)
    try:
        with quiet_itk():
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            names = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    except RuntimeError as exc:
        raise InputError(folder, "cannot scan the folder for DICOM files") from exc
    found = []
    for uid in uids:
        files = tuple(Path(f) for f in names[uid])
        if not files:
            continue
        for path in files:
            if not is_utf8(path):
                raise InputError(folder, f"holds a file whose {NOT_UTF8}: {display_path(path.name)}")
        header = _header(files[0])
        found.append(
            DicomSeries(
                uid=str(uid),
                description=str(header.get("SeriesDescription", "")),
                modality=str(header.get("Modality", "")),
                files=files,
            )
        )
    return found


def _check_folder_entries(folder: Path) -> None:
    """Refuse a folder holding a FIFO, socket or device (GDCM opens every entry; a FIFO blocks forever)."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise InputError(folder, f"cannot list the folder ({exc.strerror or exc})") from exc
    for entry in entries:
        try:
            mode = entry.stat().st_mode  # links followed
        except OSError:
            continue  # a dangling link: GDCM skips it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            check_readable(Path(entry.path))  # raises, naming the entry and what it is


def _choose_series(folder: Path, series: str | None) -> DicomSeries:
    """The series of ``folder`` that volgen reads: the one given by UID, or the only one."""
    found = list_dicom_series(folder)
    if not found:
        raise InputError(folder, "no DICOM series found in the folder (subfolders are not searched)")
    if series is not None:
        chosen = [s for s in found if s.uid == series]
        if not chosen:
            listing = "; ".join(s.summary() for s in found)
            raise InputError(folder, f"no series {series} in the folder; it holds: {listing}")
        return chosen[0]
    if len(found) > 1:
        listing = "; ".join(s.summary() for s in found)
        raise InputError(folder, f"folder holds {len(found)} DICOM series, expected one: {listing}")
    return found[0]


def patient_info_of(path: PathLike, *, series: str | None = None) -> dict[str, Any]:
    """The :data:`COPIED_KEYS` of the DICOM input volgen generates from, as DICOM values.

    The values come from the files of the series that is read (:func:`read_dicom_folder` picks the same one),
    never from another file in the folder (a stray file of another patient, a ``DICOMDIR``). Every file of the
    series must agree on them. Multi-valued elements stay multi-valued (a list), person names stay person
    names. Elements the input lacks or leaves empty are not in the result.

    Args:
        path: A DICOM series folder or a DICOM SEG file.
        series: SeriesInstanceUID, as for :func:`read_dicom_folder`.

    Returns:
        Keyword -> value, ready for ``write_dicom_series(patient_info=...)``.

    Raises:
        InputError: The input is not DICOM, or the series' files disagree on a patient or study attribute.
    """
    path = Path(path)
    if path.is_dir():
        one = _choose_series(path, series)
        files, source = list(one.files), f"series {one.uid}"
    elif path.is_file() and str(_header(path).get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
        files, source = [path], "the DICOM SEG"
    else:
        raise InputError(
            path, "--copy-patient-info needs a DICOM input (a series folder or a DICOM SEG file)"
        )
    info: dict[str, Any] = {}
    for index, file in enumerate(files):
        header = _header(file)
        for key in COPIED_KEYS:
            element = header.get(key)
            value = None if element is None or element == "" else _dicom_value(element)
            if index == 0:
                if value is not None:
                    info[key] = value
            elif info.get(key) != value:
                raise InputError(
                    path, f"the files of {source} disagree on {key}; cannot copy patient information"
                )
    logger.info("copied %s from %s of %s", ", ".join(info) or "nothing", source, path)
    return info


def _dicom_value(value: Any) -> Any:
    """A header value as :func:`write_dicom_series` sets it: a list when multi-valued, else text."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [str(v) for v in value]
    return str(value)


def read_dicom_folder(folder: PathLike, *, series: str | None = None) -> Loaded:
    """Read the one DICOM series held by ``folder`` (or the series ``series``).

    A folder whose only series is a single DICOM SEG file is read as that SEG.

    Args:
        folder: A folder of DICOM files (one file per slice).
        series: SeriesInstanceUID to read when the folder holds several series.

    Returns:
        The volume (pixel values after Rescale Slope/Intercept), with its geometry.

    Raises:
        InputError: No DICOM; several series and no choice; slices that do not form a regular grid
            (missing, duplicate or sheared slices, mixed orientations); a single slice; unreadable data.
    """
    folder = Path(folder)
    one = _choose_series(folder, series)
    headers = [_header(f) for f in one.files]
    first = headers[0]
    if str(first.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
        if len(one.files) == 1:
            return read_dicom_seg(one.files[0])
        raise InputError(folder, f"series {one.uid} holds {len(one.files)} DICOM SEG files; pass one file")
    if "Rows" not in first or "Columns" not in first:
        raise InputError(folder, f"series {one.uid} ({first.get('Modality', '?')}) holds no images")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(
            folder, "multi-frame (enhanced) DICOM images are not supported; use one file per slice"
        )
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise InputError(
            folder,
            f"multi-component image ({first.SamplesPerPixel} values per voxel, e.g. RGB); expected one",
        )
    if len(one.files) == 1:
        raise InputError(folder, "DICOM series has a single slice; expected a 3D volume")
    count = int(first.Rows) * int(first.Columns) * len(one.files)
    if count > MAX_VOXELS:
        raise InputError(folder, f"header claims {count} voxels, more than volgen reads ({MAX_VOXELS})")
    _check_series_geometry(folder, headers)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in one.files])
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        logger.debug("ITK could not read %s: %s", folder, itk_reason(exc))
        raise InputError(
            folder, "cannot read the DICOM pixel data (corrupt files or unsupported compression)"
        ) from exc
    return Loaded(image=_real_world_values(clear_metadata(image), first), format=DICOM_SERIES)


def volgen_mr_mapping(header: Dataset) -> tuple[float, float] | None:
    """``(slope, intercept)`` of an MR file volgen wrote with its intensities mapped (see
    :func:`volgen.io.dicom.mr_storage`), ``None`` for anything else (other files keep the reader's usual
    Rescale Slope/Intercept handling)."""
    if "RescaleSlope" in header or "RealWorldValueMappingSequence" not in header:
        return None
    items = header.RealWorldValueMappingSequence
    if len(items) != 1 or items[0].get("LUTLabel", "") != _MR_LUT_LABEL:
        return None
    slope, intercept = float(items[0].RealWorldValueSlope), float(items[0].RealWorldValueIntercept)
    return None if (slope, intercept) == (1.0, 0.0) else (slope, intercept)


def _real_world_values(image: sitk.Image, header: Dataset) -> sitk.Image:
    """volgen's own MR series (no Rescale Slope/Intercept; the intensity mapping in a Real World Value
    Mapping labelled by volgen) read back as the intensities that were written. Other series stay as stored:
    another vendor's mapping may describe quantities the user expects as stored values."""
    mapping = volgen_mr_mapping(header)
    if mapping is None:
        return image
    slope, intercept = mapping
    mapped = sitk.Cast(image, sitk.sitkFloat32) * slope + intercept
    mapped.CopyInformation(image)
    return mapped


def _check_series_geometry(folder: Path, headers: list[Dataset]) -> Geometry:
    """Check that the slices of a series form one regular grid (what ITK assumes silently); return it."""
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(
            folder,
            "DICOM slices lack ImagePositionPatient/ImageOrientationPatient; cannot place them in space",
        ) from exc
    if orientations.ndim != 2 or positions.ndim != 2 or orientations.shape[1] != 6 or positions.shape[1] != 3:
        raise InputError(folder, "malformed ImagePositionPatient/ImageOrientationPatient")
    if not (np.isfinite(orientations).all() and np.isfinite(positions).all()):
        raise InputError(
            folder, "ImagePositionPatient/ImageOrientationPatient hold NaN/Inf; cannot place the slices"
        )
    row, column = orientations[0, :3], orientations[0, 3:]
    error = max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(column) - 1), abs(float(row @ column)))
    if error > ORTHONORMAL_TOLERANCE:
        raise InputError(
            folder,
            f"ImageOrientationPatient is not two orthogonal unit vectors (off by {error:.2g}); volgen "
            "does not straighten it silently",
        )
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise InputError(folder, "slices have different orientations (ImageOrientationPatient)")
    if len({(int(h.Rows), int(h.Columns)) for h in headers}) > 1:
        raise InputError(folder, "slices have different sizes (Rows/Columns)")
    try:
        pixel_spacings = np.array([[float(v) for v in h.get("PixelSpacing", [1.0, 1.0])] for h in headers])
    except (TypeError, ValueError) as exc:
        raise InputError(folder, "malformed PixelSpacing") from exc
    if pixel_spacings.ndim != 2 or not np.isfinite(pixel_spacings).all() or (pixel_spacings <= 0).any():
        raise InputError(folder, "malformed PixelSpacing (not two positive finite numbers)")
    spread = np.abs(pixel_spacings - pixel_spacings[0]).max()
    if spread > 1e-4 * np.abs(pixel_spacings).max():
        raise InputError(folder, "slices have different pixel spacing (PixelSpacing)")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = positions @ normal
    order = np.argsort(along)
    steps = np.diff(along[order])
    if steps.min() < 1e-4:
        raise InputError(folder, "several slices at the same position (more than one volume in the series?)")
    step = float(np.median(steps))
    if np.abs(steps - step).max() > 0.01 * step + 1e-3:
        raise InputError(
            folder,
            f"slices are not evenly spaced (missing slices?): spacing varies from {steps.min():.4g} to "
            f"{steps.max():.4g} mm",
        )
    offsets = positions[order] - positions[order[0]] - np.outer(along[order] - along[order[0]], normal)
    if np.linalg.norm(offsets, axis=1).max() > 0.01 * step + 1e-3:
        raise InputError(
            folder, "slices are sheared (gantry tilt); resample the series to a regular grid first"
        )
    direction = np.stack([orientations[0, :3], orientations[0, 3:], normal], axis=1)
    return Geometry(
        size=(int(headers[0].Columns), int(headers[0].Rows), len(headers)),
        spacing=(float(pixel_spacings[0][1]), float(pixel_spacings[0][0]), step),
        origin=tuple(float(v) for v in positions[order[0]]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
    )


def series_geometry(folder: PathLike, *, series: str | None = None) -> Geometry:
    """The grid of the series :func:`read_dicom_folder` would read, from the headers only (no pixel data).

    Raises:
        InputError: As :func:`read_dicom_folder`, for what the headers show.
    """
    folder = Path(folder)
    one = _choose_series(folder, series)
    headers = [_header(f) for f in one.files]
    if str(headers[0].get("SOPClassUID", "")) == SEGMENTATION_STORAGE or "Rows" not in headers[0]:
        return Geometry.of(read_dicom_folder(folder, series=series).image)
    if len(one.files) == 1:
        raise InputError(folder, "DICOM series has a single slice; expected a 3D volume")
    return _check_series_geometry(folder, headers)


def read_dicom_file(path: PathLike) -> Loaded:
    """Read a single DICOM file: a DICOM SEG is read; any other DICOM file is refused.

    Raises:
        InputError: Not DICOM; a single image file (pass the folder instead); an unreadable SEG.
    """
    path = Path(path)
    header = _header(path)
    sop_class = str(header.get("SOPClassUID", ""))
    if sop_class == SEGMENTATION_STORAGE:
        return read_dicom_seg(path)
    if not sop_class and "PixelData" not in header and "Rows" not in header:
        raise InputError(path, "not a DICOM file")
    raise InputError(
        path,
        "a single DICOM image file; pass the folder that holds the whole series (or a DICOM SEG file)",
    )


def read_dicom_seg(path: PathLike) -> Loaded:
    """Read a DICOM SEG into a label volume whose voxel value is the segment number.

    The grid is the one the SEG frames lie on (plane positions, orientation, pixel spacing, spacing
    between slices). A SEG that omits empty frames covers only the slices from its first to its last
    stored frame, so its grid can be shorter than the source series' grid (it is placed correctly).

    Args:
        path: A DICOM SEG file (Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.4).

    Returns:
        ``UInt8``/``UInt16`` label volume, segment labels by segment number in ``label_names``.

    Raises:
        InputError: Not a valid SEG; "overlapping segments"; frames that do not form a 3D grid;
            fractional segmentations with values other than 0 and 1.
    """
    import highdicom as hd  # imported here: heavy

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise InputError(path, "not a valid DICOM SEG file") from exc
    try:
        volume = seg.get_volume(combine_segments=True, relabel=False)
    except Exception as exc:
        message = str(exc).lower()
        logger.debug("highdicom could not build a volume from %s: %s", path, exc)
        if "overlap" in message:
            raise InputError(path, "overlapping segments; volgen needs one label per voxel") from exc
        if "fractional" in message or "binary" in message:
            raise InputError(path, "fractional DICOM SEG with values other than 0 and 1") from exc
        raise InputError(path, "DICOM SEG frames do not form a regular 3D volume") from exc
    if volume is None:
        raise InputError(path, "DICOM SEG frames do not form a regular 3D volume")

    array = np.asarray(volume.array)  # (slices, rows, columns)
    if array.ndim != 3:
        raise InputError(path, "DICOM SEG did not give a single-channel 3D volume")
    affine = np.asarray(volume.affine, dtype=np.float64)  # array index (k, r, c) -> LPS mm
    vectors = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]  # x = column, y = row, z = slice
    spacing = [float(np.linalg.norm(v)) for v in vectors]
    direction = np.stack([v / s for v, s in zip(vectors, spacing, strict=True)], axis=1)
    origin = affine[:3, 3].copy()
    if np.linalg.det(direction) < 0:  # keep slices stepping along row x column, as series readers do
        array = array[::-1]
        origin = origin + (array.shape[0] - 1) * spacing[2] * direction[:, 2]
        direction[:, 2] *= -1
    max_value = int(array.max()) if array.size else 0
    array = np.ascontiguousarray(array, dtype=np.uint8 if max_value < 256 else np.uint16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction.ravel()])
    names = {
        int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in seg.get("SegmentSequence", [])
    }
    return Loaded(image=image, format=DICOM_SEG, is_segmentation=True, label_names=names)
