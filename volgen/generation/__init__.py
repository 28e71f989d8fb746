"""The generation layer, between the pipeline (tensors) and files.

- :class:`VolumeGenerator` holds a loaded model on its device and turns an in-memory segmentation (a
  SimpleITK image, and an optional reference) into a :class:`GeneratedVolume` on the same grid.
- :func:`generate` is the file level: check the outputs, read, generate, write the volume and its
  :class:`Sidecar` (all or nothing), then the optional preview; :func:`generate_samples` the same for several
  samples of one segmentation (seeds ``seed``, ``seed + 1``, ...), generated together.
- :class:`CaseWorkflow` is one case from its file to its written samples (read and check once, generate in
  groups, write volume then sidecar): what ``generate_samples`` and ``volgen batch`` both run.
- :class:`GenerateSettings` is the one description of a generation, validated when it is built.
"""

from volgen.generation.case import CaseWorkflow
from volgen.generation.device import available_memory, estimate_memory, resolve_device
from volgen.generation.files import GenerateResult, OutputPlan, generate, generate_samples
from volgen.generation.generator import (
    GeneratedVolume,
    GenerationRequest,
    VolumeGenerator,
    sample_settings,
    slices_along,
)
from volgen.generation.reference import geometry_difference, match_reference
from volgen.generation.settings import (
    GenerateSettings,
    SettingsError,
    parse_memory,
    parse_slice_batch_size,
)
from volgen.generation.sidecar import Sidecar, file_sha256

__all__ = [
    "CaseWorkflow",
    "GenerateResult",
    "GenerateSettings",
    "GeneratedVolume",
    "GenerationRequest",
    "OutputPlan",
    "SettingsError",
    "Sidecar",
    "VolumeGenerator",
    "available_memory",
    "estimate_memory",
    "file_sha256",
    "generate",
    "generate_samples",
    "geometry_difference",
    "match_reference",
    "parse_memory",
    "parse_slice_batch_size",
    "resolve_device",
    "sample_settings",
    "slices_along",
]
