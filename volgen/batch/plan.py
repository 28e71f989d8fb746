"""The plan of a batch run: options, work items (a case and a sample), their seeds, outputs and shards.

Nothing here writes. :func:`plan_batch` checks what can be checked before anything is generated: options,
class selections, λ without a reference, colliding outputs, and that no output is, contains or lies inside
an input, a reference, the manifest or the model folder (paths resolved, links followed).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from volgen import defaults
from volgen.batch.cases import Case
from volgen.batch.records import MANIFEST_NAME, is_reserved
from volgen.errors import VolgenError
from volgen.generation.settings import GenerateSettings
from volgen.io.naming import FORMAT_ENDINGS, sample_name, sidecar_path
from volgen.io.paths import overlap, resolve
from volgen.types import PathLike

if TYPE_CHECKING:
    from volgen.models import ModelMetadata

LAYOUTS = ("flat", "nnunet")
#: Most samples per case, and most work items in one run (each item is planned in memory before the run).
MAX_SAMPLES_PER_CASE = 10_000
MAX_ITEMS = 1_000_000
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def derive_seed(base_seed: int, case_id: str, sample: int = 0) -> int:
    """The seed of one sample of one case: the first 31 bits of ``sha256(f"{base_seed}:{case_id}:{sample}")``.

    It depends on nothing else (not the position of the case, the other cases or the shard), so a case's
    output is reproducible on its own.
    """
    digest = hashlib.sha256(f"{base_seed}:{case_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class BatchOptions:
    """Everything about a batch run except its cases.

    Attributes:
        model: Model folder; ``None`` is the embedded default model.
        settings: The generation settings of every case; ``settings.seed`` is the base seed the per-case seeds
            derive from (:func:`derive_seed`).
        samples_per_case: Synthetic volumes per segmentation (different seeds).
        output_format: ``nifti``, ``nrrd``, ``mha`` or ``dicom``.
        layout: ``flat`` or ``nnunet``.
        dataset_id: nnU-Net dataset id (1-999), with ``layout="nnunet"``.
        dataset_name: nnU-Net dataset name, with ``layout="nnunet"``.
        device: ``auto``, ``cpu`` or ``cuda`` (a multi-process run gives each rank its own GPU).
        precision: As :func:`volgen.api.generate`.
        max_memory: As :func:`volgen.api.generate` (bytes).
        copy_patient_info: DICOM output from DICOM input: copy patient identifiers.
    """

    model: Path | None = None
    settings: GenerateSettings = field(default_factory=GenerateSettings)
    samples_per_case: int = 1
    output_format: str = "nifti"
    layout: str = "flat"
    dataset_id: int | None = None
    dataset_name: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_memory: int | None = None
    copy_patient_info: bool = False

    def check(self) -> None:
        """Raise :class:`VolgenError` for inconsistent options."""
        if not 1 <= self.samples_per_case <= MAX_SAMPLES_PER_CASE:
            raise VolgenError(
                f"--samples-per-case must be in 1..{MAX_SAMPLES_PER_CASE}, got {self.samples_per_case}"
            )

        if self.output_format not in FORMAT_ENDINGS:
            raise VolgenError(f"unknown --format {self.output_format!r}; use {', '.join(FORMAT_ENDINGS)}")
        if self.layout not in LAYOUTS:
            raise VolgenError(f"unknown --layout {self.layout!r}; use {' or '.join(LAYOUTS)}")
        if self.layout == "nnunet":
            if self.dataset_id is None or self.dataset_name is None:
                raise VolgenError("--layout nnunet needs --dataset-id and --dataset-name")
            if not 1 <= self.dataset_id <= 999:
                raise VolgenError(f"--dataset-id must be in 1..999 (nnU-Net), got {self.dataset_id}")
            if not _DATASET_NAME.match(self.dataset_name):
                raise VolgenError(f"--dataset-name {self.dataset_name!r}: use letters, digits, '_' or '-'")
            if self.output_format == "dicom":
                raise VolgenError("--layout nnunet writes NIfTI, NRRD or MHA files, not DICOM")
        elif self.dataset_id is not None or self.dataset_name is not None:
            raise VolgenError("--dataset-id and --dataset-name go with --layout nnunet")

    @property
    def dataset_folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


@dataclass
class WorkItem:
    """One volume to generate: a sample of a case, its settings and its output paths."""

    case: Case
    sample: int
    name: str
    settings: GenerateSettings
    output: Path
    sidecar: Path
    label: Path | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.case.id, self.sample)

    @property
    def outputs(self) -> list[Path]:
        """The output, its sidecar and (nnU-Net layout) the label file."""
        return [self.output, self.sidecar] + ([self.label] if self.label is not None else [])


@dataclass
class BatchPlan:
    """The work items of a run (all shards) and where they go."""

    out_dir: Path
    items: list[WorkItem]
    options: BatchOptions
    metadata: ModelMetadata
    dataset_dir: Path | None = None
    protected: list[tuple[str, PathLike]] = field(default_factory=list)

    def folders(self) -> list[Path]:
        """Folders outputs are written to."""
        return sorted({p.parent for item in self.items for p in item.outputs} | {self.out_dir})


def item_settings(base: GenerateSettings, case: Case, sample: int) -> GenerateSettings:
    """The settings of one sample of one case: the run's, with the derived seed and the case's overrides."""
    seed = case.seed + sample if case.seed is not None else derive_seed(base.seed, case.id, sample)
    settings = replace(base, seed=seed)
    if case.keep is not None or case.drop is not None:
        settings = replace(
            settings,
            keep=None if case.keep is None else list(case.keep),
            drop=None if case.drop is None else list(case.drop),
        )
    if case.strength is not None:
        settings = replace(settings, strength=case.strength)
    return settings


def plan_batch(
    cases: Sequence[Case],
    out_dir: PathLike,
    options: BatchOptions,
    metadata: ModelMetadata,
    *,
    protected: Sequence[tuple[str, PathLike]] = (),
) -> BatchPlan:
    """Work items and output paths for ``cases``; checks what can be checked before generating anything.

    Args:
        cases: The cases.
        out_dir: The output folder.
        options: Model, settings, samples, format, layout.
        metadata: The model's metadata (label map for class selections; its ``sampling`` decides what the
            settings leave to the model, so sidecars and resume see the settings that run).
        protected: ``(what, path)`` pairs besides the cases' inputs and references that no output may be,
            contain or lie inside: the source folder or manifest, the model folder.

    Raises:
        VolgenError: Inconsistent options; too many items; a case selects unknown classes, or has λ < 1
            without a reference; two outputs collide; an output is, contains or lies inside an input, a
            reference, the manifest or the model folder.
    """
    options.check()
    out_dir = Path(out_dir)
    if len(cases) * options.samples_per_case > MAX_ITEMS:
        raise VolgenError(
            f"{len(cases)} cases x {options.samples_per_case} samples is more than {MAX_ITEMS} items in one "
            "run; split the manifest"
        )
    ending = FORMAT_ENDINGS[options.output_format]
    dataset_dir = out_dir / options.dataset_folder_name if options.layout == "nnunet" else None
    items = []
    for case in cases:
        last, top = options.samples_per_case - 1, defaults.MAX_SEED
        if case.seed is not None and case.seed + last > top:
            raise VolgenError(
                f"{case.origin or case.id}: case {case.id!r}: seed {case.seed} gives sample {last} "
                f"(--samples-per-case {options.samples_per_case}) the seed {case.seed + last}, "
                f"above the largest seed {top}; give this case a seed of at most {top - last}"
            )
        for sample in range(options.samples_per_case):
            settings = item_settings(options.settings, case, sample).for_model(metadata)  # its sampling
            try:
                metadata.label_map.selection(keep=settings.keep, drop=settings.drop)
            except VolgenError as e:
                raise VolgenError(f"case {case.id!r}: {e}") from None
            if settings.strength < 1.0 and case.reference is None:
                raise VolgenError(
                    f"case {case.id!r}: λ (strength) {settings.strength} < 1 needs a reference image "
                    "(a 'reference' column in the manifest)"
                )
            name = case.id if options.samples_per_case == 1 else sample_name(case.id, sample)
            if dataset_dir is not None:
                output = dataset_dir / "imagesTr" / f"{name}_0000{ending}"
                label = dataset_dir / "labelsTr" / f"{name}{ending}"
            else:
                output, label = out_dir / f"{name}{ending}", None
                if is_reserved(output.name):
                    raise VolgenError(
                        f"{case.origin or case.segmentation}: case {case.id!r}: its output {output} would be "
                        f"the run's manifest ({MANIFEST_NAME} or a shard manifest); rename the case"
                    )
            items.append(
                WorkItem(
                    case=case,
                    sample=sample,
                    name=name,
                    settings=settings,
                    output=output,
                    sidecar=sidecar_path(output),
                    label=label,
                )
            )
    items.sort(key=lambda it: it.key)
    guarded = [*protected]
    guarded += [("input", c.segmentation) for c in cases]
    guarded += [("reference", c.reference) for c in cases if c.reference is not None]
    check_outputs(out_dir, [p for item in items for p in item.outputs], guarded)
    return BatchPlan(
        out_dir=out_dir,
        items=items,
        options=options,
        metadata=metadata,
        dataset_dir=dataset_dir,
        protected=list(protected),
    )


def check_outputs(out_dir: Path, outputs: Sequence[Path], protected: Sequence[tuple[str, PathLike]]) -> None:
    """Refuse outputs that would overwrite what must survive, and colliding outputs.

    Paths are resolved (symbolic links followed) first, so a link to the input folder is the input folder.
    OUT_DIR must not be or lie inside a protected path (it may hold inputs: only the planned outputs are
    written there); each output must not be, lie inside or contain one.

    Raises:
        VolgenError: Naming the output and what it would overwrite.
    """
    for what, path in protected:
        how = overlap(out_dir, path)
        if how in ("is", "lies inside"):
            raise VolgenError(f"OUT_DIR {out_dir} {how} the {what} {path}; choose another OUT_DIR")
    guarded = {resolve(path): (what, path) for what, path in protected}
    holders = {parent: entry for real, entry in guarded.items() for parent in real.parents}
    seen: set[str] = set()
    for path in outputs:
        real = resolve(path)
        folded = str(real).casefold()
        if folded in seen:
            raise VolgenError(f"two outputs would be written to {path}; rename a case")
        seen.add(folded)
        for place in (real, *real.parents):
            if place in guarded:
                what, original = guarded[place]
                how = "is" if place == real else "lies inside"
                raise VolgenError(f"output {path} {how} the {what} {original}; choose another OUT_DIR")
        if real in holders:
            what, original = holders[real]
            raise VolgenError(f"output {path} contains the {what} {original}; choose another OUT_DIR")


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)`` (shard index from 0)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise VolgenError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise VolgenError(f"--shard {text}: need 0 <= i < n")
    return index, count


def select_shard(items: Sequence[WorkItem], index: int, count: int) -> list[WorkItem]:
    """Shard ``index`` of ``count``: the items sorted by (case, sample), dealt round-robin.

    Every item is in exactly one shard; which one depends only on the sorted list of work items.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad shard {index}/{count}")
    ordered = sorted(items, key=lambda it: it.key)
    return [item for i, item in enumerate(ordered) if i % count == index]
