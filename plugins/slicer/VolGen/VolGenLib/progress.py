"""Reading ``volgen generate --progress json``: one JSON object per line on stdout.

The events (see ``cli/generate.py``)::

    {"event": "notice", "message": "..."}                      an embedded model is in use; λ < 1 says
                                                               how many steps run ("λ 0.4: 2 of 5 steps")
    {"event": "start", "segmentation": "..."}
    {"event": "progress", "step": i, "steps": n, "slices_done": a, "slices_total": b, "fraction": f,
     "elapsed": s}
    {"event": "done", "output": "...", "sidecar": "...", "preview": null, "seconds": s,
     "outputs": [...], "sidecars": [...]}                      every sample's files (--samples), in order
    {"event": "error", "message": "..."}                       also "error: ..." on stderr, exit code 1

Anything else on stdout (a library printing a warning, a blank line) is noise and is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Event names the module acts on; others are passed through as ``kind`` so newer CLIs do not break it.
KNOWN_EVENTS: tuple[str, ...] = ("notice", "start", "progress", "done", "error")


@dataclass(frozen=True)
class ProgressEvent:
    """One line of ``--progress json`` output.

    Attributes:
        kind: The ``event`` field: ``notice``, ``start``, ``progress``, ``done``, ``error`` (or a newer one).
        data: The whole JSON object as parsed.
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """Share of the work done, in [0, 1] (``progress`` events; 1.0 for ``done``)."""
        if self.kind == "done":
            return 1.0
        value = self.data.get("fraction")
        if value is None and self.kind == "progress":
            done, total = self.data.get("slices_done"), self.data.get("slices_total")
            if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
                value = done / total
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        return min(1.0, max(0.0, float(value)))

    @property
    def step(self) -> int | None:
        """Denoising step (1-based) of a ``progress`` event."""
        return _int(self.data.get("step"))

    @property
    def steps(self) -> int | None:
        """Number of denoising steps of a ``progress`` event."""
        return _int(self.data.get("steps"))

    @property
    def elapsed(self) -> float | None:
        """Seconds since the CLI started generating."""
        value = self.data.get("elapsed", self.data.get("seconds"))
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def message(self) -> str | None:
        """Text of a ``notice`` or ``error`` event."""
        value = self.data.get("message")
        return None if value is None else str(value)

    @property
    def output(self) -> str | None:
        """Path the CLI wrote (``done`` events)."""
        value = self.data.get("output")
        return None if value is None else str(value)

    @property
    def outputs(self) -> list[str]:
        """Every sample's file (``done`` events; ``--samples``), in order; empty if the CLI lists none."""
        value = self.data.get("outputs")
        return [str(v) for v in value] if isinstance(value, list) else []

    def describe(self) -> str:
        """A short status line for the panel (``step 3/20, 15%``)."""
        if self.kind == "progress":
            fraction = self.fraction or 0.0
            if self.step is not None and self.steps is not None:
                return f"step {self.step}/{self.steps}, {100 * fraction:.0f}%"
            return f"{100 * fraction:.0f}%"
        if self.kind == "done":
            return "done" if self.elapsed is None else f"done in {self.elapsed:.1f} s"
        if self.kind == "start":
            return "loading the model"
        if self.message:
            return self.message
        return self.kind


def parse_progress_line(line: str | bytes) -> ProgressEvent | None:
    """Parse one stdout line of ``volgen generate --progress json``.

    Args:
        line: One line, with or without its newline; bytes are decoded as UTF-8.

    Returns:
        The event, or ``None`` for anything that is not a JSON object with a string ``event`` field
        (blank lines, log lines, partial writes).
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    text = line.strip()
    if not text.startswith("{") or not text.endswith("}"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("event")
    if not isinstance(kind, str) or not kind:
        return None
    return ProgressEvent(kind=kind, data=data)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
