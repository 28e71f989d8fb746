"""The dry run: what a batch run would do, how long it would take and how much memory it would need.

Nothing is written and no voxel data is read: each segmentation's grid comes from its header
(:func:`volgen.io.read_header`). The peak memory of an item is the process as it stands (its resident size
after loading the model and timing one UNet forward: Python, PyTorch, the weights) plus what generating that
volume adds (:func:`volgen.api.estimate_memory`) plus a fixed allowance for the libraries a real run loads
on the way (writers, DICOM), so that a cluster memory request based on it is not too small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from volgen.batch.plan import BatchPlan, WorkItem
from volgen.batch.resume import unfinished_reason
from volgen.errors import VolgenError
from volgen.generation.generator import slices_along
from volgen.memory import plane_pixels

if TYPE_CHECKING:
    from volgen.generation import GenerateSettings, VolumeGenerator
    from volgen.io.geometry import Geometry

#: Memory a real run needs beyond the dry run's process and the volume's arrays (libraries it loads to
#: write outputs, allocator slack), in bytes.
RUN_ALLOWANCE = 256 * 2**20


def one_line(exc: BaseException) -> str:
    """An exception as one line (for manifests and plan states)."""
    text = str(exc) if isinstance(exc, VolgenError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def process_baseline() -> int:
    """Resident memory of this process now (bytes): what every item's peak starts from."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class TimeModel:
    """Seconds per item ≈ ``overhead + slice_forwards × seconds per slice-forward``; ``how`` says how.

    ``seconds_per_slice_forward`` is for the model's own slice size. A native-resolution model's slices are
    the segmentation's own size, and a UNet's time does not grow with the pixels alone (attention grows with
    their square; small slices use the CPU less well): such sizes are timed when first asked for
    (``measure_plane``) and kept in ``per_plane``.
    """

    seconds_per_slice_forward: float
    overhead_seconds: float
    seconds_per_input_voxel: float
    how: str
    per_plane: dict[tuple[int, int], float] = field(default_factory=dict)
    measure_plane: Callable[[tuple[int, int]], float] | None = field(default=None, repr=False)

    def seconds_per_forward(self, plane: int | tuple[int, int] | None = None) -> float:
        """Seconds per slice-forward of a slice of ``plane`` (``None``: the model's own size)."""
        if plane is None or self.measure_plane is None:
            return self.seconds_per_slice_forward
        key = (plane, plane) if isinstance(plane, int) else (int(plane[0]), int(plane[1]))
        if key not in self.per_plane:
            self.per_plane[key] = self.measure_plane(key)
            self.how += f"; measured at {key[0]}x{key[1]}: {self.per_plane[key] * 1000:.1f} ms per slice"
        return self.per_plane[key]

    def seconds(self, forwards: int, input_voxels: int, plane: int | tuple[int, int] | None = None) -> float:
        return (
            self.overhead_seconds
            + input_voxels * self.seconds_per_input_voxel
            + forwards * self.seconds_per_forward(plane)
        )


@dataclass
class ItemEstimate:
    """A dry-run line: the item, its slices, the denoising steps that run (λ < 1 runs fewer than asked),
    UNet passes per step (2 when guided) and slice-forwards, estimated time and peak memory, and state."""

    item: WorkItem
    state: str
    slices: int | None = None
    forwards: int | None = None
    seconds: float | None = None
    peak_bytes: int | None = None
    steps: int | None = None
    passes: int | None = None


@dataclass
class GenerationEstimate:
    """What generating one volume of a grid costs: slices, denoising steps run, UNet passes per step,
    slice-forwards (its share of the volumes generated together), seconds and peak memory (bytes)."""

    slices: int
    steps: int
    passes: int
    forwards: int
    seconds: float
    peak_bytes: int


def estimate_generation(
    generator: VolumeGenerator,
    grid: Geometry,
    settings: GenerateSettings,
    time_model: TimeModel,
    *,
    volumes: int = 1,
    max_memory: int | None = None,
    baseline: int | None = None,
) -> GenerationEstimate:
    """Estimate one volume of ``grid`` when ``volumes`` volumes of it are to be generated (together, as
    many at a time as fit in ``max_memory``), asking the generator (memory, slice-forwards) and its
    pipeline (the steps λ leaves, guidance). ``volgen generate --dry-run`` and :func:`estimate_plan` use it.

    Peak memory is ``baseline`` (default: this process now, :func:`process_baseline`, plus
    :data:`RUN_ALLOWANCE`) plus what the volumes add.
    """
    import numpy as np

    if baseline is None:
        baseline = process_baseline() + RUN_ALLOWANCE
    together = generator.volumes_together(grid, settings, max(1, volumes), max_memory)
    plan = generator.plan(grid, settings, volumes=together, max_memory=max_memory)  # the run, resolved once
    forwards = math.ceil(plan.forwards / together)
    voxels = int(np.prod(grid.size, dtype=np.int64))
    # a native frame's slices are their own size, timed at that size (the time model knows which it times)
    seconds = time_model.seconds(forwards, voxels, generator.frame.plane(grid))
    return GenerationEstimate(
        slices=slices_along(grid, generator.metadata.slice_axis),
        steps=plan.steps,
        passes=max(plan.passes, default=1),
        forwards=forwards,
        seconds=seconds,
        peak_bytes=baseline
        + generator.memory_needed(grid, settings, volumes=together, max_memory=max_memory),
    )


