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


# ----------------------------------------------------------------------------------------------------
# The condition vector ("specified" flags, slice axis) and context padding


def test_condition_vector_holds_flags_then_axis_onehot():
    from volgen.conditioning import ConditionLayout, condition_vector

    specified = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    flags = ConditionLayout(specified_flags=True)
    assert flags.dim(4) == 3
    assert torch.equal(condition_vector(specified, layout=flags), specified.float())
    assert condition_vector(specified, layout=None) is None
    assert condition_vector(specified, layout=ConditionLayout(specified_flags=False, axes=(0,))) is None

    both = ConditionLayout(specified_flags=True, axes=(0, 2))
    assert both.dim(4) == 5
    vector = condition_vector(specified, axis=2, layout=both)
    assert vector.shape == (2, 5) and vector.dtype == torch.float32
    assert torch.equal(vector[:, 3:], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="axis"):
        condition_vector(specified, axis=1, layout=both)
    with pytest.raises(ValueError):
        ConditionLayout(axes=(0, 0))


def test_unet_condition_appends_the_vector_as_constant_channels():
    from volgen.conditioning import specified_from_removed, unet_condition

    masks = torch.rand(2, 6, 5, 7)
    removed = torch.tensor([[False, True, False, False], [False, False, False, True]])
    specified = specified_from_removed(removed, 2, 4)
    assert torch.equal(specified, torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    assert torch.equal(specified_from_removed(None, 3, 4), torch.ones(3, 3))
    assert torch.equal(
        specified_from_removed(selection_to_removed([2], 4), 2, 4), torch.tensor([[0.0, 1, 0]] * 2)
    )
    out = unet_condition(masks, specified)
    assert out.shape == (2, 9, 5, 7)
    assert torch.equal(out[:, :6], masks)
    assert torch.equal(out[:, 6:], specified[:, :, None, None].expand(2, 3, 5, 7))
    assert unet_condition(masks, None) is masks


def test_replicate_padding_repeats_the_edge_slices():
    volume = torch.arange(1, 4)[:, None, None].expand(3, 2, 2)  # slices hold 1, 2, 3
    background = context_stack(volume, [0, 2], 2)
    replicate = context_stack(volume, [0, 2], 2, padding="replicate")
    assert background[:, :, 0, 0].tolist() == [[0, 0, 1, 2, 3], [1, 2, 3, 0, 0]]
    assert replicate[:, :, 0, 0].tolist() == [[1, 1, 1, 2, 3], [1, 2, 3, 3, 3]]
    with pytest.raises(ValueError, match="padding"):
        context_stack(volume, [0], 1, padding="mirror")


def _capture_unet_inputs(pipe):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen, handle


def _flagged_model(tmp_path, padding="background"):
    from volgen.conditioning import ConditionLayout
    from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet, save_model

    torch.manual_seed(0)
    label_map = LabelMap(name="test", classes={"liver": [1], "kidney": [2], "spleen": [3]})
    metadata = ModelMetadata(
        name="flags",
        label_map=label_map,
        slice_size=16,
        context_slices=1,
        condition=ConditionLayout(specified_flags=True, context_padding=padding),
    )
    unet = build_unet(UNetConfig.preset("tiny"), metadata)
    return save_model(tmp_path / "flags", unet, build_training_scheduler(), metadata)


def _pipeline(folder):
    from volgen.models import load_model
    from volgen.pipeline import SegmentationToVolumePipeline

    loaded = load_model(folder)
    meta = loaded.metadata
    return SegmentationToVolumePipeline(
        loaded.unet,
        loaded.scheduler,
        encoding=meta.encoding,
        context_slices=meta.context_slices,
        num_classes=meta.num_classes,
        condition=None if meta.condition is None else meta.condition.model_dump(mode="json"),
    )


def test_specified_flags_round_trip_and_reach_the_unet_at_generation(tmp_path):
    import json

    from volgen.models import load_model

    folder = _flagged_model(tmp_path, padding="replicate")
    meta = load_model(folder).metadata
    assert meta.condition is not None and meta.condition.specified_flags
    assert meta.condition.context_padding == "replicate"
    # a pipeline setting: stored once, in the pipeline's config (model_index.json), not in volgen.json
    stored = json.loads((folder / "model_index.json").read_text())["condition"]
    assert stored == {"specified_flags": True, "axes": [], "context_padding": "replicate"}
    assert "condition" not in json.loads((folder / "volgen.json").read_text())
    assert load_model(folder).unet.config.in_channels == 1 + 3 * 3 + 3

    pipe = _pipeline(folder)
    labels = torch.randint(0, 4, (5, 16, 16), generator=_generator(2))
    seen, handle = _capture_unet_inputs(pipe)
    try:
        # unguided: one pass (guidance adds a pass with nothing specified: tests/test_guidance.py)
        pipe(labels, num_inference_steps=2, seed=0, scheduler="ddim", guidance_scale=1.0)
        everything = torch.cat([s[:5] for s in seen])  # each forward is padded to 8 slices
        seen.clear()
        pipe(labels, num_inference_steps=2, seed=0, scheduler="ddim", keep=[1, 3], guidance_scale=1.0)
        kept = torch.cat([s[:5] for s in seen])
    finally:
        handle.remove()
    assert torch.all(everything[:, -3:] == 1.0)  # every class specified: background means background
    assert torch.all(kept[:, -3:] == torch.tensor([1.0, 0.0, 1.0])[None, :, None, None])
    # replicate padding: slice 0's context below it repeats slice 0
    first = kept[0, 1:10]
    assert torch.equal(first[0:3], first[3:6])


def test_models_without_a_condition_vector_feed_the_unet_exactly_the_mask_channels(tiny_model_dir):
    import json

    from volgen.models import load_model

    assert load_model(tiny_model_dir).metadata.condition is None
    assert "condition" not in json.loads((tiny_model_dir / "model_index.json").read_text())
    pipe = _pipeline(tiny_model_dir)
    assert pipe.condition_layout is None
    labels = torch.randint(0, 4, (5, 16, 16), generator=_generator(4))
    seen, handle = _capture_unet_inputs(pipe)
    try:
        pipe(labels, num_inference_steps=1, seed=0, scheduler="ddim", keep=[2], slice_batch_size=8)
    finally:
        handle.remove()
    expected = condition_slices(
        labels,
        range(5),
        num_classes=4,
        encoding="onehot",
        context_slices=1,
        removed=selection_to_removed([2], 4),
    )
    assert seen[0].shape[1] == 1 + 9
    assert torch.equal(seen[0][:5, 1:], expected)  # background padding, no flags: the older behaviour
