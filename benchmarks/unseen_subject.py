"""A second held-out case of another kind: a subject the model never saw, with no head around the brain.

    python benchmarks/unseen_subject.py --out runs/unseen                       # the embedded model
    python benchmarks/unseen_subject.py --models MODEL_A MODEL_B --guidance-scale 1 1.25 --out runs/unseen

The subject is the INIA19 rhesus macaque T1 template (``inia19-t1-brain.nii.gz``, skull-stripped, 0.5 mm),
shipped by Debian's ``mricron-data`` next to Colin27: another species, another brain shape and size, and no
head tissue at all, so every voxel outside the brain is air (0) in the real image. Its tissue labels are
derived as ``examples/colin27/prepare.py`` derives Colin27's (brain = T1 > 0, largest component, holes
filled; 1D k-means CSF < GM < WM inside it; 3x3x3 majority filter), with Colin27's label values (2, 3, 4; no
head, 1), then resampled to ``--spacing`` mm (labels nearest neighbour, image linear).

For every model, guidance value and seed the labels are generated with ``volgen.api.generate`` (the
generation defaults otherwise) and scored against the real T1:

- faithfulness: mean Dice over CSF, GM and WM of :class:`volgen.evaluation.IntensitySegmenter` (nearest class
  median) fitted once on the real image; both images are first scaled by their own 0.5-99.5th percentiles
  (MR intensities are relative: a Colin27-trained model writes Colin27's scale). Ceilings: the real image,
  and the real image through the model's slicing frame and back;
- background error: |mean generated - mean real| over the voxels outside the brain, % of the real range;
- grain: in the air over 6 voxels from the brain (``_planes_common.air_grain``), the correlation of the
  generated image's fine detail (minus its 5-voxel box mean) between neighbouring voxels along the slice
  axis and in-plane; the real image is 0 there. Grain alike along the slice axis and not in-plane is a
  streak in every reslice;
- ring: in the shell of air 2-6 mm outside the brain (beyond the blur of the model's 64 px frame: the real
  image through the frame has 0.1 % there), the mean of the generated image (% of the range; real 0) and the
  share of voxels above 15 % of the range; a seed has a ring when that share is over 5 % (a skull or scalp
  painted around the brain: the issue's failure on this subject).

Writes ``OUT/unseen.json``, ``OUT/unseen.md`` and the volumes under ``OUT/volumes``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "colin27"))
from _planes_common import air_grain, slice_frame_round_trip  # noqa: E402
from prepare import CSF, GM, WM, kmeans_1d, largest_component, majority_filter  # noqa: E402

from volgen import defaults  # noqa: E402
from volgen.api import GenerateSettings, default_model_dir, generate  # noqa: E402
from volgen.evaluation import IntensitySegmenter, dice  # noqa: E402
from volgen.generation.settings import parse_background_noise_correlation  # noqa: E402
from volgen.io import read_image, write_volume  # noqa: E402

TEMPLATE = Path("/usr/share/mricron/templates/inia19-t1-brain.nii.gz")
CLASSES = (CSF, GM, WM)
SHELL_MM = (2.0, 6.0)
LEVEL, FRACTION = 0.15, 0.05


def prepare(template: Path, spacing: float, work: Path) -> tuple[Path, Path]:
    """The subject's T1 and derived tissue labels at ``spacing`` mm (written once, then reused)."""
    image_path, label_path = work / "t1.nii.gz", work / "labels.nii.gz"
    if image_path.exists() and label_path.exists():
        return image_path, label_path
    t1 = sitk.Cast(sitk.ReadImage(str(template)), sitk.sitkFloat32)
    brain_image = sitk.BinaryFillhole(largest_component(sitk.Cast(t1 > 0, sitk.sitkUInt8)))
    brain = sitk.GetArrayFromImage(brain_image).astype(bool)
    values = sitk.GetArrayFromImage(t1)
    centres = kmeans_1d(values[brain], np.percentile(values[brain], [10, 50, 90]))
    tissue = (CSF + np.searchsorted((centres[1:] + centres[:-1]) / 2, values)).astype(np.uint8)
    labels = majority_filter(np.where(brain, tissue, 0).astype(np.uint8), brain, CLASSES)
    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.CopyInformation(t1)
    size = [int(round(n * s / spacing)) for n, s in zip(t1.GetSize(), t1.GetSpacing(), strict=True)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(t1.GetOrigin())
    grid.SetDirection(t1.GetDirection())
    work.mkdir(parents=True, exist_ok=True)
    write_volume(
        sitk.Resample(t1, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32), image_path
    )
    write_volume(
        sitk.Resample(label_image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
        label_path,
    )
    return image_path, label_path


def scaled(volume: np.ndarray) -> np.ndarray:
    low, high = np.percentile(volume, (0.5, 99.5))
    return (volume - low) / max(high - low, 1e-6)


class Scorer:
    def __init__(self, real: np.ndarray, labels: np.ndarray, spacing: float) -> None:
        self.labels = labels
        self.outside = labels == 0
        distance = sitk.SignedMaurerDistanceMap(
            sitk.GetImageFromArray((labels > 0).astype(np.uint8)),
            insideIsPositive=False,
            useImageSpacing=False,
        )
        d = sitk.GetArrayFromImage(distance) * spacing
        self.shell = (d > SHELL_MM[0]) & (d <= SHELL_MM[1])
        self.real = scaled(real)
        self.segmenter = IntensitySegmenter().fit(self.real, labels)

    def faithfulness(self, volume: np.ndarray) -> float:
        d = dice(self.segmenter.predict(scaled(volume)), self.labels, CLASSES)
        return float(np.nanmean(list(d.values())))

    def score(self, volume: np.ndarray) -> dict[str, float | bool]:
        v = scaled(volume)
        return {
            "faithfulness": self.faithfulness(volume),
            "background_error_pct": float(abs(v[self.outside].mean() - self.real[self.outside].mean()) * 100),
            "shell_mean_pct": float(v[self.shell].mean() * 100),
            "shell_bright_pct": float(np.mean(v[self.shell] > LEVEL) * 100),
            "ring": bool(np.mean(v[self.shell] > LEVEL) > FRACTION),
            **air_grain(v, self.labels),
        }


def round_trip(labels_path: Path, image_path: Path, model: Path, resampling: str) -> np.ndarray:
    """The real image through the model's slicing frame and back (what a perfect model of it gives)."""
    from volgen.models import load_model

    meta = load_model(model).metadata
    real = read_image(image_path)
    labels = sitk.ReadImage(str(labels_path))
    back = slice_frame_round_trip(
        labels, real, meta.slice_size, meta.slice_axis, meta.pixel_spacing, resampling=resampling
    )
    return sitk.GetArrayFromImage(back)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, nargs="+", default=[default_model_dir()])
    parser.add_argument("--guidance-scale", type=float, nargs="*", default=[], help="default: the model's")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, nargs="*", default=[], help="default: the model's (else volgen's)"
    )
    parser.add_argument(
        "--rho-fine", nargs="*", default=[], help="fine-scale noise ρ values, or auto (default: volgen's)"
    )
    parser.add_argument(
        "--rho-fine-background",
        nargs="*",
        default=[],
        help="background fine ρ values, or same (default: the model's)",
    )
    parser.add_argument("--spacing", type=float, default=1.0, help="mm, isotropic")
    parser.add_argument(
        "--resampling",
        choices=defaults.RESAMPLINGS,
        default=defaults.RESAMPLING,
        help="back from the model's frame (volgen generate --resampling), the frame ceiling too",
    )
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "unseen")
    args = parser.parse_args()
    if not args.template.exists():
        raise SystemExit(f"{args.template}: not found (apt-get install mricron-data)")
    image_path, label_path = prepare(args.template, args.spacing, args.out / "subject")
    real = sitk.GetArrayFromImage(read_image(image_path)).astype(np.float64)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    scorer = Scorer(real, labels, args.spacing)
    ceilings = {"real": scorer.faithfulness(real)}
    rows = []
    for k, model in enumerate(args.models):
        back = round_trip(label_path, image_path, model, args.resampling)
        ceilings[f"frame {k}"] = scorer.faithfulness(back)
        variants = itertools.product(
            args.guidance_scale or [None],
            args.steps or [None],
            [v if v == "auto" else float(v) for v in args.rho_fine] or [defaults.FINE_NOISE_CORRELATION],
            [parse_background_noise_correlation(v) for v in args.rho_fine_background] or [None],
        )
        for w, steps, fine, background in variants:
            seeds = []
            for seed in range(args.seeds):
                tag = (
                    ("" if (steps, fine) == (None, defaults.FINE_NOISE_CORRELATION) else f"-{steps}-{fine}")
                    + ("" if background is None else f"-bg{background}")
                    + ("" if args.resampling == defaults.RESAMPLING else f"-{args.resampling}")
                )
                out = args.out / "volumes" / f"m{k}-w{w}{tag}-seed{seed}.nii.gz"
                out.parent.mkdir(parents=True, exist_ok=True)
                settings = GenerateSettings(
                    seed=seed,
                    guidance_scale=w,
                    num_inference_steps=steps,
                    fine_noise_correlation=fine,
                    background_fine_noise_correlation=background,
                    resampling=args.resampling,
                )
                generate(label_path, out, model=model, settings=settings, overwrite=True, device="cpu")
                record = json.loads(Path(f"{out}.json").read_text())
                ran, steps_ran = record["guidance_scale"], record["settings"]["num_inference_steps"]
                background_ran = record["settings"].get("background_fine_noise_correlation")
                volume = sitk.GetArrayFromImage(read_image(out)).astype(np.float64)
                seeds.append({"seed": seed, **scorer.score(volume)})
                print(f"{model} w {ran:g} seed {seed}: {seeds[-1]}", flush=True)
            faith = [s["faithfulness"] for s in seeds]
            rows.append(
                {
                    "model": str(model),
                    "frame_ceiling": ceilings[f"frame {k}"],
                    "guidance_scale": ran,
                    "steps": steps_ran,
                    "fine_noise_correlation": fine,
                    "background_fine_noise_correlation": background_ran,
                    "resampling": args.resampling,
                    "faithfulness_mean": float(np.mean(faith)),
                    "faithfulness_worst": float(np.min(faith)),
                    "background_error_pct_worst": max(s["background_error_pct"] for s in seeds),
                    "shell_mean_pct": float(np.mean([s["shell_mean_pct"] for s in seeds])),
                    "shell_bright_pct": float(np.mean([s["shell_bright_pct"] for s in seeds])),
                    "rings": sum(s["ring"] for s in seeds),
                    "grain_corr_z": float(np.nanmean([s["grain_corr_z"] for s in seeds])),
                    "grain_corr_inplane": float(np.nanmean([s["grain_corr_inplane"] for s in seeds])),
                    "per_seed": seeds,
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unseen.json").write_text(json.dumps({"ceilings": ceilings, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Segmenter on the real image: {ceilings['real']:.3f}. Back from the model's frame: "
        f"{args.resampling} resampling (the frame ceiling too).",
        "",
        "| model | guidance | steps | fine ρ | background fine ρ | frame ceiling | faithfulness mean [worst] "
        "| background error worst % | shell mean % (real 0) | shell above 15 % of range, % "
        "| seeds with a ring | air grain corr. z / in-plane |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        background = r["background_fine_noise_correlation"]
        lines.append(
            f"| {r['model']} | {r['guidance_scale']:g} | {r['steps']} | {r['fine_noise_correlation']} "
            f"| {'same' if background is None else background} | {r['frame_ceiling']:.3f} "
            f"| {r['faithfulness_mean']:.3f} [{r['faithfulness_worst']:.3f}] "
            f"| {r['background_error_pct_worst']:.1f} | {r['shell_mean_pct']:.1f} "
            f"| {r['shell_bright_pct']:.1f} | {r['rings']}/{len(r['per_seed'])} "
            f"| {r['grain_corr_z']:.2f} / {r['grain_corr_inplane']:.2f} |"
        )
    (args.out / "unseen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
