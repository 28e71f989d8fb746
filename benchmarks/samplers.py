"""Sampler x steps study on held-out anatomy: faithfulness, background, per-plane consistency and time.

    python benchmarks/samplers.py --model runs/heldout/MODEL --heldout runs/heldout --seeds 8
    python benchmarks/samplers.py ... --grid ddim:50 dpmsolver++:4,8,20 unipc:4,6,8
    python benchmarks/samplers.py ... --grid ddim:50 dpmsolver++:10 --guidance-scale 1 1.5   # cells × w
    python benchmarks/samplers.py ... --grid dpmsolver++:10 --guidance-interval 0:1 0:0.5 0.5:1   # steps
    python benchmarks/samplers.py ... --grid ddim:50:fp32:0-0 dpmsolver++:4,6:bf16:0.7-1,0-0   # cells
    python benchmarks/samplers.py ... --grid dpmsolver++:6 --rho-fine 0 0.5 0.9 auto   # the noise's fine ρ

``--heldout`` is the folder ``benchmarks/heldout_slab.py`` writes: ``slab_labels.nii.gz`` (the held-out
segmentation the model never saw), ``slab_real.nii.gz`` (the real image there) and ``data/`` (the training
split, whose real image fits the fixed intensity segmenter once). For every sampler and step count of
``--grid`` and every seed, one volume is generated in memory with :class:`volgen.generation.VolumeGenerator`
(the model is set up once) and scored:

- faithfulness: mean Dice over the foreground classes of :class:`volgen.evaluation.IntensitySegmenter`
  (class medians fitted on the real training slices) on the generated slab against the input mask;
- background error: |mean generated - mean real| over the background voxels, as % of the real image's
  p0.5-p99.5 range;
- per-plane consistency (:func:`volgen.evaluation.plane_consistency`, features off): neighbour-difference
  ratio inside the body and texture-correlation ratio along each array axis (1.0 = like the real slab);
- seconds per volume (wall clock of ``generate``; the first call of each sampler is a warm-up, not timed).

The reference implementation's way (one slice per UNet forward, DDIM 50 steps, float32) is timed with the same
UNet as one-slice float32 forwards (after a warm-up), extrapolated to slices x 50, before every row and after
the last; each row's ``x ref`` is the mean of the timings before and after it over the row's seconds per
volume (the machine's load drifts over a long run). ``--guidance-interval START:STOP`` guides only the steps
whose position in the schedule is in ``[START, STOP)`` (``SegmentationToVolumePipeline.plan``'s
``guidance_interval``; 0 is the noisiest step; default ``volgen.defaults.GUIDANCE_INTERVAL``).
``--precision`` runs every cell in each precision given (``auto``, ``fp32``, ``bf16``: one generator each,
the model loaded once). A grid item ``SAMPLER:STEPS[:PRECISION[:START-STOP[,START-STOP...]]]`` fixes its
own precision and guided step ranges instead. Rows report mean and worst seed and the UNet passes per slice
(slice-forwards of the run over the slab's slices, chunks padded). Output: ``OUT/samplers.json`` and
``OUT/samplers.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from volgen import defaults
from volgen.evaluation import IntensitySegmenter, dice, plane_consistency
from volgen.generation import GenerateSettings, VolumeGenerator
from volgen.io import read_image, read_label
from volgen.models import load_model

DEFAULT_GRID = (
    "ddim:50",
    "ddim:10,20",
    "dpmsolver++:4,6,8,10,15,20",
    "dpmsolver++3m:6,10,20",
    "sde-dpmsolver++:10,20",
    "unipc:4,6,8,10,15,20",
    "deis:6,10,20",
)


Interval = tuple[float, float] | None  # None: the pipeline's default (volgen.defaults.GUIDANCE_INTERVAL)


def parse_grid(
    items: list[str], precisions: list[str], intervals: list[Interval]
) -> list[tuple[str, int, str, Interval]]:
    """``name:4,6,8[:precision[:start-stop,...]]`` items -> (sampler, steps, precision, interval) cells, in
    order; an item without its own precision or intervals takes each of ``precisions`` / ``intervals``."""
    grid = []
    for item in items:
        name, steps, *rest = item.split(":")
        if not steps or len(rest) > 2:
            raise SystemExit(
                f"--grid item {item!r}: write SAMPLER:STEPS[,STEPS...][:PRECISION[:START-STOP,...]]"
            )
        item_precisions = [rest[0]] if rest else precisions
        item_intervals = intervals
        if len(rest) == 2:
            item_intervals = [tuple(float(v) for v in r.split("-")) for r in rest[1].split(",")]
        grid += [
            (name, int(n), precision, interval)
            for precision in item_precisions
            for interval in item_intervals
            for n in steps.split(",")
        ]
    return grid


def fit_segmenter(heldout: Path) -> IntensitySegmenter:
    """The intensity segmenter, fitted once on the real training slices of the held-out split."""
    images, masks = [], []
    for path in sorted((heldout / "data" / "images").glob("*.nii.gz")):
        images.append(sitk.GetArrayFromImage(sitk.Cast(read_image(path), sitk.sitkFloat32)).ravel())
        masks.append(sitk.GetArrayFromImage(read_label(heldout / "data" / "labels" / path.name)).ravel())
    if not images:
        raise SystemExit(f"{heldout / 'data' / 'images'}: no training images (run heldout_slab.py first)")
    return IntensitySegmenter().fit(np.concatenate(images), np.concatenate(masks))


@torch.no_grad()
def reference_seconds(generator: VolumeGenerator, slices: int, forwards: int = 10) -> float:
    """Seconds the reference way takes for ``slices`` slices: one-slice float32 UNet forwards, DDIM 50."""
    unet = generator.pipeline.unet
    size = generator.metadata.slice_size
    x = torch.randn(1, unet.config.in_channels, size, size, device=generator.device)
    t = torch.tensor([500], device=generator.device)

    def forward() -> None:
        unet(x, t, class_labels=None).sample.float().sum().item()

    forward()
    started = time.perf_counter()
    for _ in range(forwards):
        forward()
    return (time.perf_counter() - started) / forwards * slices * 50


def score(
    volume: np.ndarray, real: np.ndarray, mask: np.ndarray, segmenter: IntensitySegmenter, span: float
) -> dict:
    classes = [int(c) for c in np.unique(mask) if c > 0]
    d = dice(segmenter.predict(volume), mask, classes)
    background = mask == 0
    planes = plane_consistency(volume, real, mask, features=False)
    return {
        "faithfulness": float(np.nanmean([d[c] for c in classes])),
        "background_error_pct": float(100 * abs(volume[background].mean() - real[background].mean()) / span),
        "step_ratio": {a: p.step_body["ratio"] for a, p in planes.items()},
        "texture_ratio": {a: p.texture["ratio"] for a, p in planes.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder trained without the slab")
    parser.add_argument("--heldout", type=Path, required=True, help="folder written by heldout_slab.py")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID), help="SAMPLER:STEPS[,STEPS...]")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        nargs="*",
        default=[],
        help="classifier-free guidance values, each with every grid cell (default: the model's)",
    )
    parser.add_argument(
        "--guidance-interval",
        nargs="*",
        default=[],
        help="START:STOP positions of the guided steps, each with every cell (default: all steps)",
    )
    parser.add_argument(
        "--rho-fine",
        nargs="*",
        default=[],
        help="ρ of the noise's fine scales (a number or auto), each with every cell (default: volgen's)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision", nargs="+", default=["auto"], help="auto, fp32, bf16: each cell in each (default: auto)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/samplers"))
    args = parser.parse_args()

    segmentation = read_label(args.heldout / "slab_labels.nii.gz")
    real = sitk.GetArrayFromImage(sitk.Cast(read_image(args.heldout / "slab_real.nii.gz"), sitk.sitkFloat32))
    mask = sitk.GetArrayFromImage(segmentation)
    lo, hi = np.percentile(real, [0.5, 99.5])
    span = float(hi - lo) or 1.0
    segmenter = fit_segmenter(args.heldout)
    model = load_model(args.model)
    generators = {p: VolumeGenerator(model, device=args.device, precision=p) for p in args.precision}
    intervals = [tuple(float(v) for v in i.split(":")) for i in args.guidance_interval] or [None]
    fines = [v if v == "auto" else float(v) for v in args.rho_fine] or [defaults.FINE_NOISE_CORRELATION]
    cells = [
        (w, fine, *cell)
        for w in args.guidance_scale or [None]
        for fine in fines
        for cell in parse_grid(args.grid, args.precision, intervals)
    ]
    for precision in {cell[4] for cell in cells} - set(generators):
        generators[precision] = VolumeGenerator(model, device=args.device, precision=precision)
    fp32 = VolumeGenerator(model, device=args.device, precision="fp32")  # the reference way's precision
    slices = int(mask.shape[0])
    meta = {
        "model": str(args.model),
        "slab": list(mask.shape),
        "seeds": args.seeds,
        "device": str(fp32.device),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if fp32.device.type == "cuda" else None,
        "segmenter_on_real": score(real, real, mask, segmenter, span)["faithfulness"],
    }
    ref_timings = [reference_seconds(fp32, slices)]
    print(
        f"reference way (one slice per forward, DDIM 50, fp32): {ref_timings[0]:.2f} s / volume", flush=True
    )

    rows = []
    warmed = set()
    for guidance, fine, sampler, steps, precision, interval in cells:
        generator = generators[precision]
        plan = type(generator.pipeline).plan.__get__(generator.pipeline)
        # the guided steps: the pipeline's plan with this interval (the generator resolves every run there)
        generator.pipeline.plan = (
            plan if interval is None else functools.partial(plan, guidance_interval=interval)
        )
        if (sampler, precision) not in warmed:
            generator.generate(
                segmentation, settings=GenerateSettings(scheduler=sampler, num_inference_steps=2)
            )
            warmed.add((sampler, precision))
        per_seed, seconds = [], []
        for seed in range(args.seeds):
            settings = GenerateSettings(
                scheduler=sampler,
                num_inference_steps=steps,
                seed=seed,
                guidance_scale=guidance,
                fine_noise_correlation=fine,
            )
            started = time.perf_counter()
            out = generator.generate(segmentation, settings=settings)
            seconds.append(time.perf_counter() - started)
            volume = sitk.GetArrayFromImage(sitk.Cast(out.image, sitk.sitkFloat32))
            per_seed.append(score(volume, real, mask, segmenter, span))
        ref_timings.append(reference_seconds(fp32, slices))
        ref_seconds = (ref_timings[-2] + ref_timings[-1]) / 2
        forwards = generator.pipeline.plan(
            slices, num_inference_steps=steps, guidance_scale=generator.guidance_scale(settings)
        ).forwards
        faith = [s["faithfulness"] for s in per_seed]
        bg = [s["background_error_pct"] for s in per_seed]
        row = {
            "sampler": sampler,
            "steps": steps,
            "precision": generator.precision,
            "guidance_scale": generator.guidance_scale(settings),
            "guidance_interval": list(interval or defaults.GUIDANCE_INTERVAL),
            "fine_noise_correlation": fine,
            "passes_per_slice": forwards / slices,
            "seconds_per_volume": float(np.median(seconds)),
            "reference_seconds_per_volume": ref_seconds,
            "x_reference": ref_seconds / float(np.median(seconds)),
            "faithfulness_mean": float(np.mean(faith)),
            "faithfulness_worst": float(np.min(faith)),
            "background_error_pct_mean": float(np.mean(bg)),
            "background_error_pct_worst": float(np.max(bg)),
            "step_ratio": {a: float(np.mean([s["step_ratio"][a] for s in per_seed])) for a in "zyx"},
            "texture_ratio": {a: float(np.mean([s["texture_ratio"][a] for s in per_seed])) for a in "zyx"},
            "step_ratio_range": {a: _range([s["step_ratio"][a] for s in per_seed]) for a in "zyx"},
            "texture_ratio_range": {a: _range([s["texture_ratio"][a] for s in per_seed]) for a in "zyx"},
            "per_seed": per_seed,
        }
        rows.append(row)
        print(
            f"{sampler} {steps} {row['precision']}, guidance {row['guidance_scale']:g} on "
            f"{row['guidance_interval']}: faithfulness {row['faithfulness_mean']:.3f} (worst "
            f"{row['faithfulness_worst']:.3f}), background {row['background_error_pct_mean']:.1f} %, "
            f"{row['seconds_per_volume']:.2f} s, x{row['x_reference']:.1f}",
            flush=True,
        )
        generator.pipeline.plan = plan
        write_results(args.out, meta, rows, ref_timings)
    print((args.out / "samplers.md").read_text())


def _range(values: list[float]) -> list[float]:
    return [float(np.min(values)), float(np.max(values))]


def write_results(out: Path, meta: dict, rows: list[dict], ref_timings: list[float]) -> None:
    """``OUT/samplers.json`` and ``OUT/samplers.md`` with the rows so far (written after every row)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = meta | {
        "precisions": sorted({r["precision"] for r in rows}),
        "reference_seconds_per_volume": float(np.median(ref_timings)),
        "reference_timings": ref_timings,
    }
    (out / "samplers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    reference = meta["reference_seconds_per_volume"]
    lines = [
        f"Segmenter on the real slab: {meta['segmenter_on_real']:.3f}. Reference way: {reference:.2f} "
        f"s / volume (median of {len(ref_timings)} timings, {min(ref_timings):.2f}-{max(ref_timings):.2f}).",
        "",
        "| sampler | steps | precision | guidance | fine ρ | UNet passes / slice | faithfulness mean | worst "
        "| background err % mean | worst | step ratio z/y/x | texture ratio z/y/x | s / volume | x ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = "/".join(f"{r['step_ratio'][a]:.2f}" for a in "zyx")
        texture = "/".join(f"{r['texture_ratio'][a]:.2f}" for a in "zyx")
        faith = f"{r['faithfulness_mean']:.3f} | {r['faithfulness_worst']:.3f}"
        background = f"{r['background_error_pct_mean']:.1f} | {r['background_error_pct_worst']:.1f}"
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['precision']} | {r['guidance_scale']:g} on "
            f"{r['guidance_interval'][0]:g}-{r['guidance_interval'][1]:g} "
            f"| {r.get('fine_noise_correlation', '')} | {r['passes_per_slice']:.1f} "
            f"| {faith} | {background} "
            f"| {step} | {texture} "
            f"| {r['seconds_per_volume']:.2f} | {r['x_reference']:.1f} |"
        )
    (out / "samplers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
