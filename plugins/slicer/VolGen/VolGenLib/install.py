"""Where the module installs volgen from: a wheel, an sdist or a source folder the user picked, or a URL the
user typed. Never a bare project name: volgen is not distributed through the Python Package Index, and a name
anyone could register there must not be what a button installs.

The widget asks the user (file dialog, folder dialog or a text field) and hands the answer to
:func:`install_source`, which checks it and says what pip will get; :func:`pip_arguments` is what goes to
``slicer.util.pip_install`` (or ``python -m pip install`` outside Slicer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

#: The distribution the module installs (the ``name`` in volgen's pyproject.toml).
PROJECT = "volgen"
#: What the file dialog offers.
FILE_FILTER = "volgen wheel or source archive (volgen-*.whl volgen-*.tar.gz volgen-*.zip)"
#: URL schemes pip can install from that point at one specific thing.
URL_SCHEMES = ("https", "http", "file", "git+https", "git+ssh", "git+http")

SourceKind = Literal["wheel", "sdist", "folder", "url"]


class InstallSourceError(ValueError):
    """The chosen file, folder or URL is not something volgen can be installed from; the message says why."""


@dataclass(frozen=True)
class InstallSource:
    """A checked place to install volgen from.

    Attributes:
        kind: "wheel" (``volgen-*.whl``), "sdist" (``volgen-*.tar.gz`` / ``.zip``), "folder" (a volgen source
            checkout: holds ``pyproject.toml`` with ``name = "volgen"``) or "url".
        location: The absolute path, or the URL as typed (trimmed).
    """

    kind: SourceKind
    location: str

    @property
    def requirement(self) -> str:
        """What pip is given: the path or URL itself (a URL without ``#egg=`` gets ``volgen @ URL``)."""
        if self.kind == "url" and "#egg=" not in self.location:
            return f"{PROJECT} @ {self.location}"
        return self.location

    def describe(self) -> str:
        """One line for the confirmation dialog."""
        what = {"wheel": "the wheel", "sdist": "the source archive", "folder": "the source folder", "url": ""}
        return f"{what[self.kind]} {self.location}".strip()


def pip_arguments(source: InstallSource) -> list[str]:
    """The arguments after ``pip install`` (a list: paths with spaces stay one argument).

    torch is not upgraded or replaced: pip keeps an installed torch that satisfies volgen's ``torch>=2.3``;
    the module refuses to install before the PyTorch extension has provided torch.
    """
    return [source.requirement]


def install_source(text: str | Path) -> InstallSource:
    """Check what the user picked or typed.

    Args:
        text: A path to a wheel (``volgen-*.whl``), an sdist (``volgen-*.tar.gz``, ``volgen-*.zip``) or a
            volgen source folder, or a URL (``https://...``, ``file://...``, ``git+https://...``).

    Returns:
        The checked :class:`InstallSource`.

    Raises:
        InstallSourceError: Empty, a bare project name or requirement (``volgen``, ``volgen==0.1``), a
            missing path, a file or folder that is not volgen, a URL of another scheme.
    """
    raw = str(text).strip()
    if not raw:
        raise InstallSourceError("choose a volgen wheel, source archive or source folder, or type a URL")
    if "://" in raw:
        return _url(raw)
    path = Path(raw).expanduser()
    if not path.exists():
        looks_like_a_name = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[.*\])?\s*([<>=!~].*)?", raw)
        if looks_like_a_name and "/" not in raw and "\\" not in raw:
            raise InstallSourceError(
                f"'{raw}' is a package name, not a file, folder or URL: volgen is not installed from the "
                "package index by name; choose a volgen wheel or source folder, or type its URL"
            )
        raise InstallSourceError(f"{raw}: no such file or folder")
    path = path.resolve()
    if path.is_dir():
        name = _project_name(path / "pyproject.toml")
        if name is None:
            raise InstallSourceError(f"{path}: not a volgen source folder (no pyproject.toml)")
        if _normalise(name) != PROJECT:
            raise InstallSourceError(f"{path}: a source folder of '{name}', not of {PROJECT}")
        return InstallSource("folder", str(path))
    name = path.name
    if name.endswith(".whl"):
        kind: SourceKind = "wheel"
        project = name.split("-")[0]
    elif name.endswith((".tar.gz", ".zip")):
        kind = "sdist"
        project = re.sub(r"-\d.*$", "", name.removesuffix(".tar.gz").removesuffix(".zip"))
    else:
        raise InstallSourceError(f"{path}: not a wheel (.whl) or a source archive (.tar.gz, .zip)")
    if _normalise(project) != PROJECT:
        raise InstallSourceError(f"{path}: a package of '{project}', not of {PROJECT}")
    return InstallSource(kind, str(path))


def _url(raw: str) -> InstallSource:
    if any(c.isspace() for c in raw):
        raise InstallSourceError(f"{raw}: a URL has no spaces")
    scheme = urlparse(raw).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise InstallSourceError(
            f"{raw}: pip cannot install from a '{scheme}' URL (use https://, file://, git+https://)"
        )
    if not urlparse(raw).netloc and scheme != "file":
        raise InstallSourceError(f"{raw}: the URL names no host")
    return InstallSource("url", raw)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_name(pyproject: Path) -> str | None:
    """``[project] name`` of a pyproject.toml (read without a TOML library: Slicer's Python may lack one)."""
    if not pyproject.is_file():
        return None
    in_project = False
    for line in pyproject.read_text(encoding="utf-8", errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_project = stripped == "[project]"
            continue
        match = re.fullmatch(r"""name\s*=\s*["']([^"']+)["']\s*(#.*)?""", stripped)
        if in_project and match:
            return match.group(1)
    return ""
