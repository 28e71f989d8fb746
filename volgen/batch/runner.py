"""Running a batch: each process works through its items, claiming each, and records every outcome.

Each process holds one :class:`~volgen.generation.VolumeGenerator` (the model set up once on its device) for
all its items. It works case by case: claim the case's items (its samples; :mod:`volgen.batch.claims`; an
item another live process holds is left to it), remove the temporaries a killed run left for them, skip those
whose outputs are complete and current (:func:`volgen.batch.resume.unfinished_reason`), and run the rest
through the case workflow that ``volgen generate`` runs too (:class:`~volgen.generation.case.CaseWorkflow`):
refuse them before reading voxels when the header's grid needs more memory than allowed, else read the
segmentation once (the nnU-Net label files are made from the same image) and generate the samples to do
*together* - as many per UNet run as fit in memory
(:meth:`~volgen.generation.VolumeGenerator.volumes_together`), each exactly what it would be alone - and
write each (volume, then sidecar); then append one row per item to the manifest and release the claims. A
failing item is recorded (its stale outputs removed, only what volgen wrote) and the run goes on: a sample
whose write fails fails alone, a failure the samples share (reading the segmentation, generating) fails each
of them.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from volgen.batch import claims
from volgen.batch.dryrun import one_line
from volgen.batch.group import ProcessGroup, process_group
from volgen.batch.nnunet import write_dataset_json, write_label
from volgen.batch.plan import BatchOptions, BatchPlan, WorkItem, plan_batch, select_shard
from volgen.batch.records import (
    MANIFEST_NAME,
    ItemRecord,
    append_record,
    compact_manifest,
    fold_finished_shards,
    merge_manifests,
    read_manifest,
    shard_manifest_name,
    shard_manifests,
)
from volgen.batch.resume import find_temporaries, remove_temporaries, unfinished_reason
from volgen.errors import OutputError, VolgenError
from volgen.io.files import remove_output
from volgen.types import PathLike

if TYPE_CHECKING:
    from volgen.generation import VolumeGenerator
    from volgen.generation.case import CaseWorkflow
    from volgen.models import LoadedModel
    from volgen.pipeline import Progress

logger = logging.getLogger("volgen.batch")

#: Status of an item another live process had claimed (not written to the manifest: the holder records it).
ELSEWHERE = "elsewhere"


class BatchObserver:
    """Receives the events of a run (the CLI renders them); every method does nothing by default."""

    def started(self, items: Sequence[WorkItem], *, total: int, shard: tuple[int, int]) -> None:
        """Before the first item: this process's items, the number of items of all shards, this shard."""

    def item_started(self, item: WorkItem, index: int, count: int) -> None:
        """An item starts (``index`` from 0 of ``count`` items of this process)."""

    def item_progress(self, item: WorkItem, progress: Progress) -> None:
        """After every UNet chunk of a generating item (samples generated together report once, with the
        first of them; the progress counts the slices of all of them)."""

    def item_finished(self, item: WorkItem, record: ItemRecord, index: int, count: int) -> None:
        """An item is done, skipped or failed (its record is in the manifest)."""


@dataclass
class BatchResult:
    """What a run did.

    Attributes:
        records: Rows of the run's items: this shard's for an independent ``--shard`` job, all ranks' for a
            multi-process run (every rank reports the whole run), all items otherwise.
        seconds: Wall time of this process.
        manifest: ``OUT_DIR/manifest.csv``.
        dataset_json: nnU-Net ``dataset.json`` (``None`` for the flat layout).
        elsewhere: Items this process left to another run that held their claim.
    """

    records: list[ItemRecord]
    seconds: float
    manifest: Path
    dataset_json: Path | None = None
    elsewhere: list[WorkItem] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.records)

    @property
    def volumes_per_hour(self) -> float:
        """Generated (not skipped) volumes per hour of wall time."""
        return self.count("done") * 3600.0 / self.seconds if self.seconds > 0 else 0.0


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


@dataclass
class _Context:
    """What every item of one process's run shares."""

    plan: BatchPlan
    generator: VolumeGenerator
    manifest: Path
    observer: BatchObserver
    temporaries: dict[Path, list[Path]]
    limit: int | None


