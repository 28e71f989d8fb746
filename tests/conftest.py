"""Shared fixtures: a tiny model folder and small synthetic volumes made at test time."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny models: one thread is faster, and results are bitwise stable


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny model folder (3 foreground classes, onehot, context 1, 16 px, MR)."""
    from volgen.labels import LabelMap
    from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet, save_model

    torch.manual_seed(0)
    label_map = LabelMap(name="test", classes={"liver": [1], "kidney": [2, 5], "spleen": [3]})
    metadata = ModelMetadata(
        name="tiny-test", label_map=label_map, slice_size=16, context_slices=1, trained_on="nothing (random)"
    )
    unet = build_unet(UNetConfig.preset("tiny"), metadata)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(folder, unet, build_training_scheduler(), metadata)
    return folder


@pytest.fixture(scope="session")
def multiaxis_model_dir(tmp_path_factory):
    """An untrained tiny model folder with the slice axis (axial, coronal, sagittal) in its condition."""
    from volgen.conditioning import ConditionLayout
    from volgen.labels import LabelMap
    from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet, save_model

    torch.manual_seed(0)
    metadata = ModelMetadata(
        name="tiny-multiaxis",
        label_map=LabelMap(name="test", classes={"liver": [1], "kidney": [2], "spleen": [3]}),
        slice_size=16,
        context_slices=1,
        condition=ConditionLayout(specified_flags=True, axes=(0, 1, 2), context_padding="replicate"),
    )
    unet = build_unet(UNetConfig.preset("tiny"), metadata)
    folder = tmp_path_factory.mktemp("models") / "multiaxis"
    save_model(folder, unet, build_training_scheduler(), metadata)
    return folder


@pytest.fixture(scope="session")
def flagged_model_dir(tmp_path_factory):
    """An untrained tiny v-prediction model with "specified" flags (the recipe's kind), 16 px."""
    from volgen.conditioning import ConditionLayout
    from volgen.labels import LabelMap
    from volgen.models import ModelMetadata, UNetConfig, build_training_scheduler, build_unet, save_model

    torch.manual_seed(0)
    metadata = ModelMetadata(
        name="tiny-flags",
        label_map=LabelMap(name="test", classes={"liver": [1], "kidney": [2, 5], "spleen": [3]}),
        slice_size=16,
        context_slices=1,
        condition=ConditionLayout(specified_flags=True, context_padding="replicate"),
    )
    unet = build_unet(UNetConfig.preset("tiny"), metadata)
    scheduler = build_training_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)
    folder = tmp_path_factory.mktemp("guidance") / "flags"
    save_model(folder, unet, scheduler, metadata)
    return folder


@pytest.fixture
def wide_help(monkeypatch):
    """Render ``--help`` 300 columns wide. Typer reads ``TERMINAL_WIDTH`` once, when ``typer.rich_utils`` is
    first imported, so an environment variable set for one invocation does not reach later ones."""
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 300)
