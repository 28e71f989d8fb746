"""Per-plane 3D consistency and faithfulness against ρ and x0 smoothing, over several seeds.

    OMP_NUM_THREADS=1 python benchmarks/planes.py --rho 0 0.5 0.9 0.99 --rho-fine 0 --x0-smoothing 0 1 \
        --seeds 0 1 2 3 4 5 6 7 --steps 10 --out runs/planes

Generates the Colin27 example segmentation (examples/colin27_tissues_2mm.nii.gz, or ``--segmentation``) with a
model (default: the embedded one) for every (ρ, x0 σ, seed), keeps each volume under ``--out/volumes`` (reused
when the script runs again), and scores it against the real Colin27 T1 on the segmentation's grid (``--real
native``, the default: the real image at its own resolution, which sees blur and copied texture), or passed
through the model's slicing frame (``--real frame``: the real image as a perfect generator of the 64 px frame
would return it; this measures volgen against itself), or both (``--real both``, two tables): faithfulness
(intensity segmenter fitted on the real image and the mask: nearest class median), background error (mean
generated - real outside the head, as a fraction of the real head's p1-p99 range) and the per-plane metrics of
``volgen evaluate`` (volgen.evaluation.planes). Prints a Markdown table (mean and worst seed per setting) and
writes ``--out/planes.json``.

The embedded model was trained on the whole Colin27 head: this is anatomy it has seen, not a held-out test
(benchmarks/planes_heldout.py is).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import SimpleITK as sitk
from _planes_common import score, slice_frame_round_trip, table

from volgen import defaults
from volgen.api import GenerateSettings, default_model_dir, generate
from volgen.generation.settings import parse_background_noise_correlation
from volgen.io import read_image, read_label, write_volume

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "colin27_tissues_2mm.nii.gz"
T1 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def real_on_grid(
    segmentation: Path, out: Path, model: Path, *, frame: bool, resampling: str = defaults.RESAMPLING
) -> Path:
    """The real T1 on the segmentation's grid; with ``frame``, after the model's slicing-frame round trip (the
    resampling every generated volume goes through: into the model's slices and back)."""
    if out.exists():
        return out
    from volgen.frames import resample_to_grid
    from volgen.models import load_model

    meta = load_model(model).metadata
    grid = read_label(segmentation)
    classes = meta.label_map.remap_image(grid)
    t1 = sitk.Resample(read_image(T1), grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if not frame:
        write_volume(t1, out, overwrite=True)
        return out
    back = slice_frame_round_trip(
        classes, t1, meta.slice_size, meta.slice_axis, meta.pixel_spacing, resampling=resampling
    )
    write_volume(resample_to_grid(back, grid), out, overwrite=True)
    return out


def generate_all(args: argparse.Namespace) -> list[dict]:
    volumes = args.out / "volumes"
    volumes.mkdir(parents=True, exist_ok=True)
    rows = []
    guidance = args.guidance_scale or [None]  # None: the model's default (volgen.defaults)
    combos = itertools.product(guidance, args.rho, args.rho_fine, args.x0_smoothing, args.seeds)
    for w, rho, fine, sigma, seed in combos:
        tag = "" if w is None else f"w{w:g}-"
        fine_tag = "" if fine == rho else f"-fine{fine}"  # one ρ at every scale: the earlier names
        fine_tag += "" if args.resampling == defaults.RESAMPLING else f"-{args.resampling}"
        fine_tag += "" if args.rho_fine_background is None else f"-bg{args.rho_fine_background}"
        path = volumes / f"{tag}rho{rho}{fine_tag}-s{sigma}-seed{seed}.nii.gz"
        if not path.exists():
            settings = GenerateSettings(
                seed=seed,
                noise_correlation=rho,
                fine_noise_correlation=fine,
                background_fine_noise_correlation=parse_background_noise_correlation(
                    args.rho_fine_background
                ),
                x0_smoothing=sigma,
                num_inference_steps=args.steps,
                scheduler=args.scheduler,
                guidance_scale=w,
                resampling=args.resampling,
            )
            started = time.perf_counter()
            generate(args.segmentation, path, model=args.model, overwrite=True, settings=settings)
            print(f"{path.name}: {time.perf_counter() - started:.0f} s", flush=True)
        rows.append(
            {"guidance": w, "rho": rho, "fine": fine, "x0_smoothing": sigma, "seed": seed, "path": path}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument(
        "--segmentation",
        type=Path,
        default=EXAMPLE,
        help="a Colin27 tissue segmentation on any grid (default: the 2 mm example; the real T1 is resampled "
        "onto it), e.g. the 1 mm one examples/colin27/prepare.py writes",
    )
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.99])
    parser.add_argument(
        "--rho-fine",
        type=float,
        nargs="+",
        default=[defaults.FINE_NOISE_CORRELATION],
        help="ρ of the noise's fine scales (a value equal to --rho: one ρ at every scale)",
    )
    parser.add_argument(
        "--rho-fine-background", default=None, help="a number, auto or same (default: the model's)"
    )
    parser.add_argument("--x0-smoothing", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", choices=defaults.SCHEDULERS, default=defaults.SCHEDULER)
    parser.add_argument(
        "--guidance-scale",
        type=float,
        nargs="*",
        default=[],
        help="each value a set of rows (default: the model's)",
    )
    parser.add_argument(
        "--resampling",
        choices=defaults.RESAMPLINGS,
        default=defaults.RESAMPLING,
        help="back from the model's frame (volgen generate --resampling); --real frame too",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "planes")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument(
        "--real",
        choices=("native", "frame", "both"),
        default="native",
        help="the real image at its own resolution, through the model's frame, or both (two tables)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = generate_all(args)
    if args.generate_only:
        return
    references = ("native", "frame") if args.real == "both" else (args.real,)
    results = {}
    for reference in references:
        results[reference] = score_all(args, rows, reference)
    (args.out / "planes.json").write_text(json.dumps(results, indent=1))


def score_all(args: argparse.Namespace, rows: list[dict], reference: str) -> dict:
    """Scores every generated volume against the real T1 as ``reference`` says; prints the table."""
    from volgen.evaluation import IntensitySegmenter

    real_path = real_on_grid(
        args.segmentation,
        args.out / f"real-{reference}.nii.gz",
        args.model,
        frame=reference == "frame",
        resampling=args.resampling,
    )
    segmentation = read_label(args.segmentation)
    mask = sitk.GetArrayFromImage(segmentation)
    real = sitk.GetArrayFromImage(read_image(real_path)).astype("float64")
    segmenter = IntensitySegmenter().fit(real, mask)
    ceiling = score(real, real, mask, segmenter, range(1, 5))["mean_dice"]
    groups: dict[str, list[dict]] = {}
    scored = []
    for row in rows:
        generated = sitk.GetArrayFromImage(read_image(row["path"])).astype("float64")
        result = score(generated, real, mask, segmenter, range(1, 5), segmentation.GetDirection())
        scored.append({**row, **result, "path": str(row["path"])})
        guided = "" if row["guidance"] is None else f"guidance {row['guidance']:g}, "
        fine = "" if row["fine"] == row["rho"] else f", fine ρ {row['fine']}"
        air = "" if args.rho_fine_background is None else f", background ρ {args.rho_fine_background}"
        name = f"{guided}ρ {row['rho']}{fine}{air}, x0 σ {row['x0_smoothing']}"
        groups.setdefault(name, []).append(scored[-1])
        print(f"{row['path']}: Dice {result['mean_dice']:.3f}, in range {result['in_range']}", flush=True)
    spacing = "×".join(f"{v:g}" for v in segmentation.GetSpacing())
    where = f"at its own {spacing} mm" if reference == "native" else "through the model's slicing frame"
    print(
        f"\nagainst the real T1 {where}: segmenter on the real image: mean Dice {ceiling:.3f}; "
        f"{args.steps} steps, {args.scheduler}\n"
    )
    print(table(groups))
    return {"segmenter_on_real": ceiling, "rows": scored}


if __name__ == "__main__":
    main()
