"""Ship a trained model as volgen's embedded default (weights stored as float16 to halve the size).

    python examples/colin27/export_default_model.py runs/colin27-small/model

The whole recipe for the embedded default model, from a fresh clone (Debian's mricron-data installed):

    python examples/colin27/prepare.py data/colin27
    volgen train configs/train/colin27-small.yaml
    python examples/colin27/export_default_model.py runs/colin27-small/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from volgen.api import default_model_dir
from volgen.models import load_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="A trained model folder (e.g. runs/colin27-small/model).")
    parser.add_argument("--target", type=Path, default=default_model_dir())
    args = parser.parse_args()
    loaded = load_model(args.model)
    save_model(args.target, loaded.unet, loaded.scheduler, loaded.metadata, overwrite=True, dtype=torch.float16)
    reloaded = load_model(args.target)
    size = sum(p.stat().st_size for p in args.target.rglob("*") if p.is_file())
    print(f"wrote {args.target} ({size / 2**20:.1f} MiB), id {reloaded.model_id}")


if __name__ == "__main__":
    main()
