"""Downstream utility on the held-out cases: segmenters trained on real, synthetic and real + synthetic pairs.

    python benchmarks/downstream.py --dataset colin27-slab --seeds 8 --out runs/downstream
    python benchmarks/downstream.py --dataset macaque --seeds 8 --out runs/downstream

Each dataset is one subject split into axial slabs along the image's third axis; the test side is a slab in
the middle, the training side the slices below and above it (two training cases):

- ``colin27-slab``: the Colin27 T1 and its tissue labels (``data/colin27``, made by
  ``examples/colin27/prepare.py``), test slab z = 80..109 (30 mm through the ventricles: the held-out slab
  of ``benchmarks/heldout_slab.py``), training slabs z = 50..79 and 110..139 (30 slices each: a CPU-sized
  generation budget per seed).
  The embedded model was trained on all of Colin27, this slab included: its synthetic images are not
  independent of the test image (the generator has seen it), so this is the optimistic case;
- ``macaque``: the INIA19 rhesus macaque T1 (skull-stripped) and its derived tissue labels at 1 mm, as
  ``benchmarks/unseen_subject.py`` makes them; the test slab is the middle third of the brain's extent. The
  generator never saw this subject (nor any macaque, nor a brain without a head).

For each, ``volgen evaluate-downstream`` (:func:`volgen.evaluation.downstream.run_downstream`) runs with the
embedded model and writes ``OUT/DATASET/downstream.{json,csv,png}`` and ``OUT/DATASET/downstream.md``; the
equivalent command line is printed and written there too. Reruns reuse the generated images and finished runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from heldout_slab import crop  # noqa: E402
from unseen_subject import TEMPLATE  # noqa: E402
from unseen_subject import prepare as prepare_macaque  # noqa: E402

from volgen.default_model import resolve_model  # noqa: E402
from volgen.evaluation.downstream import (  # noqa: E402
    DownstreamOptions,
    read_split,
    run_downstream,
    write_downstream_report,
)
from volgen.generation import GenerateSettings  # noqa: E402
from volgen.io import read_image, read_label, write_volume  # noqa: E402

DATASETS = ("colin27-slab", "macaque")


def write_split(
    image: sitk.Image, labels: sitk.Image, slab: tuple[int, int], folder: Path, margin: int | None = None
) -> None:
    """``folder/train`` (below, above: ``margin`` slices each, default all) and ``folder/test`` (slab), each
    with images/ and labels/."""
    z0, z1 = slab
    end = image.GetSize()[2]
    below, above = (0, z0), (z1, end)
    if margin is not None:
        below, above = (max(0, z0 - margin), z0), (z1, min(end, z1 + margin))
    parts = {"train": {"below": below, "above": above}, "test": {"slab": (z0, z1)}}
    for side, cases in parts.items():
        for sub in ("images", "labels"):
            (folder / side / sub).mkdir(parents=True, exist_ok=True)
        for name, (a, b) in cases.items():
            write_volume(crop(image, a, b), folder / side / "images" / f"{name}.nii.gz", overwrite=True)
            write_volume(crop(labels, a, b), folder / side / "labels" / f"{name}.nii.gz", overwrite=True)


def prepare(dataset: str, data: Path, work: Path) -> Path:
    """The split folder of ``dataset`` (written once)."""
    folder = work / dataset
    if (folder / "test" / "labels" / "slab.nii.gz").is_file():
        return folder
    if dataset == "colin27-slab":
        image = read_image(data / "images" / "colin27.nii.gz")
        labels = read_label(data / "labels" / "colin27.nii.gz")
        slab, margin = (80, 110), 30
    else:
        image_path, label_path = prepare_macaque(TEMPLATE, 1.0, work / "macaque-source")
        image, labels = read_image(image_path), read_label(label_path)
        z = np.flatnonzero(sitk.GetArrayViewFromImage(labels).any(axis=(1, 2)))
        third = (z[-1] + 1 - z[0]) // 3
        slab, margin = (int(z[0] + third), int(z[0] + 2 * third)), None
    write_split(image, labels, slab, folder, margin)
    return folder


def table(report, command: str) -> str:
    summary = report.summary()
    names = [
        n
        for n in [*report.class_names, "mean"]
        if any(e["mean"][n] == e["mean"][n] for e in summary.values())
    ]
    lines = [
        f"`{command}`",
        "",
        "| trained on | " + " | ".join(names) + " | × real |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for condition, entry in summary.items():
        cells = [
            "-"
            if entry["mean"][n] != entry["mean"][n]
            else f"{entry['mean'][n]:.3f} [{entry['worst'][n]:.3f}]"
            for n in names
        ]
        lines.append(f"| {condition} | " + " | ".join(cells) + f" | {entry['ratio']:.2f} |")
    seeds = max(e["seeds"] for e in summary.values())
    lines += ["", f"Dice on the real test slab, mean over {seeds} seeds [worst seed]."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--segmenter-steps", type=int, default=200)
    p.add_argument("--segmenter-batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--channels", default="8,16,32")
    p.add_argument("--synthetic-multiples", default="1")
    p.add_argument(
        "--model",
        default=None,
        help="the generator (a folder or an embedded model's name; default: the embedded default)",
    )
    p.add_argument("--steps", type=int, default=None, help="generation steps (default: the model's)")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="generation guidance (default: the model's, else volgen's)",
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "downstream")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = prepare(args.dataset, args.data, args.out / "data")
    out = args.out / args.dataset
    options = DownstreamOptions(
        seeds=args.seeds,
        multiples=tuple(int(k) for k in args.synthetic_multiples.split(",")),
        settings=GenerateSettings(
            **({} if args.steps is None else {"num_inference_steps": args.steps}),
            **({} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}),
        ),
        steps=args.segmenter_steps,
        batch_size=args.segmenter_batch_size,
        learning_rate=args.learning_rate,
        channels=tuple(int(c) for c in args.channels.split(",")),
        device="cpu",
        model=None if args.model is None else resolve_model(args.model),
    )
    model = "" if args.model is None else f" --model {args.model}"
    model += "" if args.steps is None else f" --steps {args.steps}"
    model += "" if args.guidance_scale is None else f" --guidance-scale {args.guidance_scale:g}"
    command = (
        f"volgen evaluate-downstream {folder / 'train'} {out} --test {folder / 'test'} --seeds {args.seeds} "
        f"--synthetic-multiples {args.synthetic_multiples} --segmenter-steps {args.segmenter_steps} "
        f"--segmenter-batch-size {args.segmenter_batch_size} --learning-rate {args.learning_rate:g} "
        f"--channels {args.channels}{model}"
    )
    print(command, flush=True)
    report = run_downstream(read_split(folder / "train", test=folder / "test"), out, options, progress=print)
    write_downstream_report(report, out)
    text = table(report, command)
    (out / "downstream.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
