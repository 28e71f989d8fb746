"""File naming: the one home of volgen's extensions, output formats and sidecar names."""

from __future__ import annotations

from pathlib import Path

from volgen.io._common import METAIMAGE, NIFTI, NRRD, SLICER_SEG
from volgen.types import PathLike

__all__ = [
    "FORMAT_ENDINGS",
    "INPUT_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
    "OUTPUT_FORMATS",
    "extension",
    "sidecar_path",
    "strip_extension",
]

#: File extensions volgen reads, with the format name each gives (a folder is read as DICOM).
INPUT_EXTENSIONS: dict[str, str] = {
    ".nii.gz": NIFTI,
    ".nii": NIFTI,
    ".seg.nrrd": SLICER_SEG,
    ".nrrd": NRRD,
    ".mha": METAIMAGE,
    ".mhd": METAIMAGE,
    ".dcm": "DICOM",
}

#: Output extensions and the format each selects.
OUTPUT_EXTENSIONS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".seg.nrrd": "nrrd",
    ".nrrd": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
}

#: Output formats, each with the file ending volgen gives it when it names an output (a DICOM series is a
#: folder without ending).
FORMAT_ENDINGS: dict[str, str] = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom": ""}
OUTPUT_FORMATS = tuple(FORMAT_ENDINGS)

_ALL_EXTENSIONS = tuple(sorted(set(INPUT_EXTENSIONS) | set(OUTPUT_EXTENSIONS), key=len, reverse=True))


def extension(path: PathLike) -> str:
    """The known (multi-part) extension of ``path``, lower case (``.nii.gz``, ``.seg.nrrd``); else its last
    suffix ("" for none)."""
    name = Path(path).name.lower()
    for ext in _ALL_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(path).suffix.lower()


def strip_extension(name: str) -> str:
    """``name`` without its known extension (``seg.nii.gz`` -> ``seg``); unchanged when it has none."""
    lower = name.lower()
    for ext in _ALL_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def sidecar_path(output: PathLike) -> Path:
    """The JSON sidecar of an output: ``out.nii.gz`` -> ``out.json``; a DICOM folder ``out/`` -> ``out.json``
    next to it."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")
