"""The fine-scale ρ of the initial noise: ``auto`` (the default) follows the slice spacing, an explicit value
is kept, and what ran is recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import make_volume, rotation

from volgen import defaults, io
from volgen.api import generate
from volgen.cli.app import _register, app
from volgen.errors import VolgenError
from volgen.generation import GenerateSettings, GenerationRequest, VolumeGenerator
from volgen.models import load_model

_register()
(NEAR, NEAR_RHO), (FAR, FAR_RHO) = defaults.FINE_NOISE_BY_SPACING[0], defaults.FINE_NOISE_BY_SPACING[-1]


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> VolumeGenerator:
    return VolumeGenerator(load_model(tiny_model_dir), device="cpu")


def _fine(generator, seg, **settings) -> float:
    return generator.plan(seg, GenerateSettings(**settings)).fine_noise_correlation


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        (NEAR / 2, NEAR_RHO),
        (NEAR, NEAR_RHO),
        ((NEAR + FAR) / 2, (NEAR_RHO + FAR_RHO) / 2),
        (FAR, FAR_RHO),
        (FAR * 3, FAR_RHO),
    ],
)
def test_auto_follows_the_slice_spacing(generator, spacing, expected):
    seg = make_volume("label", spacing=(0.7, 0.9, spacing))  # oblique: the z axis is the closest to S
    assert defaults.FINE_NOISE_CORRELATION == "auto"
    assert _fine(generator, seg) == pytest.approx(expected)


def test_auto_for_a_native_model_follows_the_native_table(tmp_path):
    """A native-resolution model's noise is finer anatomy: its own table, not the fitted frame's."""
    from test_native import _untrained_native

    native = VolumeGenerator(_untrained_native(tmp_path), device="cpu")
    (near, near_rho), (far, far_rho) = defaults.NATIVE_FINE_NOISE_BY_SPACING[
        :: len(defaults.NATIVE_FINE_NOISE_BY_SPACING) - 1
    ]
    for spacing, expected in [
        (near, near_rho),
        ((near + far) / 2, (near_rho + far_rho) / 2),
        (far * 2, far_rho),
    ]:
        assert _fine(native, make_volume("label", spacing=(0.7, 0.9, spacing))) == pytest.approx(expected)
    assert far_rho != FAR_RHO  # measured apart: at 2 mm the fitted frame's 0 flickers in a native model


def test_the_slice_spacing_is_that_of_the_axis_along_the_slices(generator):
    """Array axes in another order (the first one runs inferior-superior): its spacing is the slices'."""
    permuted = np.array(rotation(0.1, 0.05, -0.1)).reshape(3, 3)[:, [2, 0, 1]]
    seg = make_volume("label", spacing=(FAR * 2, NEAR / 2, NEAR / 2), direction=tuple(permuted.ravel()))
    assert _fine(generator, seg) == pytest.approx(FAR_RHO)
    seg = make_volume("label", spacing=(NEAR / 2, FAR * 2, FAR * 2), direction=tuple(permuted.ravel()))
    assert _fine(generator, seg) == pytest.approx(NEAR_RHO)


def test_an_explicit_value_is_kept_and_one_run_has_one_fine_rho(generator):
    near = make_volume("label", spacing=(0.7, 0.9, NEAR))
    far = make_volume("label", spacing=(0.7, 0.9, FAR))
    assert _fine(generator, near, fine_noise_correlation=0.3) == 0.3
    assert _fine(generator, far, fine_noise_correlation=0.3) == 0.3
    auto = GenerateSettings(num_inference_steps=1)
    with pytest.raises(VolgenError, match="fine ρ"):
        generator.generate_many([GenerationRequest(near, auto), GenerationRequest(far, auto)])
    fixed = GenerateSettings(num_inference_steps=1, fine_noise_correlation=0.3)
    together = generator.generate_many([GenerationRequest(near, fixed), GenerationRequest(far, fixed)])
    assert [v.fine_noise_correlation for v in together] == [0.3, 0.3]


def test_the_sidecar_records_what_ran_and_bad_values_are_one_line(tiny_model_dir, tmp_path):
    seg = tmp_path / "seg.nii.gz"
    io.write_volume(make_volume("label", spacing=(0.7, 0.9, FAR)), seg)
    runner = CliRunner()
    out = tmp_path / "out.nii.gz"
    common = ["--model", str(tiny_model_dir), "--steps", "1", "--progress", "none"]
    result = runner.invoke(app, ["generate", str(seg), "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(io.sidecar_path(out).read_text(encoding="utf-8"))
    assert sidecar["settings"]["fine_noise_correlation"] == "auto"
    assert sidecar["fine_noise_correlation"] == pytest.approx(FAR_RHO)

    result = runner.invoke(
        app, ["generate", str(seg), "-o", str(out), *common, "--rho-fine", "0.4", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(io.sidecar_path(out).read_text(encoding="utf-8"))["fine_noise_correlation"] == 0.4

    for bad in ("lots", "1.5"):
        result = runner.invoke(
            app, ["generate", str(seg), "-o", str(tmp_path / "x.nii.gz"), *common, "--rho-fine", bad]
        )
        assert result.exit_code != 0
        assert "--fine-noise-correlation" in result.output
        assert not (tmp_path / "x.nii.gz").exists()


def test_a_stochastic_sampler_s_step_noise_is_correlated_between_slices_like_the_initial_noise(
    tiny_model_dir, tmp_path
):
    """SDE DPM-Solver adds fresh noise every step; drawn per slice it would make neighbouring slices as
    different as unrelated ones (flicker) whatever ρ is. With ρ 0.99 at every scale and a mask that is the
    same in every slice, its neighbouring slices differ about as little as the deterministic solver's do."""
    labels = np.zeros((12, 16, 16), np.uint8)
    labels[:, 4:12, 3:13], labels[:, 6:10, 6:10] = 1, 2
    seg = tmp_path / "seg.nii.gz"
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.0, 1.0, 2.0))
    io.write_volume(image, seg)

    def neighbour_step(scheduler: str, rho: float) -> float:
        out = tmp_path / f"{scheduler}-{rho}.nii.gz"
        rhos = {"noise_correlation": rho, "fine_noise_correlation": rho}
        settings = GenerateSettings(scheduler=scheduler, num_inference_steps=4, seed=1, **rhos)
        generate(seg, out, model=tiny_model_dir, settings=settings, device="cpu")
        volume = sitk.GetArrayFromImage(io.read_image(out)).astype(np.float64)
        return float(np.abs(np.diff(volume, axis=0)).mean() / volume.std())

    ode, sde = neighbour_step("dpmsolver++", 0.99), neighbour_step("sde-dpmsolver++", 0.99)
    assert sde < 1.5 * ode
    assert neighbour_step("sde-dpmsolver++", 0.0) > 4 * sde  # the measure sees independent slices
