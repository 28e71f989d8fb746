"""Metrics: consistency ratios see through-plane flicker; Dice and the intensity segmenter on toy arrays."""

from __future__ import annotations

import numpy as np

from volgen.evaluation import IntensitySegmenter, consistency, dice, mean_abs_step


def _smooth_volume(rng: np.random.Generator) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in (20, 24, 28)), indexing="ij")
    return np.sin(3 * x) + np.cos(2 * y) + z + 0.01 * rng.standard_normal(x.shape)


def test_flicker_between_slices_shows_in_the_slice_axis_only():
    rng = np.random.default_rng(0)
    real = _smooth_volume(rng)
    mask = np.ones(real.shape, dtype=np.uint8)
    flicker = real + 0.3 * rng.standard_normal((real.shape[0], 1, 1))  # one offset per slice
    c = consistency(flicker, real, mask, slice_axis="z")
    assert c.ratio["z"] > 5
    assert abs(c.ratio["y"] - 1) < 0.05 and abs(c.ratio["x"] - 1) < 0.05
    assert c.anisotropy > 5
    same = consistency(real, real, mask)
    assert all(abs(v - 1) < 1e-12 for v in same.ratio.values()) and abs(same.anisotropy - 1) < 1e-12


def test_mean_abs_step_counts_only_pairs_inside_the_mask():
    volume = np.zeros((4, 3, 3))
    volume[2:] = 10.0
    mask = np.ones_like(volume, dtype=np.uint8)
    assert mean_abs_step(volume, mask, axis=0) == 10.0 / 3
    mask[2:] = 0  # the jump is now outside
    assert mean_abs_step(volume, mask, axis=0) == 0.0


def test_dice_and_intensity_segmenter():
    target = np.array([0, 0, 1, 1, 2, 2])
    assert dice(target, target, [1, 2]) == {1: 1.0, 2: 1.0}
    assert dice(np.array([0, 1, 1, 1, 2, 2]), target, [1]) == {1: 0.8}
    assert np.isnan(dice(target, target, [7])[7])
    image = np.array([0.0, 0.1, 5.0, 5.2, 9.9, 10.0])
    segmenter = IntensitySegmenter().fit(image, target)
    assert segmenter.predict(image).tolist() == target.tolist()
    assert segmenter.predict(np.array([4.0, 8.0])).tolist() == [1, 2]
