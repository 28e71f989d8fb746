"""Batch conversion throughput: volumes per hour with 1 process and with 2 (torchrun, gloo on CPU).

    python benchmarks/batch_throughput.py --cases 8 --steps 20

Makes --cases synthetic segmentations (64 x 64 x 40 voxels, 3 classes, anisotropic oblique geometry) and an
untrained `tiny`-preset model (the UNet's cost is what matters for throughput, not its weights), then runs
`volgen batch` once in one process and once under `torchrun --nproc_per_node 2`, each process with one
thread, and reports volumes per hour from wall time. Outputs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from volgen.io import write_volume
from volgen.labels import LabelMap
from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet, save_model


def make_inputs(folder: Path, cases: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(cases):
        z, y, x = np.meshgrid(*(np.arange(n) for n in (40, 64, 64)), indexing="ij")
        r = rng.uniform(12, 20)
        labels = ((x - 32) ** 2 + (y - 32) ** 2 + ((z - 20) * 1.5) ** 2 < r**2).astype(np.uint8)
        labels[(labels == 1) & (x > 32)] = 2
        labels[(labels == 0) & (z < 8)] = 3
        image = sitk.GetImageFromArray(labels)
        image.SetSpacing((0.9, 0.9, 2.5))
        image.SetDirection((0.96, -0.28, 0.0, 0.28, 0.96, 0.0, 0.0, 0.0, 1.0))
        write_volume(image, folder / f"case{i:02d}.nii.gz")


def run(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="volgen-batch-bench-"))
    try:
        (work / "segs").mkdir()
        make_inputs(work / "segs", args.cases)
        torch.manual_seed(0)
        meta = ModelMetadata(name="tiny-bench", label_map=LabelMap.from_names(["a", "b", "c"]), slice_size=16)
        save_model(
            work / "model", build_unet(UNetConfig.preset("tiny"), meta), build_training_scheduler(), meta
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        common = [
            "batch",
            str(work / "segs"),
            "--model",
            str(work / "model"),
            "--steps",
            str(args.steps),
            "--device",
            "cpu",
            "--progress",
            "none",
        ]
        one = run([sys.executable, "-m", "volgen", *common[:2], str(work / "out1"), *common[2:]], env)
        torchrun = shutil.which("torchrun") or "torchrun"
        two = run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "volgen",
                *common[:2],
                str(work / "out2"),
                *common[2:],
            ],
            env,
        )
        for name, seconds in (("1 process", one), ("2 processes (torchrun)", two)):
            print(f"| {name} | {args.cases} | {seconds:.1f} | {args.cases / seconds * 3600:.0f} |")
        print(f"speed-up: {one / two:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
