"""Train the `small` preset on Colin27 with 2.5D context K = 0, 1, 2 for the same budget (for consistency.py).

    python benchmarks/train_context_models.py --steps 1000 --out runs/bench-context

Each model's config is configs/train/colin27-small.yaml with ``model.context_slices = K`` and
``training.max_steps = --steps``; models land in ``OUT/context-K/model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from volgen.config import validate
from volgen.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-context")
    args = parser.parse_args()
    base = TrainConfig.from_yaml(ROOT / "configs" / "train" / "colin27-small.yaml")
    for k in args.contexts:
        data = base.model_dump(mode="json")
        data["model"]["context_slices"] = k
        data["model"]["name"] = f"colin27-small-context{k}"
        data["training"]["max_steps"] = args.steps
        data["training"]["preview_every"] = 0
        data["output_dir"] = str((args.out / f"context-{k}").resolve())
        config = validate(data, TrainConfig)
        (args.out / f"context-{k}").mkdir(parents=True, exist_ok=True)
        (args.out / f"context-{k}" / "train.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        result = train(config)
        print(f"context {k}: {result}")


if __name__ == "__main__":
    main()
