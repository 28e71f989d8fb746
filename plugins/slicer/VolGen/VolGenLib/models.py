"""What a volgen model folder says about its classes, and how Slicer segments map onto them.

A model folder holds ``volgen.json`` (written by volgen); its ``label_map`` names the classes and the
label values of each::

    "label_map": {"name": "abdomen", "background": [0], "classes": {"liver": [1], "kidney": [2, 5]}}

Reading the JSON directly keeps this module free of volgen (and torch): the panel fills its class
checkboxes without starting a process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METADATA_FILE = "volgen.json"


class ModelInfoError(ValueError):
    """The folder is not a volgen model folder, or its ``volgen.json`` cannot be read."""


def read_model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``volgen.json`` of a model folder.

    Raises:
        ModelInfoError: naming the folder, when the file is missing or not valid JSON.
    """
    folder = Path(model_dir)
    path = folder / METADATA_FILE
    if not path.is_file():
        raise ModelInfoError(f"{folder}: not a volgen model folder (no {METADATA_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelInfoError(f"{path}: cannot read the model metadata ({e})") from None
    if not isinstance(data, dict):
        raise ModelInfoError(f"{path}: the model metadata is not a JSON object")
    return data


def model_label_map(model_dir: str | Path) -> dict[str, list[int]]:
    """Foreground class name -> source label values, in class-index order (1, 2, ...).

    Raises:
        ModelInfoError: when the folder or its label map cannot be read.
    """
    data = read_model_metadata(model_dir)
    label_map = data.get("label_map")
    classes = label_map.get("classes") if isinstance(label_map, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise ModelInfoError(f"{Path(model_dir) / METADATA_FILE}: no label_map.classes in the model metadata")
    result: dict[str, list[int]] = {}
    for name, values in classes.items():
        values = [values] if isinstance(values, int) else values
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise ModelInfoError(f"{model_dir}: class {name!r} has label values {values!r}, not integers")
        result[str(name)] = list(values)
    return result


def model_classes(model_dir: str | Path) -> list[str]:
    """Names of the model's foreground classes, in class-index order (what the panel's checkboxes show).

    Raises:
        ModelInfoError: when the folder or its label map cannot be read.
    """
    return list(model_label_map(model_dir))


def model_summary(model_dir: str | Path) -> str:
    """One line about a model for the panel: name, modality, what it was trained on, and the sampling it
    asks for where it has its own (what "model's" steps and the default guidance run)."""
    data = read_model_metadata(model_dir)
    name = data.get("name", Path(model_dir).name)
    modality = (data.get("intensity") or {}).get("modality", "")
    trained_on = data.get("trained_on") or "unknown data"
    line = f"{name} ({modality + ', ' if modality else ''}trained on {trained_on})"
    sampling = data.get("sampling") if isinstance(data.get("sampling"), dict) else {}
    own = [
        f"{label} {sampling[key]}" if isinstance(sampling.get(key), str) else f"{label} {sampling[key]:g}"
        for key, label in (
            ("steps", "steps"),
            ("guidance_scale", "guidance"),
            ("background_fine_noise_correlation", "background fine ρ"),
        )
        if isinstance(sampling.get(key), int | float | str) and not isinstance(sampling.get(key), bool)
    ]
    return f"{line}; its own sampling: {', '.join(own)}" if own else line


def normalize_name(name: str) -> str:
    """A name as compared with class names: lower case, runs of spaces, ``-`` and ``_`` as one ``_``."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class Segment:
    """A segment of a Slicer segmentation, as far as the mapping needs it.

    Attributes:
        id: The segment's ID in its segmentation.
        name: The segment's name (what the user sees).
        label_value: The segment's label value where Slicer records one (segments imported from a
            labelmap keep their value), else ``None``.
    """

    id: str
    name: str
    label_value: int | None = None


@dataclass
class SegmentMapping:
    """Which label value each exported segment gets.

    Attributes:
        values: Segment ID -> label value (only segments that are exported).
        classes: Segment ID -> model class name it was matched to.
        unmatched: Names of segments that match no class; they are left out (become background).
    """

    values: dict[str, int] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def describe(self, segments: Iterable[Segment]) -> str:
        """Human-readable ``name -> class (value)`` lines for the log."""
        lines = []
        for segment in segments:
            if segment.id in self.values:
                lines.append(f"{segment.name} -> {self.classes[segment.id]} ({self.values[segment.id]})")
            else:
                lines.append(f"{segment.name} -> left out (no class of this model)")
        return "\n".join(lines)


def segment_label_values(segments: Iterable[Segment], classes: Mapping[str, list[int]]) -> SegmentMapping:
    """Give each segment the label value of the model class it stands for.

    A segment matches a class by name first (case, spaces, ``-`` and ``_`` ignored: "Left kidney"
    matches ``left_kidney``) and gets the class's first label value. A segment whose name matches no
    class keeps its own label value when the model knows that value (a segmentation imported from a
    labelmap made for this model). Other segments are left out: exporting them would give values the
    model does not know.

    Args:
        segments: The segments to export, in the segmentation's order.
        classes: The model's label map (:func:`model_label_map`).

    Returns:
        The mapping; ``unmatched`` lists segments left out.
    """
    by_name = {normalize_name(name): (name, values[0]) for name, values in classes.items() if values}
    by_value = {value: name for name, values in classes.items() for value in values}
    mapping = SegmentMapping()
    for segment in segments:
        hit = by_name.get(normalize_name(segment.name))
        if hit is not None:
            mapping.classes[segment.id], mapping.values[segment.id] = hit
        elif segment.label_value is not None and segment.label_value in by_value:
            mapping.classes[segment.id] = by_value[segment.label_value]
            mapping.values[segment.id] = segment.label_value
        else:
            mapping.unmatched.append(segment.name)
    return mapping
