"""Per-plane consistency metrics: a real volume scores 1.0 against itself; streaks and flicker are flagged."""

from __future__ import annotations

import numpy as np
import pytest

from volgen.evaluation import RandomConvFeatures, frechet_distance, plane_consistency, texture_correlation
from volgen.evaluation.planes import _gaussian_1d, plane_names

SHAPE = (24, 36, 40)  # (z, y, x)


def _blur(volume: np.ndarray, axes: tuple[int, ...], sigma: float) -> np.ndarray:
    for axis in axes:
        volume = _gaussian_1d(volume, axis, sigma)
    return volume


def _texture(rng: np.random.Generator, through_plane: bool) -> np.ndarray:
    """Grain blurred in-plane (σ 1 voxel) and, for a real-like 3D texture, a little through-plane (σ 0.7)."""
    noise = _blur(rng.standard_normal(SHAPE), (1, 2), 1.0)
    if through_plane:
        noise = _blur(noise, (0,), 0.7)
    return 20.0 * noise / noise.std()


@pytest.fixture(scope="module")
def volumes():
    """A head-like ellipsoid (two tissues, smooth shading) with a 3D texture; streak and flicker versions."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    r = np.sqrt((z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.85) ** 2)
    mask = np.where(r < 0.5, 2, np.where(r < 0.85, 1, 0)).astype(np.uint8)
    anatomy = np.where(mask == 2, 600.0, 300.0) + 80.0 * x + 40.0 * z
    body = mask > 0
    texture = _texture(rng, True)
    real = np.where(body, anatomy + texture, 0.0)
    # streaks: every slice carries the texture of one slice (what ρ -> 1 does to the initial noise)
    streaks = np.where(body, anatomy + texture[SHAPE[0] // 2][None], 0.0)
    # flicker: every slice's texture is an independent draw (ρ = 0), with the same in-plane statistics
    flicker = np.where(body, anatomy + _texture(rng, False), 0.0)
    return {"mask": mask, "real": real, "streaks": streaks, "flicker": flicker}


def test_a_real_volume_against_itself_scores_one(volumes):
    planes = plane_consistency(volumes["real"], volumes["real"], volumes["mask"])
    assert list(planes) == ["z", "y", "x"]
    for metrics in planes.values():
        summary = metrics.summary()
        for key in ("step_ratio_body", "step_ratio_background", "texture_ratio", "high_frequency_ratio"):
            assert summary[key] == pytest.approx(1.0, abs=1e-12), key
        assert summary["spectral_distance"] == pytest.approx(0.0, abs=1e-12)
        assert summary["feature_distance"] == pytest.approx(0.0, abs=1e-6)
        assert metrics.feature_floor >= 0
    # real texture is partly shared between neighbouring slices, as in real scans
    assert 0.2 < planes["z"].texture["real"] < 0.9


def test_streaks_are_flagged_along_the_slice_axis(volumes):
    planes = plane_consistency(volumes["streaks"], volumes["real"], volumes["mask"])
    z = planes["z"].summary()
    assert z["step_ratio_body"] < 0.85  # smoother than real through-plane ...
    assert z["texture_ratio"] > 1.25  # ... because the texture is copied from slice to slice
    for axis in ("y", "x"):  # in-plane the slices are as textured as real ones
        assert 0.85 < planes[axis].summary()["step_ratio_body"] < 1.2
        assert 0.8 < planes[axis].summary()["texture_ratio"] < 1.25
        assert planes[axis].feature_distance > 0 and planes[axis].spectral_distance > 0


def test_a_volume_of_copies_of_one_slice_is_flagged(volumes):
    copies = np.repeat(volumes["real"][SHAPE[0] // 2][None], SHAPE[0], axis=0)
    planes = plane_consistency(copies, volumes["real"], volumes["mask"])
    assert planes["z"].step_body["ratio"] < 0.85
    assert planes["z"].texture["ratio"] > 1.25 and planes["z"].texture["generated"] > 0.99


def test_flicker_is_flagged_along_the_slice_axis(volumes):
    planes = plane_consistency(volumes["flicker"], volumes["real"], volumes["mask"])
    z = planes["z"].summary()
    assert z["step_ratio_body"] > 1.2  # neighbouring slices disagree ...
    assert z["texture_ratio"] < 0.8  # ... because their textures are unrelated
    for axis in ("y", "x"):
        assert 0.85 < planes[axis].summary()["step_ratio_body"] < 1.2
        assert planes[axis].high_frequency_ratio > 1.0  # the reslices gain grain along z
        assert planes[axis].feature_distance > 0 and planes[axis].spectral_distance > 0


def test_a_noisy_background_is_flagged_outside_the_body(volumes):
    rng = np.random.default_rng(1)
    grey_air = np.where(volumes["mask"] > 0, volumes["real"], 40.0 + 15.0 * rng.standard_normal(SHAPE))
    planes = plane_consistency(grey_air, volumes["real"], volumes["mask"])
    for metrics in planes.values():
        assert metrics.step_background["ratio"] > 2.0
        assert metrics.step_body["ratio"] == pytest.approx(1.0)


def test_texture_correlation_extremes():
    rng = np.random.default_rng(2)
    body = np.ones((10, 16, 16), dtype=bool)
    copies = np.repeat(rng.standard_normal((1, 16, 16)), 10, axis=0)
    assert texture_correlation(copies, body, 0) == pytest.approx(1.0)
    assert abs(texture_correlation(rng.standard_normal((10, 16, 16)), body, 0)) < 0.1


def test_features_are_deterministic_and_the_distance_is_a_distance():
    rng = np.random.default_rng(3)
    planes = rng.random((12, 20, 24))
    a, b = RandomConvFeatures()(planes), RandomConvFeatures()(planes)
    assert np.array_equal(a, b) and a.shape == (12, RandomConvFeatures().dim)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = RandomConvFeatures()(planes + 0.5)  # brighter planes are seen
    assert frechet_distance(a, shifted) > 0.1


def test_plane_names_follow_the_geometry():
    assert plane_names((1, 0, 0, 0, 1, 0, 0, 0, 1)) == {"z": "axial", "y": "coronal", "x": "sagittal"}
    # a coronal acquisition: the third voxel axis runs A/P
    assert plane_names((1, 0, 0, 0, 0, 1, 0, 1, 0))["z"] == "coronal"
    assert plane_names(None) == {"z": "⊥ z", "y": "⊥ y", "x": "⊥ x"}
    with pytest.raises(ValueError, match="one 3D grid"):
        plane_consistency(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), np.zeros((4, 4, 4)))
