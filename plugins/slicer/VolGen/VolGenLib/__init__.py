"""Plain-Python helpers of the VolGen Slicer module: nothing here imports slicer, qt, vtk or ctk.

Everything that does not need Slicer lives here, so the project's normal pytest run covers it:

- :class:`GenerationParameters`: the panel's settings, validated;
- :func:`build_command`: the ``volgen generate ... --progress json`` argument list;
- :func:`parse_progress_line` / :class:`ProgressEvent`: the CLI's JSON progress lines;
- :func:`install_source`: where volgen is installed from (a wheel, archive, folder or URL; never a bare name);
- :class:`TempWorkspace`: the temporary folder with the input, reference and output paths;
- :func:`model_classes`, :func:`segment_label_values`: the model's classes and how segments map onto them;
- :class:`GenerationRunner` (behind the :class:`Runner` protocol) and :class:`GenerationJob`: the child
  process, its progress, cancel and clean-up.
"""

from __future__ import annotations

from .command import (
    build_command,
    default_python_executable,
    subprocess_options,
    volgen_prefix,
)
from .environment import (
    EnvironmentStatus,
    check_environment,
    default_model_dir,
    forget_environment_checks,
    model_folder,
)
from .install import (
    FILE_FILTER,
    InstallSource,
    InstallSourceError,
    install_source,
    pip_arguments,
)
from .job import GenerationJob
from .models import (
    ModelInfoError,
    Segment,
    SegmentMapping,
    model_classes,
    model_label_map,
    model_summary,
    normalize_name,
    read_model_metadata,
    segment_label_values,
)
from .parameters import (
    DEVICES,
    GUIDANCE_SCALE,
    MAX_GUIDANCE_SCALE,
    MAX_SAMPLES,
    MODEL_STEPS,
    SAMPLES,
    SCHEDULERS,
    SLICE_AXES,
    UNKNOWN_LABELS,
    GenerationParameters,
    ParameterError,
    guidance_option,
    steps_option,
)
from .progress import ProgressEvent, parse_progress_line
from .runner import TERMINATE_TIMEOUT, GenerationRunner, Runner, RunResult, error_message, panel_error
from .workspace import GenerationPaths, TempWorkspace

__all__ = [
    "DEVICES",
    "GUIDANCE_SCALE",
    "MAX_GUIDANCE_SCALE",
    "MAX_SAMPLES",
    "MODEL_STEPS",
    "SAMPLES",
    "SLICE_AXES",
    "guidance_option",
    "steps_option",
    "SCHEDULERS",
    "TERMINATE_TIMEOUT",
    "UNKNOWN_LABELS",
    "FILE_FILTER",
    "EnvironmentStatus",
    "GenerationJob",
    "GenerationParameters",
    "GenerationPaths",
    "GenerationRunner",
    "InstallSource",
    "InstallSourceError",
    "ModelInfoError",
    "ParameterError",
    "ProgressEvent",
    "RunResult",
    "Runner",
    "Segment",
    "SegmentMapping",
    "TempWorkspace",
    "build_command",
    "check_environment",
    "default_model_dir",
    "default_python_executable",
    "error_message",
    "forget_environment_checks",
    "model_folder",
    "install_source",
    "model_classes",
    "model_label_map",
    "model_summary",
    "normalize_name",
    "panel_error",
    "parse_progress_line",
    "pip_arguments",
    "read_model_metadata",
    "segment_label_values",
    "subprocess_options",
    "volgen_prefix",
]
