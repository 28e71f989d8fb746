"""Vanishing anatomy: train with a minimal config on the lower part of a head, generate the upper part.

    OMP_NUM_THREADS=1 python benchmarks/vanishing.py --steps 1000 --seeds 8 --data data/colin27 \
        --out runs/vanishing

The case the defaults must get right without a recipe YAML: a model trained by ``volgen train`` with a
**minimal config** (data folder, label map, modality and a preset; everything else volgen's defaults) never
sees the top of the head, where the head's cross-section shrinks to nothing and the last slices are empty;
it is then asked to generate exactly that part from its labels.

1. Splits the Colin27 T1 and its tissue labels (``data/colin27`` from ``examples/colin27/prepare.py``) at
   axial slice ``--cut`` (default 130, 1 mm): the slices below are the one training case, the slices from
   the cut to the top are held out. Two held-out cases (``--cases``):

   - ``vault``: the top of the head as it is (the head's area falls from about 20,000 voxels to 0 over 46
     slices, the brain ends 25 slices above the cut, and the real volume has 5 empty slices above the head);
   - ``cut``: the same slices with the mask eroded and split at random heights (fixed seed,
     :func:`cut_at_random_heights`): from a random height on, eroded by a distance growing 0.5-1.5 voxels per
     slice (it ends 3 slices earlier than the head); over a run of slices, a band 15-30 voxels wide through
     its centre erased (two islands that merge again). The real image's anatomy outside the new mask is
     replaced by the real background, so it stays the truth.
2. Trains each variant at the same budget (or scores a model trained before: ``--trained VARIANT=DIR``):
   ``defaults`` (the minimal config as it is: today's training defaults), ``no-inplane-cuts`` (the same
   without in-plane cuts, ``data.inplane_cut_p: 0``), ``inplane-cuts-0.25`` (half the default share) and
   ``old-defaults`` (the training defaults before they carried the measured recipe: no air slices, no edge
   cuts, no in-plane cuts, no dropout).
3. Generates each case for ``--seeds`` seeds at the generation defaults (or another ``--guidance-scale``) and
   scores every seed:

   - faithfulness: mean Dice over the tissue classes of a fixed segmenter (nearest class median, fitted on
     the real training slices at 1 mm) on the generated part against its mask; the same segmenter on the
     real part is the ceiling (it is what the real image itself scores);
   - tissue outside the mask, per slice: voxels where the mask is background but the image is brighter than
     the real background + 15 % of the real range, generated against real. A slice passes when the
     generated count is at most 1.5× the real one, counting at least 1 % of the slice's voxels for the real
     one (so an all-air slice may hold a few bright voxels of noise); the worst slice's ratio is reported,
     and per slice the worst seed's;
   - the top slices: mask voxels, and bright voxels in the real and the generated image, for the last
     slices with anatomy and the first empty one (where a model that does not follow the mask paints a
     full cross-section);
   - background error: |mean generated − mean real| over the mask's background, as % of the real range.

   The same scores of the real image sent through the model's frame and back (a perfect generator at the
   model's in-plane resolution) are the first row of each table: what the resolution alone allows.

Writes ``vanishing.json`` and ``vanishing.md`` under ``--out``.
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
from heldout_slab import ANATOMY_FRACTION, ANATOMY_LEVEL, CLASSES, background_error, crop  # noqa: E402

#: Training variants, each spelled out against today's defaults (so that a variant stays the model it was
#: when the defaults move). ``defaults``: today's training defaults (three samples in four cut in-plane, half
#: of them bands; half the samples spared from mask ablation); ``band-heavy``: the defaults before (one
#: sample in two cut, no whole masks); ``kinds-equal``: that with a quarter of the cuts of each kind (the
#: defaults before it); ``no-inplane-cuts``, ``inplane-cuts-0.25``, ``inplane-cuts-0.75``: ``band-heavy``
#: with no cuts, a quarter or three quarters of the samples cut; ``band-9``: ``band-heavy`` with three in four
#: cuts bands; ``full-mask-0.5``: ``band-heavy`` with half the samples spared from mask ablation (every class
#: kept, as in a generation from a whole mask); ``full-mask-0.5-cuts-0.75``: that with three samples in four
#: cut (today's defaults); ``old-defaults``: the training defaults before they carried the recipe
#: (volgen.training.config.RECIPE_*).
_BANDS_3 = {"half_plane": 1, "ellipse": 1, "erosion": 1, "band": 3}
_BEFORE = {"inplane_cut_p": 0.5, "inplane_cut_kinds": _BANDS_3}
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "band-heavy": {"data": _BEFORE, "training": {"full_mask_p": 0.0}},
    "kinds-equal": {
        "data": {**_BEFORE, "inplane_cut_kinds": {"half_plane": 1, "ellipse": 1, "erosion": 1, "band": 1}},
        "training": {"full_mask_p": 0.0},
    },
    "no-inplane-cuts": {"data": {**_BEFORE, "inplane_cut_p": 0.0}, "training": {"full_mask_p": 0.0}},
    "inplane-cuts-0.25": {"data": {**_BEFORE, "inplane_cut_p": 0.25}, "training": {"full_mask_p": 0.0}},
    "inplane-cuts-0.75": {"data": {**_BEFORE, "inplane_cut_p": 0.75}, "training": {"full_mask_p": 0.0}},
    "band-9": {
        "data": {**_BEFORE, "inplane_cut_kinds": {"half_plane": 1, "ellipse": 1, "erosion": 1, "band": 9}},
        "training": {"full_mask_p": 0.0},
    },
    "full-mask-0.5": {"data": _BEFORE, "training": {"full_mask_p": 0.5}},
    "full-mask-0.5-cuts-0.75": {"data": {**_BEFORE, "inplane_cut_p": 0.75}, "training": {"full_mask_p": 0.5}},
    "old-defaults": {
        "data": {"empty_slices": 0, "edge_cut_p": 0.0, "inplane_cut_p": 0.0},
        "model": {"dropout": None},
        "training": {"full_mask_p": 0.0},
    },
}
#: Held-out cases: ``vault`` the top of the head as it is; ``cut`` the same with its mask eroded and split at
#: random heights (:func:`cut_at_random_heights`).
CASES = ("vault", "cut")
#: A slice passes when it has at most this many times the real image's tissue outside the mask.
OUTSIDE_RATIO = 1.5


def prepare_split(data: Path, work: Path, cut: int) -> dict[str, Path]:
    """Write the training case (below the cut) and the held-out part's labels and real image (idempotent)."""
    from volgen.io import read_image, read_label, write_volume

    image = read_image(data / "images" / "colin27.nii.gz")
    labels = read_label(data / "labels" / "colin27.nii.gz")
    top = image.GetSize()[2]
    paths = {"train": work / "data", "seg": work / "top_labels.nii.gz", "real": work / "top_real.nii.gz"}
    paths |= {"cut-seg": work / "cut_labels.nii.gz", "cut-real": work / "cut_real.nii.gz"}
    if all(p.exists() for p in paths.values()):
        return paths
    for sub in ("images", "labels"):
        (paths["train"] / sub).mkdir(parents=True, exist_ok=True)
    write_volume(crop(image, 0, cut), paths["train"] / "images" / "below.nii.gz", overwrite=True)
    write_volume(crop(labels, 0, cut), paths["train"] / "labels" / "below.nii.gz", overwrite=True)
    top_labels, top_image = crop(labels, cut, top), crop(image, cut, top)
    write_volume(top_labels, paths["seg"], overwrite=True)
    write_volume(top_image, paths["real"], overwrite=True)
    cut_labels, cut_image = cut_at_random_heights(top_labels, top_image)
    write_volume(cut_labels, paths["cut-seg"], overwrite=True)
    write_volume(cut_image, paths["cut-real"], overwrite=True)
    return paths


