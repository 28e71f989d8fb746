"""The training config: typed sections read from YAML (data, model, training, augmentation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, PrivateAttr, field_validator, model_validator

from volgen.augmentation import AugmentationConfig
from volgen.config import StrictModel, load_yaml
from volgen.models import IntensityMapping, SamplingDefaults, UNetConfig
from volgen.types import Encoding, Modality, PathLike, UnknownLabels

# The measured training recipe: what a minimal config (data, label map, modality) gets without asking. Each
# value was chosen by an equal-budget ablation on held-out anatomy over 8 seeds (benchmarks/README.md,
# "Edge cuts" and "Dropout and guidance"); configs that set these keep their own values. Erasing an enclosing
# class (``data.erase_classes``) depends on the dataset and stays off unless a config names the class
# (configs/train/colin27-small.yaml erases the head around the brain).
#: Air slices below and above each volume (with replicate context padding, "edges"): background error
#: 10.1 % -> 8.7 % of the range, empty slices' mean 8.8 % -> 6.2 % (32 px, 400 steps).
RECIPE_EMPTY_SLICES = 4
#: Share of samples made the end of a volume at their own position: anatomy next to the end of a mask in 7/8
#: seeds -> 0/8, background error 2.7 % -> 2.3 % of the range (1500 steps).
RECIPE_EDGE_CUT_P = 0.1
#: Share of samples whose anatomy outside a random region (half-plane, ellipse, eroded mask, or the slice
#: less a band; growing or shrinking along the slice axis) is erased to air in image and mask: masks that
#: shrink, end or split are followed: held-out skull vault, worst slice 24x -> 2.8x the real image's tissue
#: outside the mask, faithfulness 0.234 -> 0.265 (1500 steps at 32 px; benchmarks/README.md, "In-plane cuts").
#: Three in four (with ``RECIPE_FULL_MASK_P``) rather than one in two: a head split by an air band 3.3x ->
#: 0.25x [worst seed 5.6x -> 0.55x] the real image's tissue outside the mask, faithfulness within 0.02 of
#: the real image's (64 px, 3000 steps, mask-guided resampling; benchmarks/README.md, "Masks that split").
RECIPE_INPLANE_CUT_P = 0.75
#: Relative weights of the in-plane cut kinds (names: ``volgen.data.CUT_KIND_NAMES``): half the cuts are bands
#: (masks that split into islands). Against a quarter each, at 64 px and 3000 steps (benchmarks/README.md,
#: "Bands weighted"): a head split by an air band 6.7x -> 4.2x the real image's tissue outside the mask in its
#: worst slice, the vanishing skull vault 0.73x -> 0.61x, faithfulness +0.01 on both.
RECIPE_INPLANE_CUT_KINDS = {"half_plane": 1.0, "ellipse": 1.0, "erosion": 1.0, "band": 3.0}
#: Dropout in the UNet's ResNet blocks: held-out faithfulness 0.454 -> 0.461 (guided 0.473 -> 0.480).
RECIPE_DROPOUT = 0.1
#: Share of samples spared from mask ablation (every class kept and flagged specified, as when a whole mask
#: is generated): with ablation alone almost no sample is whole, so background next to anatomy usually
#: means an ablated class, i.e. tissue, and an air band through a whole mask gets bridged. With
#: ``RECIPE_INPLANE_CUT_P`` (benchmarks/README.md, "Masks that split").
RECIPE_FULL_MASK_P = 0.5


class DataConfig(StrictModel):
    """Training data: where it is, which label map, how intensities map to [-1, 1]."""

    source: Path
    label_map: str
    modality: Modality = "MR"
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    #: Multi-axis training (volgen.multiaxis): slices along each of these axes, in the isotropic cube frame,
    #: with the axis in the condition vector. Empty (default): ``slice_axis`` only, in the usual frame.
    slice_axes: list[Literal["axial", "coronal", "sagittal"]] = Field(default_factory=list)
    unknown_labels: UnknownLabels = "error"
    foreground_weight: float = Field(0.0, ge=0.0)
    #: All-background slices (image at the model-space minimum, i.e. air) added below and above every
    #: volume: the model sees empty masks next to anatomy, as at the ends of generated volumes. Default
    #: ``RECIPE_EMPTY_SLICES`` (the measured recipe); 0 trains a model of the older kind.
    empty_slices: int = Field(RECIPE_EMPTY_SLICES, ge=0, le=64)
    #: Share of training samples turned into the end of a volume at their own position: the centre slice
    #: and the context on one side become background and the image air, the anatomy on the other side stays
    #: (:func:`volgen.data.apply_edge_cuts`). Teaches that an empty mask means air next to any anatomy.
    #: Default ``RECIPE_EDGE_CUT_P`` (the measured recipe); 0: off.
    edge_cut_p: float = Field(RECIPE_EDGE_CUT_P, ge=0.0, le=1.0)
    #: Share of training samples cut in-plane: the anatomy outside a random region (a half-plane, an ellipse,
    #: the mask eroded, the slice less a band; the region may grow or shrink from slice to slice) becomes
    #: background in every context slice and air in the image (:func:`volgen.data.apply_inplane_cuts`).
    #: Teaches that background next to anatomy means air however small the cross-section. Default
    #: ``RECIPE_INPLANE_CUT_P``; 0: off.
    inplane_cut_p: float = Field(RECIPE_INPLANE_CUT_P, ge=0.0, le=1.0)
    #: How often each kind of in-plane cut is drawn, relative to the others (``half_plane``, ``ellipse``,
    #: ``erosion``, ``band``; a kind left out is never drawn). Default ``RECIPE_INPLANE_CUT_KINDS``.
    inplane_cut_kinds: dict[str, float] = Field(default_factory=lambda: dict(RECIPE_INPLANE_CUT_KINDS))
    #: Classes that may be absent around the others (an enclosing class: the head around a brain, the body
    #: around organs) and the share of samples in which they are erased: their voxels become air in the image
    #: and background in the mask (every context slice), still flagged specified
    #: (:func:`volgen.data.erase_classes`). Teaches that a specified class absent from the mask is absent from
    #: the image, e.g. a skull-stripped brain mask stays a brain in air.
    erase_classes: list[str] = Field(default_factory=list)
    erase_p: float = Field(0.0, ge=0.0, le=1.0)
    #: The slicing frame: ``fitted`` (the whole field of view in the UNet's ``sample_size``, older models) or
    #: ``native`` (slices resampled in-plane to ``pixel_spacing`` mm, trained on random crops of the UNet's
    #: ``sample_size``; generation runs the whole slice at that spacing: docs/resolution.md).
    frame: Literal["fitted", "native"] = "fitted"
    #: In-plane pixel (mm) of a ``native`` model, e.g. the training images' own spacing.
    pixel_spacing: float | None = Field(None, gt=0.0, le=100.0)
    #: Scale augmentation of a ``native`` model: every case is also prepared at ``pixel_spacing`` times each
    #: of these factors in-plane (its slices count once per factor), so anatomy smaller than the training
    #: subject's (a factor 1.6: 1/1.6 its size in pixels) is seen at the generation pixel. Default ``[1.0]``.
    pixel_spacing_scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)

    @field_validator("inplane_cut_kinds")
    @classmethod
    def _check_cut_kinds(cls, kinds: dict[str, float]) -> dict[str, float]:
        from volgen.data import CUT_KIND_NAMES

        unknown = sorted(set(kinds) - set(CUT_KIND_NAMES))
        if unknown:
            raise ValueError(
                f"data.inplane_cut_kinds: unknown kind {unknown[0]!r} (kinds: {', '.join(CUT_KIND_NAMES)})"
            )
        if any(w < 0 for w in kinds.values()) or sum(kinds.values()) <= 0:
            raise ValueError("data.inplane_cut_kinds: weights must be >= 0 with a positive sum")
        return kinds

    def inplane_cut_weights(self) -> list[float]:
        """The in-plane cut kinds' weights in kind order (``volgen.data.CUT_KIND_NAMES``)."""
        from volgen.data import CUT_KIND_NAMES

        return [float(self.inplane_cut_kinds.get(name, 0.0)) for name in CUT_KIND_NAMES]

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.erase_p > 0 and not self.erase_classes:
            raise ValueError("data.erase_p > 0 needs data.erase_classes (the class names to erase)")
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError("data.percentiles must satisfy 0 <= low < high <= 100")
        if not self.ct_window[1] > self.ct_window[0]:
            raise ValueError("data.ct_window must be [low, high] with high > low")
        if (self.frame == "native") != (self.pixel_spacing is not None):
            raise ValueError("data.frame native needs data.pixel_spacing (mm); only a native frame takes it")
        if self.pixel_spacing_scales != [1.0] and (
            self.frame != "native" or any(not 0.25 <= f <= 4.0 for f in self.pixel_spacing_scales)
        ):
            raise ValueError("data.pixel_spacing_scales needs data.frame: native, factors in [0.25, 4]")
        if self.frame == "native" and len(self.slice_axes) > 1:
            raise ValueError("data.frame: native trains along data.slice_axis only (no data.slice_axes)")
        axes = self.slice_axes
        if axes and (len(set(axes)) != len(axes) or self.slice_axis not in axes):
            raise ValueError("data.slice_axes must be distinct and include data.slice_axis")
        return self

    def intensity_mapping(self, windows: list[tuple[float, float]] | None = None) -> IntensityMapping:
        """The model's intensity mapping. MR: ``low``/``high`` are the mean of the volumes' windows."""
        if self.modality == "CT":
            return IntensityMapping.ct(*self.ct_window)
        if not windows:
            return IntensityMapping(modality="MR", percentiles=self.percentiles)
        low = float(np.mean([w[0] for w in windows]))
        high = float(np.mean([w[1] for w in windows]))
        return IntensityMapping(
            modality="MR", percentiles=self.percentiles, low=low, high=max(high, low + 1e-3)
        )


