"""Label maps: which source label values form which class.

A label map names the classes a model knows. Class index 0 is background; classes ``1..C-1`` are anatomy,
in the order the YAML lists them. Several source values may map to one class. In YAML::

    name: colin27-tissues
    background: [0]          # source values that are background (default [0])
    classes:                 # class name -> source value(s), in class-index order 1..C-1
      head: 1
      csf: 2
      grey_matter: [3, 7]    # several values may map to one class
      white_matter: 4
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from volgen.config import StrictModel, load_yaml
from volgen.errors import ConfigError, LabelError
from volgen.types import PathLike, UnknownLabels

BACKGROUND = "background"


def _as_value_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        raise ValueError("label values must be integers, not booleans")
    if isinstance(value, int):
        return [value]
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise ValueError(f"label values must be an integer or a non-empty list of integers, got {value!r}")


class LabelMap(StrictModel):
    """Class names and the source label values that map to each class.

    Attributes:
        name: A short name for the label map (e.g. ``colin27-tissues``).
        background: Source values treated as background (class 0).
        classes: Foreground class name -> source values, in class-index order ``1..C-1``.
    """

    name: str = "labels"
    background: list[int] = Field(default_factory=lambda: [0])
    classes: dict[str, list[int]]

    @field_validator("background", mode="before")
    @classmethod
    def _background_values(cls, value: Any) -> list[int]:
        return _as_value_list(value)

    @field_validator("classes", mode="before")
    @classmethod
    def _class_values(cls, value: Any) -> dict[str, list[int]]:
        if not isinstance(value, Mapping) or not value:
            raise ValueError("classes must be a non-empty mapping of class name to label value(s)")
        return {str(name): _as_value_list(values) for name, values in value.items()}

    @model_validator(mode="after")
    def _check(self) -> LabelMap:
        if BACKGROUND in self.classes:
            raise ValueError(f"'{BACKGROUND}' is class 0; list its values under 'background', not 'classes'")
        seen: dict[int, str] = {v: BACKGROUND for v in self.background}
        for name, values in self.classes.items():
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"class name {name!r} must be letters, digits, '_' or '-'")
            for v in values:
                if v < 0:
                    raise ValueError(f"class {name!r}: label values must be >= 0, got {v}")
                if v in seen:
                    raise ValueError(f"label value {v} is mapped to both {seen[v]!r} and {name!r}")
                seen[v] = name
        return self

    @classmethod
    def from_yaml(cls, path: PathLike) -> LabelMap:
        """Read a label map from a YAML file (errors name the file and the offending key)."""
        return load_yaml(path, cls)

    @classmethod
    def from_names(cls, names: Iterable[str], *, name: str = "labels") -> LabelMap:
        """The identity label map: foreground class ``i`` (1-based) is source value ``i``."""
        return cls(name=name, classes={n: [i] for i, n in enumerate(names, start=1)})

    @property
    def class_names(self) -> list[str]:
        """All class names, index 0 (background) first."""
        return [BACKGROUND, *self.classes]

    @property
    def num_classes(self) -> int:
        """Number of classes C, background included."""
        return 1 + len(self.classes)

    def class_index(self, name: str) -> int:
        """The class index of ``name``; a :class:`LabelError` lists the known names otherwise."""
        try:
            return self.class_names.index(name)
        except ValueError:
            known = ", ".join(self.classes)
            raise LabelError(None, f"unknown class {name!r}; this label map has: {known}") from None

    def value_to_class(self) -> dict[int, int]:
        """Source value -> class index, for every value the map knows."""
        table = {v: 0 for v in self.background}
        for index, values in enumerate(self.classes.values(), start=1):
            table.update({v: index for v in values})
        return table

    def remap(
        self, labels: np.ndarray, *, unknown: UnknownLabels = "error", source: PathLike | None = None
    ) -> np.ndarray:
        """Turn source label values into class indices.

        Args:
            labels: Integer array of source label values, any shape.
            unknown: ``"error"`` raises on values the map does not know; ``"background"`` maps them to 0.
            source: The file the labels came from, named in errors.

        Returns:
            ``uint8`` array (``int16`` past 255 classes) of class indices, same shape as ``labels``.

        Raises:
            LabelError: if ``labels`` holds values the map does not know and ``unknown="error"``.
        """
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise LabelError(source, f"label values must be integers, got dtype {labels.dtype}")
        table = self.value_to_class()
        values, inverse = np.unique(labels, return_inverse=True)
        unknown_values = [int(v) for v in values if int(v) not in table]
        if unknown_values and unknown == "error":
            shown = ", ".join(map(str, unknown_values[:10])) + (" ..." if len(unknown_values) > 10 else "")
            raise LabelError(
                source,
                f"label values unknown to label map '{self.name}': {shown} "
                "(use --unknown-labels background to treat them as background)",
            )
        dtype = np.uint8 if self.num_classes <= 256 else np.int16
        lut = np.array([table.get(int(v), 0) for v in values], dtype=dtype)
        return lut[inverse].reshape(labels.shape)

    def remap_image(
        self, image: Any, *, unknown: UnknownLabels = "error", source: PathLike | None = None
    ) -> Any:
        """:meth:`remap` of a SimpleITK label image: the class-index image on the same grid."""
        import SimpleITK as sitk

        classes = sitk.GetImageFromArray(
            self.remap(sitk.GetArrayViewFromImage(image), unknown=unknown, source=source)
        )
        classes.CopyInformation(image)
        return classes

    def present(self, class_indices: np.ndarray) -> dict[str, int]:
        """Voxel count of each class present in an array of class indices (as returned by :meth:`remap`)."""
        counts = np.bincount(np.asarray(class_indices).ravel().astype(np.int64), minlength=self.num_classes)
        return {name: int(counts[i]) for i, name in enumerate(self.class_names) if counts[i] > 0}

    def selection(self, *, keep: Iterable[str] | None = None, drop: Iterable[str] | None = None) -> list[int]:
        """Foreground class indices kept in the condition after a ``keep`` / ``drop`` selection by name.

        Args:
            keep: Only these classes stay (``None``: all).
            drop: These classes become background.

        Returns:
            Sorted class indices in ``1..C-1`` that stay in the condition.
        """
        keep = list(keep) if keep is not None else None
        drop = list(drop) if drop is not None else []
        if keep is not None and drop:
            raise LabelError(None, "give either keep or drop classes, not both")
        indices = set(range(1, self.num_classes))
        if keep is not None:
            indices = {self.class_index(n) for n in keep}
        for name in drop:
            indices.discard(self.class_index(name))
        if 0 in indices:
            raise LabelError(None, "background cannot be kept or dropped")
        return sorted(indices)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`model_validate` turns back into an equal label map."""
        return self.model_dump()


