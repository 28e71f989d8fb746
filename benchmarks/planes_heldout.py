"""Per-plane consistency on held-out anatomy: multi-axis sampling's axis schedules against axial sampling.

    python examples/colin27/prepare.py data/colin27          # once
    python benchmarks/planes_heldout.py --train-steps 3000 --steps 20 --out runs/planes-heldout   # GPU
    python benchmarks/planes_heldout.py --model runs/planes-heldout/work/train-multi/model \
        --axial-model runs/planes-heldout/work/train-axial/model --steps 10 --out runs/axes   # trained models
    OMP_NUM_THREADS=1 python benchmarks/planes_heldout.py --quick --out runs/axes-quick   # mechanics only

1. Splits the Colin27 T1 and its labels (data/colin27) into the slices below and above an axial slab (default
   z = 80..109, 30 mm through the ventricles, as benchmarks/heldout_slab.py); the slab is held out.
2. Models: ``--model DIR`` is the multi-axis model (``data.slice_axes: [axial, coronal, sagittal]``) and
   ``--axial-model DIR`` the axial one; each one not given is trained on the rest with the `small` preset
   (configs/train/colin27-small.yaml, the current recipe) and ``--train-steps``, or reused from ``--work``.
   The axial model is only needed for ``--rho-axial`` rows.
3. Generates the held-out slab from its labels for every seed and setting through ``volgen.api.generate``
   (what ``volgen generate`` runs): the axial model along axial slices with ρ in ``--rho-axial`` (today's
   sampling); the multi-axis model with ``--slice-axes axial,coronal,sagittal`` and ``--axis-schedule cycle``
   (ρ in ``--rho-cycle``) and ``late`` for every ``--late-fractions`` (ρ in ``--rho-late``); optionally the
   multi-axis model in the cube frame along axial slices only (``--rho-multi-axial``). Every setting costs the
   same UNet evaluations per step (one pass over one axis' slices of the cube or the slab).
4. Scores each volume against the real slab passed through the same frame (single-axis frame, or the isotropic
   cube frame for multi-axis sampling): faithfulness (intensity segmenter, nearest class median, fitted on the
   training slices' real image; mean and worst seed), background error, per-plane metrics
   (volgen.evaluation.planes) with the seeds whose neighbour-difference ratio is in [0.8, 1.25] and whose
   texture-correlation ratio is in [0.8, 1.25] along every axis, each counted alone and together.

Writes at most 4 files to ``--out``: ``results.json``, ``table.md``, ``planes.png`` (seed 0 of every setting
in three planes next to the real slab) and ``log.txt``; models and volumes go to ``--work`` (default
``--out/work``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from _planes_common import STEP_RANGE, TEXTURE_RANGE, score, slice_frame_round_trip, table
from heldout_slab import crop

from volgen.api import GenerateSettings, generate
from volgen.config import validate
from volgen.evaluation import IntensitySegmenter
from volgen.io import read_image, read_label, write_volume
from volgen.models import load_model
from volgen.multiaxis import cube_round_trip
from volgen.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
AXES = ["axial", "coronal", "sagittal"]
#: --quick: the mechanics in minutes on a CPU (a short training, 2 seeds, 4 steps; the numbers mean nothing)
QUICK = dict(
    train_steps=30, steps=4, seeds=[0, 1], rho_axial=[0.99], rho_cycle=[0.0], rho_late=[0.0, 0.99],
    late_fractions=[0.5], rho_multi_axial=[],
)  # fmt: skip


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
    """The multi-axis and (for axial rows) the axial model: given, reused from --work, or trained."""
    base = TrainConfig.from_yaml(ROOT / "configs" / "train" / "colin27-small.yaml").model_dump(mode="json")
    given = {"multi": args.model, "axial": args.axial_model}
    wanted = {"multi": AXES, **({"axial": []} if args.rho_axial else {})}
    models = {}
    for name, axes in wanted.items():
        if given[name] is not None:
            models[name] = given[name]
            continue
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
    trained = load_model(models["multi"]).metadata
    axes = trained.condition.axes if trained.condition is not None else ()
    if len(axes) < 3:
        raise SystemExit(f"{models['multi']}: not a model trained on axial, coronal and sagittal slices")
    return models


def settings_list(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(row name, model, generation settings) of every setting measured."""
    multi = dict(slice_axes=AXES)
    rows = [(f"axial model, axial slices, ρ {r}", "axial", dict(noise_correlation=r)) for r in args.rho_axial]
    rows += [
        (f"multi-axis, cycle, ρ {r}", "multi", dict(multi, axis_schedule="cycle", noise_correlation=r))
        for r in args.rho_cycle
    ]
    rows += [
        (
            f"multi-axis, late {f:g}, ρ {r}",
            "multi",
            dict(multi, axis_schedule="late", late_fraction=f, noise_correlation=r),
        )
        for f in args.late_fractions
        for r in args.rho_late
    ]
    rows += [
        (
            f"multi-axis, axial slices only (cube), ρ {r}",
            "multi",
            dict(slice_axes=["axial"], noise_correlation=r),
        )
        for r in args.rho_multi_axial
    ]
    # classifier-free guidance: each given value is its own set of rows (none given: the model's default)
    if not args.guidance_scale:
        return rows
    return [
        (f"{name}, guidance {w:g}", model, dict(chosen, guidance_scale=w))
        for w in args.guidance_scale
        for name, model, chosen in rows
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="trained multi-axis model (else trained)")
    parser.add_argument("--axial-model", type=Path, default=None, help="trained axial model (else trained)")
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (DPM-Solver++)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--rho-axial", type=float, nargs="*", default=[0.99], help="axial model (today)")
    parser.add_argument(
        "--rho-cycle", "--rho-multi", type=float, nargs="*", default=[0.0, 0.9], help="multi-axis, cycle"
    )
    parser.add_argument("--late-fractions", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    parser.add_argument(
        "--rho-late", type=float, nargs="*", default=[0.0, 0.9, 0.99], help="multi-axis, late"
    )
    parser.add_argument(
        "--rho-multi-axial",
        type=float,
        nargs="*",
        default=[],
        help="the multi-axis model along axial slices only, in the cube frame (single-axis sampling)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        nargs="*",
        default=[],
        help="classifier-free guidance values, each a set of rows (default: the model's, volgen.defaults)",
    )
    parser.add_argument("--slab", type=int, nargs=2, default=[80, 110])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "planes-heldout")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help=f"mechanics only, as defaults: {QUICK}")
    if "--quick" in sys.argv[1:]:  # tiny defaults; options given on the command line still win
        parser.set_defaults(**QUICK)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
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
    real_image = read_image(slab_real)
    mask = sitk.GetArrayFromImage(seg_image)
    direction = seg_image.GetDirection()
    slice_size = load_model(models["multi"]).metadata.slice_size
    # the real slab through each frame: what a perfect generator of that frame returns
    reals = {
        "axial": sitk.GetArrayFromImage(slice_frame_round_trip(seg_image, real_image, slice_size)),
        "multi": sitk.GetArrayFromImage(cube_round_trip(seg_image, real_image, slice_size=slice_size)),
    }
    reals = {k: v.astype(np.float64) for k, v in reals.items()}
    raw_real = sitk.GetArrayFromImage(real_image).astype(np.float64)
    ceilings = {
        "raw": score(raw_real, raw_real, mask, segmenter, range(1, 5))["mean_dice"],
        **{k: score(v, v, mask, segmenter, range(1, 5))["mean_dice"] for k, v in reals.items()},
    }
    logging.info("segmenter on the real slab (raw / axial frame / cube frame): %s", ceilings)

    groups: dict[str, list[dict]] = {}
    examples: dict[str, np.ndarray] = {}
    (work / "volumes").mkdir(exist_ok=True)
    for name, model, chosen in settings_list(args):
        cube = "slice_axes" in chosen
        for seed in args.seeds:
            started = time.perf_counter()
            out = work / "volumes" / f"{len(groups)}-seed{seed}.nii.gz"
            settings = GenerateSettings(seed=seed, num_inference_steps=args.steps, **chosen)
            generate(slab_seg, out, model=models[model], overwrite=True, settings=settings, device=device)
            volume = sitk.GetArrayFromImage(read_image(out)).astype(np.float64)
            sidecar = json.loads(out.with_name(out.name + ".json").read_text(encoding="utf-8"))
            seconds = time.perf_counter() - started
            row = score(volume, reals["multi" if cube else "axial"], mask, segmenter, range(1, 5), direction)
            row.update(
                setting=name,
                seed=seed,
                model=str(models[model]),
                settings=chosen,
                axes_run=sidecar["axis_schedule"],
                seconds=seconds,
            )
            groups.setdefault(name, []).append(row)
            examples.setdefault(name, volume)
            logging.info(
                "%s seed %d: Dice %.3f, in range %s (%.0f s; axes %s)",
                name,
                seed,
                row["mean_dice"],
                row["in_range"],
                seconds,
                "".join(a[0] for a in sidecar["axis_schedule"]),
            )

    text = table(groups, split_ranges=True)
    given = args.model is not None and (args.axial_model is not None or not args.rho_axial)
    trained = "" if given else f" (those not given: --train-steps {args.train_steps}, or as found in --work)"
    header = (
        f"Held-out Colin27 slab z = {args.slab[0]}..{args.slab[1] - 1}; models "
        f"{', '.join(f'{k}: {v}' for k, v in models.items())}{trained}; DPM-Solver++ {args.steps} steps; "
        f"{len(args.seeds)} seeds; device {device}{' (--quick: mechanics only)' if args.quick else ''}.\n"
        f"Segmenter on the real slab (ceiling): raw {ceilings['raw']:.3f}, through the axial frame "
        f"{ceilings['axial']:.3f}, through the cube frame {ceilings['multi']:.3f}. In range: step ratio in "
        f"{STEP_RANGE}, texture ratio in {TEXTURE_RANGE} along z, y and x.\n\n"
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
