"""The settings of one generation, validated before anything is exported or started.

The defaults and limits below mirror ``volgen/defaults.py`` (the panel cannot import volgen: it may not be
installed yet, or only in another Python); ``tests/test_defaults.py`` compares every one of them with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Schedulers ``volgen generate --scheduler`` accepts, in the order the panel lists them.
SCHEDULERS: tuple[str, ...] = (
    "dpmsolver++",
    "ddim",
    "ddpm",
    "unipc",
    "deis",
    "dpmsolver++3m",
    "sde-dpmsolver++",
    "euler",
)
#: Devices ``volgen generate --device`` accepts (``cuda:N`` is accepted too).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: How ``volgen generate --unknown-labels`` treats label values the model does not know.
UNKNOWN_LABELS: tuple[str, ...] = ("error", "background")
#: Slice axes ``volgen generate --slice-axes`` accepts (a multi-axis model's; the first is the primary).
SLICE_AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: Largest classifier-free guidance ``volgen generate --guidance-scale`` accepts.
MAX_GUIDANCE_SCALE = 20.0
#: The panel's guidance: volgen's default ``w`` for models with "specified" flags. At this value the panel
#: passes no ``--guidance-scale``, so the model decides (older models without flags run unguided).
GUIDANCE_SCALE = 1.5
#: The panel's steps at this value (the spin box shows "model's"): it passes no ``--steps``, so the model
#: decides (its own ``sampling.steps``, else volgen's default).
MODEL_STEPS = 0
#: Volumes one run generates (``volgen generate --samples``; sample k has seed + k), and the most it accepts.
SAMPLES = 1
MAX_SAMPLES = 10_000


class ParameterError(ValueError):
    """A generation setting is out of range; the message names the setting as the panel shows it."""


@dataclass
class GenerationParameters:
    """Everything the user chose for one run of ``volgen generate``.

    Attributes:
        model_dir: A volgen model folder; ``None`` or ``""`` uses volgen's embedded default model.
        strength: λ in [0, 1]: 0 returns the reference image, 1 generates freely. Below 1 needs a reference.
        steps: Denoising steps (>= 1); ``None``: the model's own, else volgen's default (no ``--steps``).
        scheduler: One of :data:`SCHEDULERS`.
        seed: Random seed (>= 0).
        noise_correlation: ρ in [0, 1): correlation of the initial noise between neighbouring slices.
        keep: Class names to keep in the condition (the rest become background); ``None``: all.
        drop: Class names to drop (they become background). Give ``keep`` or ``drop``, not both.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        unknown_labels: ``error`` (the CLI refuses label values the model does not know) or ``background``.
        guidance_scale: Classifier-free guidance ``w`` in [0, 20] (1: off); ``None``: the model's default.
        slice_axes: Axes to slice along, primary first (a multi-axis model); ``None``: the model's own axis.
        samples: Volumes to generate, seeds ``seed``, ``seed + 1``, ... (``--samples``), in 1..MAX_SAMPLES.
    """

    model_dir: str | None = None
    strength: float = 1.0
    steps: int | None = None
    scheduler: str = "dpmsolver++"
    seed: int = 0
    noise_correlation: float = 0.995
    keep: list[str] | None = None
    drop: list[str] | None = field(default=None)
    device: str = "auto"
    unknown_labels: str = "error"
    guidance_scale: float | None = None
    slice_axes: list[str] | None = None
    samples: int = SAMPLES

    def __post_init__(self) -> None:
        if self.model_dir is not None:
            self.model_dir = str(self.model_dir).strip() or None
        if self.keep is not None:
            self.keep = _names(self.keep, "keep")
        if self.drop is not None:
            self.drop = _names(self.drop, "drop")
        if self.slice_axes is not None:
            self.slice_axes = [a.lower() for a in _names(self.slice_axes, "slice axes")] or None
        self.validate()

    def validate(self) -> None:
        """Check every setting; raise :class:`ParameterError` naming the first bad one."""
        if isinstance(self.strength, bool) or not isinstance(self.strength, int | float):
            raise ParameterError(f"λ (strength) must be a number, got {self.strength!r}")
        if not math.isfinite(self.strength) or not 0.0 <= self.strength <= 1.0:
            raise ParameterError(f"λ (strength) must be in [0, 1], got {self.strength}")
        steps = self.steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ParameterError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise ParameterError(
                f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ParameterError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        rho = self.noise_correlation
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho):
            raise ParameterError(f"ρ (noise correlation) must be a number, got {rho!r}")
        if not 0.0 <= rho < 1.0:
            raise ParameterError(f"ρ (noise correlation) must be in [0, 1), got {rho}")
        if self.keep is not None and self.drop:
            raise ParameterError("give either classes to keep or classes to drop, not both")
        if self.device not in DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ParameterError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.unknown_labels not in UNKNOWN_LABELS:
            raise ParameterError(
                f"unknown labels must be 'error' or 'background', got {self.unknown_labels!r}"
            )
        self._validate_sampling()

    def _validate_sampling(self) -> None:
        """Guidance, slice axes and the number of samples."""
        w = self.guidance_scale
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w)):
            raise ParameterError(f"guidance must be a number, got {w!r}")
        if w is not None and not 0.0 <= w <= MAX_GUIDANCE_SCALE:
            raise ParameterError(f"guidance must be in [0, {MAX_GUIDANCE_SCALE:g}], got {w}")
        axes = self.slice_axes or []
        unknown = [a for a in axes if a not in SLICE_AXES]
        if unknown:
            raise ParameterError(f"unknown slice axis {unknown[0]!r}; use {', '.join(SLICE_AXES)}")
        if len(set(axes)) != len(axes):
            raise ParameterError(f"slice axes repeat an axis: {', '.join(axes)}")
        n = self.samples
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
            raise ParameterError(f"samples must be an integer in 1..{MAX_SAMPLES}, got {n!r}")

    @property
    def needs_reference(self) -> bool:
        """λ below 1 interpolates towards a real image, which the run must then be given."""
        return self.strength < 1.0

    @classmethod
    def from_class_selection(cls, checked: dict[str, bool], **kwargs: object) -> GenerationParameters:
        """Parameters from the panel's class checkboxes (name -> checked) plus the other settings.

        All checked: no selection (the model's default, every class). Some unchecked: those are dropped.
        """
        dropped = [name for name, on in checked.items() if not on]
        return cls(drop=dropped or None, **kwargs)  # type: ignore[arg-type]


def steps_option(value: int) -> int | None:
    """The panel's steps as :attr:`GenerationParameters.steps`: ``None`` (the model's own) at
    :data:`MODEL_STEPS`, else the value."""
    return None if value == MODEL_STEPS else int(value)


def guidance_option(value: float) -> float | None:
    """The panel's guidance as :attr:`GenerationParameters.guidance_scale`: ``None`` (the model's default) at
    :data:`GUIDANCE_SCALE`, else the value."""
    return None if value == GUIDANCE_SCALE else float(value)


def _names(values: Iterable[str] | str, what: str) -> list[str]:
    """Class names as a clean list: strings only, no commas (the CLI joins them with commas), no blanks."""
    if isinstance(values, str):
        values = values.split(",")
    names = []
    for value in values:
        if not isinstance(value, str):
            raise ParameterError(f"{what}: class names must be strings, got {value!r}")
        name = value.strip()
        if not name:
            continue
        if "," in name:
            raise ParameterError(f"{what}: class name {name!r} contains a comma")
        names.append(name)
    return names
