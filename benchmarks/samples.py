"""N samples of one segmentation: generated together (``--samples N``) against N separate generations.

    OMP_NUM_THREADS=1 python benchmarks/samples.py                    # N = 4, embedded model, 10 steps
    python benchmarks/samples.py --samples 4 --slices 20 --no-cli --out runs/bench-samples.json

The segmentation is the Colin27 2 mm example (``examples/colin27_tissues_2mm.nii.gz``), cropped to its middle
``--slices`` axial slices (default 20: not a multiple of the 8-slice granule, as most volumes are not); the
model is the embedded default (64 px, DPM-Solver++ ``--steps`` steps, ``--slice-batch-size auto``). Modes:

(a) ``api separate``: one :class:`volgen.api.VolumeGenerator` (model loaded once), N ``generate`` calls with
    seeds 0..N-1;
(b) ``api together``: the same generator, one ``generate_samples(samples=N)`` call (every UNet forward
    serves all N volumes); its volumes are checked to be bitwise those of (a);
(c) ``cli separate``: N ``volgen generate --seed k`` processes (what a user scripting a loop runs);
(d) ``cli together``: one ``volgen generate --samples N`` process.

(a) and (b) time with the process's CPU time (``time.process_time``, one thread; the machine is shared), and
report UNet slice-forwards (chunks padded to 8 slices). (c) and (d) are wall time of whole processes
(start-up, imports, model load, reading and writing included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "colin27_tissues_2mm.nii.gz"


def crop(slices: int, folder: Path) -> Path:
    """The middle ``slices`` axial slices of the example segmentation, written to ``folder``."""
    image = sitk.ReadImage(str(EXAMPLE))
    z = image.GetSize()[2]
    start = max(0, (z - slices) // 2)
    part = image[:, :, start : start + slices]
    path = folder / f"colin27_{slices}.nii.gz"
    sitk.WriteImage(part, str(path))
    return path


def api_modes(seg_path: Path, samples: int, steps: int) -> dict:
    from volgen.api import GenerateSettings, VolumeGenerator
    from volgen.io import read_label

    generator = VolumeGenerator(device="cpu")
    seg = read_label(seg_path)
    settings = GenerateSettings(num_inference_steps=steps, seed=0)
    generator.generate(seg, settings=GenerateSettings(num_inference_steps=1))  # warm-up
    begin_cpu, begin = time.process_time(), time.perf_counter()
    separate = [
        generator.generate(seg, settings=GenerateSettings(num_inference_steps=steps, seed=k))
        for k in range(samples)
    ]
    separate_cpu, separate_wall = time.process_time() - begin_cpu, time.perf_counter() - begin
    begin_cpu, begin = time.process_time(), time.perf_counter()
    together = generator.generate_samples(seg, settings=settings, samples=samples)
    together_cpu, together_wall = time.process_time() - begin_cpu, time.perf_counter() - begin
    identical = all(
        np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))
        for a, b in zip(separate, together, strict=True)
    )
    return {
        "api separate": {
            "cpu_s": separate_cpu,
            "wall_s": separate_wall,
            "slice_forwards": samples * generator.slice_forwards(seg, settings),
        },
        "api together": {
            "cpu_s": together_cpu,
            "wall_s": together_wall,
            "slice_forwards": generator.slice_forwards(seg, settings, volumes=samples),
        },
        "identical": identical,
    }


def cli_modes(seg_path: Path, samples: int, steps: int, folder: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base = [sys.executable, "-m", "volgen", "generate", str(seg_path), "--steps", str(steps)]
    base += ["--device", "cpu", "--progress", "none"]
    begin = time.perf_counter()
    for k in range(samples):
        out = folder / f"separate_{k}.nii.gz"
        subprocess.run(
            [*base, "-o", str(out), "--seed", str(k)], check=True, env=env, stdout=subprocess.DEVNULL
        )
    separate = time.perf_counter() - begin
    begin = time.perf_counter()
    together_out = folder / "together.nii.gz"
    command = [*base, "-o", str(together_out), "--seed", "0", "--samples", str(samples)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    together = time.perf_counter() - begin
    identical = all(
        np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"separate_{k}.nii.gz"))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"together_s{k}.nii.gz"))),
        )
        for k in range(samples)
    )
    return {
        "cli separate": {"wall_s": separate},
        "cli together": {"wall_s": together},
        "cli_identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line modes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="volgen-samples-bench-") as tmp:
        folder = Path(tmp)
        seg_path = crop(args.slices, folder)
        result = {
            "samples": args.samples,
            "slices": args.slices,
            "steps": args.steps,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            **api_modes(seg_path, args.samples, args.steps),
        }
        if not args.no_cli:
            result.update(cli_modes(seg_path, args.samples, args.steps, folder))
    print(f"{args.samples} samples of a {args.slices}-slice volume, {args.steps} steps:")
    for mode in ("api separate", "api together", "cli separate", "cli together"):
        if mode in result:
            row = result[mode]
            cpu = f"{row['cpu_s']:.1f} CPU s, " if "cpu_s" in row else ""
            forwards = f", {row['slice_forwards']} slice-forwards" if "slice_forwards" in row else ""
            print(f"  {mode:13s} {cpu}{row['wall_s']:.1f} wall s{forwards}")
    print(f"  bitwise identical: api {result['identical']}, cli {result.get('cli_identical', '-')}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
