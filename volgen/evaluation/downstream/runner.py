"""Downstream utility: do synthetic pairs train a segmenter that works on real images?

For every seed ``s`` of ``options.seeds``:

1. the generator makes synthetic images for the *training* labels through ``volgen batch``
   (:func:`volgen.batch.run_batch`, base seed ``s``, ``max(multiples)`` samples per label) into
   ``OUT/synthetic/seed-S``; a rerun skips the volumes already there (the batch's own resume);
2. the same segmenter (same architecture, steps, batch size, learning rate and seed ``s``) is trained on each
   condition: ``real`` (the real training pairs), ``synthetic`` (one synthetic image per training label),
   ``real+synthetic`` (both) and ``synthetic-Kx`` (K synthetic images per label, for every K > 1 of
   ``options.multiples``);
3. each is tested on the real test pairs: Dice per foreground class on the test volumes' own grids.

A finished (condition, seed) is kept in ``OUT/runs/CONDITION/seed-S.json`` with a key of everything that
decides it (data, model weights, generation settings, segmenter config); a rerun with the same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volgen.data import TrainingCase
from volgen.errors import VolgenError
from volgen.evaluation.downstream.report import DownstreamReport, RunResult
from volgen.evaluation.downstream.split import DownstreamSplit, generator_training_overlap
from volgen.evaluation.metrics import dice_on_test
from volgen.generation import GenerateSettings
from volgen.segmenter import SegmenterConfig
from volgen.types import PathLike

logger = logging.getLogger(__name__)

#: The segmenters a downstream evaluation can train.
SEGMENTERS = ("volgen", "nnunet")
#: Progress messages: ``(message)``.
DownstreamProgress = Callable[[str], None]


def condition_names(multiples: Sequence[int]) -> list[str]:
    """The conditions, in report order: real, synthetic, real+synthetic, then synthetic-Kx for K > 1."""
    return [
        "real",
        "synthetic",
        "real+synthetic",
        *(f"synthetic-{k}x" for k in sorted(set(multiples)) if k > 1),
    ]


@dataclass
class DownstreamOptions:
    """How a downstream evaluation runs.

    Attributes:
        model: The generator's model folder; ``None``: the embedded default model.
        seeds: Repetitions; seed ``s`` (0..seeds-1) is the generation base seed and the segmenter seed.
        multiples: Synthetic images per training label to compare (1 is always run).
        settings: Generation settings (the seed is replaced per repetition).
        segmenter: ``volgen`` (:func:`volgen.segmenter.fit_segmenter`, CPU) or ``nnunet`` (nnU-Net v2).
        steps, batch_size, learning_rate, channels: The volgen segmenter's budget and widths.
        nnunet_configuration, nnunet_epochs: nnU-Net's configuration and trainer budget.
        device: Generation device (``auto``, ``cpu``, ``cuda``).
        unknown_labels: Label values the generator's label map does not know: ``error`` or ``background``.
    """

    model: Path | None = None
    seeds: int = 3
    multiples: tuple[int, ...] = (1,)
    settings: GenerateSettings = field(default_factory=GenerateSettings)
    segmenter: str = "volgen"
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    channels: tuple[int, ...] = (16, 32, 64)
    nnunet_configuration: str = "2d"
    nnunet_epochs: int = 50
    device: str = "auto"
    unknown_labels: str = "error"

    def check(self) -> None:
        if not 1 <= self.seeds <= 100:
            raise VolgenError(f"--seeds must be in 1..100, got {self.seeds}")
        if not self.multiples or any(not 1 <= k <= 16 for k in self.multiples):
            raise VolgenError(f"--synthetic-multiples must be in 1..16, got {list(self.multiples)}")
        if self.segmenter not in SEGMENTERS:
            raise VolgenError(f"--segmenter must be {' or '.join(SEGMENTERS)}, got {self.segmenter!r}")
        if self.unknown_labels not in ("error", "background"):
            raise VolgenError(f"--unknown-labels must be error or background, got {self.unknown_labels!r}")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cases_manifest(cases: Sequence[TrainingCase], path: Path) -> Path:
    """A batch manifest (``segmentation,case``) of the training labels, rewritten only when it changes."""
    from volgen.io import atomic_write

    text = "segmentation,case\n" + "".join(f"{c.label.resolve()},{c.case}\n" for c in cases)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


def synthesize(
    split: DownstreamSplit, out_dir: Path, options: DownstreamOptions, seed: int
) -> dict[tuple[str, int], Path]:
    """Synthetic images of the training labels for one seed, through ``volgen batch`` (resumable).

    Returns:
        ``{(case, sample): image path}`` for every training case and sample ``0..max(multiples)-1``.
    """
    from dataclasses import replace

    from volgen.batch import BatchOptions, run_batch

    manifest = _cases_manifest(split.train, out_dir / "synthetic" / "cases.csv")
    batch = BatchOptions(
        model=options.model,
        settings=replace(options.settings, seed=seed, unknown_labels=options.unknown_labels),
        samples_per_case=max(options.multiples),
        device=options.device,
    )
    target = out_dir / "synthetic" / f"seed-{seed}"
    result = run_batch(manifest, target, batch)
    failed = [r for r in result.records if r.status == "failed"]
    if failed:
        raise VolgenError(f"generating {failed[0].case} (seed {seed}) failed: {failed[0].error}")
    logger.info(
        "seed %d: %d synthetic volume(s) generated, %d reused",
        seed,
        result.count("done"),
        result.count("skipped"),
    )
    return {(r.case, r.sample): target / r.outputs[0] for r in result.records}


def _test_volumes(cases: Sequence[TrainingCase], label_map: Any, unknown: str) -> list[tuple[str, Any, Any]]:
    """``(case, image, class indices (z, y, x))`` of the real test pairs (read once)."""
    import SimpleITK as sitk

    from volgen.data import read_case

    volumes = []
    for case in cases:
        image, classes = read_case(case, label_map, unknown)
        volumes.append((case.case, image, sitk.GetArrayFromImage(classes)))
    return volumes


def multiple_of(condition: str) -> int:
    """Synthetic images per training label in ``condition`` (``synthetic-4x``: 4; ``real``: 0)."""
    if condition == "real":
        return 0
    return int(condition[len("synthetic-") : -1]) if condition.startswith("synthetic-") else 1


def compose(condition: str, real: Sequence[Any], synthetic: Sequence[Any]) -> list[Any]:
    """The training set of ``condition`` from the real items and the synthetic items of its multiple."""
    return ([] if condition.startswith("synthetic") else list(real)) + (
        [] if condition == "real" else list(synthetic)
    )


def _score(segment: Callable[[Any], np.ndarray], tests: Sequence[tuple[str, Any, Any]], classes: int):
    """Dice per test case and foreground class index (:func:`dice_on_test`)."""
    return {case: dice_on_test(segment(image), target, classes) for case, image, target in tests}


def _leak_warnings(metadata: Any, split: DownstreamSplit) -> list[str]:
    """A warning (also logged) when a test case appears in the generator's recorded training data."""
    leaked = generator_training_overlap(metadata.trained_on, metadata.training, [c.case for c in split.test])
    if not leaked:
        return []
    message = (
        f"test case(s) {', '.join(leaked)} appear in the generator's training data "
        f"({metadata.trained_on!r}): synthetic images may carry what the test measures"
    )
    logger.warning(message)
    return [message]


