"""Speed against the reference way: the same UNet sampling a volume three ways, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/speed.py                       # small (64 px) and paper (256 px)
    python benchmarks/speed.py --presets small --small-slices 91 --out runs/bench-speed.json

(a) ``ref-ddim50``: one slice at a time, DDIM 50 steps, fp32 - how the reference implementation
    (mazurowski-lab/segmentation-guided-diffusion) samples: a loop over images, a loop over timesteps, one
    UNet call per image and step, ``scheduler.step`` per image;
(b) ``ref-ddpm1000``: the same loop with DDPM 1000 steps;
(c) ``volgen``: volgen's pipeline with its defaults: all slices of the volume in chunks of
    ``slice_batch_size`` 16 (on the CPU each chunk runs as UNet forwards of exactly ``BATCH_GRANULE`` = 8
    slices, for batch-size-independent results), DPM-Solver++ 20 steps, correlated noise ρ = 0.9, fp32.

All three use the same UNet (random weights of the preset; speed does not depend on the weights), the
same conditioning (Colin27 label map: 4 foreground classes, onehot, 2.5D context 1 -> 12 channels) and the
same label volume: the Colin27 tissue segmentation in the slicing frame (``small``: the 2 mm example, all 91
axial slices at 64 px; ``paper``: the middle ``--paper-slices`` axial slices of the 1 mm segmentation at
256 px).

Where a full run would take too long, a mode runs a measured subset (some slices x some steps, after one
warm-up forward) and the seconds per volume are extrapolated linearly (the cost per slice-step is constant in
these loops); the table says which rows are extrapolated and from what.

On a CPU shared with other work, wall-clock time depends on what else runs; the process's CPU time
(``time.process_time``) does not (much), so ratios and slices·steps/s are computed from CPU seconds, with
one thread (``OMP_NUM_THREADS=1``). Wall seconds are reported too. slices·steps/s = slices x steps / CPU
seconds per volume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from volgen.conditioning import condition_slices
from volgen.frames import to_slice_frame
from volgen.io import read_label
from volgen.labels import load_label_map
from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet
from volgen.pipeline import build_pipeline
from volgen.schedulers import make_scheduler

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_2MM = ROOT / "examples" / "colin27_tissues_2mm.nii.gz"
LABELS_1MM = ROOT / "data" / "colin27" / "labels" / "colin27.nii.gz"
PRESET_SIZE = {"tiny": 16, "small": 64, "paper": 256}


def machine() -> dict:
    """CPU model, thread counts, torch version and (on CUDA) the GPU name."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def bench_model(preset: str, *, context_slices: int = 1, seed: int = 0):
    """A randomly initialised UNet of ``preset`` with the Colin27 conditioning, its metadata and schedule."""
    size = PRESET_SIZE[preset]
    meta = ModelMetadata(
        name=f"bench-{preset}",
        label_map=load_label_map("colin27"),
        slice_size=size,
        context_slices=context_slices,
    )
    torch.manual_seed(seed)
    unet = build_unet(UNetConfig.preset(preset), meta).eval()
    return unet, meta, build_training_scheduler()