def run_items(
    plan: BatchPlan,
    items: Sequence[WorkItem],
    *,
    generator: VolumeGenerator,
    manifest: Path,
    observer: BatchObserver | None = None,
    elsewhere: list[WorkItem] | None = None,
) -> list[ItemRecord]:
    """Convert ``items`` one after the other with one ``generator``, appending each outcome to ``manifest``;
    return their records.

    Items another live process has claimed are left to it (added to ``elsewhere``, not recorded here).
    ``KeyboardInterrupt`` stops the run (finished items stay recorded; the current claim is released).
    """
    context = _Context(
        plan=plan,
        generator=generator,
        manifest=manifest,
        observer=observer or BatchObserver(),
        temporaries={},
        limit=plan.options.max_memory,
    )
    for folder in plan.folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(folder, f"cannot create the folder ({e.strerror or e})") from None
    context.temporaries = find_temporaries({p.parent for item in items for p in item.outputs})
    records: list[ItemRecord] = []
    position = {id(item): index for index, item in enumerate(items)}
    for group in _by_case(items):
        held: dict[tuple[str, int], claims.Claim] = {}
        for item in group:
            claimed = claims.claim(plan.out_dir, _relative(item.output, plan.out_dir))
            if claimed is None:
                logger.info(
                    "%s sample %d: another run is working on it; left to it", item.case.id, item.sample
                )
                if elsewhere is not None:
                    elsewhere.append(item)
            else:
                held[item.key] = claimed
        mine = [item for item in group if item.key in held]
        try:
            for item in mine:
                context.observer.item_started(item, position[id(item)], len(items))
            done = _run_case(mine, context, list(held.values()))
            for item, record in zip(mine, done, strict=True):
                append_record(manifest, record)
                held.pop(item.key).release()
                records.append(record)
                context.observer.item_finished(item, record, position[id(item)], len(items))
        finally:
            for rest in held.values():
                rest.release()
    claims.release_all(plan.out_dir)
    return records


