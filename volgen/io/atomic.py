"""Atomic writes: a temporary name in the target's folder, renamed into place only on success.

Use :func:`atomic_write` for a single file and :func:`atomic_directory` for a folder (a DICOM series, a
saved model). Both check the usual output problems first (missing parent folder, existing output
without ``overwrite``) and raise :class:`~volgen.errors.OutputError` for them. If the body of the
``with`` block raises, the temporary file or folder is removed and the exception propagates; an
existing output is left untouched. An interrupted process can leave a hidden ``.volgen-tmp-*`` entry
behind, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from volgen.errors import OutputError
from volgen.io.files import remove_path
from volgen.io.paths import check_output
from volgen.types import PathLike

__all__ = [
    "TEMP_NAME",
    "TEMP_PREFIX",
    "atomic_directory",
    "atomic_write",
    "check_output_path",
    "remove_stale_temporaries",
    "stale_temporaries",
]

logger = logging.getLogger(__name__)

#: Prefix of the temporary names used while writing (hidden files in the output's folder).
TEMP_PREFIX = ".volgen-tmp-"
# The temporary names of atomic_write / atomic_directory: TEMP_PREFIX, 8 hex digits, an optional tag, ".",
# the final name.
TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{8}(?:-old)?\.(?P<final>.+)$")


def check_output_path(
    path: PathLike,
    *,
    overwrite: bool,
    directory: bool = False,
    protected: Iterable[tuple[str, PathLike | None]] = (),
) -> Path:
    """Check that ``path`` can be written; return it as a :class:`~pathlib.Path`.

    :func:`volgen.io.paths.check_output` under its older name: paths are resolved (links followed), an output
    may not be, contain or lie inside a ``protected`` path, and an existing folder is replaced only when it
    is empty or volgen wrote it.

    Raises:
        OutputError: See :func:`volgen.io.paths.check_output`.
    """
    return check_output(path, protected=protected, overwrite=overwrite, directory=directory)


def stale_temporaries(path: PathLike) -> list[Path]:
    """The temporary files/folders that interrupted writes of ``path`` left next to it.

    Only a process killed outright (``kill -9``, power loss) leaves them: every other failure and
    Ctrl-C/SIGTERM remove them on the way out. Temporaries of other final names are not listed.
    """
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted(e for e in entries if (m := TEMP_NAME.match(e.name)) and m["final"] == path.name)


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``path``; return what was removed.

    Call it before writing ``path`` again. Two processes writing the same output at the same time are not
    supported (one would remove the other's temporary file).
    """
    removed = stale_temporaries(path)
    for entry in removed:
        remove_path(entry)
    return removed


#: Longest file name most file systems take (bytes), and the longest final name volgen can write there (its
#: temporary name adds the prefix, 8 hex digits, an optional "-old" and a dot).
NAME_MAX = 255
MAX_OUTPUT_NAME = NAME_MAX - len(TEMP_PREFIX) - 13


def _temp_sibling(path: Path, tag: str = "") -> Path:
    # The temporary name ends with the final name, so format detection by extension still works.
    return path.parent / f"{TEMP_PREFIX}{secrets.token_hex(4)}{tag}.{path.name}"


def _check_name(path: Path) -> None:
    size = len(os.fsencode(path.name))
    if size > MAX_OUTPUT_NAME:
        raise OutputError(
            path, f"file name too long ({size} bytes; volgen writes names of at most {MAX_OUTPUT_NAME})"
        )


def _create_failed(path: Path, exc: OSError) -> OutputError:
    return OutputError(path, f"cannot create files in {path.parent} ({exc.strerror or exc})")


@contextlib.contextmanager
def atomic_write(
    path: PathLike,
    *,
    overwrite: bool = False,
    verify: Callable[[Path], None] | None = None,
    protected: Iterable[tuple[str, PathLike | None]] = (),
) -> Iterator[Path]:
    """Write a file atomically.

    Yields a temporary path in the same folder as ``path`` whose name ends with ``path``'s name (so the
    extension, e.g. ``.nii.gz``, is kept). Write the file there; when the block ends without an exception
    the temporary file is checked (``verify``), flushed to disk and renamed to ``path`` with
    :func:`os.replace` (atomic on one filesystem). On an exception the temporary file (and any sidecar a
    writer created next to it with the same temporary prefix) is removed and the exception propagates.

    Example::

        with atomic_write(out, overwrite=True, verify=check) as tmp:
            sitk.WriteImage(image, str(tmp))

    Args:
        path: The final file name.
        overwrite: Whether an existing file may be replaced.
        verify: Called with the temporary path before the rename; raises if what is on disk is not what was
            meant to be written (a write cut short by a full disk or a file-size limit, which some writers,
            ITK's among them, do not report).
        protected: As :func:`volgen.io.paths.check_output`.

    Yields:
        The temporary path to write to.

    Raises:
        OutputError: As :func:`check_output_path`, before the block runs; or if the block did not create
            the temporary file; or what ``verify`` raises.
    """
    path = check_output_path(path, overwrite=overwrite, protected=protected)
    _check_name(path)
    tmp = _temp_sibling(path)
    stem = tmp.name[: -len(path.name)]
    try:
        try:
            tmp.touch(exist_ok=False)  # fails early and clearly in a read-only folder
        except OSError as exc:
            raise _create_failed(path, exc) from exc
        yield tmp
        if not tmp.exists() or (tmp.is_file() and tmp.stat().st_size == 0):
            raise OutputError(path, "nothing was written")
        if verify is not None:
            verify(tmp)
        _sync(tmp)
        os.replace(tmp, path)
        logger.debug("wrote %s", path)
    finally:
        for leftover in path.parent.glob(f"{stem}*"):
            remove_path(leftover)


def _sync(path: Path) -> None:
    """Flush a written file to the disk (a full disk can show only here, on network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OutputError(path, f"could not write the file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(
    path: PathLike, *, overwrite: bool = False, protected: Iterable[tuple[str, PathLike | None]] = ()
) -> Iterator[Path]:
    """Write a folder atomically.

    Yields an empty temporary folder next to ``path``. When the block ends without an exception it is
    renamed to ``path``; an existing ``path`` (allowed with ``overwrite`` when volgen wrote it, see
    :func:`volgen.io.paths.is_volgen_folder`, or when it is an empty folder) is first renamed away and
    removed only after the new folder is in place. On an exception the temporary folder is removed and an
    existing ``path`` is left as it was.

    Args:
        path: The final folder name.
        overwrite: Whether an existing non-empty folder volgen wrote may be replaced.
        protected: As :func:`volgen.io.paths.check_output`.

    Yields:
        The temporary folder to fill.

    Raises:
        OutputError: As :func:`check_output_path`, before the block runs.
    """
    path = check_output_path(path, overwrite=overwrite, directory=True, protected=protected)
    _check_name(path)
    tmp = _temp_sibling(path)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _create_failed(path, exc) from exc
    old: Path | None = None
    try:
        yield tmp
        if path.exists():
            old = _temp_sibling(path, "-old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous output back
                os.replace(old, path)
                old = None
            raise
        logger.debug("wrote folder %s", path)
    finally:
        remove_path(tmp)
        if old is not None:
            remove_path(old)
