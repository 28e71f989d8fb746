"""setuptools' package list; all other metadata is in pyproject.toml.

Every package under ``volgen/`` is found automatically (a new subpackage such as ``volgen/training/`` ships
without touching this file). ``cli/``, ``configs/`` and ``examples/`` (its example segmentation only) live at
the top of the repository and install inside volgen as ``volgen.cli``, ``volgen.configs`` and
``volgen.examples`` (``package-dir`` in pyproject.toml); the subpackages of the first two are found the same
way. pyproject.toml alone cannot combine automatic discovery with that renaming.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["volgen", "volgen.*"]),
        *(f"volgen.{name}" for name in find_packages(include=["cli", "cli.*", "configs", "configs.*"])),
        "volgen.examples",  # examples/ itself only (its data file); not the scripts in its subfolders
    ]
)