def frame_labels(size: int, slices: int | None = None, source: Path = EXAMPLE_2MM) -> torch.Tensor:
    """Colin27 class indices in the axial slicing frame, ``(Z, size, size)``: the middle ``slices`` if given
    (the volume is repeated along z when it has fewer)."""
    image = read_label(source)
    classes = load_label_map("colin27").remap(sitk.GetArrayViewFromImage(image))
    class_image = sitk.GetImageFromArray(classes)
    class_image.CopyInformation(image)
    labels = to_slice_frame(class_image, slice_size=size, slice_axis="axial").labels.long()
    if slices is not None:
        if slices > labels.shape[0]:
            reps = -(-slices // labels.shape[0])
            labels = labels.repeat(reps, 1, 1)
        start = (labels.shape[0] - slices) // 2
        labels = labels[start : start + slices]
    return labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reference_loop(
    unet,
    meta: ModelMetadata,
    schedule,
    labels: torch.Tensor,
    *,
    scheduler: str,
    steps: int,
    measure_slices: int,
    measure_steps: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """One slice at a time (the reference implementation's way); time a subset, extrapolate to the volume."""
    z = labels.shape[0]
    measure_slices = min(measure_slices, z)
    measure_steps = min(measure_steps, steps)
    sched = make_scheduler(scheduler, schedule.config)
    sched.set_timesteps(steps, device=device)
    timesteps = sched.timesteps[:measure_steps]
    labels = labels.to(device)
    generator = torch.Generator().manual_seed(0)
    use_autocast = autocast_dtype is not None and device.type == "cuda"

    def cond(index: int) -> torch.Tensor:
        return condition_slices(
            labels,
            [index],
            num_classes=meta.num_classes,
            encoding=meta.encoding,
            context_slices=meta.context_slices,
        )

    size = labels.shape[-1]
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):  # warm-up forward
        unet(torch.cat([torch.zeros(1, 1, size, size, device=device), cond(0)], 1), timesteps[0])
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for index in range(measure_slices):
        x = torch.randn((1, 1, size, size), generator=generator).to(device) * sched.init_noise_sigma
        c = cond(index)
        for t in timesteps:
            model_input = torch.cat([sched.scale_model_input(x, t), c], dim=1)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                eps = unet(model_input, t).sample.float()
            x = sched.step(eps, t, x).prev_sample
    sync(device)
    measured, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    scale = z * steps / (measure_slices * measure_steps)
    full = measure_slices == z and measure_steps == steps
    return {
        "steps": steps,
        "slices": z,
        "measured": f"{measure_slices} slice(s) x {measure_steps} step(s)",
        "extrapolated": not full,
        "measured_seconds": measured,
        "seconds_per_volume": measured * scale,
        "cpu_seconds_per_volume": cpu * scale,
    }


def volgen_pipeline(
    unet,
    meta: ModelMetadata,
    schedule,
    labels: torch.Tensor,
    *,
    steps: int = 20,
    measure_steps: int | None = None,
    scheduler: str = "dpmsolver++",
    slice_batch_size: int = 16,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    warmup: bool = True,
) -> dict:
    """volgen's pipeline on the whole volume; ``measure_steps < steps`` runs that many and extrapolates."""
    pipe = build_pipeline(unet, schedule, meta, scheduler_name=scheduler)
    measure_steps = min(measure_steps or steps, steps)
    labels = labels.to(device)
    kwargs = {
        "slice_batch_size": slice_batch_size,
        "noise_correlation": 0.9,
        "autocast_dtype": autocast_dtype,
        "seed": 0,
    }
    if warmup:  # one forward of one chunk: oneDNN / cuDNN set-up, torch.compile
        pipe(labels[:slice_batch_size], num_inference_steps=1, **kwargs)
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    pipe(labels, num_inference_steps=measure_steps, **kwargs)
    sync(device)
    measured, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    z = labels.shape[0]
    return {
        "steps": steps,
        "slices": z,
        "measured": f"{z} slices x {measure_steps} step(s)",
        "extrapolated": measure_steps != steps,
        "measured_seconds": measured,
        "seconds_per_volume": measured * steps / measure_steps,
        "cpu_seconds_per_volume": cpu * steps / measure_steps,
    }


def add_rates(rows: list[dict], baseline: str = "volgen", key: str = "seconds_per_volume") -> None:
    """slices·steps per second and the ratio of each row's seconds (``key``) to the baseline row's."""
    base = next(r for r in rows if r["mode"] == baseline)[key]
    for r in rows:
        r["slice_steps_per_second"] = r["slices"] * r["steps"] / r[key]
        r["times_volgen"] = r[key] / base
        r["ratio_basis"] = key


def markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | volume (slices x px²) | mode | steps | CPU s / volume | wall s / volume | x volgen "
        "| slices·steps per CPU s | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        how = r["measured"] + (", extrapolated" if r["extrapolated"] else ", full run")
        lines.append(
            f"| {r['preset']} | {r['slices']} x {r['size']}² | {r['mode']} | {r['steps']} | "
            f"{r['cpu_seconds_per_volume']:.1f} | {r['seconds_per_volume']:.1f} | {r['times_volgen']:.1f} | "
            f"{r['slice_steps_per_second']:.2f} | {how} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["small", "paper"], choices=sorted(PRESET_SIZE))
    parser.add_argument("--small-slices", type=int, default=91, help="slices of the small/tiny volume")
    parser.add_argument("--paper-slices", type=int, default=8, help="slices of the paper (256 px) volume")
    parser.add_argument(
        "--paper-steps",
        type=int,
        default=1,
        help="paper preset: volgen steps measured (of 20); 20 = full run",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-speed.json")
    args = parser.parse_args()

    device = torch.device("cpu")
    rows = []
    for preset in args.presets:
        unet, meta, schedule = bench_model(preset)
        size = meta.slice_size
        paper = preset == "paper"
        if paper:
            source = LABELS_1MM if LABELS_1MM.exists() else EXAMPLE_2MM
            labels = frame_labels(size, args.paper_slices, source)
        else:
            labels = frame_labels(size, args.small_slices)
        print(f"{preset}: {labels.shape[0]} slices of {size} px", flush=True)
        # (slices, steps) measured per mode: everything where it is quick, a subset where it is not
        plan = {
            "ref-ddim50": ("ddim", 50, (1, 2) if paper else (2, 50)),
            "ref-ddpm1000": ("ddpm", 1000, (1, 2) if paper else (2, 25)),
        }
        group = []
        result = volgen_pipeline(
            unet, meta, schedule, labels, measure_steps=args.paper_steps if paper else None, device=device
        )
        group.append({"mode": "volgen", "scheduler": "dpmsolver++ (slice_batch_size 16)", **result})
        print(json.dumps(group[-1]), flush=True)
        for mode, (scheduler, steps, (n_slices, n_steps)) in plan.items():
            result = reference_loop(
                unet,
                meta,
                schedule,
                labels,
                scheduler=scheduler,
                steps=steps,
                measure_slices=n_slices,
                measure_steps=n_steps,
                device=device,
            )
            group.append({"mode": mode, "scheduler": scheduler, **result})
            print(json.dumps(group[-1]), flush=True)
        add_rates(group, key="cpu_seconds_per_volume")
        for r in group:
            r.update(preset=preset, size=size)
        rows.extend(group)

    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"\nmachine: {info}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
