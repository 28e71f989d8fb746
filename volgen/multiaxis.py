"""Multi-axis models and sampling: every plane of the volume is seen by a denoiser.

A slice model run along one axis makes volumes whose reslices it never looked at (streaks with correlated
noise, flicker without). A multi-axis model is trained on slices along several axes (its
:class:`~volgen.conditioning.ConditionLayout` lists them and the condition vector ends with a one-hot of the
current axis), and multi-axis sampling changes the slicing axis from step to step by an axis schedule
(:func:`axis_schedule`: ``cycle`` = ``axial, coronal, sagittal, axial, ...``; ``late`` = the first axis, then
the axes cycled in the last steps): every step is one pass of the UNet over the slices along that step's axis,
so the number of UNet evaluations per step is the number of slices along one axis, as for single-axis
sampling. Correlated initial noise (ρ along the first axis of the schedule) combines with it.
``volgen generate --slice-axes`` reaches it through :class:`volgen.generation.VolumeGenerator` and
:func:`generate_in_cube`.

The frame (see ``docs/consistency.md``): all used axes must have the same physical pixel, so the volume is
brought to an isotropic **cube frame**: reoriented to RAS, resampled to an isotropic voxel of
``max(field of view) / slice_size`` mm in every direction and padded to ``slice_size³``; labels are
resampled with SimpleITK's label-Gaussian interpolator (smooth label boundaries where a coarse axis is
upsampled), images linearly. The generated cube is resampled back onto the exact input grid (linear).
Anisotropic input: an axis is used only if the input spacing of every direction in its slices is at most
:data:`MAX_SPACING_RATIO` times the cube's voxel (thick slices upsampled more than that would show their
staircase in the reslices the model is asked to denoise); the slicing axis of thick slices itself is
always usable. :func:`usable_axes` says which axes remain.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torch import Tensor

from volgen import defaults
from volgen.conditioning import ConditionLayout, model_axes
from volgen.errors import VolgenError
from volgen.frames import back_to_grid, resample_to_grid, sitk_to_torchio, volume_to_slices

if TYPE_CHECKING:
    from volgen.pipeline import VolumeGenerationOutput
    from volgen.sampling import SamplingPlan

logger = logging.getLogger(__name__)

#: Axis codes of :class:`~volgen.conditioning.ConditionLayout` (0, 1, 2) by name.
AXIS_NAMES: tuple[str, ...] = defaults.AXIS_NAMES
#: RAS tensor dim each slice axis runs along (axial: Z, coronal: Y, sagittal: X).
_NORMAL_DIM = {"axial": 2, "coronal": 1, "sagittal": 0}
#: An axis is used when every in-slice direction's input spacing is at most this many cube voxels.
MAX_SPACING_RATIO = 2.0


def axis_code(name: str) -> int:
    """``axial`` -> 0, ``coronal`` -> 1, ``sagittal`` -> 2 (the codes of ``ConditionLayout.axes``)."""
    try:
        return AXIS_NAMES.index(name)
    except ValueError:
        raise VolgenError(f"unknown slice axis {name!r}; expected one of {', '.join(AXIS_NAMES)}") from None


@dataclass
class CubeFrame:
    """A volume in the isotropic cube frame.

    Attributes:
        labels: ``(X, Y, Z)`` class indices (uint8), RAS, ``slice_size`` voxels along every axis.
        image: ``(X, Y, Z)`` float32 physical intensities of the optional image, else ``None``.
        affine: The cube's 4x4 RAS affine.
        voxel: The cube's isotropic voxel size (mm).
        input_spacing: The input's spacing along the cube's X, Y, Z (after reorientation to RAS, mm).
    """

    labels: Tensor
    image: Tensor | None
    affine: np.ndarray
    voxel: float
    input_spacing: tuple[float, float, float]

    def to_sitk(self, volume: Tensor | np.ndarray) -> sitk.Image:
        """An ``(X, Y, Z)`` cube volume as a float32 SimpleITK image with the cube's geometry."""
        array = np.asarray(volume, dtype=np.float32)[None]
        return tio.io.nib_to_sitk(array, self.affine)


