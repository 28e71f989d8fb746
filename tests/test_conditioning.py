"""Conditioning: mask ablation statistics, encodings, 2.5D context and class selection."""

from __future__ import annotations

import pytest
import torch

from volgen.conditioning import (
    channels_per_slice,
    condition_channels,
    condition_slices,
    context_stack,
    draw_ablation,
    encode,
    remove_classes,
    selection_to_removed,
)
from volgen.errors import LabelError
from volgen.labels import LabelMap

N = 20000


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_ablation_drops_each_class_with_probability_p_independently(p):
    c = 5
    removed = draw_ablation(N, c, p, generator=_generator(1))
    assert removed.shape == (N, c) and removed.dtype == torch.bool
    assert not removed[:, 0].any()  # background is never removed
    tolerance = 4 * (p * (1 - p) / N) ** 0.5 + 1e-3
    freq = removed[:, 1:].float().mean(dim=0)
    assert torch.all((freq - p).abs() < tolerance), freq
    for i in range(1, c):
        for j in range(i + 1, c):
            joint = (removed[:, i] & removed[:, j]).float().mean()
            assert abs(float(joint) - p * p) < tolerance, (i, j, joint)
    # per sample, not per batch: the rows differ
    same_as_first = (removed == removed[0]).all(dim=1).float().mean()
    assert float(same_as_first) < 0.2


def test_ablation_edge_probabilities_and_determinism():
    assert not draw_ablation(1000, 4, 0.0, generator=_generator()).any()
    everything = draw_ablation(1000, 4, 1.0, generator=_generator())
    assert everything[:, 1:].all() and not everything[:, 0].any()
    a = draw_ablation(64, 4, 0.5, generator=_generator(7))
    b = draw_ablation(64, 4, 0.5, generator=_generator(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        draw_ablation(4, 4, 1.5)


def test_removal_is_identical_across_context_slices_and_leaves_other_classes():
    g = _generator(3)
    b, s, c = 64, 5, 6
    stack = torch.randint(0, c, (b, s, 8, 8), generator=g, dtype=torch.uint8)
    original = stack.clone()
    removed = draw_ablation(b, c, 0.5, generator=g)
    out = remove_classes(stack, removed)
    assert torch.equal(stack, original)  # input untouched
    assert out.dtype == stack.dtype and out.shape == stack.shape
    for i in range(b):
        dropped = removed[i][stack[i].long()]  # (S, H, W): voxel's class removed for this sample
        assert torch.equal(out[i][dropped], torch.zeros_like(out[i][dropped]))
        assert torch.equal(out[i][~dropped], stack[i][~dropped])
    assert remove_classes(stack, None) is stack


def test_training_condition_never_changes_the_image():
    from volgen.data import PreparedVolume, SliceDataset

    g = _generator(5)
    labels = torch.randint(0, 4, (6, 8, 8), generator=g, dtype=torch.uint8)
    image = torch.rand(6, 8, 8, generator=g) * 2 - 1
    dataset = SliceDataset([PreparedVolume("v", image.clone(), labels.clone(), (0.0, 1.0))], context_slices=1)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(6)])
    before = batch["image"].clone()
    removed = draw_ablation(6, 4, 1.0, generator=g)
    cond = encode(remove_classes(batch["context"], removed), 4, "onehot")
    assert not cond.any()  # everything dropped: an empty condition ...
    assert torch.equal(batch["image"], before)  # ... and the target image is as it was
    assert torch.equal(batch["image"][:, 0], image)


def test_onehot_encoding_shape_values_and_slice_major_order():
    g = _generator(9)
    b, s, c = 3, 3, 5
    stack = torch.randint(0, c, (b, s, 4, 6), generator=g)
    enc = encode(stack, c, "onehot")
    assert enc.shape == (b, s * (c - 1), 4, 6) and enc.dtype == torch.float32
    assert set(enc.unique().tolist()) <= {0.0, 1.0}
    for si in range(s):
        for cls in range(1, c):
            assert torch.equal(enc[:, si * (c - 1) + cls - 1], (stack[:, si] == cls).float())
    assert torch.equal(enc.reshape(b, s, c - 1, 4, 6).sum(dim=2), (stack > 0).float())


