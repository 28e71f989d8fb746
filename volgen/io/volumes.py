"""Reading, checking, describing and writing volumes (NIfTI, NRRD, MetaImage, DICOM).

Every read goes through one path: find the format from the path, check the header (3D, one value per
voxel, sensible size) before reading data, read, then apply the rules of the requested kind:

- ``kind="label"``: finite, integer-valued, non-negative values. Integer images of an unsigned type
  (``UInt8``, ``UInt16``, ``UInt32``) are returned as they are; any other type (signed integers, floats
  whose values are all integers) is cast to ``UInt16`` when the maximum is below 65536, else ``UInt32``.
- ``kind="image"``: finite values, returned as ``Float32``.

Every problem with an input is an :class:`~volgen.errors.InputError` naming the path with one short
reason; exceptions of SimpleITK, pydicom and highdicom never escape. Metadata read from headers is
dropped (it can hold patient identifiers), so nothing from an input leaks into an output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from volgen.errors import InputError, OutputError
from volgen.io import dicom as _dicom
from volgen.io._common import (
    NRRD,
    SLICER_SEG,
    Loaded,
    clear_metadata,
    itk_reason,
    quiet_itk,
)
from volgen.io._nifti import check_nifti
from volgen.io.atomic import TEMP_PREFIX, atomic_write, check_output_path
from volgen.io.geometry import Geometry
from volgen.io.headers import format_word, open_file, read_header
from volgen.io.naming import INPUT_EXTENSIONS, OUTPUT_EXTENSIONS, OUTPUT_FORMATS, extension
from volgen.io.slicer import is_slicer_segmentation, slicer_segmentation
from volgen.types import Modality, PathLike, VolumeKind

__all__ = [
    "INPUT_EXTENSIONS",
    "read_header",
    "verify_written",
    "OUTPUT_EXTENSIONS",
    "VolumeInfo",
    "describe",
    "output_format",
    "read_image",
    "read_label",
    "read_volume",
    "write_volume",
]

logger = logging.getLogger(__name__)

_OUTPUT_FORMATS = OUTPUT_FORMATS
_UNSIGNED_LABEL_TYPES = (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32)


def _extension(path: Path) -> str:
    return extension(path)


# --------------------------------------------------------------------------------------------- reading


def _version(path: Path) -> tuple[int, ...] | None:
    """Which version of a file is at ``path`` (inode, size, modification time), ``None`` if unreadable."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _read_raw(path: PathLike, *, series: str | None = None) -> Loaded:
    """Read any supported input as a 3D single-component image (no label/image rules yet)."""
    path = Path(path)
    before = _version(path)
    reader, fmt, nonfinite = open_file(path, series=series, scan=True)
    if reader is None:
        return (
            _dicom.read_dicom_folder(path, series=series) if path.is_dir() else _dicom.read_dicom_file(path)
        )
    size = tuple(int(s) for s in reader.GetSize())
    squeeze = reader.GetDimension() == 4 and size[3] == 1
    slicer = fmt in (NRRD, SLICER_SEG) and is_slicer_segmentation(reader.GetMetaDataKeys())
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        logger.debug("ITK could not read the data of %s: %s", path, itk_reason(exc))
        problem = f"{format_word(fmt)} image data is truncated or corrupt"
        if _extension(path) == ".mhd":
            problem += " (or the data file the .mhd names is missing)"
        raise InputError(path, problem) from exc
    if _version(path) != before:  # the checks scanned one file, ITK read another (ITK fills what is missing)
        raise InputError(path, "the file changed while it was read (truncated or rewritten?); read it again")
    if squeeze:
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    if slicer:
        return slicer_segmentation(path, image)
    return Loaded(image=clear_metadata(image), format=NRRD if fmt == SLICER_SEG else fmt, nonfinite=nonfinite)


def _as_label(image: sitk.Image, source: PathLike | None, *, nonfinite: bool = False) -> sitk.Image:
    """Apply the label rules (module docstring) to a 3D scalar image.

    ``nonfinite`` reports NaN/Inf found in the file that the reader replaced (ITK's NIfTI reader).
    """
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0:
        raise InputError(source, "empty image")
    if nonfinite:
        raise InputError(source, "NaN/Inf in segmentation")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise InputError(source, "NaN/Inf in segmentation")
        fractional = np.mod(array, 1) != 0
        if fractional.any():
            example = float(array[fractional].flat[0])  # exactly (repr): 1.0000001 is not "1"
            raise InputError(source, f"float labels with non-integer values (e.g. {example!r})")
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(source, f"voxel type {array.dtype} cannot hold labels")
    low, high = array.min(), array.max()
    if low < 0:
        negatives = np.unique(array[array < 0])
        shown = ", ".join(f"{v:g}" for v in negatives[:5]) + (", ..." if len(negatives) > 5 else "")
        raise InputError(source, f"negative label values ({shown})")
    if high >= 2**32:
        raise InputError(source, f"label values too large (max {high:g}; at most {2**32 - 1})")
    if image.GetPixelID() in _UNSIGNED_LABEL_TYPES:
        return image
    return sitk.Cast(image, sitk.sitkUInt16 if high < 65536 else sitk.sitkUInt32)


