"""Hashing and removal of files: one home for both.

:func:`remove_output` removes only what volgen wrote: a file, or a folder that :func:`~volgen.io.paths.
is_volgen_folder` recognises; anything else is left in place and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from pathlib import Path

from volgen.io.paths import is_volgen_folder
from volgen.types import PathLike

__all__ = ["file_identity", "file_sha256", "remove_output", "remove_path", "remove_replaced"]

logger = logging.getLogger(__name__)

_BLOCK = 1 << 20


def file_sha256(path: PathLike | None) -> str | None:
    """SHA-256 (hex) of a file's bytes; ``None`` for ``None`` or a folder (DICOM series are not hashed).

    Raises:
        OSError: The file cannot be read.
    """
    if path is None or Path(path).is_dir():
        return None
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


#: What tells a file or folder apart from the one that was at the same path before: device, inode, mtime.
Identity = tuple[int, int, int]


def file_identity(path: PathLike) -> Identity | None:
    """The identity of what is at ``path`` now (links not followed), or ``None`` when nothing is there.

    volgen writes every output under a temporary name and renames it into place, so an output it wrote has
    a new identity: comparing identities taken before a run with those after it finds what the run wrote,
    wherever an interruption stopped it."""
    try:
        info = Path(path).lstat()
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns


def remove_replaced(before: dict[Path, Identity | None]) -> list[Path]:
    """Remove every output whose identity differs from ``before`` (the run created or replaced it), with
    :func:`remove_output`; return what was removed. Paths the run did not touch are left as they were."""
    removed = []
    for path, identity in before.items():
        now = file_identity(path)
        if now is not None and now != identity and remove_output(path):
            removed.append(path)
    return removed


def remove_path(path: PathLike) -> None:
    """Remove a file, link or folder tree that volgen itself created (a temporary); missing is fine.

    A symbolic link is removed, never followed.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def remove_output(path: PathLike) -> bool:
    """Remove an output volgen wrote (a file, or a folder volgen wrote); return whether it was removed.

    A folder that holds anything volgen would not have written there is left alone (and logged): removal
    must never reach an input or an unrelated file.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if not is_volgen_folder(path):
            logger.warning("not removing %s: it holds files volgen did not write", path)
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
