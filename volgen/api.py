"""Glue between files and the pipeline: ``generate`` reads a segmentation, samples, and writes the volume.

This is what ``volgen generate`` (and the Slicer module, through the CLI) calls. The pipeline itself knows
tensors only; everything about files, geometry and physical units happens here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from volgen import __version__
from volgen.errors import InputError, OutputError, ResourceError, VolgenError
from volgen.types import PathLike, UnknownLabels

if TYPE_CHECKING:
    from volgen.models import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model" / "colin27-small"


@dataclass
class GenerateSettings:
    """Everything that decides the generated volume (recorded in the sidecar)."""

    seed: int = 0
    scheduler: str = "dpmsolver++"
    num_inference_steps: int = 20
    noise_correlation: float = 0.99
    x0_smoothing: float = 0.0
    strength: float = 1.0
    keep: list[str] | None = None
    drop: list[str] | None = None
    unknown_labels: UnknownLabels = "error"
    slice_batch_size: int = 16


@dataclass
class GenerateResult:
    """What :func:`generate` wrote and how long it took."""

    output: Path
    sidecar: Path
    preview: Path | None
    model_id: str
    seconds: float
    classes_kept: list[str] = field(default_factory=list)
    device: str = "cpu"


def default_model_dir() -> Path:
    """The model folder shipped inside the package."""
    return DEFAULT_MODEL_DIR


def sidecar_path(output: Path) -> Path:
    """``out.nii.gz`` -> ``out.json``; a DICOM folder ``out/`` -> ``out.json`` next to it."""
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def default_output(segmentation: Path) -> Path:
    """``seg.nii.gz`` -> ``seg_synthetic.nii.gz`` in the same folder (a DICOM folder gets ``.nii.gz``)."""
    name = segmentation.name.rstrip("/")
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.endswith(suffix):
            base, ext = name[: -len(suffix)], suffix
            if ext in (".seg.nrrd", ".dcm"):
                ext = ".nii.gz"
            return segmentation.with_name(f"{base}_synthetic{ext}")
    return segmentation.with_name(f"{name}_synthetic.nii.gz")


def resolve_device(device: str) -> Any:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise VolgenError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise VolgenError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def estimate_memory(
    *,
    slices: int,
    slice_size: int,
    condition_channels: int,
    slice_batch_size: int,
    block_channels: Sequence[int],
    input_voxels: int,
) -> int:
    """Bytes a generation needs beyond the model weights, estimated before allocating anything.

    Volume arrays (noisy volume, model output, scheduler history, noise, reference: ~8 float32 copies of
    ``slices x size²``), one chunk's UNet activations (~ 12 float32 maps per level and slice, at each
    level's resolution and width, plus its conditioning), and the input-grid arrays (labels, resampled
    output and its physical copy: ~4 float32 copies of the input voxels).
    """
    plane = slice_size * slice_size
    volume_arrays = 8 * 4 * slices * plane
    activations = 0
    for level, width in enumerate(block_channels):
        activations += 12 * 4 * width * plane // (4**level)
    chunk = min(slice_batch_size, slices) + 8
    chunk_bytes = chunk * (activations + 4 * (1 + condition_channels) * plane)
    return int(volume_arrays + chunk_bytes + 4 * 4 * input_voxels)


def available_memory(device: Any) -> int:
    """Free memory on ``device`` (bytes): available RAM on the CPU, free GPU memory on CUDA."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def parse_memory(text: str | None) -> int | None:
    """``"8G"``, ``"512M"``, ``"2000000"`` -> bytes; ``None`` stays ``None``."""
    if text is None:
        return None
    value = str(text).strip().upper().removesuffix("B")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(float(value))
    except ValueError:
        raise VolgenError(f"cannot read memory size {text!r}; use e.g. 8G or 512M") from None


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generate(
    segmentation: PathLike,
    output: PathLike | None = None,
    *,
    model: PathLike | None = None,
    settings: GenerateSettings | None = None,
    reference: PathLike | None = None,
    output_format: str | None = None,
    overwrite: bool = False,
    preview: PathLike | None = None,
    device: str = "auto",
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
    max_memory: int | None = None,
    copy_patient_info: bool = False,
    progress: Callable[[Any], None] | None = None,
    loaded: LoadedModel | None = None,
) -> GenerateResult:
    """Generate a synthetic image volume for a segmentation and write it with the segmentation's geometry.

    Args:
        segmentation: A label volume (NIfTI, NRRD, MHA, DICOM folder or DICOM SEG).
        output: Where to write (format by extension, or ``output_format="dicom"`` for a folder). Default:
            ``<segmentation>_synthetic.nii.gz`` next to the input.
        model: A volgen model folder; ``None`` uses the embedded default model.
        settings: Seed, scheduler, steps, ρ, λ, class selection (see :class:`GenerateSettings`).
        reference: A real image on the segmentation's grid, for adjustable anatomy (``settings.strength``).
        output_format: ``nifti``, ``nrrd``, ``mha`` or ``dicom``; ``None`` follows the extension.
        overwrite: Replace existing outputs (the output, its sidecar and the preview).
        preview: Also write a PNG montage of the segmentation and the result here.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` is bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU.
        max_memory: Refuse to start above this many bytes (estimated); default 80% of what is available.
        copy_patient_info: DICOM output only: copy patient identifiers from a DICOM input.
        progress: Called with :class:`volgen.pipeline.Progress` after every UNet chunk.
        loaded: ``model`` already loaded with :func:`volgen.models.load_model` (batch conversion loads it
            once, not once per volume); ``None`` loads it here.

    Returns:
        :class:`GenerateResult`.
    """
    import SimpleITK as sitk
    import torch

    from volgen import io
    from volgen.frames import resample_to_grid, to_slice_frame
    from volgen.models import load_model
    from volgen.pipeline import SCHEDULERS, SegmentationToVolumePipeline

    started = time.perf_counter()
    settings = settings or GenerateSettings()
    if not 0.0 <= settings.strength <= 1.0:
        raise VolgenError(f"--strength (λ) must be in [0, 1], got {settings.strength}")
    if settings.scheduler not in SCHEDULERS:
        raise VolgenError(f"unknown scheduler {settings.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not 0.0 <= settings.noise_correlation < 1.0:
        raise VolgenError(f"--noise-correlation (ρ) must be in [0, 1), got {settings.noise_correlation}")
    if not 0.0 <= settings.x0_smoothing <= 10.0:
        raise VolgenError(f"--x0-smoothing must be in [0, 10] slices, got {settings.x0_smoothing}")
    if settings.num_inference_steps < 1:
        raise VolgenError(f"--steps must be >= 1, got {settings.num_inference_steps}")
    if settings.strength < 1.0 and reference is None:
        raise VolgenError("--strength below 1 interpolates towards a real image: give --reference")

    seg_path = Path(segmentation)
    out_path = Path(output) if output is not None else default_output(seg_path)
    fmt = io.output_format(out_path, output_format)
    side_path = sidecar_path(out_path)
    targets = [(out_path, fmt == "dicom"), (side_path, False)]
    if preview is not None:
        targets.append((Path(preview), False))
    for path, is_dir in targets:
        io.check_output_path(path, overwrite=overwrite, directory=is_dir)
    for path, _ in targets:  # hidden temporaries a killed run (kill -9, power loss) left for these outputs
        for stale in io.remove_stale_temporaries(path):
            logger.info("removed %s (left by an interrupted run)", stale)

    model_dir = Path(model) if model is not None else default_model_dir()
    if loaded is None:
        loaded = load_model(model_dir)
    meta = loaded.metadata
    if model is None:
        logger.warning("using the embedded default model (%s); real use needs --model", meta.trained_on)
    label_map = meta.label_map
    keep_indices = label_map.selection(keep=settings.keep, drop=settings.drop)
    keep_arg = None if len(keep_indices) == label_map.num_classes - 1 else keep_indices

    seg_image = io.read_label(seg_path)
    classes = label_map.remap(
        sitk.GetArrayViewFromImage(seg_image), unknown=settings.unknown_labels, source=seg_path
    )
    class_image = sitk.GetImageFromArray(classes)
    class_image.CopyInformation(seg_image)
    ref_image = None
    if reference is not None:
        ref_image = io.read_image(reference)
        if not io.Geometry.of(ref_image).close_to(io.Geometry.of(seg_image), atol=1e-3):
            raise InputError(
                reference,
                f"geometry differs from the segmentation {seg_path} (it must be registered"
                " and resampled to the segmentation's grid)",
            )

    dev = resolve_device(device)
    frame_slices = slices_along(seg_image, meta.slice_axis)
    need = estimate_memory(
        slices=frame_slices,
        slice_size=meta.slice_size,
        condition_channels=meta.condition_channels,
        slice_batch_size=settings.slice_batch_size,
        block_channels=loaded.unet.config.block_out_channels,
        input_voxels=int(np.prod(seg_image.GetSize())),
    )
    limit = max_memory if max_memory is not None else int(0.8 * available_memory(dev))
    if need > limit:
        raise ResourceError(
            f"{seg_path}: generating this volume needs about {need / 2**30:.2f} GiB, above the limit of "
            f"{limit / 2**30:.2f} GiB (--max-memory; or lower --slice-batch-size)"
        )

    frame = to_slice_frame(class_image, ref_image, slice_size=meta.slice_size, slice_axis=meta.slice_axis)
    window = None
    ref_model = None
    if ref_image is not None:
        window = meta.intensity.window(sitk.GetArrayViewFromImage(ref_image))
        ref_model = torch.from_numpy(meta.intensity.to_model(frame.image.numpy(), window))

    unet = loaded.unet.to(dev)
    autocast = None
    if dev.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
        _enable_xformers(unet)
        if precision in ("auto", "bf16"):
            autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif precision == "fp16":
            autocast = torch.float16
    pipe = SegmentationToVolumePipeline(
        unet=unet,
        scheduler=loaded.scheduler,
        encoding=meta.encoding,
        context_slices=meta.context_slices,
        num_classes=meta.num_classes,
        slice_axis=meta.slice_axis,
        condition=None if meta.condition is None else meta.condition.model_dump(mode="json"),
    )
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        frame.labels.long(),
        num_inference_steps=settings.num_inference_steps,
        seed=settings.seed,
        scheduler=settings.scheduler,
        slice_batch_size=settings.slice_batch_size,
        noise_correlation=settings.noise_correlation,
        x0_smoothing=settings.x0_smoothing,
        keep=keep_arg,
        reference=ref_model,
        strength=settings.strength,
        autocast_dtype=autocast,
        callback=progress,
    )

    physical = meta.intensity.from_model(result.volume.numpy(), window).astype(np.float32)
    background = float(physical.min()) if physical.size else 0.0
    generated = resample_to_grid(frame.to_sitk(physical), seg_image, default=background)
    if meta.intensity.modality == "CT":
        generated = sitk.Cast(sitk.Round(generated), sitk.sitkInt16)
    io.Geometry.of(seg_image).apply(generated)  # exact input geometry, bit for bit

    patient_info = _patient_info(seg_path) if copy_patient_info and fmt == "dicom" else None
    # All or nothing: if a later write fails (disk full) or the run is interrupted, what this call already
    # wrote is removed again, so a volume never stands without its sidecar.
    written: list[Path] = []
    try:
        io.write_volume(
            generated,
            out_path,
            overwrite=overwrite,
            format=fmt,
            modality=meta.intensity.modality,
            series_description=f"SYNTHETIC volgen {meta.name}",
            patient_info=patient_info,
        )
        written.append(out_path)
        seconds = time.perf_counter() - started
        kept_names = [label_map.class_names[i] for i in keep_indices]
        sidecar = {
            "volgen_version": __version__,
            "synthetic": True,
            "segmentation": str(segmentation),
            "output": str(output) if output is not None else str(out_path),
            "format": fmt,
            "model": {
                "id": loaded.model_id,
                "name": meta.name,
                "path": str(model) if model is not None else "(embedded default)",
                "weights_sha256": loaded.weights_sha256,
                "trained_on": meta.trained_on,
            },
            "settings": asdict(settings),
            "classes_kept": kept_names,
            "reference": None if reference is None else str(reference),
            "reference_sha256": None
            if reference is None or Path(reference).is_dir()
            else _file_sha256(Path(reference)),
            "segmentation_sha256": None if seg_path.is_dir() else _file_sha256(seg_path),
            "start_timestep": result.start_timestep,
            "timesteps": len(result.timesteps),
            "device": str(dev),
            "precision": "fp32" if autocast is None else str(autocast).removeprefix("torch."),
            "seconds": round(seconds, 3),
        }
        try:
            with io.atomic_write(side_path, overwrite=overwrite) as tmp:
                tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(side_path, f"could not write the file ({exc.strerror or exc})") from exc
        written.append(side_path)
        preview_path = None
        if preview is not None:
            from volgen.preview import save_montage

            try:
                shown = class_image
                if keep_arg is not None:  # show the condition the model got: dropped classes as background
                    dropped = np.isin(
                        classes, [c for c in range(1, label_map.num_classes) if c not in keep_indices]
                    )
                    shown = sitk.GetImageFromArray(np.where(dropped, 0, classes).astype(classes.dtype))
                    shown.CopyInformation(class_image)
                preview_path = save_montage(
                    shown,
                    generated,
                    preview,
                    reference=ref_image,
                    overwrite=overwrite,
                    title=f"{seg_path.name} -> {out_path.name} ({meta.name}, seed {settings.seed})",
                )
            except OSError as exc:
                raise OutputError(preview, f"could not write the file ({exc.strerror or exc})") from exc
    except BaseException:
        for path in written:
            _remove_written(path)
        raise
    return GenerateResult(
        output=out_path,
        sidecar=side_path,
        preview=preview_path,
        model_id=loaded.model_id,
        seconds=time.perf_counter() - started,
        classes_kept=kept_names,
        device=str(dev),
    )


