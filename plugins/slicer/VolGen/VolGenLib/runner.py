"""Running ``volgen generate`` as a child process and following its JSON progress.

:class:`GenerationRunner` starts the process, reads stdout and stderr in two daemon threads (so neither
pipe fills up and blocks the CLI) and queues what it reads. The caller takes the events on its own
thread: :meth:`GenerationRunner.poll` never blocks (call it from a Qt timer), :meth:`GenerationRunner.wait`
blocks until the end (tests, scripts, Slicer's self-test). Callbacks therefore never run on a reader
thread, which matters in Slicer where only the main thread may touch the scene or the GUI.

The :class:`Runner` protocol is what the module's Logic relies on; anything with these methods (a fake in a
test, a runner on a remote machine) can stand in.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from .command import subprocess_options
from .progress import ProgressEvent, parse_progress_line

#: Seconds :meth:`GenerationRunner.cancel` waits after terminating before it kills.
TERMINATE_TIMEOUT = 5.0
_STDERR_LINES = 200


@dataclass
class RunResult:
    """How a run ended.

    Attributes:
        returncode: The process's exit code (negative: killed by that signal on POSIX).
        output: The file the CLI reported in its ``done`` event; ``None`` when it did not finish.
        outputs: Every sample's file (``--samples``), in order; ``[output]`` for one sample.
        error: The CLI's error message (its ``error`` event or ``error: ...`` line), or what else went
            wrong; ``None`` on success.
        cancelled: The run was cancelled.
        events: Every progress event, in order.
        stderr: The last lines the CLI wrote on stderr.
        seconds: Wall time from start to end.
    """

    returncode: int | None
    output: Path | None = None
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    cancelled: bool = False
    events: list[ProgressEvent] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Finished, exit code 0, and an output reported."""
        return not self.cancelled and self.returncode == 0 and self.output is not None and self.error is None


@runtime_checkable
class Runner(Protocol):
    """What the module's Logic needs from a runner."""

    def start(self) -> Runner: ...

    def poll(self) -> list[ProgressEvent]: ...

    @property
    def running(self) -> bool: ...

    @property
    def finished(self) -> bool: ...

    def wait(
        self, timeout: float | None = None, on_event: Callable[[ProgressEvent], None] | None = None
    ) -> RunResult: ...

    def cancel(self, timeout: float = TERMINATE_TIMEOUT) -> None: ...


