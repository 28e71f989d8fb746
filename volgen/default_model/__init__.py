"""The embedded models: volgen model folders shipped inside the package, chosen by name.

Each subfolder holding a ``volgen.json`` is one model, named after its folder; ``default`` names the model
``volgen generate`` uses without ``--model`` (:func:`volgen.api.default_model_dir`).
"""

from __future__ import annotations

from pathlib import Path

from volgen.types import PathLike

FOLDER = Path(__file__).resolve().parent

#: The name that always means the embedded default model.
DEFAULT_NAME = "default"
#: The model card inside a model folder.
CARD_FILE = "README.md"


def embedded_models() -> dict[str, Path]:
    """The embedded model folders by name, sorted by name."""
    from volgen.io.naming import MODEL_METADATA_FILE

    return {p.name: p for p in sorted(FOLDER.iterdir()) if (p / MODEL_METADATA_FILE).is_file()}


def embedded_model(name: str) -> Path | None:
    """The folder of the embedded model called ``name`` (or ``default``); ``None`` if there is none."""
    if name == DEFAULT_NAME:
        from volgen import defaults

        return defaults.MODEL_DIR
    return embedded_models().get(name)


def resolve_model(model: PathLike | None) -> Path:
    """The model folder that ``model`` means, wherever a model is taken (``--model`` of generate, batch,
    evaluate, the Slicer module; :func:`volgen.models.load_model`): ``None`` is the embedded default; a path
    that exists is itself (a folder called ``default`` in the working folder wins over the name); otherwise
    the name of an embedded model (``default``, ``colin27-native``, ``colin27-native-1mm``,
    ``colin27-small``; ``volgen models`` lists them).

    Light (no torch): the command line calls it while checking its arguments.

    Raises:
        ModelError: nothing of that name: the message lists the embedded models' names.
    """
    from volgen import defaults
    from volgen.errors import ModelError

    if model is None:
        return defaults.MODEL_DIR
    path = Path(model)
    if path.exists() or path.is_symlink():
        return path
    folder = embedded_model(str(model))
    if folder is not None:
        return folder
    names = ", ".join([DEFAULT_NAME, *embedded_models()])
    raise ModelError(path, f"model folder not found (embedded models by name: {names})")


def is_embedded(folder: PathLike) -> bool:
    """Whether ``folder`` is one of the embedded models (the CLI then notes what it was trained on)."""
    try:
        return Path(folder).resolve().parent == FOLDER
    except OSError:
        return False
