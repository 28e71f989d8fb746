"""Typed configs: pydantic models read from YAML, unknown keys rejected, ranges validated."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from volgen.errors import ConfigError
from volgen.types import PathLike

M = TypeVar("M", bound=BaseModel)

#: YAML files larger than this are refused before parsing (configs and manifests are small).
MAX_YAML_BYTES = 16 * 1024 * 1024
#: A YAML document may stand for at most this many values (keys, values and items, an alias counted each
#: time it is used): a "billion laughs" bomb of nested aliases loads in microseconds as shared references,
#: but anything that walks it (validation, error messages) would run for hours and fill the memory.
MAX_YAML_VALUES = 2_000_000


class StrictModel(BaseModel):
    """Base of every volgen config: unknown keys are an error, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def describe_validation_error(error: ValidationError) -> str:
    """One short line out of a pydantic error: the first problem with its dotted key."""
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif item["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            problems.append(f"'{key}': {item['msg']}")
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def read_yaml(path: PathLike) -> Any:
    """Parse a YAML file with ``yaml.safe_load``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "file not found" if not path.exists() else "not a file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(path, f"larger than {MAX_YAML_BYTES // 2**20} MiB; not a config")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(path, "not UTF-8 text") from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise ConfigError(path, "nested too deeply; not a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    _check_expansion(data, path)
    return data


def _check_expansion(data: Any, path: Path) -> None:
    """Refuse a document that refers to itself or expands (through aliases) to more than
    :data:`MAX_YAML_VALUES` values. Sizes are memoised per shared object: a bomb is measured, not walked."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(item: Any) -> int:
        if not isinstance(item, dict | list):
            return 1
        key = id(item)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(path, "refers to itself (a recursive YAML alias); not a config")
        active.add(key)
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        sizes[key] = total
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                path,
                f"expands to more than {MAX_YAML_VALUES:,} values through nested aliases (a YAML bomb?); "
                "not a config",
            )
        return total

    try:
        size(data)
    except RecursionError:
        raise ConfigError(path, "nested too deeply; not a config") from None


def validate(data: Any, model: type[M], *, source: PathLike | None = None) -> M:
    """Validate plain data against a config model, turning pydantic's errors into one :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, f"expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, describe_validation_error(e)) from None


def load_yaml(path: PathLike, model: type[M]) -> M:
    """Read ``path`` and validate it as ``model``."""
    return validate(read_yaml(path), model, source=path)


def save_yaml(config: BaseModel, path: PathLike) -> None:
    """Write a config as YAML (atomic), in a form :func:`load_yaml` reads back to an equal config."""
    from volgen.io import atomic_write

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def configs_root() -> Path:
    """The folder of bundled YAML presets (``configs/`` in the source tree, ``volgen/configs`` installed)."""
    try:
        return Path(str(resources.files("volgen.configs")))
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parents[1] / "configs"


def preset_path(kind: str, name: str) -> Path:
    """Path of a bundled preset, e.g. ``preset_path("models", "tiny")`` -> ``configs/models/tiny.yaml``."""
    path = configs_root() / kind / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (configs_root() / kind).glob("*.yaml"))
        raise ConfigError(name, f"no {kind} preset of that name; available: {', '.join(available) or 'none'}")
    return path
