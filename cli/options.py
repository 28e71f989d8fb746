"""What ``volgen generate`` and ``volgen batch`` share: option declarations, settings, progress output.

Defaults are :mod:`volgen.defaults` (``tests/test_defaults.py`` compares every command's defaults with it);
the values are checked once, by :class:`volgen.generation.GenerateSettings`, where :func:`build_settings`
builds them.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from volgen import defaults
from volgen.cli.app import err_console, shown

if TYPE_CHECKING:
    from volgen.generation import GenerateSettings

SchedulerOption = Annotated[str, typer.Option(help="Sampler: " + ", ".join(defaults.SCHEDULERS) + ".")]
StepsOption = Annotated[
    int | None,
    typer.Option(
        help="Denoising steps over the whole schedule (at most the model's training timesteps). Default: "
        f"the model's own (sampling.steps in its volgen.json, see volgen info MODEL), else {defaults.STEPS}. "
        "With --strength λ < 1 only the steps at or below λ run, about λ × STEPS (λ 0.4 --steps 5: 2 "
        "steps); the run says how many on stderr."
    ),
]
StrengthOption = Annotated[
    float,
    typer.Option(
        help="λ in [0, 1]: 0 writes the reference's own values, 1 generates freely. Below 1 the run starts "
        "from the reference noised to λ and runs only the remaining steps (about λ × --steps)."
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        help="Model folder, or an embedded model by name ('default', 'colin27-native', 'colin27-small'; "
        f"volgen models). Default: the embedded model ({defaults.MODEL_DIR.name})."
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No notes, progress or 'wrote' lines; warnings and errors only.")
]
RhoOption = Annotated[
    float,
    typer.Option(
        "--noise-correlation",
        "--rho",
        help="ρ in [0, 1): initial-noise correlation of slices (coarse scales).",
    ),
]
FineRhoOption = Annotated[
    str,
    typer.Option(
        "--fine-noise-correlation",
        "--rho-fine",
        help="ρ in [0, 1) of the initial noise's fine in-plane detail between slices, or auto: by the slice "
        "spacing, like real texture ("
        + ", ".join(f"{rho:g} at {mm:g} mm" for mm, rho in defaults.FINE_NOISE_BY_SPACING)
        + "; native-resolution models: "
        + ", ".join(f"{rho:g} at {mm:g} mm" for mm, rho in defaults.NATIVE_FINE_NOISE_BY_SPACING)
        + "; linear in between, constant beyond). 0: texture is never copied along the slice axis; equal to "
        "--rho: one ρ at every scale, volgen's earlier noise.",
    ),
]
BackgroundRhoOption = Annotated[
    str | None,
    typer.Option(
        "--rho-fine-background",
        help="ρ in [0, 1) of the fine noise in the background, away from every labelled class (0: grain in "
        "air independent between slices, no streaks in reslices); auto: 0 for slices a model pixel or more "
        "apart, the fine ρ for slices half a pixel apart or less; same: the fine ρ everywhere. Default: the "
        "model's own, else same.",
    ),
]
SliceBatchOption = Annotated[
    str,
    typer.Option(
        help="Slices per UNet forward, or auto: from the free memory (at most "
        f"{defaults.AUTO_SLICE_BATCH_CPU} on the CPU). Does not change the result."
    ),
]
UnknownLabelsOption = Annotated[
    str, typer.Option(help="Label values the model does not know: 'error' or 'background'.")
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, fp16 (CUDA) or bf16.",
    ),
]
SliceAxesOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated slice axes of a multi-axis model, primary first (e.g. axial,coronal,sagittal): "
        "sample in an isotropic cube, the slicing axis changing by --axis-schedule. Default: the model's own "
        "axis (single-axis sampling)."
    ),
]
AxisScheduleOption = Annotated[
    str,
    typer.Option(
        help="With --slice-axes: 'cycle' changes the axis every step; 'late' keeps the first axis and cycles "
        "the axes in the last --late-fraction of the steps."
    ),
]
LateFractionOption = Annotated[
    float, typer.Option(help="--axis-schedule late: the fraction of the steps (the last) cycling the axes.")
]
GuidanceOption = Annotated[
    float | None,
    typer.Option(
        help="Classifier-free guidance w towards the mask (1: off, half the UNet passes). Default: the "
        f"model's own (sampling.guidance_scale), else {defaults.GUIDANCE_SCALE:g} for models with "
        "'specified' flags and off for older models."
    ),
]
ResamplingOption = Annotated[
    str,
    typer.Option(
        help="How the volume comes back from the model's frame onto the segmentation's grid: 'mask' "
        "interpolates each voxel from its own class only (boundaries sharp at the segmentation's "
        "resolution), 'linear' across classes."
    ),
]
X0SmoothingOption = Annotated[
    float, typer.Option(help="σ in slices of through-plane smoothing of the x0 prediction (0: off).")
]


class ProgressMode(str, Enum):
    rich = "rich"
    json = "json"
    none = "none"


def split_names(text: str | None) -> list[str] | None:
    """``"liver,kidney"`` -> ``["liver", "kidney"]``; ``None`` stays ``None``."""
    if text is None:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def build_settings(
    *,
    seed: int = defaults.SEED,
    scheduler: str = defaults.SCHEDULER,
    steps: int | None = None,
    noise_correlation: float = defaults.NOISE_CORRELATION,
    fine_noise_correlation: float | str = defaults.FINE_NOISE_CORRELATION,
    background_fine_noise_correlation: str | float | None = None,
    strength: float = defaults.STRENGTH,
    keep: str | None = None,
    drop: str | None = None,
    unknown_labels: str = defaults.UNKNOWN_LABELS,
    precision: str = defaults.PRECISION,
    slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE,
    x0_smoothing: float = defaults.X0_SMOOTHING,
    guidance_scale: float | None = None,
    slice_axes: str | None = None,
    axis_schedule: str = defaults.AXIS_SCHEDULE,
    late_fraction: float = defaults.LATE_FRACTION,
    resampling: str = defaults.RESAMPLING,
) -> GenerateSettings:
    """The generation settings of ``generate`` and ``batch`` from their command-line values, validated once
    (a :class:`volgen.generation.SettingsError` naming the option)."""
    from volgen.generation import GenerateSettings
    from volgen.generation.settings import (
        check_precision,
        parse_background_noise_correlation,
        parse_fine_noise_correlation,
        parse_slice_batch_size,
    )

    check_precision(precision)
    return GenerateSettings(
        seed=seed,
        scheduler=scheduler,
        num_inference_steps=steps,
        noise_correlation=noise_correlation,
        fine_noise_correlation=parse_fine_noise_correlation(fine_noise_correlation),
        background_fine_noise_correlation=parse_background_noise_correlation(
            background_fine_noise_correlation
        ),
        x0_smoothing=x0_smoothing,
        guidance_scale=guidance_scale,
        strength=strength,
        keep=split_names(keep),
        drop=split_names(drop),
        unknown_labels=unknown_labels,  # type: ignore[arg-type]
        slice_batch_size=parse_slice_batch_size(slice_batch_size),
        slice_axes=None if slice_axes is None else [a.lower() for a in split_names(slice_axes) or []],
        axis_schedule=axis_schedule,
        late_fraction=late_fraction,
        resampling=resampling.lower(),
    )


def command_settings(values: Mapping[str, Any]) -> GenerateSettings:
    """The generation settings of a command from its option values by name (a command passes its
    ``locals()``): every option named like a parameter of :func:`build_settings` counts, those the command
    does not have (``volgen batch`` has no ``--x0-smoothing``) keep their defaults. A settings option added
    to both commands thus reaches the settings without another list of names."""
    names = inspect.signature(build_settings).parameters
    return build_settings(**{name: value for name, value in values.items() if name in names})


def notify_model(folder: Path, progress: ProgressMode) -> None:
    """Say, on one line, that an embedded model is in use and what it was trained on (nothing for other
    models; an event with ``--progress json``). Called after the checks, so an error comes first."""
    from volgen.default_model import is_embedded
    from volgen.models import read_metadata

    if not is_embedded(folder):
        return
    notice(
        f"embedded model {folder.name}, trained on {read_metadata(folder).trained_on}; "
        "real use needs --model trained on real data",
        progress,
    )


def notify_sampling(metadata: Any, asked: GenerateSettings, progress: ProgressMode) -> None:
    """Say, on one line, which of the model's own steps and guidance (``sampling`` in its ``volgen.json``) a
    run takes because its options leave them open: what changes its time and its faithfulness (nothing when
    the options say them all). Its background noise ρ changes the grain of the air only: ``volgen info`` and
    the sidecar name it."""
    own = metadata.sampling
    taken = type(own)(
        steps=own.steps if asked.num_inference_steps is None else None,
        guidance_scale=own.guidance_scale if asked.guidance_scale is None else None,
    )
    if taken.options():
        notice(f"model {metadata.name}'s own sampling defaults: {taken.options()}", progress)


def notify_resolution(metadata: Any, grid: Any, progress: ProgressMode, folder: Path | None = None) -> None:
    """Say, on one line, when the model's pixels are coarser than the segmentation's in-plane spacing
    (:meth:`volgen.frames.ModelFrame.resolution_note`; from the header alone). For an embedded model
    (``folder``) the line names the embedded model of the same labels whose pixels fit, if there is one."""
    from volgen.frames import ModelFrame

    note = ModelFrame.of(metadata).resolution_note(grid)
    if note is None:
        return
    finer = _finer_embedded_model(metadata, grid, folder)
    notice(note if finer is None else f"{note}; the embedded model {finer} does: --model {finer}", progress)


def _finer_embedded_model(metadata: Any, grid: Any, folder: Path | None) -> str | None:
    """The name of an embedded model with ``metadata``'s label map whose pixels are not coarser than the
    segmentation's (the first by name), when ``folder`` is an embedded model; else ``None``."""
    from volgen.default_model import embedded_models, is_embedded
    from volgen.frames import ModelFrame
    from volgen.models import read_metadata

    if folder is None or not is_embedded(folder):
        return None
    for name, other in embedded_models().items():
        meta = read_metadata(other)
        fits = ModelFrame.of(meta).resolution_note(grid) is None
        if fits and meta.label_map.name == metadata.label_map.name:
            return name
    return None


