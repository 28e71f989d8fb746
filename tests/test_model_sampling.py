"""A model's own sampling defaults (``sampling`` in its ``volgen.json``): ``volgen generate``, ``volgen
batch``, the library and ``volgen info`` use them where the user does not say; an option given wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import make_volume, rotation

from volgen import defaults, io
from volgen.api import GenerateSettings, VolumeGenerator
from volgen.cli.app import _register, app

_register()
OWN = {"steps": 4, "guidance_scale": 1.25}  # what the edited model asks for (volgen's: 6 steps, w 1.5)
CPU = ["--device", "cpu"]


def with_sampling(source: Path, folder: Path, sampling: dict) -> Path:
    """A copy of a model folder whose ``volgen.json`` has ``sampling`` set, as a user edits it by hand."""
    shutil.copytree(source, folder)
    meta = json.loads((folder / "volgen.json").read_text())
    meta["sampling"] = sampling
    (folder / "volgen.json").write_text(json.dumps(meta, indent=2))
    return folder


@pytest.fixture(scope="module")
def own_model(flagged_model_dir, tmp_path_factory) -> Path:
    """The flagged tiny model (same weights) asking for 4 steps at guidance 1.25."""
    return with_sampling(flagged_model_dir, tmp_path_factory.mktemp("own") / "own", OWN)


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("own-seg") / "seg.nii.gz"
    volume = make_volume(
        "label", size=(13, 11, 6), spacing=(0.9, 1.3, 2.5), direction=rotation(0.2, -0.1, 0.3)
    )
    io.write_volume(volume, path)
    return path


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def sidecar(path: Path) -> dict:
    return json.loads(Path(f"{path}.json").read_text())


def test_generate_takes_the_models_own_steps_and_guidance_and_an_option_wins(
    own_model, flagged_model_dir, seg, tmp_path
):
    own, asked = tmp_path / "own.nii.gz", tmp_path / "asked.nii.gz"
    result = cli("generate", seg, "-o", own, "--model", own_model, *CPU)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "model tiny-flags's own sampling defaults: --steps 4 --guidance-scale 1.25" in said
    record = sidecar(own)
    assert record["settings"]["num_inference_steps"] == 4 and record["timesteps"] == 4
    assert record["settings"]["guidance_scale"] == 1.25 and record["guidance_scale"] == 1.25
    # exactly what the same weights give with those options spelled out
    spelled = ["--steps", 4, "--guidance-scale", 1.25, "--progress", "none"]
    assert cli("generate", seg, "-o", asked, "--model", flagged_model_dir, *CPU, *spelled).exit_code == 0
    assert sitk.GetArrayFromImage(io.read_volume(own, kind="image")).tobytes() == (
        sitk.GetArrayFromImage(io.read_volume(asked, kind="image")).tobytes()
    )

    # an option given wins; the note names only what the model still decides
    mine = tmp_path / "mine.nii.gz"
    result = cli("generate", seg, "-o", mine, "--model", own_model, *CPU, "--steps", 5)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "own sampling defaults: --guidance-scale 1.25" in said and "--steps 4" not in said
    assert sidecar(mine)["settings"]["num_inference_steps"] == 5 and sidecar(mine)["guidance_scale"] == 1.25
    both = cli("generate", seg, "-o", tmp_path / "b.nii.gz", "--model", own_model, *CPU, "--steps", 2,
               "--guidance-scale", 1)  # fmt: skip
    assert both.exit_code == 0 and "own sampling defaults" not in both.output

    # a model without its own: volgen's defaults, and no note
    plain = tmp_path / "plain.nii.gz"
    result = cli("generate", seg, "-o", plain, "--model", flagged_model_dir, *CPU)
    assert result.exit_code == 0 and "own sampling defaults" not in result.output
    assert sidecar(plain)["settings"]["num_inference_steps"] == defaults.STEPS
    assert sidecar(plain)["guidance_scale"] == defaults.GUIDANCE_SCALE


def test_dry_run_plans_the_models_own_steps(own_model, seg):
    result = cli("generate", seg, "--model", own_model, *CPU, "--dry-run", "--progress", "json")
    assert result.exit_code == 0, result.output
    plan = next(e for e in map(json.loads, result.output.splitlines()) if e.get("event") == "plan")
    assert plan["steps"] == plan["steps_asked"] == 4


def test_library_takes_the_models_own_sampling(own_model, seg):
    generator = VolumeGenerator(own_model, device="cpu")
    labels = io.read_label(seg)
    out = generator.generate(labels, settings=GenerateSettings(seed=2))
    assert len(out.timesteps) == 4 and out.guidance_scale == 1.25
    mine = generator.generate(labels, settings=GenerateSettings(seed=2, num_inference_steps=5))
    assert len(mine.timesteps) == 5 and mine.guidance_scale == 1.25
    settings = GenerateSettings().for_model(generator.metadata)
    assert (settings.num_inference_steps, settings.guidance_scale) == (4, 1.25)
    assert settings.for_model(generator.metadata) == settings  # resolving twice changes nothing


def test_batch_records_the_models_sampling_and_resume_follows_it(own_model, tmp_path):
    from volgen.batch import read_manifest

    cases = tmp_path / "cases"
    cases.mkdir()
    io.write_volume(make_volume("label", size=(9, 8, 4)), cases / "a.nii.gz")
    io.write_volume(make_volume("label", size=(8, 10, 5), spacing=(1.2, 0.7, 3.0)), cases / "b.nii.gz")
    out = tmp_path / "out"

    def run(model: Path) -> dict:
        result = cli("batch", cases, out, "--model", model, *CPU, "--progress", "none")
        assert result.exit_code == 0, result.output
        return {r.case: r.status for r in read_manifest(out / "manifest.csv")}

    assert run(own_model) == {"a": "done", "b": "done"}
    assert sidecar(out / "a.nii.gz")["settings"]["num_inference_steps"] == 4
    assert sidecar(out / "a.nii.gz")["guidance_scale"] == 1.25
    assert run(own_model) == {"a": "skipped", "b": "skipped"}  # the same settings: finished
    # the model asks for other steps (same weights): the volumes it would make differ, so they are redone
    other = with_sampling(own_model, tmp_path / "other", {**OWN, "steps": 5})
    assert run(other) == {"a": "done", "b": "done"}
    assert sidecar(out / "b.nii.gz")["settings"]["num_inference_steps"] == 5


def test_info_shows_the_models_own_sampling(own_model, flagged_model_dir):
    result = cli("info", own_model)
    assert result.exit_code == 0 and "--steps 4 --guidance-scale 1.25" in " ".join(result.output.split())
    assert "volgen's defaults" in cli("info", flagged_model_dir).output


@pytest.mark.parametrize(
    ("model", "sampling", "message"),
    [
        ("tiny_model_dir", {"guidance_scale": 2}, "cannot be guided"),  # no 'specified' flags
        ("flagged_model_dir", {"steps": 0}, "sampling.steps"),
        ("flagged_model_dir", {"steps": 4, "eta": 1}, "sampling.eta"),
        ("flagged_model_dir", {"background_fine_noise_correlation": 1}, "background_fine_noise_correlation"),
    ],
)
def test_a_bad_sampling_entry_is_one_line_naming_the_file(model, sampling, message, seg, tmp_path, request):
    folder = with_sampling(request.getfixturevalue(model), tmp_path / "bad", sampling)
    out = tmp_path / "out.nii.gz"
    result = cli("generate", seg, "-o", out, "--model", folder, *CPU)
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert message in line and "volgen.json" in line, line
    assert not out.exists()


def test_a_models_background_noise_rho_runs_unless_an_option_says_otherwise(flagged_model_dir, tmp_path):
    """A model whose background is air asks for independent grain there (``--rho-fine-background 0``)."""
    # 1 mm slices (fine ρ 0.95, not 0 as at 2 mm) and a small labelled block in plenty of air
    array = np.zeros((8, 32, 32), dtype=np.uint8)
    array[:, 13:19, 12:16], array[:, 13:19, 16:20] = 1, 2
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 1.0))
    image.SetDirection(rotation(0.1, 0.2, -0.1))
    seg = tmp_path / "block.nii.gz"
    io.write_volume(image, seg)
    air = with_sampling(flagged_model_dir, tmp_path / "air", {"background_fine_noise_correlation": 0})
    own, spelled, same = (tmp_path / f"{n}.nii.gz" for n in ("own", "spelled", "same"))
    result = cli("generate", seg, "-o", own, "--model", air, *CPU)
    assert result.exit_code == 0, result.output
    assert "own sampling defaults" not in result.output  # the note names what changes time and guidance
    assert sidecar(own)["settings"]["background_fine_noise_correlation"] == 0
    assert sidecar(own)["background_fine_noise_correlation"] == 0  # what ran
    options = ["--progress", "none", *CPU]
    assert cli(
        "generate", seg, "-o", spelled, "--model", flagged_model_dir, "--rho-fine-background", 0, *options
    )
    assert (
        cli("generate", seg, "-o", same, "--model", air, "--rho-fine-background", "same", *options).exit_code
        == 0
    )

    def voxels(path: Path) -> bytes:
        return sitk.GetArrayFromImage(io.read_volume(path, kind="image")).tobytes()

    assert voxels(own) == voxels(spelled) != voxels(same)
    assert sidecar(same)["settings"]["background_fine_noise_correlation"] == "same"
    assert sidecar(same)["background_fine_noise_correlation"] is None

    # auto: resolved by the slice spacing over the model's pixel, the value that ran in the sidecar
    auto = tmp_path / "auto.nii.gz"
    assert (
        cli("generate", seg, "-o", auto, "--model", air, "--rho-fine-background", "auto", *options).exit_code
        == 0
    )
    record = sidecar(auto)
    assert record["settings"]["background_fine_noise_correlation"] == "auto"
    assert 0.0 <= record["background_fine_noise_correlation"] <= record["fine_noise_correlation"]

    bad = cli(
        "generate", seg, "-o", tmp_path / "bad.nii.gz", "--model", air, "--rho-fine-background", "often"
    )
    assert bad.exit_code != 0 and "--rho-fine-background must be" in " ".join(bad.output.split())
    assert "Traceback" not in bad.output and not (tmp_path / "bad.nii.gz").exists()


def test_slicer_panel_leaves_steps_to_the_model_and_names_its_own_sampling(own_model, flagged_model_dir):
    import sys

    plugin = str(Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "VolGen")
    sys.path.insert(0, plugin)
    try:
        from VolGenLib import MODEL_STEPS, model_summary, steps_option
    finally:
        sys.path.remove(plugin)
    assert model_summary(own_model).endswith("; its own sampling: steps 4, guidance 1.25")
    assert "own sampling" not in model_summary(flagged_model_dir)
    assert steps_option(MODEL_STEPS) is None and steps_option(9) == 9
