"""The command line of ``volgen generate`` and the Python that runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .parameters import GenerationParameters, ParameterError
from .workspace import GenerationPaths

#: What the module offers to ``pip install`` into Slicer's Python (after the user confirms).
VOLGEN_REQUIREMENT = "volgen"


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
    params: GenerationParameters, paths: GenerationPaths, *, python: str | None = None, overwrite: bool = False
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
        "--steps", str(params.steps),
        "--noise-correlation", _number(params.noise_correlation),
        "--device", params.device,
        "--unknown-labels", params.unknown_labels,
        "--progress", "json",
    ]  # fmt: skip
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
    env.setdefault("HF_HUB_OFFLINE", "1")
    options: dict[str, object] = {"env": env}
    if sys.platform == "win32":
        options["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(
            subprocess, "CREATE_NEW_PROCESS_GROUP", 0
        )
    else:
        options["start_new_session"] = True
    return options


@dataclass(frozen=True)
class EnvironmentStatus:
    """What a Python executable offers for running volgen.

    Attributes:
        python: The executable checked.
        volgen_version: volgen's version there, ``None`` when volgen cannot be imported.
        torch_version: torch's version there, ``None`` when torch cannot be imported.
        cuda: Whether torch sees a CUDA device.
        error: Why the check failed (the executable does not run, volgen or torch is missing).
    """

    python: str
    volgen_version: str | None = None
    torch_version: str | None = None
    cuda: bool = False
    error: str | None = None

    @property
    def ready(self) -> bool:
        """volgen and torch both import."""
        return self.volgen_version is not None and self.torch_version is not None


_CHECK = """
import json
info = {}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = bool(torch.cuda.is_available())
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import volgen
    info["volgen"] = volgen.__version__
    from volgen.api import default_model_dir
    info["default_model"] = str(default_model_dir())
except Exception as e:
    info["volgen_error"] = f"{type(e).__name__}: {e}"
print("VOLGEN-CHECK " + json.dumps(info))
"""


def check_environment(python: str | None = None, *, timeout: float = 120.0) -> EnvironmentStatus:
    """Ask a Python executable whether volgen and torch import there (runs it once, a few seconds).

    Args:
        python: The executable (default :func:`default_python_executable`).
        timeout: Seconds to wait (importing torch the first time can be slow).
    """
    info, error = _run_check(python or default_python_executable(), timeout)
    if error is not None:
        return EnvironmentStatus(python=python or default_python_executable(), error=error)
    problems = [info[key] for key in ("volgen_error", "torch_error") if key in info]
    return EnvironmentStatus(
        python=python or default_python_executable(), volgen_version=info.get("volgen"),
        torch_version=info.get("torch"), cuda=bool(info.get("cuda", False)),
        error="; ".join(problems) if problems else None,
    )


def default_model_dir(python: str | None = None, *, timeout: float = 120.0) -> Path | None:
    """Where the volgen installed in ``python`` keeps its embedded default model (``None`` without volgen)."""
    info, error = _run_check(python or default_python_executable(), timeout)
    if error is not None or "default_model" not in info:
        return None
    return Path(info["default_model"])


_check_cache: dict[str, dict[str, object]] = {}


def _run_check(python: str, timeout: float) -> tuple[dict, str | None]:
    if python in _check_cache:
        return _check_cache[python], None
    try:
        done = subprocess.run(
            [python, "-c", _CHECK], capture_output=True, text=True, timeout=timeout, check=False,
            **subprocess_options(),  # type: ignore[arg-type]
        )
    except FileNotFoundError:
        return {}, f"Python executable not found: {python}"
    except PermissionError:
        return {}, f"Python executable cannot be run: {python}"
    except subprocess.TimeoutExpired:
        return {}, f"{python} did not answer within {timeout:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith("VOLGEN-CHECK "):
            info = json.loads(line[len("VOLGEN-CHECK ") :])
            if "volgen" in info and "torch" in info:
                _check_cache[python] = info  # only a complete environment is cached: installs change it
            return info, None
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
    return {}, f"{python} is not a working Python: {tail[0]}"


def forget_environment_checks() -> None:
    """Drop cached :func:`check_environment` answers (after installing volgen)."""
    _check_cache.clear()
