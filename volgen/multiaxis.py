"""Multi-axis models and sampling: every plane of the volume is seen by a denoiser.

A slice model run along one axis makes volumes whose reslices it never looked at (streaks with correlated
noise, flicker without). A multi-axis model is trained on slices along several axes (its
:class:`~volgen.conditioning.ConditionLayout` lists them and the condition vector ends with a one-hot of the
current axis), and multi-axis sampling changes the slicing axis from step to step (``axial, coronal,
sagittal, axial, ...``): every step is one pass of the UNet over the slices along that step's axis, so the
number of UNet evaluations per step is the number of slices along one axis, as for single-axis sampling.
Correlated initial noise (ρ along the first axis of the schedule) combines with it.

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

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torch import Tensor

from volgen.conditioning import ConditionLayout, condition_vector
from volgen.errors import VolgenError
from volgen.frames import resample_to_grid, sitk_to_torchio, slices_to_volume, volume_to_slices

logger = logging.getLogger(__name__)

#: Axis codes of :class:`~volgen.conditioning.ConditionLayout` (0, 1, 2) by name.
AXIS_NAMES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
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


def model_axes(layout: ConditionLayout | None, slice_axis: str) -> tuple[str, ...]:
    """The slice axes a model was trained on: its layout's axes, else its one ``slice_axis``."""
    if layout is not None and len(layout.axes) > 1:
        return tuple(AXIS_NAMES[a] for a in layout.axes)
    return (slice_axis,)


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


def axis_schedule(axes: Sequence[str], steps: int) -> list[str]:
    """The slicing axis of each denoising step: ``axes`` cycled (``a, b, c, a, b, c, ...``)."""
    if not axes:
        raise VolgenError("multi-axis sampling needs at least one axis")
    return [axes[i % len(axes)] for i in range(steps)]


def per_sample_condition_vector(
    specified: Tensor, axes: Tensor | None, layout: ConditionLayout | None
) -> Tensor | None:
    """The condition vector for a batch whose samples come from different slice axes.

    Args:
        specified: ``(B, C-1)`` "specified" flags.
        axes: ``(B,)`` axis codes (0 axial, 1 coronal, 2 sagittal), or ``None`` for single-axis data.
        layout: The model's layout; with several ``axes`` the vector ends with the one-hot of each sample's.
    """
    if layout is None or len(layout.axes) <= 1 or axes is None:
        return condition_vector(specified, layout=layout)
    parts = [condition_vector(specified[axes == a], axis=a, layout=layout) for a in layout.axes]
    out = torch.empty(specified.shape[0], layout.dim(specified.shape[1] + 1))
    for a, part in zip(layout.axes, parts, strict=True):
        if part is not None and part.shape[0]:
            out[axes.cpu() == a] = part.cpu()
    return out


def _predict(
    pipe,
    slices: Tensor,
    labels: Tensor,
    t: Tensor,
    *,
    axis: str,
    removed: Tensor | None,
    slice_batch_size: int,
    on_chunk: Callable[[int], None] | None,
) -> Tensor:
    """The UNet output for noisy slices ``(N, 1, H, W)`` along ``axis`` and their labels ``(N, H, W)``:
    the pipeline's chunked forward (:meth:`~volgen.pipeline.SegmentationToVolumePipeline.predict_noise`) with
    the axis in a multi-axis model's condition vector."""
    layout = pipe.condition_layout
    several = layout is not None and len(layout.axes) > 1
    return pipe.predict_noise(
        slices,
        t,
        labels,
        removed=removed,
        slice_batch_size=slice_batch_size,
        on_chunk=on_chunk,
        axis=axis_code(axis) if several else None,
    )


