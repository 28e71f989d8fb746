"""Batch conversion: a folder or manifest of segmentations into synthetic volumes, resumable, sharded and safe
to run several times at once on one output folder.

``volgen batch INPUT OUT_DIR`` generates one volume per work item (a case and a sample index). The modules,
one job each:

- :mod:`~volgen.batch.cases`: **cases** from a folder (every segmentation file, every subfolder holding DICOM
  files) or a CSV/YAML manifest (read by :func:`volgen.io.manifest.read_rows`; segmentation path, optional
  case id, reference and per-case ``seed``, ``keep``, ``drop``, ``strength``; relative paths are relative to
  the manifest). Case ids name the outputs, so they are unique (also ignoring case).
- :mod:`~volgen.batch.plan`: **work items**, their **seeds** (from the base seed and the case id, never from a
  position: :func:`derive_seed`), output paths (``flat``: ``OUT_DIR/CASE.nii.gz`` + ``CASE.json``; ``nnunet``:
  an nnU-Net v2 raw dataset) and **shards** (items sorted by (case, sample) dealt round-robin; ``--shard i/n``
  combined with the rank of an accelerate/torchrun group). Outputs are checked against the inputs,
  references, manifest and model folder with resolved paths (:func:`volgen.io.paths.overlap`).
- :mod:`~volgen.batch.resume`: an item is **skipped** when its outputs and sidecar exist and the sidecar
  records the same model weights, settings, output format and input contents.
- :mod:`~volgen.batch.claims`: **concurrency**: each item is claimed (a locked file in
  ``OUT_DIR/.volgen-claims``, keyed by the item's output path) before it is worked on, so runs and shards
  sharing a folder generate each item once; a dead run's claims are taken over.
- :mod:`~volgen.batch.records`: the **manifest**: one row appended per item, keyed by its output; the last row
  of an item wins; torn rows are skipped; compacted once at the end; shard manifests merged into
  ``manifest.csv`` (whose rows stay).
- :mod:`~volgen.batch.nnunet`: the nnU-Net layout (label files, ``dataset.json``).
- :mod:`~volgen.batch.runner`: the run itself; one failing item is recorded and the run goes on.
- :mod:`~volgen.batch.dryrun`: the dry run: items, states, time and honest peak memory, from headers only.
- :mod:`~volgen.batch.group`: the torchrun/accelerate process group.

Library code: it logs and reports through a :class:`BatchObserver`, it never prints.
"""

from __future__ import annotations

from volgen.batch.cases import Case, ManifestEntry, case_id_for, read_cases
from volgen.batch.claims import CLAIMS_FOLDER, claim
from volgen.batch.dryrun import (
    ItemEstimate,
    TimeModel,
    estimate_plan,
    measure_time_model,
    total_seconds,
)
from volgen.batch.group import BARRIER_TIMEOUT, ProcessGroup, process_group
from volgen.batch.nnunet import (
    count_training_cases,
    nnunet_dataset_json,
    refresh_dataset_json,
    write_dataset_json,
)
from volgen.batch.plan import (
    LAYOUTS,
    MAX_ITEMS,
    MAX_SAMPLES_PER_CASE,
    BatchOptions,
    BatchPlan,
    WorkItem,
    derive_seed,
    item_settings,
    parse_shard,
    plan_batch,
    select_shard,
)
from volgen.batch.records import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    STATUSES,
    ItemRecord,
    append_record,
    compact_manifest,
    merge_manifests,
    read_manifest,
    shard_manifest_name,
    shard_manifests,
    write_manifest,
)
from volgen.batch.resume import unfinished_reason
from volgen.batch.runner import BatchObserver, BatchResult, make_generator, prepare, run_batch, run_items
from volgen.io.naming import FORMAT_ENDINGS

__all__ = [
    "BARRIER_TIMEOUT",
    "CLAIMS_FOLDER",
    "FORMAT_ENDINGS",
    "LAYOUTS",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "MAX_ITEMS",
    "MAX_SAMPLES_PER_CASE",
    "STATUSES",
    "BatchObserver",
    "BatchOptions",
    "BatchPlan",
    "BatchResult",
    "Case",
    "ItemEstimate",
    "ItemRecord",
    "ManifestEntry",
    "ProcessGroup",
    "TimeModel",
    "WorkItem",
    "append_record",
    "case_id_for",
    "claim",
    "compact_manifest",
    "count_training_cases",
    "derive_seed",
    "estimate_plan",
    "item_settings",
    "make_generator",
    "measure_time_model",
    "merge_manifests",
    "nnunet_dataset_json",
    "parse_shard",
    "plan_batch",
    "prepare",
    "process_group",
    "read_cases",
    "read_manifest",
    "refresh_dataset_json",
    "run_batch",
    "run_items",
    "select_shard",
    "shard_manifest_name",
    "shard_manifests",
    "total_seconds",
    "unfinished_reason",
    "write_dataset_json",
    "write_manifest",
]
