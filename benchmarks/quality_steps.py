"""Quality against sampler and steps: faithfulness Dice and 3D consistency, DDIM 50 vs DPM-Solver++ 10-30.

    OMP_NUM_THREADS=1 python benchmarks/quality_steps.py                 # the embedded default model
    python benchmarks/quality_steps.py --model runs/colin27-small/model --seeds 0 1 2

Generates the Colin27 example segmentation (examples/colin27_tissues_2mm.nii.gz, 91 x 109 x 91 at 2 mm) with
each sampler setting and seed (ρ = 0.9, volgen's default) and compares with the real Colin27 T1 on the same
grid after the model's slicing-frame round trip (``real_on_grid`` of benchmarks/consistency.py: λ = 0, so real
and generated have the same in-plane resolution):

- faithfulness: Dice of the intensity segmenter (nearest class median, fitted on that real image and its mask)
  on the generated volume against the mask, per class and mean; the first row is the same segmenter on the
  real image (the ceiling);
- consistency: mean |x[i+1] - x[i]| inside the head, generated / real, along z (through-plane), y and x, and
  the anisotropy (z ratio / mean in-plane ratio);
- with ``--segmenter DIR`` (a ``volgen train-segmenter`` model) also the mean Dice of that learned segmenter
  on the generated volume against the mask (and on the real one, the ceiling): the intensity segmenter cannot
  tell the heterogeneous ``head`` class (scalp, skull, fat) from CSF well;
- seconds per volume on this machine.

Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from consistency import EXAMPLE, real_on_grid  # noqa: E402
from speed import machine  # noqa: E402

from volgen.api import GenerateSettings, default_model_dir, generate  # noqa: E402
from volgen.evaluation import IntensitySegmenter, consistency, dice  # noqa: E402
from volgen.io import read_image, read_label  # noqa: E402
from volgen.models import read_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("ddim:50", "dpmsolver++:10", "dpmsolver++:20", "dpmsolver++:30")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="scheduler:steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rho", type=float, default=0.9)
    parser.add_argument("--segmenter", type=Path, default=None, help="also score with this learned segmenter")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quality-steps.json")
    args = parser.parse_args()
    if not (args.model / "volgen.json").is_file():
        sys.exit(
            f"no model at {args.model} (train one, or wait for the embedded default model); nothing measured"
        )

    meta = read_metadata(args.model)
    names = meta.label_map.class_names[1:]
    classes = range(1, meta.num_classes)
    segmentation = read_label(EXAMPLE)
    mask = meta.label_map.remap(sitk.GetArrayFromImage(segmentation))
    body = mask > 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        real_image = real_on_grid(segmentation, work, args.model)
        real = sitk.GetArrayFromImage(real_image)
        segmenter = IntensitySegmenter().fit(real, mask)
        real_dice = dice(segmenter.predict(real), mask, classes)
        print(f"segmenter on real: {real_dice}", flush=True)
        learned = None
        if args.segmenter is not None:
            from volgen.segmenter import load_segmenter

            learned = load_segmenter(args.segmenter)
            learned_real = dice(learned.segment(real_image), mask, classes)
            print(f"learned segmenter on real: {learned_real}", flush=True)
        for setting in args.settings:
            scheduler, steps = setting.split(":")
            for seed in args.seeds:
                out = work / f"gen-{scheduler}-{steps}-{seed}.nii.gz"
                started = time.perf_counter()
                generate(
                    EXAMPLE,
                    out,
                    model=args.model,
                    overwrite=True,
                    settings=GenerateSettings(
                        seed=seed,
                        scheduler=scheduler,
                        num_inference_steps=int(steps),
                        noise_correlation=args.rho,
                    ),
                )
                seconds = time.perf_counter() - started
                gen_image = read_image(out)
                gen = sitk.GetArrayFromImage(gen_image)
                c = consistency(gen, real, body, slice_axis="z")
                d = dice(segmenter.predict(gen), mask, classes)
                ld = None if learned is None else dice(learned.segment(gen_image), mask, classes)
                rows.append(
                    {
                        "scheduler": scheduler,
                        "steps": int(steps),
                        "seed": seed,
                        "dice": {names[k - 1]: v for k, v in d.items()},
                        "mean_dice": float(np.nanmean(list(d.values()))),
                        "learned_dice": None if ld is None else {names[k - 1]: v for k, v in ld.items()},
                        "learned_mean_dice": None if ld is None else float(np.nanmean(list(ld.values()))),
                        "ratio": c.ratio,
                        "anisotropy": c.anisotropy,
                        "seconds": seconds,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)

    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "model": str(args.model),
        "rho": args.rho,
        "real_dice": {names[k - 1]: v for k, v in real_dice.items()},
        "segmenter": None if args.segmenter is None else str(args.segmenter),
        "learned_real_dice": None if learned is None else {names[k - 1]: v for k, v in learned_real.items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))

    print(f"\nmachine: {info}\nmodel: {args.model} ({meta.name}); ρ = {args.rho}; seeds {args.seeds}\n")
    print(
        "| sampler | steps | "
        + " | ".join(f"Dice {n}" for n in names)
        + " | mean Dice |"
        + (" mean Dice (learned) |" if learned else "")
        + " z ratio | y ratio | x ratio | anisotropy | s / volume |"
    )
    print("|---|---|" + "---|" * (len(names) + 6 + (1 if learned else 0)))
    print(
        "| real (segmenter ceiling) | - | "
        + " | ".join(f"{real_dice[k]:.3f}" for k in classes)
        + f" | {np.nanmean(list(real_dice.values())):.3f} |"
        + (f" {np.nanmean(list(learned_real.values())):.3f} |" if learned else "")
        + " 1 | 1 | 1 | 1 | - |"
    )
    for setting in args.settings:
        scheduler, steps = setting.split(":")
        group = [r for r in rows if r["scheduler"] == scheduler and r["steps"] == int(steps)]

        def mean(f, group=group):
            return float(np.mean([f(r) for r in group]))

        print(
            f"| {scheduler} | {steps} | "
            + " | ".join(f"{mean(lambda r, n=n: r['dice'][n]):.3f}" for n in names)
            + f" | {mean(lambda r: r['mean_dice']):.3f} |"
            + (f" {mean(lambda r: r['learned_mean_dice']):.3f} |" if learned else "")
            + f" {mean(lambda r: r['ratio']['z']):.3f} | "
            f"{mean(lambda r: r['ratio']['y']):.3f} | {mean(lambda r: r['ratio']['x']):.3f} | "
            f"{mean(lambda r: r['anisotropy']):.3f} | {mean(lambda r: r['seconds']):.1f} |"
        )


if __name__ == "__main__":
    main()
