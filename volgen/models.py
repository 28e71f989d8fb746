"""Slice models: build a ``diffusers.UNet2DModel`` from a preset, save and load volgen model folders.

A model folder is diffusers' ``save_pretrained`` layout of
:class:`volgen.pipeline.SegmentationToVolumePipeline`, and every fact is stored once:

- ``model_index.json``: the pipeline's config (encoding, 2.5D context, number of classes, slice axis);
- ``unet/``: the UNet's config (its ``sample_size`` is the slice size) and safetensors weights;
- ``scheduler/``: the training noise schedule;
- ``volgen.json``: what only volgen needs: name, label map, intensity mapping and training provenance.

In memory :class:`ModelMetadata` gathers all of it. Folders written before format 2 also repeated the
pipeline's settings in ``volgen.json``; they still load (and must agree). Weights are read from safetensors
only; a folder holding pickle weights is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from volgen.conditioning import ConditionLayout
from volgen.config import StrictModel, load_yaml, preset_path, validate
from volgen.defaults import MAX_GUIDANCE_SCALE
from volgen.errors import ConfigError, ModelError
from volgen.io.checks import check_finite_weights, check_model_files
from volgen.io.naming import MODEL_METADATA_FILE
from volgen.labels import LabelMap
from volgen.types import Encoding, PathLike

logger = logging.getLogger(__name__)

METADATA_FILE = MODEL_METADATA_FILE
#: 2: the pipeline's settings live in ``model_index.json`` and the slice size in ``unet/config.json`` only.
FORMAT_VERSION = 2
#: The pipeline class a model folder's ``model_index.json`` names (``volgen.pipeline``).
PIPELINE_CLASS = "SegmentationToVolumePipeline"
#: ModelMetadata fields stored in the pipeline's config (``model_index.json``), not in ``volgen.json``.
PIPELINE_KEYS: tuple[str, ...] = ("encoding", "context_slices", "slice_axis", "condition", "pixel_spacing")
#: File endings of pickle-based weights: loading one can run arbitrary code, so volgen refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SLICE_AXES = ("axial", "coronal", "sagittal")


class UNetConfig(StrictModel):
    """Architecture of the slice UNet (``diffusers.UNet2DModel`` arguments); presets in ``configs/models``."""

    sample_size: int = Field(64, ge=8, le=1024)
    block_out_channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=1)
    layers_per_block: int = Field(1, ge=1, le=4)
    down_block_types: list[str] = Field(
        default_factory=lambda: ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: list[str] = Field(
        default_factory=lambda: ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    )
    norm_num_groups: int = Field(8, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    #: Dropout in the ResNet blocks (a regulariser; active in training only).
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("block_out_channels, down_block_types and up_block_types need the same length")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("every block_out_channels entry must be divisible by norm_num_groups")
        if self.sample_size % 2 ** (n - 1):
            raise ValueError(f"sample_size must be divisible by {2 ** (n - 1)} for {n} blocks")
        return self

    @classmethod
    def preset(cls, name: str) -> UNetConfig:
        """A preset from ``configs/models`` (``tiny``, ``small``, ``paper``)."""
        return load_yaml(preset_path("models", name), cls)


class IntensityMapping(StrictModel):
    """How physical intensities map to model space [-1, 1] and back.

    CT: the Hounsfield window ``low..high`` maps linearly to ``-1..1`` (clipped); written back as int16 HU.
    MR: each volume's ``percentiles`` map to ``-1..1`` (clipped); written back as float32, where ``low..high``
    are the typical physical values of those percentiles in the training data.
    """

    modality: Literal["CT", "MR"] = "MR"
    low: float = 0.0
    high: float = 1.0
    percentiles: tuple[float, float] | None = (0.5, 99.5)

    @model_validator(mode="after")
    def _check(self) -> IntensityMapping:
        if not self.high > self.low:
            raise ValueError(f"intensity high ({self.high}) must be greater than low ({self.low})")
        if self.percentiles is not None and not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return self

    @classmethod
    def ct(cls, low: float = -1000.0, high: float = 1000.0) -> IntensityMapping:
        return cls(modality="CT", low=low, high=high, percentiles=None)

    def window(self, values: np.ndarray) -> tuple[float, float]:
        """The physical values that map to -1 and 1 for this volume (MR: its own percentiles)."""
        if self.modality == "CT" or self.percentiles is None:
            return self.low, self.high
        lo, hi = np.percentile(np.asarray(values, dtype=np.float64), self.percentiles)
        if hi <= lo:
            hi = lo + 1.0
        return float(lo), float(hi)

    def to_model(self, values: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
        """Physical intensities -> model space [-1, 1] (float32, clipped)."""
        lo, hi = window if window is not None else self.window(values)
        x = (np.asarray(values, dtype=np.float32) - lo) / (hi - lo) * 2.0 - 1.0
        return np.clip(x, -1.0, 1.0).astype(np.float32)

    def image_to_model(self, image: Any, resampled: Any) -> tuple[Any, tuple[float, float]]:
        """A real image's values, resampled into a frame, in model space: the one windowing of real images.

        Args:
            image: The image on its own grid (SimpleITK): its values choose the window (:meth:`window`).
            resampled: The same image in the model's frame (a tensor, e.g. ``SliceFrame.image``).

        Returns:
            ``(model-space float32 tensor, window)``.
        """
        import SimpleITK as sitk
        import torch

        window = self.window(sitk.GetArrayViewFromImage(image))
        return torch.from_numpy(self.to_model(resampled.numpy(), window)), window

    def from_model(self, x: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
        """Model space -> physical intensities (float32; see :meth:`to_storage` for the stored type)."""
        lo, hi = window if window is not None else (self.low, self.high)
        values = (np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo
        return values.astype(np.float32)

    def to_storage(self, values: np.ndarray) -> np.ndarray:
        """Physical intensities -> the type they are written as: CT int16 HU (rounded once), MR float32."""
        if self.modality == "CT":
            return np.round(np.asarray(values, dtype=np.float64)).clip(-32768, 32767).astype(np.int16)
        return np.asarray(values, dtype=np.float32)


class SamplingDefaults(StrictModel):
    """How a model asks to be sampled when the user does not say: ``volgen.json``'s ``sampling``.

    A setting left ``None`` is volgen's default (:mod:`volgen.defaults`, chosen on the embedded 2 mm model);
    an option given on the command line (or in :class:`volgen.generation.GenerateSettings`) always wins.
    A model measured to need other settings carries them here (training config ``sampling:``, or an edit of
    ``volgen.json``): e.g. the native 1 mm model, 12 steps at guidance 1.25 (docs/resolution.md).
    """

    #: Denoising steps over the whole schedule (``--steps``).
    steps: int | None = Field(None, ge=1)
    #: Classifier-free guidance ``w`` (``--guidance-scale``; other than 1 needs "specified" flags).
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE)
    #: ρ of the fine noise scales in the background, away from every labelled class
    #: (``--rho-fine-background``), or ``"auto"`` (by the slice spacing over the model's pixel): for a model
    #: whose background is air with no texture.
    background_fine_noise_correlation: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] | None = None

    def guidance_problem(self, flagged: bool) -> str | None:
        """Why this guidance cannot run on a model with (``flagged``) or without "specified" flags, or
        ``None``: guidance other than 1 needs the flags (the one rule of training configs and folders)."""
        w = self.guidance_scale
        if w is None or w == 1.0 or flagged:
            return None
        return (
            f"sampling.guidance_scale {w:g}: a model without 'specified' flags cannot be guided; use 1 or "
            "leave it out"
        )

    def options(self) -> str:
        """The command-line options these defaults stand for (``"--steps 12 --guidance-scale 1.25"``);
        empty when the model leaves everything to volgen."""
        shown = [
            ("--steps", self.steps),
            ("--guidance-scale", self.guidance_scale),
            ("--rho-fine-background", self.background_fine_noise_correlation),
        ]
        return " ".join(
            f"{flag} {value if isinstance(value, str) else format(value, 'g')}"
            for flag, value in shown
            if value is not None
        )


class ModelMetadata(StrictModel):
    """Everything volgen knows about a model beyond its weights and noise schedule.

    On disk ``encoding``, ``context_slices`` and ``slice_axis`` are the pipeline's config
    (``model_index.json``) and ``slice_size`` is the UNet's ``sample_size``; the rest is ``volgen.json``.
    """

    format_version: int = FORMAT_VERSION
    name: str = "volgen-model"
    description: str = ""
    label_map: LabelMap
    encoding: Encoding = "onehot"
    context_slices: int = Field(1, ge=0, le=8)
    slice_size: int = Field(64, ge=8, le=1024)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    #: A native-resolution model (``volgen.frames.to_native_frame``): the in-plane pixel (mm) it was trained
    #: at, on crops of ``slice_size``; it generates whole slices at this spacing. ``None``: the fitted frame
    #: (the whole field of view in ``slice_size x slice_size``).
    pixel_spacing: float | None = Field(None, gt=0.0, le=100.0)
    intensity: IntensityMapping = Field(default_factory=IntensityMapping)
    trained_on: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    #: The condition vector ("specified" flags, slice axis) and context padding; ``None``: older models.
    condition: ConditionLayout | None = None
    #: How the model asks to be sampled where the user does not say (:class:`SamplingDefaults`).
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    @property
    def condition_channels(self) -> int:
        """Input channels besides the noisy slice: mask channels plus the condition vector's ``D``."""
        from volgen.conditioning import condition_channels

        vector = self.condition.dim(self.num_classes) if self.condition is not None else 0
        return condition_channels(self.num_classes, self.encoding, self.context_slices) + vector

    @model_validator(mode="after")
    def _check(self) -> ModelMetadata:
        if self.encoding == "seed" and self.num_classes > 256:
            raise ValueError("the seed encoding holds at most 255 foreground classes")
        problem = self.sampling.guidance_problem(
            self.condition is not None and self.condition.specified_flags
        )
        if problem is not None:
            raise ValueError(problem)
        return self


