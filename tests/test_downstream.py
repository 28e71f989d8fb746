"""``volgen evaluate-downstream``: segmenters trained on real, synthetic and both, tested on real pairs.

The toy data is easy (each class a bright blob at its own intensity on a dark background, 16 px slices), the
generator deliberately broken: the tiny model with the mask's input channels cut off, so its images are
noise that says nothing about the mask. A segmenter trained on real pairs must then clearly beat one trained
on these synthetic pairs, which must score near zero: the numbers come from the segmenters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_evaluate import _one_error_line
from typer.testing import CliRunner

from volgen.cli.app import _register, app
from volgen.errors import VolgenError
from volgen.evaluation.downstream import (
    DownstreamOptions,
    condition_names,
    generator_training_overlap,
    read_split,
    run_downstream,
)
from volgen.generation import GenerateSettings
from volgen.io import write_volume

_register()
runner = CliRunner()

SIZE = (16, 16, 6)  # (x, y, z) voxels
#: Segmenter budget of the toy runs: enough for the easy real data, seconds on one CPU thread.
BUDGET = [
    "--segmenter-steps",
    "60",
    "--segmenter-batch-size",
    "8",
    "--learning-rate",
    "0.01",
    "--channels",
    "8,16",
]


def _pair(seed: int) -> tuple[sitk.Image, sitk.Image]:
    """Labels 1 and 2 of the tiny model's map (liver, kidney) as boxes at random places, and an image in which
    each class has its own intensity (background 10, liver 200, kidney 100) plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SIZE[::-1], dtype=np.uint8)
    for value in (1, 2):
        y, x = rng.integers(1, 9, size=2)
        labels[:, y : y + 6, x : x + 6] = value
    image = np.choose(labels, [10.0, 200.0, 100.0]) + rng.normal(0.0, 5.0, labels.shape)
    pair = sitk.GetImageFromArray(image.astype(np.float32)), sitk.GetImageFromArray(labels)
    for volume in pair:
        volume.SetSpacing((1.0, 1.0, 2.0))
    return pair


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``train/`` (4 cases) and ``test/`` (2 cases), each with images/ and labels/, and ``all/`` (all 6)."""
    root = tmp_path_factory.mktemp("downstream")
    for side, names in (("train", ["a", "b", "c", "d"]), ("test", ["e", "f"])):
        for name in names:
            image, labels = _pair(ord(name))
            for folder in (root / side, root / "all"):
                for sub in ("images", "labels"):
                    (folder / sub).mkdir(parents=True, exist_ok=True)
                write_volume(image, folder / "images" / f"{name}.nii.gz", overwrite=True)
                write_volume(labels, folder / "labels" / f"{name}.nii.gz", overwrite=True)
    return root


@pytest.fixture(scope="module")
def noise_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its condition input channels zeroed: images that are noise w.r.t. the mask."""
    from volgen.models import build_training_scheduler, load_model, save_model

    loaded = load_model(tiny_model_dir)
    unet = loaded.unet
    with torch.no_grad():
        unet.conv_in.weight[:, 1:] = 0.0
    metadata = loaded.metadata.model_copy(update={"trained_on": "2 case(s) from somewhere (e, x9)"})
    folder = tmp_path_factory.mktemp("models") / "noise"
    save_model(folder, unet, build_training_scheduler(), metadata)
    return folder


