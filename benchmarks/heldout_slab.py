"""End-to-end quality on real data: train on Colin27 without an axial slab, generate the held-out slab.

    python benchmarks/heldout_slab.py --steps 800 --out runs/heldout

1. Splits the Colin27 T1 and its tissue labels (data/colin27, from examples/colin27/prepare.py) into the
   slices below and above an axial slab (default z = 80..109, 30 mm through the ventricles): two training
   cases; the slab itself is held out.
2. Trains the `small` preset twice on those cases for --steps: volgen's defaults (2.5D context K = 1) and
   the slice-independent baseline's model (K = 0).
3. Generates the held-out slab from its segmentation: defaults (K = 1, ρ = 0.99, DPM-Solver++ 20) and the
   baseline (K = 0, ρ = 0), and compares each with the real slab: faithfulness Dice of the intensity
   segmenter fitted on the training slices' real image, and consistency ratios (generated / real).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volgen.api import GenerateSettings, generate
from volgen.config import validate
from volgen.evaluation import IntensitySegmenter, consistency, dice
from volgen.io import read_image, read_label, write_volume
from volgen.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def crop(image: sitk.Image, z0: int, z1: int) -> sitk.Image:
    size = list(image.GetSize())
    return sitk.RegionOfInterest(image, [size[0], size[1], z1 - z0], [0, 0, z0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--slab", type=int, nargs=2, default=[80, 110])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "heldout")
    args = parser.parse_args()
    z0, z1 = args.slab
    image = read_image(args.data / "images" / "colin27.nii.gz")
    labels = read_label(args.data / "labels" / "colin27.nii.gz")
    nz = image.GetSize()[2]
    split = args.out / "data"
    for sub in ("images", "labels"):
        (split / sub).mkdir(parents=True, exist_ok=True)
    for name, (a, b) in {"below": (0, z0), "above": (z1, nz)}.items():
        write_volume(crop(image, a, b), split / "images" / f"{name}.nii.gz", overwrite=True)
        write_volume(crop(labels, a, b), split / "labels" / f"{name}.nii.gz", overwrite=True)
    slab_seg, slab_real = args.out / "slab_labels.nii.gz", args.out / "slab_real.nii.gz"
    write_volume(crop(labels, z0, z1), slab_seg, overwrite=True)
    write_volume(crop(image, z0, z1), slab_real, overwrite=True)

    base = TrainConfig.from_yaml(ROOT / "configs" / "train" / "colin27-small.yaml").model_dump(mode="json")
    models = {}
    for k in (1, 0):
        data = json.loads(json.dumps(base))
        data["data"]["source"] = str(split)
        data["model"]["context_slices"] = k
        data["training"].update(max_steps=args.steps, preview_every=0)
        data["output_dir"] = str(args.out / f"train-k{k}")
        result = train(validate(data, TrainConfig), resume=(args.out / f"train-k{k}").exists())
        models[k] = result.model_dir

    train_img = sitk.GetArrayFromImage(sitk.Cast(crop(image, 0, z0), sitk.sitkFloat32))
    segmenter = IntensitySegmenter().fit(train_img, sitk.GetArrayFromImage(crop(labels, 0, z0)))
    mask = sitk.GetArrayFromImage(read_label(slab_seg))
    real = sitk.GetArrayFromImage(read_image(slab_real))
    rows = {"real slab (segmenter ceiling)": (real, None)}
    for name, k, rho in (("volgen defaults (K=1, ρ=0.99)", 1, 0.99), ("baseline (K=0, ρ=0)", 0, 0.0)):
        out = args.out / f"gen-k{k}.nii.gz"
        generate(
            slab_seg, out, model=models[k], overwrite=True, settings=GenerateSettings(noise_correlation=rho)
        )
        rows[name] = (sitk.GetArrayFromImage(read_image(out)), k)
    print("| volume | Dice head | csf | grey | white | mean | z ratio | y ratio | x ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (volume, _) in rows.items():
        d = dice(segmenter.predict(volume), mask, range(1, 5))
        c = consistency(volume, real, mask > 0)
        print(
            f"| {name} | "
            + " | ".join(f"{d[i]:.3f}" for i in range(1, 5))
            + f" | {np.nanmean(list(d.values())):.3f} | {c.ratio['z']:.3f} | {c.ratio['y']:.3f} | "
            f"{c.ratio['x']:.3f} |"
        )


if __name__ == "__main__":
    main()
