"""The command line of ``volgen generate`` and the Python that runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .parameters import SAMPLES, GenerationParameters, ParameterError
from .workspace import GenerationPaths


def default_python_executable() -> str:
    """The Python that runs volgen by default: Slicer's own.

    Inside Slicer ``sys.executable`` is the Slicer application, not a Python interpreter; Slicer puts its
    interpreter, ``PythonSlicer``, on ``PATH``. Outside Slicer (tests, scripts) this is ``sys.executable``.
    """
    return shutil.which("PythonSlicer") or sys.executable


def volgen_prefix(python: str | None = None) -> list[str]:
    """``[python, "-m", "volgen"]``: runs the CLI of the volgen installed in that Python."""
    return [python or default_python_executable(), "-m", "volgen"]


def build_command(
    params: GenerationParameters,
    paths: GenerationPaths,
    *,
    python: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """The argument list of one ``volgen generate`` run with JSON progress on stdout.

    Args:
        params: The user's settings (validated again here).
        paths: Input, output and (for λ < 1) reference files.
        python: The Python executable that has volgen (default :func:`default_python_executable`).
        overwrite: Pass ``--overwrite`` (replace an existing output).

    Returns:
        The arguments for :class:`subprocess.Popen` (no shell).

    Raises:
        ParameterError: when a setting is out of range or λ < 1 comes without a reference.
    """
    params.validate()
    if params.needs_reference and paths.reference is None:
        raise ParameterError("λ below 1 interpolates towards a real image: choose a reference volume")
    command = [*volgen_prefix(python), "generate", str(paths.input), "--output", str(paths.output)]
    if params.model_dir:
        command += ["--model", str(params.model_dir)]
    if paths.reference is not None:
        command += ["--reference", str(paths.reference), "--strength", _number(params.strength)]
    if params.keep is not None:
        command += ["--keep", ",".join(params.keep)]
    elif params.drop:
        command += ["--drop", ",".join(params.drop)]
    command += [
        "--seed", str(params.seed),
        "--scheduler", params.scheduler,
        "--noise-correlation", _number(params.noise_correlation),
        "--device", params.device,
        "--unknown-labels", params.unknown_labels,
        "--progress", "json",
    ]  # fmt: skip
    if params.steps is not None:
        command += ["--steps", str(params.steps)]
    if params.guidance_scale is not None:
        command += ["--guidance-scale", _number(params.guidance_scale)]
    if params.slice_axes:
        command += ["--slice-axes", ",".join(params.slice_axes)]
    if params.samples != SAMPLES:  # written as OUTPUT_s0, OUTPUT_s1, ...: the done event lists them
        command += ["--samples", str(params.samples)]
    if overwrite:
        command.append("--overwrite")
    return command


def _number(value: float) -> str:
    """A float as the CLI reads it, without a binary-fraction tail (``0.3``, not ``0.30000000000000004``)."""
    return repr(round(float(value), 6))


def subprocess_options() -> dict[str, object]:
    """Keyword arguments for :class:`subprocess.Popen` that keep the CLI quiet and separate.

    Unbuffered UTF-8 output (progress arrives line by line), no console window on Windows, and a new
    process group on POSIX so that terminating it does not reach Slicer.
    """
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", NO_COLOR="1", TERM="dumb")
    options: dict[str, object] = {"env": env}
    if sys.platform == "win32":
        options["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(
            subprocess, "CREATE_NEW_PROCESS_GROUP", 0
        )
    else:
        options["start_new_session"] = True
    return options
