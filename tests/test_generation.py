"""The generation layer: one generator, in-memory images, references, settings checked once, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volumes import assert_same_geometry, make_volume, rotation

from volgen import io
from volgen.errors import InputError, VolgenError
from volgen.generation import GenerateSettings, SettingsError, VolumeGenerator, generate, parse_memory
from volgen.io.naming import default_output, sidecar_path

FAST = GenerateSettings(num_inference_steps=2, scheduler="ddim", seed=3)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return VolumeGenerator(tiny_model_dir, device="cpu")


@pytest.fixture
def seg():
    return make_volume("label", size=(20, 14, 9), spacing=(0.8, 1.1, 2.5), direction=rotation())


def _ramp(grid, scale=1.0):
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in grid.GetSize()[::-1]), indexing="ij")
    image = sitk.GetImageFromArray((scale * (100 + 400 * (x + y) + 200 * z)).astype(np.float32))
    image.CopyInformation(grid)
    return image


def test_in_memory_generation_keeps_the_grid_and_equals_the_file_level(
    generator, seg, tiny_model_dir, tmp_path
):
    path = tmp_path / "seg.nii.gz"
    io.write_volume(seg, path)
    seg = io.read_label(path)  # NIfTI keeps geometry in float32: compare on what the file level reads
    out = generator.generate(seg, settings=FAST)
    assert_same_geometry(out.image, seg)
    assert out.image.GetSize() == seg.GetSize() and out.image.GetPixelID() == sitk.sitkFloat32
    assert out.classes_kept == ["liver", "kidney", "spleen"] and len(out.timesteps) == 2
    result = generate(path, tmp_path / "o.nii.gz", model=tiny_model_dir, settings=FAST, device="cpu")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output)))
    assert np.array_equal(written, sitk.GetArrayFromImage(out.image))


def test_one_generator_sets_the_model_up_once(tiny_model_dir, seg, tmp_path, monkeypatch):
    """Many volumes through one generator: the model is loaded and moved to its device once."""
    import volgen.generation.generator as module

    calls = []
    real = module.prepare_unet
    monkeypatch.setattr(module, "prepare_unet", lambda unet, device: calls.append(1) or real(unet, device))
    generator = VolumeGenerator(tiny_model_dir, device="cpu")
    for i in range(3):
        path = tmp_path / f"s{i}.nii.gz"
        io.write_volume(seg, path)
        generate(path, generator=generator, settings=FAST)
    assert len(calls) == 1


def test_strength_zero_is_the_reference_exactly(generator, seg):
    reference = _ramp(seg, scale=1.37)  # values beyond the model's intensity range are kept as they are
    out = generator.generate(seg, settings=GenerateSettings(strength=0.0), reference=reference)
    assert np.array_equal(sitk.GetArrayFromImage(out.image), sitk.GetArrayFromImage(reference))
    assert out.timesteps == [] and out.start_timestep == -1
    partial = generator.generate(
        seg, settings=GenerateSettings(strength=0.5, num_inference_steps=4), reference=reference
    )
    assert 0 < len(partial.timesteps) < 4 and partial.start_timestep <= 500


def test_reference_on_another_grid_is_explained_or_resampled(seg, tiny_model_dir, tmp_path):
    seg_path, ref_path = tmp_path / "seg.nii.gz", tmp_path / "ref.nii.gz"
    io.write_volume(seg, seg_path)
    fine = sitk.Resample(
        _ramp(seg),
        [40, 28, 18],
        sitk.Transform(),
        sitk.sitkLinear,
        seg.GetOrigin(),
        [s / 2 for s in seg.GetSpacing()],
        seg.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    io.write_volume(fine, ref_path)
    settings = GenerateSettings(strength=0.0)
    with pytest.raises(InputError) as error:
        generate(seg_path, tmp_path / "a.nii.gz", model=tiny_model_dir, reference=ref_path, settings=settings)
    message = str(error.value)
    assert (
        "size (40, 28, 18) vs (20, 14, 9)" in message
        and "spacing (0.4, 0.55, 1.25) vs (0.8, 1.1, 2.5)" in message
    )
    assert "origin" not in message and "--resample-reference" in message and "\n" not in message
    out = tmp_path / "b.nii.gz"
    generate(
        seg_path, out, model=tiny_model_dir, reference=ref_path, settings=settings, resample_reference=True
    )
    got = sitk.ReadImage(str(out))
    assert_same_geometry(got, seg)
    inner = (slice(1, -1),) * 3
    expected = sitk.GetArrayFromImage(_ramp(seg))[inner]
    assert np.abs(sitk.GetArrayFromImage(got)[inner] - expected).max() < 0.02 * expected.max()
    assert json.loads(sidecar_path(out).read_text())["reference_resampled"] is True


def test_ct_values_are_rounded_once_after_resampling(tmp_path, seg):
    from volgen.labels import LabelMap
    from volgen.models import (
        IntensityMapping,
        ModelMetadata,
        UNetConfig,
        build_training_scheduler,
        build_unet,
        save_model,
    )

    meta = ModelMetadata(
        name="tiny-ct",
        label_map=LabelMap(name="t", classes={"a": [1], "b": [2], "c": [3]}),
        slice_size=16,
        intensity=IntensityMapping.ct(-1000.0, 1000.0),
    )
    torch.manual_seed(1)
    folder = save_model(
        tmp_path / "ct", build_unet(UNetConfig.preset("tiny"), meta), build_training_scheduler(), meta
    )
    generator = VolumeGenerator(folder, device="cpu")
    out = generator.generate(seg, settings=FAST)
    assert out.image.GetPixelID() == sitk.sitkInt16
    # the same run kept in float: stored values are exactly its rounding (no rounding before resampling)
    floats = {}
    real = generator.metadata.intensity.__class__.to_storage

    def keep_float(self, values):
        floats["v"] = np.array(values, dtype=np.float64)
        return real(self, values)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(generator.metadata.intensity.__class__, "to_storage", keep_float)
        again = generator.generate(seg, settings=FAST)
    assert np.array_equal(sitk.GetArrayFromImage(again.image), sitk.GetArrayFromImage(out.image))
    assert not np.array_equal(floats["v"], np.round(floats["v"]))  # resampled values were not integers yet
    assert np.array_equal(sitk.GetArrayFromImage(out.image), np.round(floats["v"]).astype(np.int16))


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"num_inference_steps": 0}, "--steps must be an integer >= 1"),
        ({"seed": -1}, "--seed must be an integer in 0..9223372036854775807"),
        ({"seed": 2**63}, "--seed"),
        ({"noise_correlation": float("nan")}, "--noise-correlation"),
        ({"strength": 1.5}, "--strength"),
        ({"x0_smoothing": 11.0}, "--x0-smoothing"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'"),
        ({"unknown_labels": "keep"}, "--unknown-labels"),
        ({"slice_batch_size": 0}, "--slice-batch-size"),
    ],
)
def test_settings_are_checked_when_built(kwargs, phrase):
    with pytest.raises(SettingsError, match=phrase.replace("(", r"\(").replace(".", r"\.")):
        GenerateSettings(**kwargs)


def test_model_dependent_settings_are_checked_before_any_work(generator, seg):
    with pytest.raises(VolgenError, match="at most the model's 1000 training timesteps, got 1001"):
        generator.generate(seg, settings=GenerateSettings(num_inference_steps=1001))
    with pytest.raises(VolgenError, match="lung"):
        generator.generate(seg, settings=GenerateSettings(keep=["lung"]))


@pytest.mark.parametrize("text", ["inf", "nan", "-1G", "0", "lots", "infG"])
def test_max_memory_must_be_a_positive_finite_size(text):
    with pytest.raises(SettingsError, match="--max-memory"):
        parse_memory(text)
    assert parse_memory("1.5G") == int(1.5 * 2**30) and parse_memory(None) is None


def test_cuda_without_cuda_is_one_line(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="^--device cuda: no CUDA device is available"):
        VolumeGenerator(tiny_model_dir, device="cuda")


def test_sidecar_names_are_unique_per_output(seg, tiny_model_dir, tmp_path):
    path = tmp_path / "seg.nii.gz"
    io.write_volume(seg, path)
    for name in ("t.nrrd", "t.mha", "t.nii.gz"):
        generate(path, tmp_path / name, model=tiny_model_dir, settings=FAST)
    for name in ("t.nrrd", "t.mha", "t.nii.gz"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["output"] == str(tmp_path / name)
    assert sidecar_path(tmp_path / "dicom_out") == tmp_path / "dicom_out.json"
    assert default_output(tmp_path / "case.seg.nrrd") == tmp_path / "case_synthetic.nii.gz"
    assert default_output(tmp_path / "case.mha") == tmp_path / "case_synthetic.mha"
    assert default_output(tmp_path / "series") == tmp_path / "series_synthetic.nii.gz"


def test_a_failing_preview_keeps_the_volume_and_sidecar(seg, tiny_model_dir, tmp_path, monkeypatch):
    import volgen.preview

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(volgen.preview, "save_montage", broken)
    path = tmp_path / "seg.nii.gz"
    io.write_volume(seg, path)
    result = generate(
        path, tmp_path / "o.nii.gz", model=tiny_model_dir, settings=FAST, preview=tmp_path / "p.png"
    )
    assert result.output.is_file() and result.sidecar.is_file() and result.preview is None
    assert len(result.warnings) == 1 and "matplotlib" in result.warnings[0]
    assert not (tmp_path / "p.png").exists()


def test_the_dry_run_asks_the_generator(generator, seg):
    """Slice-forwards for estimates come from the pipeline's own timestep selection and padding."""
    from volgen.generation import slices_along

    z = slices_along(seg, generator.metadata.slice_axis)
    full = generator.slice_forwards(seg, GenerateSettings(num_inference_steps=4, slice_batch_size=4))
    padded = sum(n + (-n % 8) for n in [min(4, z - s) for s in range(0, z, 4)])
    assert full == 4 * padded
    half = generator.slice_forwards(
        seg, GenerateSettings(num_inference_steps=4, strength=0.5, scheduler="ddim", slice_batch_size=4)
    )
    assert half == 2 * padded  # trailing DDIM timesteps 999, 749, 499, 249: two are <= 500
    assert generator.weights_bytes > 0 and generator.memory_needed(seg, GenerateSettings()) > 0
