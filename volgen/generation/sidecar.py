"""The provenance sidecar written next to every generated volume: one typed model, written and read here."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from volgen import __version__
from volgen.errors import InputError, OutputError
from volgen.io.files import file_sha256  # the one SHA-256 of volgen (re-exported here)
from volgen.types import PathLike

#: ``model.path`` of a volume made with the embedded default model (no ``--model``).
EMBEDDED_DEFAULT = "(embedded default)"


class SidecarModel(BaseModel):
    """The model that made a volume."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str
    path: str
    weights_sha256: str
    trained_on: str = ""


class Sidecar(BaseModel):
    """Provenance of one generated volume (``<output>.json``, see :mod:`volgen.io.naming`).

    Unknown keys are kept (a newer volgen may add some); :meth:`read` is what batch resume uses.
    ``settings`` holds what was asked (``slice_axes`` ``null``: the model's own axis); ``slice_axes``,
    ``axis_schedule`` (the slicing axis of each denoised step) and ``cube_voxel_mm`` (multi-axis sampling's
    isotropic voxel, ``null`` in the model's slicing frame), ``guidance_scale`` (``settings`` ``null``: the
    model's default) and ``guided_steps`` (how many of the denoised steps ran guided) say what ran.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    volgen_version: str = __version__
    synthetic: bool = True
    segmentation: str
    output: str
    format: str
    model: SidecarModel
    settings: dict[str, Any]
    classes_kept: list[str]
    reference: str | None = None
    reference_sha256: str | None = None
    reference_resampled: bool = False
    segmentation_sha256: str | None = None
    start_timestep: int = -1
    timesteps: int = 0
    slice_axes: list[str] = []
    axis_schedule: list[str] = []
    cube_voxel_mm: float | None = None
    guidance_scale: float = 1.0
    guided_steps: int = 0
    fine_noise_correlation: float = 0.0
    background_fine_noise_correlation: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    seconds: float = 0.0

    @classmethod
    def describe(
        cls,
        volume: Any,
        generator: Any,
        settings: Any,
        *,
        segmentation: PathLike,
        output: PathLike,
        output_format: str,
        model_path: PathLike | None,
        reference: PathLike | None = None,
        resample_reference: bool = False,
    ) -> Sidecar:
        """The sidecar of a :class:`~volgen.generation.GeneratedVolume` (paths recorded as given;
        ``model_path`` ``None`` is recorded as the embedded default)."""
        loaded = generator.model
        seg, ref = Path(segmentation), None if reference is None else Path(reference)
        return cls(
            segmentation=str(segmentation),
            output=str(output),
            format=output_format,
            model=SidecarModel(
                id=loaded.model_id,
                name=loaded.metadata.name,
                path=str(model_path) if model_path is not None else EMBEDDED_DEFAULT,
                weights_sha256=loaded.weights_sha256,
                trained_on=loaded.metadata.trained_on,
            ),
            settings=asdict(settings),
            classes_kept=volume.classes_kept,
            reference=None if ref is None else str(reference),
            reference_sha256=None if ref is None or ref.is_dir() else file_sha256(ref),
            reference_resampled=bool(resample_reference and ref is not None),
            segmentation_sha256=None if seg.is_dir() else file_sha256(seg),
            start_timestep=volume.start_timestep,
            timesteps=len(volume.timesteps),
            slice_axes=volume.slice_axes,
            axis_schedule=volume.axis_schedule,
            cube_voxel_mm=None if volume.cube_voxel is None else round(volume.cube_voxel, 6),
            guidance_scale=volume.guidance_scale,
            guided_steps=volume.guided_steps,
            fine_noise_correlation=volume.fine_noise_correlation,
            background_fine_noise_correlation=volume.background_fine_noise_correlation,
            device=str(generator.device),
            precision=generator.precision,
        )

    def write(self, path: PathLike, *, overwrite: bool = False) -> None:
        """Write atomically as indented JSON."""
        from volgen.io import atomic_write

        try:
            with atomic_write(path, overwrite=overwrite) as tmp:
                Path(tmp).write_text(
                    json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
                )
        except OSError as exc:
            raise OutputError(path, f"could not write the file ({exc.strerror or exc})") from exc

    @classmethod
    def read(cls, path: PathLike) -> Sidecar:
        """Read a sidecar; a missing, unreadable or malformed one is an :class:`InputError`."""
        from pydantic import ValidationError

        from volgen.config import describe_validation_error

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.model_validate(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(path, f"not a readable sidecar ({exc})") from None
        except ValidationError as exc:
            raise InputError(path, f"not a volgen sidecar: {describe_validation_error(exc)}") from None
