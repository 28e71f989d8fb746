"""Determinism: the same inputs, seed and device give the same output bytes - across runs, processes,
``slice_batch_size`` and schedulers (stochastic DDPM included).

Scope (see docs/reliability.md): CPU, one thread count. GPUs (cuDNN's algorithm choice, atomic adds) and other
CPU thread counts can change the lowest bits. Sharded batch runs giving the single run's bytes are tested in
``test_batch.py::test_shards_merge_to_the_single_run`` and ``test_torchrun_two_processes_match_one``; exact
training resume in ``test_training.py::test_resume_matches_an_uninterrupted_run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from volumes import make_volume, rotation

from volgen import io
from volgen.api import GenerateSettings, generate

SLICE_BATCH_SIZES = (1, 7, 16)


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    """19 axial slices (more than the largest chunk), oblique and anisotropic."""
    path = tmp_path_factory.mktemp("determinism") / "seg.nii.gz"
    volume = make_volume(
        "label", size=(11, 9, 19), spacing=(0.9, 1.2, 2.0), direction=rotation(0.1, 0.05, 0.4)
    )
    io.write_volume(volume, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def fresh_process(seg, tiny_model_dir, tmp_path_factory):
    """`volgen generate` in a new interpreter, started before this module's tests so that its start-up
    overlaps them; :func:`test_a_fresh_process_gives_the_same_bytes` collects it."""
    output = tmp_path_factory.mktemp("fresh") / "cli.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "volgen", "generate", str(seg), "-o", str(output)]
    command += ["--model", str(tiny_model_dir), "--steps", "3", "--seed", "5", "--device", "cpu"]
    command += ["--slice-batch-size", "7", "--progress", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield process, output
    if process.poll() is None:
        process.kill()
        process.wait()


def run(seg: Path, out: Path, model: Path, **settings) -> bytes:
    settings = {"num_inference_steps": 3, "seed": 5, **settings}
    generate(seg, out, model=model, settings=GenerateSettings(**settings), device="cpu", overwrite=True)
    return out.read_bytes()


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpmsolver++", "euler"])
def test_output_bytes_do_not_depend_on_slice_batch_size(scheduler, seg, tiny_model_dir, tmp_path):
    outputs = [
        run(seg, tmp_path / f"b{size}.nii.gz", tiny_model_dir, scheduler=scheduler, slice_batch_size=size)
        for size in SLICE_BATCH_SIZES
    ]
    assert outputs[0] == outputs[1] == outputs[2]
    other_seed = run(seg, tmp_path / "seed6.nii.gz", tiny_model_dir, scheduler=scheduler, seed=6)
    assert other_seed != outputs[0]


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd", "out.mha"])
def test_every_format_is_byte_identical_across_runs(name, seg, tiny_model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run(seg, tmp_path / "a" / name, tiny_model_dir)
    second = run(seg, tmp_path / "b" / name, tiny_model_dir, slice_batch_size=7)
    assert first == second
    sidecars = [json.loads(sorted((tmp_path / d).glob("*.json"))[0].read_text()) for d in "ab"]
    for sidecar in sidecars:
        del sidecar["seconds"], sidecar["settings"]["slice_batch_size"], sidecar["output"]
    assert sidecars[0] == sidecars[1]


def test_dicom_pixel_data_is_identical(seg, tiny_model_dir, tmp_path):
    """DICOM series get fresh UIDs and today's date by design; their pixels are identical."""
    pixels = []
    for name, size in (("a", 1), ("b", 16)):
        out = tmp_path / name
        generate(
            seg,
            out,
            model=tiny_model_dir,
            settings=GenerateSettings(num_inference_steps=2, seed=3, slice_batch_size=size),
            output_format="dicom",
            device="cpu",
        )
        pixels.append([pydicom.dcmread(p).PixelData for p in sorted(out.iterdir())])
    assert pixels[0] == pixels[1] and len(pixels[0]) == 19


def test_a_fresh_process_gives_the_same_bytes(fresh_process, seg, tiny_model_dir, tmp_path):
    """The CLI in a new interpreter (another hash seed, another chunk size) writes this process's bytes."""
    process, output = fresh_process
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert output.read_bytes() == run(seg, tmp_path / "here.nii.gz", tiny_model_dir, slice_batch_size=16)
