"""Held-out anatomy: train on Colin27 without an axial slab, generate the slab, over several seeds.

    python benchmarks/heldout_slab.py --steps 300 --preset small --size 32 --seeds 8 --out runs/heldout
    python benchmarks/heldout_slab.py --variant recipe --steps 4000 --device cuda --out runs/heldout

1. Splits the Colin27 T1 and its tissue labels (``data/colin27`` from ``examples/colin27/prepare.py``) into
   the slices below and above an axial slab (default z = 80..109, 30 mm through the ventricles): two
   training cases; the slab is held out. The slab's segmentation gets ``--empty`` all-background slices
   appended below and above it (their real image is the scanner's background, 0): a model that invents
   anatomy where the mask is empty shows it there.
2. Trains each recipe variant (``VARIANTS``: the new recipe, the recipe with one of its parts switched off,
   and the older recipe) at the same budget (``--steps``, batch ``--batch-size``) on those two cases.
3. Generates the padded slab from its segmentation for ``--seeds`` seeds with volgen's generation defaults
   (DPM-Solver++ 20 steps, ρ = 0.99) and scores every seed:

   - faithfulness: mean Dice over the 4 tissue classes of a fixed segmenter on the generated slab against
     its mask. The segmenter is :class:`volgen.evaluation.IntensitySegmenter` (nearest class median), fitted
     once on the real training slices (below and above the slab) at their native 1 mm grid. Its score on
     the real slab, and on the real slab sent through the model's 64 px (or ``--size``) frame and back, are
     the ceilings;
   - background error: |mean generated − mean real| over the mask's background voxels (slab and empty
     slices), as % of the real slab's intensity range (0.5-99.5th percentiles);
   - anatomy in the empty slices: a seed counts when any empty slice has more than 1 % of its voxels above
     the real background + 15 % of the range; and the empty slices' mean intensity (% of the range).

Writes ``heldout.json`` (every seed of every variant) and ``heldout.md`` (the table) under ``--out``;
``--variant NAME`` trains and scores one variant and writes ``variant-NAME.json`` (for running variants as
parallel processes, see ``benchmarks/recipe_gpu.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # volgen from this source tree when it is not installed
    sys.path.insert(0, str(ROOT))
from _planes_common import slice_frame_round_trip  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "train" / "colin27-small.yaml"
CLASSES = (1, 2, 3, 4)
#: A slice holds "anatomy" when more than this fraction of its voxels is brighter than background + 15 %.
ANATOMY_FRACTION = 0.01
ANATOMY_LEVEL = 0.15

OLDER = {
    "model": {
        "specified_flags": False,
        "context_padding": "background",
        "prediction_type": "epsilon",
        "zero_terminal_snr": False,
    },
    "augmentation": {"enabled": False},
    "data": {"empty_slices": 0, "edge_cut_p": 0.0},
}
#: The embedded model's data settings (configs/train/colin27-native.yaml) over the 64 px recipe's.
NATIVE_2MM_MILD = {
    "frame": "native",
    "pixel_spacing": 2.0,
    "pixel_spacing_scales": [1.0, 1.0, 1.15, 1.3],
    "inplane_cut_kinds": {"half_plane": 1, "ellipse": 1, "erosion": 1, "band": 1},
}
#: Recipe variants (overrides of configs/train/colin27-small.yaml): each part of the recipe off in turn.
VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "no-flags": {"model": {"specified_flags": False}},
    "no-augmentation": {"augmentation": {"enabled": False}},
    "epsilon-linear": {"model": {"prediction_type": "epsilon", "zero_terminal_snr": False}},
    "no-edges": {"model": {"context_padding": "background"}, "data": {"empty_slices": 0, "edge_cut_p": 0.0}},
    "no-edge-cuts": {"data": {"edge_cut_p": 0.0}},
    "augmented": {"augmentation": {"enabled": True}},
    "older-recipe": OLDER,
    # optional extras (not in the default set)
    "background-padding": {"model": {"context_padding": "background"}},
    "no-empty-slices": {"data": {"empty_slices": 0}},
    "min-snr-5": {"training": {"snr_gamma": 5.0}},
    "offset-noise": {"training": {"offset_noise": 0.1}},
    "dropout": {"model": {"dropout": 0.1}},
    "dropout-0.2": {"model": {"dropout": 0.2}},
    "edge-cuts-0.05": {"data": {"edge_cut_p": 0.05}},
    "weight-decay": {"training": {"weight_decay": 0.05}},
    "no-dropout": {"model": {"dropout": 0.0}},
    "erase-head": {"data": {"erase_classes": ["head"], "erase_p": 0.2}},
    "erase-head-0.1": {"data": {"erase_classes": ["head"], "erase_p": 0.1}},
    # native resolution (docs/resolution.md): the recipe at Colin27's own 1 mm, trained on crops of the
    # preset's size (the same UNet work per step as the 64 px frame), generating whole 1 mm slices
    "native": {"data": {"frame": "native", "pixel_spacing": 1.0}},
    "native-2mm": {"data": {"frame": "native", "pixel_spacing": 2.0}},  # 1 mm slices cost ~5x more on a CPU
    # with scale augmentation: each case also at 2.6 and 3.4 mm pixels (anatomy 1/1.3 and 1/1.7 the size)
    "native-2mm-scales": {
        "data": {"frame": "native", "pixel_spacing": 2.0, "pixel_spacing_scales": [1.0, 1.0, 1.3, 1.7]}
    },
    # milder: 2.3 and 2.6 mm (anatomy 1/1.15 and 1/1.3); in-plane cut kinds a quarter each, as the two above
    "native-2mm-mild": {"data": NATIVE_2MM_MILD},
    # the same, half the samples spared from mask ablation (training.full_mask_p)
    "native-2mm-mild-full-mask": {"data": NATIVE_2MM_MILD, "training": {"full_mask_p": 0.5}},
    # and three samples in four cut in-plane: the training defaults chosen on the vanishing cases
    "native-2mm-mild-cuts-0.75-full-mask": {
        "data": {**NATIVE_2MM_MILD, "inplane_cut_p": 0.75},
        "training": {"full_mask_p": 0.5},
    },
    # the same recipe at Colin27's own 1 mm (configs/train/colin27-native-1mm.yaml): whole 1 mm slices
    "native-1mm-mild-cuts-0.75-full-mask": {
        "data": {**NATIVE_2MM_MILD, "pixel_spacing": 1.0, "inplane_cut_p": 0.75},
        "training": {"full_mask_p": 0.5},
    },
    # the same model asking for the sampling measured for it (configs/train/colin27-native-1mm.yaml): its
    # seeds are generated with no options, as `volgen generate` does
    "native-1mm-own-sampling": {
        "data": {**NATIVE_2MM_MILD, "pixel_spacing": 1.0, "inplane_cut_p": 0.75},
        "training": {"full_mask_p": 0.5},
        "sampling": {"steps": 12, "guidance_scale": 1.25},
    },
}
DEFAULT_VARIANTS = (
    "recipe",
    "no-flags",
    "no-augmentation",
    "epsilon-linear",
    "no-edges",
    "older-recipe",
)


def crop(image: sitk.Image, z0: int, z1: int) -> sitk.Image:
    size = list(image.GetSize())
    return sitk.RegionOfInterest(image, [size[0], size[1], z1 - z0], [0, 0, z0])


def pad_empty(labels: sitk.Image, empty: int) -> sitk.Image:
    """``labels`` with ``empty`` all-background slices added below and above (geometry extended)."""
    if empty == 0:
        return labels
    return sitk.ConstantPad(labels, [0, 0, empty], [0, 0, empty], 0)


def prepare_split(data: Path, work: Path, slab: tuple[int, int], empty: int) -> dict[str, Path]:
    """Write the two training cases, the padded slab segmentation and the real slab (idempotent)."""
    from volgen.io import read_image, read_label, write_volume

    z0, z1 = slab
    image = read_image(data / "images" / "colin27.nii.gz")
    labels = read_label(data / "labels" / "colin27.nii.gz")
    split = work / "data"
    paths = {"train": split, "slab_seg": work / "slab_labels.nii.gz", "slab_real": work / "slab_real.nii.gz"}
    if all(p.exists() for p in paths.values()):
        return paths
    for sub in ("images", "labels"):
        (split / sub).mkdir(parents=True, exist_ok=True)
    for name, (a, b) in {"below": (0, z0), "above": (z1, image.GetSize()[2])}.items():
        write_volume(crop(image, a, b), split / "images" / f"{name}.nii.gz", overwrite=True)
        write_volume(crop(labels, a, b), split / "labels" / f"{name}.nii.gz", overwrite=True)
    write_volume(pad_empty(crop(labels, z0, z1), empty), paths["slab_seg"], overwrite=True)
    write_volume(pad_empty(crop(image, z0, z1), empty), paths["slab_real"], overwrite=True)
    return paths


def variant_config(
    name: str,
    *,
    train_dir: Path,
    output_dir: Path,
    steps: int,
    preset: str,
    size: int | None,
    batch_size: int,
    workers: int,
    samples_per_draw: int,
    max_minutes: float | None,
    base: Path = BASE_CONFIG,
):
    """The training config of one variant: ``base`` with the variant's overrides and the budget."""
    from volgen.config import validate
    from volgen.models import UNetConfig
    from volgen.training import TrainConfig

    data = TrainConfig.from_yaml(base).model_dump(mode="json")
    for section, values in VARIANTS[name].items():
        data[section] = {**data.get(section, {}), **values}
    data["data"]["source"] = str(train_dir)
    data["output_dir"] = str(output_dir)
    if size is not None:
        unet = UNetConfig.preset(preset).model_dump(mode="json")
        data["model"].update(preset=None, unet={**unet, "sample_size": size})
    else:
        data["model"].update(preset=preset, unet=None)
    data["training"].update(
        max_steps=steps,
        max_minutes=max_minutes,
        batch_size=batch_size,
        warmup_steps=min(100, max(1, steps // 10)),
        checkpoint_every=max(steps, 1),
        preview_every=0,
        num_workers=workers,
        log_every=max(1, steps // 10),
    )
    data.setdefault("augmentation", {})["samples_per_draw"] = samples_per_draw
    return validate(data, TrainConfig)


def background_error(generated: np.ndarray, real: np.ndarray, mask: np.ndarray, span: float) -> float:
    """|mean generated − mean real| over the mask's background, in % of ``span``."""
    background = mask == 0
    return float(abs(generated[background].mean() - real[background].mean()) / span * 100.0)


def empty_slices_with_anatomy(generated: np.ndarray, mask: np.ndarray, level: float) -> list[int]:
    """Indices (z) of all-background mask slices where the generated image has anatomy (see module docs)."""
    found = []
    for z in range(mask.shape[0]):
        if not mask[z].any() and float((generated[z] > level).mean()) > ANATOMY_FRACTION:
            found.append(z)
    return found


class Scorer:
    """Scores generated slabs against the held-out slab (the fixed segmenter, fitted once)."""

    def __init__(
        self,
        data: Path,
        paths: dict[str, Path],
        slab: tuple[int, int],
        size: int,
        pixel_spacing: float | None = None,
    ) -> None:
        from volgen.evaluation import IntensitySegmenter
        from volgen.io import read_image, read_label

        z0, z1 = slab
        train_images, train_labels = [], []
        for name in ("below", "above"):
            train_images.append(
                sitk.GetArrayFromImage(read_image(paths["train"] / "images" / f"{name}.nii.gz"))
            )
            train_labels.append(
                sitk.GetArrayFromImage(read_label(paths["train"] / "labels" / f"{name}.nii.gz"))
            )
        self.segmenter = IntensitySegmenter().fit(
            np.concatenate(train_images).astype(np.float32), np.concatenate(train_labels)
        )
        self.mask_image = read_label(paths["slab_seg"])
        self.mask = sitk.GetArrayFromImage(self.mask_image)
        real_image = read_image(paths["slab_real"])
        self.real = sitk.GetArrayFromImage(real_image).astype(np.float32)
        inside = self.mask.reshape(self.mask.shape[0], -1).any(axis=1)
        self.slab = slice(int(np.argmax(inside)), int(len(inside) - np.argmax(inside[::-1])))
        lo, hi = np.percentile(self.real[self.slab], (0.5, 99.5))
        self.span = float(hi - lo)
        self.level = float(self.real[self.mask == 0].mean() + ANATOMY_LEVEL * self.span)
        self.ceiling = self.faithfulness(self.real)
        # the real slab through the model's slicing frame and back (the resolution the model sees)
        frame = slice_frame_round_trip(self.mask_image, real_image, size, pixel_spacing=pixel_spacing)
        self.ceiling_frame = self.faithfulness(sitk.GetArrayFromImage(frame))

    def faithfulness(self, volume: np.ndarray) -> float:
        from volgen.evaluation import dice

        d = dice(self.segmenter.predict(volume[self.slab]), self.mask[self.slab], CLASSES)
        return float(np.nanmean(list(d.values())))

    def score(self, generated: np.ndarray) -> dict[str, Any]:
        empty = empty_slices_with_anatomy(generated, self.mask, self.level)
        return {
            "faithfulness": self.faithfulness(generated),
            "background_error_pct": background_error(generated, self.real, self.mask, self.span),
            "empty_slices_with_anatomy": empty,
            "empty_slice_mean_pct": float(
                np.mean([generated[z].mean() for z in range(len(self.mask)) if not self.mask[z].any()] or [0])
                / self.span
                * 100.0
            ),
        }


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    faith = [s["faithfulness"] for s in seeds]
    background = [s["background_error_pct"] for s in seeds]
    return {
        "faithfulness_mean": float(np.mean(faith)),
        "faithfulness_worst": float(np.min(faith)),
        "background_error_mean_pct": float(np.mean(background)),
        "background_error_worst_pct": float(np.max(background)),
        "seeds_with_anatomy_in_empty_slices": int(sum(bool(s["empty_slices_with_anatomy"]) for s in seeds)),
        "empty_slice_mean_pct": float(np.mean([s["empty_slice_mean_pct"] for s in seeds])),
        "seeds": len(seeds),
    }


def evaluate_model(
    model_dir: Path,
    scorer: Scorer,
    seg: Path,
    out_dir: Path,
    seeds: int,
    device: str,
    guidance_scale: float | None = None,
) -> list[dict[str, Any]]:
    """Generate ``seg`` for seeds ``0..seeds-1`` with the generation defaults (``guidance_scale``: ``None``,
    the model's default) and score each."""
    from volgen.api import GenerateSettings, generate
    from volgen.io import read_image
    from volgen.models import load_model

    loaded = load_model(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(seeds):
        out = out_dir / f"seed-{seed}.nii.gz"
        settings = GenerateSettings(seed=seed, guidance_scale=guidance_scale)
        generate(seg, out, model=model_dir, loaded=loaded, settings=settings, overwrite=True, device=device)
        generated = sitk.GetArrayFromImage(read_image(out)).astype(np.float32)
        results.append({"seed": seed, **scorer.score(generated)})
    return results


def run_variant(name: str, args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    """Train one variant (or resume its finished run) and score it; writes ``variant-NAME.json``."""
    from volgen.training import train

    work = args.work / name
    config = variant_config(
        name,
        train_dir=paths["train"],
        output_dir=work / "train",
        steps=args.steps,
        preset=args.preset,
        size=args.size,
        batch_size=args.batch_size,
        workers=args.workers,
        samples_per_draw=args.samples_per_draw,
        max_minutes=args.max_minutes,
    )
    started = time.monotonic()
    result = train(config, resume=(work / "train").exists())
    train_seconds = time.monotonic() - started
    size = config.model.unet_config().sample_size
    scorer = Scorer(args.data, paths, tuple(args.slab), size, config.data.pixel_spacing)
    started = time.monotonic()
    volumes = work if args.guidance_scale is None else args.out / "volumes" / name
    seeds = evaluate_model(
        result.model_dir, scorer, paths["slab_seg"], volumes, args.seeds, args.device, args.guidance_scale
    )
    record = {
        "variant": name,
        "guidance_scale": args.guidance_scale,
        "overrides": VARIANTS[name],
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "batch_size": args.batch_size,
        "final_loss": result.final_loss,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.monotonic() - started, 1),
        "ceiling": scorer.ceiling,
        "ceiling_model_frame": scorer.ceiling_frame,
        "summary": summarise(seeds),
        "per_seed": seeds,
    }
    path = args.out / f"variant-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def table(records: list[dict[str, Any]]) -> str:
    """The markdown ablation table (one row per variant) with the ceilings above it."""
    if not records:
        return "(no variants finished)\n"
    first = records[0]
    lines = [
        f"Segmenter ceiling: real slab {first['ceiling']:.3f}, real slab through the model frame "
        f"{first['ceiling_model_frame']:.3f}.",
        "",
        "| variant | steps | faithfulness mean | worst | background error mean % | worst % "
        "| seeds with anatomy in empty slices | empty-slice mean % | per-seed faithfulness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        s = summarise(r["per_seed"])
        per_seed = " ".join(f"{x['faithfulness']:.2f}" for x in r["per_seed"])
        steps = f"{r['steps']}{' (time cap)' if r['stopped_early'] else ''}"
        guided = "" if r.get("guidance_scale") is None else f", guidance {r['guidance_scale']:g}"
        lines.append(
            f"| {r['variant']}{guided} | {steps} | "
            f"{s['faithfulness_mean']:.3f} | {s['faithfulness_worst']:.3f} | "
            f"{s['background_error_mean_pct']:.1f} | {s['background_error_worst_pct']:.1f} | "
            f"{s['seeds_with_anatomy_in_empty_slices']}/{s['seeds']} | "
            f"{s['empty_slice_mean_pct']:.1f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path, names: list[str], command: str) -> list[dict[str, Any]]:
    records = []
    for name in names:
        path = out / f"variant-{name}.json"
        if path.is_file():
            records.append(json.loads(path.read_text(encoding="utf-8")))
    (out / "heldout.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    (out / "heldout.md").write_text(f"`{command}`\n\n{table(records)}", encoding="utf-8")
    return records


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--variant", choices=list(VARIANTS), help="run only this variant (writes its JSON)")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant (the equal budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="small", help="UNet preset (configs/models)")
    p.add_argument("--size", type=int, default=None, help="slice size in px (default: the preset's)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--slab", type=int, nargs=2, default=[80, 110])
    p.add_argument("--empty", type=int, default=4, help="all-background slices added below and above")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers (augmentation)")
    p.add_argument("--samples-per-draw", type=int, default=1, help="samples sharing one augmentation draw")
    p.add_argument("--max-minutes", type=float, default=None, help="time cap per training (safety)")
    p.add_argument("--device", default="auto", help="generation device: auto, cpu, cuda")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance of the generation (default: the model's, see volgen.defaults); given, "
        "the volumes go to OUT/volumes/VARIANT (a finished training in --work is reused)",
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    p.add_argument("--work", type=Path, default=None, help="training runs (default: OUT/work)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "heldout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("volgen.training").setLevel(logging.INFO)  # training progress: its loss lines
    args.work = args.work or args.out / "work"
    paths = prepare_split(args.data, args.work, tuple(args.slab), args.empty)
    names = [args.variant] if args.variant else args.variants
    for name in names:
        record = run_variant(name, args, paths)
        print(f"{name}: {json.dumps(record['summary'])}", flush=True)
    if not args.variant:
        command = "python benchmarks/heldout_slab.py " + " ".join(sys.argv[1:] if argv is None else argv)
        print(table(write_summary(args.out, names, command)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
