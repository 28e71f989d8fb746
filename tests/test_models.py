"""Model folders: metadata round trip, weight hashes, refusing unsafe or inconsistent folders, presets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from volgen.errors import ConfigError, InputError, ModelError
from volgen.labels import LabelMap
from volgen.models import (
    METADATA_FILE,
    IntensityMapping,
    ModelMetadata,
    UNetConfig,
    build_training_scheduler,
    build_unet,
    load_model,
    save_model,
    weights_hash,
)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _edit_metadata(folder, **changes) -> None:
    path = folder / METADATA_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_metadata_round_trips_through_save_and_load(tmp_path):
    metadata = ModelMetadata(
        name="roundtrip",
        description="all fields set",
        label_map=LabelMap(name="abdomen", background=[0, 9], classes={"liver": [1], "kidney": [2, 5]}),
        encoding="onehot",
        context_slices=2,
        slice_size=16,
        slice_axis="coronal",
        intensity=IntensityMapping.ct(-160.0, 240.0),
        trained_on="synthetic shapes",
        training={"steps": 12, "final_loss": 0.25, "nested": {"a": [1, 2]}},
    )
    torch.manual_seed(0)
    unet = build_unet(UNetConfig.preset("tiny"), metadata)
    folder = save_model(tmp_path / "m", unet, build_training_scheduler(), metadata)
    loaded = load_model(folder)
    assert loaded.metadata == metadata
    assert loaded.metadata.model_dump() == metadata.model_dump()
    assert loaded.unet.config.in_channels == 1 + 5 * 2 and loaded.unet.config.out_channels == 1
    assert loaded.scheduler.config.num_train_timesteps == 1000
    assert loaded.scheduler.config.beta_schedule == "linear"
    state = unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.unet.state_dict().items())
    assert loaded.model_id == f"roundtrip@{loaded.weights_sha256[:12]}"


def test_weights_hash_is_stable(tiny_model_dir, tmp_path):
    first = load_model(tiny_model_dir)
    again = load_model(tiny_model_dir)
    assert first.weights_sha256 == again.weights_sha256 == weights_hash(tiny_model_dir)
    assert len(first.weights_sha256) == 64
    resaved = save_model(tmp_path / "resaved", first.unet, first.scheduler, first.metadata)
    assert weights_hash(resaved) == first.weights_sha256


def test_pickle_weights_are_refused(model_copy):
    (model_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="safetensors") as error:
        load_model(model_copy)
    assert "diffusion_pytorch_model.bin" in str(error.value)


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_each_setting_is_stored_once(tiny_model_dir):
    own = json.loads((tiny_model_dir / METADATA_FILE).read_text())
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert not {"encoding", "context_slices", "slice_axis", "slice_size"} & set(own)
    assert {"encoding", "context_slices", "slice_axis", "num_classes"} <= set(index)


def test_pipeline_config_that_disagrees_with_the_unet_is_refused(model_copy):
    _edit_json(model_copy / "model_index.json", context_slices=2)
    with pytest.raises(ModelError, match="input channels"):
        load_model(model_copy)


def test_format_1_folders_still_load_and_must_agree(model_copy):
    """Format 1 repeated the pipeline settings and the slice size in volgen.json (the embedded model did)."""
    meta = load_model(model_copy).metadata
    legacy = {"format_version": 1, "encoding": meta.encoding, "context_slices": meta.context_slices}
    _edit_metadata(model_copy, slice_axis=meta.slice_axis, slice_size=meta.slice_size, **legacy)
    assert load_model(model_copy).metadata == meta.model_copy(update={"format_version": 1})
    _edit_metadata(model_copy, slice_size=32)
    with pytest.raises(ModelError, match="slice_size 32 disagrees"):
        load_model(model_copy)
    _edit_metadata(model_copy, slice_size=meta.slice_size, context_slices=2)
    with pytest.raises(ModelError, match="context_slices 2 disagrees"):
        load_model(model_copy)


def test_missing_or_broken_folders_are_refused(model_copy, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nothing")
    (model_copy / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="JSON"):
        load_model(model_copy)
    (model_copy / METADATA_FILE).unlink()
    with pytest.raises(ModelError, match=METADATA_FILE):
        load_model(model_copy)


def test_newer_format_and_unknown_keys_are_refused(model_copy, tiny_model_dir):
    _edit_metadata(model_copy, format_version=99)
    with pytest.raises(ModelError, match="newer"):
        load_model(model_copy)
    shutil.copy(tiny_model_dir / METADATA_FILE, model_copy / METADATA_FILE)
    _edit_metadata(model_copy, colour="blue")
    # read_metadata reports schema problems as ConfigError (a sibling of ModelError under InputError)
    with pytest.raises(InputError, match="unknown key 'colour'"):
        load_model(model_copy)


def test_presets_load():
    tiny, small = UNetConfig.preset("tiny"), UNetConfig.preset("small")
    assert tiny.sample_size == 16 and small.sample_size == 64
    with pytest.raises(ConfigError, match="tiny"):
        UNetConfig.preset("huge")


def test_small_native_preset_is_small_with_attention_in_the_middle_only_and_runs_whole_slices():
    """``small-native`` differs from ``small`` only in its blocks (no attention at 1/4 of the slice), and as a
    native model's UNet it takes a whole slice of any size that is a multiple of its downsampling."""
    small, native = UNetConfig.preset("small"), UNetConfig.preset("small-native")
    assert native.model_copy(update={"down_block_types": small.down_block_types,
                                     "up_block_types": small.up_block_types}) == small  # fmt: skip
    assert not any("Attn" in b for b in native.down_block_types + native.up_block_types)
    metadata = ModelMetadata(
        label_map=LabelMap(name="t", classes={"a": [1]}), slice_size=64, pixel_spacing=1.0
    )
    unet = build_unet(native, metadata).eval()
    assert unet.mid_block.attentions[0] is not None  # self-attention stays, at 1/8 of the slice
    with torch.no_grad():
        out = unet(torch.zeros(1, unet.config.in_channels, 40, 24), 10).sample
    assert out.shape == (1, 1, 40, 24)