def _segmenter_config(metadata: Any, options: DownstreamOptions) -> SegmenterConfig:
    """The segmenter of every condition: the options' budget, the generator's frame and intensity mapping."""
    source = metadata.intensity  # the segmenter maps intensities as the generator does
    mapping: dict[str, Any] = (
        {"ct_window": (source.low, source.high)}
        if source.modality == "CT"
        else {"percentiles": source.percentiles or (0.5, 99.5)}
    )
    return SegmenterConfig(
        label_map=metadata.label_map.name,
        steps=options.steps,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        slice_size=metadata.slice_size,
        slice_axis=metadata.slice_axis,
        channels=list(options.channels),
        modality=source.modality,
        unknown_labels=options.unknown_labels,
        **mapping,
    )


def _prepare(cases: Sequence[TrainingCase], label_map: Any, config: SegmenterConfig, unknown: str) -> list:
    """Training cases in the segmenter's slicing frame and intensity mapping."""
    from volgen.data import prepare_case

    return [
        prepare_case(
            c,
            label_map=label_map,
            intensity=config.intensity_mapping(),
            slice_size=config.slice_size,
            slice_axis=config.slice_axis,
            unknown_labels=unknown,  # type: ignore[arg-type]
        )
        for c in cases
    ]


def run_downstream(
    split: DownstreamSplit,
    out_dir: PathLike,
    options: DownstreamOptions,
    *,
    progress: DownstreamProgress | None = None,
) -> DownstreamReport:
    """Generate, train every condition for every seed, test on the real test pairs (see the module docs).

    Raises:
        VolgenError: bad options; a generation that fails; nnU-Net asked for and not installed.
    """
    from volgen.default_model import resolve_model
    from volgen.models import read_metadata, weights_hash

    options.check()
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    model_dir = resolve_model(options.model)
    metadata = read_metadata(model_dir)
    if options.segmenter == "nnunet":
        from volgen.evaluation.downstream.nnunet import check_nnunet

        check_nnunet()
    label_map = metadata.label_map
    warnings = _leak_warnings(metadata, split)
    config = _segmenter_config(metadata, options)
    intensity = config.intensity_mapping()
    conditions = condition_names(options.multiples)
    settings = asdict(options.settings.for_model(metadata))  # as it runs: the model's sampling decided
    settings.pop("seed")
    base_key = {
        "train": [[c.case, str(c.image.resolve()), str(c.label.resolve())] for c in split.train],
        "test": [[c.case, str(c.image.resolve()), str(c.label.resolve())] for c in split.test],
        "weights": weights_hash(model_dir),
        "settings": settings,
        "segmenter": options.segmenter,
        "config": config.model_dump(mode="json")
        if options.segmenter == "volgen"
        else [options.nnunet_configuration, options.nnunet_epochs],
    }

    def prepare(cases: Sequence[TrainingCase]) -> list[Any]:
        return _prepare(cases, label_map, config, options.unknown_labels)

    real: list[Any] | None = None
    tests: list[tuple[str, Any, Any]] | None = None
    runs: list[RunResult] = []
    for seed in range(options.seeds):
        say(f"seed {seed + 1}/{options.seeds}: generating synthetic images")
        images = synthesize(split, out_dir, options, seed)
        synthetic_cases = {
            k: [
                TrainingCase(case=f"{c.case}_synthetic{s}", image=images[(c.case, s)], label=c.label)
                for c in split.train
                for s in range(k)
            ]
            for k in sorted({1, *options.multiples})
        }
        synthetic: dict[int, list[Any]] = {}
        for condition in conditions:
            key = {**base_key, "condition": condition, "seed": seed}
            path = out_dir / "runs" / condition.replace("+", "-and-") / f"seed-{seed}.json"
            cached = RunResult.load(path, _digest(key))
            if cached is not None:
                runs.append(cached)
                continue
            k = max(1, multiple_of(condition))
            say(f"seed {seed + 1}/{options.seeds}: training on {condition}")
            started = time.perf_counter()
            if options.segmenter == "nnunet":
                from volgen.evaluation.downstream.nnunet import nnunet_scores

                scores = nnunet_scores(
                    compose(condition, split.train, synthetic_cases[k]),
                    split.test,
                    label_map,
                    out_dir / "nnunet" / condition / f"seed-{seed}",
                    metadata=metadata,
                    configuration=options.nnunet_configuration,
                    epochs=options.nnunet_epochs,
                    seed=seed,
                    unknown_labels=options.unknown_labels,
                )
                slices = 0
            else:
                from volgen.segmenter import fit_segmenter

                if real is None and not condition.startswith("synthetic"):
                    real = prepare(split.train)
                if condition != "real" and k not in synthetic:
                    synthetic[k] = prepare(synthetic_cases[k])
                volumes = compose(condition, real or [], synthetic.get(k, []))
                segmenter, _ = fit_segmenter(
                    volumes, label_map, intensity, config.model_copy(update={"seed": seed})
                )
                if tests is None:
                    tests = _test_volumes(split.test, label_map, options.unknown_labels)
                scores = _score(segmenter.segment, tests, label_map.num_classes)
                slices = int(sum(v.image.shape[0] for v in volumes))
            result = RunResult(
                condition=condition,
                seed=seed,
                dice={
                    case: {label_map.class_names[c]: v for c, v in per_class.items()}
                    for case, per_class in scores.items()
                },
                train_cases=len(compose(condition, split.train, synthetic_cases[k])),
                train_slices=slices,
                seconds=time.perf_counter() - started,
            )
            result.save(path, _digest(key))
            runs.append(result)
            logger.info("seed %d %s: mean Dice %.4f", seed, condition, result.mean)
    return DownstreamReport(
        conditions=conditions,
        class_names=label_map.class_names[1:],
        runs=runs,
        warnings=warnings,
        settings={
            "model": str(model_dir),
            "model_name": metadata.name,
            "segmenter": options.segmenter,
            "seeds": options.seeds,
            "multiples": sorted(set(options.multiples)),
            "segmenter_config": base_key["config"],
            "generation": settings,
            "train_cases": [c.case for c in split.train],
            "test_cases": [c.case for c in split.test],
        },
    )