def build_unet(config: UNetConfig, metadata: ModelMetadata):
    """A fresh ``UNet2DModel``: ``in_channels = 1 + conditioning channels``, ``out_channels = 1``."""
    from diffusers import UNet2DModel

    if config.sample_size != metadata.slice_size:
        raise ModelError(None, f"UNet sample_size {config.sample_size} != slice_size {metadata.slice_size}")
    return UNet2DModel(
        in_channels=1 + metadata.condition_channels,
        out_channels=1,
        **config.model_dump(),
    )


def build_training_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    *,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
):
    """The training noise schedule: DDPM, T = 1000, diffusers' default linear betas.

    ``zero_terminal_snr`` rescales the betas so that ᾱ_T = 0 (diffusers' ``rescale_betas_zero_snr``; Lin et
    al. 2024): the last timestep is pure noise, as sampling assumes, so the model learns the overall
    brightness of an image instead of inheriting it from the noise. It needs ``prediction_type =
    "v_prediction"`` (ε carries no information about the image at ᾱ = 0). The defaults give the schedule of
    older models unchanged.
    """
    from diffusers import DDPMScheduler

    if zero_terminal_snr and prediction_type == "epsilon":
        raise ConfigError(None, "a zero terminal SNR schedule needs v_prediction (or sample) prediction")
    extra = {}
    if prediction_type != "epsilon" or zero_terminal_snr:
        extra = {"prediction_type": prediction_type, "rescale_betas_zero_snr": zero_terminal_snr}
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, **extra)


