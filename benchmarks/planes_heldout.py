"""Per-plane consistency on held-out anatomy: single-axis against multi-axis models and sampling, 8 seeds.

    python examples/colin27/prepare.py data/colin27          # once
    python benchmarks/planes_heldout.py --train-steps 3000 --steps 20 --out runs/planes-heldout   # GPU
    OMP_NUM_THREADS=1 python benchmarks/planes_heldout.py --train-steps 400 --steps 10   # CPU: mechanics only

1. Splits the Colin27 T1 and its labels (data/colin27) into the slices below and above an axial slab (default
   z = 80..109, 30 mm through the ventricles, as benchmarks/heldout_slab.py); the slab is held out.
2. Trains the `small` preset (configs/train/colin27-small.yaml, the current recipe) twice on the same data
   and budget: an axial model, and a multi-axis model (``data.slice_axes: [axial, coronal, sagittal]``, the
   axis in the condition vector). Models already under ``--work`` are reused.
3. Generates the held-out slab from its labels for every seed and setting: the axial model with ρ in
   ``--rho-axial`` (single-axis sampling, today's way), and the multi-axis model cycling axial, coronal,
   sagittal per step with ρ in ``--rho-multi`` (same UNet evaluations per step as single-axis sampling on a
   cube; see docs/consistency.md), and the multi-axis model along axial slices only with ρ in
   ``--rho-multi-axial`` (same frame and model, single-axis sampling).
4. Scores each volume against the real slab passed through the same frame (single-axis frame, or the isotropic
   cube frame for multi-axis sampling): faithfulness (intensity segmenter, nearest class median, fitted on
   the training slices' real image), background error, per-plane metrics (volgen.evaluation.planes).

Writes at most 4 files to ``--out``: ``results.json``, ``table.md``, ``planes.png`` (seed 0 of every setting
in three planes next to the real slab) and ``log.txt``; models and volumes go to ``--work`` (default
``--out/work``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from _planes_common import score, table
from heldout_slab import crop

from volgen.api import GenerateSettings, generate
from volgen.config import validate
from volgen.evaluation import IntensitySegmenter
from volgen.io import read_image, read_label, write_volume
from volgen.models import load_model
from volgen.multiaxis import cube_round_trip, generate_multiaxis
from volgen.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
AXES = ["axial", "coronal", "sagittal"]


def split(args: argparse.Namespace, work: Path) -> tuple[Path, Path, sitk.Image, sitk.Image]:
    z0, z1 = args.slab
    image = read_image(args.data / "images" / "colin27.nii.gz")
    labels = read_label(args.data / "labels" / "colin27.nii.gz")
    nz = image.GetSize()[2]
    for sub in ("images", "labels"):
        (work / "data" / sub).mkdir(parents=True, exist_ok=True)
    for name, (a, b) in {"below": (0, z0), "above": (z1, nz)}.items():
        write_volume(crop(image, a, b), work / "data" / "images" / f"{name}.nii.gz", overwrite=True)
        write_volume(crop(labels, a, b), work / "data" / "labels" / f"{name}.nii.gz", overwrite=True)
    slab_seg, slab_real = work / "slab_labels.nii.gz", work / "slab_real.nii.gz"
    write_volume(crop(labels, z0, z1), slab_seg, overwrite=True)
    write_volume(sitk.Cast(crop(image, z0, z1), sitk.sitkFloat32), slab_real, overwrite=True)
    return slab_seg, slab_real, crop(image, 0, z0), crop(labels, 0, z0)


def train_models(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    base = TrainConfig.from_yaml(ROOT / "configs" / "train" / "colin27-small.yaml").model_dump(mode="json")
    models = {}
    for name, axes in (("axial", []), ("multi", AXES)):
        if (work / f"train-{name}" / "model").is_dir():  # trained by an earlier run: reused as it is
            models[name] = work / f"train-{name}" / "model"
            continue
        data = json.loads(json.dumps(base))
        data["data"].update(source=str(work / "data"), slice_axes=axes)
        data["training"].update(
            max_steps=args.train_steps, preview_every=0, checkpoint_every=args.train_steps
        )
        if torch.cuda.is_available():
            data["training"].update(mixed_precision="bf16", num_workers=4)
        data["output_dir"] = str(work / f"train-{name}")
        started = time.perf_counter()
        result = train(validate(data, TrainConfig), resume=(work / f"train-{name}").exists())
        logging.info("trained %s: %d steps in %.0f s", name, args.train_steps, time.perf_counter() - started)
        models[name] = result.model_dir
    return models


def settings_list(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    return (
        [(f"axial model, axial slices, ρ {r}", "axial", r) for r in args.rho_axial]
        + [(f"multi-axis model, axes cycled, ρ {r}", "multi", r) for r in args.rho_multi]
        + [(f"multi-axis model, axial slices only, ρ {r}", "multi-axial", r) for r in args.rho_multi_axial]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (DPM-Solver++)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--rho-axial", type=float, nargs="*", default=[0.0, 0.9, 0.99])
    parser.add_argument("--rho-multi", type=float, nargs="*", default=[0.0, 0.9])
    parser.add_argument(
        "--rho-multi-axial",
        type=float,
        nargs="*",
        default=[0.99],
        help="the multi-axis model sampled along axial slices only (same frame, single-axis sampling)",
    )
    parser.add_argument("--slab", type=int, nargs=2, default=[80, 110])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "planes-heldout")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.FileHandler(args.out / "log.txt"), logging.StreamHandler()],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    slab_seg, slab_real, train_image, train_labels = split(args, work)
    models = train_models(args, work)

    segmenter = IntensitySegmenter().fit(
        sitk.GetArrayFromImage(sitk.Cast(train_image, sitk.sitkFloat32)), sitk.GetArrayFromImage(train_labels)
    )
    seg_image = read_label(slab_seg)
    mask = sitk.GetArrayFromImage(seg_image)
    direction = seg_image.GetDirection()
    # the real slab through each frame: what a perfect generator of that frame returns
    frame_real = work / "real_axial_frame.nii.gz"
    generate(
        slab_seg,
        frame_real,
        model=models["axial"],
        reference=slab_real,
        overwrite=True,
        settings=GenerateSettings(strength=0.0, num_inference_steps=1),
    )
    reals = {
        "axial": sitk.GetArrayFromImage(read_image(frame_real)).astype(np.float64),
        "multi": sitk.GetArrayFromImage(
            cube_round_trip(
                seg_image, read_image(slab_real), slice_size=load_model(models["multi"]).metadata.slice_size
            )
        ).astype(np.float64),
    }
    raw_real = sitk.GetArrayFromImage(read_image(slab_real)).astype(np.float64)
    ceilings = {
        "raw": score(raw_real, raw_real, mask, segmenter, range(1, 5))["mean_dice"],
        **{k: score(v, v, mask, segmenter, range(1, 5))["mean_dice"] for k, v in reals.items()},
    }
    logging.info("segmenter on the real slab (raw / axial frame / cube frame): %s", ceilings)

    loaded_multi = load_model(models["multi"])
    groups: dict[str, list[dict]] = {}
    examples: dict[str, np.ndarray] = {}
    for name, kind, rho in settings_list(args):
        for seed in args.seeds:
            started = time.perf_counter()
            if kind == "axial":
                out = work / f"gen-axial-rho{rho}-seed{seed}.nii.gz"
                settings = GenerateSettings(seed=seed, noise_correlation=rho, num_inference_steps=args.steps)
                generate(
                    slab_seg, out, model=models["axial"], overwrite=True, settings=settings, device=device
                )
                volume = sitk.GetArrayFromImage(read_image(out)).astype(np.float64)
            else:
                result = generate_multiaxis(
                    seg_image,
                    loaded_multi,
                    axes=AXES if kind == "multi" else ["axial"],
                    seed=seed,
                    num_inference_steps=args.steps,
                    noise_correlation=rho,
                    device=device,
                )
                volume = sitk.GetArrayFromImage(result.image).astype(np.float64)
            seconds = time.perf_counter() - started
            real = reals["axial" if kind == "axial" else "multi"]
            row = score(volume, real, mask, segmenter, range(1, 5), direction)
            row.update(setting=name, seed=seed, rho=rho, kind=kind, seconds=seconds)
            groups.setdefault(name, []).append(row)
            examples.setdefault(name, volume)
            logging.info(
                "%s seed %d: Dice %.3f, in range %s (%.0f s)",
                name,
                seed,
                row["mean_dice"],
                row["in_range"],
                seconds,
            )

    text = table(groups)
    header = (
        f"Held-out Colin27 slab z = {args.slab[0]}..{args.slab[1] - 1}; `small` models trained "
        f"{args.train_steps} steps on the rest; DPM-Solver++ {args.steps} steps; {len(args.seeds)} seeds; "
        f"device {device}.\n"
        f"Segmenter on the real slab (ceiling): raw {ceilings['raw']:.3f}, through the axial frame "
        f"{ceilings['axial']:.3f}, through the cube frame {ceilings['multi']:.3f}.\n\n"
    )
    (args.out / "table.md").write_text(header + text + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(
        json.dumps({"ceilings": ceilings, "args": vars(args), "groups": groups}, indent=1, default=str)
    )
    figure(args.out / "planes.png", mask, reals["axial"], examples)
    print(header + text)


def figure(path: Path, mask: np.ndarray, real: np.ndarray, examples: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"real slab (axial frame)": real, **examples}
    centre = np.argwhere(mask > 0).mean(axis=0).round().astype(int)
    lo, hi = np.percentile(real, [0.5, 99.5])
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 2.6 * len(rows)), constrained_layout=True)
    for r, (name, volume) in enumerate(rows.items()):
        views = [volume[centre[0]], np.flipud(volume[:, centre[1]]), np.flipud(volume[:, :, centre[2]])]
        for c, (view, plane) in enumerate(zip(views, ("axial", "coronal", "sagittal"), strict=True)):
            axes[r, c].imshow(view, cmap="gray", vmin=lo, vmax=hi, aspect="auto" if c else "equal")
            axes[r, c].set_title(f"{name} (seed 0): {plane}", fontsize=7)
            axes[r, c].axis("off")
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
