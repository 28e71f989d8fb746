"""What decides a generated volume: :class:`GenerateSettings`, validated once, when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from volgen import defaults
from volgen.errors import VolgenError
from volgen.types import UnknownLabels


class SettingsError(VolgenError):
    """A generation setting is out of range; the message names the option and the allowed values."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GenerateSettings:
    """Everything that decides the generated volume (recorded in the sidecar).

    Defaults come from :mod:`volgen.defaults`. Every value is checked when the settings are built (a
    :class:`SettingsError` naming the command-line option); what depends on the model (steps up to its
    training timesteps, class names) is checked by :meth:`volgen.generation.VolumeGenerator.check`.

    Attributes:
        seed: Seed of all randomness, ``0 .. 2**63 - 1``.
        scheduler: Sampler name (:data:`volgen.defaults.SCHEDULERS`).
        num_inference_steps: Denoising steps over the full schedule (``>= 1``); ``None``: the model's own
            (``sampling.steps`` in its ``volgen.json``), else :data:`volgen.defaults.STEPS`.
        noise_correlation: ρ of the initial noise between slices, in [0, 1) (its coarse scales).
        fine_noise_correlation: ρ of the initial noise's fine scales between slices, in [0, 1), or
            ``"auto"`` (the default: by the slice spacing, :data:`volgen.defaults.FINE_NOISE_BY_SPACING`);
            equal to ``noise_correlation``: one ρ at every scale, volgen's earlier noise.
        background_fine_noise_correlation: ρ of the fine scales in the background, away from every
            labelled class (:func:`volgen.sampling.background_weight`), in [0, 1); ``"auto"``: by the slice
            spacing over the model's pixel (:func:`volgen.sampling.background_rho_for`); ``None``: the model's
            own (``sampling.background_fine_noise_correlation``), else the fine ρ everywhere; ``"same"``: the
            fine ρ everywhere, whatever the model asks.
        x0_smoothing: σ in slices of the through-plane smoothing of the x0 prediction, in [0, 10].
        guidance_scale: Classifier-free guidance ``w`` in [0, 20] (1: off); ``None``: the model's own
            (``sampling.guidance_scale``), else :data:`volgen.defaults.GUIDANCE_SCALE` for a model with
            "specified" flags and off for older models, which cannot be guided.
        strength: λ in [0, 1] (below 1 needs a reference).
        keep: Class names kept in the condition (the rest become background); ``None``: all.
        drop: Class names dropped (become background).
        unknown_labels: ``error`` or ``background`` for label values the model does not know.
        slice_batch_size: Slices per UNet forward, or ``"auto"`` (chosen from the device's free memory); does
            not change the result.
        slice_axes: ``None``: slice along the model's own axis (single-axis sampling). A list of axes
            (``axial``, ``coronal``, ``sagittal``, each at most once) that a multi-axis model was trained on:
            sample in the isotropic cube frame, the slicing axis changing by ``axis_schedule``; the first is
            the primary axis (ρ runs along it; ``late`` keeps it for the early steps). For a single-axis model
            only its own axis is allowed (the same as ``None``).
        axis_schedule: ``cycle`` (the axis changes every step) or ``late`` (the first axis, then the axes
            cycled in the last ``late_fraction`` of the steps); see :func:`volgen.multiaxis.axis_schedule`.
        late_fraction: ``late``: the fraction of the steps, the last ones, that cycle the axes, in [0, 1].
        resampling: How the volume comes back from the model's frame onto the segmentation's grid:
            ``mask`` (each voxel from its own class's frame pixels) or ``linear``
            (:data:`volgen.defaults.RESAMPLINGS`).
    """

    seed: int = defaults.SEED
    scheduler: str = defaults.SCHEDULER
    num_inference_steps: int | None = None
    noise_correlation: float = defaults.NOISE_CORRELATION
    fine_noise_correlation: float | str = defaults.FINE_NOISE_CORRELATION
    background_fine_noise_correlation: float | str | None = None
    x0_smoothing: float = defaults.X0_SMOOTHING
    guidance_scale: float | None = None
    strength: float = defaults.STRENGTH
    keep: list[str] | None = None
    drop: list[str] | None = None
    unknown_labels: UnknownLabels = defaults.UNKNOWN_LABELS  # type: ignore[assignment]
    slice_batch_size: int | str = defaults.SLICE_BATCH_SIZE
    slice_axes: list[str] | None = defaults.SLICE_AXES  # type: ignore[assignment]
    axis_schedule: str = defaults.AXIS_SCHEDULE
    late_fraction: float = defaults.LATE_FRACTION
    resampling: str = defaults.RESAMPLING

    def __post_init__(self) -> None:
        if isinstance(self.slice_axes, tuple):  # one form in the sidecar and in comparisons
            object.__setattr__(self, "slice_axes", list(self.slice_axes))
        for problem in self._problems():
            raise SettingsError(problem)

    def for_model(self, metadata: Any) -> GenerateSettings:
        """These settings with what they leave to the model decided by it: ``num_inference_steps`` ``None``
        becomes the model's ``sampling.steps`` or :data:`volgen.defaults.STEPS`, ``guidance_scale`` and
        ``background_fine_noise_correlation`` ``None`` the model's ``sampling`` entry where it has one
        (otherwise it stays ``None``: for guidance the pipeline's default by the model's flags,
        :meth:`volgen.pipeline.SegmentationToVolumePipeline.resolve_guidance_scale`; for the background the
        fine ρ everywhere). What the settings say wins; resolving twice changes nothing.

        Args:
            metadata: The model's :class:`volgen.models.ModelMetadata` (its ``sampling``).
        """
        sampling = metadata.sampling
        steps, guidance = self.num_inference_steps, self.guidance_scale
        background = self.background_fine_noise_correlation
        if steps is None:
            steps = sampling.steps if sampling.steps is not None else defaults.STEPS
        if guidance is None:
            guidance = sampling.guidance_scale
        if background is None:
            background = sampling.background_fine_noise_correlation
        return replace(
            self,
            num_inference_steps=steps,
            guidance_scale=guidance,
            background_fine_noise_correlation=background,
        )

    def _problems(self):
        if not _is_int(self.seed) or not 0 <= self.seed <= defaults.MAX_SEED:
            yield f"--seed must be an integer in 0..{defaults.MAX_SEED}, got {self.seed!r}"
        if self.scheduler not in defaults.SCHEDULERS:
            yield f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(defaults.SCHEDULERS)}"
        steps = self.num_inference_steps
        if steps is not None and (not _is_int(steps) or steps < 1):
            yield f"--steps must be an integer >= 1, got {self.num_inference_steps!r}"
        if not _is_number(self.noise_correlation) or not 0.0 <= self.noise_correlation < 1.0:
            yield f"--noise-correlation (ρ) must be in [0, 1), got {self.noise_correlation!r}"
        fine = self.fine_noise_correlation
        if fine != defaults.AUTO_FINE_NOISE and (not _is_number(fine) or not 0.0 <= fine < 1.0):
            yield f"--fine-noise-correlation must be in [0, 1) or auto, got {fine!r}"
        background = self.background_fine_noise_correlation
        if background not in (None, defaults.SAME_FINE_NOISE, defaults.AUTO_FINE_NOISE) and (
            not _is_number(background) or not 0.0 <= background < 1.0
        ):
            yield f"--rho-fine-background must be in [0, 1), auto or same, got {background!r}"
        if not _is_number(self.x0_smoothing) or not 0.0 <= self.x0_smoothing <= defaults.MAX_X0_SMOOTHING:
            top = defaults.MAX_X0_SMOOTHING
            yield f"--x0-smoothing must be in [0, {top:g}] slices, got {self.x0_smoothing!r}"
        if self.guidance_scale is not None and (
            not _is_number(self.guidance_scale)
            or not 0.0 <= self.guidance_scale <= defaults.MAX_GUIDANCE_SCALE
        ):
            top = defaults.MAX_GUIDANCE_SCALE
            yield f"--guidance-scale must be in [0, {top:g}], got {self.guidance_scale!r}"
        if not _is_number(self.strength) or not 0.0 <= self.strength <= 1.0:
            yield f"--strength (λ) must be in [0, 1], got {self.strength!r}"
        if self.unknown_labels not in defaults.UNKNOWN_LABELS_CHOICES:
            choices = " or ".join(repr(c) for c in defaults.UNKNOWN_LABELS_CHOICES)
            yield f"--unknown-labels must be {choices}, got {self.unknown_labels!r}"
        if self.slice_batch_size != defaults.AUTO_SLICE_BATCH and (
            not _is_int(self.slice_batch_size) or self.slice_batch_size < 1
        ):
            yield f"--slice-batch-size must be an integer >= 1 or auto, got {self.slice_batch_size!r}"
        axes = self.slice_axes
        if axes is not None:
            names = ", ".join(defaults.AXIS_NAMES)
            if isinstance(axes, str) or not all(isinstance(a, str) for a in axes) or not axes:
                yield f"--slice-axes must be a non-empty list of axes ({names}), got {axes!r}"
            elif unknown := [a for a in axes if a not in defaults.AXIS_NAMES]:
                yield f"--slice-axes: unknown axis {unknown[0]!r}; choose from {names}"
            elif len(set(axes)) != len(axes):
                yield f"--slice-axes names an axis twice: {', '.join(axes)}"
        if self.axis_schedule not in defaults.AXIS_SCHEDULES:
            choices = ", ".join(defaults.AXIS_SCHEDULES)
            yield f"--axis-schedule must be one of {choices}, got {self.axis_schedule!r}"
        if not _is_number(self.late_fraction) or not 0.0 <= self.late_fraction <= 1.0:
            yield f"--late-fraction must be in [0, 1], got {self.late_fraction!r}"
        if self.resampling not in defaults.RESAMPLINGS:
            yield f"--resampling must be one of {', '.join(defaults.RESAMPLINGS)}, got {self.resampling!r}"
        for name in ("keep", "drop"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                yield f"--{name} must be a list of class names, got {value!r}"


def _number_or_word(text: str | float, words: tuple[str, ...], problem: str) -> float | str:
    """A command-line value that is one of ``words`` or a number (``"0.5"`` -> 0.5); anything else is a
    :class:`SettingsError` saying ``problem`` and what was given."""
    value = str(text).strip().lower()
    if value in words:
        return value
    try:
        return float(value)
    except ValueError:
        raise SettingsError(f"{problem}, got {text!r}") from None


def parse_fine_noise_correlation(text: str | float) -> float | str:
    """``"auto"`` or a number as given on the command line (``"0.5"`` -> 0.5); anything else is a
    :class:`SettingsError`."""
    problem = "--fine-noise-correlation must be a number in [0, 1) or auto"
    return _number_or_word(text, (defaults.AUTO_FINE_NOISE,), problem)


def parse_background_noise_correlation(text: str | float | None) -> float | str | None:
    """``None`` (the model's own), ``"auto"``, ``"same"`` or a number as given on the command line; anything
    else is a :class:`SettingsError`."""
    if text is None:
        return None
    words = (defaults.SAME_FINE_NOISE, defaults.AUTO_FINE_NOISE)
    return _number_or_word(text, words, "--rho-fine-background must be a number in [0, 1), auto or same")


def parse_slice_batch_size(text: str | int) -> int | str:
    """``"auto"`` or a whole number as given on the command line (``"32"`` -> 32); anything else is a
    :class:`SettingsError`."""
    value = str(text).strip().lower()
    if value == defaults.AUTO_SLICE_BATCH:
        return defaults.AUTO_SLICE_BATCH
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise SettingsError(f"--slice-batch-size must be an integer >= 1 or auto, got {text!r}")


def check_samples(samples: object) -> int:
    """``samples`` if it is a whole number in ``1..MAX_SAMPLES``, else a :class:`SettingsError`."""
    if not _is_int(samples) or not 1 <= samples <= defaults.MAX_SAMPLES:  # type: ignore[operator]
        raise SettingsError(f"--samples must be an integer in 1..{defaults.MAX_SAMPLES}, got {samples!r}")
    return int(samples)  # type: ignore[arg-type]


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`volgen.defaults.PRECISIONS`, else a :class:`SettingsError`."""
    if precision not in defaults.PRECISIONS:
        raise SettingsError(f"--precision must be {', '.join(defaults.PRECISIONS)}; got {precision!r}")
    return precision


def parse_memory(text: str | int | None) -> int | None:
    """``"8G"``, ``"512M"``, ``"2000000"`` -> bytes (``None`` stays ``None``); inf, NaN, <= 0 are refused."""
    if text is None:
        return None
    value = str(text).strip().upper().removesuffix("B")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = 1
    if value and value[-1] in units:
        value, scale = value[:-1], units[value[-1]]
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number * scale < 1:
        raise SettingsError(f"--max-memory must be a positive size such as 8G or 512M, got {text!r}")
    return int(number * scale)


def sample_settings(settings: GenerateSettings, samples: int) -> list[GenerateSettings]:
    """The settings of ``samples`` samples of one segmentation: sample ``k`` uses seed ``settings.seed + k``.

    Raises:
        SettingsError: ``samples`` outside ``1..MAX_SAMPLES``, or the last seed beyond ``MAX_SEED``.
    """
    samples = check_samples(samples)
    if settings.seed + samples - 1 > defaults.MAX_SEED:
        raise SettingsError(
            f"--seed {settings.seed} with --samples {samples}: sample seeds run to seed + {samples - 1}, "
            f"above {defaults.MAX_SEED}"
        )
    return [replace(settings, seed=settings.seed + k) for k in range(samples)]
