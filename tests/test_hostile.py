"""Hostile inputs through the CLI: one clear line, exit 1, no traceback, nothing written; resource limits;
property-based round trips of geometry (NRRD, MetaImage) and label remapping.

The corpus itself lives in ``tests/hostile`` (one builder per case); ``docs/reliability.md`` lists it.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import typer
from click.testing import CliRunner
from hostile import CORPUS, Hostile, Workspace, billion_laughs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volumes import assert_same_geometry, make_volume

from volgen import io
from volgen.cli.app import _register, app
from volgen.errors import LabelError
from volgen.labels import LabelMap

_register()

INPUTS = {
    "segmentation",
    "dicom",
    "reference",
    "training manifest",
    "batch manifest",
    "label map",
    "config",
    "model",
    "batch options",
    "output",
}


COMMAND = typer.main.get_command(app)  # built once: the corpus runs the CLI ~60 times


def invoke(*args: object):
    return CliRunner().invoke(COMMAND, [str(a) for a in args])


def one_error_line(result) -> str:
    """The single line a failed command printed (stdout and stderr together), checked for the basics."""
    assert isinstance(result.exception, SystemExit), result.exc_info  # handled, not a crash
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def nothing_written(paths: list[Path]) -> bool:
    return all(not p.exists() or (p.is_dir() and not any(p.iterdir())) for p in paths)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): its kind and, for regular files, size and SHA-256.
    Special files (FIFOs) are listed by kind only: they are never opened."""
    import hashlib
    import stat as st

    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            key = str(path.relative_to(root))
            if st.S_ISREG(info.st_mode):
                found[key] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            elif st.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path))
            else:
                found[key] = (st.S_IFMT(info.st_mode),)
    return found


@pytest.fixture
def workspace(tmp_path, tiny_model_dir) -> Workspace:
    return Workspace(tmp_path, tiny_model_dir)


# ------------------------------------------------------------------------------------------------ corpus


def test_the_corpus_covers_every_input() -> None:
    assert len(CORPUS) >= 30
    assert {c.input for c in CORPUS} == INPUTS
    assert len({c.id for c in CORPUS}) == len(CORPUS)


def test_the_documentation_lists_every_case() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [c.id for c in CORPUS if f"| `{c.id}` |" not in text]
    assert not missing, f"add these cases to docs/reliability.md: {missing}"


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_hostile_input_gives_one_clear_line(case: Hostile, workspace: Workspace) -> None:
    invocation = case.build(workspace)
    before = snapshot(workspace.root)
    started = time.monotonic()
    result = invoke(*invocation.args)
    line = one_error_line(result)
    assert invocation.names in line, f"the line does not name the input: {line}"
    assert case.expect in line, line
    assert nothing_written(invocation.untouched), sorted(map(str, invocation.untouched))
    # no input or unrelated file is removed or changed; at most empty output folders appear
    after = snapshot(workspace.root)
    assert {k: v for k, v in before.items() if after.get(k) != v} == {}
    created = sorted(after.keys() - before.keys())
    assert all(after[k] == (stat.S_IFDIR,) for k in created), created
    assert not (workspace.root / "pwned").exists()  # no YAML tag ran code
    assert time.monotonic() - started < 30  # refused, not ground through


def test_an_all_background_segmentation_generates(workspace: Workspace) -> None:
    """Decision: a mask without anatomy is legitimate (mask ablation trains the model on empty conditions,
    and batch conversion meets cases whose field of view misses every organ), so it generates an image."""
    empty = sitk.Image(make_volume("label"))
    empty = sitk.Multiply(empty, 0)
    seg = workspace.write(empty, "empty.nii.gz")
    out = workspace.out / "syn.nii.gz"
    result = invoke(*workspace.generate(seg).args)
    assert result.exit_code == 0, result.output
    generated = sitk.ReadImage(str(out))
    assert_same_geometry(generated, empty)
    assert np.isfinite(sitk.GetArrayViewFromImage(generated)).all()
    assert (workspace.out / "syn.nii.gz.json").is_file()


