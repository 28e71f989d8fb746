"""Batch conversion (``volgen batch``): cases, seeds, resume, failures, sharding, nnU-Net layout, dry run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner
from volumes import assert_same_geometry, make_volume, rotation

from volgen import io
from volgen.api import GenerateSettings
from volgen.batch import (
    Case,
    WorkItem,
    derive_seed,
    item_settings,
    parse_shard,
    read_cases,
    read_manifest,
    select_shard,
)
from volgen.errors import ConfigError, InputError, VolgenError

GOOD = ["a", "b", "c", "d", "e"]
FAST = ["--steps", "2", "--device", "cpu", "--progress", "none"]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each rank: outputs compare bit for bit with a 2-process run
    (CPU kernels are reproducible for a given thread count); a busy 2-core machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory) -> Path:
    """Five small segmentations in mixed formats with anisotropic, oblique geometry (one DICOM folder)."""
    folder = tmp_path_factory.mktemp("cases")
    io.write_volume(make_volume("label"), folder / "a.nii.gz")
    io.write_volume(
        make_volume("label", size=(9, 11, 5), spacing=(1.3, 0.6, 3.0), direction=rotation(0.1, 0.4, -0.3)),
        folder / "b.nrrd",
    )
    io.write_volume(
        make_volume("label", size=(8, 8, 6), n_labels=2, origin=(3.0, -7.5, 12.0)), folder / "c.mha"
    )
    io.write_volume(make_volume("label", size=(10, 9, 4)), folder / "d", format="dicom", modality="MR")
    e = make_volume("label", size=(11, 7, 6), spacing=(0.8, 1.1, 2.0))
    arr = sitk.GetArrayFromImage(e)
    arr[arr == 2] = 5  # a second source value of 'kidney'
    e2 = sitk.GetImageFromArray(arr)
    e2.CopyInformation(e)
    io.write_volume(e2, folder / "e.nii.gz")
    (folder / "notes.txt").write_text("not a segmentation\n")
    (folder / ".hidden.nii.gz").write_bytes(b"")
    (folder / "empty_subfolder").mkdir()
    return folder


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    """Inputs that must fail, one line each: float labels, a 2D image, a corrupt file."""
    folder = tmp_path_factory.mktemp("bad")
    floats = sitk.GetImageFromArray(np.full((4, 5, 6), 1.5, np.float32))
    io.write_volume(floats, folder / "float_labels.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 7), np.uint8)), str(folder / "flat.nrrd"))
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(64))
    return folder


def cli(*args: str):
    from volgen.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, ["batch", *map(str, args)], catch_exceptions=False)


def run_batch_cli(source, out, model, *extra: str):
    return cli(source, out, "--model", model, *FAST, *extra)


def voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(
        io.read_volume(path, kind="image") if path.is_dir() else sitk.ReadImage(str(path))
    )


def statuses(out: Path) -> dict[tuple[str, int], str]:
    return {r.key: r.status for r in read_manifest(out / "manifest.csv")}


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(cases_dir, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    result = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "done" in result.output and "volumes/hour" in result.output
    return out


# -------------------------------------------------------------------------------------------- pure logic


def test_folder_cases(cases_dir, tmp_path):
    cases = read_cases(cases_dir)
    assert [c.id for c in cases] == GOOD  # hidden files, notes.txt and the empty subfolder are ignored
    assert next(c for c in cases if c.id == "d").segmentation.is_dir()
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(cases_dir / "a.nii.gz", clash / "x.nii.gz")
    shutil.copy(cases_dir / "b.nrrd", clash / "X.nrrd")
    with pytest.raises(InputError, match="duplicate case id"):
        read_cases(clash)
    with pytest.raises(InputError, match="no segmentations"):
        read_cases(cases_dir / "empty_subfolder")
    with pytest.raises(InputError, match="volgen generate"):
        read_cases(cases_dir / "a.nii.gz")


def test_manifests(cases_dir, tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    csv_path = write_csv(
        sub / "m.csv",
        "segmentation,case,reference,seed,keep,strength",
        f"../{cases_dir.name}/a.nii.gz,first,,7,liver;spleen,",
        f'{cases_dir / "b.nrrd"},,{cases_dir / "a.nii.gz"},,"liver,kidney",0.5',
    )
    shutil.copytree(cases_dir, tmp_path / cases_dir.name)
    first, b = sorted(read_cases(csv_path), key=lambda c: c.id != "first")
    assert first.id == "first" and first.segmentation == sub / ".." / cases_dir.name / "a.nii.gz"
    assert first.seed == 7 and first.keep == ("liver", "spleen") and first.strength is None
    assert b.id == "b" and b.reference == cases_dir / "a.nii.gz" and b.keep == ("liver", "kidney")
    assert b.strength == 0.5
    base = GenerateSettings(seed=3, drop=["kidney"], strength=1.0)
    assert item_settings(base, first, 1).seed == 8 and item_settings(base, first, 1).drop is None
    assert (
        item_settings(base, b, 1).seed == derive_seed(3, "b", 1) and item_settings(base, b, 0).strength == 0.5
    )

    yaml_path = sub / "m.yaml"
    yaml_path.write_text(
        f"cases:\n  - segmentation: {cases_dir / 'c.mha'}\n    case: 17\n    drop: [kidney]\n"
    )
    (case,) = read_cases(yaml_path)
    assert case.id == "17" and case.drop == ("kidney",)

    bad = {
        "unknown column 'label'": ("segmentation,label", "x.nii.gz,1"),
        "duplicate case id": ("segmentation,case", "x.nii.gz,A", "y.nii.gz,a"),
        "line 3: 'seed'": ("segmentation,seed", "x.nii.gz,1", "y.nii.gz,minus one"),
        "either keep or drop": ("segmentation,keep,drop", "x.nii.gz,liver,spleen"),
        "no 'segmentation' column": ("case", "x"),
    }
    for message, lines in bad.items():
        with pytest.raises(ConfigError, match=message):
            read_cases(write_csv(tmp_path / "bad.csv", *lines))


def test_seed_derivation_is_stable_and_positional_free():
    # pinned: changing the derivation would silently change every batch output
    assert derive_seed(0, "a", 0) == 843680772
    assert derive_seed(3, "a", 0) != derive_seed(3, "b", 0) != derive_seed(3, "b", 1)
    assert derive_seed(3, "a", 0) != derive_seed(4, "a", 0)
    assert all(0 <= derive_seed(s, c, k) < 2**31 for s in (0, 99) for c in ("a", "case-17") for k in (0, 5))


def test_shards_cover_every_item_once():
    items = [
        WorkItem(
            case=Case(id=f"c{i}", segmentation=Path(f"c{i}.nii.gz")),
            sample=k,
            name="",
            settings=None,
            output=Path(),
            sidecar=Path(),
        )
        for i in range(7)
        for k in range(2)
    ]
    for count in (1, 2, 3, 5):
        shards = [select_shard(items[::-1], i, count) for i in range(count)]
        keys = [it.key for shard in shards for it in shard]
        assert sorted(keys) == sorted(it.key for it in items) and len(set(keys)) == len(keys)
        assert shards == [select_shard(items, i, count) for i in range(count)]  # input order does not matter
    assert parse_shard("1/4") == (1, 4)
    for text in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(VolgenError):
            parse_shard(text)


# ----------------------------------------------------------------------------------------------- runs


def test_full_run_keeps_geometry(full_run, cases_dir):
    records = read_manifest(full_run / "manifest.csv")
    assert [(r.case, r.status) for r in records] == [(c, "done") for c in GOOD]
    for record in records:
        source = cases_dir / Path(record.input).name
        out = full_run / f"{record.case}.nii.gz"
        assert record.outputs == [f"{record.case}.nii.gz", f"{record.case}.nii.gz.json"]
        assert_same_geometry(sitk.ReadImage(str(out)), io.read_label(source))
        sidecar = json.loads((full_run / f"{record.case}.nii.gz.json").read_text())
        assert sidecar["settings"]["seed"] == record.seed == derive_seed(3, record.case, 0)
        assert sidecar["settings"]["num_inference_steps"] == 2
    assert len({r.seed for r in records}) == len(records)


def test_output_independent_of_order_and_company(full_run, cases_dir, tiny_model_dir, tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv", "segmentation", str(cases_dir / "e.nii.gz"), str(cases_dir / "c.mha")
    )
    out = tmp_path / "alone"
    assert run_batch_cli(manifest, out, tiny_model_dir, "--seed", "3").exit_code == 0
    for case in ("c", "e"):
        assert voxels(out / f"{case}.nii.gz").tobytes() == voxels(full_run / f"{case}.nii.gz").tobytes()

    # a changed seed or number of steps redoes finished cases; the same settings skip them
    assert statuses(out) == {("c", 0): "done", ("e", 0): "done"}
    assert (
        run_batch_cli(manifest, out, tiny_model_dir, "--seed", "3", "--slice-batch-size", "3").exit_code == 0
    )
    assert set(statuses(out).values()) == {"skipped"}
    assert run_batch_cli(manifest, out, tiny_model_dir, "--seed", "4").exit_code == 0
    assert set(statuses(out).values()) == {"done"}
    assert run_batch_cli(manifest, out, tiny_model_dir, "--seed", "4", "--steps", "3").exit_code == 0
    assert set(statuses(out).values()) == {"done"}
    assert json.loads((out / "c.nii.gz.json").read_text())["settings"]["num_inference_steps"] == 3


def test_shards_merge_to_the_single_run(full_run, cases_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        assert run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3", "--shard", shard).exit_code == 0
    parts = [read_manifest(out / f"manifest.shard-00{i}-of-002.csv") for i in range(2)]
    keys = [r.key for part in parts for r in part]
    assert sorted(keys) == [(c, 0) for c in GOOD] and len(set(keys)) == len(keys)
    merged = read_manifest(out / "manifest.csv")
    single = read_manifest(full_run / "manifest.csv")
    assert [(r.case, r.seed, r.status, r.outputs) for r in merged] == [
        (r.case, r.seed, r.status, r.outputs) for r in single
    ]
    for case in GOOD:
        assert voxels(out / f"{case}.nii.gz").tobytes() == voxels(full_run / f"{case}.nii.gz").tobytes()
    (out / "manifest.csv").unlink()
    result = cli("--merge", out)
    assert result.exit_code == 0 and "5 done" in result.output
    assert [r.key for r in read_manifest(out / "manifest.csv")] == [(c, 0) for c in GOOD]


def test_resume_redoes_only_unfinished_cases(full_run, cases_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(full_run, out)
    before = {case: (out / f"{case}.nii.gz").stat().st_mtime_ns for case in GOOD}
    (out / "b.nii.gz").unlink()
    leftovers = [out / ".volgen-tmp-0123abcd.b.nii.gz", out / ".volgen-tmp-89abcdef.a.nii.gz.json"]
    for path in leftovers:
        path.write_bytes(b"half written")
    result = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert statuses(out) == {(c, 0): "done" if c == "b" else "skipped" for c in GOOD}
    assert not any(p.name.startswith(".volgen-tmp-") for p in out.iterdir())
    assert voxels(out / "b.nii.gz").tobytes() == voxels(full_run / "b.nii.gz").tobytes()
    assert all((out / f"{c}.nii.gz").stat().st_mtime_ns == before[c] for c in GOOD if c != "b")

    # a sidecar from another model or with other settings does not count as finished
    sidecar = json.loads((out / "c.nii.gz.json").read_text())
    sidecar["model"]["weights_sha256"] = "0" * 64
    (out / "c.nii.gz.json").write_text(json.dumps(sidecar))
    (out / "e.nii.gz.json").unlink()
    assert run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3").exit_code == 0
    assert [k for k, s in statuses(out).items() if s == "done"] == [("c", 0), ("e", 0)]

    # a sidecar from before --resampling was made with linear resampling: current only for --resampling linear
    sidecar = json.loads((out / "a.nii.gz.json").read_text())
    del sidecar["settings"]["resampling"]
    (out / "a.nii.gz.json").write_text(json.dumps(sidecar))
    linear = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3", "--resampling", "linear")
    assert linear.exit_code == 0 and statuses(out)[("a", 0)] == "skipped"
    assert all(s == "done" for k, s in statuses(out).items() if k != ("a", 0))
    assert run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3").exit_code == 0
    assert set(statuses(out).values()) == {"done"}
    assert json.loads((out / "a.nii.gz.json").read_text())["settings"]["resampling"] == "mask"


def test_failing_cases_are_recorded_and_the_run_goes_on(cases_dir, bad_dir, tiny_model_dir, tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv",
        "segmentation",
        str(cases_dir / "a.nii.gz"),
        *(str(p) for p in sorted(bad_dir.iterdir())),
    )
    out = tmp_path / "out"
    result = run_batch_cli(manifest, out, tiny_model_dir)
    assert result.exit_code == 1
    records = {r.case: r for r in read_manifest(out / "manifest.csv")}
    assert records["a"].status == "done"
    errors = {case: records[case].error for case in ("float_labels", "flat", "corrupt")}
    assert all(records[case].status == "failed" and not records[case].outputs for case in errors)
    assert (
        "non-integer" in errors["float_labels"] and "2D" in errors["flat"] and "corrupt" in errors["corrupt"]
    )
    assert "failed" in result.output and "float labels" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "a.nii.gz.json", "manifest.csv"]


def test_nnunet_layout(cases_dir, tiny_model_dir, tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv", "segmentation", str(cases_dir / "e.nii.gz"), str(cases_dir / "d")
    )
    out = tmp_path / "out"
    args = [
        "--layout",
        "nnunet",
        "--dataset-id",
        "7",
        "--dataset-name",
        "SynthTest",
        "--samples-per-case",
        "2",
    ]
    result = run_batch_cli(manifest, out, tiny_model_dir, *args)
    assert result.exit_code == 0, result.output
    dataset = out / "Dataset007_SynthTest"
    names = [f"{case}_s{k}" for case in ("d", "e") for k in (0, 1)]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"{n}.nii.gz" for n in names]
    assert sorted(p.name for p in (dataset / "imagesTr").glob("*.nii.gz")) == [
        f"{n}_0000.nii.gz" for n in names
    ]
    meta = json.loads((dataset / "dataset.json").read_text())
    # nnU-Net's reading of the folders: identifiers from imagesTr files with file_ending minus "_0000"
    ending = meta["file_ending"]
    image_ids = {
        p.name[: -len(ending) - 5] for p in (dataset / "imagesTr").iterdir() if p.name.endswith(ending)
    }
    assert image_ids == {p.name[: -len(ending)] for p in (dataset / "labelsTr").iterdir()} == set(names)
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"

    source = io.read_label(cases_dir / "e.nii.gz")
    src = sitk.GetArrayFromImage(source)
    label = sitk.ReadImage(str(dataset / "labelsTr" / "e_s1.nii.gz"))
    image = sitk.ReadImage(str(dataset / "imagesTr" / "e_s1_0000.nii.gz"))
    expected = np.select([src == 1, (src == 2) | (src == 5), src == 3], [1, 2, 3], 0)
    assert label.GetPixelID() == sitk.sitkUInt8 and np.array_equal(sitk.GetArrayFromImage(label), expected)
    assert_same_geometry(label, source)
    assert_same_geometry(image, label, atol=0)
    assert not np.array_equal(
        voxels(dataset / "imagesTr" / "e_s0_0000.nii.gz"), sitk.GetArrayFromImage(image)
    )
    assert run_batch_cli(manifest, out, tiny_model_dir, *args).exit_code == 0
    assert set(statuses(out).values()) == {"skipped"}
    assert json.loads((dataset / "dataset.json").read_text()) == meta


def test_dicom_output_and_resume(cases_dir, tiny_model_dir, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", "segmentation,case", f"{cases_dir / 'b.nrrd'},bee")
    out = tmp_path / "out"
    result = run_batch_cli(manifest, out, tiny_model_dir, "--format", "dicom", "--progress", "json")
    assert result.exit_code == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert (
        progress[-1]["slices_done"] == progress[-1]["slices_total"] == 2 * 5 and progress[-1]["case"] == "bee"
    )
    assert events[-2]["event"] == "case_done" and events[-2]["outputs"] == ["bee", "bee.json"]
    assert (out / "bee").is_dir() and (out / "bee.json").is_file()
    assert_same_geometry(io.read_image(out / "bee"), io.read_label(cases_dir / "b.nrrd"), atol=1e-6)
    (out / ".volgen-tmp-0123abcd.bee").mkdir()  # atomic_directory's temporary folders after a kill -9
    (out / ".volgen-tmp-4567cdef-old.bee").mkdir()
    result = run_batch_cli(manifest, out, tiny_model_dir, "--format", "dicom", "--progress", "json")
    assert result.exit_code == 0
    assert statuses(out) == {("bee", 0): "skipped"}
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["batch_start", "case_start", "case_done", "summary"]
    assert events[2]["status"] == "skipped" and events[3]["skipped"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["bee", "bee.json", "manifest.csv"]


def test_dry_run_writes_nothing(full_run, cases_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    result = run_batch_cli(cases_dir, out, tiny_model_dir, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not out.exists()
    assert all(case in result.output for case in GOOD) and "time model: measured" in result.output

    listing = {p: p.stat().st_mtime_ns for p in full_run.iterdir()}
    result = cli(
        cases_dir,
        full_run,
        "--model",
        tiny_model_dir,
        "--steps",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--dry-run",
        "--progress",
        "json",
    )
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    plans = [e for e in events if e["event"] == "plan"]
    assert [p["case"] for p in plans] == GOOD and {p["state"] for p in plans} == {"complete (skip)"}
    assert all(
        p["slices"] > 0 and p["slice_forwards"] >= 2 * p["slices"] and p["peak_bytes"] > 0 for p in plans
    )
    assert {p: p.stat().st_mtime_ns for p in full_run.iterdir()} == listing


def test_bad_options(cases_dir, tiny_model_dir, tmp_path):
    result = run_batch_cli(cases_dir, cases_dir, tiny_model_dir)
    assert result.exit_code == 1 and "input folder" in result.output
    result = run_batch_cli(cases_dir, tmp_path / "o", tiny_model_dir, "--strength", "0.5")
    assert result.exit_code == 1 and "reference" in result.output
    result = run_batch_cli(cases_dir, tmp_path / "o", tiny_model_dir, "--layout", "nnunet")
    assert result.exit_code == 1 and "--dataset-id" in result.output
    result = run_batch_cli(cases_dir, tmp_path / "o", tiny_model_dir, "--keep", "brain")
    assert result.exit_code == 1 and "unknown class 'brain'" in result.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- more processes


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_two_processes_match_one(full_run, cases_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [  # torchrun of this interpreter (a `torchrun` on PATH may belong to another Python)
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "volgen",
        "batch",
        str(cases_dir),
        str(out),
        "--model",
        str(tiny_model_dir),
        "--seed",
        "3",
        *FAST,
    ]
    proc = subprocess.run(
        command, env=_subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    parts = [read_manifest(out / f"manifest.shard-00{i}-of-002.csv") for i in range(2)]
    assert all(parts)
    keys = [r.key for part in parts for r in part]
    assert sorted(keys) == [(c, 0) for c in GOOD] and len(set(keys)) == len(keys)
    assert statuses(out) == {(c, 0): "done" for c in GOOD}

    for case in GOOD:  # full_run ran in this process, with one thread like each torchrun rank
        assert voxels(out / f"{case}.nii.gz").tobytes() == voxels(full_run / f"{case}.nii.gz").tobytes()


def _interrupt(command: list[str], out: Path, sig: int, ready) -> tuple[int, dict[tuple[str, int], str]]:
    """Run a batch subprocess, send ``sig`` once ``ready(statuses)`` holds; return exit code and statuses."""
    proc = subprocess.Popen(
        command, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.csv").is_file() and ready(statuses(out)):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    return code, statuses(out) if (out / "manifest.csv").is_file() else {}


def test_sigterm_and_kill_9_then_resume(cases_dir, tiny_model_dir, tmp_path):
    n = 24  # enough cases that a run is still busy when the signal lands, even on a fast machine
    manifest = write_csv(
        tmp_path / "m.csv", "segmentation,case", *(f"{cases_dir / 'a.nii.gz'},x{i:02d}" for i in range(n))
    )
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "volgen",
        "batch",
        str(manifest),
        str(out),
        "--model",
        str(tiny_model_dir),
    ]
    command += ["--steps", "20", "--device", "cpu", "--progress", "none"]

    # SIGTERM unwinds like Ctrl-C: exit code 130, no temporary files left
    code, first = _interrupt(command, out, signal.SIGTERM, lambda st: len(st) >= 2)
    assert code == 130 and 0 < len(first) < n, (code, first)
    assert not any(p.name.startswith(".volgen-tmp-") for p in out.iterdir())

    # kill -9 once the second run has generated something: whatever has a final name is a complete volume
    def generated_something(st):  # the first run's rows stay until the second run gets to their items
        return all(st.get(key) == "skipped" for key in first) and "done" in (
            status for key, status in st.items() if key not in first
        )

    code, second = _interrupt(command, out, signal.SIGKILL, generated_something)
    assert code == -signal.SIGKILL
    assert all(second[key] == "skipped" for key in first) and 0 < len(second) < n, (first, second)
    for path in out.glob("x*.nii.gz"):
        assert voxels(path).shape == (7, 10, 12)

    result = run_batch_cli(manifest, out, tiny_model_dir, "--steps", "20")
    assert result.exit_code == 0, result.output
    third = statuses(out)
    assert len(third) == n
    finished = {key for st in (first, second) for key, status in st.items() if status == "done"}
    assert all(
        third[key] == ("skipped" if key in finished else "done") for key in third
    )  # nothing done twice
    assert not any(p.name.startswith(".volgen-tmp-") for p in out.iterdir())


def test_one_generator_per_process_and_each_segmentation_read_once(
    cases_dir, tiny_model_dir, tmp_path, monkeypatch
):
    """Issue 14: the model is set up once for all items, and each item reads its segmentation once (the
    nnU-Net label file is made from the same image)."""
    from volgen.generation import VolumeGenerator

    made, reads = [], []
    original_init, original_read = VolumeGenerator.__init__, io.read_label

    def counting_init(self, *args, **kwargs):
        made.append(1)
        original_init(self, *args, **kwargs)

    def counting_read(path, *args, **kwargs):
        reads.append(Path(path).name)
        return original_read(path, *args, **kwargs)

    monkeypatch.setattr(VolumeGenerator, "__init__", counting_init)
    monkeypatch.setattr(io, "read_label", counting_read)
    out = tmp_path / "out"
    extra = ["--layout", "nnunet", "--dataset-id", "8", "--dataset-name", "Once"]
    result = run_batch_cli(cases_dir, out, tiny_model_dir, *extra)
    assert result.exit_code == 0, result.output
    assert len(made) == 1
    assert len(reads) == len(set(reads)) == len(GOOD), reads  # one read per case
    assert len(list((out / "Dataset008_Once" / "labelsTr").iterdir())) == len(GOOD)


# ------------------------------------------------------------------- faults of the hidden corpus (issue 25)


def test_a_lone_shard_after_a_whole_run_keeps_every_row(full_run, cases_dir, tiny_model_dir, tmp_path):
    """The shard's merge starts from manifest.csv: rows of the items of other shards do not vanish."""
    out = tmp_path / "mixed"
    shutil.copytree(full_run, out)
    result = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3", "--shard", "0/2")
    assert result.exit_code == 0, result.output
    shard0 = {"a", "c", "e"}  # items sorted by (case, sample), dealt round-robin
    assert statuses(out) == {(c, 0): "skipped" if c in shard0 else "done" for c in GOOD}