def label_map_change(old: LabelMap, new: LabelMap) -> str | None:
    """What changed from ``old`` to ``new`` in a way that changes the class indices or what they mean
    (classes added, removed or reordered; label values moved), in words; ``None`` if nothing did."""
    added = [n for n in new.classes if n not in old.classes]
    removed = [n for n in old.classes if n not in new.classes]
    if added or removed:
        parts = [f"class(es) added: {', '.join(added)}"] if added else []
        parts += [f"class(es) removed: {', '.join(removed)}"] if removed else []
        return "; ".join(parts)
    if list(old.classes) != list(new.classes):
        return f"class order {', '.join(old.classes)} is now {', '.join(new.classes)}"
    moved = [
        f"{name} {old.classes[name]} -> {new.classes[name]}"
        for name in old.classes
        if old.classes[name] != new.classes[name]
    ]
    if sorted(old.background) != sorted(new.background):
        moved.insert(0, f"background {old.background} -> {new.background}")
    return f"label values changed: {'; '.join(moved)}" if moved else None


def load_label_map(path_or_name: PathLike) -> LabelMap:
    """Read a label map from a YAML path, or a preset name from ``configs/labels`` (e.g. ``colin27``)."""
    from volgen.config import preset_path

    path = Path(path_or_name)
    if not path.exists() and path.suffix == "":
        path = preset_path("labels", str(path_or_name))
    if not path.exists():
        raise ConfigError(path_or_name, "label map not found")
    return LabelMap.from_yaml(path)
