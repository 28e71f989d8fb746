"""The training set: find, read, check and resample every case into the slicing frame."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from volgen.errors import ConfigError
from volgen.models import IntensityMapping
from volgen.training.config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The prepared training set."""

    volumes: list[Any]
    label_map: Any
    intensity: IntensityMapping
    description: str
    #: Multi-axis data: the axis code of each volume (see :class:`volgen.multiaxis.MultiAxisSliceDataset`).
    axes: list[int] | None = None
    #: Every training case id (the model card records them all: ``description`` names only the first few).
    cases: list[str] | None = None


def prepare_training_data(config: TrainConfig) -> TrainingData:
    """Find, read, check and resample every case into the slicing frame (see :mod:`volgen.data`)."""
    from volgen.data import find_cases, prepare_case, with_empty_slices
    from volgen.labels import load_label_map

    data = config.data
    label_map = load_label_map(data.label_map)
    unknown = [n for n in data.erase_classes if n not in label_map.classes]
    if unknown:
        known = ", ".join(label_map.classes)
        raise ConfigError(
            data.label_map, f"data.erase_classes: unknown class {unknown[0]!r}; this map has: {known}"
        )
    if config.model.encoding == "seed" and label_map.num_classes > 256:
        raise ConfigError(data.label_map, "the seed encoding holds at most 255 foreground classes")
    slice_size = config.model.unet_config().sample_size
    cases = find_cases(data.source)
    provisional = data.intensity_mapping()
    volumes = []
    if len(data.slice_axes) > 1:  # multi-axis: one volume per (case, axis), the model's slice_axis first
        from volgen.multiaxis import axis_code, prepare_case_axes

        order = [data.slice_axis, *(a for a in data.slice_axes if a != data.slice_axis)]
        for case in cases:
            volumes += prepare_case_axes(
                case,
                label_map=label_map,
                intensity=provisional,
                slice_size=slice_size,
                axes=order,
                unknown_labels=data.unknown_labels,
            )
        axes = [axis_code(v.case.rsplit(":", 1)[1]) for v in volumes]
        volumes = [with_empty_slices(v, data.empty_slices) for v in volumes]
        intensity = data.intensity_mapping([v.window for v in volumes])
        description = f"{len(cases)} case(s) from {data.source}, slices along {', '.join(order)}"
        return TrainingData(
            volumes, label_map, intensity, description, axes=axes, cases=[c.case for c in cases]
        )
    for case in cases:
        for scale in data.pixel_spacing_scales:  # [1.0] unless a native model asks for scale augmentation
            volume = prepare_case(
                case,
                label_map=label_map,
                intensity=provisional,
                slice_size=slice_size,
                slice_axis=data.slice_axis,
                unknown_labels=data.unknown_labels,
                pixel_spacing=None if data.pixel_spacing is None else data.pixel_spacing * scale,
                multiple=2 ** (len(config.model.unet_config().block_out_channels) - 1),
            )
            if not bool((volume.labels > 0).any()):
                logger.warning("case %s has no foreground in label map '%s'", case.case, label_map.name)
            volumes.append(with_empty_slices(volume, data.empty_slices))
    intensity = data.intensity_mapping([v.window for v in volumes])
    names = ", ".join(c.case for c in cases[:5]) + (" ..." if len(cases) > 5 else "")
    description = f"{len(cases)} case(s) from {data.source} ({names})"
    logger.info(
        "prepared %s: %d slices of %s px",
        description,
        sum(v.labels.shape[0] for v in volumes),
        slice_size if data.pixel_spacing is None else f"{data.pixel_spacing:g} mm (crops of {slice_size})",
    )
    return TrainingData(
        volumes=volumes,
        label_map=label_map,
        intensity=intensity,
        description=description,
        cases=[c.case for c in cases],
    )
