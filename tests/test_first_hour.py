"""What a new user meets first: the README's Quick start (as CI runs it), git-ignored outputs, the training
hint without data, and a training run without diffusers warnings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from volgen.io.naming import sidecar_path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    """The first two ```bash blocks of the README, as .ci/run reads them (its awk program, run here)."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    program = re.search(r"awk '(.*?)' README\.md", script, re.S)
    assert program, ".ci/run no longer reads the commands from README.md"
    awk = shutil.which("awk")
    if awk is None:
        pytest.skip("awk not installed")
    done = subprocess.run([awk, program.group(1), "README.md"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_ci_runs_the_readmes_two_commands_verbatim():
    main_job, tests = _readme_commands()
    assert main_job.startswith("pip install torch==2.13.0 && pip install -e . && volgen generate ")
    assert "--preview" in main_job and "examples/colin27_tissues_2mm.nii.gz" in main_job
    assert tests.startswith("pip install torch==2.13.0 && ") and tests.endswith("pytest -q")
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert main_job not in script and tests not in script  # read from the README, never copied
    assert "-m venv" in script and "--system-site-packages" not in script.replace(
        "# no --system-site-packages", ""
    )


def test_quick_start_outputs_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    main_job, _ = _readme_commands()
    output = re.search(r"-o (\S+)", main_job).group(1)
    preview = re.search(r"--preview (\S+)", main_job).group(1)
    sidecar = str(sidecar_path(output))  # the naming rule's one home
    paths = [output, preview, sidecar, "runs/colin27-small/model", "data/colin27/images/colin27.nii.gz"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(paths), done.stdout + done.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_train_without_data_says_how_to_make_it(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "train" / "colin27-small.yaml").read_text(encoding="utf-8"))
    config["data"]["source"] = str(tmp_path / "colin27")
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "colin27-small.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "volgen", "train", str(path)], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "training data not found" in lines[0]
    assert f"python examples/colin27/prepare.py {tmp_path / 'colin27'}" in lines[0]


def test_a_training_run_prints_no_diffusers_dtype_warning(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import test_training as helpers

    helpers.make_case(tmp_path / "data", "case0", seed=0)
    (tmp_path / "labels.yaml").write_text(helpers.LABELS_YAML, encoding="utf-8")
    config = helpers.write_config(tmp_path, output_dir="run", max_steps=1, preview_every=0)
    done = subprocess.run(
        [sys.executable, "-m", "volgen", "train", str(config)], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model" / "volgen.json").is_file()
    assert "float32" not in done.stdout + done.stderr, done.stderr