def test_a_whole_run_keeps_the_shard_manifest_of_a_running_job(full_run, cases_dir, tiny_model_dir, tmp_path):
    """An unsharded rerun removes the shard manifests of finished jobs (their rows folded into manifest.csv,
    none lost) but not the one of a job still running (it holds its claim)."""
    from volgen.batch import claims
    from volgen.batch.records import ItemRecord, append_record

    out = tmp_path / "running"
    shutil.copytree(full_run, out)
    running, finished = out / "manifest.shard-001-of-002.csv", out / "manifest.shard-000-of-003.csv"
    other = ItemRecord(
        case="z", sample=0, input="z.nii.gz", outputs=[], seed=1, status="failed", output="z.nii.gz"
    )
    append_record(running, other)
    append_record(finished, other)
    before = running.read_bytes()
    held = claims.claim(out, claims.run_key(running))  # as the running shard job holds it
    try:
        result = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3")
    finally:
        held.release()
    assert result.exit_code == 0, result.output
    assert running.read_bytes() == before
    assert not finished.exists()
    assert statuses(out) == {**{(c, 0): "skipped" for c in GOOD}, ("z", 0): "failed"}


def test_two_nnunet_datasets_built_into_one_folder_at_once(cases_dir, tiny_model_dir, tmp_path):
    """Claims and rows are keyed by the output: a second dataset built while the first holds its claim on
    case 'a' still makes its own 'a' (it used to leave it to the other run and count one case too few)."""
    from volgen.batch import BatchObserver, BatchOptions, run_batch

    manifest = write_csv(
        tmp_path / "m.csv", "segmentation", str(cases_dir / "a.nii.gz"), str(cases_dir / "c.mha")
    )
    out = tmp_path / "nnUNet_raw"

    def options(dataset_id: int, name: str) -> BatchOptions:
        settings = GenerateSettings(num_inference_steps=2)
        return BatchOptions(
            model=tiny_model_dir, settings=settings, layout="nnunet", dataset_id=dataset_id,
            dataset_name=name, device="cpu",
        )  # fmt: skip

    second = []

    class SecondRunMeanwhile(BatchObserver):
        def item_started(self, item, index, count):
            if not second:  # the first run holds the claim of its item 'a' now
                second.append(run_batch(manifest, out, options(2, "Two")))

    first = run_batch(manifest, out, options(1, "One"), observer=SecondRunMeanwhile())
    for result, dataset in ((first, "Dataset001_One"), (second[0], "Dataset002_Two")):
        assert result.ok and not result.elsewhere
        assert json.loads((out / dataset / "dataset.json").read_text())["numTraining"] == 2
    rows = read_manifest(out / "manifest.csv")
    assert sorted(r.output for r in rows) == [
        f"Dataset00{i}_{n}/imagesTr/{c}_0000.nii.gz" for i, n in ((1, "One"), (2, "Two")) for c in "ac"
    ]
    assert {r.status for r in rows} == {"done"}