def test_end_to_end_the_numbers_come_from_the_segmenters(data, noise_model, tmp_path):
    out = tmp_path / "out"
    args = ["evaluate-downstream", str(data / "train"), str(out), "--test", str(data / "test")]
    args += [
        "--model",
        str(noise_model),
        "--seeds",
        "2",
        "--steps",
        "2",
        "--synthetic-multiples",
        "1,2",
        *BUDGET,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "synthetic-2x" in result.output and "× real" in result.output
    report = json.loads((out / "downstream.json").read_text())
    summary = report["summary"]
    assert list(summary) == condition_names([1, 2]) == ["real", "synthetic", "real+synthetic", "synthetic-2x"]
    assert all(entry["seeds"] == 2 for entry in summary.values())
    real, synthetic = summary["real"]["mean"]["mean"], summary["synthetic"]["mean"]["mean"]
    assert real > 0.8, summary["real"]
    # noise images teach about chance level (0.2-0.3; the bytes, and so the figure, depend on the CPU's
    # precision: bf16 where it is native), far below real
    assert synthetic < 0.4, summary["synthetic"]
    assert summary["real"]["worst"]["mean"] > 0.7 > summary["synthetic-2x"]["mean"]["mean"]
    assert summary["synthetic"]["ratio"] == pytest.approx(synthetic / real, abs=1e-5)
    # worst <= mean per class; the spleen (label 3) is in no mask: no Dice
    for entry in summary.values():
        assert entry["worst"]["liver"] <= entry["mean"]["liver"] + 1e-9
        assert entry["mean"]["spleen"] is None
    runs = report["runs"]
    assert {(r["condition"], r["seed"]) for r in runs} == {(c, s) for c in summary for s in (0, 1)}
    assert all(set(r["dice"]) == {"e", "f"} for r in runs)
    by = {(r["condition"], r["seed"]): r for r in runs}
    assert by[("real+synthetic", 0)]["train_cases"] == 8 and by[("synthetic-2x", 1)]["train_cases"] == 8
    assert by[("real", 0)]["train_cases"] == 4
    csv_lines = (out / "downstream.csv").read_text().splitlines()
    assert csv_lines[0] == "condition,seed,class,dice,train_cases,train_slices"
    assert len(csv_lines) == 1 + len(runs) * 4  # liver, kidney, spleen, mean
    assert (out / "downstream.png").read_bytes()[:4] == b"\x89PNG"
    # the synthetic images went through volgen batch: one folder per seed, 2 samples per training label
    for seed in (0, 1):
        manifest = (out / "synthetic" / f"seed-{seed}" / "manifest.csv").read_text()
        assert manifest.count("done") == 8
    # the generator's model card names test case 'e': a warning, in the report and on the terminal
    assert any("'e'" in w or " e " in w or "e appear" in w for w in report["warnings"]), report["warnings"]
    assert "warning:" in result.output

    # a rerun reuses the synthetic images and the finished runs: the same numbers, nothing regenerated
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((out / "downstream.json").read_text())["summary"] == summary
    assert "done" not in (out / "synthetic" / "seed-0" / "manifest.csv").read_text().split("\n", 1)[1]


def test_seeds_and_segmenter_settings_decide_the_result(data, noise_model, tmp_path):
    split = read_split(data / "train", test=data / "test")
    options = DownstreamOptions(
        model=noise_model,
        seeds=1,
        settings=GenerateSettings(num_inference_steps=2),
        steps=20,
        channels=(8, 16),
    )
    first = run_downstream(split, tmp_path / "a", options)
    again = run_downstream(split, tmp_path / "b", options)
    assert first.to_dict()["summary"] == again.to_dict()["summary"]  # deterministic from scratch
    options.steps = 21
    changed = run_downstream(split, tmp_path / "a", options)  # the cached runs do not match: retrained
    assert changed.summary()["real"]["mean"] != first.summary()["real"]["mean"]


def test_split_file_and_nnunet_folds(data, tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["a", "b", "c"], "test": ["e"]}))
    found = read_split(data / "all", split=split_file)
    assert [c.case for c in found.train] == ["a", "b", "c"] and [c.case for c in found.test] == ["e"]
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["b", "c"], "val": ["f", "e"]}]))
    found = read_split(data / "all", split=folds, fold=1)
    assert [c.case for c in found.train] == ["b", "c"] and [c.case for c in found.test] == ["f", "e"]
    # an nnU-Net v2 raw dataset folder with its splits_final.json
    dataset = tmp_path / "Dataset001_Toy"
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True)
    for name in "abcef":
        (dataset / "imagesTr" / f"{name}_0000.nii.gz").write_bytes(
            (data / "all/images" / f"{name}.nii.gz").read_bytes()
        )
        (dataset / "labelsTr" / f"{name}.nii.gz").write_bytes(
            (data / "all/labels" / f"{name}.nii.gz").read_bytes()
        )
    found = read_split(dataset, split=folds, fold=1)
    assert [c.case for c in found.train] == ["b", "c"] and [c.case for c in found.test] == ["f", "e"]
    assert found.test[0].image.name == "f_0000.nii.gz" and found.test[0].label.name == "f.nii.gz"
    (dataset / "imagesTr" / "a_0001.nii.gz").write_bytes(b"")
    with pytest.raises(VolgenError, match="single-channel"):
        read_split(dataset, split=folds)


def test_leaks_and_bad_splits_are_one_clear_error(data, tmp_path):
    base = ["evaluate-downstream", str(data / "all"), str(tmp_path / "out")]
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"train": ["a", "b"], "test": ["b"]}))
    _one_error_line(runner.invoke(app, [*base, "--split", str(both)]), "'b'", "both", "leaks")
    # the same case under two names: the same file contents on both sides
    copy = tmp_path / "copy"
    for sub in ("images", "labels"):
        (copy / sub).mkdir(parents=True)
        (copy / sub / "renamed.nii.gz").write_bytes((data / "train" / sub / "a.nii.gz").read_bytes())
    _one_error_line(
        runner.invoke(
            app, ["evaluate-downstream", str(data / "train"), str(tmp_path / "o"), "--test", str(copy)]
        ),
        "renamed",
        "'a'",
        "leaks",
    )
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"train": ["a", "zz"], "test": ["e"]}))
    _one_error_line(runner.invoke(app, [*base, "--split", str(unknown)]), "unknown.json", "'zz'")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": ["a"], "test": ["e"]}))
    _one_error_line(runner.invoke(app, [*base, "--split", str(bad)]), "bad.json")
    _one_error_line(runner.invoke(app, base), "--test", "--split")
    _one_error_line(
        runner.invoke(app, [*base, "--split", str(both), "--synthetic-multiples", "1,x"]), "integers"
    )
    assert not (tmp_path / "out").exists()  # nothing written for a refused run


