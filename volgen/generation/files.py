"""The file level, paths in and out: ``generate`` checks outputs, reads, generates, writes (all or nothing).

This is what ``volgen generate`` (and the Slicer module, through the CLI) calls. :func:`generate_samples`
writes several samples of one segmentation (seeds ``seed``, ``seed + 1``, ...), generated together; all of
them or none. Reading, checking, generating and writing one case is the case workflow
(:class:`~volgen.generation.case.CaseWorkflow`), which ``volgen batch`` runs for its cases too; this module
adds what is ``generate``'s own: every output checked before the model loads, its naming, and the rollback
of every sample when one fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volgen import defaults
from volgen.generation.case import CaseWorkflow, remove_replaced
from volgen.generation.generator import VolumeGenerator, sample_settings
from volgen.generation.settings import GenerateSettings
from volgen.io.naming import default_output, sample_paths, sidecar_path
from volgen.types import PathLike

logger = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """What :func:`generate` wrote and how long it took.

    Attributes:
        warnings: Optional outputs that failed without touching the result (e.g. the preview), one line each.
    """

    output: Path
    sidecar: Path
    preview: Path | None
    model_id: str
    seconds: float
    classes_kept: list[str] = field(default_factory=list)
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)


@dataclass
class OutputPlan:
    """The paths one generation writes, checked before any work is done."""

    output: Path
    format: str
    sidecar: Path
    preview: Path | None
    protected: list[tuple[str, PathLike | None]] = field(default_factory=list)

    @classmethod
    def make(
        cls,
        segmentation: Path,
        output: PathLike | None,
        *,
        output_format: str | None = None,
        preview: PathLike | None = None,
        overwrite: bool = False,
        protected: list[tuple[str, PathLike | None]] | None = None,
    ) -> OutputPlan:
        """Decide and check the outputs (refused if they exist without ``overwrite``, or if one is, contains
        or lies inside a ``protected`` path: the input, the reference, the model folder; links resolved);
        temporaries a killed run left for them are removed."""
        from volgen import io

        out = Path(output) if output is not None else default_output(segmentation)
        fmt = io.output_format(out, output_format)
        plan = cls(out, fmt, sidecar_path(out), None if preview is None else Path(preview), protected or [])
        io.check_apart(plan.named_outputs())
        targets = [(plan.output, fmt == "dicom"), (plan.sidecar, False)]
        if plan.preview is not None:
            targets.append((plan.preview, False))
        for path, is_dir in targets:
            io.check_output_path(path, overwrite=overwrite, directory=is_dir, protected=plan.protected)
        for path, _ in targets:
            for stale in io.remove_stale_temporaries(path):
                logger.info("removed %s (left by an interrupted run)", stale)
        return plan

    def named_outputs(self) -> list[tuple[str, Path | None]]:
        """``(what, path)`` of everything this plan writes, for :func:`volgen.io.check_apart`."""
        return [("output", self.output), ("sidecar", self.sidecar), ("preview", self.preview)]


def generate(
    segmentation: PathLike,
    output: PathLike | None = None,
    *,
    model: PathLike | None = None,
    settings: GenerateSettings | None = None,
    reference: PathLike | None = None,
    resample_reference: bool = False,
    output_format: str | None = None,
    overwrite: bool = False,
    preview: PathLike | None = None,
    device: str = defaults.DEVICE,
    precision: str = defaults.PRECISION,
    max_memory: int | None = None,
    copy_patient_info: bool = False,
    progress: Callable[[Any], None] | None = None,
    loaded: Any = None,
    generator: VolumeGenerator | None = None,
) -> GenerateResult:
    """Generate a synthetic volume for a segmentation file and write it with the segmentation's geometry.

    Args:
        segmentation: A label volume (NIfTI, NRRD, MHA, DICOM folder or DICOM SEG).
        output: Where to write (format by extension, or ``output_format="dicom"`` for a folder). Default:
            ``<segmentation>_synthetic.<ext>`` next to the input (see :mod:`volgen.io.naming`).
        model: A volgen model folder; ``None`` uses the embedded default model.
        settings: Seed, scheduler, steps, ρ, λ, class selection (see :class:`GenerateSettings`).
        reference: A real image for adjustable anatomy (``settings.strength``), on the segmentation's grid
            unless ``resample_reference``.
        resample_reference: Resample the reference onto the segmentation's grid (linear) instead of
            refusing a reference whose grid differs.
        output_format: ``nifti``, ``nrrd``, ``mha`` or ``dicom``; ``None`` follows the extension.
        overwrite: Replace existing outputs (the output, its sidecar and the preview).
        preview: Also write a PNG montage here. Optional: if it fails, the volume and sidecar stay and the
            failure is one line in ``GenerateResult.warnings``.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` is bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU.
        max_memory: Refuse to start above this many bytes (estimated); default 80% of what is available.
        copy_patient_info: DICOM output only: copy patient identifiers from a DICOM input.
        progress: Called with :class:`volgen.pipeline.Progress` after every UNet chunk.
        loaded: ``model`` already loaded with :func:`volgen.models.load_model`.
        generator: A :class:`VolumeGenerator` to reuse (many files, one model set up once); overrides
            ``model``, ``loaded``, ``device`` and ``precision``.
    """
    # locals() here are exactly the parameters, each one of generate_samples' (tests/test_case_workflow.py)
    return generate_samples(**locals(), samples=1)[0]


def generate_samples(
    segmentation: PathLike,
    output: PathLike | None = None,
    *,
    samples: int,
    model: PathLike | None = None,
    settings: GenerateSettings | None = None,
    reference: PathLike | None = None,
    resample_reference: bool = False,
    output_format: str | None = None,
    overwrite: bool = False,
    preview: PathLike | None = None,
    device: str = defaults.DEVICE,
    precision: str = defaults.PRECISION,
    max_memory: int | None = None,
    copy_patient_info: bool = False,
    progress: Callable[[Any], None] | None = None,
    loaded: Any = None,
    generator: VolumeGenerator | None = None,
) -> list[GenerateResult]:
    """Generate ``samples`` synthetic volumes for one segmentation file, together, and write them all.

    Sample ``k`` uses seed ``settings.seed + k`` and is exactly what :func:`generate` with that seed writes
    (bit for bit on the CPU). Its output is ``output`` for one sample, else named by
    :func:`volgen.io.naming.sample_paths` (``out.nii.gz`` -> ``out_s0.nii.gz``, ``out_s1.nii.gz``, ...), each
    with its sidecar (``out_s0.nii.gz.json``, recording its seed) and, with ``preview``, its montage
    (``p_s0.png``, ...). Every output is checked before any work; the samples run through the UNet together,
    as many at a time as fit in memory (:meth:`VolumeGenerator.volumes_together`). All or nothing: if a write
    fails or the run is interrupted, the samples already written by this call are removed again.

    Args:
        samples: How many volumes, ``1 .. MAX_SAMPLES``.
        output, preview: As :func:`generate`; named per sample as above.
        Others: As :func:`generate`.

    Returns:
        One :class:`GenerateResult` per sample, in order.
    """
    started = time.perf_counter()
    settings = settings or GenerateSettings()
    seeds = sample_settings(settings, samples)  # checks samples and the last seed first
    seg_path = Path(segmentation)
    model_dir = model if model is not None else getattr(loaded, "path", None) or defaults.MODEL_DIR
    protected = [("input", seg_path), ("reference", reference), ("model folder", model_dir)]
    outputs, previews = _sample_outputs(seg_path, output, samples, preview)
    plans = [
        OutputPlan.make(
            seg_path,
            out,
            output_format=output_format,
            preview=view,
            overwrite=overwrite,
            protected=protected,
        )
        for out, view in zip(outputs, previews, strict=True)
    ]
    from volgen import io

    io.check_apart(named for plan in plans for named in plan.named_outputs())  # across samples too
    if generator is None:
        generator = VolumeGenerator(
            loaded if loaded is not None else model, device=device, precision=precision
        )
    if model is None and loaded is None:  # the CLI says it once, in its own words
        logger.info(
            "using the embedded default model (%s); real use needs --model", generator.metadata.trained_on
        )
    settings = generator.settings_for(settings)  # the model's sampling defaults, once: run and sidecars
    seeds = sample_settings(settings, samples)
    case = CaseWorkflow.read(
        generator,
        segmentation,
        settings,
        samples=samples,
        reference=reference,
        resample_reference=resample_reference,
        copy_patient_info=copy_patient_info and plans[0].format == "dicom",
        model_path=model,
        max_memory=max_memory,
    )
    results: list[GenerateResult] = []
    report = _OverallProgress(progress, samples)
    before = output_identities(seg_path, output, samples=samples, preview=preview)
    try:
        for group in case.groups(samples):
            report.start_group(len(group))
            volumes = case.generate([seeds[k] for k in group], progress=report)
            for k, volume in zip(group, volumes, strict=True):
                plan = plans[k]
                warnings = case.write(
                    plan,
                    volume,
                    seeds[k],
                    overwrite=overwrite,
                    started=started,
                    output=output if output is not None and samples == 1 else plan.output,
                )
                results.append(
                    GenerateResult(
                        output=plan.output,
                        sidecar=plan.sidecar,
                        preview=plan.preview if plan.preview is not None and not warnings else None,
                        model_id=generator.model.model_id,
                        seconds=time.perf_counter() - started,
                        classes_kept=volume.classes_kept,
                        device=str(generator.device),
                        warnings=warnings,
                    )
                )
    except BaseException:
        # all or nothing: no sample stands while the call fails, wherever it stopped (also in the cleanup
        # of a write whose file was already renamed into place)
        remove_replaced(before)
        raise
    return results


def _sample_outputs(
    segmentation: Path, output: PathLike | None, samples: int, preview: PathLike | None
) -> tuple[list[Path], list[Path | None]]:
    outputs = sample_paths(output if output is not None else default_output(segmentation), samples)
    previews: list[Path | None] = (
        [None] * samples if preview is None else list(sample_paths(preview, samples))
    )
    return outputs, previews


def output_identities(
    segmentation: PathLike, output: PathLike | None, *, samples: int = 1, preview: PathLike | None = None
) -> dict[Path, Any]:
    """What is now at every path :func:`generate_samples` would write (outputs, sidecars, previews), for
    :func:`volgen.io.remove_replaced`: after an interruption, it removes exactly what the run wrote."""
    from volgen import io

    outputs, previews = _sample_outputs(Path(segmentation), output, samples, preview)
    paths = [*outputs, *(sidecar_path(o) for o in outputs), *(p for p in previews if p is not None)]
    return {path: io.file_identity(path) for path in paths}


class _OverallProgress:
    """Progress over all samples of a call that runs them in groups: slices done and total of the whole
    call, not of the current group."""

    def __init__(self, progress: Callable[[Any], None] | None, samples: int) -> None:
        self.progress, self.samples = progress, samples
        self.offset, self.done, self.group = 0, 0, 1

    def start_group(self, size: int) -> None:
        self.offset, self.done, self.group = self.offset + self.done, 0, size

    def __call__(self, p: Any) -> None:
        from volgen.pipeline import Progress

        self.done = p.slices_done
        if self.progress is not None:
            total = p.slices_total // self.group * self.samples
            self.progress(Progress(p.step, p.steps, self.offset + p.slices_done, total))