@dataclass
class LoadedModel:
    """A model folder in memory."""

    unet: Any
    scheduler: Any
    metadata: ModelMetadata
    path: Path
    weights_sha256: str

    @property
    def model_id(self) -> str:
        return f"{self.metadata.name}@{self.weights_sha256[:12]}"


def pipeline_settings(metadata: ModelMetadata) -> dict[str, Any]:
    """The pipeline's constructor settings held by the metadata (what model_index.json stores)."""
    return {
        "encoding": metadata.encoding,
        "context_slices": metadata.context_slices,
        "num_classes": metadata.num_classes,
        "slice_axis": metadata.slice_axis,
        "condition": None if metadata.condition is None else metadata.condition.model_dump(mode="json"),
        "pixel_spacing": metadata.pixel_spacing,
    }


def check_safe_folder(folder: PathLike) -> None:
    """Refuse a folder holding pickle weights (``.bin``, ``.pt``, ``.ckpt`` ...): loading one runs code."""
    folder = Path(folder)
    pickles = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        names = ", ".join(str(p.relative_to(folder)) for p in pickles[:3])
        raise ModelError(
            folder,
            f"holds pickle weights ({names}); volgen loads safetensors only because loading a pickle can run "
            "arbitrary code. Convert them to safetensors in a trusted environment first",
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"not valid JSON: {e}") from None
    except RecursionError:  # the JSON parser recurses once per nesting level
        raise ModelError(path, "not valid metadata: nested too deeply") from None


