"""Type aliases used across volgen.

Axis orders, stated once:
- SimpleITK images are indexed ``(x, y, z)``; ``sitk.GetArrayFromImage`` gives numpy arrays ``(z, y, x)``.
- TorchIO tensors are ``(C, W, H, D)`` = ``(C, x, y, z)`` in RAS+ world coordinates.
- volgen's slice-model tensors are ``(Z, C, H, W)``: slices along the model's slice axis first.
- Physical coordinates are in millimetres, LPS (DICOM/ITK convention) unless stated otherwise.
"""

from __future__ import annotations

import os
from typing import Literal, TypeAlias

PathLike: TypeAlias = str | os.PathLike[str]
VolumeKind: TypeAlias = Literal["label", "image"]
Encoding: TypeAlias = Literal["onehot", "seed"]
SchedulerName: TypeAlias = Literal["ddpm", "ddim", "dpmsolver++", "euler"]
Modality: TypeAlias = Literal["CT", "MR"]
UnknownLabels: TypeAlias = Literal["error", "background"]
Vec3: TypeAlias = tuple[float, float, float]
Direction: TypeAlias = tuple[float, float, float, float, float, float, float, float, float]
