"""Augmentation: image and masks move together, reproducible per seed, nothing else's randomness disturbed."""

from __future__ import annotations

import pytest
import torch

from volgen.augmentation import AugmentationConfig, Augmenter

SIZE = 32
INTENSITY_OFF = dict(gamma_p=0.0, bias_field_p=0.0, noise_p=0.0)


def _sample() -> tuple[torch.Tensor, torch.Tensor]:
    """Three context slices with a box (class 1) and a disc (class 2); the image is a function of them."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    labels = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    labels[:, 6:14, 4:12] = 1
    labels[:, ((y - 20) ** 2 + (x - 21) ** 2) < 36] = 2
    image = (torch.tensor([-1.0, 0.0, 0.8])[labels[1].long()])[None]
    return image, labels


def test_same_seed_same_result_and_the_global_generator_is_untouched():
    augment = Augmenter(AugmentationConfig(), slice_size=SIZE, modality="MR", slice_axis="axial")
    image, labels = _sample()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = augment(image, labels, 7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = augment(image, labels, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == image.shape and a[1].shape == labels.shape and a[1].dtype == labels.dtype
    assert float(a[0].min()) >= -1.0 and float(a[0].max()) <= 1.0
    differ = sum(not torch.equal(augment(image, labels, s)[1], labels) for s in range(8))
    assert differ >= 4  # most seeds move the anatomy


def test_image_and_masks_are_transformed_together():
    config = AugmentationConfig(affine_p=1.0, elastic_p=1.0, degrees=25, **INTENSITY_OFF)
    augment = Augmenter(config, slice_size=SIZE, modality="MR", slice_axis="axial")
    image, labels = _sample()
    expected_of = torch.tensor([-1.0, 0.0, 0.8])
    for seed in range(4):
        out_image, out_labels = augment(image, labels, seed)
        assert not torch.equal(out_labels, labels)
        assert torch.equal(out_labels[0], out_labels[1]) and torch.equal(out_labels[1], out_labels[2])
        expected = expected_of[out_labels[1].long()]
        # interpolation blurs the edges only: image and moved labels agree, image and unmoved labels do not
        moved = float((out_image[0] - expected).abs().mean())
        unmoved = float((out_image[0] - expected_of[labels[1].long()]).abs().mean())
        assert moved < 0.06 and moved < 0.8 * unmoved, (moved, unmoved)


def test_flips_only_left_right_in_plane_and_intensity_transforms_only_for_mr():
    flip_only = AugmentationConfig(affine_p=0.0, elastic_p=0.0, **INTENSITY_OFF)
    image, labels = _sample()
    axial = Augmenter(flip_only, slice_size=SIZE, modality="MR", slice_axis="axial")
    flipped = [
        augment_labels
        for seed in range(8)
        if not torch.equal(augment_labels := axial(image, labels, seed)[1], labels)
    ]
    assert flipped and all(torch.equal(f, labels.flip(-1)) for f in flipped)  # W is left-right
    sagittal = Augmenter(flip_only, slice_size=SIZE, modality="MR", slice_axis="sagittal")
    assert all(torch.equal(sagittal(image, labels, seed)[1], labels) for seed in range(8))

    def names(augmenter):
        return {type(t).__name__ for t in augmenter.transform.transforms}

    config = AugmentationConfig()
    assert {"RandomGamma", "RandomBiasField", "RandomNoise"} <= names(
        Augmenter(config, slice_size=SIZE, modality="MR", slice_axis="axial")
    )
    ct = names(Augmenter(config, slice_size=SIZE, modality="CT", slice_axis="axial"))
    assert "RandomGamma" not in ct and "RandomBiasField" not in ct and "RandomNoise" in ct


def test_augmentation_seeds_depend_on_seed_step_and_global_position_only():
    from volgen.training import StepBatchSampler

    whole = StepBatchSampler(50, 8, seed=3, start_step=0, end_step=4, augment_seeds=True)
    halves = [
        StepBatchSampler(50, 8, seed=3, start_step=2, end_step=4, augment_seeds=True, rank=r, world_size=2)
        for r in range(2)
    ]
    steps = list(whole)
    resumed = [a + b for a, b in zip(*(list(h) for h in halves), strict=True)]
    assert steps[2:] == resumed  # a resumed run, on any number of processes, draws the same pairs
    seeds = [s for batch in steps for _, s in batch]
    assert len(set(seeds)) == len(seeds)


def test_config_rejects_out_of_range_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        AugmentationConfig(affine_p=1.5)
    with pytest.raises(ValidationError):
        AugmentationConfig(unknown=1)


def test_collate_gives_samples_sharing_a_seed_one_draw_and_keeps_unseeded_samples():
    from volgen.augmentation import AugmentingCollate

    augment = Augmenter(
        AugmentationConfig(affine_p=1.0, **INTENSITY_OFF), slice_size=SIZE, modality="MR", slice_axis="axial"
    )
    image, labels = _sample()
    item = {"image": image, "context": labels}
    batch = AugmentingCollate(augment)([{**item, "seed": 5}, {**item, "seed": 5}, {**item, "seed": 6}])
    assert batch["image"].shape == (3, 1, SIZE, SIZE) and batch["context"].shape == (3, 3, SIZE, SIZE)
    assert torch.equal(batch["context"][0], batch["context"][1])  # one draw for the group
    assert not torch.equal(batch["context"][1], batch["context"][2])
    single = augment(image, labels, 6)
    assert torch.equal(batch["image"][2], single[0]) and torch.equal(batch["context"][2], single[1])
    plain = AugmentingCollate(augment)([{**item, "seed": None}])
    assert torch.equal(plain["image"][0], image) and torch.equal(plain["context"][0], labels)


def test_groups_of_samples_per_draw_align_with_global_positions():
    from volgen.training import StepBatchSampler

    sampler = StepBatchSampler(
        50, 8, seed=3, start_step=0, end_step=2, augment_seeds=True, samples_per_draw=4
    )
    for batch in sampler:
        seeds = [s for _, s in batch]
        assert seeds[0] == seeds[3] != seeds[4] == seeds[7]
