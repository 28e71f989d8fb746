"""The error hierarchy. The CLI turns any :class:`VolgenError` into one readable line and exit code 1."""

from __future__ import annotations

from pathlib import Path


class VolgenError(Exception):
    """Base class of every error volgen raises on purpose (bad input, bad config, bad model)."""


class InputError(VolgenError):
    """An input file or folder cannot be used; the message names it and says why."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class OutputError(VolgenError):
    """An output cannot be written (exists without overwrite, missing folder, disk full)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class LabelError(InputError):
    """A segmentation's values do not fit a label map."""


class ConfigError(InputError):
    """A YAML config or manifest is invalid (unknown key, value out of range, not YAML)."""


class ModelError(InputError):
    """A model folder is missing, unsafe (pickle weights) or inconsistent."""


class ResourceError(VolgenError):
    """A job would need more memory than allowed; raised before allocating."""
