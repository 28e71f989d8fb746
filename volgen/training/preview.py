"""Training previews: a few slices generated with the EMA weights through the real pipeline, as a PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

PREVIEW_SLICES = 4


def preview_slices(labels: torch.Tensor, count: int = PREVIEW_SLICES) -> list[int]:
    """``count`` slice indices spread over the anatomy: quantiles of the cumulative foreground per slice."""
    n = labels.shape[0]
    foreground = (labels > 0).reshape(n, -1).sum(dim=1).double()
    if float(foreground.sum()) == 0:
        picks = np.linspace(0, n - 1, count + 2)[1:-1]
    else:
        cumulative = torch.cumsum(foreground, 0) / foreground.sum()
        quantiles = [(i + 1) / (count + 1) for i in range(count)]
        picks = [int(torch.searchsorted(cumulative, torch.tensor(q, dtype=torch.float64))) for q in quantiles]
    return sorted({int(min(max(p, 0), n - 1)) for p in picks})


def ema_unet(accelerator, model, ema):
    """A fresh float32 UNet holding the EMA weights, on the training device (no DDP or autocast wrappers)."""
    trained = accelerator.unwrap_model(model)
    unet = type(trained).from_config(trained.config)
    unet.load_state_dict(trained.state_dict())
    ema.copy_to(unet.parameters())
    # from_config builds float32 parameters and load_state_dict casts into them: no dtype for .to(), which
    # would make diffusers warn about modules to keep in float32 on every preview and export
    return unet.to(device=next(trained.parameters()).device).eval()


def write_preview(
    path: Path,
    unet,
    scheduler,
    volume,
    *,
    num_classes: int,
    encoding: str,
    context_slices: int,
    steps: int,
    seed: int,
    title: str = "",
    condition: dict | None = None,
    pixel_spacing: float | None = None,
) -> Path:
    """Generate a few slices of ``volume`` with DDIM and save a PNG grid (mask | real | generated).

    Each picked slice is generated inside a block of its ``2K+1`` context slices (the others are only there to
    give the centre slice its true context), with independent noise per slice. A native model
    (``pixel_spacing``) generates the volume's whole slices.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volgen.conditioning import context_stack
    from volgen.io import atomic_write
    from volgen.pipeline import SegmentationToVolumePipeline

    zs = preview_slices(volume.labels)
    s = 2 * context_slices + 1
    padding = condition["context_padding"] if condition is not None else "background"
    blocks = context_stack(volume.labels, zs, context_slices, padding).reshape(-1, *volume.labels.shape[1:])
    pipe = SegmentationToVolumePipeline(
        unet=unet,
        scheduler=scheduler,
        encoding=encoding,
        context_slices=context_slices,
        num_classes=num_classes,
        condition=condition,
        pixel_spacing=pixel_spacing,
    )
    out = pipe(blocks.long(), num_inference_steps=steps, seed=seed, scheduler="ddim", noise_correlation=0.0)
    generated = out.volume[context_slices::s]

    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    palette = colormaps["tab10"].colors
    class_colours = ListedColormap(
        ["black", *(palette[i % len(palette)] for i in range(max(num_classes - 1, 1)))]
    )
    fig = Figure(figsize=(6.0, 2.0 * len(zs) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(zs), 3, squeeze=False)
    for row, z in enumerate(zs):
        panels = [
            (volume.labels[z].numpy(), {"cmap": class_colours, "vmin": -0.5, "vmax": class_colours.N - 0.5}),
            (volume.image[z].numpy(), {"cmap": "gray", "vmin": -1, "vmax": 1}),
            (generated[row].numpy(), {"cmap": "gray", "vmin": -1, "vmax": 1}),
        ]
        for col, (img, kwargs) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(img, origin="lower", interpolation="nearest", **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(("mask", "real", "generated")[col], fontsize=9)
        axes[row][0].set_ylabel(f"slice {z}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return path
