"""The public Python API of volgen (stable import paths; the code lives in :mod:`volgen.generation`).

>>> from volgen.api import GenerateSettings, generate
>>> generate("seg.nii.gz", "synthetic.nii.gz", settings=GenerateSettings(seed=1))  # doctest: +SKIP

A multi-axis model, slicing along every axis in turn (``volgen generate --slice-axes``; see
``docs/consistency.md``):

>>> settings = GenerateSettings(slice_axes=["axial", "coronal", "sagittal"], axis_schedule="late",
...                             late_fraction=0.3, noise_correlation=0.99)
>>> generate("seg.nii.gz", "synthetic.nii.gz", model="multi-axis-model", settings=settings)  # doctest: +SKIP

Several samples of one segmentation (seeds ``seed``, ``seed + 1``, ...) generated together, each written with
its sidecar (``out_s0.nii.gz``, ``out_s1.nii.gz``, ...; see :func:`volgen.io.naming.sample_paths`):

>>> generate_samples("seg.nii.gz", "out.nii.gz", samples=4)  # doctest: +SKIP

For many volumes with one model loaded once, use :class:`VolumeGenerator` on in-memory images
(``generate``, ``generate_samples``, ``generate_many``).
"""

from __future__ import annotations

from pathlib import Path

from volgen import defaults
from volgen.generation import (
    GeneratedVolume,
    GenerateResult,
    GenerateSettings,
    GenerationRequest,
    Sidecar,
    VolumeGenerator,
    available_memory,
    estimate_memory,
    generate,
    generate_samples,
    parse_memory,
    resolve_device,
    sample_settings,
    slices_along,
)
from volgen.io.naming import default_output, sample_paths, sidecar_path

DEFAULT_MODEL_DIR = defaults.MODEL_DIR


def default_model_dir() -> Path:
    """The model folder shipped inside the package."""
    return defaults.MODEL_DIR


__all__ = [
    "DEFAULT_MODEL_DIR",
    "GenerateResult",
    "GenerateSettings",
    "GeneratedVolume",
    "GenerationRequest",
    "Sidecar",
    "VolumeGenerator",
    "available_memory",
    "default_model_dir",
    "default_output",
    "estimate_memory",
    "generate",
    "generate_samples",
    "parse_memory",
    "resolve_device",
    "sample_paths",
    "sample_settings",
    "sidecar_path",
    "slices_along",
]