def to_cube_frame(labels: sitk.Image, image: sitk.Image | None = None, *, slice_size: int) -> CubeFrame:
    """Resample class indices (and an image on the same grid) into the isotropic cube frame (module docs)."""
    label_img = tio.ToCanonical()(sitk_to_torchio(labels, label=True))
    spacing = tuple(float(s) for s in label_img.spacing)
    fov = np.array(label_img.spatial_shape) * np.array(spacing)
    voxel = float(fov.max()) / slice_size
    resample = tio.Resample(voxel, label_interpolation="label_gaussian")
    cube = (slice_size,) * 3
    label_img = tio.CropOrPad(cube, padding_mode=0)(resample(label_img))
    image_cube = None
    if image is not None:
        image_img = tio.ToCanonical()(sitk_to_torchio(sitk.Cast(image, sitk.sitkFloat32), label=False))
        image_img = tio.CropOrPad(cube, padding_mode="minimum")(resample(image_img))
        image_cube = image_img.data[0].float()
    return CubeFrame(
        labels=label_img.data[0].to(torch.uint8),
        image=image_cube,
        affine=label_img.affine,
        voxel=voxel,
        input_spacing=spacing,  # type: ignore[arg-type]
    )


def usable_axes(
    frame: CubeFrame, axes: Sequence[str], *, max_ratio: float = MAX_SPACING_RATIO
) -> tuple[str, ...]:
    """The axes of ``axes`` whose slices are not upsampled more than ``max_ratio`` in any direction.

    Slices along axis ``a`` span the two other RAS directions; if the input's spacing along either exceeds
    ``max_ratio`` x the cube voxel, the label shapes in those slices are interpolated between thick slices and
    the axis is left out. When every axis would be left out, the one with the finest slices stays.
    """

    def coarseness(axis: str) -> float:
        normal = _NORMAL_DIM[axis]
        return max(frame.input_spacing[d] for d in range(3) if d != normal) / frame.voxel

    kept = tuple(a for a in axes if coarseness(a) <= max_ratio)
    if not kept:
        kept = (min(axes, key=coarseness),)
    if len(kept) < len(axes):
        logger.info(
            "input spacing %s mm against a %.2f mm cube voxel: slicing along %s only",
            tuple(round(s, 2) for s in frame.input_spacing),
            frame.voxel,
            ", ".join(kept),
        )
    return kept


def axis_schedule(
    axes: Sequence[str],
    steps: int,
    *,
    kind: str = defaults.AXIS_SCHEDULE,
    late_fraction: float = defaults.LATE_FRACTION,
) -> list[str]:
    """The slicing axis of each of ``steps`` denoising steps (the one home of axis schedules).

    ``axes[0]`` is the primary axis. Every schedule has one UNet pass per step, so the number of UNet
    evaluations is that of single-axis sampling whatever the schedule.

    - ``cycle``: the axes in turn from the first, changing every step (``a, b, c, a, b, c, ...``).
    - ``late``: the primary axis for the early, structure-forming steps, then the axes in turn from the one
      after the primary (``a, a, a, a, b, c, a, b``) for the last ``round(late_fraction * steps)`` steps,
      where the texture forms (streaks along a slice axis are texture). ``late_fraction = 0`` slices along
      the primary axis only.

    Examples:
        >>> axis_schedule(("axial", "coronal"), 3)
        ['axial', 'coronal', 'axial']
        >>> axis_schedule(("axial", "coronal", "sagittal"), 6, kind="late", late_fraction=0.5)
        ['axial', 'axial', 'axial', 'coronal', 'sagittal', 'axial']
    """
    if not axes:
        raise VolgenError("multi-axis sampling needs at least one axis")
    if kind == "cycle":
        return [axes[i % len(axes)] for i in range(steps)]
    if kind == "late":
        if not 0.0 <= late_fraction <= 1.0:
            raise VolgenError(f"late_fraction must be in [0, 1], got {late_fraction}")
        late = min(steps, math.floor(late_fraction * steps + 0.5))
        order = [*axes[1:], axes[0]]
        return [axes[0]] * (steps - late) + [order[i % len(order)] for i in range(late)]
    raise VolgenError(f"unknown axis schedule {kind!r}; choose one of {', '.join(defaults.AXIS_SCHEDULES)}")


