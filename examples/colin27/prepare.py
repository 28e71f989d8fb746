"""Derive a tissue label map from the Colin27 (ch2) T1 MRI shipped by Debian's ``mricron-data`` package.

Writes, under ``OUT_DIR``::

    images/colin27.nii.gz                 the T1 (uint8, exact grid of ch2.nii.gz)
    labels/colin27.nii.gz                 uint8 labels on the same grid
    example/colin27_tissues_<S>mm.nii.gz  the labels resampled (nearest neighbour) to S mm isotropic

Labels (see ``configs/labels/colin27.yaml``): 0 background (air outside the head), 1 head (non-brain head
tissue: scalp, skull, fat, muscle, eyes, sinuses...), 2 csf, 3 grey_matter, 4 white_matter.

Method (deterministic, no randomness):

1. Head mask: ``T1 > --head-threshold`` (default 5; the ch2 background is already exactly 0 and head
   tissue starts at 7), largest connected component, binary closing (ball, radius 2), 3D hole filling,
   then axial slice-wise hole filling (the head is cut open at the neck, so air in the mouth, pharynx and
   sinuses is not enclosed in 3D).
2. Brain mask: ``ch2bet > 0``, largest connected component, hole filling, binary opening (ball, radius
   ``--brain-opening``, default 1) to remove the thin, one-slice streaks the slice-wise skull stripping left,
   then the largest component again.
3. Inside the brain: 1D k-means with 3 classes on the T1 intensities, initialised at the 10/50/90th
   percentiles of brain intensities and iterated to convergence; the clusters, sorted by centre, are
   CSF < GM < WM (T1 contrast). A voxel takes the class of the nearest centre, i.e. two intensity thresholds
   halfway between consecutive centres.
4. Label smoothing: a 3x3x3 majority (mode) filter over the brain classes, restricted to the brain mask
   (ties keep the current label).
5. Head label = head mask minus brain mask; background = everything else.

Usage::

    python examples/colin27/prepare.py data/colin27 [--templates /usr/share/mricron/templates] \
        [--example-spacing 2.0]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DEFAULT_TEMPLATES = Path("/usr/share/mricron/templates")
CLASS_NAMES = {0: "background", 1: "head", 2: "csf", 3: "grey_matter", 4: "white_matter"}
HEAD, CSF, GM, WM = 1, 2, 3, 4


def largest_component(mask: sitk.Image) -> sitk.Image:
    """Keep the largest face/edge/vertex-connected component of a binary mask."""
    components = sitk.ConnectedComponent(mask, True)
    ranked = sitk.RelabelComponent(components, sortByObjectSize=True)
    return sitk.Cast(ranked == 1, sitk.sitkUInt8)


def fill_holes_axial(mask: sitk.Image) -> sitk.Image:
    """Fill holes in every axial (z) slice of a binary mask, in 2D."""
    array = sitk.GetArrayFromImage(mask)
    filled = np.empty_like(array)
    for z in range(array.shape[0]):
        filled[z] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(array[z])))
    out = sitk.GetImageFromArray(filled)
    out.CopyInformation(mask)
    return out


def head_mask(t1: sitk.Image, threshold: float, closing_radius: int = 2) -> sitk.Image:
    """Whole-head mask: threshold, largest component, closing, 3D and axial slice-wise hole filling."""
    mask = sitk.Cast(t1 > threshold, sitk.sitkUInt8)
    mask = largest_component(mask)
    if closing_radius > 0:
        mask = sitk.BinaryMorphologicalClosing(mask, [closing_radius] * 3, sitk.sitkBall)
    mask = sitk.BinaryFillhole(mask)
    return fill_holes_axial(mask)


def brain_mask(bet: sitk.Image, opening_radius: int = 1) -> sitk.Image:
    """Brain mask from the skull-stripped image: nonzero, largest component, holes filled, opened."""
    mask = largest_component(sitk.Cast(bet > 0, sitk.sitkUInt8))
    mask = sitk.BinaryFillhole(mask)
    if opening_radius > 0:
        mask = sitk.BinaryMorphologicalOpening(mask, [opening_radius] * 3, sitk.sitkBall)
        mask = largest_component(mask)
    return mask


def kmeans_1d(values: np.ndarray, init: np.ndarray, max_iter: int = 200, tol: float = 1e-4) -> np.ndarray:
    """Lloyd's k-means on scalar values from the given initial centres; returns the sorted centres."""
    centres = np.sort(np.asarray(init, dtype=np.float64))
    values = values.astype(np.float64)
    for _ in range(max_iter):
        edges = (centres[1:] + centres[:-1]) / 2
        assign = np.searchsorted(edges, values)
        new = np.array(
            [values[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(len(centres))]
        )
        new.sort()
        if np.max(np.abs(new - centres)) < tol:
            return new
        centres = new
    return centres


def majority_filter(labels: np.ndarray, mask: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """3x3x3 mode filter of ``labels`` over ``classes``, inside ``mask`` only; ties keep the current label.

    Only voxels inside ``mask`` vote, so the outside never leaks in.
    """
    padded = np.pad(np.where(mask, labels, 0), 1)
    nz, ny, nx = labels.shape
    counts = np.zeros((len(classes), *labels.shape), dtype=np.float32)
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                window = padded[dz : dz + nz, dy : dy + ny, dx : dx + nx]
                for k, c in enumerate(classes):
                    counts[k] += window == c
    for k, c in enumerate(classes):
        counts[k] += 0.5 * (labels == c)  # tie-break in favour of the current label
    smoothed = np.asarray(classes, dtype=labels.dtype)[np.argmax(counts, axis=0)]
    return np.where(mask, smoothed, labels)


def resample_isotropic(labels: sitk.Image, spacing: float) -> sitk.Image:
    """Nearest-neighbour resample to ``spacing`` mm isotropic, same direction and physical centre.

    The new size is ``ceil(extent / spacing)`` per axis so the new grid covers the original extent; the
    origin is moved so the grid stays centred on the original one (for 1 mm -> 2 mm this samples every
    other original voxel exactly, without rounding ties).
    """
    old_size = np.array(labels.GetSize(), dtype=np.float64)
    old_spacing = np.array(labels.GetSpacing(), dtype=np.float64)
    direction = np.array(labels.GetDirection(), dtype=np.float64).reshape(3, 3)
    extent = old_size * old_spacing
    new_size = [int(math.ceil(e / spacing - 1e-6)) for e in extent]
    new_spacing = np.full(3, float(spacing))
    centre = np.array(labels.GetOrigin()) + direction @ ((old_size - 1) * old_spacing / 2)
    new_origin = centre - direction @ ((np.array(new_size) - 1) * new_spacing / 2)
    return sitk.Resample(
        labels,
        new_size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        new_origin.tolist(),
        new_spacing.tolist(),
        labels.GetDirection(),
        0,
        sitk.sitkUInt8,
    )


def summarize(labels: np.ndarray, title: str) -> str:
    """Table of voxel counts and fractions per class (fractions of the whole volume and of the brain)."""
    counts = np.bincount(labels.ravel(), minlength=len(CLASS_NAMES))
    brain = counts[CSF] + counts[GM] + counts[WM]
    lines = [title, f"{'label':>5} {'class':<13} {'voxels':>10} {'volume %':>9} {'brain %':>8}"]
    for value, name in CLASS_NAMES.items():
        of_brain = f"{100 * counts[value] / brain:8.2f}" if value in (CSF, GM, WM) else f"{'':>8}"
        of_volume = 100 * counts[value] / labels.size
        lines.append(f"{value:>5} {name:<13} {counts[value]:>10d} {of_volume:9.2f} {of_brain}".rstrip())
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output folder (images/, labels/, example/ are written)")
    parser.add_argument("--templates", type=Path, default=DEFAULT_TEMPLATES, help="folder with ch2.nii.gz")
    parser.add_argument("--example-spacing", type=float, default=2.0, help="example spacing in mm")
    parser.add_argument("--head-threshold", type=float, default=5.0, help="T1 > this is head (default 5)")
    parser.add_argument("--brain-opening", type=int, default=1, help="brain mask opening radius in voxels")
    parser.add_argument("--no-smoothing", action="store_true", help="skip the 3x3x3 majority filter")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the pipeline and write the outputs."""
    args = parse_args(argv)
    t1 = sitk.ReadImage(str(args.templates / "ch2.nii.gz"))
    bet = sitk.ReadImage(str(args.templates / "ch2bet.nii.gz"))
    if t1.GetSize() != bet.GetSize() or not np.allclose(t1.GetOrigin(), bet.GetOrigin()):
        raise SystemExit("ch2.nii.gz and ch2bet.nii.gz are not on the same grid")
    bet.CopyInformation(t1)

    head = sitk.GetArrayFromImage(head_mask(t1, args.head_threshold)).astype(bool)
    brain = sitk.GetArrayFromImage(brain_mask(bet, args.brain_opening)).astype(bool)
    head |= brain

    t1_array = sitk.GetArrayFromImage(t1)
    values = t1_array[brain].astype(np.float64)
    init = np.percentile(values, [10, 50, 90])
    centres = kmeans_1d(values, init)
    thresholds = (centres[1:] + centres[:-1]) / 2
    print(f"k-means init (10/50/90th pct): {np.round(init, 2).tolist()}")
    print(f"k-means centres CSF/GM/WM:     {np.round(centres, 2).tolist()}")
    print(f"thresholds CSF|GM, GM|WM:      {np.round(thresholds, 2).tolist()}")
    tissue = (CSF + np.searchsorted(thresholds, t1_array.astype(np.float64))).astype(np.uint8)

    labels = np.zeros(t1_array.shape, dtype=np.uint8)
    labels[head] = HEAD
    labels[brain] = tissue[brain]
    if not args.no_smoothing:
        smoothed = majority_filter(labels, brain, (CSF, GM, WM))
        print(f"majority filter relabelled {int(np.count_nonzero(smoothed != labels))} brain voxels")
        labels = smoothed

    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(t1)
    example = resample_isotropic(label_image, args.example_spacing)

    spacing_tag = f"{args.example_spacing:g}".replace(".", "p")
    outputs = {
        args.out_dir / "images" / "colin27.nii.gz": t1,
        args.out_dir / "labels" / "colin27.nii.gz": label_image,
        args.out_dir / "example" / f"colin27_tissues_{spacing_tag}mm.nii.gz": example,
    }
    for path, image in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
        print(f"wrote {path}  size={image.GetSize()} spacing={image.GetSpacing()} origin={image.GetOrigin()}")

    print(summarize(labels, f"labels {label_image.GetSize()} @ {label_image.GetSpacing()} mm"))
    example_title = f"example {example.GetSize()} @ {example.GetSpacing()} mm"
    print(summarize(sitk.GetArrayFromImage(example), example_title))


if __name__ == "__main__":
    main()