def test_nnunet_asked_for_and_absent_is_a_clear_error(data, noise_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    args = ["evaluate-downstream", str(data / "train"), str(tmp_path / "out"), "--test", str(data / "test")]
    result = runner.invoke(app, [*args, "--model", str(noise_model), "--segmenter", "nnunet"])
    _one_error_line(result, "nnUNetv2_train", "not found", "--segmenter volgen")
    _one_error_line(runner.invoke(app, [*args, "--segmenter", "monai"]), "--segmenter")


def test_generator_training_overlap_matches_whole_ids():
    card = "3 case(s) from data/train (case_1, case_10, liver-7)"
    assert generator_training_overlap(card, {}, ["case_1", "case_2", "liver-7", "liver"]) == [
        "case_1",
        "liver-7",
    ]
    assert generator_training_overlap("the Colin27 T1 MRI (one subject)", {}, ["colin27", "colin"]) == [
        "colin27"
    ]
    assert generator_training_overlap("", {"cases": ["x"]}, ["x", "y"]) == ["x"]


def test_options_are_checked():
    with pytest.raises(VolgenError, match="--seeds"):
        DownstreamOptions(seeds=0).check()
    with pytest.raises(VolgenError, match="--synthetic-multiples"):
        DownstreamOptions(multiples=(0,)).check()


FAKE_NNUNET = '''#!{python}
"""A stand-in for nnU-Net v2's {name}: checks what volgen hands it; predict thresholds the image."""
import json, os, sys
from pathlib import Path
import numpy as np
import SimpleITK as sitk

name, args = Path(sys.argv[0]).name, sys.argv[1:]
raw = Path(os.environ["nnUNet_raw"])
dataset = raw / "Dataset001_volgen"
with open(raw.parent / "calls.txt", "a") as log:
    log.write(name + " " + " ".join(args) + "\\n")
if name == "nnUNetv2_plan_and_preprocess":
    info = json.loads((dataset / "dataset.json").read_text())
    images = sorted((dataset / "imagesTr").iterdir())
    assert info["numTraining"] == len(images) == len(list((dataset / "labelsTr").iterdir())), info
    for image in images:
        label = dataset / "labelsTr" / image.name.replace("_0000", "")
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label))))) <= {{0, 1, 2, 3}}
elif name == "nnUNetv2_predict":
    source, target = Path(args[args.index("-i") + 1]), Path(args[args.index("-o") + 1])
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        image = sitk.ReadImage(str(path))
        values = sitk.GetArrayFromImage(image)
        out = sitk.GetImageFromArray(np.where(values > 150, 1, np.where(values > 55, 2, 0)).astype(np.uint8))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(target / path.name.replace("_0000", "")))
'''


def test_nnunet_segmenter_gets_the_dataset_and_commands(data, noise_model, tmp_path, monkeypatch):
    """nnU-Net's own commands are stand-ins here (no nnU-Net in the test environment): volgen's side of the
    contract - the raw dataset per condition, the environment, the command lines, reading predictions."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"):
        script = bin_dir / name
        script.write_text(FAKE_NNUNET.format(python=sys.executable, name=name))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    args = ["evaluate-downstream", str(data / "train"), str(out), "--test", str(data / "test")]
    args += ["--model", str(noise_model), "--seeds", "1", "--steps", "2", "--segmenter", "nnunet"]
    result = runner.invoke(app, [*args, "--nnunet-configuration", "3d_fullres", "--nnunet-epochs", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "downstream.json").read_text())["summary"]
    assert summary["real"]["mean"]["mean"] > 0.9  # the stand-in's thresholds on the real test images
    for condition, count in (("real", 4), ("synthetic", 4), ("real+synthetic", 8)):
        work = out / "nnunet" / condition / "seed-0"
        assert len(list((work / "raw" / "Dataset001_volgen" / "imagesTr").iterdir())) == count
        calls = (work / "calls.txt").read_text().splitlines()
        assert [c.split()[0] for c in calls] == [
            "nnUNetv2_plan_and_preprocess",
            "nnUNetv2_train",
            "nnUNetv2_predict",
        ]
        assert calls[1].split()[1:] == ["1", "3d_fullres", "all", "-tr", "nnUNetTrainer_5epochs"]


def test_the_leak_warning_sees_training_cases_beyond_the_first_five():
    """The model card's ``trained_on`` names five cases; ``training["cases"]`` (written by ``volgen train``)
    names all of them, and the overlap check reads both."""
    from volgen.evaluation.downstream.split import generator_training_overlap

    ids = [f"case{i}" for i in range(8)]
    trained_on = "8 case(s) from /data (case0, case1, case2, case3, case4 ...)"
    assert generator_training_overlap(trained_on, {}, ["case6", "case1"]) == ["case1"]
    found = generator_training_overlap(trained_on, {"cases": ids}, ["case6", "case1", "other"])
    assert found == ["case6", "case1"]