class GenerationRunner:
    """One ``volgen generate`` child process.

    Args:
        command: The arguments (:func:`VolGenLib.command.build_command`).
        cwd: Working folder of the process.
        env: Environment (default: this process's, with unbuffered UTF-8 output).
    """

    def __init__(
        self, command: Sequence[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None
    ):
        self.command = [str(c) for c in command]
        self.cwd = None if cwd is None else str(cwd)
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.events: list[ProgressEvent] = []
        self.noise: list[str] = []
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._open_streams = 0
        self._cancelled = False
        self._started = 0.0
        self._ended: float | None = None
        self._result: RunResult | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> GenerationRunner:
        """Start the process (once) and the two reader threads."""
        if self.process is not None:
            raise RuntimeError("this runner has already been started")
        options = subprocess_options()
        if self.env is not None:
            options["env"] = self.env
        self._started = time.monotonic()
        self.process = subprocess.Popen(  # noqa: S603 - an argument list, no shell
            self.command,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,  # type: ignore[arg-type]
        )
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(
                target=self._read, args=(name, stream), name=f"volgen-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._open_streams = 2
        return self

    def _read(self, name: str, stream: IO[str] | None) -> None:
        if stream is None:
            self._queue.put((name, None))
            return
        try:
            for line in stream:
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):  # the pipe was closed under us (kill)
            pass
        finally:
            self._queue.put((name, None))

    @property
    def started(self) -> bool:
        """:meth:`start` was called."""
        return self.process is not None

    @property
    def running(self) -> bool:
        """The process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def finished(self) -> bool:
        """The process has ended and all its output was read (call :meth:`poll` to get there)."""
        return self._result is not None or (
            self.process is not None and self._open_streams == 0 and self.process.poll() is not None
        )

    @property
    def cancelled(self) -> bool:
        """:meth:`cancel` was called."""
        return self._cancelled

    @property
    def last_progress(self) -> ProgressEvent | None:
        """The latest ``progress`` event."""
        return next((e for e in reversed(self.events) if e.kind == "progress"), None)

    # -- reading -------------------------------------------------------------------------------------------

    def poll(self) -> list[ProgressEvent]:
        """The events that arrived since the last call; never blocks."""
        return self._drain(block_until=None)

    def _drain(self, block_until: float | None) -> list[ProgressEvent]:
        new: list[ProgressEvent] = []
        while True:
            try:
                if block_until is None:
                    name, line = self._queue.get_nowait()
                else:
                    name, line = self._queue.get(timeout=max(0.0, min(0.1, block_until - time.monotonic())))
            except queue.Empty:
                return new
            if line is None:
                self._open_streams -= 1
                continue
            if name == "stderr":
                self._stderr.append(line)
                continue
            event = parse_progress_line(line)
            if event is None:
                if line.strip():
                    self.noise.append(line)
                continue
            self.events.append(event)
            new.append(event)
            if block_until is not None:  # a blocking caller wants each event as soon as it arrives
                return new

    def wait(
        self, timeout: float | None = None, on_event: Callable[[ProgressEvent], None] | None = None
    ) -> RunResult:
        """Block until the process ends and its output is read, passing each event to ``on_event``.

        Args:
            timeout: Seconds to wait at most; on expiry the run is cancelled.
            on_event: Called on this thread with every new event (events an earlier :meth:`poll` returned
                are not repeated).

        Returns:
            The :class:`RunResult`.
        """
        if self.process is None:
            raise RuntimeError("start the runner first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
            for event in self._drain(block_until=time.monotonic() + 0.1):
                if on_event is not None:
                    on_event(event)
        for event in self.poll():
            if on_event is not None:
                on_event(event)
        return self.result()

    def cancel(self, timeout: float = TERMINATE_TIMEOUT) -> None:
        """Stop the process: terminate (SIGTERM / TerminateProcess), then kill after ``timeout`` seconds.

        Returns when the process has ended; its output pipes are closed so the reader threads stop.
        Cancelling a finished run only marks it cancelled when it had not succeeded.
        """
        if self.process is None:
            self._cancelled = True
            return
        if self.process.poll() is None:
            self._cancelled = True
            try:
                self.process.terminate()
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            except OSError:  # already gone
                pass
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._drain(block_until=None)

    # -- outcome -------------------------------------------------------------------------------------------

    @property
    def stderr_lines(self) -> list[str]:
        """The last lines of stderr read so far."""
        return list(self._stderr)

    def _path(self, reported: str) -> Path:
        """A path the CLI reported, relative to its working folder."""
        path = Path(reported)
        return Path(self.cwd) / path if not path.is_absolute() and self.cwd is not None else path

    def result(self) -> RunResult:
        """The :class:`RunResult` of a finished (or cancelled) run."""
        if self._result is not None:
            return self._result
        if self.process is None or (self.process.poll() is None and not self._cancelled):
            raise RuntimeError("the run has not finished")
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._drain(block_until=None)
        returncode = self.process.poll()
        if self._ended is None:
            self._ended = time.monotonic()
        done = next((e for e in reversed(self.events) if e.kind == "done"), None)
        error = None if self._cancelled else error_message(self.events, self.stderr_lines, returncode)
        output, outputs = None, []
        if done is not None and done.output and not self._cancelled and returncode == 0:
            output = self._path(done.output)
            outputs = [self._path(o) for o in done.outputs] or [output]
        if error is None and not self._cancelled and output is None:
            error = "volgen generate ended without reporting an output" + _tail(self.stderr_lines)
        self._result = RunResult(
            returncode=returncode,
            output=output,
            outputs=outputs,
            error=error,
            cancelled=self._cancelled,
            events=list(self.events),
            stderr=self.stderr_lines,
            seconds=self._ended - self._started,
        )
        return self._result


def error_message(
    events: Sequence[ProgressEvent], stderr: Sequence[str], returncode: int | None
) -> str | None:
    """The message to show for a failed run, or ``None`` when it succeeded.

    In order of preference: the CLI's ``error`` event; its ``error: ...`` line on stderr; a hint when volgen
    is not installed in that Python; the last line of stderr (a usage error or a traceback's last line).
    """
    event = next((e for e in reversed(events) if e.kind == "error" and e.message), None)
    if event is not None:
        return event.message
    if returncode == 0:
        return None
    for line in reversed(stderr):
        text = line.strip()
        if text.lower().startswith("error:"):
            return text[len("error:") :].strip()
    joined = "\n".join(stderr)
    if "No module named volgen" in joined or "No module named 'volgen'" in joined:
        return "volgen is not installed in this Python (install it, or choose another Python executable)"
    if returncode is not None and returncode < 0:
        return f"volgen generate was stopped by signal {-returncode}" + _tail(stderr)
    if returncode == 130:
        return "volgen generate was interrupted"
    return f"volgen generate failed with exit code {returncode}" + _tail(stderr)


def _tail(stderr: Sequence[str]) -> str:
    lines = [line.strip(" │|╭╮╰╯─\t") for line in stderr if line.strip(" │|╭╮╰╯─\t")]
    return f": {lines[-1]}" if lines else ""


#: CLI options as the panel names them, for error messages shown in Slicer.
PANEL_NAMES: dict[str, str] = {
    "--unknown-labels background": "Advanced → 'Treat unknown label values as background'",
    "--noise-correlation (ρ)": "ρ",
    "--strength (λ)": "λ",
    "--steps": "Steps",
    "--scheduler": "Scheduler",
    "--device cuda": "Advanced → Device 'cuda'",
    "--reference": "the reference image",
    "--model": "the model folder",
}


def panel_error(message: str, paths: object | None = None) -> str:
    """A CLI error message as a Slicer user reads it: temporary file names and CLI options replaced.

    Args:
        message: The CLI's error message.
        paths: The run's :class:`VolGenLib.GenerationPaths` (its input and reference file names become
            "the input segmentation" and "the reference image").
    """
    if paths is not None:
        for attribute, name in (("input", "the input segmentation"), ("reference", "the reference image")):
            path = getattr(paths, attribute, None)
            if path is not None:
                message = message.replace(str(path), name)
    for option, name in PANEL_NAMES.items():
        message = message.replace(option, name)
    return message