def test_an_append_after_a_torn_row_starts_on_a_new_line(tmp_path, caplog):
    """A row cut by a full disk or power loss (also in the header of the first append) is skipped with a
    warning; the next append starts on a new line, so its row is whole."""
    from dataclasses import replace

    from volgen.batch.records import ItemRecord, append_record

    path = tmp_path / "manifest.csv"
    row = ItemRecord(
        case="a", sample=0, input="a.nii.gz", outputs=["a.nii.gz", "a.nii.gz.json"], seed=1,
        status="done", output="a.nii.gz",
    )  # fmt: skip
    append_record(path, row)
    path.write_bytes(path.read_bytes() + b"b,0,b.nii.gz,b.nii.gz,b.ni")
    append_record(path, replace(row, case="c", output="c.nii.gz"))
    with caplog.at_level("WARNING", logger="volgen.batch"):
        assert [r.case for r in read_manifest(path)] == ["a", "c"]
    assert "line 3: skipped a row cut short" in caplog.text

    path.write_bytes(path.read_bytes() + b'd,0,d.nii.gz,"/data/a, b/d.ni')  # cut in a quoted cell
    append_record(path, replace(row, case="e", output="e.nii.gz"))
    assert [r.case for r in read_manifest(path)] == ["a", "c", "e"]

    path.write_bytes(b"case,sample,out")  # the first append was cut in its header
    append_record(path, row)
    assert [r.case for r in read_manifest(path)] == ["a"]


