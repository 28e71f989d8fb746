"""The generation layer: a loaded model on its device that turns an in-memory segmentation into an image.

:class:`VolumeGenerator` sits between the pipeline (tensors in the model's slicing frame) and the files
(:func:`volgen.generation.files.generate`). It knows SimpleITK images, label maps, intensity mappings and
geometry; it knows nothing about paths, formats or sidecars. Setting up the model (device, precision,
attention kernels) happens once, in the constructor, so one generator serves any number of volumes (batch
conversion keeps one per process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from volgen import defaults
from volgen.errors import InputError, ResourceError, VolgenError
from volgen.generation.device import (
    autocast_dtype,
    estimate_memory,
    memory_limit,
    prepare_unet,
    resolve_device,
)
from volgen.generation.reference import geometry_difference
from volgen.generation.settings import GenerateSettings
from volgen.types import PathLike

logger = logging.getLogger(__name__)


@dataclass
class GeneratedVolume:
    """What :meth:`VolumeGenerator.generate` returns.

    Attributes:
        image: The generated image on the segmentation's exact grid, in physical units, in the type it is
            stored as (CT: int16 HU, rounded once; MR: float32).
        condition: The class indices the model was conditioned on (dropped classes shown as background),
            on the same grid (uint8).
        classes_kept: Names of the foreground classes in the condition.
        timesteps: The timesteps that were denoised (none when λ = 0: the image is the reference).
        start_timestep: Where denoising started (``t*``; -1 when nothing was denoised).
        seconds: Time spent in :meth:`VolumeGenerator.generate`.
        slice_axes: The axes sliced along, primary first (none when nothing was denoised).
        axis_schedule: The slicing axis of each denoised step (one per entry of ``timesteps``).
        cube_voxel: The isotropic voxel (mm) of the cube frame of multi-axis sampling; ``None`` for
            single-axis sampling in the model's slicing frame.
    """

    image: Any
    condition: Any
    classes_kept: list[str] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    start_timestep: int = -1
    seconds: float = 0.0
    slice_axes: list[str] = field(default_factory=list)
    axis_schedule: list[str] = field(default_factory=list)
    cube_voxel: float | None = None


def slices_along(image: Any, slice_axis: str) -> int:
    """Number of slices a volume has along the model's slice axis (after reorientation to RAS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    world_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[slice_axis]
    voxel_axis = int(np.argmax(np.abs(direction[world_axis])))
    return int(image.GetSize()[voxel_axis])


def _like(array: np.ndarray, grid: Any) -> Any:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