def _folder_facts(folder: Path) -> dict[str, Any]:
    """The metadata fields a model folder stores outside ``volgen.json`` (pipeline config, UNet size)."""
    facts: dict[str, Any] = {}
    index, unet = folder / "model_index.json", folder / "unet" / "config.json"
    if index.is_file():
        config = _read_json(index)
        if isinstance(config, dict):
            facts.update({k: config[k] for k in PIPELINE_KEYS if k in config})
    if unet.is_file():
        config = _read_json(unet)
        if isinstance(config, dict) and "sample_size" in config:
            facts["slice_size"] = config["sample_size"]
    return facts


def read_metadata(folder: PathLike) -> ModelMetadata:
    """Read and validate a model folder's metadata (``volgen.json`` with the pipeline and UNet configs);
    ``folder`` may name an embedded model (``default``)."""
    from volgen.default_model import resolve_model

    folder = resolve_model(folder)
    path = folder / METADATA_FILE
    if not path.is_file():
        raise ModelError(folder, f"not a volgen model folder (no {METADATA_FILE})")
    data = _read_json(path)
    if isinstance(data, dict):
        for key, value in _folder_facts(folder).items():
            if key in data and data[key] != value:  # format 1 repeated these; they must agree
                raise ModelError(
                    path, f"{key} {data[key]!r} disagrees with the pipeline/UNet config ({value!r})"
                )
            data[key] = value
    try:
        metadata = validate(data, ModelMetadata, source=path)
    except ConfigError as e:
        raise ModelError(path, e.problem) from None
    if metadata.format_version > FORMAT_VERSION:
        raise ModelError(path, f"format_version {metadata.format_version} is newer than this volgen reads")
    return metadata


def weights_hash(folder: PathLike) -> str:
    """SHA-256 of the UNet's safetensors file (the model's identity in sidecars)."""
    path = Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise ModelError(folder, "no unet/diffusion_pytorch_model.safetensors (safetensors weights)")
    from volgen.io.files import file_sha256

    return str(file_sha256(path))


#: Most training timesteps a model's schedule may have (T = 1000 in practice; the tables scale with T).
MAX_TRAIN_TIMESTEPS = 100_000


def _check_schedule(folder: Path) -> None:
    """Refuse a scheduler config whose size would allocate absurd tables before the scheduler is built."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return  # missing or unreadable: from_pretrained reports it
    steps = config.get("num_train_timesteps", 1000) if isinstance(config, dict) else 1000
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise ModelError(
            path, f"num_train_timesteps must be an integer in 1..{MAX_TRAIN_TIMESTEPS}, got {steps!r}"
        )


def load_unet_and_schedule(folder: Path) -> tuple[Any, Any]:
    """The UNet (safetensors only, float32, eval mode) and noise schedule of a pipeline folder layout.

    Raises:
        ModelError: They cannot be read (the first line of why).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(folder, f"cannot load the UNet or scheduler: {first}") from None
    return unet.float().eval(), scheduler


