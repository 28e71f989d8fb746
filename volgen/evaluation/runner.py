"""``volgen evaluate``: score generated volumes against their masks (and real volumes) case by case."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from volgen.evaluation.cases import EvaluationCase
from volgen.evaluation.metrics import AXES, consistency, dice
from volgen.evaluation.planes import plane_consistency
from volgen.evaluation.report import CaseEvaluation, EvaluationReport, _class_stats
from volgen.evaluation.segmenters import IntensityVolumeSegmenter, VolumeSegmenter
from volgen.labels import LabelMap


def array_slice_axis(image: Any, slice_axis: str) -> str:
    """The array axis (``z``, ``y`` or ``x`` of the ``(z, y, x)`` array) closest to a world slice axis.

    ``slice_axis`` is the generator's: ``axial`` (world S/I), ``coronal`` (A/P) or ``sagittal`` (L/R).
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    world_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[slice_axis]
    voxel_axis = int(np.argmax(np.abs(direction[world_axis])))
    return AXES[2 - voxel_axis]


def _grids(a: Any, b: Any) -> str:
    return f"size {tuple(a.GetSize())} vs {tuple(b.GetSize())}, spacing " + (
        f"{tuple(round(s, 4) for s in a.GetSpacing())} vs {tuple(round(s, 4) for s in b.GetSpacing())}"
    )


class _CaseLoader:
    """Reads a case's volumes, remaps its mask and checks that everything is on the segmentation's grid."""

    def __init__(self, label_map: LabelMap | None, unknown_labels: str) -> None:
        self.label_map = label_map
        self.unknown_labels = unknown_labels

    def __call__(self, case: EvaluationCase) -> tuple[Any, np.ndarray, Any, Any]:
        import SimpleITK as sitk

        from volgen.errors import InputError
        from volgen.io import Geometry, read_image, read_label

        seg = read_label(case.segmentation)
        raw = sitk.GetArrayViewFromImage(seg)
        if self.label_map is not None:
            mask = self.label_map.remap(raw, unknown=self.unknown_labels, source=case.segmentation)  # type: ignore[arg-type]
        else:
            mask = np.array(raw)
        grid = Geometry.of(seg)
        volumes = []
        for path in (case.generated, case.real):
            if path is None:
                volumes.append(None)
                continue
            image = read_image(path)
            if not Geometry.of(image).close_to(grid, atol=1e-3):
                raise InputError(
                    path, f"not on the grid of its segmentation {case.segmentation} ({_grids(image, seg)})"
                )
            volumes.append(image)
        return seg, mask, volumes[0], volumes[1]


def _resolve_label_map(segmenter: Any, label_map: LabelMap | None) -> LabelMap | None:
    from volgen.errors import VolgenError

    own_map = getattr(segmenter, "label_map", None)
    if label_map is None and isinstance(own_map, LabelMap):
        return own_map
    if (
        label_map is not None
        and isinstance(own_map, LabelMap)
        and own_map.class_names != label_map.class_names
    ):
        raise VolgenError(
            f"the segmenter's classes ({', '.join(own_map.class_names)}) differ from the label map's "
            f"({', '.join(label_map.class_names)})"
        )
    return label_map


def _fit_intensity_segmenter(cases: Sequence[EvaluationCase], load: _CaseLoader) -> IntensityVolumeSegmenter:
    import SimpleITK as sitk

    from volgen.errors import VolgenError

    missing = [c.case for c in cases if c.real is None]
    if missing:
        raise VolgenError(
            "the intensity segmenter is fitted on real volumes: every case needs one "
            f"(missing for {', '.join(missing[:5])})"
        )
    pairs = []
    for case in cases:
        _, mask, _, real = load(case)
        pairs.append((sitk.GetArrayViewFromImage(real), mask))
    return IntensityVolumeSegmenter.fit(pairs)