@torch.no_grad()
def sample_multiaxis(
    pipe,
    labels: Tensor,
    *,
    schedule: Sequence[str],
    seed: int = 0,
    scheduler: str | None = defaults.SCHEDULER,
    reference: Tensor | None = None,
    **sampling,
) -> VolumeGenerationOutput:
    """Generate a cube, changing the slicing axis from step to step.

    The pipeline's one loop with a per-step axis (``slice_axes``): the state between steps is one volume;
    each step is one pass of the UNet over the slices along that step's axis (the axis in a multi-axis
    model's condition vector) and one ``scheduler.step`` on the whole volume, so the result is deterministic
    per seed and does not depend on ``slice_batch_size``.

    Args:
        pipe: A :class:`~volgen.pipeline.SegmentationToVolumePipeline` (its UNet, schedule and condition).
        labels: ``(X, Y, Z)`` class indices of a cube (``slice_size`` along every axis), RAS.
        schedule: The slice axis of each step of the full schedule (:func:`axis_schedule`); its length is the
            number of inference steps. With λ < 1 only its last steps run (those of the timesteps ``<= t*``).
        seed: Seed of the CPU generator that draws all noise.
        scheduler: Sampler name (:data:`volgen.defaults.SCHEDULERS`), set on ``pipe``; ``None`` keeps
            ``pipe.scheduler``.
        reference: ``(X, Y, Z)`` real image of the cube in model space, for λ < 1.
        sampling: The pipeline's other settings (``noise_correlation``, ``x0_smoothing``, ``keep``,
            ``strength``, ``guidance_scale``, ``slice_batch_size``, ``autocast_dtype``, ``callback``), with
            the defaults of :mod:`volgen.defaults`.

    Returns:
        :class:`~volgen.pipeline.VolumeGenerationOutput`: ``volume`` ``(X, Y, Z)`` float32 on the CPU in model
        space [-1, 1] (the reference itself when no timestep is left), the timesteps run.
    """
    if sampling.get("strength", 1.0) < 1.0 and (reference is None or reference.shape != labels.shape):
        raise VolgenError("strength < 1 interpolates towards a reference: pass a reference cube")
    return pipe(
        labels,
        num_inference_steps=len(schedule),
        slice_axes=list(schedule),
        seed=seed,
        scheduler=scheduler,
        reference=reference,
        **sampling,
    )


@dataclass
class MultiAxisResult:
    """A volume generated in the cube frame, on the input grid, and how it was made.

    Attributes:
        image: The image on the input's exact grid: physical float32 from :func:`generate_in_cube`, the stored
            type (CT int16 HU) from :func:`generate_multiaxis`.
        axes: The axes sliced along (after :func:`usable_axes`), primary first.
        voxel: The cube's isotropic voxel (mm).
        schedule: The slicing axis of each step that ran.
        timesteps: The timesteps that ran.
        start_timestep: Where denoising started (``t*``; -1 when nothing was denoised).
    """

    image: sitk.Image
    axes: tuple[str, ...]
    voxel: float
    schedule: list[str]
    timesteps: list[int]
    start_timestep: int = -1


