"""Ship a trained model as one of volgen's embedded models (weights stored as float16 to halve the size).

    python examples/colin27/export_default_model.py runs/colin27-small/model
    python examples/colin27/export_default_model.py runs/colin27-native/model

The model goes into ``volgen/default_model/<its name>`` (``--target`` for another folder); which embedded
model ``default`` means is ``volgen.defaults.MODEL_DIR``. The whole recipe, from a fresh clone (Debian's
mricron-data installed):

    python examples/colin27/prepare.py data/colin27
    volgen train configs/train/colin27-small.yaml        # or configs/train/colin27-native.yaml
    python examples/colin27/export_default_model.py runs/colin27-small/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from volgen.default_model import FOLDER
from volgen.models import load_model, save_model


def model_card(meta, unet_config=None) -> str:
    """The model folder's README.md: what it is, how it was trained, the licence of its data."""
    steps = meta.training.get("steps", "?")
    schedule = meta.training.get("prediction_type", "epsilon")
    zero_snr = meta.training.get("zero_terminal_snr", False)
    schedule_text = (
        "v-prediction, DDPM T = 1000 linear betas rescaled to zero terminal SNR"
        if zero_snr
        else f"{schedule}, DDPM T = 1000 linear betas"
    )
    condition = meta.condition
    flags = (
        "per-class 'specified' flags (ablated classes unspecified), edge slices repeated as context"
        if condition is not None and condition.specified_flags
        else "masks only"
    )
    augmentation = "TorchIO augmentation" if meta.training.get("augmentation") else "no augmentation"
    edges = []
    if meta.training.get("empty_slices"):
        edges.append(f"{meta.training['empty_slices']} air slices at each volume end")
    if meta.training.get("edge_cut_p"):
        edges.append(f"edge cuts p = {meta.training['edge_cut_p']}")
    if meta.training.get("inplane_cut_p"):
        edges.append(f"in-plane cuts p = {meta.training['inplane_cut_p']}")
    scales = meta.training.get("pixel_spacing_scales") or [1.0]
    if scales != [1.0]:
        edges.append("scale augmentation: pixel spacing x " + ", ".join(f"{f:g}" for f in scales))
    if meta.training.get("erase_p"):
        erased = ", ".join(meta.training.get("erase_classes", []))
        edges.append(f"{erased} erased from image and mask p = {meta.training['erase_p']}")
    augmentation += "".join(f", {e}" for e in edges)
    dropout = getattr(unet_config, "dropout", 0.0) if unet_config is not None else 0.0
    regularised = f", dropout {dropout:g}" if dropout else ""
    if meta.pixel_spacing is not None:
        frame = (
            f"native frame: whole {meta.slice_axis} slices at {meta.pixel_spacing:g} mm pixels, trained on "
            f"{meta.slice_size} px crops"
        )
    else:
        frame = f"fitted frame: the field of view in {meta.slice_size} px {meta.slice_axis} slices"
    own = meta.sampling.options()
    sampling = (
        f"- Sampling: runs `{own}` unless told otherwise (`sampling` in volgen.json; an option wins).\n"
        if own
        else ""
    )
    return f"""# {meta.name}: one of volgen's embedded models

{meta.description}

- Trained on: {meta.trained_on}
- Architecture: `small` preset (diffusers UNet2DModel; {frame}),
  {schedule_text}, {meta.encoding} masks with {meta.context_slices} context slice(s) each side and
  {flags}; mask ablation p = {meta.training.get("ablation_p", 0.5)}{regularised}, {augmentation}, {steps}
  steps of batch {meta.training.get("batch_size", "?")}; EMA weights stored as float16.
- Classes: {", ".join(meta.label_map.class_names)}.
- Intensities: MR, percentile mapping, written as float32 on the T1 scale of Colin27 (0..255 uint8 source).
{sampling}
Recipe: `python examples/colin27/prepare.py data/colin27`, `volgen train configs/train/{meta.name}.yaml`,
`python examples/colin27/export_default_model.py runs/{meta.name}/model`.

This model saw one subject. It demonstrates volgen on a CPU; real use needs a model trained on real data
(`volgen generate --model`).

Colin27 (ch2) is copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this software
and its documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied warranty.
"""


def export_default_model(model: Path, target: Path) -> Path:
    """Write ``model`` to ``target`` as the embedded default: float16 weights, Colin27 provenance, a card."""
    loaded = load_model(model)
    loaded.metadata.trained_on = (
        "the Colin27 T1 MRI (one subject, 1 mm, Debian mricron-data) with tissue labels derived from it"
    )
    save_model(target, loaded.unet, loaded.scheduler, loaded.metadata, overwrite=True, dtype=torch.float16)
    (target / "README.md").write_text(model_card(loaded.metadata, loaded.unet.config), encoding="utf-8")
    load_model(target)  # it loads back
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="A trained model folder (e.g. runs/colin27-small/model).")
    parser.add_argument(
        "--target", type=Path, default=None, help="Default: volgen/default_model/<the model's name>."
    )
    args = parser.parse_args()
    target = args.target or FOLDER / load_model(args.model).metadata.name
    export_default_model(args.model, target)
    reloaded = load_model(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"wrote {target} ({size / 2**20:.1f} MiB), id {reloaded.model_id}")


if __name__ == "__main__":
    main()
