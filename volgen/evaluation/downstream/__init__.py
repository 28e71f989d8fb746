"""Downstream utility (``volgen evaluate-downstream``): segmenters trained on real, synthetic and real +
synthetic pairs, tested on real images.

- :mod:`~volgen.evaluation.downstream.split`: the real train/test split and its leak checks.
- :mod:`~volgen.evaluation.downstream.runner`: :func:`run_downstream` (generation through ``volgen batch``,
  training, testing, resumable).
- :mod:`~volgen.evaluation.downstream.nnunet`: nnU-Net v2 as the segmenter, where it is installed.
- :mod:`~volgen.evaluation.downstream.report`: the report, its JSON, CSV and figure.
"""

from volgen.evaluation.downstream.report import DownstreamReport, RunResult, write_downstream_report
from volgen.evaluation.downstream.runner import (
    SEGMENTERS,
    DownstreamOptions,
    condition_names,
    run_downstream,
    synthesize,
)
from volgen.evaluation.downstream.split import (
    DownstreamSplit,
    check_disjoint,
    generator_training_overlap,
    read_split,
)

__all__ = [
    "SEGMENTERS",
    "DownstreamOptions",
    "DownstreamReport",
    "DownstreamSplit",
    "RunResult",
    "check_disjoint",
    "condition_names",
    "generator_training_overlap",
    "read_split",
    "run_downstream",
    "synthesize",
    "write_downstream_report",
]