#: Largest magnitude accepted in an intensity image (HU, MR units): anything beyond is a damaged file.
MAX_IMAGE_VALUE = 1e9


def _as_image(image: sitk.Image, source: PathLike | None, *, nonfinite: bool = False) -> sitk.Image:
    """Apply the image rules (module docstring): ``Float32``, finite values."""
    if nonfinite:
        raise InputError(source, "NaN/Inf values in image")
    was_float = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    if was_float and not all(np.isfinite(s).all() for s in array):
        raise InputError(source, "NaN/Inf values in image")
    if array.size and max(float(np.abs(s).max()) for s in array) > MAX_IMAGE_VALUE:
        raise InputError(
            source,
            f"holds values beyond +-{MAX_IMAGE_VALUE:g} (largest {float(np.abs(array).max()):.3g}); not an "
            "image in physical units (damaged file?)",
        )
    return image


def read_volume(path: PathLike, *, kind: VolumeKind, series: str | None = None) -> sitk.Image:
    """Read a 3D volume and check it against the rules of its kind.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ``.mha``, ``.mhd``, a folder holding one
            DICOM series, or a DICOM SEG ``.dcm`` file.
        kind: "label" (a segmentation) or "image" (intensities).
        series: SeriesInstanceUID to pick when a DICOM folder holds several series.

    Returns:
        The image, indexed ``(x, y, z)`` with its geometry (LPS, mm). Labels: ``UInt8``/``UInt16``/
        ``UInt32`` (see the module docstring; DICOM SEG: voxel value = segment number; layered
        ``.seg.nrrd``: layers merged). Images: ``Float32`` (DICOM values after Rescale Slope/Intercept,
        i.e. HU for CT). Header metadata is not kept.

    Raises:
        InputError: The path is missing, empty, corrupt, truncated, of unknown type, not 3D, has several
            values per voxel, is too large, or breaks the rules of ``kind``.
    """
    if kind not in ("label", "image"):
        raise ValueError(f"kind must be 'label' or 'image', got {kind!r}")
    loaded = _read_raw(path, series=series)
    if kind == "label":
        return _as_label(loaded.image, path, nonfinite=loaded.nonfinite)
    return _as_image(loaded.image, path, nonfinite=loaded.nonfinite)


def read_label(path: PathLike, *, series: str | None = None) -> sitk.Image:
    """Read a segmentation: :func:`read_volume` with ``kind="label"``."""
    return read_volume(path, kind="label", series=series)


def read_image(path: PathLike, *, series: str | None = None) -> sitk.Image:
    """Read an intensity image as ``Float32``: :func:`read_volume` with ``kind="image"``."""
    return read_volume(path, kind="image", series=series)


# -------------------------------------------------------------------------------------------- describe


@dataclass(frozen=True)
class VolumeInfo:
    """What ``volgen info`` shows about a volume.

    Attributes:
        path: The input.
        format: "NIfTI", "NRRD", "MetaImage", "DICOM series", "DICOM SEG" or "Slicer segmentation".
        geometry: Size, spacing, origin, direction (LPS, mm).
        dtype: numpy name of the voxel type as read (before label/image rules), e.g. "uint8", "int16".
        min: Smallest voxel value.
        max: Largest voxel value.
        is_label: Whether the volume is treated as a segmentation.
        label_counts: For labels, voxels per value, background (0) included; empty otherwise.
        label_names: Segment names by label value, where the file gives them (Slicer, DICOM SEG).
    """

    path: Path
    format: str
    geometry: Geometry
    dtype: str
    min: float
    max: float
    is_label: bool
    label_counts: dict[int, int] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3."""
        return self.geometry.voxel_volume_mm3

    def volume_ml(self, label: int) -> float:
        """Volume of a label in millilitres (voxel count x voxel volume / 1000); 0 for absent labels."""
        return self.label_counts.get(int(label), 0) * self.voxel_volume_mm3 / 1000.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of all fields (label keys as strings), with ``volume_ml`` per label."""
        return {
            "path": str(self.path),
            "format": self.format,
            "geometry": self.geometry.to_dict(),
            "dtype": self.dtype,
            "min": self.min,
            "max": self.max,
            "is_label": self.is_label,
            "label_counts": {str(k): v for k, v in self.label_counts.items()},
            "label_volume_ml": {str(k): self.volume_ml(k) for k in self.label_counts},
            "label_names": {str(k): v for k, v in self.label_names.items()},
        }


