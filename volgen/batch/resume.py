"""Resuming: whether a work item's outputs are complete and current, and the temporaries a killed run left."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from volgen.batch.plan import WorkItem
from volgen.errors import InputError
from volgen.generation.settings import GenerateSettings
from volgen.generation.sidecar import Sidecar
from volgen.io.atomic import TEMP_NAME
from volgen.io.files import file_sha256, remove_path
from volgen.io.paths import check_readable

logger = logging.getLogger("volgen.batch")


#: Settings added with a default that changes the output: what a sidecar without them was made with.
_BEFORE_THEM = {"resampling": "linear"}


def _comparable_settings(settings: Any) -> Any:
    """Settings as JSON data, without ``slice_batch_size`` (it does not change the result). A setting an
    older sidecar lacks was made with its default where that keeps the output (``slice_axes`` and the axis
    schedule came after the first sidecars), else with what volgen did before it (:data:`_BEFORE_THEM`)."""
    if not isinstance(settings, dict):
        return settings
    data = {**_DEFAULTS, **_BEFORE_THEM, **json.loads(json.dumps(settings))}
    data.pop("slice_batch_size", None)
    return data


_DEFAULTS = json.loads(json.dumps(asdict(GenerateSettings())))


def unfinished_reason(item: WorkItem, *, weights_sha256: str, output_format: str) -> str | None:
    """Why ``item`` must be (re)done, or ``None`` when its outputs are complete and current.

    Complete: the output (a non-empty folder for DICOM), the label (nnU-Net layout) and the sidecar exist, and
    the sidecar records the same model weights, output format and settings (``slice_batch_size`` aside; other
    ``slice_axes``, axis schedule or late fraction are other settings), and the SHA-256 of the segmentation
    and reference files (DICOM folders are not hashed).
    """
    try:
        if output_format == "dicom":
            if not (item.output.is_dir() and any(item.output.iterdir())):
                return "no output"
        elif not item.output.is_file():
            return "no output"
        if item.label is not None and not item.label.is_file():
            return "no label file"
        if not (item.sidecar.exists() or item.sidecar.is_symlink()):
            return "no sidecar"
    except OSError as e:  # e.g. a name too long for the file system: writing will say so
        return f"cannot check the outputs ({e.strerror or e})"
    try:
        check_readable(item.sidecar, folder_ok=False, what="sidecar")  # stat first: a FIFO would block open
        sidecar = Sidecar.read(item.sidecar)
    except InputError:
        return "unreadable sidecar"
    if sidecar.model.weights_sha256 != weights_sha256:
        return "made with another model"
    if sidecar.format != output_format:
        return "another output format"
    if _comparable_settings(sidecar.settings) != _comparable_settings(asdict(item.settings)):
        return "other settings"
    try:
        if sidecar.segmentation_sha256 != file_sha256(item.case.segmentation):
            return "the segmentation changed"
        if sidecar.reference_sha256 != file_sha256(item.case.reference):
            return "the reference changed"
    except OSError:
        return "input unreadable"
    return None


def find_temporaries(folders: set[Path]) -> dict[Path, list[Path]]:
    """The temporary files/folders (``.volgen-tmp-<8 hex>[-old].<final name>``, as :mod:`volgen.io.atomic`
    makes them) in ``folders``, by the final path they were meant for. One scan per folder.

    An entry may belong to a run that is still writing it: remove the temporaries of an item only while
    holding its claim (:mod:`volgen.batch.claims`), as :func:`remove_temporaries` is used by the runner.
    """
    found: dict[Path, list[Path]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = TEMP_NAME.match(entry.name)
            if match:
                found.setdefault(folder / match["final"], []).append(entry)
    return found


def remove_temporaries(item: WorkItem, temporaries: dict[Path, list[Path]]) -> list[Path]:
    """Remove the temporaries an interrupted run left for ``item``'s outputs (found by
    :func:`find_temporaries`); return what was removed."""
    removed = []
    for path in item.outputs:
        for entry in temporaries.pop(path, []):
            if entry.exists() or entry.is_symlink():
                remove_path(entry)
                removed.append(entry)
                logger.info("removed %s (left by an interrupted run)", entry)
    return removed
