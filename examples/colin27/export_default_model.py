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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="A trained model folder (e.g. runs/colin27-small/model).")
    parser.add_argument("--target", type=Path, default=default_model_dir())
    args = parser.parse_args()
    loaded = load_model(args.model)
    loaded.metadata.trained_on = (
        "the Colin27 T1 MRI (one subject, 1 mm, Debian mricron-data) with tissue labels derived from it"
    )
    save_model(
        args.target, loaded.unet, loaded.scheduler, loaded.metadata, overwrite=True, dtype=torch.float16
    )
    meta = loaded.metadata
    steps = meta.training.get("steps", "?")
    card = f"""# {meta.name}: volgen's embedded default model

{meta.description}

- Trained on: {meta.trained_on}
- Architecture: `small` preset (diffusers UNet2DModel, {meta.slice_size} px {meta.slice_axis} slices),
  ε-prediction, DDPM T = 1000 linear betas, {meta.encoding} masks with {meta.context_slices} context
  slice(s) each side, mask ablation p = 0.5, {steps} steps; EMA weights stored as float16.
- Classes: {", ".join(meta.label_map.class_names)}.
- Intensities: MR, percentile mapping, written as float32 on the T1 scale of Colin27 (0..255 uint8 source).

Recipe: `python examples/colin27/prepare.py data/colin27`, `volgen train configs/train/colin27-small.yaml`,
`python examples/colin27/export_default_model.py runs/colin27-small/model`.

This model saw one subject. It demonstrates volgen on a CPU; real use needs a model trained on real data
(`volgen generate --model`).

Colin27 (ch2) is copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this software
and its documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied warranty.
"""
    (args.target / "README.md").write_text(card, encoding="utf-8")
    reloaded = load_model(args.target)
    size = sum(p.stat().st_size for p in args.target.rglob("*") if p.is_file())
    print(f"wrote {args.target} ({size / 2**20:.1f} MiB), id {reloaded.model_id}")


if __name__ == "__main__":
    main()
