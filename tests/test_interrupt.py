"""Interruption: Ctrl-C / SIGTERM during `volgen generate` and `volgen train`, and `kill -9` during a write.

- generate: SIGINT or SIGTERM stops the run with exit code 130 and leaves nothing (no output, no sidecar, no
  temporary file), also when the signal lands after the volume was written but before its sidecar;
- ``kill -9`` while a volume is being written leaves only a hidden ``.volgen-tmp-*`` file, which the next run
  writing that output removes;
- train: SIGTERM finishes the step under way, saves a checkpoint, exits with 130; ``--resume`` continues from
  that step.

``volgen batch`` under SIGTERM and ``kill -9``: ``test_batch.py::test_sigterm_and_kill_9_then_resume``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner
from volumes import make_volume

from volgen import io
from volgen.cli.app import _register, app

_register()
COMMAND = typer.main.get_command(app)
TEMP = ".volgen-tmp-"


def invoke(*args: object):
    return CliRunner().invoke(COMMAND, [str(a) for a in args])


@pytest.fixture
def seg(tmp_path) -> Path:
    path = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label"), path)
    return path


def generate_args(seg: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["generate", str(seg), "-o", str(out), "--model", str(model), "--device", "cpu", *extra]


def start(args: list[str], wrapper: str | None = None) -> subprocess.Popen:
    """``python -m volgen ARGS`` (or ARGS under a ``python -c`` wrapper), killed after 5 minutes at most."""
    command = (
        [sys.executable, "-m", "volgen", *args] if wrapper is None else [sys.executable, "-c", wrapper, *args]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(300, process.kill)
    watchdog.daemon = True
    watchdog.start()
    return process


def wait_for_line(process: subprocess.Popen, accept) -> str:
    for line in process.stdout:
        if accept(line):
            return line
    raise AssertionError(f"the process ended first (exit {process.wait()}): {process.stderr.read()}")


# kill -9 in the middle of a volume write, the moment it hurts most: volgen's writer (atomic_write around
# SimpleITK, as generate uses it) has written the whole file under its temporary name; the process announces
# it and stalls before the rename. (Only the I/O layer is imported: a full `volgen generate` start-up would
# add seconds and change nothing about what a kill leaves behind.)
KILLED_WRITER = """
import sys, time
import SimpleITK as sitk
from volgen import io
real = sitk.WriteImage
def stall(image, path, *args):
    real(image, path, *args)
    print("WRITING", path, flush=True)
    time.sleep(600)
sitk.WriteImage = stall
io.write_volume(sitk.Image([12, 10, 7], sitk.sitkFloat32), sys.argv[1])
"""


def test_sigterm_mid_run_and_kill_9_mid_write(seg, tiny_model_dir, tmp_path):
    """Real processes, started together: `volgen generate` gets SIGTERM after its first progress line; a
    volume write gets kill -9 before its rename, then a normal `volgen generate` writes the same output."""
    term_out, kill_out = tmp_path / "term", tmp_path / "kill"
    term_out.mkdir()
    kill_out.mkdir()
    slow = ["--steps", "1000", "--scheduler", "ddim", "--progress", "json"]
    terminated = start(generate_args(seg, term_out / "syn.nii.gz", tiny_model_dir, *slow))
    killed = start([str(kill_out / "syn.nii.gz")], wrapper=KILLED_WRITER)
    other = kill_out / f"{TEMP}0123abcd.other.nii.gz"  # another output's temporary: not ours to remove
    other.write_bytes(b"partial")
    try:
        wait_for_line(killed, lambda line: line.startswith("WRITING"))
        killed.kill()
        assert killed.wait(timeout=60) == -signal.SIGKILL

        first = wait_for_line(terminated, lambda line: json.loads(line)["event"] == "progress")
        assert json.loads(first)["step"] < json.loads(first)["steps"]
        terminated.send_signal(signal.SIGTERM)
        assert terminated.wait(timeout=120) == 130, terminated.stderr.read()
        assert "interrupted" in terminated.stderr.read()
        assert list(term_out.iterdir()) == []  # no output, no sidecar, no temporary file
    finally:
        for process in (terminated, killed):
            if process.poll() is None:
                process.kill()
    left = sorted(p.name for p in kill_out.iterdir())
    assert not (kill_out / "syn.nii.gz").exists()
    assert all(name.startswith(TEMP) for name in left) and len(left) == 2, left
    assert [p.name for p in io.stale_temporaries(kill_out / "syn.nii.gz")] == [
        n for n in left if n != other.name
    ]

    # the next run into the same folder removes what the killed run left for its outputs
    result = invoke(*generate_args(seg, kill_out / "syn.nii.gz", tiny_model_dir, "--steps", "1"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in kill_out.iterdir()) == sorted([other.name, "syn.nii.gz.json", "syn.nii.gz"])


@pytest.mark.parametrize("moment", ["sampling", "between volume and sidecar"])
def test_sigint_leaves_nothing(moment, seg, tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C (a real SIGINT to this process) while sampling, or after the volume is written but before its
    sidecar: exit 130, and the folder is as before (the written volume is removed again)."""
    # A shell starts background jobs with SIGINT ignored (POSIX), and Python keeps that: make sure this
    # process reacts to Ctrl-C the way an interactive one does, whatever started the test run.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "out"
    out.mkdir()
    if moment == "sampling":
        import volgen.cli.generate as command

        real_emit = command.emit_json

        def emit(**event):
            real_emit(**event)
            if event["event"] == "progress":
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(command, "emit_json", emit)
        extra = ["--steps", "50", "--progress", "json"]
    else:
        from volgen.generation import Sidecar

        real_write = Sidecar.write

        def interrupt_then_write(self, path, **kwargs):
            assert (out / "syn.nii.gz").is_file()  # the volume is in place
            os.kill(os.getpid(), signal.SIGINT)
            return real_write(self, path, **kwargs)

        monkeypatch.setattr(Sidecar, "write", interrupt_then_write)
        extra = ["--steps", "1", "--progress", "none"]
    try:
        result = invoke(*generate_args(seg, out / "syn.nii.gz", tiny_model_dir, *extra))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "Traceback" not in result.output
    assert list(out.iterdir()) == []