def cut_at_random_heights(
    labels: sitk.Image, image: sitk.Image, seed: int = 0
) -> tuple[sitk.Image, sitk.Image]:
    """The held-out part with its mask eroded and split at random heights (fixed ``seed``), the real image's
    anatomy outside the new mask replaced by the real background (its median), so it stays the truth.

    From a random height on, the mask is eroded by a distance growing 0.5-1.5 voxels per slice (anatomy that
    narrows faster than the head does); over a random run of slices a band through the anatomy's centre at a
    random angle is erased (a mask that splits into islands, which then merge again).
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = sitk.GetArrayFromImage(labels)
    real = sitk.GetArrayFromImage(image)
    keep = mask > 0
    n = len(mask)
    start, rate = int(rng.integers(n // 10, n // 3)), float(rng.uniform(0.5, 1.5))
    for z in range(start, n):
        keep[z] &= ndimage.distance_transform_edt(keep[z]) > (z - start) * rate
    band_start = int(rng.integers(n // 20, n // 4))
    band = range(band_start, band_start + int(rng.integers(5, 12)))
    theta, width = float(rng.uniform(0, np.pi)), float(rng.uniform(15, 30))
    yy, xx = np.mgrid[: mask.shape[1], : mask.shape[2]]
    for z in band:
        if keep[z].any():
            cy, cx = np.argwhere(keep[z]).mean(axis=0)
            keep[z] &= np.abs((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) > width / 2
    air = float(np.median(real[mask == 0]))
    cut_mask = np.where(keep, mask, 0).astype(mask.dtype)
    cut_real = np.where(keep | (mask == 0), real, air).astype(real.dtype)
    out = []
    for array, reference in ((cut_mask, labels), (cut_real, image)):
        volume = sitk.GetImageFromArray(array)
        volume.CopyInformation(reference)
        out.append(volume)
    return out[0], out[1]


def minimal_config(name: str, *, train_dir: Path, output_dir: Path, args: argparse.Namespace):
    """What a new user writes (data, label map, modality, a preset), the budget, and the variant."""
    from volgen.config import validate
    from volgen.models import UNetConfig
    from volgen.training import TrainConfig

    data: dict[str, Any] = {
        "output_dir": str(output_dir),
        "data": {"source": str(train_dir), "label_map": "colin27", "modality": "MR"},
        "model": {"preset": args.preset},
        "training": {
            "max_steps": args.steps,
            "max_minutes": args.max_minutes,
            "batch_size": args.batch_size,
            "checkpoint_every": args.steps,
            "preview_every": 0,
            "log_every": max(1, args.steps // 10),
        },
    }
    if args.size is not None:
        unet = UNetConfig.preset(args.preset).model_dump(mode="json")
        data["model"] = {"unet": {**unet, "sample_size": args.size}}
    if args.pixel_spacing is not None:  # a native-resolution model (docs/resolution.md)
        data["data"].update(frame="native", pixel_spacing=args.pixel_spacing)
    for section, values in VARIANTS[name].items():
        data[section] = {**data.get(section, {}), **values}
    return validate(data, TrainConfig)


class Scorer:
    """Scores generated top parts against the real one (the fixed segmenter, fitted once)."""

    def __init__(self, paths: dict[str, Path], case: str) -> None:
        from volgen.evaluation import IntensitySegmenter
        from volgen.io import read_image, read_label

        train_image = sitk.GetArrayFromImage(read_image(paths["train"] / "images" / "below.nii.gz"))
        train_labels = sitk.GetArrayFromImage(read_label(paths["train"] / "labels" / "below.nii.gz"))
        self.segmenter = IntensitySegmenter().fit(train_image.astype(np.float32), train_labels)
        prefix = "" if case == "vault" else f"{case}-"
        self.case, self.seg_path = case, paths[f"{prefix}seg"]
        self.mask = sitk.GetArrayFromImage(read_label(self.seg_path))
        self.real = sitk.GetArrayFromImage(read_image(paths[f"{prefix}real"])).astype(np.float32)
        lo, hi = np.percentile(self.real[self.mask > 0], (0.5, 99.5))
        self.span = float(hi - lo)
        self.level = float(self.real[self.mask == 0].mean() + ANATOMY_LEVEL * self.span)
        self.floor = ANATOMY_FRACTION * self.mask[0].size
        self.real_outside = self.outside(self.real)
        area = (self.mask > 0).reshape(len(self.mask), -1).sum(axis=1)
        last = int(np.flatnonzero(area)[-1])
        #: the last slices with anatomy and the first empty one (where the mask has vanished)
        self.top_slices = [z for z in (last - 10, last - 5, last - 2, last, last + 1) if 0 <= z < len(area)]
        self.ceiling = self.faithfulness(self.real)
        self.frame: dict[str, Any] | None = (
            None  # the real image through the model's frame (see through_frame)
        )

    def through_frame(
        self,
        size: int,
        paths: dict[str, Path],
        pixel_spacing: float | None = None,
        resampling: str = "mask",
    ) -> None:
        """Score the real image sent through the model's ``size`` px frame (a native model's
        ``pixel_spacing`` frame) and back: what a perfect generator at the model's resolution scores (the
        in-plane blur alone costs faithfulness and adds tissue outside the mask next to its edge)."""
        from _planes_common import slice_frame_round_trip

        from volgen.io import read_image, read_label

        prefix = "" if self.case == "vault" else f"{self.case}-"
        real = slice_frame_round_trip(
            read_label(self.seg_path),
            read_image(paths[f"{prefix}real"]),
            size,
            pixel_spacing=pixel_spacing,
            resampling=resampling,
        )
        name = f"{size} px" if pixel_spacing is None else f"{pixel_spacing:g} mm native"
        name += f", {resampling} resampling"
        scores = self.score(sitk.GetArrayFromImage(real).astype(np.float32))
        self.frame = {"size": size, "name": name, **scores}

    def outside(self, volume: np.ndarray) -> np.ndarray:
        """Per slice, voxels outside the mask brighter than the anatomy level."""
        return ((volume > self.level) & (self.mask == 0)).reshape(len(volume), -1).sum(axis=1)

    def faithfulness(self, volume: np.ndarray) -> float:
        from volgen.evaluation import dice

        d = dice(self.segmenter.predict(volume), self.mask, CLASSES)
        return float(np.nanmean(list(d.values())))

    def score(self, generated: np.ndarray) -> dict[str, Any]:
        ratios = self.outside(generated) / np.maximum(self.real_outside, self.floor)
        bright = (generated > self.level).reshape(len(generated), -1).sum(axis=1)
        return {
            "faithfulness": self.faithfulness(generated),
            "background_error_pct": background_error(generated, self.real, self.mask, self.span),
            "outside_ratio_worst": float(ratios.max()),
            "outside_ratio_worst_slice": int(ratios.argmax()),
            "slices_over": int((ratios > OUTSIDE_RATIO).sum()),
            "outside_ratio_per_slice": [round(float(r), 2) for r in ratios],
            "top_bright": {int(z): int(bright[z]) for z in self.top_slices},
        }


def run_variant(name: str, args: argparse.Namespace, paths: dict[str, Path], scorers: list[Scorer]) -> dict:
    """Train one variant (or resume its finished run, or take ``--trained``'s model), generate ``--seeds``
    seeds of every case and score them."""
    from volgen.api import GenerateSettings, generate
    from volgen.io import read_image
    from volgen.models import load_model, read_metadata
    from volgen.training import train

    work = args.out / "work" / name
    trained = dict(item.split("=", 1) for item in args.trained)
    started = time.monotonic()
    if name in trained:
        model_dir, stopped_early = Path(trained[name]), False
    else:
        config = minimal_config(name, train_dir=paths["train"], output_dir=work / "train", args=args)
        result = train(config, resume=(work / "train").exists())
        model_dir, stopped_early = result.model_dir, result.stopped_early
    train_seconds = time.monotonic() - started
    loaded = load_model(model_dir)
    cases = {}
    suffix = "" if args.guidance_scale is None else f"-w{args.guidance_scale:g}"
    suffix += "-mask" if args.resampling == "mask" else ""  # linear: the folders of the runs before
    suffix += "" if args.edge_sigma is None else f"-sigma{args.edge_sigma:g}"
    for scorer in scorers:
        seeds = []
        for seed in range(args.seeds):
            out = work / f"{scorer.case}{suffix}" / f"seed-{seed}.nii.gz"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                settings = GenerateSettings(
                    seed=seed, guidance_scale=args.guidance_scale, resampling=args.resampling
                )
                generate(scorer.seg_path, out, model=model_dir, loaded=loaded, settings=settings)
            generated = sitk.GetArrayFromImage(read_image(out)).astype(np.float32)
            seeds.append({"seed": seed, **scorer.score(generated)})
            print(
                f"{name} {scorer.case} seed {seed}: worst {seeds[-1]['outside_ratio_worst']:.2f}", flush=True
            )
        cases[scorer.case] = seeds
    training = read_metadata(model_dir).training or {}
    return {
        "variant": name
        + ("" if args.guidance_scale is None else f", guidance {args.guidance_scale:g}")
        + f", {args.resampling} resampling"
        + ("" if args.edge_sigma is None else f" (edge σ {args.edge_sigma:g})"),
        "overrides": VARIANTS[name],
        "model": str(model_dir),
        "training": {
            k: training.get(k)
            for k in ("empty_slices", "edge_cut_p", "inplane_cut_p", "inplane_cut_kinds", "erase_p")
        },
        "steps": training.get("steps"),
        "stopped_early": stopped_early,
        "train_seconds": round(train_seconds, 1),
        "cases": cases,
    }


def table(records: list[dict], scorer: Scorer) -> str:
    mask_area = (scorer.mask > 0).reshape(len(scorer.mask), -1).sum(axis=1)
    real_bright = (scorer.real > scorer.level).reshape(len(scorer.real), -1).sum(axis=1)
    tops = ", ".join(f"z{z}: {mask_area[z]} / {real_bright[z]}" for z in scorer.top_slices)
    lines = [
        f"Case `{scorer.case}`. Real image: faithfulness {scorer.ceiling:.3f}; top slices (mask voxels / "
        f"bright voxels) {tops}.",
        "",
        "| variant | steps | faithfulness mean [worst] | background error mean [worst] % "
        "| worst slice: tissue outside the mask, generated / real, mean [worst seed] "
        "| seeds with every slice ≤ 1.5× | top slices: bright voxels, mean over seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    per_slice = []
    if scorer.frame is not None:
        f = scorer.frame
        top = ", ".join(f"z{z}: {f['top_bright'][z]}" for z in scorer.top_slices)
        lines.append(
            f"| real image through the {f['name']} frame | - | {f['faithfulness']:.3f} | "
            f"{f['background_error_pct']:.1f} | {f['outside_ratio_worst']:.2f} | "
            f"{'1/1' if f['slices_over'] == 0 else '0/1'} | {top} |"
        )
    for r in records:
        s = r["cases"][scorer.case]
        faith = [x["faithfulness"] for x in s]
        bg = [x["background_error_pct"] for x in s]
        worst = [x["outside_ratio_worst"] for x in s]
        top = ", ".join(f"z{z}: {np.mean([x['top_bright'][z] for x in s]):.0f}" for z in scorer.top_slices)
        steps = f"{r['steps']}{' (time cap)' if r['stopped_early'] else ''}"
        lines.append(
            f"| {r['variant']} | {steps} | {np.mean(faith):.3f} [{min(faith):.3f}] | "
            f"{np.mean(bg):.1f} [{max(bg):.1f}] | {np.mean(worst):.2f} [{max(worst):.2f}] | "
            f"{sum(x['slices_over'] == 0 for x in s)}/{len(s)} | {top} |"
        )
        slices = np.max([x["outside_ratio_per_slice"] for x in s], axis=0)
        per_slice.append(f"- {r['variant']}: " + " ".join(f"{v:.1f}" for v in slices))
    lines += [
        "",
        "Per slice (bottom to top), worst seed: tissue outside the mask, generated / real:",
        *per_slice,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=1000, help="training steps per variant (the equal budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="small", help="UNet preset (configs/models)")
    p.add_argument("--size", type=int, default=None, help="slice size in px (default: the preset's)")
    p.add_argument(
        "--pixel-spacing",
        type=float,
        default=None,
        help="mm: train native-resolution models at this in-plane pixel (crops of --size) instead of the "
        "fitted frame",
    )
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument(
        "--resampling",
        choices=("mask", "linear"),
        default="mask",
        help="how volumes come back from the model's frame (volgen generate --resampling); the real image "
        "through the frame comes back the same way. Runs before mask resampling were linear",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="generate at this classifier-free guidance instead of the default (outputs in CASE-wW folders)",
    )
    p.add_argument(
        "--edge-sigma",
        type=float,
        default=None,
        help="mask resampling: σ in voxels of the blend at class boundaries (volgen.frames.EDGE_SIGMA)",
    )
    p.add_argument("--cut", type=int, default=130, help="first held-out axial slice")
    p.add_argument("--max-minutes", type=float, default=None, help="time cap per training (safety)")
    p.add_argument(
        "--trained",
        nargs="*",
        default=[],
        metavar="VARIANT=MODEL_DIR",
        help="score a model trained before (e.g. by an earlier run of this script) instead of training",
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "vanishing")
    args = p.parse_args(argv)
    if args.edge_sigma is not None:
        import volgen.frames

        volgen.frames.EDGE_SIGMA = args.edge_sigma
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("volgen.training").setLevel(logging.INFO)  # training progress: its loss lines
    from volgen.models import UNetConfig

    paths = prepare_split(args.data, args.out / "work", args.cut)
    scorers = [Scorer(paths, case) for case in args.cases]
    size = args.size or UNetConfig.preset(args.preset).sample_size
    for scorer in scorers:
        scorer.through_frame(size, paths, args.pixel_spacing, args.resampling)
    records = [run_variant(name, args, paths, scorers) for name in args.variants]
    command = "python benchmarks/vanishing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"`{command}`\n\n" + "\n".join(table(records, scorer) for scorer in scorers)
    frames = {s.case: {"real_faithfulness": s.ceiling, "through_frame": s.frame} for s in scorers}
    result = {"cases": frames, "variants": records}
    (args.out / "vanishing.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "vanishing.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
