"""Memory against volume size: peak RSS (and peak CUDA memory) of ``volgen.api.generate`` per slice count.

    OMP_NUM_THREADS=1 python benchmarks/memory.py
    python benchmarks/memory.py --slices 64 128 256 512 --steps 2 --model volgen/default_model/colin27-small

Each size runs in a fresh Python process (so peaks do not carry over): it builds the model (``--model``, or
a randomly initialised ``small`` preset with the Colin27 label map when none is given; memory does not depend
on the weights), writes a synthetic Colin27-like label volume of 64 x 64 x N voxels (1 mm, axial, classes 0-4
in nested shells), records its RSS, then runs ``generate`` (DPM-Solver++, ``--steps`` steps, slice batch 16)
and records the peak RSS (``resource.getrusage(...).ru_maxrss``). The generation's own memory is the peak
minus the RSS before it. A straight line through (slices, peak) gives the bytes per slice, compared with what
volgen's memory estimate (:func:`volgen.api.estimate_memory`) counts for the volume arrays: 8 float32 copies
of each 64 x 64 frame slice (noisy volume, model output, scheduler history, noise, ...) plus 4 float32 copies
on the input grid (labels, resampled output, physical copy) = 12 x 4 B x 4096 = 192 KiB per slice. Flat apart
from the volume arrays means: slope close to that, and the intercept (model, one chunk's activations) not
growing. On CUDA the child also reports ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def synthetic_labels(slices: int, size: int = 64):
    """``size x size x slices`` voxels (1 mm): nested shells 1..4 of a cylinder whose radius varies with z."""
    import SimpleITK as sitk

    z, y, x = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    radius = np.hypot(x - size / 2 + 0.5, y - size / 2 + 0.5)
    outer = size * (0.38 + 0.06 * np.sin(z / 7.0))
    labels = np.zeros(radius.shape, dtype=np.uint8)
    for value, fraction in ((1, 1.0), (2, 0.85), (3, 0.75), (4, 0.55)):
        labels[radius < outer * fraction] = value
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.0, 1.0, 1.0))
    return image


def child(slices: int, steps: int, model: Path | None) -> dict:
    import torch

    from volgen.api import GenerateSettings, generate
    from volgen.io import write_volume

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from speed import bench_model

            from volgen.models import save_model

            unet, meta, schedule = bench_model("small")
            model = save_model(Path(tmp) / "model", unet, schedule, meta)
            del unet
        seg = Path(tmp) / "seg.nii.gz"
        write_volume(synthetic_labels(slices), seg)
        import gc

        gc.collect()
        before_rss, before_peak = rss_bytes(), peak_rss_bytes()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        generate(
            seg,
            Path(tmp) / "out.nii.gz",
            model=model,
            device=device,
            settings=GenerateSettings(num_inference_steps=steps, seed=0),
        )
        seconds = time.perf_counter() - started
        result = {
            "slices": slices,
            "steps": steps,
            "device": device,
            "rss_before": before_rss,
            "peak_before": before_peak,
            "peak_after": peak_rss_bytes(),
            "seconds": seconds,
        }
        if device == "cuda":
            result["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--model", type=Path, default=None, help="a model folder (64 px); default: random small"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-memory.json")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.model)))
        return

    rows = []
    for n in args.slices:
        command = [sys.executable, __file__, "--child", str(n), "--steps", str(args.steps)]
        if args.model is not None:
            command += ["--model", str(args.model)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if done.returncode != 0:
            sys.exit(f"child for {n} slices failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)

    mib = 2**20
    n = np.array([r["slices"] for r in rows], dtype=np.float64)
    peak = np.array([r["peak_after"] for r in rows], dtype=np.float64)
    growth = np.array([r["peak_after"] - r["rss_before"] for r in rows], dtype=np.float64)
    slope, intercept = np.polyfit(n, peak, 1) if len(rows) > 1 else (float("nan"), float("nan"))
    growth_slope = np.polyfit(n, growth, 1)[0] if len(rows) > 1 else float("nan")
    expected = 12 * 4 * 64 * 64
    summary = {
        "slope_bytes_per_slice": slope,
        "generation_slope_bytes_per_slice": growth_slope,
        "intercept_bytes": intercept,
        "expected_array_bytes_per_slice": expected,
    }
    if rows and "cuda_max_allocated" in rows[0]:
        cuda = np.array([r["cuda_max_allocated"] for r in rows], dtype=np.float64)
        summary["cuda_slope_bytes_per_slice"] = np.polyfit(n, cuda, 1)[0] if len(rows) > 1 else float("nan")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import machine

    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "rows": rows, "summary": summary}, indent=2))
    print(f"\nmachine: {info}\n")
    cuda = "cuda_max_allocated" in rows[0]
    header = "| slices (64 x 64 px) | RSS before generate (MiB) | peak RSS (MiB) | generate's growth (MiB) |"
    print(header + (" CUDA max allocated (MiB) |" if cuda else "") + " seconds |")
    print("|---|---|---|---|" + ("---|" if cuda else "") + "---|")
    for r in rows:
        line = (
            f"| {r['slices']} | {r['rss_before'] / mib:.0f} | {r['peak_after'] / mib:.0f} | "
            f"{(r['peak_after'] - r['rss_before']) / mib:.0f} |"
        )
        if cuda:
            line += f" {r['cuda_max_allocated'] / mib:.0f} |"
        print(line + f" {r['seconds']:.1f} |")
    print(
        f"\npeak RSS slope: {slope / 1024:.0f} KiB per slice (generate's growth: "
        f"{growth_slope / 1024:.0f} KiB per slice); the volume arrays account for "
        f"{expected / 1024:.0f} KiB per slice; intercept "
        f"{intercept / mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