class ModelSection(StrictModel):
    """The model to train: an architecture preset (or a full ``unet:``), the encoding and 2.5D context."""

    preset: str | None = None
    unet: UNetConfig | None = None
    encoding: Encoding = "onehot"
    context_slices: int = Field(1, ge=0, le=8)
    name: str = "volgen-model"
    description: str = ""
    #: Tell the model which classes each condition specifies (ablated classes unspecified); see
    #: :class:`volgen.conditioning.ConditionLayout`. ``False`` trains a model of the older kind.
    specified_flags: bool = True
    #: Context neighbours outside the volume: the edge slice repeated, or all-background (older models).
    context_padding: Literal["background", "replicate"] = "replicate"
    #: What the UNet predicts: ``epsilon`` (the paper, older models) or ``v_prediction``.
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    #: Rescale the betas to zero terminal SNR (needs ``v_prediction``).
    zero_terminal_snr: bool = True
    #: Dropout in the UNet's ResNet blocks, over the preset's. Default ``RECIPE_DROPOUT`` (the measured
    #: recipe); ``None``: the preset's own (0 in every preset).
    dropout: float | None = Field(RECIPE_DROPOUT, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_schedule(self) -> ModelSection:
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("model.zero_terminal_snr needs model.prediction_type: v_prediction")
        return self

    def condition_layout(self):
        """The model's :class:`~volgen.conditioning.ConditionLayout`, or ``None`` for an older-kind model."""
        from volgen.conditioning import ConditionLayout

        if not self.specified_flags and self.context_padding == "background":
            return None
        return ConditionLayout(specified_flags=self.specified_flags, context_padding=self.context_padding)

    @model_validator(mode="before")
    @classmethod
    def _one_architecture(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("preset") is not None and data.get("unet") is not None:
                raise ValueError("give either model.preset or model.unet, not both")
            if data.get("preset") is None and data.get("unet") is None:
                data = {**data, "preset": "small"}
        return data

    def unet_config(self) -> UNetConfig:
        """The UNet architecture (the preset read from ``configs/models``, or ``unet`` itself)."""
        unet = self.unet if self.unet is not None else UNetConfig.preset(str(self.preset))
        return unet if self.dropout is None else unet.model_copy(update={"dropout": self.dropout})


class TrainingSection(StrictModel):
    """Optimisation, schedule and bookkeeping. ``batch_size`` is the global batch over all processes."""

    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2.0e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ablation_p: float = Field(0.5, ge=0, le=1)
    #: Share of samples spared from mask ablation: every class kept and flagged specified, as when a whole
    #: mask is generated. Otherwise almost no sample is whole (each class goes with ``ablation_p``), and
    #: background inside the anatomy usually means an ablated class, i.e. tissue. Default
    #: ``RECIPE_FULL_MASK_P``; 0: ablation only (volgen before; the embedded models).
    full_mask_p: float = Field(RECIPE_FULL_MASK_P, ge=0, le=1)
    #: Offset noise (Guttenberg 2023): this much per-sample constant noise added to the Gaussian noise.
    offset_noise: float = Field(0.0, ge=0, le=1)
    #: Min-SNR-γ loss weighting (Hang et al. 2023); ``None`` weighs every timestep equally.
    snr_gamma: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(500, ge=1)
    preview_every: int = Field(500, ge=0, description="0: a preview at the end only")
    preview_steps: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads an unquoted `no` as false


class TrainConfig(StrictModel):
    """A training run (YAML). Relative paths in a YAML file are relative to that file."""

    output_dir: Path
    data: DataConfig
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    #: How the trained model asks to be sampled where ``volgen generate`` is not told (its ``volgen.json``
    #: ``sampling``: ``steps``, ``guidance_scale``, ``background_fine_noise_correlation``); empty: volgen's
    #: defaults. Does not change training.
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    _source_file: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_sampling(self) -> TrainConfig:
        problem = self.sampling.guidance_problem(self.model.specified_flags)
        if problem is not None:
            raise ValueError(f"{problem} (or set model.specified_flags: true)")
        return self

    @classmethod
    def from_yaml(cls, path: PathLike) -> TrainConfig:
        """Read a training config; ``output_dir``, ``data.source`` and a label map path resolve against it."""
        config = load_yaml(path, cls).resolve_paths(Path(path).resolve().parent)
        config._source_file = Path(path).resolve()
        return config

    def __eq__(self, other: object) -> bool:
        """Equal values are equal configs, wherever they were read from."""
        if not isinstance(other, TrainConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic models are

    @property
    def source_file(self) -> Path | None:
        """The YAML file this config was read from (``None`` when built in code); training never writes it."""
        return self._source_file

    def resolve_paths(self, base: PathLike) -> TrainConfig:
        """A copy with relative paths made absolute against ``base``."""
        base = Path(base)
        config = self.model_copy(deep=True)
        config.output_dir = (base / config.output_dir).resolve()
        config.data.source = (base / config.data.source).resolve()
        label_map = config.data.label_map
        if Path(label_map).suffix.lower() in (".yaml", ".yml") or "/" in label_map or os.sep in label_map:
            config.data.label_map = str((base / label_map).resolve())
        return config


def resume_relevant(config: TrainConfig) -> dict[str, Any]:
    """The parts of a config that must not change when resuming (they change what the steps compute)."""
    dump = config.model_dump(mode="json")
    training = {
        k: dump["training"][k]
        for k in (
            "batch_size",
            "learning_rate",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "ema_decay",
            "ablation_p",
            "full_mask_p",
            "offset_noise",
            "snr_gamma",
            "seed",
            "mixed_precision",
        )
    }
    return {
        "data": dump["data"],
        "model": dump["model"],
        "training": training,
        "augmentation": dump["augmentation"],
    }


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".")