def notice(note: str, progress: ProgressMode) -> None:
    """A ``note:`` line on stderr (a ``notice`` event with ``--progress json``; nothing with ``none``)."""
    if progress == ProgressMode.json:
        emit_json(event="notice", message=note)
    elif progress == ProgressMode.rich:
        err_console.print(f"[yellow]note:[/] {shown(note)}", highlight=False, soft_wrap=True)


class StepsNote:
    """Says how many denoising steps run when λ < 1 cuts them ("λ 0.4: 2 of 5 steps"), once, from the
    first progress report (which counts the steps that run), or at the end when none ran (λ 0)."""

    def __init__(self, settings: GenerateSettings, progress: ProgressMode, *, quiet: bool = False) -> None:
        self.settings = settings
        self.progress = progress
        self.pending = settings.strength < 1.0 and not quiet

    def report(self, p: Any) -> None:
        if self.pending:
            self.say(p.steps)

    def finish(self) -> None:
        if self.pending:
            self.say(0)

    def say(self, steps_run: int) -> None:
        self.pending = False
        asked = self.settings.num_inference_steps
        message = f"λ {self.settings.strength:g}: {steps_run} of {asked} steps"
        if self.progress == ProgressMode.json:
            emit_json(event="notice", message=message, steps=steps_run, steps_asked=asked)
        else:
            err_console.print(
                f"[yellow]note:[/] {message} (λ < 1 starts part-way down the noise schedule)",
                highlight=False,
                soft_wrap=True,
            )


def warn(message: str, progress: ProgressMode) -> None:
    """One warning line (an optional output failed; the result stands)."""
    if progress == ProgressMode.json:
        emit_json(event="warning", message=message)
    else:
        err_console.print(f"[yellow]warning:[/] {shown(message)}", highlight=False, soft_wrap=True)


def emit_json(**event: object) -> None:
    """One JSON object per line on stdout (the contract with the Slicer module and other programs)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()
