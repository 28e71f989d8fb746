"""Preview montages: axial, coronal and sagittal views of a segmentation and a generated volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volgen.types import PathLike


def _orthogonal_views(image: sitk.Image, *, label: bool) -> list[tuple[np.ndarray, float]]:
    """Middle axial, coronal and sagittal slices in radiological display (patient right on screen left,
    anterior/superior up), each with the pixel aspect ratio (row spacing / column spacing)."""
    oriented = sitk.DICOMOrient(image, "LPS")  # array (z: I->S, y: A->P, x: R->L)
    array = sitk.GetArrayFromImage(oriented)
    sx, sy, sz = oriented.GetSpacing()
    z, y, x = (n // 2 for n in array.shape)
    # Oblique directions are shown in the nearest orthogonal orientation.
    axial = array[z]  # rows A->P, cols R->L
    coronal = array[::-1, y, :]  # rows S->I, cols R->L
    sagittal = array[::-1, :, x]  # rows S->I, cols A->P
    views = [(axial, sy / sx), (coronal, sz / sx), (sagittal, sz / sy)]
    return [(v.astype(np.int32 if label else np.float32), aspect) for v, aspect in views]


def save_montage(
    segmentation: sitk.Image,
    generated: sitk.Image,
    path: PathLike,
    *,
    title: str = "",
    reference: sitk.Image | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PNG: a row of segmentation views, a row of generated views (and a reference row if given).

    Args:
        segmentation: Class indices on the same grid as ``generated``.
        generated: The generated volume (physical units).
        path: The PNG to write (atomically).
        title: Figure title.
        reference: An optional real volume on the same grid.
        overwrite: Replace an existing PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from volgen.io import atomic_write

    rows = [("segmentation", _orthogonal_views(segmentation, label=True), True)]
    if reference is not None:
        rows.append(("reference", _orthogonal_views(reference, label=False), False))
    rows.append(("generated", _orthogonal_views(generated, label=False), False))
    values = sitk.GetArrayViewFromImage(generated)
    vmin, vmax = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    vmax = vmax if vmax > vmin else vmin + 1
    num_labels = max(1, int(sitk.GetArrayViewFromImage(segmentation).max()))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (name, views, is_label) in enumerate(rows):
        for c, ((view, aspect), plane) in enumerate(
            zip(views, ("axial", "coronal", "sagittal"), strict=True)
        ):
            ax = axes[r][c]
            if is_label:
                ax.imshow(
                    view,
                    cmap="tab10" if num_labels < 10 else "tab20",
                    vmin=0,
                    vmax=9 if num_labels < 10 else 19,
                    interpolation="nearest",
                    aspect=aspect,
                )
            else:
                ax.imshow(view, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", aspect=aspect)
            ax.set_axis_off()
            ax.set_title(f"{name} · {plane}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
