"""The case workflow: one segmentation file and its samples, from the file to the written outputs.

``volgen generate`` (:func:`volgen.generation.generate_samples`) and ``volgen batch``
(:mod:`volgen.batch.runner`) both run a case through :class:`CaseWorkflow`:

1. :meth:`CaseWorkflow.read` checks the settings against the model, refuses a grid that needs more memory
   than allowed from the header (before a voxel is decompressed), reads the segmentation once, the DICOM
   patient identifiers to copy and the reference (on the segmentation's grid, or resampled onto it), and
   checks the memory again on the image;
2. :meth:`CaseWorkflow.groups` splits the samples into runs of the pipeline (as many volumes together as fit
   in memory, :meth:`~volgen.generation.VolumeGenerator.volumes_together`);
3. :meth:`CaseWorkflow.generate` generates one group (each volume what it would be alone, bit for bit on
   the CPU);
4. :meth:`CaseWorkflow.write` writes one sample as its :class:`~volgen.generation.OutputPlan` says: the
   volume (a temporary file, then renamed), then its :class:`~volgen.generation.Sidecar`, then the optional
   preview (:func:`write_outputs`: all or nothing for the volume and its sidecar).

What differs between the two callers stays with them: ``generate`` checks every output before the model
loads and removes every sample again if one fails; ``batch`` claims, skips and records items, and a sample
whose write fails fails alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volgen.generation.generator import GeneratedVolume, GenerationRequest, VolumeGenerator
from volgen.generation.settings import GenerateSettings
from volgen.generation.sidecar import Sidecar
from volgen.types import PathLike

if TYPE_CHECKING:
    from volgen.generation.files import OutputPlan

logger = logging.getLogger(__name__)


@dataclass
class CaseWorkflow:
    """One segmentation read and checked, ready to generate and write its samples (make it with
    :meth:`read`).

    Attributes:
        generator: The model on its device.
        segmentation: The segmentation's path as given (recorded so in the sidecars).
        image: The segmentation (SimpleITK label image), read once.
        together: How many of the case's samples one run of the pipeline generates.
        reference: The reference's path as given, or ``None``.
        reference_image: The reference on the segmentation's grid (SimpleITK), or ``None``.
        resample_reference: Whether the reference was resampled onto the grid (recorded in the sidecars).
        patient_info: DICOM patient identifiers copied into every DICOM output, or ``None``.
        model_path: The model folder recorded in the sidecars (``None``: the embedded default model).
        max_memory: The memory budget in bytes (``None``: a share of what is free).
    """

    generator: VolumeGenerator
    segmentation: PathLike
    image: Any
    together: int
    reference: PathLike | None = None
    reference_image: Any = None
    resample_reference: bool = False
    patient_info: dict[str, Any] | None = None
    model_path: PathLike | None = None
    max_memory: int | None = None

    @classmethod
    def read(
        cls,
        generator: VolumeGenerator,
        segmentation: PathLike,
        settings: GenerateSettings,
        *,
        samples: int = 1,
        reference: PathLike | None = None,
        resample_reference: bool = False,
        copy_patient_info: bool = False,
        model_path: PathLike | None = None,
        max_memory: int | None = None,
    ) -> CaseWorkflow:
        """Check and read one case whose ``samples`` samples share ``settings`` (but for the seed).

        Args:
            copy_patient_info: Read the patient identifiers of a DICOM segmentation to copy into the outputs
                (the caller decides: DICOM output only).
            Others: As the attributes.

        Raises:
            VolgenError: Settings the model refuses (λ < 1 without a reference included), a grid that needs
                more memory than allowed, an unreadable segmentation or reference, a reference on another
                grid (without ``resample_reference``).
        """
        from volgen import io
        from volgen.generation.reference import match_reference

        source = Path(segmentation)
        generator.check(settings, reference=reference is not None)
        # from the header first: a small .nii.gz can hold gigabytes of voxels; refuse it before decompressing
        header = io.read_header(source)
        together = generator.volumes_together(header, settings, samples, max_memory)
        generator.check_memory(header, settings, max_memory, source=source, volumes=together)
        image = io.read_label(source)
        patient_info = io.patient_info_of(source) if copy_patient_info else None
        reference_image = None
        if reference is not None:
            reference_image = match_reference(
                io.read_image(reference),
                image,
                resample=resample_reference,
                source=reference,
                segmentation=source,
            )
        generator.check_memory(image, settings, max_memory, source=source, volumes=together)
        return cls(
            generator=generator,
            segmentation=segmentation,
            image=image,
            together=together,
            reference=reference,
            reference_image=reference_image,
            resample_reference=resample_reference,
            patient_info=patient_info,
            model_path=model_path,
            max_memory=max_memory,
        )

    def groups(self, samples: int) -> list[range]:
        """The indices ``0 .. samples - 1`` in runs of at most :attr:`together` (one run of the pipeline
        each), in order."""
        return [
            range(first, min(first + self.together, samples)) for first in range(0, samples, self.together)
        ]

    def generate(
        self, settings: Sequence[GenerateSettings], *, progress: Callable[[Any], None] | None = None
    ) -> list[GeneratedVolume]:
        """One volume per entry of ``settings`` (they differ in the seed only), generated together."""
        source = Path(self.segmentation)
        requests = [GenerationRequest(self.image, s, self.reference_image, source) for s in settings]
        return self.generator.generate_many(requests, progress=progress, max_memory=self.max_memory)

    def write(
        self,
        plan: OutputPlan,
        volume: GeneratedVolume,
        settings: GenerateSettings,
        *,
        overwrite: bool,
        started: float,
        output: PathLike | None = None,
    ) -> list[str]:
        """Write one generated sample as ``plan`` says: the volume, its sidecar, the optional preview.

        Args:
            plan: Its checked output paths and format.
            volume: The generated sample.
            settings: Its settings (its seed), recorded in the sidecar.
            overwrite: Replace existing outputs.
            started: When the work began (``time.perf_counter``): the sidecar's ``seconds`` count from it.
            output: The output as the sidecar records it (default ``plan.output``).

        Returns:
            One warning line per optional output that failed (the preview), else nothing.
        """
        sidecar = Sidecar.describe(
            volume,
            self.generator,
            settings,
            segmentation=self.segmentation,
            output=plan.output if output is None else output,
            output_format=plan.format,
            model_path=self.model_path,
            reference=self.reference,
            resample_reference=self.resample_reference,
        )
        if self.patient_info is not None:
            sidecar.patient_info_copied = sorted(self.patient_info)  # what --copy-patient-info copied
        from volgen.io import printable  # file names may hold control characters no font has

        name = self.generator.metadata.name
        title = printable(
            f"{Path(self.segmentation).name} -> {plan.output.name} ({name}, seed {settings.seed})"
        )
        return write_outputs(
            plan,
            volume,
            sidecar,
            self.generator,
            overwrite=overwrite,
            patient_info=self.patient_info,
            started=started,
            title=title,
            reference_image=self.reference_image,
        )


def remove_replaced(before: dict[Path, Any]) -> None:
    """Remove what was written at the paths of ``before`` since it was taken (see
    :func:`volgen.io.remove_replaced`), saying so in the log."""
    from volgen import io

    for path in io.remove_replaced(before):
        logger.info("removed %s (the run did not finish)", path)


def write_outputs(
    plan: OutputPlan,
    volume: GeneratedVolume,
    sidecar: Sidecar,
    generator: VolumeGenerator,
    *,
    overwrite: bool,
    started: float,
    title: str,
    patient_info: dict[str, Any] | None = None,
    reference_image: Any = None,
) -> list[str]:
    """Write the volume, then its sidecar (each atomically), then the optional preview.

    All or nothing for the result: if the sidecar cannot be written or the run is interrupted (Ctrl-C,
    SIGTERM) before this call returns, what it wrote is removed again (found by identity, see
    :func:`volgen.io.remove_replaced`), so a volume never stands without its sidecar, nor a sidecar alone.
    A failing preview is optional: it is reported (returned as one line) and the volume
    and sidecar stay.
    """
    from volgen import io

    meta = generator.metadata
    before = {p: io.file_identity(p) for p in (plan.output, plan.sidecar, plan.preview) if p is not None}
    try:
        io.write_volume(
            volume.image,
            plan.output,
            overwrite=overwrite,
            format=plan.format,
            modality=meta.intensity.modality,
            series_description=f"SYNTHETIC volgen {meta.name}",
            patient_info=patient_info,
            protected=plan.protected,
        )
        sidecar.seconds = round(time.perf_counter() - started, 3)
        sidecar.write(plan.sidecar, overwrite=overwrite)
        if plan.preview is None:
            return []
        return write_preview(
            plan,
            volume,
            title=title,
            reference=reference_image,
            overwrite=overwrite,
            class_names=meta.label_map.class_names,
        )
    except BaseException:  # what this call renamed into place, even if the signal came in a write's cleanup
        remove_replaced(before)
        raise


def write_preview(
    plan: OutputPlan,
    volume: GeneratedVolume,
    *,
    title: str,
    reference: Any = None,
    overwrite: bool = False,
    class_names: Any = None,
) -> list[str]:
    """The PNG montage, or one warning line if it cannot be made (the result it shows is kept)."""
    try:
        from volgen.preview import save_montage

        save_montage(
            volume.condition,
            volume.image,
            plan.preview,
            reference=reference,
            class_names=class_names,
            overwrite=overwrite,
            title=title,
        )
    except Exception as exc:  # noqa: BLE001 - an optional output: any failure becomes one line, result kept
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"{plan.preview}: preview not written ({detail}); {plan.output} is complete"
        logger.warning(message)
        return [message]
    return []
