"""Several volumes per UNet run (``--samples``, ``--samples-per-case``, ``generate_many``) and
``--slice-batch-size auto``: every volume is bit for bit what generating it alone gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner
from volumes import assert_same_geometry, make_volume, rotation

from volgen import defaults, io
from volgen.api import (
    GenerateSettings,
    GenerationRequest,
    VolumeGenerator,
    generate,
    generate_samples,
    sample_paths,
)
from volgen.cli.app import _register, app
from volgen.errors import VolgenError
from volgen.generation import SettingsError, parse_slice_batch_size
from volgen.memory import GRANULE, estimate_memory, fit_slice_batch_size
from volgen.pipeline import SegmentationToVolumePipeline

_register()
runner = CliRunner()
FAST = GenerateSettings(num_inference_steps=2, seed=11)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return SegmentationToVolumePipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return VolumeGenerator(tiny_model_dir, device="cpu")


@pytest.fixture
def seg_path(tmp_path):
    seg = make_volume("label", size=(13, 11, 9), spacing=(0.8, 1.1, 2.5), direction=rotation())
    path = tmp_path / "seg.nii.gz"
    io.write_volume(seg, path)
    return path


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _bytes(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddpm", "unipc"])
def test_volumes_together_equal_each_alone(pipe, scheduler):
    """Stacked volumes (other sizes, a repeated one with another seed) share UNet forwards, yet each keeps
    its noise, generator, scheduler history and 2.5D context: bitwise what a call for it alone gives, for
    any slice batch and any company."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (11, 16, 16), generator=g)
    b = torch.randint(0, 4, (5, 16, 16), generator=g)
    kwargs = dict(num_inference_steps=3, scheduler=scheduler, x0_smoothing=0.5)
    alone = [
        pipe(a, seed=5, slice_batch_size=3, **kwargs).volume,
        pipe(b, seed=9, slice_batch_size=16, **kwargs).volume,
        pipe(a, seed=6, slice_batch_size="auto", **kwargs).volume,
    ]
    for sbs in (1, 7, "auto"):
        out = pipe([a, b, a], seed=[5, 9, 6], slice_batch_size=sbs, **kwargs)
        assert all(torch.equal(x, y) for x, y in zip(out.volumes, alone, strict=True))
        assert torch.equal(out.volume, alone[0])
    pair = pipe([b, a], seed=[9, 5], **kwargs).volumes  # fewer volumes, other order
    assert torch.equal(pair[0], alone[1]) and torch.equal(pair[1], alone[0])
    seeds = pipe([a, a], seed=6, **kwargs).volumes  # one number: volume i uses seed + i
    assert torch.equal(seeds[0], alone[2]) and not torch.equal(seeds[0], seeds[1])


def test_references_go_with_their_volumes(pipe):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 4, (6, 16, 16), generator=g), torch.randint(0, 4, (4, 16, 16), generator=g)
    ra, rb = torch.rand(a.shape, generator=g) * 2 - 1, torch.rand(b.shape, generator=g) * 2 - 1
    alone = pipe(a, seed=1, reference=ra, strength=0.5, num_inference_steps=4).volume
    out = pipe([b, a], seed=[2, 1], reference=[rb, ra], strength=0.5, num_inference_steps=4)
    assert torch.equal(out.volumes[1], alone)
    assert pipe([b, a], reference=[rb, ra], strength=0.0).volumes[1].equal(ra)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"seed": [1]}, "one per volume"),
        ({"generator": torch.Generator()}, "one per volume"),
        ({"reference": torch.zeros(3, 16, 16), "strength": 0.5}, "one per volume"),
        ({"slice_batch_size": "big"}, "slice_batch_size"),
        ({"slice_batch_size": 0}, "slice_batch_size"),
    ],
)
def test_bad_several_volume_arguments_are_clear(pipe, kwargs, phrase):
    labels = torch.zeros(3, 16, 16, dtype=torch.long)
    with pytest.raises(VolgenError, match=phrase):
        pipe([labels, labels], num_inference_steps=1, **kwargs)
    with pytest.raises(VolgenError, match="at least one"):
        pipe([], num_inference_steps=1)


# ------------------------------------------------------------------------------------- slice batch auto


