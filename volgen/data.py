"""Training data: pairs of image and segmentation volumes, served as 2D slices with their mask context.

Cases come from a manifest (CSV with columns ``image,label[,case]`` or YAML ``cases: [{image, label, case}]``;
relative paths are relative to the manifest) or from a folder convention (``images/NAME.nii.gz`` +
``labels/NAME.nii.gz``). Each pair is read with :mod:`volgen.io`, its labels remapped to class indices with
the label map, brought to the slicing frame (:mod:`volgen.frames`, TorchIO) and its intensities mapped to
[-1, 1] with the model's :class:`~volgen.models.IntensityMapping`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor
from torch.utils.data import Dataset

from volgen.conditioning import context_stack
from volgen.config import read_yaml
from volgen.errors import ConfigError, InputError
from volgen.frames import to_native_frame, to_slice_frame
from volgen.labels import LabelMap
from volgen.models import IntensityMapping
from volgen.types import PathLike, UnknownLabels

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class TrainingCase:
    """One image/segmentation pair on disk."""

    case: str
    image: Path
    label: Path


def _strip_suffix(name: str) -> str:
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(source: PathLike) -> list[TrainingCase]:
    """Cases from a manifest file (``.csv``, ``.yaml``/``.yml``) or a folder with ``images/`` and ``labels/``.

    Raises:
        ConfigError: a manifest that is malformed or names missing files; a folder without pairs.
    """
    source = Path(source)
    if source.is_dir():
        return _cases_from_folder(source)
    if not source.exists():
        raise ConfigError(source, "training data not found")
    if source.suffix.lower() == ".csv":
        rows = _read_csv(source)
    elif source.suffix.lower() in (".yaml", ".yml"):
        data = read_yaml(source)
        rows = data.get("cases") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ConfigError(source, "a YAML manifest needs a 'cases' list of {image, label[, case]}")
    else:
        raise ConfigError(
            source, "unknown manifest type; use .csv, .yaml or a folder with images/ and labels/"
        )
    cases = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("image") or not row.get("label"):
            raise ConfigError(source, f"entry {number} needs 'image' and 'label'")
        unknown = set(row) - {"image", "label", "case"}
        if unknown:
            raise ConfigError(source, f"entry {number}: unknown key '{sorted(unknown)[0]}'")
        image, label = (source.parent / str(row[k]) for k in ("image", "label"))
        for path in (image, label):
            if not path.is_file():
                raise ConfigError(source, f"entry {number}: file not found: {path}")
        case = str(row.get("case") or _strip_suffix(image.name))
        cases.append(TrainingCase(case=case, image=image, label=label))
    if not cases:
        raise ConfigError(source, "the manifest lists no cases")
    duplicates = {c.case for c in cases if sum(d.case == c.case for d in cases) > 1}
    if duplicates:
        raise ConfigError(source, f"duplicate case ids: {', '.join(sorted(duplicates))}")
    return cases


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(path, f"not a readable CSV manifest: {e}") from None


def _cases_from_folder(folder: Path) -> list[TrainingCase]:
    images, labels = folder / "images", folder / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise ConfigError(folder, "a training folder needs images/ and labels/ subfolders")
    cases = []
    for image in sorted(images.iterdir()):
        name = _strip_suffix(image.name)
        if name == image.name:
            continue
        matches = [labels / (name + s) for s in VOLUME_SUFFIXES if (labels / (name + s)).is_file()]
        if not matches:
            raise ConfigError(folder, f"image {image.name} has no segmentation in labels/")
        cases.append(TrainingCase(case=name, image=image, label=matches[0]))
    if not cases:
        raise ConfigError(folder, "no image volumes in images/")
    return cases


@dataclass
class PreparedVolume:
    """A training volume in the slicing frame: ``image`` ``(N, H, W)`` in [-1, 1], ``labels`` classes."""

    case: str
    image: Tensor
    labels: Tensor
    window: tuple[float, float]


def read_case(case: TrainingCase, label_map: LabelMap, unknown_labels: str) -> tuple[sitk.Image, sitk.Image]:
    """Read one training pair: the image and its segmentation as class indices, checked to share a grid."""
    from volgen.io import Geometry, read_image, read_label

    image = read_image(case.image)
    label = read_label(case.label)
    if not Geometry.of(image).close_to(Geometry.of(label), atol=1e-3):
        raise InputError(
            case.image,
            f"geometry differs from its segmentation {case.label} (size, spacing, origin or direction)",
        )
    return image, label_map.remap_image(label, unknown=unknown_labels, source=case.label)  # type: ignore[arg-type]


def prepare_case(
    case: TrainingCase,
    *,
    label_map: LabelMap,
    intensity: IntensityMapping,
    slice_size: int,
    slice_axis: str,
    unknown_labels: UnknownLabels = "error",
    pixel_spacing: float | None = None,
    multiple: int = 1,
) -> PreparedVolume:
    """Read, check, remap and resample one pair into the slicing frame (see module docs); with
    ``pixel_spacing``, into the native frame (:func:`volgen.frames.to_native_frame`: whole slices at that
    spacing, at least ``slice_size`` and a multiple of ``multiple`` pixels in-plane)."""
    image, class_image = read_case(case, label_map, unknown_labels)
    if pixel_spacing is None:
        frame = to_slice_frame(class_image, image, slice_size=slice_size, slice_axis=slice_axis)
    else:
        frame = to_native_frame(
            class_image,
            image,
            pixel_spacing=pixel_spacing,
            slice_axis=slice_axis,
            multiple=multiple,
            min_size=slice_size,
        )
    model_space, window = intensity.image_to_model(image, frame.image)
    return PreparedVolume(case=case.case, image=model_space, labels=frame.labels, window=window)


#: The image of an all-background ("air") slice in model space: the minimum of [-1, 1].
AIR = -1.0


def with_empty_slices(volume: PreparedVolume, count: int) -> PreparedVolume:
    """``volume`` with ``count`` all-background slices (image :data:`AIR`) on both ends."""
    if count == 0:
        return volume
    _, h, w = volume.labels.shape
    labels = volume.labels.new_zeros(count, h, w)
    image = volume.image.new_full((count, h, w), AIR)
    return PreparedVolume(
        case=volume.case,
        image=torch.cat([image, volume.image, image]),
        labels=torch.cat([labels, volume.labels, labels]),
        window=volume.window,
    )


class SliceDataset(Dataset):
    """2D training samples from prepared volumes.

    Item ``i`` is a dict with ``image``: ``(1, H, W)`` float32 in [-1, 1] and ``context``: ``(2K+1, H, W)``
    uint8 class indices of slices ``z-K .. z+K`` (outside the volume: ``padding``, see
    :func:`volgen.conditioning.context_stack`). Mask ablation and encoding happen per batch in the training
    loop (:mod:`volgen.conditioning`), the same code sampling uses. Indexing with ``(i, seed)`` adds the
    ``seed`` of the sample's augmentation, applied by :class:`volgen.augmentation.AugmentingCollate`.

    With ``crop_size`` (native-resolution models), every item is a ``crop_size x crop_size`` crop of its
    slice, image and context together, at a position drawn from the item's ``seed`` (index with
    ``(i, seed)``).
    """

    def __init__(
        self,
        volumes: Sequence[PreparedVolume],
        context_slices: int,
        padding: str = "background",
        crop_size: int | None = None,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = list(volumes)
        self.context_slices = context_slices
        self.padding = padding
        self.crop_size = crop_size
        self.index = [
            (v, z) for v in range(len(self.volumes)) for z in range(self.volumes[v].labels.shape[0])
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Tensor]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        v, z = self.index[i]
        volume = self.volumes[v]
        context = context_stack(volume.labels, [z], self.context_slices, self.padding)[0]
        sample = {"image": volume.image[z][None], "context": context}
        if self.crop_size is not None:
            sample = random_crop(sample, self.crop_size, seed)
        if seed is not None:  # augmented when the batch is collated (volgen.augmentation.AugmentingCollate)
            sample["seed"] = seed
        return sample

    def sampling_weights(self, foreground_weight: float) -> Tensor:
        """Per-sample weights: 1 for every slice plus ``foreground_weight`` x its foreground fraction x 100.

        ``foreground_weight = 0`` is uniform sampling; larger values draw slices with anatomy more often.
        """
        fractions = np.array(
            [float((self.volumes[v].labels[z] > 0).float().mean()) for v, z in self.index], dtype=np.float64
        )
        return torch.as_tensor(1.0 + foreground_weight * 100.0 * fractions)


def random_crop(sample: dict[str, Tensor], size: int, seed: int | None) -> dict[str, Tensor]:
    """``sample``'s image and context cropped together to ``size x size`` at a position drawn from ``seed``
    (uniform over the positions that fit; the slice is at least ``size`` wide, see
    :func:`volgen.frames.to_native_frame`'s ``min_size``)."""
    if seed is None:
        raise ValueError("cropped samples need a seed: index the dataset with (i, seed)")
    h, w = sample["image"].shape[-2:]
    rng = np.random.default_rng([int(seed), 0xC409])
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return {k: v[..., top : top + size, left : left + size].contiguous() for k, v in sample.items()}


def apply_edge_cuts(
    context: torch.Tensor, image: torch.Tensor, cuts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn samples into the end of a volume: the training twin of an empty slice next to anatomy.

    ``context`` is ``(B, 2K+1, H, W)`` class indices of slices ``z-K .. z+K``, ``image`` ``(B, 1, H, W)`` and
    ``cuts`` ``(B,)`` integers (see :func:`volgen.training.randomness.step_edge_cuts`): ``0`` leaves a sample
    as it is; ``+d`` makes the anatomy start ``d`` slices above the centre (context offsets ``< d`` and the
    centre become background, the image air); ``-d`` the same below. Masks and anatomy beyond the cut are the
    sample's own, so the model learns at every position of every volume that an empty mask means air
    whatever its neighbours hold (without it, the slice next to an abrupt end of a mask shows faint anatomy).
    """
    k = (context.shape[1] - 1) // 2
    offsets = torch.arange(-k, k + 1, device=context.device)
    cuts = cuts.to(context.device)
    cut = cuts != 0
    if not bool(cut.any()):
        return context, image
    above = (cuts[:, None] > 0) & (offsets[None, :] < cuts[:, None])
    below = (cuts[:, None] < 0) & (offsets[None, :] > cuts[:, None])
    context = context.masked_fill((above | below)[:, :, None, None], 0)
    image = torch.where(cut[:, None, None, None], torch.full_like(image, AIR), image)
    return context, image


def erase_classes(
    context: torch.Tensor, image: torch.Tensor, erase: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``classes`` from chosen samples, from the image as well as the mask: the training twin of a
    mask in which a specified class is absent (a skull-stripped brain, organs without the body around them).

    ``context`` is ``(B, 2K+1, H, W)`` class indices, ``image`` ``(B, 1, H, W)`` and ``erase`` ``(B,)`` bool
    (see :func:`volgen.training.randomness.step_erasures`). In an erased sample the classes become background
    in every context slice and their voxels of the centre slice become air; the rest is the sample's own.
    Unlike mask ablation the classes stay flagged specified: the mask is the truth, the class is not there.
    """
    erase = erase.to(context.device)
    if not classes or not bool(erase.any()):
        return context, image
    hit = torch.isin(context, torch.as_tensor(list(classes), device=context.device, dtype=context.dtype))
    hit &= erase[:, None, None, None]
    k = (context.shape[1] - 1) // 2
    image = image.masked_fill(hit[:, k : k + 1], AIR)
    return context.masked_fill(hit, 0), image


#: Kinds of in-plane cut (column 0 of :func:`volgen.training.randomness.step_inplane_cuts`); -1: not cut.
CUT_HALF_PLANE, CUT_ELLIPSE, CUT_EROSION, CUT_BAND = 0, 1, 2, 3
#: The kinds' names, in kind order (``data.inplane_cut_kinds`` weighs them by name).
CUT_KIND_NAMES = ("half_plane", "ellipse", "erosion", "band")
#: How many kinds there are (the kinds are ``0 .. CUT_KINDS - 1``).
CUT_KINDS = len(CUT_KIND_NAMES)


def apply_inplane_cuts(
    context: torch.Tensor, image: torch.Tensor, cuts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase the anatomy outside a random region: the training twin of a mask that shrinks, ends or splits.

    ``context`` is ``(B, 2K+1, H, W)`` class indices of slices ``z-K .. z+K``, ``image`` ``(B, 1, H, W)`` and
    ``cuts`` ``(B, 7)`` (see :func:`volgen.training.randomness.step_inplane_cuts`): column 0 the kind (-1
    leaves a sample as it is), columns 1-6 uniforms in [0, 1) that place the region relative to the
    sample's anatomy (its centroid and extent over the context slices):

    - :data:`CUT_HALF_PLANE`: a half-plane at any angle, its edge anywhere across the anatomy;
    - :data:`CUT_ELLIPSE`: a rotated ellipse of 15-90 % of the anatomy's extent near its centre;
    - :data:`CUT_EROSION`: each slice's own mask eroded by 5-50 % of the anatomy's smaller half-extent;
    - :data:`CUT_BAND`: a band 10-50 % of the anatomy's extent wide, at any angle, near its centre, erased
      (the anatomy splits into islands).

    The region grows or shrinks along the slice axis (up to 25 % per context slice, column 6), so the
    context narrows as at the top of a skull. Outside the region every context slice becomes background and
    the image air (:data:`AIR`), in the centre slice and its context alike; the classes stay flagged
    specified (the flags come from mask ablation only), so the model learns that background in the mask is
    air even right next to anatomy and however small the cross-section.
    """
    kinds = cuts[:, 0].round().long().tolist()
    if all(kind < 0 for kind in kinds):
        return context, image
    k = (context.shape[1] - 1) // 2
    h, w = context.shape[-2:]
    context, image = context.clone(), image.clone()
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=context.device),
        torch.arange(w, dtype=torch.float32, device=context.device),
        indexing="ij",
    )
    offsets = torch.arange(-k, k + 1, dtype=torch.float32, device=context.device)
    for b, kind in enumerate(kinds):
        fg = context[b] > 0
        if kind < 0 or not bool(fg.any()):
            continue
        u = cuts[b, 1:].to(torch.float32).tolist()
        keep = _inplane_region(kind, u, fg, yy, xx, offsets)
        context[b] = context[b].masked_fill(~keep, 0)
        image[b, 0] = image[b, 0].masked_fill(~keep[k], AIR)
    return context, image


def _inplane_region(
    kind: int, u: list[float], fg: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The kept region ``(2K+1, H, W)`` bool of one sample (see :func:`apply_inplane_cuts`)."""
    union = fg.any(dim=0)
    ys, xs = yy[union], xx[union]
    cy, cx = float(ys.mean()), float(xs.mean())
    ey = max(1.0, (float(ys.max()) - float(ys.min())) / 2 + 0.5)
    ex = max(1.0, (float(xs.max()) - float(xs.min())) / 2 + 0.5)
    scale = (1.0 - (u[5] * 2 - 1) * 0.25 * offsets).clamp(min=0.0)[:, None, None]  # per context slice
    if kind == CUT_EROSION:
        radius = (0.05 + 0.45 * u[0]) * min(ey, ex) * scale.flatten()
        keep = torch.zeros_like(fg)
        for s, r in enumerate(radius.round().long().tolist()):
            if r <= 0:
                keep[s] = fg[s]
                continue
            background = (~fg[s]).float()[None, None]
            near = torch.nn.functional.max_pool2d(background, 2 * r + 1, stride=1, padding=r)[0, 0] > 0
            keep[s] = fg[s] & ~near
        return keep
    theta = 2 * np.pi * u[1]
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    if kind in (CUT_HALF_PLANE, CUT_BAND):
        extent = abs(ex * cos) + abs(ey * sin)
        along = (xx - cx) * cos + (yy - cy) * sin
        if kind == CUT_BAND:
            middle, half_width = (u[0] - 0.5) * 0.8 * extent, (0.05 + 0.2 * u[2]) * extent
            return (along[None] - middle).abs() > half_width * scale
        edge = (u[0] * 1.6 - 0.8) * extent
        return along[None] <= edge - (1.0 - scale) * extent
    oy, ox = cy + (u[2] - 0.5) * 0.6 * ey, cx + (u[3] - 0.5) * 0.6 * ex
    size = 0.15 + 0.75 * u[0]
    ry, rx = size * ey * (0.7 + 0.6 * u[4]), size * ex * (1.3 - 0.6 * u[4])
    dx, dy = xx - ox, yy - oy
    a, c = dx * cos + dy * sin, -dx * sin + dy * cos
    inside = (a / rx) ** 2 + (c / ry) ** 2
    return inside[None] <= scale**2
