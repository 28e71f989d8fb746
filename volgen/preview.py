"""Preview montages (axial, coronal and sagittal views of a segmentation and a generated volume), and the
class colours every volgen figure uses (preview, evaluation figure, training previews, the Slicer
screenshot): background black, class k >= 1 the (k-1)-th colour of matplotlib's "tab10", repeating after 10.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from volgen.types import PathLike

#: Background (class 0).
BACKGROUND_COLOUR = "#000000"
#: Classes 1, 2, ...: matplotlib's "tab10" qualitative palette, repeating after 10 classes.
CLASS_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def class_colour(index: int) -> str:
    """The colour (``#rrggbb``) of class ``index`` (0 is background) in every volgen figure."""
    if index < 0:
        raise ValueError(f"class index must be >= 0, got {index}")
    return BACKGROUND_COLOUR if index == 0 else CLASS_COLOURS[(index - 1) % len(CLASS_COLOURS)]


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]


def label_rgb(classes: np.ndarray) -> np.ndarray:
    """Class indices (any shape, >= 0) as RGB in [0, 1], shape ``classes.shape + (3,)``, float32: what
    ``imshow`` shows (with ``interpolation="nearest"``) for a segmentation."""
    values = np.asarray(classes).astype(np.int64)
    if values.size and values.min() < 0:
        raise ValueError("class indices must be >= 0")
    top = int(values.max()) if values.size else 0
    table = np.array([_rgb(class_colour(i)) for i in range(top + 1)], dtype=np.float32)
    return table[values]


def add_class_legend(
    target: Any, class_names: Sequence[str] | None = None, present: Iterable[int] | None = None, **kwargs: Any
) -> Any:
    """Add a legend of class colours to a matplotlib figure or axes.

    Args:
        target: A ``Figure`` or ``Axes``.
        class_names: Names by class index (index 0 is background); classes beyond it are "class k".
        present: Class indices to list (default: every named class).
        **kwargs: Passed to ``legend`` (default: below the figure, one row of up to 6 entries).

    Returns:
        The legend.
    """
    from matplotlib.patches import Patch

    names = list(class_names or [])
    indices = sorted({int(i) for i in present}) if present is not None else list(range(len(names)))
    handles = [
        Patch(
            facecolor=class_colour(i),
            edgecolor="0.6",
            label=names[i] if i < len(names) else ("background" if i == 0 else f"class {i}"),
        )
        for i in indices
    ]
    options = {"loc": "lower center", "ncol": max(1, min(len(handles), 6)), "fontsize": 8, "frameon": False}
    options.update(kwargs)
    return target.legend(handles=handles, **options)


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
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PNG: a row of segmentation views, a row of generated views (and a reference row if given),
    with a legend of the classes present (colours: :func:`class_colour`).

    Args:
        segmentation: Class indices on the same grid as ``generated``.
        generated: The generated volume (physical units).
        path: The PNG to write (atomically).
        title: Figure title.
        reference: An optional real volume on the same grid.
        class_names: Names by class index (the model's label map) for the legend; default "class k".
        overwrite: Replace an existing PNG.
    """
    import matplotlib.pyplot as plt

    from volgen.io import atomic_write

    fig = montage_figure(segmentation, generated, title=title, reference=reference, class_names=class_names)
    with atomic_write(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def montage_figure(
    segmentation: sitk.Image,
    generated: sitk.Image,
    *,
    title: str = "",
    reference: sitk.Image | None = None,
    class_names: Sequence[str] | None = None,
) -> Any:
    """The matplotlib figure :func:`save_montage` writes (close it with ``plt.close`` when done)."""
    rows = [("segmentation", segmentation)]
    if reference is not None:
        rows.append(("reference", reference))
    rows.append(("generated", generated))
    return rows_figure(rows, title=title, class_names=class_names)


def rows_figure(
    rows: Sequence[tuple[str, sitk.Image]],
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    window: tuple[float, float] = (0.0, 1.0),
) -> Any:
    """A figure of middle axial, coronal and sagittal views, one row per image: the first row is the
    segmentation (class colours, with a legend), the others intensity images on one shared grey window
    (e.g. several seeds side by side): ``window`` is its part of the images' 0.5-99.5 percentile range
    (``(0, 0.1)``: the darkest 10 %, where grey air and ghost anatomy show). Close it with ``plt.close``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (seg_name, segmentation), images = rows[0], rows[1:]
    values = np.concatenate([sitk.GetArrayViewFromImage(image).ravel() for _, image in images])
    vmin, vmax = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    vmax = vmax if vmax > vmin else vmin + 1
    vmin, vmax = vmin + window[0] * (vmax - vmin), vmin + window[1] * (vmax - vmin)
    present = np.unique(sitk.GetArrayViewFromImage(segmentation))
    views = [(seg_name, _orthogonal_views(segmentation, label=True), True)]
    views += [(name, _orthogonal_views(image, label=False), False) for name, image in images]
    fig, axes = plt.subplots(len(views), 3, figsize=(9, 3 * len(views)), squeeze=False)
    for r, (name, planes, is_label) in enumerate(views):
        for c, ((view, aspect), plane) in enumerate(
            zip(planes, ("axial", "coronal", "sagittal"), strict=True)
        ):
            ax = axes[r][c]
            if is_label:
                ax.imshow(label_rgb(view), interpolation="nearest", aspect=aspect)
            else:
                ax.imshow(view, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", aspect=aspect)
            ax.set_axis_off()
            ax.set_title(f"{name} · {plane}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    add_class_legend(fig, class_names, present=present)
    fig.tight_layout(rect=(0, 0.5 / (3 * len(views)), 1, 1))  # room for the legend below
    return fig