def test_auto_slice_batch_fits_the_budget_and_is_capped_on_the_cpu(pipe):
    assert defaults.SLICE_BATCH_SIZE == "auto"
    assert pipe.resolve_slice_batch_size("auto", 1000) == defaults.AUTO_SLICE_BATCH_CPU
    assert pipe.resolve_slice_batch_size("auto", 3) == GRANULE  # no more than the slices, padded
    assert pipe.resolve_slice_batch_size(5, 1000) == 5
    shape = dict(slice_size=64, condition_channels=12, block_channels=(32, 64, 128))
    need = estimate_memory(slices=200, slice_batch_size=48, input_voxels=10**6, **shape)
    sbs = fit_slice_batch_size(need, slices=200, input_voxels=10**6, cap=10**6, **shape)
    assert sbs == 48 and sbs % GRANULE == 0
    assert fit_slice_batch_size(need // 2, slices=200, input_voxels=10**6, cap=10**6, **shape) < 48
    assert fit_slice_batch_size(need * 4, slices=200, input_voxels=10**6, cap=64, **shape) == 64
    assert fit_slice_batch_size(1, slices=200, cap=64, **shape) == GRANULE  # the memory check refuses


def test_slice_batch_setting_parses_and_auto_changes_no_byte(seg_path, tiny_model_dir, tmp_path):
    assert parse_slice_batch_size("auto") == "auto" and parse_slice_batch_size(" 24 ") == 24
    for bad in ("0", "-3", "big", "1.5"):
        with pytest.raises(SettingsError, match="--slice-batch-size"):
            parse_slice_batch_size(bad)
    with pytest.raises(SettingsError, match="--slice-batch-size"):
        GenerateSettings(slice_batch_size="many")
    outs = []
    for sbs in ("auto", "3"):
        out = tmp_path / f"o{sbs}.nii.gz"
        result = _cli("generate", seg_path, "-o", out, "--model", tiny_model_dir, "--steps", 2,
                      "--slice-batch-size", sbs, "--progress", "none")  # fmt: skip
        assert result.exit_code == 0, result.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    result = _cli("generate", seg_path, "--model", tiny_model_dir, "--slice-batch-size", "0")
    assert result.exit_code == 1 and result.output.strip().startswith("error:")
    assert "--slice-batch-size" in result.output and len(result.output.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------- generator level


def test_generate_samples_equal_generate_with_each_seed(generator, seg_path):
    seg = io.read_label(seg_path)
    samples = generator.generate_samples(seg, settings=FAST, samples=3)
    assert len(samples) == 3
    for k, out in enumerate(samples):
        alone = generator.generate(seg, settings=GenerateSettings(num_inference_steps=2, seed=11 + k))
        assert_same_geometry(out.image, seg, atol=0)
        assert np.array_equal(sitk.GetArrayFromImage(out.image), sitk.GetArrayFromImage(alone.image))
    assert not np.array_equal(
        sitk.GetArrayFromImage(samples[0].image), sitk.GetArrayFromImage(samples[1].image)
    )


def test_generate_many_takes_segmentations_of_any_grid(generator):
    """Segmentations of other sizes, spacings and orientations share a run (the model's frame size)."""
    a = make_volume("label", size=(12, 10, 7), spacing=(0.7, 0.9, 2.5), direction=rotation())
    b = make_volume("label", size=(9, 11, 5), spacing=(1.3, 0.6, 3.0), direction=rotation(0.1, 0.4, -0.3))
    settings = [GenerateSettings(num_inference_steps=2, seed=s) for s in (4, 8)]
    together = generator.generate_many([GenerationRequest(a, settings[0]), GenerationRequest(b, settings[1])])
    for seg, s, out in zip((a, b), settings, together, strict=True):
        alone = generator.generate(seg, settings=s)
        assert_same_geometry(out.image, seg, atol=0)
        assert np.array_equal(sitk.GetArrayFromImage(out.image), sitk.GetArrayFromImage(alone.image))
    with pytest.raises(VolgenError, match="apart from the seed"):
        other = GenerateSettings(num_inference_steps=3, seed=8)
        generator.generate_many([GenerationRequest(a, settings[0]), GenerationRequest(b, other)])


def test_volumes_together_follows_the_memory_budget(generator, seg_path):
    seg = io.read_label(seg_path)
    fixed = GenerateSettings(num_inference_steps=2, slice_batch_size=16)  # "auto" would shrink the chunk
    one = generator.memory_needed(seg, fixed)
    assert generator.memory_needed(seg, fixed, volumes=4) > one
    assert generator.volumes_together(seg, fixed, 4, max_memory=10**9) == 4
    budget = generator.memory_needed(seg, fixed, volumes=2)
    assert generator.volumes_together(seg, fixed, 4, max_memory=budget) == 2
    assert generator.volumes_together(seg, fixed, 4, max_memory=1) == 1


# ----------------------------------------------------------------------------------- files and the CLI


def test_sample_names_come_from_the_naming_home(tmp_path):
    assert sample_paths(tmp_path / "out.nii.gz", 1) == [tmp_path / "out.nii.gz"]
    assert [p.name for p in sample_paths(tmp_path / "out.nii.gz", 2)] == ["out_s0.nii.gz", "out_s1.nii.gz"]
    assert [p.name for p in sample_paths(tmp_path / "t.seg.nrrd", 2)] == ["t_s0.seg.nrrd", "t_s1.seg.nrrd"]
    assert [p.name for p in sample_paths(tmp_path / "dicom_out", 2)] == ["dicom_out_s0", "dicom_out_s1"]
    assert [p.name for p in sample_paths(tmp_path / "p.png", 2)] == ["p_s0.png", "p_s1.png"]


def test_cli_samples_write_each_seed_with_its_sidecar(seg_path, tiny_model_dir, tmp_path):
    out = tmp_path / "out.nii.gz"
    args = ["--model", tiny_model_dir, "--steps", 2, "--seed", 7]
    result = _cli("generate", seg_path, "-o", out, *args, "--samples", 3, "--slice-batch-size", 5,
                  "--progress", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    names = ["out_s0.nii.gz", "out_s1.nii.gz", "out_s2.nii.gz"]
    assert sorted(p.name for p in tmp_path.glob("out*")) == sorted(names + [n + ".json" for n in names])
    done = [json.loads(line) for line in result.output.splitlines() if '"done"' in line][0]
    assert done["outputs"] == [str(tmp_path / n) for n in names] and done["output"] == str(
        tmp_path / names[0]
    )
    for k, name in enumerate(names):
        sidecar = json.loads((tmp_path / f"{name}.json").read_text())
        assert sidecar["settings"]["seed"] == 7 + k and sidecar["output"] == str(tmp_path / name)
        single = tmp_path / f"single{k}.nii.gz"
        alone = _cli("generate", seg_path, "-o", single, *args[:-1], 7 + k, "--progress", "none")
        assert alone.exit_code == 0, alone.output
        assert np.array_equal(_bytes(tmp_path / name), _bytes(single))
        assert_same_geometry(sitk.ReadImage(str(tmp_path / name)), io.read_label(seg_path), atol=1e-5)


def test_samples_in_memory_sized_groups_give_the_same_bytes(seg_path, tmp_path, generator, monkeypatch):
    """Too many samples for the budget run in groups (two, then one): the same bytes, and the progress
    counts the whole call."""
    seg = io.read_label(seg_path)
    fixed = GenerateSettings(num_inference_steps=2, seed=11, slice_batch_size=16)
    budget = generator.memory_needed(seg, fixed, volumes=2)  # two at a time
    assert generator.volumes_together(seg, fixed, 3, max_memory=budget) == 2
    runs, seen = [], []
    real = generator.generate_many
    monkeypatch.setattr(
        generator, "generate_many", lambda requests, **kw: runs.append(len(requests)) or real(requests, **kw)
    )
    grouped = generate_samples(seg_path, tmp_path / "g.nrrd", samples=3, settings=fixed,
                               generator=generator, max_memory=budget, progress=seen.append)  # fmt: skip
    assert runs == [2, 1]
    assert seen[-1].slices_done == seen[-1].slices_total and seen[0].slices_total == seen[-1].slices_total
    whole = generate_samples(seg_path, tmp_path / "w.nrrd", samples=3, settings=fixed, generator=generator)
    assert [r.output.name for r in grouped] == ["g_s0.nrrd", "g_s1.nrrd", "g_s2.nrrd"]
    for a, b in zip(grouped, whole, strict=True):
        assert np.array_equal(_bytes(a.output), _bytes(b.output))


@pytest.mark.parametrize("samples", ["0", "-2", "10001"])
def test_bad_samples_is_one_line_and_writes_nothing(samples, seg_path, tiny_model_dir, tmp_path):
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    result = _cli("generate", seg_path, "-o", out_dir / "o.nii.gz", "--model", tiny_model_dir,
                  "--samples", samples)  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--samples" in lines[0], result.output
    assert list(out_dir.iterdir()) == []
    with pytest.raises(SettingsError, match="above"):
        generate_samples(seg_path, out_dir / "o.nii.gz", samples=2, settings=GenerateSettings(seed=2**63 - 1))


def test_an_existing_sample_output_is_refused_before_any_work(seg_path, tiny_model_dir, tmp_path):
    (tmp_path / "o_s1.nii.gz").write_bytes(b"keep me")
    result = _cli("generate", seg_path, "-o", tmp_path / "o.nii.gz", "--model", tiny_model_dir,
                  "--samples", 2, "--steps", 1)  # fmt: skip
    assert result.exit_code == 1 and "o_s1.nii.gz" in result.output and "--overwrite" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o_s1.nii.gz", "seg.nii.gz"]
    assert (tmp_path / "o_s1.nii.gz").read_bytes() == b"keep me"


@pytest.mark.parametrize("fail_on", ["volume", "sidecar"])
def test_a_failing_sample_leaves_no_sample_written(fail_on, seg_path, generator, tmp_path, monkeypatch):
    """All or nothing: when the third sample cannot be written, the first two are removed again."""
    from volgen.errors import OutputError
    from volgen.generation.sidecar import Sidecar

    calls = []
    if fail_on == "volume":
        real = io.write_volume

        def flaky(image, path, **kwargs):
            calls.append(path)
            if len(calls) == 3:
                raise OutputError(path, "disk full")
            return real(image, path, **kwargs)

        monkeypatch.setattr(io, "write_volume", flaky)
    else:
        real = Sidecar.write

        def flaky(self, path, **kwargs):
            calls.append(path)
            if len(calls) == 3:
                raise OutputError(path, "disk full")
            return real(self, path, **kwargs)

        monkeypatch.setattr(Sidecar, "write", flaky)
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    with pytest.raises(OutputError, match="disk full"):
        generate_samples(seg_path, out_dir / "o.mha", samples=3, settings=FAST, generator=generator)
    assert list(out_dir.iterdir()) == []


def test_one_sample_is_the_plain_generate(seg_path, generator, tmp_path):
    [result] = generate_samples(
        seg_path, tmp_path / "one.nii.gz", samples=1, settings=FAST, generator=generator
    )
    assert result.output.name == "one.nii.gz" and result.sidecar.name == "one.nii.gz.json"
    plain = generate(seg_path, tmp_path / "plain.nii.gz", settings=FAST, generator=generator)
    assert np.array_equal(_bytes(result.output), _bytes(plain.output))


# ----------------------------------------------------------------------------------------------- batch


def test_batch_samples_per_case_together_equal_each_alone_and_resume(tiny_model_dir, tmp_path):
    from volgen.batch import derive_seed, read_manifest

    cases = tmp_path / "cases"
    cases.mkdir()
    io.write_volume(make_volume("label", size=(10, 9, 6), direction=rotation()), cases / "a.nii.gz")
    io.write_volume(
        make_volume("label", size=(9, 11, 5), spacing=(1.3, 0.6, 3.0), direction=rotation(0.1, 0.4, -0.3)),
        cases / "b.nrrd",
    )
    out = tmp_path / "out"
    fast = ["--model", tiny_model_dir, "--steps", 2, "--device", "cpu", "--progress", "none"]
    result = _cli("batch", cases, out, *fast, "--samples-per-case", 3, "--seed", 5)
    assert result.exit_code == 0, result.output
    records = read_manifest(out / "manifest.csv")
    assert [(r.case, r.sample, r.status) for r in records] == [
        (c, k, "done") for c in ("a", "b") for k in range(3)
    ]
    for r in records:
        assert r.seed == derive_seed(5, r.case, r.sample)
        single = tmp_path / f"single_{r.case}_{r.sample}.nii.gz"
        source = cases / ("a.nii.gz" if r.case == "a" else "b.nrrd")
        alone = _cli("generate", source, "-o", single, *fast, "--seed", r.seed)
        assert alone.exit_code == 0, alone.output
        assert np.array_equal(_bytes(out / f"{r.case}_s{r.sample}.nii.gz"), _bytes(single))
        assert (
            json.loads((out / f"{r.case}_s{r.sample}.nii.gz.json").read_text())["settings"]["seed"] == r.seed
        )
    before = (out / "a_s1.nii.gz").read_bytes()
    (out / "a_s1.nii.gz").unlink()
    again = _cli("batch", cases, out, *fast, "--samples-per-case", 3, "--seed", 5, "--slice-batch-size", 7)
    assert again.exit_code == 0, again.output
    statuses = {(r.case, r.sample): r.status for r in read_manifest(out / "manifest.csv")}
    assert statuses.pop(("a", 1)) == "done" and set(statuses.values()) == {"skipped"}
    assert (out / "a_s1.nii.gz").read_bytes() == before