class VolumeGenerator:
    """A model loaded once on its device, generating images for segmentations held in memory.

    Example:
        >>> generator = VolumeGenerator()  # the embedded default model, on CUDA if available
        >>> out = generator.generate(seg_image, settings=GenerateSettings(seed=1))  # doctest: +SKIP
        >>> out.image  # a SimpleITK image on seg_image's grid  # doctest: +SKIP

    Args:
        model: A model folder, a :class:`volgen.models.LoadedModel`, or ``None`` for the embedded default.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16`` (autocast on CUDA; the CPU runs float32).

    Attributes:
        model: The :class:`~volgen.models.LoadedModel`.
        device: The ``torch.device`` the UNet is on.
        autocast_dtype: The UNet's autocast dtype, ``None`` for float32.
        pipeline: The :class:`~volgen.pipeline.SegmentationToVolumePipeline` it samples with.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: str = defaults.DEVICE,
        precision: str = defaults.PRECISION,
    ) -> None:
        from volgen.models import LoadedModel, build_pipeline, load_model

        self.device = resolve_device(device)
        self.autocast_dtype = autocast_dtype(self.device, precision)
        if not isinstance(model, LoadedModel):
            model = load_model(defaults.MODEL_DIR if model is None else model)
        self.model = model
        unet = prepare_unet(model.unet, self.device)
        self.pipeline = build_pipeline(
            unet, model.scheduler, model.metadata, scheduler_name=defaults.SCHEDULER
        )

    @property
    def metadata(self) -> Any:
        """The model's :class:`~volgen.models.ModelMetadata`."""
        return self.model.metadata

    @property
    def precision(self) -> str:
        """``fp32``, ``bfloat16`` or ``float16``: what the UNet runs in."""
        return "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")

    def kept_classes(self, settings: GenerateSettings) -> list[int]:
        """Foreground class indices the condition keeps under the settings' ``keep``/``drop``."""
        return self.metadata.label_map.selection(keep=settings.keep, drop=settings.drop)

    @property
    def trained_axes(self) -> tuple[str, ...]:
        """The slice axes the model was trained on (one for a single-axis model)."""
        from volgen.multiaxis import model_axes

        return model_axes(self.metadata.condition, self.metadata.slice_axis)

    def cube_axes(self, settings: GenerateSettings) -> tuple[str, ...] | None:
        """The axes a run slices along in the cube frame (``settings.slice_axes`` of a multi-axis model), or
        ``None`` for single-axis sampling along the model's own axis in its slicing frame (no ``slice_axes``,
        or a single-axis model asked for its own axis).

        Raises:
            VolgenError: ``slice_axes`` names an axis the model was not trained on.
        """
        if settings.slice_axes is None:
            return None
        trained = self.trained_axes
        unknown = [a for a in settings.slice_axes if a not in trained]
        if unknown:
            raise VolgenError(
                f"--slice-axes {','.join(settings.slice_axes)}: model {self.metadata.name!r} "
                f"({self.model.path}) was trained on {', '.join(trained)} slices only, not "
                f"{', '.join(unknown)}"
            )
        return tuple(settings.slice_axes) if len(trained) > 1 else None

    def check(self, settings: GenerateSettings, *, reference: bool) -> None:
        """Check the settings against this model before any work: steps up to its training timesteps, the
        class names, the slice axes, and that λ < 1 has a reference."""
        self.cube_axes(settings)
        if settings.strength < 1.0 and not reference:
            raise VolgenError("--strength below 1 interpolates towards a real image: give --reference")
        total = int(self.model.scheduler.config.num_train_timesteps)
        if settings.num_inference_steps > total:
            raise VolgenError(
                f"--steps must be at most the model's {total} training timesteps, got "
                f"{settings.num_inference_steps}"
            )
        self.kept_classes(settings)

    def classes(
        self,
        segmentation: Any,
        *,
        unknown_labels: str = defaults.UNKNOWN_LABELS,
        source: PathLike | None = None,
    ) -> Any:
        """The segmentation's label values as the model's class indices (same grid)."""
        return self.metadata.label_map.remap_image(segmentation, unknown=unknown_labels, source=source)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the UNet's weights as loaded."""
        return sum(p.numel() * p.element_size() for p in self.model.unet.parameters())

    def memory_needed(self, segmentation: Any, settings: GenerateSettings) -> int:
        """Bytes generating this segmentation needs beyond the weights (estimated, nothing allocated)."""
        meta = self.metadata
        return estimate_memory(
            slices=self._slices(segmentation, settings),
            slice_size=meta.slice_size,
            condition_channels=meta.condition_channels,
            slice_batch_size=settings.slice_batch_size,
            block_channels=self.model.unet.config.block_out_channels,
            input_voxels=int(np.prod(segmentation.GetSize())),
        )

    def check_memory(
        self,
        segmentation: Any,
        settings: GenerateSettings,
        max_memory: int | None = None,
        *,
        source: PathLike | None = None,
    ) -> None:
        """Refuse (:class:`ResourceError`) a volume estimated to need more than ``max_memory`` bytes
        (default: a share of what is free on the device)."""
        need = self.memory_needed(segmentation, settings)
        limit = memory_limit(self.device, max_memory)
        if need > limit:
            where = f"{source}: " if source is not None else ""
            raise ResourceError(
                f"{where}generating this volume needs about {need / 2**30:.2f} GiB, above the limit of "
                f"{limit / 2**30:.2f} GiB (--max-memory; or lower --slice-batch-size)"
            )

    def _slices(self, segmentation: Any, settings: GenerateSettings) -> int:
        """Slices one step runs the UNet on: along the model's axis, or a cube side in the cube frame."""
        if self.cube_axes(settings) is not None:
            return self.metadata.slice_size
        return slices_along(segmentation, self.metadata.slice_axis)

    def slice_forwards(self, segmentation: Any, settings: GenerateSettings) -> int:
        """UNet slice-forwards generating this segmentation costs (for time estimates)."""
        self.pipeline.set_scheduler(settings.scheduler)
        return self.pipeline.slice_forwards(
            self._slices(segmentation, settings),
            num_inference_steps=settings.num_inference_steps,
            strength=settings.strength,
            slice_batch_size=settings.slice_batch_size,
        )

    def generate(
        self,
        segmentation: Any,
        *,
        settings: GenerateSettings | None = None,
        reference: Any = None,
        progress: Callable[[Any], None] | None = None,
        source: PathLike | None = None,
    ) -> GeneratedVolume:
        """Generate an image whose anatomy follows ``segmentation``, on its exact grid.

        Args:
            segmentation: A SimpleITK label image of source label values (those of the model's label map).
            settings: :class:`GenerateSettings` (default: all defaults).
            reference: A real image on the segmentation's grid (SimpleITK), for λ < 1. With λ = 0 (or a λ
                too small to reach the first scheduled timestep) the result is the reference itself, in
                physical units, stored like any output (CT rounded to int16, MR float32).
            progress: Called with :class:`volgen.pipeline.Progress` after every UNet chunk.
            source: Where the segmentation came from, named in errors.
        """
        started = time.perf_counter()
        settings = settings or GenerateSettings()
        self.check(settings, reference=reference is not None)
        classes = self.classes(segmentation, unknown_labels=settings.unknown_labels, source=source)
        kept = self.kept_classes(settings)
        condition = self._condition(classes, kept)
        if reference is not None and (difference := geometry_difference(reference, segmentation)):
            raise InputError(
                source, f"the reference's geometry differs from the segmentation's: {difference}"
            )
        self.pipeline.set_scheduler(settings.scheduler)
        timesteps = self.pipeline.set_timesteps(settings.num_inference_steps, settings.strength)
        if len(timesteps) == 0:  # λ = 0: nothing to denoise, the reference is the answer
            image = self._stored(self._physical(reference), segmentation)
            return GeneratedVolume(image, condition, self._names(kept), seconds=time.perf_counter() - started)

        volume = self._sample(classes, reference, segmentation, settings, kept, progress)
        volume.condition, volume.classes_kept = condition, self._names(kept)
        volume.seconds = time.perf_counter() - started
        return volume

    def _sample(self, classes, reference, segmentation, settings, kept, progress) -> GeneratedVolume:
        """Into the slicing frame (or the cube frame), through the pipeline, back onto the segmentation's
        grid."""
        import SimpleITK as sitk
        import torch

        from volgen.frames import resample_to_grid, to_slice_frame

        meta = self.metadata
        keep = None if len(kept) == meta.num_classes - 1 else kept
        axes = self.cube_axes(settings)
        if axes is not None:
            return self._sample_cube(classes, reference, segmentation, settings, axes, keep, progress)
        frame = to_slice_frame(classes, reference, slice_size=meta.slice_size, slice_axis=meta.slice_axis)
        window, ref_model = None, None
        if reference is not None:
            window = meta.intensity.window(sitk.GetArrayViewFromImage(reference))
            ref_model = torch.from_numpy(meta.intensity.to_model(frame.image.numpy(), window))
        result = self.pipeline(
            frame.labels.long(),
            num_inference_steps=settings.num_inference_steps,
            seed=settings.seed,
            slice_batch_size=settings.slice_batch_size,
            noise_correlation=settings.noise_correlation,
            x0_smoothing=settings.x0_smoothing,
            keep=keep,
            reference=ref_model,
            strength=settings.strength,
            autocast_dtype=self.autocast_dtype,
            callback=progress,
        )
        physical = meta.intensity.from_model(result.volume.numpy(), window)
        background = float(physical.min()) if physical.size else 0.0
        generated = resample_to_grid(frame.to_sitk(physical), segmentation, default=background)
        return GeneratedVolume(
            image=self._stored(generated, segmentation),
            condition=None,
            timesteps=result.timesteps,
            start_timestep=result.start_timestep,
            slice_axes=[meta.slice_axis],
            axis_schedule=[meta.slice_axis] * len(result.timesteps),
        )

    def _sample_cube(
        self, classes, reference, segmentation, settings, axes, keep, progress
    ) -> GeneratedVolume:
        """Multi-axis sampling in the isotropic cube frame (:func:`volgen.multiaxis.generate_in_cube`)."""
        from volgen.multiaxis import generate_in_cube

        result = generate_in_cube(
            self.pipeline,
            classes,
            intensity=self.metadata.intensity,
            axes=axes,
            axis_schedule_kind=settings.axis_schedule,
            late_fraction=settings.late_fraction,
            num_inference_steps=settings.num_inference_steps,
            reference=reference,
            seed=settings.seed,
            scheduler=settings.scheduler,
            slice_batch_size=settings.slice_batch_size,
            noise_correlation=settings.noise_correlation,
            x0_smoothing=settings.x0_smoothing,
            keep=keep,
            strength=settings.strength,
            autocast_dtype=self.autocast_dtype,
            callback=progress,
        )
        return GeneratedVolume(
            image=self._stored(result.image, segmentation),
            condition=None,
            timesteps=result.timesteps,
            start_timestep=result.start_timestep,
            slice_axes=list(result.axes),
            axis_schedule=result.schedule,
            cube_voxel=result.voxel,
        )

    def _physical(self, reference: Any) -> Any:
        import SimpleITK as sitk

        return sitk.Cast(reference, sitk.sitkFloat32)

    def _stored(self, physical: Any, grid: Any) -> Any:
        """Physical float values -> the stored type (CT rounded once to int16), with ``grid``'s geometry."""
        import SimpleITK as sitk

        from volgen.io import Geometry

        image = _like(self.metadata.intensity.to_storage(sitk.GetArrayViewFromImage(physical)), grid)
        Geometry.of(grid).apply(image)  # exact input geometry, bit for bit
        return image

    def _condition(self, classes: Any, kept: list[int]) -> Any:
        """The class image the model is conditioned on: dropped classes as background."""
        import SimpleITK as sitk

        if len(kept) == self.metadata.num_classes - 1:
            return classes
        indices = sitk.GetArrayFromImage(classes)
        dropped = ~np.isin(indices, [0, *kept])
        return _like(np.where(dropped, 0, indices).astype(indices.dtype), classes)

    def _names(self, kept: list[int]) -> list[str]:
        return [self.metadata.label_map.class_names[i] for i in kept]