@torch.no_grad()
def sample_multiaxis(
    pipe,
    labels: Tensor,
    *,
    schedule: Sequence[str],
    seed: int = 0,
    scheduler: str = "dpmsolver++",
    slice_batch_size: int = 16,
    noise_correlation: float = 0.0,
    keep: Sequence[int] | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Generate a cube, changing the slicing axis from step to step.

    Args:
        pipe: A :class:`~volgen.pipeline.SegmentationToVolumePipeline` (its UNet, schedule and condition).
        labels: ``(X, Y, Z)`` class indices of a cube (``slice_size`` along every axis), RAS.
        schedule: The slice axis of each step (:func:`axis_schedule`); its length is the number of steps.
        seed: Seed of the CPU generator that draws all noise.
        scheduler: Sampler name (``ddpm``, ``ddim``, ``dpmsolver++``, ``euler``).
        slice_batch_size: Slices per UNet forward; does not change the result.
        noise_correlation: ρ of the initial noise along the schedule's first axis.
        keep: Foreground class indices kept in the condition (``None``: all).
        callback: Called with ``(slices_done, slices_total)`` after every UNet chunk.

    Returns:
        ``(X, Y, Z)`` float32 on the CPU in model space [-1, 1].
    """
    from volgen.conditioning import selection_to_removed
    from volgen.pipeline import correlated_noise, make_scheduler, scheduler_step

    size = pipe.unet.config.sample_size
    if labels.ndim != 3 or tuple(labels.shape) != (size, size, size):
        raise VolgenError(f"labels must be a ({size}, {size}, {size}) cube, got {tuple(labels.shape)}")
    trained = model_axes(pipe.condition_layout, pipe.config.slice_axis)
    unknown = sorted(set(schedule) - set(trained))
    if unknown:
        raise VolgenError(f"the model was trained on {', '.join(trained)} slices, not {', '.join(unknown)}")
    device = pipe.unet.device
    generator = torch.Generator().manual_seed(int(seed))
    removed = None if keep is None else selection_to_removed(keep, pipe.config.num_classes)
    labels = labels.to(device)
    sched = make_scheduler(scheduler, pipe.scheduler.config)
    sched.set_timesteps(len(schedule), device=device)
    first = schedule[0]
    # the state lives as slices along the first axis (the scheduler's per-slice thresholding sees slices)
    noise = correlated_noise((size, 1, size, size), noise_correlation, generator).to(device)
    x = noise * sched.init_noise_sigma
    total, done = len(schedule) * size, 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        if callback is not None:
            callback(done, total)

    for t, axis in zip(sched.timesteps, schedule, strict=True):
        model_input = sched.scale_model_input(x, t)
        volume = slices_to_volume(model_input[:, 0], first)
        slices = volume_to_slices(volume, axis).contiguous()[:, None]
        out = _predict(
            pipe,
            slices,
            volume_to_slices(labels, axis).contiguous(),
            t,
            axis=axis,
            removed=removed,
            slice_batch_size=slice_batch_size,
            on_chunk=count,
        )
        out = volume_to_slices(slices_to_volume(out[:, 0], axis), first).contiguous()[:, None]
        x = scheduler_step(sched, out, t, x, generator)
    return slices_to_volume(x[:, 0].float().clamp(-1.0, 1.0), first).contiguous().cpu()


@dataclass
class MultiAxisResult:
    """A generated volume on the input grid, and how it was made."""

    image: sitk.Image
    axes: tuple[str, ...]
    voxel: float


def generate_multiaxis(
    classes: sitk.Image,
    loaded,
    *,
    axes: Sequence[str] | None = None,
    schedule: Sequence[str] | None = None,
    seed: int = 0,
    num_inference_steps: int = 20,
    scheduler: str = "dpmsolver++",
    noise_correlation: float = 0.0,
    slice_batch_size: int = 16,
    keep: Sequence[int] | None = None,
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    device: torch.device | str = "cpu",
) -> MultiAxisResult:
    """Generate a volume on the exact grid of a class-index image, slicing along several axes in turn.

    Args:
        classes: Class indices (the label map already applied), any orientation and spacing.
        loaded: A :class:`volgen.models.LoadedModel`.
        axes: Axes to cycle through (default: every axis the model was trained on), reduced by
            :func:`usable_axes` for anisotropic input.
        schedule: Instead of cycling, the axis of every step (its length is the number of steps), e.g.
            ``["coronal", "sagittal"] * 9 + ["axial"] * 2``; axes that :func:`usable_axes` rules out are an
            error.
        max_spacing_ratio: See :func:`usable_axes`.

    Returns:
        :class:`MultiAxisResult`: physical intensities (CT: int16 HU) with the input's geometry.
    """
    from volgen.io import Geometry
    from volgen.pipeline import SegmentationToVolumePipeline

    meta = loaded.metadata
    pipe = SegmentationToVolumePipeline(
        unet=loaded.unet.to(device),
        scheduler=loaded.scheduler,
        encoding=meta.encoding,
        context_slices=meta.context_slices,
        num_classes=meta.num_classes,
        slice_axis=meta.slice_axis,
        condition=None if meta.condition is None else meta.condition.model_dump(mode="json"),
    )
    frame = to_cube_frame(classes, slice_size=meta.slice_size)
    wanted = tuple(axes) if axes else model_axes(meta.condition, meta.slice_axis)
    if schedule is not None:
        wanted = tuple(dict.fromkeys(schedule))
    used = usable_axes(frame, wanted, max_ratio=max_spacing_ratio)
    if schedule is not None and len(used) < len(wanted):
        raise VolgenError(
            f"the schedule slices along {', '.join(wanted)}, but this volume's spacing allows only "
            f"{', '.join(used)} (max_spacing_ratio={max_spacing_ratio})"
        )
    cube = sample_multiaxis(
        pipe,
        frame.labels.long(),
        schedule=list(schedule) if schedule is not None else axis_schedule(used, num_inference_steps),
        seed=seed,
        scheduler=scheduler,
        slice_batch_size=slice_batch_size,
        noise_correlation=noise_correlation,
        keep=keep,
    )
    physical = meta.intensity.from_model(cube.numpy()).astype(np.float32)
    background = float(physical.min()) if physical.size else 0.0
    image = resample_to_grid(frame.to_sitk(physical), classes, default=background)
    if meta.intensity.modality == "CT":
        image = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
    Geometry.of(classes).apply(image)
    return MultiAxisResult(image=image, axes=used, voxel=frame.voxel)


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
    window = intensity.window(sitk.GetArrayViewFromImage(image))
    frame = to_cube_frame(class_image, image, slice_size=slice_size)
    assert frame.image is not None
    model_space = torch.from_numpy(intensity.to_model(frame.image.numpy(), window))
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
    :func:`per_sample_condition_vector`.
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
