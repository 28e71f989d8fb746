"""What a Python executable offers for running volgen: is volgen there, is torch, where is the default model.

Each answer comes from running that Python once (``python -c ...``), so it holds for the executable the
module will run, which need not be Slicer's own.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .command import default_python_executable, subprocess_options

_MARK = "VOLGEN-CHECK "

#: Imports torch and volgen: slow the first time (seconds), used before a run or an install.
_CHECK_SCRIPT = f"""
import json
info = {{}}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = bool(torch.cuda.is_available())
except Exception as e:
    info["torch_error"] = f"{{type(e).__name__}}: {{e}}"
try:
    import volgen
    info["volgen"] = volgen.__version__
except Exception as e:
    info["volgen_error"] = f"{{type(e).__name__}}: {{e}}"
print({_MARK!r} + json.dumps(info))
"""

#: Imports volgen's API module only (numpy, no torch): fast enough to fill the panel's class list.
_DEFAULT_MODEL_SCRIPT = f"""
import json
from volgen.api import default_model_dir
print({_MARK!r} + json.dumps({{"default_model": str(default_model_dir())}}))
"""


#: Resolves a model name (sys.argv[1]) the way ``volgen generate --model`` does: volgen's one resolver.
_RESOLVE_MODEL_SCRIPT = f"""
import json, sys
from volgen.default_model import resolve_model
print({_MARK!r} + json.dumps({{"model": str(resolve_model(sys.argv[1]))}}))
"""


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


_status_cache: dict[str, EnvironmentStatus] = {}
_model_cache: dict[str, Path] = {}


def check_environment(python: str | None = None, *, timeout: float = 120.0) -> EnvironmentStatus:
    """Ask a Python executable whether volgen and torch import there (a ready answer is cached).

    Args:
        python: The executable (default :func:`VolGenLib.default_python_executable`).
        timeout: Seconds to wait (importing torch the first time can be slow).
    """
    python = python or default_python_executable()
    if python in _status_cache:
        return _status_cache[python]
    info, error = _query(python, _CHECK_SCRIPT, timeout)
    if error is not None:
        return EnvironmentStatus(python=python, error=error)
    problems = [str(info[key]) for key in ("volgen_error", "torch_error") if key in info]
    status = EnvironmentStatus(
        python=python,
        volgen_version=info.get("volgen"),
        torch_version=info.get("torch"),
        cuda=bool(info.get("cuda", False)),
        error="; ".join(problems) if problems else None,
    )
    if status.ready:  # only a complete environment is cached: installing volgen or torch changes the answer
        _status_cache[python] = status
    return status


def default_model_dir(python: str | None = None, *, timeout: float = 60.0) -> Path | None:
    """The embedded default model folder of the volgen installed in ``python`` (``None`` without volgen)."""
    python = python or default_python_executable()
    if python not in _model_cache:
        info, error = _query(python, _DEFAULT_MODEL_SCRIPT, timeout)
        if error is not None or "default_model" not in info:
            return None
        _model_cache[python] = Path(info["default_model"])
    return _model_cache[python]


def model_folder(configured: str | None, python: str | None = None, *, timeout: float = 60.0) -> Path | None:
    """The model folder the panel's model field means, as ``volgen generate --model`` reads it: empty is
    the default model, an existing folder is itself, anything else the name of an embedded model
    (``default``, ``colin27-small``) of the volgen installed in ``python``. ``None``: volgen is not
    installed there, or it has no model of that name."""
    if not configured:
        return default_model_dir(python, timeout=timeout)
    if Path(configured).exists():
        return Path(configured)
    python = python or default_python_executable()
    key = f"{python}\0{configured}"
    if key not in _model_cache:
        info, error = _query(python, _RESOLVE_MODEL_SCRIPT, timeout, configured)
        if error is not None or "model" not in info:
            return None
        _model_cache[key] = Path(info["model"])
    return _model_cache[key]


def forget_environment_checks() -> None:
    """Drop cached answers (after installing or upgrading volgen)."""
    _status_cache.clear()
    _model_cache.clear()


def _query(python: str, script: str, timeout: float, *args: str) -> tuple[dict, str | None]:
    """Run ``python -c script args...`` and read the JSON it prints after the marker."""
    try:
        done = subprocess.run(  # noqa: S603 - an argument list, no shell
            [python, "-c", script, *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            check=False,
            **subprocess_options(),  # type: ignore[arg-type]
        )
    except FileNotFoundError:
        return {}, f"Python executable not found: {python}"
    except PermissionError:
        return {}, f"Python executable cannot be run: {python}"
    except OSError as e:
        return {}, f"cannot run {python}: {e}"
    except subprocess.TimeoutExpired:
        return {}, f"{python} did not answer within {timeout:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            try:
                return json.loads(line[len(_MARK) :]), None
            except ValueError:
                break
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {}, f"{python}: {lines[-1] if lines else f'exit code {done.returncode}'}"
