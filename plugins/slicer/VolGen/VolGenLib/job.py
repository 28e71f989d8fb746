"""One generation from start to end: workspace, command, runner and clean-up rules in one object.

The module's Logic writes the input files into :attr:`GenerationJob.paths`, calls :meth:`GenerationJob.start`,
follows :meth:`GenerationJob.poll` (or :meth:`GenerationJob.wait`), reads the result back and calls
:meth:`GenerationJob.close`. Cancelling removes every file, whatever "keep temporary files" says: a
cancelled run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .command import build_command
from .parameters import GenerationParameters
from .progress import ProgressEvent
from .runner import TERMINATE_TIMEOUT, GenerationRunner, Runner, RunResult
from .workspace import GenerationPaths, TempWorkspace


class GenerationJob:
    """A temp workspace plus the ``volgen generate`` process that works in it.

    Args:
        params: The settings (validated on construction).
        python: The Python executable that has volgen (default: Slicer's own, or this one outside Slicer).
        with_reference: The run uses a reference image (λ).
        keep_files: Keep the workspace after a finished or failed run (not after a cancel).
        workspace_root: Folder to create the workspace in (default: the system's temp folder).
        runner_factory: Builds the runner from the command (default :class:`GenerationRunner`).
    """

    def __init__(
        self,
        params: GenerationParameters,
        *,
        python: str | None = None,
        with_reference: bool = False,
        keep_files: bool = False,
        workspace_root: str | Path | None = None,
        runner_factory: Callable[[list[str], Path], Runner] | None = None,
    ):
        params.validate()
        self.params = params
        self.python = python
        self.workspace = TempWorkspace(workspace_root, keep=keep_files)
        self.paths: GenerationPaths = self.workspace.paths(with_reference=with_reference)
        try:
            self.command = build_command(params, self.paths, python=python)
        except Exception:
            self.workspace.cleanup(force=True)
            raise
        self._runner_factory = runner_factory or (lambda command, cwd: GenerationRunner(command, cwd=cwd))
        self.runner: Runner | None = None

    def start(self) -> GenerationJob:
        """Start the CLI; the input (and reference) files must be in place."""
        missing = [p for p in (self.paths.input, self.paths.reference) if p is not None and not p.is_file()]
        if missing:
            raise FileNotFoundError(f"write the input files first: {', '.join(map(str, missing))}")
        self.runner = self._runner_factory(self.command, self.workspace.folder)
        self.runner.start()
        return self

    @property
    def finished(self) -> bool:
        """The process has ended and its output has been read."""
        return self.runner is not None and self.runner.finished

    def poll(self) -> list[ProgressEvent]:
        """New progress events; never blocks."""
        return [] if self.runner is None else self.runner.poll()

    def wait(
        self, timeout: float | None = None, on_event: Callable[[ProgressEvent], None] | None = None
    ) -> RunResult:
        """Block until the run ends (see :meth:`GenerationRunner.wait`)."""
        if self.runner is None:
            raise RuntimeError("start the job first")
        return self.runner.wait(timeout=timeout, on_event=on_event)

    def result(self) -> RunResult:
        """The result of the finished run."""
        if self.runner is None:
            raise RuntimeError("start the job first")
        return self.runner.wait(timeout=None)

    def cancel(self, timeout: float = TERMINATE_TIMEOUT) -> None:
        """Terminate the process (kill after ``timeout`` s) and remove every file of the run."""
        if self.runner is not None:
            self.runner.cancel(timeout=timeout)
        self.workspace.cleanup(force=True)

    def close(self) -> None:
        """Remove the workspace unless "keep temporary files" was set (call after reading the result)."""
        if self.runner is not None and self.runner.running:
            self.cancel()
            return
        self.workspace.cleanup()

    def __enter__(self) -> GenerationJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
