"""The real train/test split of a downstream evaluation, checked for leaks.

Real pairs are read as ``volgen train`` reads them (:func:`volgen.data.find_cases`: a folder with
``images/`` + ``labels/`` or a CSV/YAML manifest ``image,label[,case]``) or from an nnU-Net v2 raw dataset
folder (``imagesTr/CASE_0000.nii.gz`` + ``labelsTr/CASE.nii.gz``, one channel; the labels are read with the
generator's label map like any other). The split is either two sources (train, test) or one source and a
split file:

- ``{"train": [ids], "test": [ids]}`` (JSON or YAML);
- nnU-Net v2's ``splits_final.json``: a list of folds ``{"train": [ids], "val": [ids]}``; one fold is used
  (``val`` is the test side).

A case must be on one side only: the same case id, the same image or label file (paths resolved) or the same
file contents (SHA-256) on both sides is an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volgen.data import TrainingCase, find_cases
from volgen.errors import ConfigError, VolgenError
from volgen.types import PathLike

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownstreamSplit:
    """Real image/label pairs: ``train`` (segmenters learn from them, synthetic images are made from their
    labels) and ``test`` (every segmenter is scored on them)."""

    train: list[TrainingCase]
    test: list[TrainingCase]


def read_split(
    data: PathLike, *, test: PathLike | None = None, split: PathLike | None = None, fold: int = 0
) -> DownstreamSplit:
    """The split from two sources (``data`` trains, ``test`` tests) or from ``data`` and a split file.

    Raises:
        ConfigError: Neither or both of ``test`` and ``split``; a malformed split file; an id the data does
            not have; an empty side; a case on both sides (:func:`check_disjoint`).
    """
    if (test is None) == (split is None):
        raise VolgenError(
            "give the test cases either as a second source (--test) or as a split file (--split)"
        )
    cases = find_pairs(data)
    if test is not None:
        result = DownstreamSplit(train=cases, test=find_pairs(test))
    else:
        train_ids, test_ids = _read_split_file(Path(split), fold)  # type: ignore[arg-type]
        by_id = {c.case: c for c in cases}
        for ids in (train_ids, test_ids):
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise ConfigError(split, f"case {missing[0]!r} is not in {data}")
        result = DownstreamSplit(train=[by_id[i] for i in train_ids], test=[by_id[i] for i in test_ids])
    for side, listed in (("training", result.train), ("test", result.test)):
        if not listed:
            raise ConfigError(split if split is not None else data, f"the {side} side has no cases")
    check_disjoint(result.train, result.test)
    return result


def find_pairs(source: PathLike) -> list[TrainingCase]:
    """Image/label pairs of a folder, a manifest or an nnU-Net v2 raw dataset (``imagesTr`` + ``labelsTr``).

    Raises:
        ConfigError: No pairs; an nnU-Net image without its label; a multi-channel nnU-Net dataset.
    """
    from volgen.io.naming import FORMAT_ENDINGS

    folder = Path(source)
    images, labels = folder / "imagesTr", folder / "labelsTr"
    if not (images.is_dir() and labels.is_dir()):
        return find_cases(source)
    cases = []
    for image in sorted(images.iterdir()):
        ending = next((e for e in FORMAT_ENDINGS.values() if e and image.name.endswith(e)), None)
        if ending is None or image.name.startswith("."):
            continue
        stem = image.name[: -len(ending)]
        name, channel = stem[:-5], stem[-5:]
        if channel != "_0000":
            raise ConfigError(image, "only single-channel nnU-Net datasets (CASE_0000 images) are supported")
        label = labels / f"{name}{ending}"
        if not label.is_file():
            raise ConfigError(folder, f"{image.name} has no label {label.name} in labelsTr")
        cases.append(TrainingCase(case=name, image=image, label=label))
    if not cases:
        raise ConfigError(folder, "no CASE_0000 images in imagesTr")
    return cases


def _read_split_file(path: Path, fold: int) -> tuple[list[str], list[str]]:
    import json

    from volgen.config import read_yaml

    if not path.is_file():
        raise ConfigError(path, "split file not found")
    if path.suffix.lower() == ".json":
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(path, f"not valid JSON: {e}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        data = read_yaml(path)
    else:
        raise ConfigError(path, "a split file is .json or .yaml")
    if isinstance(data, list):  # nnU-Net splits_final.json: folds of {train, val}
        if not 0 <= fold < len(data):
            raise ConfigError(path, f"fold {fold} not in the file's {len(data)} fold(s)")
        data, test_key = data[fold], "val"
    else:
        test_key = "test" if isinstance(data, dict) and "test" in data else "val"
    if not isinstance(data, dict) or set(data) != {"train", test_key}:
        raise ConfigError(path, 'a split is {"train": [ids], "test": [ids]} or nnU-Net\'s list of folds')
    sides = []
    for key in ("train", test_key):
        ids = data[key]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ConfigError(path, f"'{key}' must be a list of case ids")
        if len(set(ids)) != len(ids):
            raise ConfigError(path, f"'{key}' lists a case twice")
        sides.append(list(ids))
    return sides[0], sides[1]


def check_disjoint(train: Sequence[TrainingCase], test: Sequence[TrainingCase]) -> None:
    """Raise :class:`VolgenError` when a case is on both sides: the same id, the same file (resolved path)
    or the same contents of an image or label file."""
    from volgen.io.files import file_sha256

    train_ids = {c.case for c in train}
    for case in test:
        if case.case in train_ids:
            raise VolgenError(f"case {case.case!r} is in both the training and the test cases; split leaks")
    seen: dict[Any, str] = {}
    for side, cases in (("training", train), ("test", test)):
        for case in cases:
            for path in (case.image, case.label):
                for key in (("path", path.resolve()), ("sha256", file_sha256(path))):
                    other = seen.get(key)
                    if other is not None and not other.startswith(side + ":"):
                        raise VolgenError(
                            f"{path} (test case {case.case!r}) is also {other.split(':', 1)[1]}; split leaks"
                        )
                    seen.setdefault(key, f"{side}:training case {case.case!r}")


def generator_training_overlap(trained_on: str, training: dict[str, Any], cases: Sequence[str]) -> list[str]:
    """The ``cases`` the generator's model card says it was trained on.

    A model records its training data in ``trained_on`` (``volgen train``: "N case(s) from SOURCE (ids)";
    the embedded model: a sentence naming the subject) and possibly ``training["cases"]``. A case counts when
    its id appears there as a whole word (upper/lower case ignored).
    """
    listed = training.get("cases")
    text = " ".join([trained_on, *(str(c) for c in listed)] if isinstance(listed, list) else [trained_on])
    found = []
    for case in cases:
        pattern = r"(?<![A-Za-z0-9_.-])" + re.escape(case) + r"(?![A-Za-z0-9_-])"
        if re.search(pattern, text, flags=re.IGNORECASE):
            found.append(case)
    return found
