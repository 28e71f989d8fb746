"""volgen: generate 3D medical image volumes from 3D segmentations.

A segmentation-guided 2D diffusion model (Konz et al., MICCAI 2024), trained with mask ablation and run
slice by slice, made consistent across slices.
"""

from __future__ import annotations

from volgen.runtime import apply_thread_policy

# Before anything imports torch: OpenMP threads that sleep while waiting (volgen/runtime.py), the same for
# the command line and the Python API.
apply_thread_policy()

__version__ = "0.1.0"

__all__ = ["__version__"]