def load_model(folder: PathLike) -> LoadedModel:
    """Load a model folder (or an embedded model by name, e.g. ``default``): UNet (float32), its training
    scheduler and metadata, checked for consistency.

    Raises:
        ModelError: missing files, pickle weights, or a ``volgen.json`` that disagrees with the UNet.
    """
    from volgen.default_model import resolve_model

    folder = resolve_model(folder)  # a path, or an embedded model's name ("default")
    if not folder.is_dir():
        raise ModelError(folder, "model folder not found" if not folder.exists() else "not a folder")
    check_safe_folder(folder)
    check_model_files(folder)  # regular files only (a FIFO blocks), a usable schedule
    metadata = read_metadata(folder)
    digest = weights_hash(folder)
    _check_schedule(folder)
    unet, scheduler = load_unet_and_schedule(folder)
    check_finite_weights(unet, folder)
    expected = 1 + metadata.condition_channels
    if unet.config.in_channels != expected:
        raise ModelError(
            folder,
            f"the model's settings ({metadata.num_classes} classes, {metadata.encoding}, "
            f"context {metadata.context_slices})"
            f" needs a UNet with {expected} input channels, but unet/ has {unet.config.in_channels}",
        )
    pipeline_classes = _read_json(folder / "model_index.json").get("num_classes", metadata.num_classes)
    if pipeline_classes != metadata.num_classes:
        raise ModelError(
            folder,
            f"model_index.json says {pipeline_classes} classes, the label map in {METADATA_FILE} has "
            f"{metadata.num_classes}",
        )
    if unet.config.out_channels != 1:
        raise ModelError(folder, f"the UNet must output 1 channel, it has {unet.config.out_channels}")
    if unet.config.sample_size != metadata.slice_size:
        raise ModelError(
            folder,
            f"volgen.json slice_size {metadata.slice_size} != UNet sample_size {unet.config.sample_size}",
        )
    return LoadedModel(unet=unet, scheduler=scheduler, metadata=metadata, path=folder, weights_sha256=digest)


def save_model(
    folder: PathLike,
    unet: Any,
    scheduler: Any,
    metadata: ModelMetadata,
    *,
    overwrite: bool = False,
    dtype: Any = None,
) -> Path:
    """Write a model folder atomically: the pipeline's ``save_pretrained`` layout plus ``volgen.json``
    (current format: each setting stored once, see the module docstring).

    Args:
        folder: Target folder; refused if it exists unless ``overwrite``.
        unet: The ``UNet2DModel``.
        scheduler: The training scheduler (its config is the model's noise schedule).
        metadata: What goes into ``volgen.json``.
        dtype: Store weights in this dtype (e.g. ``torch.float16`` to halve the size); loading upcasts.
    """
    import copy

    from volgen.io.atomic import atomic_directory

    unet = copy.deepcopy(unet).to("cpu")
    if dtype is not None:
        unet = unet.to(dtype)
    if unet.config.sample_size != metadata.slice_size:
        raise ModelError(
            folder, f"UNet sample_size {unet.config.sample_size} != slice_size {metadata.slice_size}"
        )
    own = metadata.model_dump(mode="json", exclude={*PIPELINE_KEYS, "slice_size"})
    own["format_version"] = FORMAT_VERSION
    # only what the model asks for: a volgen that knows fewer sampling settings still reads the folder
    own["sampling"] = {k: v for k, v in own["sampling"].items() if v is not None}
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        _save_pipeline_layout(Path(tmp), unet, scheduler, metadata)
        Path(tmp, METADATA_FILE).write_text(json.dumps(own, indent=2) + "\n")
    return Path(folder)


def _save_pipeline_layout(folder: Path, unet: Any, scheduler: Any, metadata: ModelMetadata) -> None:
    """What ``SegmentationToVolumePipeline.save_pretrained`` writes: ``unet/`` (safetensors), ``scheduler/``
    and ``model_index.json`` (the pipeline's class, its settings and its modules' classes)."""
    import diffusers

    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    settings = {k: v for k, v in pipeline_settings(metadata).items() if v is not None}
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        **settings,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", type(unet).__name__],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
