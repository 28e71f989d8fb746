"""Importing a reference-implementation checkpoint (mazurowski-lab/segmentation-guided-diffusion layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from volgen.errors import ModelError, OutputError

LABELS = "name: breast\nclasses:\n  breast: 1\n  vessels: 2\n  tissue: 3\n"


def make_reference_checkpoint(
    folder: Path, *, in_channels: int = 2, scheduler: str | None = "ddim", pickle: bool = False
) -> Path:
    """A tiny stand-in for a reference checkpoint: its pipeline's save_pretrained layout."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    unet.save_pretrained(folder / "unet", safe_serialization=not pickle)
    if scheduler == "ddim":
        DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    elif scheduler == "ddpm":
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "SegGuidedDDIMPipeline",
        "_diffusers_version": "0.21.4",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def labels_yaml(tmp_path) -> Path:
    path = tmp_path / "breast.yaml"
    path.write_text(LABELS)
    return path


def test_import_then_load_and_generate_with_the_seed_encoding(tmp_path, labels_yaml):
    from diffusers import UNet2DModel

    from volgen.checkpoint_import import import_checkpoint
    from volgen.labels import LabelMap
    from volgen.models import load_model
    from volgen.pipeline import SegmentationToVolumePipeline

    source = make_reference_checkpoint(tmp_path / "ddim-breast_mri-16-segguided")
    folder = import_checkpoint(source, labels_yaml, tmp_path / "imported")
    model = load_model(folder)
    meta = model.metadata
    assert meta.encoding == "seed" and meta.context_slices == 0 and meta.slice_size == 16
    assert meta.label_map == LabelMap.from_yaml(labels_yaml)
    assert meta.intensity.modality == "MR" and meta.intensity.percentiles == (0.0, 100.0)
    assert (meta.intensity.low, meta.intensity.high) == (0.0, 255.0)
    assert meta.trained_on.startswith("imported from ") and str(source.resolve()) in meta.trained_on
    assert meta.name == "ddim-breast_mri-16-segguided"
    assert (
        model.scheduler.config.num_train_timesteps == 1000
        and model.scheduler.config.beta_schedule == "linear"
    )

    original = UNet2DModel.from_pretrained(source, subfolder="unet", use_safetensors=True).state_dict()
    assert all(torch.equal(original[k], v) for k, v in model.unet.state_dict().items())

    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 1].clone()))
    pipe = SegmentationToVolumePipeline(
        model.unet,
        model.scheduler,
        encoding=meta.encoding,
        context_slices=meta.context_slices,
        num_classes=meta.num_classes,
    )
    labels = torch.zeros(3, 16, 16, dtype=torch.long)
    labels[:, 2:8, 2:8] = 1
    labels[1, 9:12, 9:14] = 3
    volume = pipe(labels, num_inference_steps=2, seed=0, scheduler="ddim").volume
    assert volume.shape == (3, 16, 16) and torch.isfinite(volume).all()
    # the mask channel is what the reference fed its UNet: a PNG label k read by ToTensor, k / 255
    assert torch.allclose(seen[0][:3], labels.float() / 255.0)


def test_missing_scheduler_means_ddpm_1000_linear(tmp_path, labels_yaml):
    from volgen.checkpoint_import import import_checkpoint
    from volgen.models import load_model

    source = make_reference_checkpoint(tmp_path / "src", scheduler=None)
    model = load_model(import_checkpoint(source, labels_yaml, tmp_path / "out", name="breast"))
    assert model.metadata.name == "breast"
    config = model.scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule, config.prediction_type) == (
        1000,
        "linear",
        "epsilon",
    )


def test_ct_window(tmp_path, labels_yaml):
    from volgen.checkpoint_import import import_checkpoint
    from volgen.models import load_model

    source = make_reference_checkpoint(tmp_path / "src", scheduler="ddpm")
    folder = import_checkpoint(source, labels_yaml, tmp_path / "ct", modality="CT", ct_window=(-160.0, 240.0))
    intensity = load_model(folder).metadata.intensity
    assert (intensity.modality, intensity.low, intensity.high) == ("CT", -160.0, 240.0)


def test_pickle_weights_are_refused_with_a_hint(tmp_path, labels_yaml):
    from volgen.checkpoint_import import import_checkpoint

    source = make_reference_checkpoint(tmp_path / "src", pickle=True)
    assert (source / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelError, match="safetensors") as error:
        import_checkpoint(source, labels_yaml, tmp_path / "out")
    assert "Convert" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_wrong_in_channels_is_refused(tmp_path, labels_yaml):
    from volgen.checkpoint_import import import_checkpoint

    source = make_reference_checkpoint(tmp_path / "src", in_channels=3)
    with pytest.raises(ModelError, match="in_channels=3"):
        import_checkpoint(source, labels_yaml, tmp_path / "out")


def test_too_many_classes_and_bad_folders_are_refused(tmp_path, labels_yaml):
    from volgen.checkpoint_import import import_checkpoint

    source = make_reference_checkpoint(tmp_path / "src")
    many = tmp_path / "many.yaml"
    many.write_text("classes:\n" + "".join(f"  c{i}: {i}\n" for i in range(1, 257)))
    with pytest.raises(ModelError, match="255"):
        import_checkpoint(source, many, tmp_path / "out")
    with pytest.raises(ModelError, match="not found"):
        import_checkpoint(tmp_path / "nowhere", labels_yaml, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="unet/config.json"):
        import_checkpoint(empty, labels_yaml, tmp_path / "out")
    import_checkpoint(source, labels_yaml, tmp_path / "out")
    with pytest.raises(OutputError):
        import_checkpoint(source, labels_yaml, tmp_path / "out")
    import_checkpoint(source, labels_yaml, tmp_path / "out", overwrite=True)


def _invoke(*args: str):
    from typer.testing import CliRunner

    import volgen.cli.app as cli

    cli._register()
    return CliRunner().invoke(cli.app, list(args))


def test_cli_import_checkpoint(tmp_path, labels_yaml):
    from volgen.models import load_model

    source = make_reference_checkpoint(tmp_path / "src")
    out = tmp_path / "cli-model"
    result = _invoke(
        "import-checkpoint",
        str(source),
        "--labels",
        str(labels_yaml),
        "-o",
        str(out),
        "--modality",
        "CT",
        "--ct-window",
        "-1000,1000",
    )
    assert result.exit_code == 0, result.output
    assert f"model: {out}" in result.output
    assert load_model(out).metadata.intensity.modality == "CT"

    bad = _invoke(
        "import-checkpoint",
        str(source),
        "--labels",
        str(labels_yaml),
        "-o",
        str(tmp_path / "x"),
        "--modality",
        "CT",
        "--ct-window",
        "1000",
    )
    assert bad.exit_code == 1 and "--ct-window" in bad.output
    assert len(bad.output.strip().splitlines()) == 1

    shutil.rmtree(source / "unet")
    missing = _invoke(
        "import-checkpoint", str(source), "--labels", str(labels_yaml), "-o", str(tmp_path / "y")
    )
    assert missing.exit_code == 1 and "unet/config.json" in missing.output