@pytest.mark.parametrize("damage", ["torn", "spreadsheet"])
def test_a_damaged_run_manifest_heals(damage, full_run, cases_dir, tiny_model_dir, tmp_path):
    """manifest.csv cut mid-row, or re-saved by a spreadsheet (byte order mark, CRLF): the next run resumes
    and exits 0 (it used to do its work and then fail with "not a volgen batch manifest")."""
    out = tmp_path / damage
    shutil.copytree(full_run, out)
    manifest = out / "manifest.csv"
    text = manifest.read_text(encoding="utf-8")
    if damage == "torn":
        manifest.write_text(text + "b,0,b.nii.gz,/data/b.nrrd,b.nii", encoding="utf-8")
    else:
        manifest.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    (out / "b.nii.gz").unlink()
    result = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert statuses(out) == {(c, 0): "done" if c == "b" else "skipped" for c in GOOD}


def test_resume_does_not_open_a_sidecar_that_is_a_named_pipe(full_run, cases_dir, tiny_model_dir, tmp_path):
    """A sidecar replaced by a FIFO is checked by stat, never opened (opening it blocks forever)."""
    import threading

    from volgen.batch.resume import unfinished_reason

    out = tmp_path / "fifo"
    shutil.copytree(full_run, out)
    sidecar = out / "a.nii.gz.json"
    sidecar.unlink()
    os.mkfifo(sidecar)
    item = WorkItem(
        case=Case("a", cases_dir / "a.nii.gz"), sample=0, name="a",
        settings=GenerateSettings(seed=3), output=out / "a.nii.gz", sidecar=sidecar,
    )  # fmt: skip
    reasons = []
    worker = threading.Thread(
        target=lambda: reasons.append(unfinished_reason(item, weights_sha256="x", output_format="nifti")),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=20)
    assert reasons == ["unreadable sidecar"]  # not hanging
    result = run_batch_cli(cases_dir, out, tiny_model_dir, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert statuses(out) == {(c, 0): "done" if c == "a" else "skipped" for c in GOOD}
    assert sidecar.is_file()  # like a damaged sidecar: the item is made again, with a sidecar


def test_a_run_manifest_that_is_a_named_pipe_is_refused_not_fed(tmp_path):
    """Rows appended to a FIFO would vanish (or block once its buffer is full): refused by stat."""
    from volgen.batch.records import ItemRecord, append_record
    from volgen.errors import OutputError

    path = tmp_path / "manifest.csv"
    os.mkfifo(path)
    row = ItemRecord(
        case="a", sample=0, input="a.nii.gz", outputs=[], seed=1, status="failed", output="a.nii.gz"
    )
    with pytest.raises(OutputError, match="manifest.csv: is not a regular file"):
        append_record(path, row)
