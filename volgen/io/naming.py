"""File naming of generated outputs, in one place: default output names and provenance-sidecar names.

Rules (documented in the README):

- The sidecar of an output is the output's full name plus ``.json``: ``t.nii.gz`` -> ``t.nii.gz.json``,
  ``t.nrrd`` -> ``t.nrrd.json``, a DICOM folder ``t/`` -> ``t.json``. Two outputs never share a sidecar
  (``-o t.nrrd`` and ``-o t.mha`` used to collide on ``t.json``).
- Without ``--output``, ``seg.EXT`` gives ``seg_synthetic.EXT`` next to it; a DICOM input (folder, ``.dcm``
  file or ``.seg.nrrd`` segmentation) gives ``seg_synthetic.nii.gz``.
"""

from __future__ import annotations

from pathlib import Path

from volgen.types import PathLike

SIDECAR_SUFFIX = ".json"
#: Appended to the segmentation's name for the default output.
DEFAULT_OUTPUT_TAG = "_synthetic"
#: Extension of the default output when the input's own extension is not an output format.
DEFAULT_OUTPUT_EXTENSION = ".nii.gz"
#: What ``volgen generate --help`` shows for the default output.
DEFAULT_OUTPUT_HELP = f"SEGMENTATION{DEFAULT_OUTPUT_TAG}{DEFAULT_OUTPUT_EXTENSION} next to the input"


def split_extension(name: str) -> tuple[str, str]:
    """``"a.nii.gz"`` -> ``("a", ".nii.gz")``; the longest known image extension (any case), else ``""``."""
    from volgen.io.volumes import INPUT_EXTENSIONS, OUTPUT_EXTENSIONS

    lower = name.lower()
    for ext in sorted({*INPUT_EXTENSIONS, *OUTPUT_EXTENSIONS}, key=len, reverse=True):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return name, ""


def sidecar_path(output: PathLike) -> Path:
    """The provenance sidecar of an output file or DICOM folder: its full name plus ``.json``."""
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def default_output(segmentation: PathLike) -> Path:
    """``seg.nrrd`` -> ``seg_synthetic.nrrd``; DICOM inputs and unknown extensions -> ``.nii.gz``."""
    from volgen.io.volumes import OUTPUT_EXTENSIONS

    segmentation = Path(segmentation)
    base, ext = split_extension(segmentation.name)
    if ext.lower() not in OUTPUT_EXTENSIONS or ext.lower() == ".seg.nrrd":
        ext = DEFAULT_OUTPUT_EXTENSION
    return segmentation.with_name(f"{base}{DEFAULT_OUTPUT_TAG}{ext}")
