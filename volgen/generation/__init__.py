"""The generation layer, between the pipeline (tensors) and files.

- :class:`VolumeGenerator` holds a loaded model on its device and turns an in-memory segmentation (a
  SimpleITK image, and an optional reference) into a :class:`GeneratedVolume` on the same grid.
- :func:`generate` is the file level: check the outputs, read, generate, write the volume and its
  :class:`Sidecar` (all or nothing), then the optional preview.
- :class:`GenerateSettings` is the one description of a generation, validated when it is built.
"""

from volgen.generation.device import available_memory, estimate_memory, resolve_device
from volgen.generation.files import GenerateResult, OutputPlan, generate
from volgen.generation.generator import GeneratedVolume, VolumeGenerator, slices_along
from volgen.generation.reference import geometry_difference, match_reference
from volgen.generation.settings import GenerateSettings, SettingsError, parse_memory
from volgen.generation.sidecar import Sidecar, file_sha256

__all__ = [
    "GenerateResult",
    "GenerateSettings",
    "GeneratedVolume",
    "OutputPlan",
    "SettingsError",
    "Sidecar",
    "VolumeGenerator",
    "available_memory",
    "estimate_memory",
    "file_sha256",
    "generate",
    "geometry_difference",
    "match_reference",
    "parse_memory",
    "resolve_device",
    "slices_along",
]