def generate_in_cube(
    pipe,
    classes: sitk.Image,
    *,
    intensity,
    axes: Sequence[str],
    axis_schedule_kind: str = defaults.AXIS_SCHEDULE,
    late_fraction: float = defaults.LATE_FRACTION,
    schedule: Sequence[str] | None = None,
    num_inference_steps: int = defaults.STEPS,
    reference: sitk.Image | None = None,
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    plan: SamplingPlan | None = None,
    resampling: str = defaults.RESAMPLING,
    **sampling,
) -> MultiAxisResult:
    """Class indices on any grid -> cube frame -> :func:`sample_multiaxis` -> physical values on that grid.

    The one cube-frame generation: :func:`generate_multiaxis` and :class:`volgen.generation.VolumeGenerator`
    (``--slice-axes``) both call it.

    Args:
        pipe: The :class:`~volgen.pipeline.SegmentationToVolumePipeline` to sample with.
        classes: Class indices (the label map applied, dropped classes still in), any orientation and spacing.
        intensity: The model's :class:`~volgen.models.IntensityMapping`.
        axes: The axes to slice along, primary first; reduced by :func:`usable_axes` for thick slices.
        axis_schedule_kind: ``cycle`` or ``late`` (:func:`axis_schedule`).
        late_fraction: See :func:`axis_schedule`.
        schedule: Instead, the axis of every step (its length is the number of steps); axes that
            :func:`usable_axes` rules out are an error.
        num_inference_steps: Steps of the full schedule.
        reference: A real image on ``classes``' grid (physical units), for λ < 1 (``strength`` in
            ``sampling``).
        max_spacing_ratio: See :func:`usable_axes`.
        plan: A :class:`~volgen.sampling.SamplingPlan` resolved for a cube (its axes are filled in here from
            the schedule; ``num_inference_steps`` and the settings in ``sampling`` but ``seed``, ``keep``
            and ``callback`` are then the plan's).
        resampling: ``mask`` or ``linear``: how the cube comes back onto ``classes``' grid
            (:data:`volgen.defaults.RESAMPLINGS`).
        sampling: Keyword arguments of :func:`sample_multiaxis` (seed, scheduler, ρ, λ, keep, ...).
    """
    if plan is not None:
        num_inference_steps = plan.num_inference_steps
    frame = to_cube_frame(classes, reference, slice_size=pipe.unet.config.sample_size)
    wanted = tuple(dict.fromkeys(schedule)) if schedule is not None else tuple(axes)
    used = usable_axes(frame, wanted, max_ratio=max_spacing_ratio)
    if schedule is not None and len(used) < len(wanted):
        raise VolgenError(
            f"the schedule slices along {', '.join(wanted)}, but this volume's spacing allows only "
            f"{', '.join(used)} (max_spacing_ratio={max_spacing_ratio})"
        )
    if schedule is None:
        schedule = axis_schedule(
            used, num_inference_steps, kind=axis_schedule_kind, late_fraction=late_fraction
        )
    window, ref_model = None, None
    if reference is not None:
        ref_model, window = intensity.image_to_model(reference, frame.image)
    if plan is not None:
        axes_run = tuple(schedule)[len(schedule) - plan.steps :]
        plan = dataclasses.replace(plan, axes=axes_run, primary=schedule[0])
        out = pipe.run(plan, frame.labels.long(), reference=ref_model, **sampling)
    else:
        out = sample_multiaxis(
            pipe, frame.labels.long(), schedule=list(schedule), reference=ref_model, **sampling
        )
    physical = intensity.from_model(out.volume.numpy(), window).astype(np.float32)
    background = float(physical.min()) if physical.size else 0.0
    labels = frame.to_sitk(frame.labels) if resampling == "mask" else None
    image = back_to_grid(frame.to_sitk(physical), labels, classes, resampling=resampling, default=background)
    return MultiAxisResult(
        image=image,
        axes=used,
        voxel=frame.voxel,
        schedule=list(schedule)[len(schedule) - len(out.timesteps) :],
        timesteps=out.timesteps,
        start_timestep=out.start_timestep,
    )


def generate_multiaxis(
    classes: sitk.Image,
    loaded,
    *,
    axes: Sequence[str] | None = None,
    schedule: Sequence[str] | None = None,
    axis_schedule_kind: str = defaults.AXIS_SCHEDULE,
    late_fraction: float = defaults.LATE_FRACTION,
    seed: int = 0,
    num_inference_steps: int = defaults.STEPS,
    scheduler: str = defaults.SCHEDULER,
    noise_correlation: float = defaults.NOISE_CORRELATION,
    x0_smoothing: float = defaults.X0_SMOOTHING,
    guidance_scale: float | None = None,
    slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE,
    keep: Sequence[int] | None = None,
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    resampling: str = defaults.RESAMPLING,
    device: torch.device | str = "cpu",
) -> MultiAxisResult:
    """Generate a volume on the exact grid of a class-index image, slicing along several axes in turn.

    The library entry point for class-index images; ``volgen generate --slice-axes`` (and
    :class:`volgen.generation.VolumeGenerator` with ``GenerateSettings(slice_axes=...)``) does the same from a
    segmentation of source labels, with λ and the other settings.

    Args:
        classes: Class indices (the label map already applied), any orientation and spacing.
        loaded: A :class:`volgen.models.LoadedModel`.
        axes: Axes to slice along, primary first (default: every axis the model was trained on), reduced by
            :func:`usable_axes` for anisotropic input.
        schedule: Instead of ``axis_schedule_kind``, the axis of every step (its length is the number of
            steps), e.g. ``["coronal", "sagittal"] * 9 + ["axial"] * 2``; axes that :func:`usable_axes` rules
            out are an error.
        axis_schedule_kind: ``cycle`` or ``late`` (:func:`axis_schedule`).
        late_fraction: See :func:`axis_schedule`.
        max_spacing_ratio: See :func:`usable_axes`.
        resampling: See :func:`generate_in_cube`.

    Returns:
        :class:`MultiAxisResult`: stored intensities (CT: int16 HU) with the input's geometry.
    """
    from volgen.io import Geometry
    from volgen.pipeline import build_pipeline

    meta = loaded.metadata
    pipe = build_pipeline(loaded.unet.to(device), loaded.scheduler, meta)
    result = generate_in_cube(
        pipe,
        classes,
        intensity=meta.intensity,
        axes=tuple(axes) if axes else model_axes(meta.condition, meta.slice_axis),
        axis_schedule_kind=axis_schedule_kind,
        late_fraction=late_fraction,
        schedule=schedule,
        num_inference_steps=num_inference_steps,
        max_spacing_ratio=max_spacing_ratio,
        resampling=resampling,
        seed=seed,
        scheduler=scheduler,
        slice_batch_size=slice_batch_size,
        noise_correlation=noise_correlation,
        x0_smoothing=x0_smoothing,
        guidance_scale=guidance_scale,
        keep=keep,
    )
    image = sitk.GetImageFromArray(meta.intensity.to_storage(sitk.GetArrayViewFromImage(result.image)))
    image.CopyInformation(classes)
    Geometry.of(classes).apply(image)
    result.image = image
    return result