def test_batch_manifest_paths_may_leave_its_folder_but_outputs_never_do(workspace: Workspace) -> None:
    """Decision: relative manifest paths are relative to the manifest and may use ``..`` (a manifest in
    ``splits/`` naming ``../labels/x.nii.gz`` is the common layout); inputs are only ever read. A path to a
    file that is not a volume fails that case (recorded in manifest.csv), and outputs are named by validated
    case ids, so nothing is written outside OUT_DIR."""
    escape = "../" * 40 + "etc/passwd"
    manifest = workspace.text("cases.csv", f"segmentation\n{escape}\n")
    out = workspace.root / "batch-out"
    before = set(workspace.root.iterdir())
    result = invoke(*workspace.batch(manifest).args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (row,) = (out / "manifest.csv").read_text().splitlines()[1:]
    assert ",failed," in row and "etc/passwd" in row and "unknown file type" in row, row
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv"]
    assert set(workspace.root.iterdir()) == before | {out}


def test_batch_folder_with_hostile_file_names(workspace: Workspace) -> None:
    """A folder with a name that is not UTF-8 and one with [rich markup]: each case fails on its own, recorded
    and shown by name; the good case is converted."""
    from hostile import non_utf8_name

    folder = workspace.root / "cases"
    folder.mkdir()
    io.write_volume(make_volume("label"), folder / "good.nii.gz")
    io.write_volume(make_volume("label"), folder / "bad.nii.gz")
    (folder / "bad.nii.gz").rename(folder / non_utf8_name("bad_", ".nii.gz"))
    (folder / "x[bold].nii.gz").write_bytes(b"\x1f\x8b" + bytes(50))
    out = workspace.root / "batch-out"
    args = workspace.batch(folder).args
    result = invoke(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "x[bold].nii.gz" in result.output.replace("\n", "")  # shown, not taken for markup
    manifest = (out / "manifest.csv").read_text(encoding="utf-8")
    assert "bad_\\xff.nii.gz: path is not valid UTF-8" in manifest
    assert "x[bold].nii.gz: corrupt gzip data" in manifest
    assert manifest.count(",failed,") == 2 and manifest.count(",done,") == 1
    assert (out / "good.nii.gz").is_file()


def test_model_folder_with_symlink_loops_loads(workspace: Workspace) -> None:
    """Symbolic-link loops inside a model folder do not hang the pickle scan (links are not followed)."""
    from volgen.models import load_model

    model = workspace.model_copy()
    (model / "unet" / "up").symlink_to("..")
    (model / "loop1").symlink_to("loop2")
    (model / "loop2").symlink_to("loop1")
    assert load_model(model).metadata.name == "tiny-test"


def test_yaml_bomb_is_refused_quickly_in_little_memory(tmp_path: Path) -> None:
    """A 9^12-string billion-laughs manifest, through the real CLI in a fresh process: refused in seconds,
    without the memory growing (expanded, it would need terabytes)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs(levels=12) + "cases: *a11\n", encoding="utf-8")
    status = tmp_path / "status.txt"
    # the peak resident memory of the volgen process itself (VmHWM after exec; ru_maxrss would include the
    # forked pytest process), written when it exits
    wrapper = (
        "import atexit, runpy, sys; "
        f"atexit.register(lambda: open({str(status)!r}, 'w').write(open('/proc/self/status').read())); "
        "sys.argv = ['volgen', *sys.argv[1:]]; runpy.run_module('volgen', run_name='__main__')"
    )
    command = [sys.executable, "-c", wrapper, "batch", str(bomb), str(tmp_path / "out")]
    command += ["--model", str(tmp_path / "no-model"), "--progress", "none"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "YAML bomb" in lines[0] and "bomb.yaml" in lines[0], done.stderr
    (peak,) = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    peak_mib = int(peak) / 1024
    assert peak_mib < 400, f"peak memory {peak_mib:.0f} MiB"
    assert seconds < 60, f"{seconds:.1f} s"  # mostly interpreter start-up on a loaded machine
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ resource limits


@pytest.fixture
def no_sampling(monkeypatch):
    """Make any call of the sampling pipeline fail the test: refusals must come before it allocates."""
    from volgen.pipeline import SegmentationToVolumePipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(SegmentationToVolumePipeline, "__call__", refuse)


def test_max_memory_refuses_before_the_pipeline_allocates(workspace: Workspace, no_sampling) -> None:
    seg = workspace.write(make_volume("label", size=(300, 300, 64)), "big.nii.gz")
    line = one_error_line(invoke(*workspace.generate(seg, "--max-memory", "64M").args))
    assert "big.nii.gz" in line and "above the limit of 0.06 GiB" in line and "--max-memory" in line
    assert nothing_written([workspace.out])


def test_default_memory_limit_is_a_fraction_of_what_is_available(
    workspace: Workspace, no_sampling, monkeypatch
) -> None:
    monkeypatch.setattr("volgen.memory.available_memory", lambda device: 100 * 2**20)  # its one home
    seg = workspace.write(make_volume("label", size=(300, 300, 64)), "big.nii.gz")
    line = one_error_line(invoke(*workspace.generate(seg).args))
    assert "above the limit of 0.08 GiB" in line  # 80% of 100 MiB
    assert nothing_written([workspace.out])


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["itk-error", "oserror", "sidecar", "dicom"])
def test_disk_full_while_writing_leaves_nothing(where: str, workspace: Workspace, monkeypatch) -> None:
    """The disk fills up half-way through a write: one line, and no partial (or orphaned) output."""
    import pathlib

    import pydicom

    real_write_image = sitk.WriteImage
    real_write_text = pathlib.Path.write_text
    real_save_as = pydicom.dataset.Dataset.save_as
    saved = []

    def half_written_then_full(image, path, *args):
        real_write_image(image, path, *args)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        if where == "itk-error":
            raise RuntimeError(
                "Exception thrown in SimpleITK ImageFileWriter_Execute: No space left on device"
            )
        _no_space()

    def sidecar_full(self, data, *args, **kwargs):
        if self.name.endswith(".json"):
            real_write_text(self, data[:10], *args, **kwargs)
            _no_space()
        return real_write_text(self, data, *args, **kwargs)

    def third_slice_full(self, filename, *args, **kwargs):
        saved.append(filename)
        if len(saved) == 3:
            Path(filename).write_bytes(b"DICM")
            _no_space()
        return real_save_as(self, filename, *args, **kwargs)

    invocation = workspace.generate(workspace.good_segmentation())
    extra: list[str] = []
    if where in ("itk-error", "oserror"):
        monkeypatch.setattr(sitk, "WriteImage", half_written_then_full)
    elif where == "sidecar":
        monkeypatch.setattr(pathlib.Path, "write_text", sidecar_full)
    else:
        monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", third_slice_full)
    if where == "dicom":
        invocation.args[3] = str(workspace.out / "series")
        extra = ["--format", "dicom"]
    line = one_error_line(invoke(*invocation.args, *extra))
    expected = {
        "itk-error": "syn.nii.gz: could not write the nifti file",
        "oserror": "syn.nii.gz: could not write the file (No space left on device)",
        "sidecar": "syn.nii.gz.json: could not write the file (No space left on device)",
        "dicom": "series: could not write DICOM files: No space left on device",
    }[where]
    assert expected in line, line
    assert list(workspace.out.iterdir()) == []  # no output, no sidecar, no temporary file


# --------------------------------------------------------------------------------------- property tests

PROPERTIES = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _direction(quaternion: tuple[float, ...], flip: bool) -> np.ndarray:
    w, x, y, z = np.asarray(quaternion) / np.linalg.norm(quaternion)
    direction = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    if flip:
        direction[:, 2] *= -1
    return direction


@PROPERTIES
@given(
    extension=st.sampled_from([".nrrd", ".mha", ".seg.nrrd", ".mhd"]),
    kind=st.sampled_from(["label", "image", "ct"]),
    size=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 5)),  # volgen reads >= 2 per axis
    spacing=st.tuples(*[st.floats(0.05, 8.0)] * 3),
    origin=st.tuples(*[st.floats(-500.0, 500.0)] * 3),
    quaternion=st.tuples(*[st.floats(-1.0, 1.0)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1),
    flip=st.booleans(),
)
def test_nrrd_and_metaimage_round_trip_geometry_and_values(
    tmp_path: Path, extension, kind, size, spacing, origin, quaternion, flip
) -> None:
    """NRRD and MetaImage keep geometry to 1e-9 mm (NIfTI's float32 round trip is in test_io) and values
    bit for bit, for any size, spacing, origin and (also left-handed) direction."""
    image = make_volume(
        kind, size=size, spacing=spacing, origin=origin, direction=_direction(quaternion, flip).ravel()
    )
    path = tmp_path / f"prop{extension}"
    io.write_volume(image, path, overwrite=True)
    back = io.read_volume(path, kind="label" if kind == "label" else "image")
    assert_same_geometry(back, image, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


@st.composite
def label_maps(draw) -> LabelMap:
    values = draw(st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=12, unique=True))
    background, rest = values[:1], values[1:]
    count = draw(st.integers(1, len(rest)))
    groups: list[list[int]] = [[] for _ in range(count)]
    for i, value in enumerate(rest):
        groups[i % count if i < count else draw(st.integers(0, count - 1))].append(value)
    return LabelMap(name="prop", background=background, classes={f"c{i}": g for i, g in enumerate(groups)})


@PROPERTIES
@given(label_map=label_maps(), data=st.data())
def test_label_remapping_round_trips_through_a_file(tmp_path: Path, label_map: LabelMap, data) -> None:
    """Source values -> file -> read -> class indices: every voxel gets the class its value belongs to;
    unknown values are refused (or become background when asked), whatever the values are."""
    table = label_map.value_to_class()
    known = sorted(table)
    unknown = data.draw(st.sets(st.integers(0, 2**32 - 1).filter(lambda v: v not in table), max_size=2))
    pool = known + sorted(unknown)
    voxels = np.array(data.draw(st.lists(st.sampled_from(pool), min_size=24, max_size=24)), dtype=np.uint32)
    image = sitk.GetImageFromArray(voxels.reshape(2, 3, 4))
    path = tmp_path / "labels.nrrd"
    io.write_volume(image, path, overwrite=True)
    read = sitk.GetArrayFromImage(io.read_label(path))
    np.testing.assert_array_equal(read.ravel(), voxels)

    if unknown & set(voxels.tolist()):
        with pytest.raises(LabelError, match="unknown to label map"):
            label_map.remap(read, source=path)
    classes = label_map.remap(read, unknown="background", source=path)
    expected = np.array([table.get(int(v), 0) for v in voxels])
    np.testing.assert_array_equal(classes.ravel(), expected)
    assert classes.dtype == np.uint8 and classes.max() < label_map.num_classes
    # back from class indices: each voxel's source value is one of its class's values
    for value, index in zip(voxels, classes.ravel(), strict=True):
        allowed = label_map.background if index == 0 else label_map.classes[label_map.class_names[index]]
        assert int(value) in allowed or int(value) in unknown


# ------------------------------------------------------------- batch faults of the hidden corpus (issue 25)


def test_batch_folder_dead_links_and_link_loops_are_failed_cases(workspace: Workspace) -> None:
    """An entry that is a dead link (an unmounted share) or a loop of links is a failed case - a row, a
    line, exit 1 - not a silent skip with exit 0."""
    folder = workspace.root / "cases"
    folder.mkdir()
    io.write_volume(make_volume("label"), folder / "good.nii.gz")
    (folder / "share").symlink_to(workspace.root / "unmounted" / "patient7")
    (folder / "loop1.nii.gz").symlink_to("loop2.nii.gz")
    (folder / "loop2.nii.gz").symlink_to("loop1.nii.gz")
    out = workspace.root / "batch-out"
    result = invoke(*workspace.batch(folder).args)
    assert isinstance(result.exception, SystemExit), result.exc_info  # handled, not a crash
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    from volgen.batch import read_manifest

    records = {r.case: r for r in read_manifest(out / "manifest.csv")}
    assert records["good"].status == "done"
    for case in ("share", "loop1", "loop2"):
        assert records[case].status == "failed", records[case]
        assert "symbolic link that leads nowhere" in records[case].error
        assert f"failed {case}" in result.output


def test_batch_case_name_too_long_for_a_claim_file_fails_that_case_alone(workspace: Workspace) -> None:
    """A valid case whose file name (255 bytes) leaves no room for its claim (``<case id>.claim``, 257 bytes)
    or output: that case fails, recorded; the others are done (the batch used to die with a traceback)."""
    folder = workspace.root / "cases"
    folder.mkdir()
    io.write_volume(make_volume("label"), folder / "good.nii.gz")
    long = "x" * 251
    sitk.WriteImage(make_volume("label"), str(folder / f"{long}.mha"))
    out = workspace.root / "batch-out"
    result = invoke(*workspace.batch(folder).args)
    assert isinstance(result.exception, SystemExit), result.exc_info  # handled, not a crash
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    from volgen.batch import read_manifest

    records = {r.case: r for r in read_manifest(out / "manifest.csv")}
    assert records["good"].status == "done" and records[long].status == "failed"
    assert "too long" in records[long].error.lower(), records[long].error
    assert not any(p.name.startswith(long[:20]) for p in out.iterdir())


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_batch_out_dir_read_only_or_full_is_one_line(code: int, workspace: Workspace, monkeypatch) -> None:
    """The claim folder cannot be made (a read-only OUT_DIR, a full disk): one line, exit 1, no traceback.
    (Simulated: the tests may run as root, whom a read-only mode does not stop.)"""
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == ".volgen-claims":
            raise OSError(code, os.strerror(code))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    folder = workspace.root / "cases"
    folder.mkdir()
    io.write_volume(make_volume("label"), folder / "a.nii.gz")
    line = one_error_line(invoke(*workspace.batch(folder).args))
    assert (
        f"batch-out/.volgen-claims: cannot make claim files in the output folder ({os.strerror(code)})"
        in line
    )
    assert nothing_written([workspace.root / "batch-out"])
