"""Evaluation of generated volumes: faithfulness, per-plane 3D consistency, intensity realism, hardware.

Modules, one job each:

- :mod:`~volgen.evaluation.metrics`: Dice, the intensity segmenter, neighbour-difference smoothness.
- :mod:`~volgen.evaluation.planes`: per-plane consistency (neighbour differences inside and outside the body,
  texture correlation, power spectra) of a generated volume against a real one.
- :mod:`~volgen.evaluation.features`: the offline feature extractor and the per-plane Fréchet distance.
- :mod:`~volgen.evaluation.cases`: finding (segmentation, generated[, real]) cases.
- :mod:`~volgen.evaluation.segmenters`: what ``volgen evaluate`` needs from a segmenter; two of them.
- :mod:`~volgen.evaluation.runner`: :func:`evaluate_cases`.
- :mod:`~volgen.evaluation.report` and :mod:`~volgen.evaluation.figure`: the report, its JSON and figures.
- :mod:`~volgen.evaluation.hardware`: FLOPs of a UNet forward.
"""

from volgen.evaluation.cases import VOLUME_SUFFIXES, EvaluationCase, find_evaluation_cases
from volgen.evaluation.features import RandomConvFeatures, frechet_distance
from volgen.evaluation.hardware import unet_forward_flops
from volgen.evaluation.metrics import (
    AXES,
    Consistency,
    IntensitySegmenter,
    consistency,
    dice,
    mean_abs_step,
    smoothness,
)
from volgen.evaluation.planes import PlaneMetrics, plane_consistency, texture_correlation
from volgen.evaluation.report import CaseEvaluation, EvaluationReport, write_report
from volgen.evaluation.runner import array_slice_axis, evaluate_cases
from volgen.evaluation.segmenters import CommandSegmenter, IntensityVolumeSegmenter, VolumeSegmenter

__all__ = [
    "AXES",
    "VOLUME_SUFFIXES",
    "CaseEvaluation",
    "CommandSegmenter",
    "Consistency",
    "EvaluationCase",
    "EvaluationReport",
    "IntensitySegmenter",
    "IntensityVolumeSegmenter",
    "PlaneMetrics",
    "RandomConvFeatures",
    "VolumeSegmenter",
    "array_slice_axis",
    "consistency",
    "dice",
    "evaluate_cases",
    "find_evaluation_cases",
    "frechet_distance",
    "mean_abs_step",
    "plane_consistency",
    "smoothness",
    "texture_correlation",
    "unet_forward_flops",
    "write_report",
]
