"""What a training run writes under ``output_dir``, and the check that it overwrites no input.

A run writes ``config.yaml``, ``losses.csv``, ``checkpoints/``, ``previews/`` and ``model/`` into
``output_dir``. The folder must not be, contain or lie inside the training data (the data folder or
manifest, every image and label a manifest names) or the label map file, and nothing it writes may be the
config file the run was started from (except the run's own ``config.yaml`` when resuming it).
"""

from __future__ import annotations

from pathlib import Path

from volgen.errors import OutputError
from volgen.training.checkpoint import CHECKPOINTS, list_checkpoints
from volgen.training.config import TrainConfig

#: Entries a run writes into ``output_dir``.
RUN_ENTRIES = ("config.yaml", "losses.csv", CHECKPOINTS, "previews", "model")


def check_output_dir(config: TrainConfig, *, resume: bool = False) -> None:
    """Refuse an ``output_dir`` that would write into, over or around an input, before anything is written.

    Raises:
        OutputError: ``output_dir`` exists and is not a folder; it is, contains or lies inside the training
            data or the label map file; a file it would write is the config file.
    """
    from volgen.data import find_cases
    from volgen.io.paths import overlap

    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(output_dir, "output_dir exists and is not a folder; choose a folder")
    source = Path(config.data.source)
    protected: list[tuple[str, Path]] = [("training data", source)]
    label_map = Path(config.data.label_map)
    if label_map.is_file():
        protected.append(("label map", label_map))
    if source.is_file():  # a manifest: the files it names are inputs too
        for case in find_cases(source):
            protected += [("training image", case.image), ("training segmentation", case.label)]
    for what, path in protected:
        how = overlap(output_dir, path)
        if how is not None:
            raise OutputError(
                output_dir, f"output_dir {how} the {what} {path}; choose an output_dir outside the data"
            )
    config_file = config.source_file
    if config_file is None:
        return
    for entry in RUN_ENTRIES:
        written = output_dir / entry
        if overlap(written, config_file) is None:
            continue
        if entry == "config.yaml" and resume and list_checkpoints(output_dir):
            continue  # resuming from the run's own record of its config
        raise OutputError(
            output_dir,
            f"the run would overwrite its config file {config_file} ({entry}); choose another output_dir",
        )
