"""Background and empty slices of generated volumes, per seed: grey air and ghost anatomy in numbers.

    python benchmarks/background.py examples/colin27_tissues_2mm.nii.gz \
        runs/planes/volumes/rho0.99-s0.0-seed*.nii.gz --range 0 178

For each volume: the mean over the segmentation's background voxels as % of the intensity range (the real
Colin27 background is exactly 0), the mean of the all-background slices (the top of the example, z = 88..90),
and how many all-background slices hold anatomy: more than 1 % of their voxels above 15 % of the range (the
criterion of benchmarks/heldout_slab.py). Prints a Markdown table with the mean and worst seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: A voxel is "anatomy" above this fraction of the intensity range; a slice holds anatomy above this share.
ANATOMY_LEVEL, ANATOMY_FRACTION = 0.15, 0.01


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("segmentation", type=Path)
    parser.add_argument("volumes", type=Path, nargs="+")
    parser.add_argument("--range", type=float, nargs=2, default=(0.0, 178.0), help="intensity range low high")
    args = parser.parse_args()
    low, high = args.range
    span = high - low
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(args.segmentation)))
    empty = [z for z in range(mask.shape[0]) if not mask[z].any()]
    print(f"all-background slices: {empty}\n")
    print("| volume | background mean % of range | empty-slice mean % | empty slices with anatomy |")
    print("|---|---|---|---|")
    rows = []
    for path in args.volumes:
        g = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
        background = 100 * (g[mask == 0].mean() - low) / span
        slices = 100 * (np.mean([g[z].mean() for z in empty]) - low) / span if empty else float("nan")
        ghosts = sum(float((g[z] > low + ANATOMY_LEVEL * span).mean()) > ANATOMY_FRACTION for z in empty)
        rows.append((background, slices, ghosts))
        print(f"| {path.name} | {background:.1f} | {slices:.1f} | {ghosts} of {len(empty)} |")
    b, s, n = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    print(
        f"| **mean [worst]** | {b.mean():.1f} [{b.max():.1f}] | {s.mean():.1f} [{s.max():.1f}] | "
        f"{int((n > 0).sum())} of {len(n)} seeds |"
    )


if __name__ == "__main__":
    main()