#: An integer volume with at most this many distinct values (and no negative ones) counts as a label.
AUTO_LABEL_MAX_VALUES = 256


def describe(
    path: PathLike, *, kind: Literal["auto", "label", "image"] = "auto", series: str | None = None
) -> VolumeInfo:
    """Read a volume and summarise it.

    Args:
        path: Any input :func:`read_volume` accepts.
        kind: "label" or "image" apply those rules (and their errors); "auto" treats the volume as a
            label when the format is a segmentation (DICOM SEG, Slicer) or when the voxel type is an
            integer type, no value is negative and there are at most 256 distinct values.
        series: SeriesInstanceUID to pick when a DICOM folder holds several series.

    Returns:
        The summary; label counts are computed for labels only.

    Raises:
        InputError: As :func:`read_volume`.
    """
    loaded = _read_raw(path, series=series)
    image = loaded.image
    array = sitk.GetArrayViewFromImage(image)
    dtype = str(array.dtype)
    counts: dict[int, int] | None = None
    if kind == "auto":
        is_label = loaded.is_segmentation
        if not is_label and np.issubdtype(array.dtype, np.integer) and array.min() >= 0:
            counts = _value_counts(array)
            is_label = len(counts) <= AUTO_LABEL_MAX_VALUES
    else:
        is_label = kind == "label"
    if is_label:
        image = _as_label(image, path, nonfinite=loaded.nonfinite)
        label_counts = counts if counts is not None else _value_counts(sitk.GetArrayViewFromImage(image))
    else:
        image = _as_image(image, path, nonfinite=loaded.nonfinite)
        label_counts = {}
    return VolumeInfo(
        path=Path(path),
        format=loaded.format,
        geometry=Geometry.of(image),
        dtype=dtype,
        min=float(array.min()),
        max=float(array.max()),
        is_label=is_label,
        label_counts=label_counts,
        label_names=dict(loaded.label_names),
    )


