"""Which paths volgen may write or remove: the one place that decides it.

Every check works on resolved paths (:func:`resolve`: symbolic links followed, ``..`` removed), never on the
strings the user typed, so a link to an input folder is the input folder. The rules:

- An output must not be, contain or lie inside a *protected* path: an input (segmentation, DICOM folder,
  manifest), the reference, the model folder (:func:`check_output`). A sidecar is an output like any other.
- The outputs of one run must not be, contain or lie inside each other either (:func:`check_apart`): a
  preview named like the run's own sidecar would replace it.
- An existing output is replaced only with ``overwrite``; an existing *folder* is replaced (and so removed)
  only when it holds nothing but what volgen writes into such a folder: DICOM slices named ``IM0001.dcm``...,
  or the files of a model or segmenter folder (:func:`is_volgen_folder`).
- Inputs are read only when they are regular files or folders (:func:`check_readable`): a FIFO, socket or
  device would block or never end.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from volgen.errors import InputError, OutputError
from volgen.io._common import NOT_UTF8, display_path, is_utf8
from volgen.types import PathLike

__all__ = [
    "check_apart",
    "check_output",
    "check_readable",
    "is_volgen_folder",
    "overlap",
    "resolve",
]

# What a DICOM output folder of volgen holds: IM0001.dcm, IM0002.dcm, ...
_SLICE_NAME = re.compile(r"^IM\d{4,}\.dcm$")
# What a model or segmenter folder volgen saves holds (its identifying file first).
_MODEL_ENTRIES = {"volgen.json", "segmenter.json", "model_index.json", "unet", "scheduler", "README.md"}


def resolve(path: PathLike) -> Path:
    """``path`` made absolute with every symbolic link followed (also for parts that do not exist yet)."""
    return Path(os.path.realpath(os.fspath(path)))


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file (hard links, case-insensitive file systems)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def overlap(output: PathLike, protected: PathLike) -> str | None:
    """How ``output`` collides with ``protected`` (both resolved first), or ``None``.

    Returns:
        "is", "contains" or "lies inside" (as in "the output ... the model folder").
    """
    out, guarded = resolve(output), resolve(protected)
    if out == guarded or _same_file(out, guarded):
        return "is"
    if _inside(guarded, out):
        return "contains"
    if _inside(out, guarded):
        return "lies inside"
    return None


def is_volgen_folder(folder: PathLike) -> bool:
    """Whether ``folder`` holds only what volgen writes into a folder (so volgen may replace it): regular
    files named like volgen's DICOM slices (``IM0001.dcm``, ...), or the entries of a model/segmenter folder
    (``volgen.json`` or ``segmenter.json``, ``unet/``, ``scheduler/``, ...). An empty folder counts."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    names = {e.name for e in entries}
    if all(_SLICE_NAME.match(e.name) and e.is_file(follow_symlinks=False) for e in entries):
        return True
    return bool(names & {"volgen.json", "segmenter.json"}) and names <= _MODEL_ENTRIES


def check_output(
    output: PathLike,
    *,
    protected: Iterable[tuple[str, PathLike | None]] = (),
    overwrite: bool = False,
    directory: bool = False,
) -> Path:
    """Check that ``output`` may be written; return it as a Path (unresolved, as given).

    Args:
        output: The output file, or folder (``directory=True``: a DICOM series, a batch OUT_DIR).
        protected: ``(what, path)`` pairs that must survive, e.g. ``("input", seg)``, ``("model folder",
            model)``; ``None`` paths are ignored. ``what`` names it in the error.
        overwrite: Whether an existing output may be replaced.
        directory: Whether the output is a folder. An existing folder is replaced only when it is empty or
            volgen wrote it (:func:`is_volgen_folder`).

    Raises:
        OutputError: The output is, contains or lies inside a protected path; its folder is missing; it exists
            without ``overwrite``; it exists as the wrong kind; it is a folder volgen did not write; the path
            is not valid UTF-8.
    """
    path = Path(output)
    if not is_utf8(path):
        raise OutputError(display_path(path), NOT_UTF8)
    for what, guarded in protected:
        if guarded is None:
            continue
        how = overlap(path, guarded)
        if how is not None:
            raise OutputError(path, f"the output {how} the {what} {guarded}; choose another output")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(path, f"output folder {parent} does not exist")
    if not (path.exists() or path.is_symlink()):
        return path
    if directory:
        if path.is_symlink() or not path.is_dir():
            raise OutputError(path, "exists and is not a folder (or is a link); volgen writes a new folder")
        if any(path.iterdir()):
            if not overwrite:
                raise OutputError(path, "already exists (not empty); use --overwrite to replace it")
            if not is_volgen_folder(path):
                raise OutputError(
                    path,
                    "exists and holds files volgen did not write; refusing to replace it (even with "
                    "--overwrite); choose another output",
                )
    else:
        if path.is_dir():
            raise OutputError(path, "exists and is a folder, not a file")
        if not overwrite:
            raise OutputError(path, "already exists; use --overwrite to replace it")
    return path


def check_apart(outputs: Iterable[tuple[str, PathLike | None]]) -> None:
    """Check the outputs of one run against each other: no two may be, contain or lie inside one another
    (links resolved). Check each against the inputs with :func:`check_output`.

    Args:
        outputs: ``(what, path)`` pairs, e.g. ``("output", out)``, ``("sidecar", side)``,
            ``("preview", png)``; ``None`` paths are ignored.

    Raises:
        OutputError: Naming the later path, how it collides and the earlier one.
    """
    seen: list[tuple[str, PathLike]] = []
    for what, path in outputs:
        if path is None:
            continue
        for other_what, other in seen:
            how = overlap(path, other)
            if how is not None:
                raise OutputError(
                    path, f"the {what} {how} the {other_what} {other} of the same run; choose another {what}"
                )
        seen.append((what, path))


def check_readable(path: PathLike, *, folder_ok: bool = True, what: str = "file") -> os.stat_result:
    """Refuse what cannot be read safely, by ``stat`` (nothing is opened): a FIFO, socket or device blocks
    or never ends. Symbolic links are followed.

    Returns:
        The ``stat`` of the path.

    Raises:
        InputError: Missing, a dangling or looping link, a special file, or a folder when ``folder_ok`` is
            False.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(
                path, "symbolic link that leads nowhere (missing target or a loop of links)"
            ) from None
        raise InputError(path, f"{what} not found") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise InputError(
                path, "symbolic link that leads nowhere (missing target or a loop of links)"
            ) from None
        raise InputError(path, f"cannot open the {what} ({exc.strerror or exc})") from None
    if stat.S_ISREG(info.st_mode) or (folder_ok and stat.S_ISDIR(info.st_mode)):
        return info
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, f"is a folder; expected a {what}")
    kind = (
        "a named pipe (FIFO)"
        if stat.S_ISFIFO(info.st_mode)
        else "a socket"
        if stat.S_ISSOCK(info.st_mode)
        else "a device"
        if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
        else "not a regular file"
    )
    named = "" if what == "file" else f" (the {what})"
    raise InputError(path, f"is {kind}, not a regular file{named}; volgen reads regular files only")
