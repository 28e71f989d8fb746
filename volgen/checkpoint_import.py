"""Import a checkpoint of the reference implementation (mazurowski-lab/segmentation-guided-diffusion).

Such a checkpoint is a diffusers folder: ``unet/`` holds a ``UNet2DModel`` with ``in_channels = 2`` (the noisy
image and one mask channel), ``out_channels = 1`` and a square ``sample_size`` (256 in the paper);
``scheduler/`` holds a DDPM or DDIM schedule with T = 1000 (when it is missing, the reference's default is
assumed: DDPM, T = 1000, linear betas). The mask channel is the ``seed`` encoding: a PNG label ``k`` read
with torchvision's ``ToTensor``, i.e. ``k / 255``; images were 8-bit PNGs normalised with mean 0.5 and
std 0.5 to [-1, 1]. The reference trains without 2.5D context, on axial slices.

:func:`import_checkpoint` writes a volgen model folder (:mod:`volgen.models`) that says exactly that, so
``volgen generate --model`` runs it without retraining.
"""

from __future__ import annotations

import inspect
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from volgen.errors import ModelError
from volgen.models import IntensityMapping, ModelMetadata, check_safe_folder, save_model
from volgen.types import Modality, PathLike

logger = logging.getLogger(__name__)

REFERENCE = "mazurowski-lab/segmentation-guided-diffusion"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SUPPORTED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(path, "expected a JSON object")
    return data


def _sample_size(config: dict[str, Any], path: Path) -> int:
    size = config.get("sample_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ModelError(path, f"sample_size {size} is not square; volgen slice models are square")
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 1024:
        raise ModelError(path, f"sample_size must be an integer in 8..1024, got {size!r}")
    return size


def _training_scheduler(source: Path):
    """The checkpoint's noise schedule as a ``DDPMScheduler`` (same betas and T); DDPM T=1000 if absent."""
    from diffusers import DDPMScheduler

    from volgen.models import build_training_scheduler

    path = source / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        logger.info("%s has no scheduler/; assuming DDPM, T = 1000, linear betas", source)
        return build_training_scheduler()
    config = _read_json(path)
    class_name = config.get("_class_name", "DDPMScheduler")
    if class_name not in SUPPORTED_SCHEDULERS:
        raise ModelError(
            path, f"scheduler {class_name} is not supported; expected one of {SUPPORTED_SCHEDULERS}"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ModelError(path, f"prediction_type {prediction!r}; volgen models predict the noise ('epsilon')")
    if config.get("trained_betas") is not None:
        raise ModelError(path, "explicit trained_betas are not supported")
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    return DDPMScheduler(**{k: v for k, v in config.items() if k in accepted})


def import_checkpoint(
    source_dir: PathLike,
    labels_yaml: PathLike,
    output_dir: PathLike,
    *,
    modality: Modality = "MR",
    ct_window: tuple[float, float] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Turn a reference-implementation checkpoint folder into a volgen model folder.

    Args:
        source_dir: The checkpoint: a diffusers folder with ``unet/`` (safetensors weights) and optionally
            ``scheduler/``.
        labels_yaml: The label map (YAML path or preset name); class ``k`` is the PNG label value ``k``.
        output_dir: The model folder to write.
        modality: ``MR``: intensities map back to the 8-bit range 0..255 of the training PNGs (each volume's
            min..max maps to -1..1 going in); ``CT``: the Hounsfield window the PNGs were made with.
        ct_window: ``(low, high)`` HU for ``CT`` (default -1000..1000).
        name: Model name (default: the checkpoint folder's name).
        overwrite: Replace an existing ``output_dir``.

    Returns:
        ``output_dir``.

    Raises:
        ModelError: missing files, pickle weights (convert them to safetensors first), a UNet that is not the
            reference's single-mask-channel layout, or a label map with more than 255 foreground classes.
    """
    from diffusers import UNet2DModel

    from volgen.labels import load_label_map

    source = Path(source_dir)
    if not source.is_dir():
        raise ModelError(source, "checkpoint folder not found" if not source.exists() else "not a folder")
    check_safe_folder(source)
    unet_dir = source / "unet"
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(source, "no unet/config.json; expected a diffusers folder with a unet/ subfolder")
    if not (unet_dir / WEIGHTS).is_file():
        raise ModelError(source, f"no unet/{WEIGHTS}; volgen imports safetensors weights only")
    config = _read_json(config_path)
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ModelError(config_path, f"the UNet is a {class_name}; expected a UNet2DModel")
    in_channels, out_channels = config.get("in_channels"), config.get("out_channels")
    if in_channels != 2:
        raise ModelError(
            config_path,
            f"the UNet has in_channels={in_channels}; a segmentation-guided reference checkpoint has 2 "
            "(image + one mask channel, segmentation_channel_mode 'single'); unconditional or multi-channel "
            "models are not supported",
        )
    if out_channels != 1:
        raise ModelError(
            config_path, f"the UNet has out_channels={out_channels}; volgen generates 1-channel images"
        )
    slice_size = _sample_size(config, config_path)

    label_map = load_label_map(labels_yaml)
    if label_map.num_classes - 1 > 255:
        raise ModelError(
            labels_yaml,
            f"the label map has {label_map.num_classes - 1} foreground classes; the seed encoding "
            "(class / 255) holds at most 255",
        )
    if modality == "CT":
        intensity = IntensityMapping.ct(*(ct_window or (-1000.0, 1000.0)))
    elif modality == "MR":
        if ct_window is not None:
            raise ModelError(None, "a CT window was given for an MR model; use modality CT")
        intensity = IntensityMapping(modality="MR", percentiles=(0.0, 100.0), low=0.0, high=255.0)
    else:
        raise ModelError(None, f"modality must be MR or CT, got {modality!r}")

    scheduler = _training_scheduler(source)
    try:
        unet = UNet2DModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(source, f"cannot load the UNet: {first}") from None

    metadata = ModelMetadata(
        name=name or source.resolve().name,
        description=f"Imported from a {REFERENCE} checkpoint (seed mask encoding, no 2.5D context).",
        label_map=label_map,
        encoding="seed",
        context_slices=0,
        slice_size=slice_size,
        slice_axis="axial",
        intensity=intensity,
        trained_on=f"imported from {source.resolve()}",
        training={
            "imported_from": str(source.resolve()),
            "reference": REFERENCE,
            "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    folder = save_model(output_dir, unet.float(), scheduler, metadata, overwrite=overwrite)
    logger.info("imported %s into %s", source, folder)
    return folder
