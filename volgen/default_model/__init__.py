"""The embedded models: volgen model folders shipped inside the package, chosen by name.

Each subfolder holding a ``volgen.json`` is one model, named after its folder; ``default`` names the model
``volgen generate`` uses without ``--model`` (:func:`volgen.api.default_model_dir`).
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent

#: The name that always means the embedded default model.
DEFAULT_NAME = "default"
#: The model card inside a model folder.
CARD_FILE = "README.md"


def embedded_models() -> dict[str, Path]:
    """The embedded model folders by name, sorted by name."""
    from volgen.models import METADATA_FILE

    return {p.name: p for p in sorted(FOLDER.iterdir()) if (p / METADATA_FILE).is_file()}


def embedded_model(name: str) -> Path | None:
    """The folder of the embedded model called ``name`` (or ``default``); ``None`` if there is none."""
    if name == DEFAULT_NAME:
        from volgen import defaults

        return defaults.MODEL_DIR
    return embedded_models().get(name)
