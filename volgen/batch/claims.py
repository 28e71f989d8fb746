"""Claims: several ``volgen batch`` runs (or shards) on one output folder generate each item once.

Before a process works on an item it claims it: it creates ``OUT_DIR/.volgen-claims/<key>.claim`` and holds
an exclusive ``flock`` on it while it works. The key is what the item produces (its output path relative to
OUT_DIR: two nnU-Net datasets built into one folder at once share case ids, not outputs); the file name is
the key made safe and short, with a hash of the whole key (:func:`claim_file_name`), so any key fits. A
shard job also claims its shard manifest (:func:`run_key`) while it runs, so no other run removes it.
Another process that cannot take the lock leaves the item to the holder.
The kernel (or the NFSv4/Lustre lock manager) drops the lock when its process dies, so the claim
of a killed run (``kill -9``, a node lost) is taken over by the next run without any timeout.

Where the file system has no locks (``flock`` fails with ``ENOLCK``/``EOPNOTSUPP``), a claim is the file's
exclusive creation (``O_CREAT | O_EXCL``) holding the host name and process id; it is stale, and taken over,
when its process no longer runs on this host, or (other hosts) when it was not touched for
:data:`STALE_AFTER` seconds (a running claim's file is touched at every progress report).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from volgen.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: claims by exclusive creation only
    fcntl = None  # type: ignore[assignment]

__all__ = ["CLAIMS_FOLDER", "STALE_AFTER", "Claim", "claim", "claim_file_name", "release_all", "run_key"]

logger = logging.getLogger("volgen.batch")

#: The hidden folder of claim files in OUT_DIR.
CLAIMS_FOLDER = ".volgen-claims"
#: Seconds after which an untouched claim of another host counts as abandoned (lock-free file systems only).
STALE_AFTER = 6 * 3600.0
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class Claim:
    """A held claim; :meth:`release` (or the process's death) frees it."""

    path: Path
    fd: int
    locked: bool

    def touch(self) -> None:
        """Mark the claim as alive (for lock-free file systems, where age decides staleness)."""
        with contextlib.suppress(OSError):
            os.utime(self.fd if os.utime in os.supports_fd else self.path)

    def release(self) -> None:
        """Remove the claim file (if it is still this claim's) and drop the lock."""
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1


def _owner() -> bytes:
    data = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    return (json.dumps(data) + "\n").encode()


def claim_file_name(key: str) -> str:
    """The claim file of ``key``: its first 64 characters made safe, and 16 hex digits of its SHA-256."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', key)[:64]}-{digest}.claim"


def run_key(manifest: Path) -> str:
    """The key a shard job claims for its shard manifest while it runs."""
    return f"run:{manifest.name}"


def claim(out_dir: Path, key: str) -> Claim | None:
    """Claim ``key`` in ``out_dir``; ``None`` when a live process holds it.

    Args:
        out_dir: The output folder (claims live in its :data:`CLAIMS_FOLDER`).
        key: What is claimed: an item's output path relative to ``out_dir`` (any text; see
            :func:`claim_file_name`).

    Raises:
        OutputError: No claim file can be made (a read-only OUT_DIR, a full disk).
    """
    folder = out_dir / CLAIMS_FOLDER
    try:
        return _claim(folder, folder / claim_file_name(key))
    except OSError as e:
        problem = f"cannot make claim files in the output folder ({e.strerror or e})"
        raise OutputError(folder, problem) from None


def _claim(folder: Path, path: Path) -> Claim | None:
    folder.mkdir(parents=True, exist_ok=True)
    if not _locks_work(folder):
        return _claim_by_creation(path)
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another run removed the empty claims folder just now
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # a live process holds it
        except OSError as exc:
            empty = os.fstat(fd).st_size == 0  # the file this open just created
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            if empty:
                path.unlink(missing_ok=True)
            return _claim_by_creation(path)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released (removed) between our open and our lock: try again on the new file
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _owner())
        except OSError:
            os.close(fd)
            raise
        return Claim(path=path, fd=fd, locked=True)
    return None


def _locks_work(folder: Path) -> bool:
    """Whether the file system of ``folder`` supports ``flock`` (asked once per folder, on the folder)."""
    if fcntl is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True  # locks work; someone holds this one
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return False
        raise
    finally:
        os.close(fd)
    return True


def _claim_by_creation(path: Path) -> Claim | None:
    """Claim by exclusive creation (file systems without locks); take over stale claims."""
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except FileExistsError:
            if not _stale(path):
                return None
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            with contextlib.suppress(OSError):
                os.replace(path, stale)  # only one process wins this rename
                stale.unlink()
            continue
        try:
            os.write(fd, _owner())
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return Claim(path=path, fd=fd, locked=False)
    return None


def _stale(path: Path) -> bool:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False  # being written; ask again later
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return age > STALE_AFTER


def release_all(out_dir: Path) -> None:
    """Remove the claims folder when no claim is left in it (after a run)."""
    with contextlib.suppress(OSError):
        (out_dir / CLAIMS_FOLDER).rmdir()
