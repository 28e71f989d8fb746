"""One command for a GPU box: the recipe ablation on held-out anatomy and the new embedded default model.

    python benchmarks/recipe_gpu.py --out gpu-out                 # H200: about 6 minutes
    python benchmarks/recipe_gpu.py --quick --out /tmp/recipe     # this CPU: 2-3 minutes, mechanics only

Runs, as parallel processes (one GPU is shared; small UNets leave most of it idle):

(a) every variant of ``benchmarks/heldout_slab.py`` (the recipe, each of its parts off, the older recipe)
    trained at the same budget on Colin27 without the held-out slab, each scored over ``--seeds`` seeds;
(b) the new embedded default model: ``configs/train/colin27-small.yaml`` (the recipe, `small` preset,
    64 px) on the whole of Colin27 for ``--default-steps``, exported as by
    ``examples/colin27/export_default_model.py``, and previews of the bundled example over several seeds.

Everything kept lies in ``--out`` (six files, no subfolders, a few MB):

    results.md                 the ablation table, the default model's per-seed figures, the command
    results.json               every seed of every variant; the default model's figures
    default-model.tar.gz       colin27-small/ : unpack into volgen/default_model/ (replacing the old folder)
    default-previews.png       example segmentation: axial/coronal/sagittal of several seeds
    heldout-previews.png       held-out slab: real and generated (seeds 0-3) for every variant
    log.txt                    the processes' logs (tails)

Training runs and generated volumes go to ``--work`` (default: a temporary folder), not to ``--out``. The
data must exist (``python examples/colin27/prepare.py data/colin27``, or copy ``data/colin27`` along);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # volgen from this source tree when it is not installed
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "colin27"))

import heldout_slab  # noqa: E402

EXAMPLE = ROOT / "examples" / "colin27_tissues_2mm.nii.gz"
PREVIEW_SEEDS = 4


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """Training and evaluation settings for the full run or ``--quick``."""
    if args.quick:
        return dict(
            steps=args.steps or 30,
            default_steps=args.default_steps or 30,
            batch_size=8,
            preset="tiny",
            size=32,
            seeds=args.seeds or 2,
            parallel=args.parallel or 2,
            workers=0,
            samples_per_draw=4,
            max_minutes=None,
            threads=1,
        )
    return dict(
        steps=args.steps or 3000,
        default_steps=args.default_steps or 5000,
        batch_size=16,
        preset="small",
        size=None,
        seeds=args.seeds or 8,
        parallel=args.parallel or 8,
        workers=args.workers,
        samples_per_draw=8,  # two augmentation draws per batch of 16: the CPU keeps up with the GPU
        max_minutes=args.max_minutes,
        threads=2,
    )


def launch(command: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    handle = log.open("w", encoding="utf-8")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def variant_command(name: str, b: dict[str, Any], args: argparse.Namespace, work: Path) -> list[str]:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "heldout_slab.py"),
        "--variant",
        name,
        "--steps",
        str(b["steps"]),
        "--batch-size",
        str(b["batch_size"]),
        "--preset",
        b["preset"],
        "--seeds",
        str(b["seeds"]),
        "--samples-per-draw",
        str(b["samples_per_draw"]),
        "--device",
        args.device,
        "--data",
        str(args.data),
        "--work",
        str(work / "heldout"),
        "--out",
        str(work / "json"),
    ]
    no_augmentation = heldout_slab.VARIANTS[name].get("augmentation", {}).get("enabled", True) is False
    command += ["--workers", str(0 if no_augmentation else b["workers"])]
    if b["size"] is not None:
        command += ["--size", str(b["size"])]
    if b["max_minutes"] is not None:
        command += ["--max-minutes", str(b["max_minutes"])]
    return command


def train_default(args: argparse.Namespace) -> int:
    """(b): train the recipe on the whole of Colin27, export it, score the example over seeds, previews."""
    from export_default_model import export_default_model

    from volgen.config import validate
    from volgen.models import UNetConfig
    from volgen.training import TrainConfig, train

    b = budget(args)
    work = args.work / "default"
    data = TrainConfig.from_yaml(ROOT / "configs" / "train" / "colin27-small.yaml").model_dump(mode="json")
    data["data"]["source"] = str(args.data)
    data["output_dir"] = str(work / "train")
    if b["size"] is not None:
        unet = UNetConfig.preset(b["preset"]).model_dump(mode="json")
        data["model"].update(preset=None, unet={**unet, "sample_size": b["size"]})
    data["training"].update(
        max_steps=b["default_steps"],
        max_minutes=b["max_minutes"],
        batch_size=b["batch_size"],
        checkpoint_every=b["default_steps"],
        preview_every=0,
        num_workers=b["workers"],
        log_every=max(1, b["default_steps"] // 20),
    )
    data["augmentation"]["samples_per_draw"] = b["samples_per_draw"]
    config = validate(data, TrainConfig)
    started = time.monotonic()
    result = train(config, resume=(work / "train").exists())
    seconds = time.monotonic() - started
    target = export_default_model(result.model_dir, work / "colin27-small")
    figures = example_figures(target, work, b["seeds"], args.device)
    record = {
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "final_loss": result.final_loss,
        "train_seconds": round(seconds, 1),
        "example": figures,
    }
    (work / "default.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


def example_figures(model: Path, work: Path, seeds: int, device: str) -> dict[str, Any]:
    """Generate the bundled example over ``seeds`` seeds; per seed: background level, empty-slice anatomy."""
    import SimpleITK as sitk

    from volgen.api import GenerateSettings, generate
    from volgen.io import read_image, read_label
    from volgen.models import load_model

    loaded = load_model(model)
    mask = sitk.GetArrayFromImage(read_label(EXAMPLE))
    span = loaded.metadata.intensity.high - loaded.metadata.intensity.low
    level = loaded.metadata.intensity.low + heldout_slab.ANATOMY_LEVEL * span
    per_seed = []
    for seed in range(max(seeds, PREVIEW_SEEDS)):
        out = work / f"example-seed-{seed}.nii.gz"
        generate(
            EXAMPLE, out, model=model, loaded=loaded, settings=GenerateSettings(seed=seed), overwrite=True,
            device=device,
        )  # fmt: skip
        generated = sitk.GetArrayFromImage(read_image(out)).astype(np.float32)
        empty = heldout_slab.empty_slices_with_anatomy(generated, mask, level)
        per_seed.append(
            {
                "seed": seed,
                "background_mean": float(generated[mask == 0].mean()),
                "background_mean_pct_of_range": float(
                    (generated[mask == 0].mean() - loaded.metadata.intensity.low) / span * 100
                ),
                "empty_slices_with_anatomy": empty,
            }
        )
    dropped = []  # --drop head: the enclosing class dropped (what it does is documented in the README)
    for seed in range(2):
        out = work / f"example-drop-head-seed-{seed}.nii.gz"
        settings = GenerateSettings(seed=seed, drop=["head"])
        generate(EXAMPLE, out, model=model, loaded=loaded, settings=settings, overwrite=True, device=device)
        generated = sitk.GetArrayFromImage(read_image(out)).astype(np.float32)
        dropped.append(
            {
                "seed": seed,
                "empty_slices_with_anatomy": heldout_slab.empty_slices_with_anatomy(generated, mask, level),
                "outside_brain_mean_pct_of_range": float(
                    (generated[mask <= 1].mean() - loaded.metadata.intensity.low) / span * 100
                ),
            }
        )
    return {"model_id": loaded.model_id, "intensity_range": [loaded.metadata.intensity.low,
            loaded.metadata.intensity.high], "per_seed": per_seed, "drop_head": dropped}  # fmt: skip


def _views(array: np.ndarray) -> list[np.ndarray]:
    """Middle axial, coronal and sagittal views of a ``(z, y, x)`` array (superior up)."""
    z, y, x = (n // 2 for n in array.shape)
    return [array[z], array[::-1, y, :], array[::-1, :, x]]


def default_previews(work: Path, path: Path, seeds: int) -> None:
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volgen.io import read_image, read_label

    mask = sitk.GetArrayFromImage(read_label(EXAMPLE))
    from matplotlib.colors import ListedColormap

    classes = ListedColormap(["black", "tab:orange", "tab:blue", "tab:red", "tab:green"])
    rows = [("mask", _views(mask.astype(np.float32)), {"cmap": classes, "vmin": -0.5, "vmax": 4.5})]
    volumes = [sitk.GetArrayFromImage(read_image(work / f"example-seed-{s}.nii.gz")) for s in range(seeds)]
    hi = float(np.percentile(np.stack(volumes), 99.5))
    rows += [(f"seed {s}", _views(v), {"cmap": "gray", "vmin": 0, "vmax": hi}) for s, v in enumerate(volumes)]
    fig = Figure(figsize=(6.0, 2.0 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, views, kwargs) in enumerate(rows):
        for c, view in enumerate(views):
            axes[r][c].imshow(view, origin="upper", interpolation="nearest", aspect="auto", **kwargs)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(("axial", "coronal", "sagittal")[c], fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle("embedded default model (new recipe), bundled example, several seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def heldout_previews(work: Path, names: list[str], path: Path) -> None:
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volgen.io import read_image

    real = sitk.GetArrayFromImage(read_image(work / "heldout" / "slab_real.nii.gz")).astype(np.float32)
    hi = float(np.percentile(real, 99.5))
    z = real.shape[0] // 2
    rows = []
    for name in names:
        seeds = sorted((work / "heldout" / name).glob("seed-*.nii.gz"))[:PREVIEW_SEEDS]
        if seeds:
            vols = [sitk.GetArrayFromImage(read_image(s)) for s in seeds]
            rows.append(
                (
                    name,
                    [real[z]]
                    + [v[z] for v in vols]
                    + [real[::-1, real.shape[1] // 2], vols[0][::-1, vols[0].shape[1] // 2]],
                )
            )
    if not rows:
        return
    fig = Figure(figsize=(1.6 * len(rows[0][1]), 1.6 * len(rows) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(rows[0][1]), squeeze=False)
    titles = ["real"] + [f"seed {i}" for i in range(len(rows[0][1]) - 3)] + ["real (cor.)", "seed 0 (cor.)"]
    for r, (name, views) in enumerate(rows):
        for c, view in enumerate(views):
            axes[r][c].imshow(view, cmap="gray", vmin=0, vmax=hi, interpolation="nearest", aspect="auto")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle("held-out slab (axial middle slice; coronal reslice with the empty slices)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def default_table(record: dict[str, Any]) -> str:
    seeds = record["example"]["per_seed"]
    lines = [
        f"Default model: {record['steps']} steps{' (time cap)' if record['stopped_early'] else ''}, "
        f"final loss {record['final_loss']:.4f}, {record['train_seconds']:.0f} s, "
        f"{record['example']['model_id']}.",
        "",
        "| seed | background mean | as % of the intensity range | empty slices with anatomy |",
        "|---|---|---|---|",
    ]
    for s in seeds:
        lines.append(
            f"| {s['seed']} | {s['background_mean']:.2f} | {s['background_mean_pct_of_range']:.1f} | "
            f"{len(s['empty_slices_with_anatomy'])} |"
        )
    lines += [
        "",
        "`--drop head` (seed: empty slices with anatomy, mean outside the brain as % of the range): ",
    ]
    lines += [
        f"seed {d['seed']}: {len(d['empty_slices_with_anatomy'])}, "
        f"{d['outside_brain_mean_pct_of_range']:.1f} %"
        for d in record["example"].get("drop_head", [])
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the one folder of results (kept small)")
    p.add_argument("--work", type=Path, default=None, help="training runs (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny budgets on the CPU: proves the mechanics")
    p.add_argument(
        "--device", default="auto", help="auto, cpu or cuda (generation; training uses CUDA if any)"
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "colin27")
    p.add_argument("--variants", nargs="+", default=list(heldout_slab.DEFAULT_VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="training steps per held-out variant")
    p.add_argument("--default-steps", type=int, default=None, help="training steps of the default model")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--parallel", type=int, default=None, help="processes at a time")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per augmented training")
    p.add_argument("--max-minutes", type=float, default=3.5, help="time cap per training loop (full run)")
    p.add_argument("--skip-default", action="store_true", help="only the held-out ablation")
    p.add_argument(
        "--deadline-minutes",
        type=float,
        default=None,
        help="stop what still runs then and write what finished (default 6; --quick: 60)",
    )
    p.add_argument("--train-default", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_default:
        return train_default(args)

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="volgen-recipe-"))
    b = budget(args)
    deadline = args.deadline_minutes or (60.0 if args.quick else 6.0)
    if not (args.data / "images" / "colin27.nii.gz").is_file():
        prepare = [sys.executable, str(ROOT / "examples" / "colin27" / "prepare.py"), str(args.data)]
        if subprocess.run(prepare, cwd=ROOT).returncode != 0:  # needs Debian's mricron-data
            print(
                f"{args.data}: no Colin27 data (copy data/colin27 along, or install mricron-data)",
                file=sys.stderr,
            )
            return 2
    heldout_slab.prepare_split(args.data, args.work / "heldout", (80, 110), 4)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, list[str]]] = []
    if not args.skip_default:
        default = [sys.executable, __file__, "--train-default", "--out", str(args.out),
                   "--work", str(args.work), "--device", args.device, "--data", str(args.data),
                   "--workers", str(args.workers), "--max-minutes", str(args.max_minutes)]  # fmt: skip
        default += ["--quick"] if args.quick else []
        default += [f"--default-steps={b['default_steps']}", f"--seeds={b['seeds']}"]
        jobs.append(("default", default))
    jobs += [(name, variant_command(name, b, args, args.work)) for name in args.variants]
    running: dict[str, subprocess.Popen] = {}
    codes: dict[str, int] = {}
    while jobs or running:
        while jobs and len(running) < b["parallel"]:
            name, command = jobs.pop(0)
            running[name] = launch(command, logs / f"{name}.log", b["threads"])
            print(f"[{time.monotonic() - started:5.0f} s] started {name}", flush=True)
        if time.monotonic() - started > deadline * 60.0:
            for name, proc in running.items():  # SIGTERM: a training saves a checkpoint and stops
                print(f"deadline: stopping {name}", file=sys.stderr, flush=True)
                proc.terminate()
            jobs.clear()
            for proc in running.values():
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                del running[name]
                print(
                    f"[{time.monotonic() - started:5.0f} s] {name} finished (exit {proc.returncode})",
                    flush=True,
                )
        time.sleep(1.0)

    command = "python benchmarks/recipe_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records = heldout_slab.write_summary(args.work / "json", args.variants, command)
    parts = [f"`{command}` ({time.monotonic() - started:.0f} s in all)\n", "## Held-out slab\n",
             heldout_slab.table(records)]  # fmt: skip
    result: dict[str, Any] = {"command": command, "budget": b, "exit_codes": codes, "heldout": records}
    default_json = args.work / "default" / "default.json"
    if default_json.is_file():
        record = json.loads(default_json.read_text(encoding="utf-8"))
        result["default_model"] = record
        parts += ["\n## Embedded default model (bundled example)\n", default_table(record)]
        with tarfile.open(args.out / "default-model.tar.gz", "w:gz") as tar:
            tar.add(args.work / "default" / "colin27-small", arcname="colin27-small")
        try:
            default_previews(args.work / "default", args.out / "default-previews.png", PREVIEW_SEEDS)
        except Exception as e:  # a preview never costs the results
            print(f"default previews failed: {e}", file=sys.stderr)
    try:
        heldout_previews(args.work, args.variants, args.out / "heldout-previews.png")
    except Exception as e:
        print(f"held-out previews failed: {e}", file=sys.stderr)
    (args.out / "results.md").write_text("\n".join(parts), encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with (args.out / "log.txt").open("w", encoding="utf-8") as f:
        for log in sorted(logs.glob("*.log")):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            f.write(f"==> {log.name} (last 60 lines)\n" + "\n".join(lines[-60:]) + "\n")
    print((args.out / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s; training runs in {args.work}")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