def cube_round_trip(classes: sitk.Image, image: sitk.Image, *, slice_size: int) -> sitk.Image:
    """A real image passed through the cube frame and back (what a perfect multi-axis generator returns).

    For fair comparisons: the generated volume has the cube's resolution, so the real one is given it too.
    """
    frame = to_cube_frame(classes, image, slice_size=slice_size)
    assert frame.image is not None
    back = resample_to_grid(frame.to_sitk(frame.image), classes, default=float(frame.image.min()))
    back.CopyInformation(classes)
    return back


# ------------------------------------------------------------------------------------------------------------
# Training on slices along several axes (hooks used by volgen.training)


def layout_with_axes(layout: ConditionLayout | None, axes: Sequence[str]) -> ConditionLayout | None:
    """The model's layout, extended by the slice axes it is trained on (a one-hot when there are several)."""
    if len(axes) <= 1:
        return layout
    base = layout if layout is not None else ConditionLayout(specified_flags=False)
    return base.model_copy(update={"axes": tuple(axis_code(a) for a in axes)})


def prepare_case_axes(
    case,
    *,
    label_map,
    intensity,
    slice_size: int,
    axes: Sequence[str],
    unknown_labels: str = "error",
) -> list:
    """One training pair in the cube frame, as one :class:`volgen.data.PreparedVolume` per slice axis.

    The same reading, geometry check and label remapping as :func:`volgen.data.prepare_case`; the frame is the
    isotropic cube (:func:`to_cube_frame`) so that slices along every axis have the same pixel. Each volume's
    ``case`` is ``"<case>:<axis>"``.
    """
    from volgen.data import PreparedVolume, read_case

    image, class_image = read_case(case, label_map, unknown_labels)
    frame = to_cube_frame(class_image, image, slice_size=slice_size)
    model_space, window = intensity.image_to_model(image, frame.image)
    return [
        PreparedVolume(
            case=f"{case.case}:{axis}",
            image=volume_to_slices(model_space, axis).contiguous(),
            labels=volume_to_slices(frame.labels, axis).contiguous(),
            window=window,
        )
        for axis in axes
    ]


class MultiAxisSliceDataset(torch.utils.data.Dataset):
    """:class:`volgen.data.SliceDataset` over volumes sliced along different axes; items carry ``axis``.

    ``axis`` is the code (0 axial, 1 coronal, 2 sagittal) of the volume the slice came from, for
    :func:`volgen.denoiser.per_sample_condition_vector`.
    """

    def __init__(self, volumes: Sequence, axes: Sequence[int], context_slices: int, padding: str) -> None:
        from volgen.data import SliceDataset

        if len(volumes) != len(axes):
            raise ValueError("one axis per volume")
        self.slices = SliceDataset(volumes, context_slices, padding=padding)
        self.axes = list(axes)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Tensor]:
        i = item[0] if isinstance(item, tuple) else item
        sample = self.slices[item]
        sample["axis"] = torch.tensor(self.axes[self.slices.index[i][0]])
        return sample

    def sampling_weights(self, foreground_weight: float) -> Tensor:
        return self.slices.sampling_weights(foreground_weight)
