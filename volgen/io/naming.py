"""File naming, in one place: extensions volgen reads and writes, output formats, default output names and
provenance-sidecar names.

Rules (documented in the README):

- The sidecar of an output is the output's full name plus ``.json``: ``t.nii.gz`` -> ``t.nii.gz.json``,
  ``t.nrrd`` -> ``t.nrrd.json``, a DICOM folder ``t/`` -> ``t.json``. Two outputs never share a sidecar
  (``-o t.nrrd`` and ``-o t.mha`` used to collide on ``t.json``).
- Without ``--output``, ``seg.EXT`` gives ``seg_synthetic.EXT`` next to it; a DICOM input (folder, ``.dcm``
  file or ``.seg.nrrd`` segmentation) gives ``seg_synthetic.nii.gz``.
- Several samples of one segmentation (``volgen generate --samples N``, ``volgen batch --samples-per-case N``)
  are numbered from 0 before the extension: ``out.nii.gz`` -> ``out_s0.nii.gz``, ``out_s1.nii.gz``, ...
  (sample ``k`` has seed ``seed + k``; in a batch, case ``CASE`` -> ``CASE_s0``, ...); a DICOM folder ``out/``
  -> ``out_s0/``, ...; each with its own sidecar (``out_s0.nii.gz.json``). One sample keeps the plain name.
"""

from __future__ import annotations

import os
from pathlib import Path

from volgen.io._common import METAIMAGE, NIFTI, NRRD, SLICER_SEG
from volgen.types import PathLike

__all__ = [
    "DEFAULT_OUTPUT_EXTENSION",
    "DEFAULT_OUTPUT_HELP",
    "DEFAULT_OUTPUT_TAG",
    "FORMAT_ENDINGS",
    "INPUT_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
    "OUTPUT_FORMATS",
    "SAMPLE_TAG",
    "SIDECAR_SUFFIX",
    "default_output",
    "extension",
    "sample_name",
    "sample_paths",
    "sidecar_path",
    "split_extension",
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

SIDECAR_SUFFIX = ".json"
#: Put between a name and its sample number: ``out_s0.nii.gz``, ``CASE_s1``.
SAMPLE_TAG = "_s"
#: Appended to the segmentation's name for the default output.
DEFAULT_OUTPUT_TAG = "_synthetic"
#: Extension of the default output when the input's own extension is not an output format.
DEFAULT_OUTPUT_EXTENSION = ".nii.gz"
#: What ``volgen generate --help`` shows for the default output.
DEFAULT_OUTPUT_HELP = f"SEGMENTATION{DEFAULT_OUTPUT_TAG}{DEFAULT_OUTPUT_EXTENSION} next to the input"

_ALL_EXTENSIONS = tuple(sorted(set(INPUT_EXTENSIONS) | set(OUTPUT_EXTENSIONS), key=len, reverse=True))

#: The metadata file of a volgen model folder (:mod:`volgen.models`).
MODEL_METADATA_FILE = "volgen.json"


def extension(path: PathLike) -> str:
    """The known (multi-part) extension of ``path``, lower case (``.nii.gz``, ``.seg.nrrd``); else its last
    suffix ("" for none)."""
    name = Path(path).name.lower()
    for ext in _ALL_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(path).suffix.lower()


def split_extension(name: str) -> tuple[str, str]:
    """``"a.nii.gz"`` -> ``("a", ".nii.gz")``; the longest known image extension (any case), else ``""``."""
    lower = name.lower()
    for ext in _ALL_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return name, ""


def strip_extension(name: str) -> str:
    """``name`` without its known extension (``seg.nii.gz`` -> ``seg``); unchanged when it has none."""
    return split_extension(name)[0]


def sidecar_path(output: PathLike) -> Path:
    """The provenance sidecar of an output file or DICOM folder: its full name plus ``.json``."""
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def default_output(segmentation: PathLike) -> Path:
    """``seg.nrrd`` -> ``seg_synthetic.nrrd``; DICOM inputs and unknown extensions -> ``.nii.gz``.

    A segmentation given as ``.`` or ``..`` (e.g. ``volgen generate .`` inside a DICOM folder) is named by its
    absolute path: the output goes next to that folder.
    """
    segmentation = Path(segmentation)
    if not segmentation.name or segmentation.name == "..":
        segmentation = Path(os.path.abspath(segmentation))
    base, ext = split_extension(segmentation.name)
    if ext.lower() not in OUTPUT_EXTENSIONS or ext.lower() == ".seg.nrrd":
        ext = DEFAULT_OUTPUT_EXTENSION
    return segmentation.with_name(f"{base}{DEFAULT_OUTPUT_TAG}{ext}")


def sample_name(name: str, sample: int) -> str:
    """The name of sample ``sample`` of ``name`` (no extension): ``"CASE"``, 1 -> ``"CASE_s1"``."""
    return f"{name}{SAMPLE_TAG}{sample}"


def sample_paths(path: PathLike, samples: int) -> list[Path]:
    """The outputs of ``samples`` samples written as ``path``: ``[path]`` for one sample, else the sample
    number before the (known, multi-part) extension: ``out.nii.gz`` -> ``out_s0.nii.gz``, ``out_s1.nii.gz``;
    a DICOM folder ``out`` -> ``out_s0``, ...; another file, e.g. a preview ``p.png`` -> ``p_s0.png``."""
    path = Path(path)
    if samples == 1:
        return [path]
    base, ext = split_extension(path.name)
    if not ext and path.suffix and len(path.name) > len(path.suffix):
        base, ext = path.name[: -len(path.suffix)], path.suffix
    return [path.with_name(sample_name(base, k) + ext) for k in range(samples)]
