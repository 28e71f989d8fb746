"""The ``volgen`` command: thin Typer commands that parse, call one library function and render.

Heavy imports (torch, diffusers, SimpleITK) happen inside the commands so ``volgen --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from volgen import __version__

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="volgen",
    help="Generate 3D medical image volumes (CT, MRI) from 3D segmentations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def print_table(table: Any) -> None:
    """Print a rich table on stdout; when stdout is not a terminal (a pipe, a file), at its natural width, so
    that names and paths are never wrapped or cut at 80 columns (one row, one line, for grep and diff)."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update_width(10**5), table).maximum
    Console(width=max(console.width, width), highlight=False).print(table)


class _State:
    debug = False


state = _State()


def shown(text: object) -> str:
    """Text from file names, files or errors, safe for the terminal: every terminal line goes through this.
    Control characters escaped (one line, no terminal escape sequences; :func:`volgen.io.printable`) and
    rich markup escaped (a name like ``[red]x`` is printed as it is)."""
    from volgen.io import printable

    return escape(printable(text))


def _version(value: bool) -> None:
    if value:
        console.print(f"volgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Generate 3D medical image volumes (CT, MRI) from 3D segmentations."""
    state.debug = debug


# SIGHUP (the terminal closed, an ssh session lost) cleans up the same way as SIGTERM
_TERMINATING = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


@contextlib.contextmanager
def all_or_nothing(before: dict[Any, Any]) -> Iterator[Callable[[], None]]:
    """A command's outputs under interruption: all of them, or none.

    Until the block calls the ``finished`` function it is given, Ctrl-C or SIGTERM (anywhere: in a write's
    cleanup, in the progress bar's last refresh) removes what the command wrote, found by comparing with
    ``before`` (:func:`volgen.io.remove_replaced`), and ends in "interrupted". Once the outputs are complete
    and ``finished`` was called, these signals are ignored until the block ends: the command reports success.
    """
    ignored: dict[int, Any] = {}

    def finished() -> None:
        for sig in [signal.SIGINT, *_TERMINATING]:
            try:
                ignored[sig] = signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                return

    try:
        yield finished
    except KeyboardInterrupt:
        from volgen import io

        io.remove_replaced(before)
        raise
    finally:
        for sig, handler in ignored.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, a scheduler's time limit, Slicer's cancel) unwinds like
    Ctrl-C: a ``KeyboardInterrupt`` that removes temporary files on its way out and ends in exit code 130."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signals = _TERMINATING
    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def handle_errors(func: F) -> F:
    """Turn a :class:`volgen.errors.VolgenError` into one readable line on stderr and exit code 1;
    Ctrl-C and SIGTERM into "interrupted" and exit code 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from volgen.errors import VolgenError

        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except VolgenError as e:
            if state.debug:
                raise
            # file names and messages may hold [brackets] (rich markup) and control characters
            err_console.print(f"[bold red]error:[/] {shown(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except MemoryError:
            if state.debug:
                raise
            err_console.print("[bold red]error:[/] out of memory", highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _register() -> None:
    from volgen.cli import commands  # noqa: F401  (registers the commands on `app`)


def main() -> None:
    """Entry point of the ``volgen`` console script."""
    # The thread policy (OMP_WAIT_POLICY) was applied by `import volgen` above, as for the Python API.
    # diffusers' own notes (e.g. "config attributes ... are not expected and will be ignored" for an unknown
    # key in a model's config.json) are not volgen's lines: every terminal line is one volgen printed.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    _register()
    app(prog_name="volgen")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
