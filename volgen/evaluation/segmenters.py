"""Segmenters for the faithfulness metric: what ``volgen evaluate`` needs, and two ways to get it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from volgen.evaluation.metrics import IntensitySegmenter
from volgen.labels import LabelMap

#: How many voxels per real volume the intensity segmenter is fitted on (an even subsample).
INTENSITY_FIT_VOXELS = 2_000_000


class VolumeSegmenter(Protocol):
    """What ``volgen evaluate`` needs from a segmenter: class indices on the image's own grid."""

    name: str

    def segment(self, image: Any) -> np.ndarray:
        """``image``: a SimpleITK image (physical units). Returns class indices ``(z, y, x)`` on its grid."""
        ...


class IntensityVolumeSegmenter:
    """:class:`IntensitySegmenter` fitted on real volumes and their masks, pooled over all cases."""

    name = "intensity (nearest class median, fitted on the real volumes)"

    def __init__(self, segmenter: IntensitySegmenter) -> None:
        self.segmenter = segmenter

    @classmethod
    def fit(cls, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> IntensityVolumeSegmenter:
        """Fit on ``(image, class_indices)`` array pairs (an even subsample of each volume's voxels)."""
        images, masks = [], []
        for image, mask in pairs:
            step = max(1, image.size // INTENSITY_FIT_VOXELS)
            images.append(np.asarray(image, dtype=np.float32).ravel()[::step])
            masks.append(np.asarray(mask).ravel()[::step])
        if not images:
            raise ValueError("no real volumes to fit the intensity segmenter on")
        return cls(IntensitySegmenter().fit(np.concatenate(images), np.concatenate(masks)))

    def segment(self, image: Any) -> np.ndarray:
        import SimpleITK as sitk

        return self.segmenter.predict(sitk.GetArrayViewFromImage(image))


class CommandSegmenter:
    """An external program that segments a volume file, e.g. TotalSegmentator for CT.

    ``template`` is a command line with ``{input}`` and ``{output}`` placeholders (run without a shell, split
    like a POSIX shell would). volgen writes the image as NIfTI to ``{input}`` in a temporary folder, runs the
    command, reads the label volume it wrote to ``{output}`` (``.nii.gz``) and remaps its values with
    ``label_map`` (values the map does not know become background); without a label map the values are used
    as they are. The output must be on the input's grid.

    Example: ``TotalSegmentator -i {input} -o {output} --ml --roi_subset liver spleen``.
    """

    def __init__(self, template: str, label_map: LabelMap | None = None, *, timeout: float | None = None):
        import shlex

        from volgen.errors import VolgenError

        if "{input}" not in template or "{output}" not in template:
            raise VolgenError(
                f"--segmenter-command needs {{input}} and {{output}} placeholders: {template!r}"
            )
        try:
            self.argv = shlex.split(template)
        except ValueError as e:
            raise VolgenError(f"--segmenter-command: cannot split {template!r}: {e}") from None
        self.template = template
        self.label_map = label_map
        self.timeout = timeout
        self.name = f"command: {template}"

    def segment(self, image: Any) -> np.ndarray:
        import shutil
        import subprocess
        import tempfile

        import SimpleITK as sitk

        from volgen.errors import InputError, VolgenError
        from volgen.io import Geometry, read_label, write_volume

        with tempfile.TemporaryDirectory(prefix="volgen-seg-") as tmp:
            source, target = Path(tmp) / "input.nii.gz", Path(tmp) / "output.nii.gz"
            write_volume(image, source)
            argv = [a.replace("{input}", str(source)).replace("{output}", str(target)) for a in self.argv]
            if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
                raise VolgenError(f"--segmenter-command: program not found: {argv[0]}")
            try:
                # any bytes: a program's output need not be UTF-8 (its last line is quoted in an error)
                done = subprocess.run(
                    argv,
                    capture_output=True,
                    encoding="utf-8",
                    errors="backslashreplace",
                    timeout=self.timeout,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise VolgenError(f"--segmenter-command failed to run: {e}") from None
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                last = lines[-1] if lines else "(no output)"
                raise VolgenError(f"--segmenter-command exited with {done.returncode}: {last}")
            if not target.exists():
                raise VolgenError(f"--segmenter-command wrote nothing to {{output}} ({self.template})")
            labels = read_label(target)
            if not Geometry.of(labels).close_to(Geometry.of(image), atol=1e-3):
                raise InputError(target, "the segmenter command's output is not on its input's grid")
            values = sitk.GetArrayFromImage(labels)
        if self.label_map is None:
            return values
        return self.label_map.remap(values, unknown="background", source=self.template)
