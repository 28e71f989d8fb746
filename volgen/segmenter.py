"""A small 2D segmentation network for the faithfulness metric (``volgen train-segmenter``).

The paper measures faithfulness as Dice(m_gen^pred, m): a segmentation model, trained on real data, predicts a
mask on each generated image and is compared with the mask the image was generated from. This module trains
such a segmenter on the same data as ``volgen train`` (a manifest or an ``images/`` + ``labels/`` folder, read
by :mod:`volgen.data` through the same slicing frame and intensity mapping) and applies it to whole volumes.

The network is a ``diffusers.UNet2DModel`` used as a plain segmenter: one input channel (the image slice in
model space [-1, 1]), one output channel per class (logits, background included), always called at time step
0; no attention blocks. Loss: cross entropy over all pixels, AdamW, cosine learning rate. A mild intensity
augmentation (random scale and shift of the normalised slice, ±10 %) makes it tolerant of the small intensity
offsets a generator leaves.

On disk (a folder, written atomically)::

    unet/config.json, unet/diffusion_pytorch_model.safetensors    the network (safetensors only)
    segmenter.json                                               label map, slice size and axis, intensity
                                                                 mapping, training provenance

A volume is segmented slice by slice in the slicing frame (:func:`volgen.frames.to_slice_frame`, which
reorients to RAS and resamples in-plane to the slice size); each class's softmax probability is resampled
linearly onto the input's exact grid (:func:`volgen.frames.resample_to_grid`) and every voxel takes the most
probable class (outside the frame's field of view: background).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from volgen.config import StrictModel, validate
from volgen.errors import ConfigError, ModelError
from volgen.labels import LabelMap
from volgen.models import IntensityMapping
from volgen.types import Modality, PathLike, UnknownLabels

logger = logging.getLogger(__name__)

SEGMENTER_FILE = "segmenter.json"
FORMAT_VERSION = 1

#: Progress callback: ``(step, steps, loss)`` after every optimisation step.
SegmenterProgress = Callable[[int, int, float], None]


class SegmenterConfig(StrictModel):
    """How ``volgen train-segmenter`` trains (every field has a CLI option)."""

    label_map: str = Field(..., description="label map YAML path or preset name")
    steps: int = Field(1000, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    slice_size: int = Field(64, ge=8, le=1024)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1, max_length=6)
    modality: Modality = "MR"
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    unknown_labels: UnknownLabels = "error"
    augment: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SegmenterConfig:
        if self.slice_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"slice_size {self.slice_size} must be divisible by {2 ** (len(self.channels) - 1)} "
                f"for {len(self.channels)} UNet levels"
            )
        if any(c < 1 for c in self.channels):
            raise ValueError("channels must be positive")
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if not self.ct_window[1] > self.ct_window[0]:
            raise ValueError("ct_window must be (low, high) with high > low")
        return self

    def intensity_mapping(self) -> IntensityMapping:
        if self.modality == "CT":
            return IntensityMapping.ct(*self.ct_window)
        return IntensityMapping(modality="MR", percentiles=self.percentiles)


class SegmenterMetadata(StrictModel):
    """What ``segmenter.json`` holds."""

    format_version: int = FORMAT_VERSION
    kind: Literal["volgen-segmenter"] = "volgen-segmenter"
    label_map: LabelMap
    slice_size: int = Field(64, ge=8, le=1024)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    intensity: IntensityMapping = Field(default_factory=IntensityMapping)
    trained_on: str = ""
    training: dict[str, Any] = Field(default_factory=dict)


def _norm_groups(channels: Sequence[int]) -> int:
    """The largest group count <= 8 that divides every width (GroupNorm needs it)."""
    return next(g for g in (8, 4, 2, 1) if all(c % g == 0 for c in channels))


def build_segmenter_unet(num_classes: int, slice_size: int, channels: Sequence[int]):
    """A ``UNet2DModel`` with 1 input channel and ``num_classes`` output logits, no attention."""
    from diffusers import UNet2DModel

    n = len(channels)
    return UNet2DModel(
        sample_size=slice_size,
        in_channels=1,
        out_channels=num_classes,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=_norm_groups(channels),
        add_attention=False,
    )


class Segmenter:
    """A trained segmenter in memory: ``predict`` turns an image volume into a class-index volume.

    Attributes:
        unet: The network (``UNet2DModel``, eval mode, CPU unless moved).
        metadata: :class:`SegmenterMetadata`.
        path: The folder it was loaded from (``None`` when fresh from training).
    """

    def __init__(self, unet: Any, metadata: SegmenterMetadata, path: Path | None = None) -> None:
        self.unet = unet.eval()
        self.metadata = metadata
        self.path = path

    @property
    def name(self) -> str:
        return f"segmenter {self.path}" if self.path is not None else "segmenter"

    @property
    def label_map(self) -> LabelMap:
        return self.metadata.label_map

    def probabilities(self, slices: Any, batch_size: int = 16) -> Any:
        """Class probabilities (softmax) for slices in model space.

        Args:
            slices: ``(N, H, W)`` float tensor in [-1, 1], ``H = W = slice_size``.
            batch_size: Slices per forward.

        Returns:
            ``(N, C, H, W)`` float32 tensor.
        """
        import torch

        device = next(self.unet.parameters()).device
        n, h, w = slices.shape
        out = torch.empty((n, self.label_map.num_classes, h, w), dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = slices[start : start + batch_size, None].to(device=device, dtype=torch.float32)
                out[start : start + batch_size] = self.unet(x, 0).sample.float().softmax(dim=1).cpu()
        return out

    def predict_slices(self, slices: Any, batch_size: int = 16) -> Any:
        """Class indices ``(N, H, W)`` (uint8) for slices ``(N, H, W)`` in model space."""
        import torch

        return self.probabilities(slices, batch_size).argmax(dim=1).to(torch.uint8)

    def predict(self, image: Any, batch_size: int = 16) -> Any:
        """Segment an image volume.

        Args:
            image: A SimpleITK image in physical units (HU for CT), any orientation and spacing.
            batch_size: Slices per forward.

        Returns:
            A ``UInt8`` SimpleITK image of class indices (this segmenter's label map) with exactly the
            input's size, spacing, origin and direction.
        """
        import SimpleITK as sitk

        from volgen.frames import resample_to_grid, to_slice_frame
        from volgen.io import Geometry

        meta = self.metadata
        empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(image)
        frame = to_slice_frame(empty, image, slice_size=meta.slice_size, slice_axis=meta.slice_axis)
        x, window = meta.intensity.image_to_model(image, frame.image)
        probabilities = self.probabilities(x, batch_size=batch_size)
        # each class's probability resampled linearly onto the input grid, then the most probable class:
        # smoother boundaries than nearest-neighbour upsampling of the frame's classes onto a finer grid
        best = best_class = None
        for c in range(probabilities.shape[1]):
            p = resample_to_grid(frame.to_sitk(probabilities[:, c]), image, default=1.0 if c == 0 else 0.0)
            p = sitk.GetArrayFromImage(p)
            if best is None:
                best, best_class = p, np.zeros(p.shape, dtype=np.uint8)
            else:
                better = p > best
                best[better] = p[better]
                best_class[better] = c
        result = sitk.GetImageFromArray(best_class)
        Geometry.of(image).apply(result)
        return result

    def segment(self, image: Any) -> np.ndarray:
        """:meth:`predict` as a numpy ``(z, y, x)`` array (:class:`volgen.evaluation.VolumeSegmenter`)."""
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(self.predict(image))

    def save(self, folder: PathLike, *, overwrite: bool = False) -> Path:
        """Write the segmenter folder atomically (safetensors weights + ``segmenter.json``)."""
        from volgen.io import atomic_directory

        with atomic_directory(folder, overwrite=overwrite) as tmp:
            self.unet.save_pretrained(Path(tmp) / "unet", safe_serialization=True)
            text = json.dumps(self.metadata.model_dump(mode="json"), indent=2) + "\n"
            (Path(tmp) / SEGMENTER_FILE).write_text(text, encoding="utf-8")
        return Path(folder)


def is_segmenter_folder(folder: PathLike) -> bool:
    """Whether ``folder`` looks like a segmenter written by :func:`train_segmenter`."""
    return (Path(folder) / SEGMENTER_FILE).is_file()


def load_segmenter(folder: PathLike) -> Segmenter:
    """Load a segmenter folder (safetensors weights only).

    Raises:
        ModelError: the folder is missing, holds pickle weights, or its files disagree.
    """
    from diffusers import UNet2DModel

    from volgen.models import check_safe_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(folder, "segmenter folder not found" if not folder.exists() else "not a folder")
    path = folder / SEGMENTER_FILE
    if not path.is_file():
        raise ModelError(
            folder, f"not a segmenter folder (no {SEGMENTER_FILE}); make one with train-segmenter"
        )
    check_safe_folder(folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"not valid JSON: {e}") from None
    try:
        metadata = validate(data, SegmenterMetadata, source=path)
    except ConfigError as e:
        raise ModelError(path, e.problem) from None
    if metadata.format_version > FORMAT_VERSION:
        raise ModelError(path, f"format_version {metadata.format_version} is newer than this volgen reads")
    try:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(folder, f"cannot load the segmenter network: {first}") from None
    if unet.config.out_channels != metadata.label_map.num_classes:
        raise ModelError(
            folder,
            f"the network predicts {unet.config.out_channels} classes, the label map has "
            f"{metadata.label_map.num_classes}",
        )
    if unet.config.in_channels != 1 or unet.config.sample_size != metadata.slice_size:
        raise ModelError(folder, "the network's input does not match segmenter.json (1 channel, slice_size)")
    return Segmenter(unet.float(), metadata, folder)


def fit_segmenter(
    volumes: Sequence[Any],
    label_map: LabelMap,
    intensity: IntensityMapping,
    config: SegmenterConfig,
    *,
    progress: SegmenterProgress | None = None,
) -> tuple[Segmenter, float]:
    """Train a fresh segmenter in memory on prepared volumes (nothing is written).

    Args:
        volumes: :class:`volgen.data.PreparedVolume` s in the slicing frame of ``config`` (``image``:
            ``(N, H, W)`` in [-1, 1]; ``labels``: ``(N, H, W)`` class indices of ``label_map``).
        label_map: The classes (``label_map.num_classes`` output logits).
        intensity: How the volumes' intensities were mapped (recorded in the metadata).
        config: Steps, batch size, learning rate, widths, augmentation and seed; ``config.label_map`` is not
            read (``label_map`` is).
        progress: Called after every step with ``(step, steps, loss)`` (loss: mean of the last 20 steps).

    Returns:
        The segmenter (eval mode) and its final loss. The same volumes, config and seed give the same network.
    """
    import torch
    import torch.nn.functional as F

    if not volumes:
        raise ValueError("no volumes to train a segmenter on")
    images = torch.cat([v.image for v in volumes]).float()
    labels = torch.cat([v.labels for v in volumes]).long()
    logger.info("training a segmenter on %d slices of %d case(s)", images.shape[0], len(volumes))

    torch.manual_seed(config.seed)
    unet = build_segmenter_unet(label_map.num_classes, config.slice_size, config.channels).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    warmup = min(50, config.steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    recent: list[float] = []
    for step in range(config.steps):
        index = torch.randint(images.shape[0], (config.batch_size,), generator=generator)
        x = images[index][:, None]
        if config.augment:
            scale = 1.0 + 0.1 * (2.0 * torch.rand((len(index), 1, 1, 1), generator=generator) - 1.0)
            shift = 0.1 * (2.0 * torch.rand((len(index), 1, 1, 1), generator=generator) - 1.0)
            x = x * scale + shift
        loss = F.cross_entropy(unet(x, 0).sample, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = [*recent[-19:], loss.item()]
        if progress is not None:
            progress(step + 1, config.steps, float(np.mean(recent)))

    metadata = SegmenterMetadata(
        label_map=label_map,
        slice_size=config.slice_size,
        slice_axis=config.slice_axis,
        intensity=intensity,
        trained_on=", ".join(v.case for v in volumes),
    )
    return Segmenter(unet, metadata), float(np.mean(recent))


@dataclass
class SegmenterTrainResult:
    """What :func:`train_segmenter` did."""

    folder: Path
    steps: int
    final_loss: float
    train_dice: dict[str, float]
    seconds: float
    slices: int


def train_segmenter(
    data: PathLike,
    output: PathLike,
    config: SegmenterConfig,
    *,
    overwrite: bool = False,
    progress: SegmenterProgress | None = None,
) -> SegmenterTrainResult:
    """Train a 2D segmenter on image/segmentation pairs and save it.

    Args:
        data: A manifest (CSV/YAML) or a folder with ``images/`` and ``labels/`` (as for ``volgen train``).
        output: The segmenter folder to write.
        config: :class:`SegmenterConfig`.
        overwrite: Replace an existing output folder.
        progress: Called after every step with ``(step, steps, loss)`` (loss: mean of the last 20 steps).

    Returns:
        :class:`SegmenterTrainResult`; ``train_dice`` is the Dice per foreground class of the final network
        on all training slices in the slicing frame (a sanity check, not a test score).
    """
    import torch

    from volgen.data import find_cases, prepare_case
    from volgen.evaluation import dice
    from volgen.io import check_output_path
    from volgen.labels import load_label_map

    started = time.perf_counter()
    output = Path(output)
    check_output_path(output, overwrite=overwrite, directory=True)
    label_map = load_label_map(config.label_map)
    intensity = config.intensity_mapping()
    cases = find_cases(data)
    volumes = [
        prepare_case(
            case,
            label_map=label_map,
            intensity=intensity,
            slice_size=config.slice_size,
            slice_axis=config.slice_axis,
            unknown_labels=config.unknown_labels,
        )
        for case in cases
    ]
    segmenter, final_loss = fit_segmenter(volumes, label_map, intensity, config, progress=progress)
    images = torch.cat([v.image for v in volumes]).float()
    labels = torch.cat([v.labels for v in volumes]).long()
    metadata = segmenter.metadata
    predicted = segmenter.predict_slices(images)
    scores = dice(predicted.numpy(), labels.numpy(), range(1, label_map.num_classes))
    train_dice = {label_map.class_names[c]: v for c, v in scores.items()}
    metadata.training = {
        "data": str(data),
        "cases": len(volumes),
        "slices": int(images.shape[0]),
        "final_loss": round(final_loss, 5),
        "train_dice": {k: round(v, 4) for k, v in train_dice.items() if not math.isnan(v)},
        "config": config.model_dump(mode="json"),
    }
    folder = segmenter.save(output, overwrite=overwrite)
    return SegmenterTrainResult(
        folder=folder,
        steps=config.steps,
        final_loss=final_loss,
        train_dice=train_dice,
        seconds=time.perf_counter() - started,
        slices=int(images.shape[0]),
    )