def test_paper_preset_is_the_reference_architecture():
    paper = UNetConfig.preset("paper")
    assert tuple(paper.block_out_channels) == (128, 128, 256, 256, 512, 512)
    assert paper.layers_per_block == 2 and paper.sample_size == 256
    assert [i for i, b in enumerate(paper.down_block_types) if b.startswith("Attn")] == [
        4
    ]  # the 5th down block
    assert [i for i, b in enumerate(paper.up_block_types) if b.startswith("Attn")] == [1]  # the 2nd up block
    metadata = ModelMetadata(
        label_map=LabelMap.from_names(["a", "b"]), encoding="seed", context_slices=0, slice_size=256
    )
    with torch.device("meta"):  # the architecture without allocating 114 M parameters
        unet = build_unet(paper, metadata)
    assert unet.config.in_channels == 2  # image + one seed mask channel, as the reference checkpoints
    assert 110e6 < sum(p.numel() for p in unet.parameters()) < 120e6
    assert [type(b).__name__ for b in unet.down_blocks][4] == "AttnDownBlock2D"
    assert [type(b).__name__ for b in unet.up_blocks][1] == "AttnUpBlock2D"


@pytest.mark.parametrize(
    "changes",
    [
        {"block_out_channels": [4, 8, 16]},  # lengths differ
        {"norm_num_groups": 3},  # channels not divisible
        {"sample_size": 18},  # not divisible by 2 ** (blocks - 1)... 18 / 2 is fine, 18 with 3 blocks is not
    ],
)
def test_unet_config_validation(changes):
    base = UNetConfig.preset("tiny").model_dump()
    if "sample_size" in changes:
        base.update(
            block_out_channels=[4, 8, 16],
            down_block_types=["DownBlock2D"] * 3,
            up_block_types=["UpBlock2D"] * 3,
        )
    base.update(changes)
    with pytest.raises(ValueError):
        UNetConfig(**base)


def test_build_unet_channels_follow_the_metadata():
    metadata = ModelMetadata(label_map=LabelMap.from_names(["a", "b", "c"]), context_slices=1, slice_size=16)
    unet = build_unet(UNetConfig.preset("tiny"), metadata)
    assert unet.config.in_channels == 1 + metadata.condition_channels == 10
    assert unet.config.out_channels == 1
    with pytest.raises(ModelError, match="sample_size"):
        build_unet(UNetConfig.preset("small"), metadata)


def test_seed_encoding_holds_at_most_255_classes():
    many = LabelMap.from_names([f"c{i}" for i in range(256)])
    with pytest.raises(ValueError, match="255"):
        ModelMetadata(label_map=many, encoding="seed", context_slices=0)


def test_intensity_mappings():
    ct = IntensityMapping.ct(-1000, 1000)
    hu = torch.tensor([-1000, -200, 0, 350, 1000]).numpy()
    assert ct.to_model(hu).tolist() == pytest.approx([-1.0, -0.2, 0.0, 0.35, 1.0])
    physical = ct.from_model(ct.to_model(hu))
    assert physical.dtype.name == "float32"  # stays float until it is stored (rounded once)
    back = ct.to_storage(physical)
    assert back.dtype.name == "int16" and back.tolist() == hu.tolist()
    mr = IntensityMapping(modality="MR", percentiles=(0, 100), low=0, high=255)
    values = torch.linspace(10, 90, 9).numpy()
    assert mr.window(values) == (10.0, 90.0)
    assert mr.to_model(values)[[0, -1]].tolist() == [-1.0, 1.0]
    assert mr.from_model(mr.to_model(values))[[0, -1]].tolist() == [0.0, 255.0]
    with pytest.raises(ValueError):
        IntensityMapping(modality="MR", low=1.0, high=1.0)
