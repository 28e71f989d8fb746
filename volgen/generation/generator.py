"""The generation layer: a loaded model on its device that turns an in-memory segmentation into an image.

:class:`VolumeGenerator` sits between the pipeline (tensors in the model's slicing frame) and the files
(:func:`volgen.generation.files.generate`). It knows SimpleITK images, label maps, intensity mappings and
geometry; it knows nothing about paths, formats or sidecars. Setting up the model (device, precision,
attention kernels) happens once, in the constructor, so one generator serves any number of volumes (batch
conversion keeps one per process). Several volumes - samples of one segmentation with seeds ``seed``,
``seed + 1``, ..., or other segmentations with the same settings - can be generated together
(:meth:`VolumeGenerator.generate_samples`, :meth:`VolumeGenerator.generate_many`): their slices share the
UNet's forwards, and each is exactly what generating it alone gives (on the CPU, bit for bit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from volgen import defaults
from volgen.errors import InputError, ResourceError, VolgenError
from volgen.generation.device import autocast_dtype, prepare_unet, resolve_device
from volgen.generation.reference import geometry_difference
from volgen.generation.settings import GenerateSettings, SettingsError, sample_settings
from volgen.memory import estimate_memory, input_grid_bytes, memory_limit, plane_pixels
from volgen.types import PathLike

logger = logging.getLogger(__name__)

__all__ = ["GeneratedVolume", "GenerationRequest", "VolumeGenerator", "sample_settings", "slices_along"]


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
        guidance_scale: The classifier-free guidance that ran (1: unguided).
        guided_steps: How many of the denoised steps ran guided (:data:`volgen.defaults.GUIDANCE_INTERVAL`).
        fine_noise_correlation: The fine-scale ρ of the initial noise that ran (``auto`` resolved).
        background_fine_noise_correlation: The background's own fine ρ that ran (``None``: the fine ρ).
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
    guidance_scale: float = 1.0
    guided_steps: int = 0
    fine_noise_correlation: float = 0.0
    background_fine_noise_correlation: float | None = None


@dataclass
class GenerationRequest:
    """One volume of a :meth:`VolumeGenerator.generate_many` call.

    Attributes:
        segmentation: A SimpleITK label image of source label values.
        settings: Its :class:`GenerateSettings` (volumes generated together differ in ``seed`` only).
        reference: A real image on the segmentation's grid (SimpleITK), for λ < 1.
        source: Where the segmentation came from, named in errors.
    """

    segmentation: Any
    settings: GenerateSettings = field(default_factory=GenerateSettings)
    reference: Any = None
    source: PathLike | None = None


def _together(settings: GenerateSettings) -> GenerateSettings:
    """What volumes generated together must share: everything but the seed (and the slice batch)."""
    return replace(settings, seed=0, slice_batch_size=1)


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
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16`` (autocast: on CUDA; on the CPU bf16, ``auto``
            where the CPU has native bf16, see :func:`volgen.generation.device.autocast_dtype`).

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
        from volgen.frames import ModelFrame
        from volgen.models import LoadedModel, load_model
        from volgen.pipeline import build_pipeline

        self.device = resolve_device(device)
        self.autocast_dtype = autocast_dtype(self.device, precision)
        if not isinstance(model, LoadedModel):
            model = load_model(defaults.MODEL_DIR if model is None else model)
        self.model = model
        unet = prepare_unet(model.unet, self.device)
        self.pipeline = build_pipeline(
            unet, model.scheduler, model.metadata, scheduler_name=defaults.SCHEDULER
        )
        self.frame = ModelFrame.of(model.metadata, unet.config)  # fitted or native (volgen.frames)

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

    def settings_for(self, settings: GenerateSettings) -> GenerateSettings:
        """``settings`` with what they leave to the model decided (:meth:`GenerateSettings.for_model`)."""
        return settings.for_model(self.metadata)

    def guidance_scale(self, settings: GenerateSettings) -> float:
        """The classifier-free guidance a run uses (``None`` in the settings: the model's own, else its
        default by flags, :meth:`volgen.pipeline.SegmentationToVolumePipeline.resolve_guidance_scale`)."""
        try:
            return self.pipeline.resolve_guidance_scale(self.settings_for(settings).guidance_scale)
        except VolgenError as exc:
            raise SettingsError(f"--guidance-scale: {exc} (model {self.metadata.name!r})") from None

    def _slices(self, segmentation: Any, settings: GenerateSettings) -> int:
        """Slices one step runs the UNet on: along the model's axis, or a cube side in the cube frame."""
        if self.cube_axes(settings) is not None:
            return self.metadata.slice_size
        return slices_along(segmentation, self.metadata.slice_axis)

    def check(self, settings: GenerateSettings, *, reference: bool) -> None:
        """Check the settings (as :meth:`settings_for` decides them) against this model before any work: steps
        up to its training timesteps, the class names, the slice axes, and that λ < 1 has a reference."""
        settings = self.settings_for(settings)
        self.cube_axes(settings)
        self.guidance_scale(settings)
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

    def memory_needed(
        self,
        segmentation: Any,
        settings: GenerateSettings,
        *,
        volumes: int = 1,
        max_memory: int | None = None,
    ) -> int:
        """Bytes generating ``volumes`` volumes of this segmentation together needs beyond the weights
        (estimated, nothing allocated; ``slice_batch_size="auto"`` counted as the chunk it would choose
        within ``max_memory``)."""
        meta = self.metadata
        plan = self.plan(segmentation, settings, volumes=volumes, max_memory=max_memory)
        return estimate_memory(
            slices=plan.num_slices,
            slice_size=self.frame.plane(segmentation),
            condition_channels=meta.condition_channels,
            slice_batch_size=plan.slice_batch_size,
            block_channels=self.model.unet.config.block_out_channels,
            input_voxels=int(np.prod(segmentation.GetSize())) * volumes,
        )

    def _run_size(
        self, segmentation: Any, settings: GenerateSettings, volumes: int, max_memory: int | None
    ) -> tuple[int, int, int]:
        """Frame slices per step, input voxels and slice batch of ``volumes`` of this segmentation at once."""
        slices = self._slices(segmentation, settings) * volumes
        voxels = int(np.prod(segmentation.GetSize())) * volumes
        return slices, voxels, self._slice_batch(slices, voxels, settings, max_memory)

    def _slice_batch(
        self, slices: int, voxels: int, settings: GenerateSettings, max_memory: int | None, plane: Any = None
    ) -> int:
        """The slice batch of a run over ``slices`` frame slices and ``voxels`` input voxels (all volumes): as
        set, or for ``auto`` what fits ``max_memory`` (default: a share of the free memory) beside the
        volume arrays (and, on the CPU, the input-grid arrays)."""
        budget = None
        if settings.slice_batch_size == defaults.AUTO_SLICE_BATCH:
            budget = memory_limit(self.device, max_memory)
            if self.device.type == "cpu":
                budget -= input_grid_bytes(voxels)
        resolve = self.pipeline.resolve_slice_batch_size  # plane: the frame's (H, W) (native models)
        return resolve(settings.slice_batch_size, slices, budget_bytes=budget, plane=plane)

    def check_memory(
        self,
        segmentation: Any,
        settings: GenerateSettings,
        max_memory: int | None = None,
        *,
        source: PathLike | None = None,
        volumes: int = 1,
    ) -> None:
        """Refuse (:class:`ResourceError`) ``volumes`` volumes of this segmentation, generated together,
        estimated to need more than ``max_memory`` bytes (default: a share of what is free on the device)."""
        need = self.memory_needed(segmentation, settings, volumes=volumes, max_memory=max_memory)
        limit = memory_limit(self.device, max_memory)
        if need > limit:
            where = f"{source}: " if source is not None else ""
            what = "this volume" if volumes == 1 else f"{volumes} volumes of this segmentation together"
            raise ResourceError(
                f"{where}generating {what} needs about {need / 2**30:.2f} GiB, above the limit of "
                f"{limit / 2**30:.2f} GiB (--max-memory; or lower --slice-batch-size)"
            )

    def volumes_together(
        self, segmentation: Any, settings: GenerateSettings, count: int, max_memory: int | None = None
    ) -> int:
        """How many of ``count`` volumes of this segmentation to generate together: as many as fit within
        ``max_memory`` (default: a share of what is free on the device), at least one (which
        :meth:`check_memory` may still refuse)."""
        limit = memory_limit(self.device, max_memory)
        low, high = 1, max(1, count)
        while low < high:  # the estimate grows with the number of volumes
            mid = (low + high + 1) // 2
            if self.memory_needed(segmentation, settings, volumes=mid, max_memory=max_memory) <= limit:
                low = mid
            else:
                high = mid - 1
        return low

    def plan(
        self,
        segmentation: Any,
        settings: GenerateSettings,
        *,
        volumes: int = 1,
        max_memory: int | None = None,
    ) -> Any:
        """The :class:`~volgen.sampling.SamplingPlan` of generating ``volumes`` volumes of this segmentation
        together: timesteps after λ, guidance per step, slice batch (``auto``: as chosen within
        ``max_memory``), precision and forwards. Time estimates, dry runs and sidecars read it."""
        slices, voxels, _ = self._run_size(segmentation, settings, volumes, max_memory)
        return self._plan(slices, voxels, settings, max_memory, [segmentation])

    def _plan(self, slices: int, voxels: int, settings: GenerateSettings, max_memory: int | None, labels):
        """A run's plan: ``slices`` per step, ``voxels`` of ``labels``; settings resolved once, for it."""
        from volgen.sampling import noise_rhos  # torch: not imported before the fast checks

        settings = self.settings_for(settings)
        plane = max((self.frame.plane(s) for s in labels), key=plane_pixels)
        fine_rho, background_rho = noise_rhos(settings, self.frame, labels)  # auto: by the slice spacing
        self.pipeline.set_scheduler(settings.scheduler)
        return self.pipeline.plan(
            slices,
            num_inference_steps=settings.num_inference_steps,
            strength=settings.strength,
            slice_batch_size=self._slice_batch(slices, voxels, settings, max_memory, plane),
            guidance_scale=self.guidance_scale(settings),
            noise_correlation=settings.noise_correlation,
            fine_noise_correlation=fine_rho,
            background_fine_noise_correlation=background_rho,
            x0_smoothing=settings.x0_smoothing,
            autocast_dtype=self.autocast_dtype,
        )

    def slice_forwards(
        self, segmentation: Any, settings: GenerateSettings, *, volumes=1, max_memory=None
    ) -> int:
        """UNet slice-forwards of ``volumes`` volumes of this segmentation generated together: the
        :attr:`volgen.sampling.SamplingPlan.forwards` of :meth:`plan`."""
        return self.plan(segmentation, settings, volumes=volumes, max_memory=max_memory).forwards

    def generate(
        self,
        segmentation: Any,
        *,
        settings: GenerateSettings | None = None,
        reference: Any = None,
        progress: Callable[[Any], None] | None = None,
        source: PathLike | None = None,
        max_memory: int | None = None,
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
            max_memory: Budget (bytes) ``slice_batch_size="auto"`` chooses within (default: a share of the
                free memory).
        """
        request = GenerationRequest(segmentation, settings or GenerateSettings(), reference, source)
        return self.generate_many([request], progress=progress, max_memory=max_memory)[0]

    def generate_samples(
        self,
        segmentation: Any,
        *,
        samples: int,
        settings: GenerateSettings | None = None,
        reference: Any = None,
        progress: Callable[[Any], None] | None = None,
        source: PathLike | None = None,
        max_memory: int | None = None,
    ) -> list[GeneratedVolume]:
        """``samples`` images for one segmentation, generated together: sample ``k`` uses seed
        ``settings.seed + k`` and is exactly :meth:`generate` with that seed (on the CPU, bit for bit).

        All samples are held in memory; for many samples of a large volume use :meth:`volumes_together` to
        split them into groups (:func:`volgen.generation.generate_samples` does).
        """
        seeds = sample_settings(settings or GenerateSettings(), samples)
        requests = [GenerationRequest(segmentation, s, reference, source) for s in seeds]
        return self.generate_many(requests, progress=progress, max_memory=max_memory)

    def generate_many(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: Callable[[Any], None] | None = None,
        max_memory: int | None = None,
    ) -> list[GeneratedVolume]:
        """Generate one image per request in one run of the pipeline: the slices of all of them share every
        UNet forward. Each result is what :meth:`generate` gives for its request alone (on the CPU, bit for
        bit); the segmentations may differ in size, spacing and orientation.

        Args:
            requests: The volumes; their settings must agree in everything but ``seed`` (the slice batch of
                the first is used).
            progress: Called with :class:`volgen.pipeline.Progress` (slices of all volumes) after every chunk.
            max_memory: Budget (bytes) ``slice_batch_size="auto"`` chooses within.

        Raises:
            VolgenError: No requests, or settings that differ in more than the seed.
        """
        started = time.perf_counter()
        requests = list(requests)
        if not requests:
            raise VolgenError("nothing to generate: give at least one segmentation")
        settings = requests[0].settings
        for request in requests[1:]:
            if _together(request.settings) != _together(settings):
                raise VolgenError("volumes generated together must share their settings apart from the seed")
        for request in requests:
            self.check(request.settings, reference=request.reference is not None)
        kept = self.kept_classes(settings)
        prepared: dict[tuple[int, int], tuple[Any, Any]] = {}  # samples of one segmentation: prepared once
        for request in requests:
            key = (id(request.segmentation), id(request.reference))
            if key not in prepared:
                prepared[key] = self._prepare(request, kept)
        axes = self.cube_axes(settings)
        if axes is None:  # single-axis: all volumes in one run, along the model's axis
            slices = sum(slices_along(r.segmentation, self.metadata.slice_axis) for r in requests)
            voxels = sum(int(np.prod(r.segmentation.GetSize())) for r in requests)
        else:  # multi-axis: one cube at a time
            slices = self.metadata.slice_size
            voxels = max(int(np.prod(r.segmentation.GetSize())) for r in requests)
        plan = self._plan(slices, voxels, settings, max_memory, [r.segmentation for r in requests])
        names = self._names(kept)
        if not plan.steps:  # λ = 0: nothing to denoise, the references are the answer
            seconds = time.perf_counter() - started
            return [
                GeneratedVolume(
                    self._stored(r.reference, r.segmentation),
                    prepared[id(r.segmentation), id(r.reference)][1],
                    names,
                    seconds=seconds,
                )
                for r in requests
            ]
        if axes is not None:  # multi-axis: one cube at a time
            volumes = [
                self._sample_cube(
                    r, prepared[id(r.segmentation), id(r.reference)][0], axes, kept, progress, plan
                )
                for r in requests
            ]
        else:
            images, result = self._sample(requests, prepared, kept, progress, plan)
            axis = self.metadata.slice_axis
            volumes = [
                GeneratedVolume(
                    image=image,
                    condition=None,
                    timesteps=result.timesteps,
                    start_timestep=result.start_timestep,
                    slice_axes=[axis],
                    axis_schedule=[axis] * len(result.timesteps),
                )
                for image in images
            ]
        seconds, guidance = time.perf_counter() - started, plan.guidance_scale
        guided = sum(passes == 2 for passes in plan.passes)
        for volume, r in zip(volumes, requests, strict=True):
            volume.condition = prepared[id(r.segmentation), id(r.reference)][1]
            volume.classes_kept, volume.seconds, volume.guidance_scale = names, seconds, guidance
            volume.guided_steps, volume.fine_noise_correlation = guided, plan.fine_noise_correlation
            volume.background_fine_noise_correlation = plan.background_fine_noise_correlation
        return volumes

    def _prepare(self, request: GenerationRequest, kept: list[int]) -> tuple[Any, Any]:
        """A request's class image and condition (dropped classes as background); its reference checked."""
        settings, source = request.settings, request.source
        classes = self.classes(request.segmentation, unknown_labels=settings.unknown_labels, source=source)
        if request.reference is not None and (
            difference := geometry_difference(request.reference, request.segmentation)
        ):
            raise InputError(
                source, f"the reference's geometry differs from the segmentation's: {difference}"
            )
        return classes, self._condition(classes, kept)

    def _sample(self, requests, prepared, kept, progress, plan) -> tuple[list[Any], Any]:
        """Into the slicing frame, through the pipeline (all volumes in one run), back onto each grid."""
        meta = self.metadata
        frames: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        for r in requests:
            key = (id(r.segmentation), id(r.reference))
            if key in frames:
                continue
            frame = self.frame.to_frame(prepared[key][0], r.reference)
            window, ref_model = None, None
            if r.reference is not None:
                ref_model, window = meta.intensity.image_to_model(r.reference, frame.image)
            frames[key] = (frame, window, ref_model)
        keys = [(id(r.segmentation), id(r.reference)) for r in requests]
        labels = [frames[k][0].labels.long() for k in keys]
        references = [frames[k][2] for k in keys]
        result = self.pipeline.run(
            plan,
            labels,
            seed=[r.settings.seed for r in requests],
            keep=None if len(kept) == meta.num_classes - 1 else kept,
            reference=None if references[0] is None else references,
            callback=progress,
        )
        images = []
        for volume, key, request in zip(result.volumes, keys, requests, strict=True):
            frame, window, _ = frames[key]
            physical = meta.intensity.from_model(volume.numpy(), window)
            background = float(physical.min()) if physical.size else 0.0
            resampling = request.settings.resampling
            generated = frame.to_grid(physical, prepared[key][0], default=background, resampling=resampling)
            images.append(self._stored(generated, request.segmentation))
        return images, result

    def _sample_cube(self, request, classes, axes, kept, progress, plan) -> GeneratedVolume:
        """Multi-axis sampling in the isotropic cube frame (:func:`volgen.multiaxis.generate_in_cube`)."""
        from volgen.multiaxis import generate_in_cube

        settings, meta = request.settings, self.metadata
        result = generate_in_cube(
            self.pipeline,
            classes,
            intensity=meta.intensity,
            axes=axes,
            axis_schedule_kind=settings.axis_schedule,
            late_fraction=settings.late_fraction,
            resampling=settings.resampling,
            reference=request.reference,
            plan=plan,
            seed=settings.seed,
            keep=None if len(kept) == meta.num_classes - 1 else kept,
            callback=progress,
        )
        return GeneratedVolume(
            image=self._stored(result.image, request.segmentation),
            condition=None,
            timesteps=result.timesteps,
            start_timestep=result.start_timestep,
            slice_axes=list(result.axes),
            axis_schedule=result.schedule,
            cube_voxel=result.voxel,
        )

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