def _value_counts(array: np.ndarray) -> dict[int, int]:
    """Voxels per value of a non-negative integer array (slab-wise bincount when values are small)."""
    if array.size and array.max() < 2**16:
        total = np.zeros(int(array.max()) + 1, dtype=np.int64)
        for slab in array.reshape(array.shape[0], -1):
            total += np.bincount(slab, minlength=total.size)
        return {int(v): int(total[v]) for v in np.flatnonzero(total)}
    values, counts = np.unique(array, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


# --------------------------------------------------------------------------------------------- writing


def output_format(path: PathLike, format: str | None = None) -> str:
    """Decide the output format of ``path``.

    Args:
        path: The output file (or folder, for DICOM).
        format: "nifti", "nrrd", "mha", "dicom" or None to use the extension (``.nii``/``.nii.gz`` ->
            nifti, ``.nrrd`` (also ``.seg.nrrd``) -> nrrd, ``.mha``/``.mhd`` -> mha).

    Returns:
        "nifti", "nrrd", "mha" or "dicom".

    Raises:
        OutputError: Unknown format or extension, no extension without a format, or an extension that
            contradicts ``format`` (e.g. ``out.nrrd`` with format "nifti", or a volume extension with
            "dicom").
    """
    path = Path(path)
    ext = _extension(path)
    by_ext = OUTPUT_EXTENSIONS.get(ext)
    if format is not None:
        fmt = format.lower()
        if fmt not in _OUTPUT_FORMATS:
            raise OutputError(
                path, f"unknown output format {format!r}; expected one of {', '.join(_OUTPUT_FORMATS)}"
            )
        if fmt == "dicom":
            if by_ext is not None:
                raise OutputError(path, f"a DICOM series is a folder; its name must not end with {ext}")
            return fmt
        if by_ext != fmt:
            shown = ext or "no extension"
            raise OutputError(path, f"file extension ({shown}) does not match format {fmt!r}")
        return fmt
    if by_ext is None:
        if not ext:
            raise OutputError(path, "no file extension; use .nii.gz, .nii, .nrrd, .mha or the dicom format")
        raise OutputError(path, f"unknown output extension {ext}; use .nii.gz, .nii, .nrrd, .mha or .mhd")
    return by_ext


def write_volume(
    image: sitk.Image,
    path: PathLike,
    *,
    overwrite: bool = False,
    format: str | None = None,
    modality: Modality = "MR",
    series_description: str | None = None,
    patient_info: dict[str, Any] | None = None,
    protected: Iterable[tuple[str, PathLike | None]] = (),
) -> Path:
    """Write a 3D volume atomically, keeping its geometry exactly.

    NIfTI, NRRD and MetaImage are chosen by extension (:func:`output_format`) and written with SimpleITK
    (NRRD and MetaImage gzip-compressed; ``.nii.gz`` compressed, ``.nii`` not); the pixel type is kept.
    ``format="dicom"`` writes a folder with one file per slice (:func:`write_dicom_series`; ``modality``,
    ``series_description`` and ``patient_info`` apply only to DICOM). Metadata attached to ``image`` is
    not written.

    Geometry precision: NRRD, MetaImage and DICOM keep spacing, origin and direction to ~1e-12; NIfTI
    stores them as float32 (qform and sform), so they survive to ~1e-7 relative (1e-5 mm for origins
    within +-250 mm).

    Args:
        image: A 3D single-component image.
        path: The output file, or folder for DICOM.
        overwrite: Whether an existing output may be replaced.
        format: "nifti", "nrrd", "mha", "dicom" or None (by extension).
        modality: DICOM only: "CT" or "MR".
        series_description: DICOM only: SeriesDescription.
        patient_info: DICOM only: patient/study attributes to set (nothing is copied otherwise).
        protected: Paths the output must not be, contain or lie inside (inputs, reference, model folder):
            ``(what, path)`` pairs, see :func:`volgen.io.paths.check_output`.

    Every file is read back before it is renamed into place (:func:`verify_written`): a write cut short by a
    full disk, a quota or a file-size limit is an :class:`~volgen.errors.OutputError`, never a result.

    Returns:
        The written path.

    Raises:
        OutputError: The output exists (without ``overwrite``), its folder is missing, the format is
            unknown, the image is not 3D scalar, or writing failed (nothing is left behind then).
    """
    path = Path(path)
    fmt = output_format(path, format)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise OutputError(
            path,
            f"expected a 3D single-component image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components",
        )
    if fmt == "dicom":
        return _dicom.write_dicom_series(
            image,
            path,
            modality=modality,
            series_description=series_description,
            patient_info=patient_info,
            overwrite=overwrite,
            protected=protected,
        )
    if image.GetMetaDataKeys():
        image = clear_metadata(sitk.Image(image))
    compress = fmt != "nifti" or path.name.lower().endswith(".gz")
    try:
        if _extension(path) == ".mhd":
            _write_mhd(image, path, overwrite=overwrite, protected=protected)
        else:
            with (
                atomic_write(
                    path,
                    overwrite=overwrite,
                    protected=protected,
                    verify=lambda tmp: verify_written(tmp, image, final=path),
                ) as tmp,
                quiet_itk(),
            ):  # niftilib prints its own "wrote only N bytes" line
                sitk.WriteImage(image, str(tmp), compress)
    except RuntimeError as exc:
        logger.debug("ITK could not write %s: %s", path, itk_reason(exc))
        raise OutputError(path, f"could not write the {fmt} file (disk full, quota or size limit?)") from exc
    except OSError as exc:
        raise OutputError(path, f"could not write the file ({exc.strerror or exc})") from exc
    logger.info("wrote %s", path)
    return path


def verify_written(written: Path, image: sitk.Image, *, final: Path | None = None) -> None:
    """Check that the file ITK wrote holds ``image``: complete data (NIfTI: the size its header needs, an
    intact gzip stream), the same size and pixel type, the same voxel values.

    ITK's writers do not report every failed write (a full disk, a quota, ``RLIMIT_FSIZE``), so every volume
    file is read back before it takes its final name.

    Raises:
        OutputError: Named after ``final`` (default ``written``): "the written file is incomplete".
    """
    name = final if final is not None else written
    problem = (
        "the written file is incomplete or differs from what was written (disk full, quota, size limit?)"
    )
    try:
        if _extension(written) in (".nii", ".nii.gz"):
            check_nifti(written, gz=written.name.lower().endswith(".gz"))
        with quiet_itk():
            back = sitk.ReadImage(str(written))
    except (InputError, RuntimeError, OSError) as exc:
        logger.debug("reading back %s failed: %s", written, exc)
        raise OutputError(name, problem) from exc
    same = (
        back.GetSize() == image.GetSize()
        and back.GetPixelID() == image.GetPixelID()
        and np.array_equal(
            sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image), equal_nan=True
        )
    )
    if not same:
        raise OutputError(name, problem)


def _write_mhd(
    image: sitk.Image, path: Path, *, overwrite: bool, protected: Iterable[tuple[str, PathLike | None]] = ()
) -> None:
    """A ``.mhd`` header names its data file, so both are written in a temporary folder under their final
    names, verified, then moved next to each other: the data file first, the header last."""
    check_output_path(path, overwrite=overwrite, protected=protected)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    try:
        with quiet_itk():
            sitk.WriteImage(image, str(tmp / path.name), True)
        verify_written(tmp / path.name, image, final=path)
        parts = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # header last
        for part in parts:
            if part.name != path.name:
                check_output_path(path.parent / part.name, overwrite=overwrite, protected=protected)
        for part in parts:
            os.replace(part, path.parent / part.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
