"""What ``volgen generate`` checks before it imports torch or loads a model: the model by path or name, the
settings, the input and reference (headers only), the outputs. A wrong path fails in about a second.

Each check asks the library function that owns it (:func:`volgen.default_model.resolve_model`,
:func:`volgen.io.read_header`, :class:`volgen.generation.OutputPlan`); nothing here re-derives what they do.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from volgen.generation import GenerateSettings
    from volgen.io.geometry import Geometry
    from volgen.models import ModelMetadata

#: ``volgen generate example``: the example segmentation shipped in the package.
EXAMPLE_NAME = "example"


def example_path() -> Path:
    """The example segmentation inside the installed package (``examples/`` of a checkout)."""
    from importlib import resources

    from volgen.examples import EXAMPLE

    return Path(str(resources.files("volgen.examples") / EXAMPLE))


def example_or(segmentation: Path, output: Path | None) -> tuple[Path, Path | None]:
    """``(segmentation, output)``, or, when ``segmentation`` is ``example`` and no such file exists, the
    shipped example and an output in the working folder (never inside the installed package)."""
    if str(segmentation) != EXAMPLE_NAME or segmentation.exists() or segmentation.is_symlink():
        return segmentation, output
    from volgen.io.naming import default_output

    example = example_path()
    return example, output if output is not None else Path(default_output(example).name)


def copy_example(destination: Path, *, overwrite: bool = False) -> Path:
    """Copy the example segmentation to ``destination`` (a file, or a folder to put it in); the copy's path.

    Raises:
        OutputError: ``destination`` exists (without ``overwrite``) or cannot be written.
    """
    from volgen import io

    source = example_path()
    target = destination / source.name if destination.is_dir() else destination
    with io.atomic_write(target, overwrite=overwrite, protected=[("example", source)]) as temporary:
        shutil.copyfile(source, temporary)
    return target


@dataclass
class CheckedGeneration:
    """A generation whose inputs, settings and outputs passed the checks: what the run and the dry run use
    (``settings`` as they run: what the options leave open decided by the model's ``sampling``)."""

    segmentation: Path
    grid: Geometry
    model: Path
    metadata: ModelMetadata
    settings: GenerateSettings
    samples: int
    reference: Path | None = None


def check_generation(
    segmentation: Path,
    output: Path | None,
    *,
    model: str | None,
    reference: Path | None,
    samples: int,
    preview: Path | None,
    output_format: str | None,
    overwrite: bool,
    precision: str,
    settings: GenerateSettings,
) -> CheckedGeneration:
    """Check ``volgen generate``'s arguments without torch (the settings were checked where
    :func:`volgen.cli.options.build_settings` built them): the model (path or embedded name, its
    metadata), the segmentation and reference (headers: they exist and are volumes of a known format), class
    names against the model's label map, and every output (as :func:`volgen.generation.generate_samples`
    will, before it loads the model).

    Raises:
        VolgenError: The first problem, naming the file or option.
    """
    from volgen import io
    from volgen.default_model import resolve_model
    from volgen.generation import OutputPlan
    from volgen.generation.settings import check_precision, check_samples
    from volgen.io.naming import default_output, sample_paths
    from volgen.models import read_metadata

    check_samples(samples)
    check_precision(precision)
    model_dir = resolve_model(model)
    metadata = read_metadata(model_dir)
    grid = io.read_header(segmentation)
    if reference is not None:
        io.read_header(reference)
    # unknown class names, before the model loads
    metadata.label_map.selection(keep=settings.keep, drop=settings.drop)
    protected = [("input", segmentation), ("reference", reference), ("model folder", model_dir)]
    outputs = sample_paths(output if output is not None else default_output(segmentation), samples)
    previews = [None] * samples if preview is None else sample_paths(preview, samples)
    for out, view in zip(outputs, previews, strict=True):
        OutputPlan.make(
            segmentation,
            out,
            output_format=output_format,
            preview=view,
            overwrite=overwrite,
            protected=protected,
        )
    settings = settings.for_model(metadata)  # the model's sampling defaults, decided once for the run
    return CheckedGeneration(segmentation, grid, model_dir, metadata, settings, samples, reference)
