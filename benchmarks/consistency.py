"""3D consistency and faithfulness against ρ (initial-noise correlation) and 2.5D context K.

    python benchmarks/consistency.py --models runs/bench-context/context-{0,1,2}/model \
        --rho 0 0.5 0.9 0.99 --steps 20 --seeds 0 1

For each model and ρ it generates the Colin27 example segmentation (examples/colin27_tissues_2mm.nii.gz),
and compares with the real Colin27 T1 on the same grid, passed through the same slicing frame (λ = 0, so both
have the same in-plane resolution):
- consistency: mean |x[i+1] - x[i]| inside the head along each axis, generated / real (1.0 is ideal), and
  the anisotropy = slice-axis ratio / mean in-plane ratio (flicker between slices shows as > 1);
- faithfulness: Dice of an intensity segmenter (nearest class median, fitted on the real image and its
  mask) applied to the generated image, against the input mask, per class and mean (the paper's
  Dice(m_gen^pred, m) with a segmenter that suits these intensity-derived tissue labels).
Prints a Markdown table (paste it into benchmarks/README.md) and writes JSON next to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volgen.api import GenerateSettings, generate
from volgen.evaluation import IntensitySegmenter, consistency, dice
from volgen.io import read_image, read_label, write_volume
from volgen.models import read_metadata

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "colin27_tissues_2mm.nii.gz"
T1 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def real_on_grid(segmentation: sitk.Image, work: Path, model: Path) -> sitk.Image:
    """The real T1 on the segmentation's grid, after the model's slicing-frame round trip (λ = 0)."""
    t1 = sitk.Resample(read_image(T1), segmentation, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ref = work / "t1.nii.gz"
    write_volume(t1, ref, overwrite=True)
    out = work / "real.nii.gz"
    generate(
        EXAMPLE,
        out,
        model=model,
        reference=ref,
        overwrite=True,
        settings=GenerateSettings(strength=0.0, num_inference_steps=1),
    )
    return read_image(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.99])
    parser.add_argument("--x0-smoothing", type=float, nargs="+", default=[0.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="dpmsolver++")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "consistency.json")
    args = parser.parse_args()

    segmentation = read_label(EXAMPLE)
    mask = sitk.GetArrayFromImage(segmentation)
    body = mask > 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        real = sitk.GetArrayFromImage(real_on_grid(segmentation, work, args.models[0]))
        segmenter = IntensitySegmenter().fit(real, mask)
        real_dice = dice(segmenter.predict(real), mask, range(1, 5))
        for model in args.models:
            meta = read_metadata(model)
            for rho, smoothing, seed in itertools.product(args.rho, args.x0_smoothing, args.seeds):
                out = work / f"gen-{meta.context_slices}-{rho}-{smoothing}-{seed}.nii.gz"
                settings = GenerateSettings(
                    seed=seed,
                    noise_correlation=rho,
                    x0_smoothing=smoothing,
                    num_inference_steps=args.steps,
                    scheduler=args.scheduler,
                )
                started = time.perf_counter()
                generate(EXAMPLE, out, model=model, overwrite=True, settings=settings)
                seconds = time.perf_counter() - started
                gen = sitk.GetArrayFromImage(read_image(out))
                c = consistency(gen, real, body, slice_axis="z")
                d = dice(segmenter.predict(gen), mask, range(1, 5))
                rows.append(
                    {
                        "model": str(model),
                        "context": meta.context_slices,
                        "rho": rho,
                        "x0_smoothing": smoothing,
                        "seed": seed,
                        "ratio": c.ratio,
                        "anisotropy": c.anisotropy,
                        "dice": d,
                        "mean_dice": float(np.nanmean(list(d.values()))),
                        "seconds": seconds,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "real_dice": real_dice}, indent=2))

    names = ["head", "csf", "grey", "white"]
    print(f"\nsegmenter on the real image: mean Dice {np.nanmean(list(real_dice.values())):.3f}\n")
    print(
        "| K | ρ | x0 σ | z ratio (through-plane) | y ratio | x ratio | anisotropy | Dice "
        + " | ".join(names)
        + " | mean Dice |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * (len(names) + 1))
    keys = sorted({(r["context"], r["rho"], r["x0_smoothing"]) for r in rows})
    for k, rho, smoothing in keys:
        group = [r for r in rows if (r["context"], r["rho"], r["x0_smoothing"]) == (k, rho, smoothing)]

        def mean(f, group=group):
            return float(np.mean([f(r) for r in group]))

        dices = [mean(lambda r, c=c: r["dice"][c]) for c in range(1, 5)]
        print(
            f"| {k} | {rho} | {smoothing} | {mean(lambda r: r['ratio']['z']):.3f} | "
            f"{mean(lambda r: r['ratio']['y']):.3f} | "
            f"{mean(lambda r: r['ratio']['x']):.3f} | {mean(lambda r: r['anisotropy']):.3f} | "
            + " | ".join(f"{v:.3f}" for v in dices)
            + f" | {mean(lambda r: r['mean_dice']):.3f} |"
        )


if __name__ == "__main__":
    main()