def evaluate_cases(
    cases: Sequence[EvaluationCase],
    segmenter: VolumeSegmenter | Literal["intensity"],
    *,
    label_map: LabelMap | None = None,
    slice_axis: str = "axial",
    modality: str = "MR",
    unknown_labels: str = "error",
    planes: bool = True,
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Faithfulness, agreement with real, per-plane 3D consistency and intensity realism of generated volumes.

    Args:
        cases: From :func:`~volgen.evaluation.cases.find_evaluation_cases`.
        segmenter: A :class:`VolumeSegmenter` (e.g. :class:`volgen.segmenter.Segmenter`,
            :class:`~volgen.evaluation.segmenters.CommandSegmenter`) or ``"intensity"``: an
            :class:`IntensityVolumeSegmenter` fitted on the cases' real volumes (every case needs one then).
        label_map: Remaps the masks (and a command segmenter's output) to class indices; ``None`` uses the
            label values as they are (a learned segmenter's own label map is used when this is ``None``).
        slice_axis: The generator's slice axis (``axial``, ``coronal``, ``sagittal``), to name the
            through-plane axis in the consistency ratios.
        modality: ``CT`` reports intensities as HU; ``MR`` in the volumes' own arbitrary units.
        unknown_labels: Mask values the label map does not know: ``error`` or ``background``.
        planes: Compute the per-plane metrics (:mod:`volgen.evaluation.planes`) for cases with a real volume.
        progress: Called with a short message per case.

    Raises:
        InputError: unreadable volumes, a generated or real volume not on its segmentation's grid, mask values
            unknown to the label map.
        VolgenError: ``"intensity"`` without real volumes; a learned segmenter whose classes differ from the
            label map.
    """
    import SimpleITK as sitk

    from volgen.errors import VolgenError

    if not cases:
        raise VolgenError("no cases to evaluate")
    label_map = _resolve_label_map(segmenter, label_map)
    load = _CaseLoader(label_map, unknown_labels)
    if isinstance(segmenter, str):
        if segmenter != "intensity":
            raise VolgenError(f"unknown segmenter {segmenter!r}")
        segmenter = _fit_intensity_segmenter(cases, load)

    results: list[CaseEvaluation] = []
    report = EvaluationReport(
        cases=results,
        class_names=[],
        segmenter=getattr(segmenter, "name", type(segmenter).__name__),
        slice_axis=slice_axis,
        units="HU" if modality == "CT" else "a.u. (volume units)",
    )
    all_classes: set[int] = set(range(1, label_map.num_classes)) if label_map is not None else set()
    names: dict[int, str] = (
        dict(enumerate(label_map.class_names)) if label_map is not None else {0: "background"}
    )
    for case in cases:
        if progress is not None:
            progress(f"{case.case}: segmenting")
        seg, mask, gen_image, real_image = load(case)
        gen = sitk.GetArrayFromImage(gen_image)
        pred_gen = np.asarray(segmenter.segment(gen_image))
        pred_real = None if real_image is None else np.asarray(segmenter.segment(real_image))
        if label_map is None:
            found = {int(v) for v in np.unique(mask)} | {int(v) for v in np.unique(pred_gen)}
            all_classes |= found - {0}
            names.update({v: str(v) for v in found if v != 0})
        classes = sorted(all_classes)

        def named(scores: dict[int, float]) -> dict[str, float]:
            return {names[c]: v for c, v in scores.items()}

        item = CaseEvaluation(case=case.case, faithfulness=named(dice(pred_gen, mask, classes)))
        real = None
        axis = array_slice_axis(seg, slice_axis)
        if real_image is not None:
            real = sitk.GetArrayFromImage(real_image)
            item.agreement = named(dice(pred_gen, pred_real, classes))
            item.segmenter_on_real = named(dice(pred_real, mask, classes))
            item.consistency = consistency(gen, real, mask > 0, slice_axis=axis)
            if planes:
                if progress is not None:
                    progress(f"{case.case}: per-plane metrics")
                item.planes = plane_consistency(gen, real, mask, direction=seg.GetDirection())
                if not report.reslices:
                    report.reslices = _reslices(case.case, mask, gen, real, seg, item)
        item.intensity = _intensities(mask, gen, real, [0, *classes], names)
        if not report.example:
            report.example = _example_slices(mask, gen, real, pred_gen, axis)
        results.append(item)
    report.class_names = [names[c] for c in [0, *sorted(all_classes)]]
    return report


def _intensities(
    mask: np.ndarray, gen: np.ndarray, real: np.ndarray | None, classes: list[int], names: dict[int, str]
) -> dict[str, dict[str, Any]]:
    out = {}
    for c in classes:
        inside = mask == c
        if inside.any():
            out[names[c]] = {
                "voxels": int(inside.sum()),
                "generated": _class_stats(gen[inside]),
                "real": None if real is None else _class_stats(real[inside]),
            }
    return out


def _example_slices(
    mask: np.ndarray, gen: np.ndarray, real: np.ndarray | None, pred: np.ndarray, axis: str
) -> dict[str, np.ndarray]:
    """The slice (along the generator's slice axis) with the most foreground, from each volume."""
    dim = AXES.index(axis)
    others = tuple(d for d in range(3) if d != dim)
    index = int(np.argmax((mask > 0).sum(axis=others)))
    out = {
        "segmentation": np.take(mask, index, axis=dim),
        "generated": np.take(gen, index, axis=dim),
        "prediction": np.take(pred, index, axis=dim),
    }
    if real is not None:
        out["real"] = np.take(real, index, axis=dim)
    return {k: np.asarray(v) for k, v in out.items()}


def _reslices(
    case: str, mask: np.ndarray, gen: np.ndarray, real: np.ndarray, seg: Any, item: CaseEvaluation
) -> dict[str, Any]:
    """One plane per array axis through the body's centre of mass, from the real and the generated volume."""
    body = np.argwhere(mask > 0)
    centre = body.mean(axis=0).round().astype(int) if len(body) else np.array(mask.shape) // 2
    spacing = tuple(float(s) for s in reversed(seg.GetSpacing()))
    return {
        "case": case,
        "spacing": spacing,
        "planes": {a: m.plane for a, m in (item.planes or {}).items()},
        "real": {a: np.take(real, centre[d], axis=d) for d, a in enumerate(AXES)},
        "generated": {a: np.take(gen, centre[d], axis=d) for d, a in enumerate(AXES)},
    }