def _remove_written(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def slices_along(image: Any, slice_axis: str) -> int:
    """Number of slices a volume has along the model's slice axis (after reorientation to RAS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    world_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[slice_axis]
    voxel_axis = int(np.argmax(np.abs(direction[world_axis])))
    return int(image.GetSize()[voxel_axis])


def _enable_xformers(unet: Any) -> None:
    """xformers attention on CUDA when installed; PyTorch's SDPA (diffusers' default) otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        unet.enable_xformers_memory_efficient_attention()
        logger.info("using xformers attention")
    except Exception as e:  # noqa: BLE001 - xformers builds often mismatch torch; SDPA is the fallback
        logger.warning("xformers is installed but unusable (%s); using PyTorch SDPA", e)


def _patient_info(segmentation: Path) -> dict[str, str] | None:
    """Patient identifiers of a DICOM input (only with ``copy_patient_info``)."""
    try:
        import pydicom
    except ImportError:  # pragma: no cover
        return None
    files = (
        [segmentation] if segmentation.is_file() else sorted(p for p in segmentation.iterdir() if p.is_file())
    )
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: nothing to copy
            continue
        keys = (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyID",
            "AccessionNumber",
            "StudyDate",
            "StudyTime",
        )
        return {k: str(ds.get(k, "")) for k in keys if ds.get(k) is not None}
    return None