def _by_case(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    """``items`` in runs of consecutive items of one case (its samples), order kept."""
    groups: list[list[WorkItem]] = []
    for item in items:
        if groups and groups[-1][0].case.id == item.case.id:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _record(item: WorkItem, plan: BatchPlan, status: str, seconds: float, error: str = "") -> ItemRecord:
    return ItemRecord(
        output=_relative(item.output, plan.out_dir),
        case=item.case.id,
        sample=item.sample,
        input=str(item.case.segmentation),
        outputs=[] if status == "failed" else [_relative(p, plan.out_dir) for p in item.outputs],
        seed=item.settings.seed,
        status=status,
        seconds=seconds,
        error=error,
    )


def _run_case(items: list[WorkItem], context: _Context, held: list[claims.Claim]) -> list[ItemRecord]:
    """Skip, refuse or generate the claimed items of one case; their records, in order.

    The items to do are generated together; each shares the time of its group equally (``seconds``).
    """
    plan, loaded = context.plan, context.generator.model
    fmt = plan.options.output_format
    records: dict[tuple[str, int], ItemRecord] = {}
    todo = []
    for item in items:
        started = time.perf_counter()
        try:
            remove_temporaries(item, context.temporaries)
            reason = unfinished_reason(item, weights_sha256=loaded.weights_sha256, output_format=fmt)
        except OSError as e:  # a leftover that cannot be removed: this item fails alone
            error = one_line(OutputError(item.output, f"cannot use this output ({e.strerror or e})"))
            records[item.key] = _record(item, plan, "failed", time.perf_counter() - started, error)
            continue
        if reason is None:
            records[item.key] = _record(item, plan, "skipped", time.perf_counter() - started)
        else:
            logger.info("%s sample %d: generating (%s)", item.case.id, item.sample, reason)
            todo.append(item)
    if todo:
        outcome = _generate_case(todo, context, held)
        for item in todo:
            error, seconds = outcome[item.key]
            if error:
                for path in item.outputs:  # stale outputs of an earlier run must not pass as results
                    try:
                        remove_output(path)
                    except OSError as e:  # a name the file system refuses (too long) holds nothing
                        level = logging.DEBUG if e.errno == errno.ENAMETOOLONG else logging.WARNING
                        logger.log(level, "%s: stale output not removed (%s)", path, e.strerror or e)
            records[item.key] = _record(item, plan, "failed" if error else "done", seconds, error)
    return [records[item.key] for item in items]


def _generate_case(
    items: list[WorkItem], context: _Context, held: list[claims.Claim]
) -> dict[tuple[str, int], tuple[str, float]]:
    """Generate the samples ``items`` of one case, together (as many at a time as fit in memory): each item's
    error (``""``: done) and seconds.

    The case workflow (:class:`~volgen.generation.case.CaseWorkflow`) checks the header's grid against
    ``--max-memory`` (or 80% of what is available) before any voxel is read, and reads the segmentation and
    the reference once; (nnU-Net layout) the class image is made once from the same image.
    """
    from volgen.generation.case import CaseWorkflow

    options, generator = context.plan.options, context.generator
    first = items[0]
    settings = first.settings
    outcome: dict[tuple[str, int], tuple[str, float]] = {}
    started = time.perf_counter()
    try:
        case = CaseWorkflow.read(
            generator,
            first.case.segmentation,
            settings,
            samples=len(items),
            reference=first.case.reference,
            copy_patient_info=options.copy_patient_info and options.output_format == "dicom",
            model_path=options.model,
            max_memory=context.limit,
        )
        classes = None
        for group in case.groups(len(items)):
            current = [items[k] for k in group]
            begun = time.perf_counter()
            if classes is None and any(item.label is not None for item in current):
                unknown = settings.unknown_labels
                classes = generator.classes(case.image, unknown_labels=unknown, source=case.segmentation)
            errors = _generate(current, context, held, case, classes)
            share = (time.perf_counter() - begun) / len(current)
            outcome.update({item.key: (errors[item.key], share) for item in current})
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the run; it is recorded
        logger.debug("%s failed", first.case.id, exc_info=True)
        failed = [item for item in items if item.key not in outcome]
        share = (time.perf_counter() - started) / max(1, len(failed))
        outcome.update({item.key: (one_line(exc), share) for item in failed})
    return outcome


def _generate(
    items: list[WorkItem],
    context: _Context,
    held: list[claims.Claim],
    case: CaseWorkflow,
    classes: object,
) -> dict[tuple[str, int], str]:
    """Generate ``items`` (samples of one case) in one run of the pipeline and write each one's outputs (all
    or nothing per item, as the file level does) and, in the nnU-Net layout, its label file; each item's
    error (``""``: written). A failure of the generation itself raises (it is every item's)."""
    from volgen.generation.files import OutputPlan

    options = context.plan.options
    started = time.perf_counter()

    def progress(p: Progress) -> None:
        for claim in held:
            claim.touch()
        context.observer.item_progress(items[0], p)

    volumes = case.generate([item.settings for item in items], progress=progress)
    errors: dict[tuple[str, int], str] = {}
    for item, volume in zip(items, volumes, strict=True):
        segmentation, reference = item.case.segmentation, item.case.reference
        try:
            outputs = OutputPlan.make(
                segmentation, item.output, output_format=options.output_format, overwrite=True,
                protected=[*context.plan.protected, ("input", segmentation), ("reference", reference)],
            )  # fmt: skip
            if item.label is not None:
                write_label(item, context.plan, classes)
            case.write(outputs, volume, item.settings, overwrite=True, started=started, output=item.output)
            errors[item.key] = ""
        except Exception as exc:  # noqa: BLE001 - this sample fails alone; it is recorded
            logger.debug("%s sample %d failed", item.case.id, item.sample, exc_info=True)
            errors[item.key] = one_line(exc)
    return errors


def prepare(source: PathLike, out_dir: PathLike, options: BatchOptions) -> tuple[BatchPlan, LoadedModel]:
    """Read the cases, load the model once and plan the run (nothing is written).

    The source (folder or manifest), every input and reference and the model folder are protected: no
    output may be, contain or lie inside them (paths resolved, links followed).
    """
    from volgen import defaults
    from volgen.batch.cases import read_cases
    from volgen.models import load_model

    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VolgenError(f"OUT_DIR {out_dir} exists and is not a folder")
    options.check()
    model_dir = Path(options.model) if options.model is not None else defaults.MODEL_DIR
    protected = [("input folder" if source.is_dir() else "manifest", source), ("model folder", model_dir)]
    from volgen.batch.plan import check_outputs

    # before the (slow) case scan and model load; the run's own manifest may not be the input manifest
    check_outputs(out_dir, [out_dir / MANIFEST_NAME], protected)
    cases = read_cases(source)
    loaded = load_model(model_dir)
    return plan_batch(cases, out_dir, options, loaded.metadata, protected=protected), loaded


def make_generator(loaded: LoadedModel, device: str, options: BatchOptions) -> VolumeGenerator:
    """The one generator of this process: the model set up on its device once, for all its items. The run's
    settings are checked against the model here, before any item (steps within its schedule, class names)."""
    from volgen.generation import VolumeGenerator

    generator = VolumeGenerator(loaded, device=device, precision=options.precision)
    generator.check(options.settings, reference=True)  # λ < 1 without a reference: checked per case
    return generator


def run_batch(
    source: PathLike,
    out_dir: PathLike,
    options: BatchOptions,
    *,
    shard: tuple[int, int] = (0, 1),
    observer: BatchObserver | None = None,
    group: ProcessGroup | None = None,
) -> BatchResult:
    """Convert every case of ``source`` (a folder or manifest) into ``out_dir``.

    Several runs (or shards) may work on one ``out_dir`` at the same time: each item is claimed before it
    is worked on, so it is generated once.

    Args:
        source: See :func:`volgen.batch.read_cases`.
        out_dir: Output folder (created).
        options: Model, settings, samples, format, layout.
        shard: ``(i, n)``: do shard ``i`` of ``n`` (independent jobs, e.g. a SLURM array).
        observer: Receives progress events.
        group: The process group (default: :func:`process_group`, which joins a torchrun/accelerate launch).
            With ``world`` ranks, rank ``r`` of shard ``i/n`` does shard ``i*world + r`` of ``n*world``.

    Returns:
        :class:`BatchResult`; ``ok`` is False when an item failed.
    """
    started = time.perf_counter()
    plan, loaded = prepare(source, out_dir, options)
    group = group or process_group(options.device)
    shard_index, shard_count = shard
    index, count = shard_index * group.world + group.rank, shard_count * group.world
    mine = select_shard(plan.items, index, count)
    if observer is not None:
        observer.started(mine, total=len(plan.items), shard=(index, count))
    out = plan.out_dir
    manifest = out / MANIFEST_NAME
    elsewhere: list[WorkItem] = []
    generator = make_generator(loaded, group.device, options)
    if count == 1:
        records = run_items(
            plan, mine, generator=generator, manifest=manifest, observer=observer, elsewhere=elsewhere
        )
        compact_manifest(manifest)
        _fold_finished_shards(out)
        return BatchResult(
            records=records,
            seconds=time.perf_counter() - started,
            manifest=manifest,
            dataset_json=write_dataset_json(plan),
            elsewhere=elsewhere,
        )
    return _run_shard(plan, generator, mine, group, shard, observer, started)


def _fold_finished_shards(out: Path) -> None:
    """Fold the shard manifests of shard jobs that have finished into this whole run's ``manifest.csv``
    (rows of items it has not recorded) and remove them; a job still running holds its shard manifest's
    claim, and its shard manifest stays."""
    held, live = [], []
    try:
        for part in shard_manifests(out):
            taken = claims.claim(out, claims.run_key(part))
            if taken is None:
                live.append(part)
            else:
                held.append(taken)
        fold_finished_shards(out, live)
    finally:
        for taken in held:
            taken.release()
        claims.release_all(out)


def _claim_shard_manifest(out: Path, part: Path) -> claims.Claim | None:
    """Claim this job's shard manifest for as long as it runs (a whole run folding finished shards holds it
    for a moment: wait for it; another live job of the same shard holds it for good: go on, it is kept)."""
    for _ in range(50):
        taken = claims.claim(out, claims.run_key(part))
        if taken is not None:
            return taken
        time.sleep(0.1)
    return None


def _run_shard(
    plan: BatchPlan,
    generator: VolumeGenerator,
    mine: list[WorkItem],
    group: ProcessGroup,
    shard: tuple[int, int],
    observer: BatchObserver | None,
    started: float,
) -> BatchResult:
    """One shard of a sharded or multi-process run: its own manifest, merged at the end."""
    out = plan.out_dir
    manifest = out / MANIFEST_NAME
    shard_index, shard_count = shard
    index, count = shard_index * group.world + group.rank, shard_count * group.world
    part = out / shard_manifest_name(index, count)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(out, f"cannot create the folder ({e.strerror or e})") from None
    elsewhere: list[WorkItem] = []
    running = _claim_shard_manifest(out, part)
    try:
        records = run_items(
            plan, mine, generator=generator, manifest=part, observer=observer, elsewhere=elsewhere
        )
        compact_manifest(part)
        group.barrier()
        if group.is_main:
            merge_manifests(out)
            write_dataset_json(plan)
        group.barrier()
    finally:
        if running is not None:
            running.release()
        claims.release_all(out)
    dataset_json = None if plan.dataset_dir is None else plan.dataset_dir / "dataset.json"
    if group.world > 1:  # every rank reports on the whole run of its --shard group
        expected = {
            _relative(it.output, out): it
            for r in range(group.world)
            for it in select_shard(plan.items, shard_index * group.world + r, count)
        }
        merged = {rec.target: rec for rec in read_manifest(manifest) if rec.target in expected}
        records = [
            merged.get(key)
            or ItemRecord(
                output=key,
                case=it.case.id,
                sample=it.sample,
                input=str(it.case.segmentation),
                outputs=[],
                seed=it.settings.seed,
                status="failed",
                error="no record from its process",
            )
            for key, it in sorted(expected.items(), key=lambda pair: (pair[1].key, pair[0]))
        ]
    return BatchResult(
        records=records,
        seconds=time.perf_counter() - started,
        manifest=manifest,
        dataset_json=dataset_json,
        elsewhere=elsewhere,
    )
