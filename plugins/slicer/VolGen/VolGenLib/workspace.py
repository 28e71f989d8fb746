"""The temporary folder of one generation: where the input, the reference and the result live."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

INPUT_NAME = "segmentation.nii.gz"
REFERENCE_NAME = "reference.nii.gz"
OUTPUT_NAME = "synthetic.nii.gz"


@dataclass(frozen=True)
class GenerationPaths:
    """Files of one run of ``volgen generate``.

    Attributes:
        input: The label volume the CLI reads (NIfTI).
        output: Where the CLI writes the synthetic volume (NIfTI); its sidecar JSON lands next to it.
        reference: The real image for λ < 1, on the input's grid; ``None`` without a reference.
    """

    input: Path
    output: Path
    reference: Path | None = None

    @property
    def sidecar(self) -> Path:
        """The provenance JSON the CLI writes next to the output (its name plus ``.json``, the rule of
        ``volgen.io.naming.sidecar_path``: ``synthetic.nii.gz.json``)."""
        return self.output.with_name(self.output.name + ".json")


class TempWorkspace:
    """A fresh temporary folder holding one generation's files, removed by :meth:`cleanup`.

    Usable as a context manager; leaving the block cleans up (unless ``keep`` is set and the run was
    not cancelled: kept files are for looking at a run afterwards).

    Args:
        root: Folder to create the workspace in (default: the system's temp folder).
        keep: Keep the folder on :meth:`cleanup` (the panel's "keep temporary files").
        prefix: Prefix of the folder's name.
    """

    def __init__(self, root: str | Path | None = None, *, keep: bool = False, prefix: str = "volgen-slicer-"):
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=None if root is None else str(root)))
        self.keep = keep

    @property
    def input_path(self) -> Path:
        """Where the input label volume is written."""
        return self.folder / INPUT_NAME

    @property
    def reference_path(self) -> Path:
        """Where the reference image is written."""
        return self.folder / REFERENCE_NAME

    @property
    def output_path(self) -> Path:
        """Where the CLI writes the result."""
        return self.folder / OUTPUT_NAME

    def paths(self, *, with_reference: bool = False) -> GenerationPaths:
        """The :class:`GenerationPaths` of this workspace (``reference`` only when asked for)."""
        return GenerationPaths(
            input=self.input_path,
            output=self.output_path,
            reference=self.reference_path if with_reference else None,
        )

    @property
    def exists(self) -> bool:
        """Whether the folder is still on disk."""
        return self.folder.exists()

    def cleanup(self, *, force: bool = False) -> bool:
        """Remove the folder and everything in it, unless ``keep`` is set and ``force`` is not.

        Returns:
            ``True`` when the folder is gone afterwards.
        """
        if self.keep and not force:
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.exists():  # a file still open elsewhere (Windows): one more try, then report
            shutil.rmtree(self.folder, ignore_errors=True)
        return not self.folder.exists()

    def __enter__(self) -> TempWorkspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"TempWorkspace({str(self.folder)!r}, keep={self.keep})"
