"""Multi-axis sampling: exact input grid, deterministic per seed, independent of the slice batch size."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volumes import assert_same_geometry, make_volume

from volgen.conditioning import ConditionLayout
from volgen.denoiser import per_sample_condition_vector
from volgen.errors import VolgenError
from volgen.multiaxis import (
    axis_schedule,
    cube_round_trip,
    generate_multiaxis,
    to_cube_frame,
    usable_axes,
)

STEPS = 3


@pytest.fixture(scope="module")
def multiaxis_model(multiaxis_model_dir):
    """The tiny multi-axis model (conftest), loaded."""
    from volgen.models import load_model

    return load_model(multiaxis_model_dir)


def _labels(spacing=(1.1, 1.3, 1.6), size=(14, 12, 10)) -> sitk.Image:
    return make_volume("label", size=size, spacing=spacing, n_labels=3)


def test_keeps_the_input_grid_and_uses_every_axis(multiaxis_model):
    labels = _labels()
    result = generate_multiaxis(labels, multiaxis_model, num_inference_steps=STEPS, seed=1)
    assert_same_geometry(result.image, labels, atol=0)
    assert result.axes == ("axial", "coronal", "sagittal")
    values = sitk.GetArrayViewFromImage(result.image)
    assert np.isfinite(values).all() and values.std() > 0


def test_deterministic_per_seed_and_independent_of_the_slice_batch_size(multiaxis_model):
    labels = _labels()

    def run(seed: int, batch: int, rho: float = 0.5) -> np.ndarray:
        out = generate_multiaxis(
            labels,
            multiaxis_model,
            num_inference_steps=STEPS,
            seed=seed,
            slice_batch_size=batch,
            noise_correlation=rho,
        )
        return sitk.GetArrayFromImage(out.image)

    first = run(3, 16)
    assert np.array_equal(first, run(3, 16))
    assert np.array_equal(first, run(3, 5))  # 16 slices per axis in chunks of 5: the same volume
    assert not np.array_equal(first, run(4, 16))
    assert not np.array_equal(first, run(3, 16, rho=0.0))  # correlated noise combines with it


def test_thick_slices_restrict_the_axes(multiaxis_model):
    # 2.5 mm slices against a 17.5 mm / 16 = 1.1 mm cube voxel: coronal and sagittal slices would show the
    # staircase of upsampled thick slices, so only axial slices are denoised
    labels = make_volume("label", n_labels=3)  # (0.7, 0.9, 2.5) mm, oblique
    frame = to_cube_frame(labels, slice_size=16)
    assert frame.labels.shape == (16, 16, 16) and frame.voxel == pytest.approx(17.5 / 16)
    assert usable_axes(frame, ("axial", "coronal", "sagittal")) == ("axial",)
    assert usable_axes(frame, ("axial", "coronal", "sagittal"), max_ratio=3.0) == (
        "axial",
        "coronal",
        "sagittal",
    )
    result = generate_multiaxis(labels, multiaxis_model, num_inference_steps=2)
    assert result.axes == ("axial",)
    assert_same_geometry(result.image, labels, atol=0)
    with pytest.raises(VolgenError, match="allows only axial"):
        generate_multiaxis(labels, multiaxis_model, schedule=["coronal", "axial"])
    explicit = generate_multiaxis(_labels(), multiaxis_model, schedule=["sagittal", "coronal", "axial"])
    assert explicit.axes == ("sagittal", "coronal", "axial")


def test_schedule_condition_vector_and_errors(multiaxis_model, tiny_model_dir):
    assert axis_schedule(("axial", "coronal"), 5) == ["axial", "coronal", "axial", "coronal", "axial"]
    with pytest.raises(VolgenError, match="unknown axis schedule"):
        axis_schedule(("axial",), 3, kind="sometimes")
    layout = ConditionLayout(specified_flags=True, axes=(0, 2))
    specified = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    vector = per_sample_condition_vector(specified, torch.tensor([2, 0, 2]), layout)
    assert vector.tolist() == [[1, 0, 0, 1], [1, 1, 1, 0], [0, 1, 0, 1]]
    from volgen.models import load_model

    single = load_model(tiny_model_dir)  # trained (here: built) on axial slices only
    with pytest.raises(VolgenError, match="axial slices, not coronal"):
        generate_multiaxis(_labels(), single, axes=("axial", "coronal"), num_inference_steps=2)


def test_a_multiaxis_model_runs_in_the_single_axis_pipeline(multiaxis_model):
    from volgen.pipeline import SegmentationToVolumePipeline

    meta = multiaxis_model.metadata
    pipe = SegmentationToVolumePipeline(
        unet=multiaxis_model.unet,
        scheduler=multiaxis_model.scheduler,
        num_classes=meta.num_classes,
        slice_axis="coronal",
        condition=meta.condition.model_dump(mode="json"),
    )
    assert pipe.condition_for(None, 1).tolist() == [[1.0, 1.0, 1.0, 0.0, 1.0, 0.0]]
    out = pipe(torch.zeros(4, 16, 16, dtype=torch.long), num_inference_steps=2, seed=0)
    assert out.volume.shape == (4, 16, 16)


def test_real_round_trip_keeps_the_grid():
    labels = _labels()
    image = make_volume("image", size=labels.GetSize(), spacing=labels.GetSpacing())
    back = cube_round_trip(labels, image, slice_size=16)
    assert_same_geometry(back, labels, atol=0)


def test_train_on_three_axes_then_sample_along_them(tmp_path):
    from test_training import make_case, write_config

    from volgen.models import load_model
    from volgen.training import TrainConfig, prepare_training_data, train

    make_case(tmp_path / "data", "case0", seed=0, spacing=(1.0, 1.2, 1.5))
    (tmp_path / "labels.yaml").write_text("name: shapes\nclasses:\n  ball: 1\n  box: [2, 7]\n")
    axes = ["axial", "coronal", "sagittal"]
    # without the default air slices, so the three slicings are exact permutations of one cube
    path = write_config(tmp_path, data={"slice_axes": axes, "empty_slices": 0}, max_steps=3, preview_every=3)
    config = TrainConfig.from_yaml(path)
    padded = prepare_training_data(TrainConfig.from_yaml(write_config(tmp_path, data={"slice_axes": axes})))
    # the default: 4 air slices at both ends of every volume, along its own slice axis
    assert all(tuple(v.labels.shape) == (24, 16, 16) for v in padded.volumes)
    data = prepare_training_data(config)
    # one cube per axis, each sliced along its axis; the model's slice_axis first
    assert data.axes == [0, 1, 2] and [v.case for v in data.volumes] == [f"case0:{a}" for a in axes]
    assert all(tuple(v.labels.shape) == (16, 16, 16) for v in data.volumes)
    assert torch.equal(data.volumes[1].labels, data.volumes[0].labels.permute(1, 0, 2))
    result = train(config)
    loaded = load_model(result.model_dir)
    assert loaded.metadata.condition.axes == (0, 1, 2)
    labels = make_volume("label", size=(12, 10, 8), spacing=(1.0, 1.2, 1.5), n_labels=2)
    out = generate_multiaxis(labels, loaded, num_inference_steps=3)
    assert out.axes == tuple(axes)
    assert_same_geometry(out.image, labels, atol=0)
    with pytest.raises(Exception, match="slice_axes"):
        TrainConfig.from_yaml(write_config(tmp_path, data={"slice_axes": ["coronal", "sagittal"]}))