def _time_forward(generator: VolumeGenerator, batch: int, plane: tuple[int, int]) -> float:
    """Seconds per slice of one UNet forward of ``batch`` slices of ``plane`` after one warm-up forward, on
    the generator's device, through its denoiser (its precision and memory layout)."""
    import torch

    dev = generator.device
    unet = generator.pipeline.unet
    out_channels = unet.config.out_channels
    x = torch.zeros(batch, out_channels, *plane, device=dev)
    condition = torch.zeros(batch, unet.config.in_channels - out_channels, *plane, device=dev)
    t = torch.tensor(500, device=dev)
    denoiser = generator.pipeline.denoiser(generator.autocast_dtype)
    with torch.no_grad():
        denoiser.run(x, t, condition)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        begin = time.perf_counter()
        denoiser.run(x, t, condition)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return (time.perf_counter() - begin) / batch


def measure_time_model(generator: VolumeGenerator, *, slice_batch_size: int | str) -> TimeModel:
    """Time one UNet forward of a padded chunk of ``slice_batch_size`` slices (``auto``: the chunk it chooses
    for a long run now) after one warm-up forward, on the generator's device, through its denoiser (its
    precision and memory layout: bf16 channels-last on a CPU with native bf16). A native-resolution model's
    slice sizes are timed as they come up (one forward of :data:`~volgen.pipeline.BATCH_GRANULE` slices,
    one for slices over 128 x 128, after a warm-up).

    I/O and resampling are an assumed 1 s per item plus 0.1 µs per input voxel.
    """
    from volgen import defaults
    from volgen.pipeline import BATCH_GRANULE

    size = generator.metadata.slice_size
    sbs = generator.pipeline.resolve_slice_batch_size(slice_batch_size, defaults.AUTO_SLICE_BATCH_GPU)
    batch = sbs + (-sbs % BATCH_GRANULE)
    per_slice = _time_forward(generator, batch, (size, size))
    how = (
        f"measured: one UNet forward of {batch} slices of {size}x{size} on {generator.device} "
        f"({generator.precision}) took {per_slice * 1000:.2f} ms per slice; assumed: 1 s + 0.1 µs per input "
        "voxel for I/O and resampling"
    )

    def measure_plane(plane: tuple[int, int]) -> float:
        big = plane_pixels(plane) > 128 * 128
        return _time_forward(generator, 1 if big else BATCH_GRANULE, plane)

    native = generator.metadata.pixel_spacing is not None
    return TimeModel(
        seconds_per_slice_forward=per_slice,
        overhead_seconds=1.0,
        seconds_per_input_voxel=1e-7,
        how=how,
        measure_plane=measure_plane if native else None,
    )


def estimate_plan(
    plan: BatchPlan,
    generator: VolumeGenerator,
    time_model: TimeModel,
    items: Sequence[WorkItem] | None = None,
) -> list[ItemEstimate]:
    """Dry run: read each segmentation's header (nothing is written, no voxel data read) and estimate time
    and peak memory per item, asking the generator (its memory estimate and slice-forward count).

    Peak memory is this process's resident size now (:func:`process_baseline`, with the model loaded) plus
    what the item adds (:meth:`volgen.generation.VolumeGenerator.memory_needed`) plus :data:`RUN_ALLOWANCE`.
    The samples of a case that a run would generate are generated together, as many at a time as fit
    (:meth:`~volgen.generation.VolumeGenerator.volumes_together`): each of them shows the peak of its group
    and its share of the group's slice-forwards. The state says whether the item would be skipped
    (complete), generated, or fails on what its header shows.
    """
    from volgen import io

    baseline = process_baseline() + RUN_ALLOWANCE
    cache: dict[Path, Geometry | str] = {}
    weights = generator.model.weights_sha256
    fmt = plan.options.output_format
    chosen = list(items if items is not None else plan.items)
    reasons = {id(it): unfinished_reason(it, weights_sha256=weights, output_format=fmt) for it in chosen}
    to_do: dict[str, int] = {}  # samples per case a run would generate (together)
    for it in chosen:
        to_do[it.case.id] = to_do.get(it.case.id, 0) + (reasons[id(it)] is not None)
    estimates = []
    for item in chosen:
        seg = item.case.segmentation
        if seg not in cache:
            try:
                cache[seg] = io.read_header(seg)
            except VolgenError as e:
                cache[seg] = one_line(e)
        grid = cache[seg]
        if isinstance(grid, str):
            estimates.append(ItemEstimate(item=item, state=f"would fail: {grid}"))
            continue
        reason = reasons[id(item)]
        state = (
            "complete (skip)" if reason is None else ("to do" if reason == "no output" else f"redo: {reason}")
        )
        cost = estimate_generation(
            generator,
            grid,
            item.settings,
            time_model,
            volumes=to_do[item.case.id],
            max_memory=plan.options.max_memory,
            baseline=baseline,
        )
        estimates.append(
            ItemEstimate(
                item=item,
                state=state,
                slices=cost.slices,
                forwards=cost.forwards,
                seconds=0.0 if reason is None else cost.seconds,
                peak_bytes=cost.peak_bytes,
                steps=cost.steps,
                passes=cost.passes,
            )
        )
    return estimates


def total_seconds(estimates: Iterable[ItemEstimate]) -> float:
    return math.fsum(e.seconds or 0.0 for e in estimates)
