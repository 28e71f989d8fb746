"""Training benchmark: the `small` preset on the Colin27 data for a fixed time budget; the loss curve.

Trains with ``configs/train/colin27-small.yaml`` (overrides on the command line), stops after ``--minutes``
(or at the config's ``max_steps``), exports the model, and prints and writes the mean loss per 100 steps.
The data must exist first: ``python examples/colin27/prepare.py data/colin27``.

Usage::

    python benchmarks/train_small.py --minutes 10 [--output-dir runs/bench-train-small] [--max-steps N]
    torchrun --nproc_per_node 2 benchmarks/train_small.py --minutes 10      # the same, on two processes

Writes ``loss_per_100_steps.csv`` and ``benchmark.json`` next to the run's ``losses.csv`` (output folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "train" / "colin27-small.yaml"
WINDOW = 100


def loss_curve(losses: list[float], window: int = WINDOW) -> list[tuple[int, int, float]]:
    """(first step, last step, mean loss) for consecutive windows of ``window`` steps."""
    rows = []
    for start in range(0, len(losses), window):
        chunk = losses[start : start + window]
        rows.append((start + 1, start + len(chunk), sum(chunk) / len(chunk)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget for the training loop")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default: runs/bench-train-small-<date-time> (must not hold a run)",
    )
    parser.add_argument("--seed", type=int, default=None, help="override training.seed")
    args = parser.parse_args(argv)

    import torch

    from volgen.training import TrainConfig, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig.from_yaml(args.config)
    config.training.max_minutes = args.minutes
    if args.max_steps is not None:
        config.training.max_steps = args.max_steps
    if args.seed is not None:
        config.training.seed = args.seed
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    config.output_dir = (args.output_dir or ROOT / "runs" / f"bench-train-small-{stamp}").resolve()
    main_process = os.environ.get("RANK", "0") == "0"

    started = time.monotonic()

    def report(step: int, total: int, loss: float, lr: float) -> None:
        if step % WINDOW == 0:
            rate = step / (time.monotonic() - started)
            print(f"step {step:6d}/{total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s", flush=True)

    result = train(config, progress=report)
    elapsed = time.monotonic() - started
    if not main_process:
        return 0

    curve = loss_curve(result.losses)
    out = config.output_dir
    with (out / "loss_per_100_steps.csv").open("w", encoding="utf-8") as f:
        f.write("first_step,last_step,mean_loss\n")
        f.writelines(f"{a},{b},{m:.6f}\n" for a, b, m in curve)
    summary = {
        "config": str(args.config),
        "minutes_budget": args.minutes,
        "steps": result.steps,
        "stopped_by_budget": result.stopped_early,
        "seconds_total": round(elapsed, 1),
        "steps_per_second": round(result.steps / elapsed, 3),
        "final_loss_last_100": round(result.final_loss, 5),
        "batch_size": config.training.batch_size,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_dir": str(result.model_dir),
    }
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print(f"\nmean loss per {WINDOW} steps")
    print("| steps | mean loss |")
    print("|---|---|")
    for a, b, m in curve:
        print(f"| {a}-{b} | {m:.4f} |")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