def test_seed_encoding_is_class_over_255():
    stack = torch.tensor([[[[0, 1], [2, 255]]]], dtype=torch.uint8)
    enc = encode(stack, 256, "seed")
    assert enc.shape == (1, 1, 2, 2) and enc.dtype == torch.float32
    assert torch.allclose(enc, torch.tensor([[[[0.0, 1 / 255], [2 / 255, 1.0]]]]))
    with pytest.raises(ValueError):
        encode(stack, 3, "rgb")


def test_context_at_volume_edges_is_background():
    volume = (
        torch.arange(1, 6, dtype=torch.uint8)[:, None, None].expand(5, 3, 3).contiguous()
    )  # slice z = z + 1
    stack = context_stack(volume, [0, 2, 4], 2)
    assert stack.shape == (3, 5, 3, 3) and stack.dtype == volume.dtype
    values = stack[:, :, 0, 0].tolist()
    assert values == [[0, 0, 1, 2, 3], [1, 2, 3, 4, 5], [3, 4, 5, 0, 0]]
    assert torch.equal(context_stack(volume, [1], 0)[:, 0], volume[1:2])


def test_condition_slices_composes_context_removal_and_encoding():
    g = _generator(11)
    volume = torch.randint(0, 4, (7, 5, 5), generator=g)
    z = torch.tensor([0, 3, 6])
    removed = draw_ablation(3, 4, 0.5, generator=g)
    got = condition_slices(volume, z, num_classes=4, encoding="onehot", context_slices=1, removed=removed)
    expected = encode(remove_classes(context_stack(volume, z, 1), removed), 4, "onehot")
    assert torch.equal(got, expected) and got.shape == (3, 9, 5, 5)


def test_keep_and_drop_selection_sets_dropped_classes_to_background():
    label_map = LabelMap(name="t", classes={"liver": [1], "kidney": [2, 5], "spleen": [3]})
    keep = label_map.selection(keep=["kidney"])
    assert keep == [2]
    assert label_map.selection(drop=["liver", "spleen"]) == [2]
    assert label_map.selection() == [1, 2, 3]
    removed = selection_to_removed(keep, label_map.num_classes)
    assert removed.tolist() == [False, True, False, True]
    volume = (
        torch.tensor([0, 1, 2, 3])[None, :, None].expand(3, 4, 2).contiguous()
    )  # every class in every slice
    cond = condition_slices(
        volume, [0, 1, 2], num_classes=4, encoding="seed", context_slices=1, removed=removed
    )
    kept_values = set((cond * 255).round().long().unique().tolist())
    assert kept_values == {0, 2}
    stack = remove_classes(context_stack(volume, [1], 1), removed)
    assert torch.equal(stack[0, 1, :, 0], torch.tensor([0, 0, 2, 0]))
    with pytest.raises(LabelError):
        label_map.selection(keep=["liver"], drop=["spleen"])
    with pytest.raises(LabelError, match="kidney"):
        label_map.selection(keep=["pancreas"])


@pytest.mark.parametrize(
    ("num_classes", "encoding", "context", "expected"),
    [(4, "onehot", 0, 3), (4, "onehot", 1, 9), (5, "onehot", 2, 20), (4, "seed", 0, 1), (200, "seed", 2, 5)],
)
def test_condition_channel_counts(num_classes, encoding, context, expected):
    assert condition_channels(num_classes, encoding, context) == expected
    assert channels_per_slice(num_classes, encoding) * (2 * context + 1) == expected
    volume = torch.zeros(3, 4, 4, dtype=torch.long)
    cond = condition_slices(volume, [1], num_classes=num_classes, encoding=encoding, context_slices=context)
    assert cond.shape[1] == expected


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="encoding"):
        channels_per_slice(4, "rgb")