def write_train_config(folder: Path, max_steps: int) -> Path:
    import yaml

    for k in range(2):
        io.write_volume(make_volume("label", n_labels=2), folder / "data" / "labels" / f"c{k}.nii.gz")
        io.write_volume(make_volume("image", seed=k), folder / "data" / "images" / f"c{k}.nii.gz")
    (folder / "labels.yaml").write_text("name: shapes\nclasses:\n  ball: 1\n  box: 2\n")
    config = {
        "output_dir": "run",
        "data": {"source": "data", "label_map": "labels.yaml"},
        "model": {"preset": "tiny"},
        "training": {
            "max_steps": max_steps,
            "batch_size": 2,
            "checkpoint_every": 100,
            "preview_every": 0,
            "preview_steps": 1,
            "warmup_steps": 1,
        },
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigterm_during_training_saves_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    """SIGTERM (a real signal to this process) during step 4 of 100: the step finishes, a checkpoint of
    step 4 is written, exit 130; `--resume` goes on from step 4."""
    import volgen.training as training

    for sub in ("images", "labels"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    config = write_train_config(tmp_path, max_steps=100)
    run = tmp_path / "run"
    import volgen.training.loop as loop

    real_noise = loop.step_noise

    def noise_then_signal(step, **kwargs):
        if step == 3:  # 0-based: during the 4th step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_noise(step, **kwargs)

    monkeypatch.setattr(loop, "step_noise", noise_then_signal)
    result = invoke("train", config)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "Traceback" not in result.output
    assert "saved checkpoint" in result.output and "--resume" in result.output
    assert [p.name for p in training.list_checkpoints(run)] == ["step-000004"]
    first = training.read_losses(run / "losses.csv")
    assert len(first) == 4
    assert not (run / "model").exists()  # not exported: the run is not finished

    monkeypatch.setattr(loop, "step_noise", real_noise)
    result = invoke("train", config, "--resume", "--max-steps", "6", "--verbose")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "at step 4" in result.output
    assert "trained 6 steps" in result.output
    resumed = training.read_losses(run / "losses.csv")
    assert len(resumed) == 6 and resumed[:4] == first
    assert (run / "model" / "volgen.json").is_file()


@pytest.mark.parametrize(
    "moment", ["sidecar renamed into place", "preview written", "wrote line", "done event", "dicom in place"]
)
def test_sigterm_after_the_outputs_are_in_place_is_all_or_nothing(
    moment, seg, tiny_model_dir, tmp_path, monkeypatch
):
    """SIGTERM (a real signal to this process) once the outputs are renamed into place: inside the last
    write's cleanup or after the preview, everything this run wrote is removed (exit 130); once the command
    reports, the run stands (exit 0). It used to exit 130 leaving the volume and sidecar (or the sidecar
    alone)."""
    import volgen.cli.generate as command
    import volgen.io.atomic as atomic
    import volgen.preview as preview_module

    out = tmp_path / "out"
    out.mkdir()
    target = out / ("series" if moment == "dicom in place" else "syn.nii.gz")
    extra = ["--steps", "1", "--progress", "json" if moment == "done event" else "none"]
    if moment == "dicom in place":
        extra += ["--format", "dicom"]

    def term() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    real_replace = atomic.os.replace

    def replace_then_term(source, destination):
        real_replace(source, destination)
        last = str(destination).endswith(".json") or (
            moment == "dicom in place" and Path(destination) == target
        )
        if last and moment in ("sidecar renamed into place", "dicom in place"):
            term()  # lands in the cleanup of the write that put the file in place

    monkeypatch.setattr(atomic.os, "replace", replace_then_term)
    if moment == "preview written":
        real_montage = preview_module.save_montage

        def montage_then_term(*args, **kwargs):
            real_montage(*args, **kwargs)
            term()

        monkeypatch.setattr(preview_module, "save_montage", montage_then_term)
        extra += ["--preview", str(out / "p.png")]
    if moment == "wrote line":
        real_print = command.console.print

        def print_then_term(*args, **kwargs):
            real_print(*args, **kwargs)
            term()

        monkeypatch.setattr(command.console, "print", print_then_term)
    if moment == "done event":
        real_emit = command.emit_json

        def emit_then_term(**event):
            if event["event"] == "done":
                term()
            real_emit(**event)

        monkeypatch.setattr(command, "emit_json", emit_then_term)

    result = invoke(*generate_args(seg, target, tiny_model_dir, *extra))
    assert "Traceback" not in result.output
    if moment in ("wrote line", "done event"):  # the outputs are complete and reported: success
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == ["syn.nii.gz", "syn.nii.gz.json"]
    else:
        assert result.exit_code == 130, result.output
        assert "interrupted" in result.output
        assert list(out.iterdir()) == []
