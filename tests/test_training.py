"""Training: export, exact resume, two processes, early stop and clear errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from safetensors.torch import load_file
from volumes import rotation

SPACING = (0.8, 1.1, 2.5)
ORIGIN = (12.0, -30.5, 7.25)
LABELS_YAML = "name: shapes\nclasses:\n  ball: 1\n  box: [2, 7]\n"


def make_case(
    folder: Path, name: str, *, seed: int, size=(22, 18, 9), spacing=SPACING, label_spacing=None
) -> None:
    """A ball (label 1), a box (labels 2, 7) in an oblique, anisotropic grid; intensity by class + noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    labels = np.zeros((nz, ny, nx), np.uint8)
    cx, cy = 9 + seed % 3, 8
    labels[((x - cx) / 6.0) ** 2 + ((y - cy) / 5.5) ** 2 + ((z - nz / 2) / 3.5) ** 2 < 1] = 1
    labels[2:7, 3:8, 14:20] = 2
    labels[2:4, 3:5, 14:16] = 7
    image = 100.0 + 300.0 * (labels == 1) + 650.0 * (labels >= 2) + rng.normal(0.0, 25.0, labels.shape)
    for array, sub, sp in (
        (image.astype(np.float32), "images", spacing),
        (labels, "labels", label_spacing or spacing),
    ):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(sp)
        volume.SetOrigin(ORIGIN)
        volume.SetDirection(rotation())
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(folder / sub / f"{name}.nii.gz"))


def write_config(
    folder: Path,
    *,
    source="data",
    label_map="labels.yaml",
    output_dir="run",
    data=None,
    model=None,
    **training,
) -> Path:
    settings = dict(
        max_steps=7,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        checkpoint_every=3,
        preview_every=3,
        preview_steps=2,
        log_every=2,
    )
    settings.update(training)
    config = {
        "output_dir": output_dir,
        "data": {"source": source, "label_map": label_map, "percentiles": [1, 99], **(data or {})},
        "model": {
            "preset": "tiny",
            "context_slices": 1,
            "name": "tiny-trained",
            "description": "test",
            # off here: dropout masks are drawn per process, so with it a two-process run would not repeat a
            # one-process run (test_two_processes_train_one_consistent_model); its own test turns it on
            "dropout": 0.0,
            **(model or {}),
        },
        "training": settings,
    }
    path = folder / f"{output_dir.replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("training")
    make_case(folder / "data", "case0", seed=0)
    make_case(folder / "data", "case1", seed=1)
    (folder / "labels.yaml").write_text(LABELS_YAML, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference_run(workdir):
    """An uninterrupted 7-step run (checkpoints at 3, 6 and 7; previews at 3, 6 and 7)."""
    from volgen.training import TrainConfig, train

    config = TrainConfig.from_yaml(write_config(workdir, output_dir="reference"))
    calls = []
    result = train(config, progress=lambda *args: calls.append(args))
    return config, result, calls


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_train_exports_a_loadable_model(reference_run, workdir):
    from volgen.data import find_cases
    from volgen.labels import LabelMap
    from volgen.models import load_model
    from volgen.training import TrainConfig, list_checkpoints, read_losses

    config, result, calls = reference_run
    out = config.output_dir
    assert result.steps == 7 and len(result.losses) == 7 and not result.stopped_early
    assert all(np.isfinite(result.losses))
    assert [c[0] for c in calls] == list(range(1, 8)) and all(c[1] == 7 for c in calls)
    assert read_losses(result.losses_csv) == result.losses

    model = load_model(result.model_dir)
    meta = model.metadata
    assert meta.name == "tiny-trained" and meta.encoding == "onehot" and meta.context_slices == 1
    assert meta.slice_size == 16 and meta.slice_axis == "axial"
    assert meta.training["cases"] == ["case0", "case1"]  # every id, for the downstream leak warning
    assert meta.label_map == LabelMap.from_yaml(workdir / "labels.yaml")
    assert meta.intensity.modality == "MR" and meta.intensity.percentiles == (1.0, 99.0)
    windows = [
        np.percentile(
            sitk.GetArrayFromImage(sitk.ReadImage(str(workdir / "data" / "images" / f"case{i}.nii.gz"))),
            (1, 99),
        )
        for i in (0, 1)
    ]
    np.testing.assert_allclose((meta.intensity.low, meta.intensity.high), np.mean(windows, axis=0), rtol=1e-6)
    assert meta.training["steps"] == 7 and meta.training["num_processes"] == 1
    assert "2 case(s)" in meta.trained_on
    # 2 foreground classes x 3 context slices of masks, then 2 "specified" flags (the new default)
    assert model.unet.config.in_channels == 1 + 3 * 2 + 2
    assert meta.condition is not None and meta.condition.specified_flags
    assert model.scheduler.config.prediction_type == "v_prediction"
    assert model.scheduler.config.rescale_betas_zero_snr
    assert len(find_cases(workdir / "data")) == 2

    # the resolved config round-trips and the old checkpoints are pruned
    assert TrainConfig.from_yaml(result.config_path) == config
    assert [p.name for p in list_checkpoints(out)] == ["step-000006", "step-000007"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in (out / "previews").iterdir()) == [
        "step-000003.png",
        "step-000006.png",
        "step-000007.png",
    ]
    assert (out / "previews" / "step-000007.png").read_bytes()[:4] == b"\x89PNG"

    # the export holds the EMA weights of the last checkpoint, not the raw weights
    ema = load_file(str(result.checkpoint / "ema.safetensors"))
    shadow = [ema[k] for k in sorted(ema)]
    assert all(torch.equal(p, s) for p, s in zip(model.unet.parameters(), shadow, strict=True))
    raw = load_file(str(result.checkpoint / "model.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in model.unet.state_dict().items())

    # the exported folder runs in the real pipeline
    from volgen.pipeline import SegmentationToVolumePipeline

    pipe = SegmentationToVolumePipeline(
        model.unet,
        model.scheduler,
        encoding=meta.encoding,
        context_slices=meta.context_slices,
        num_classes=meta.num_classes,
        condition=meta.condition.model_dump(mode="json"),
    )
    labels = torch.zeros(3, 16, 16, dtype=torch.long)
    labels[:, 4:10, 4:10] = 1
    volume = pipe(labels, num_inference_steps=2, seed=0, scheduler="ddim").volume
    assert volume.shape == (3, 16, 16) and torch.isfinite(volume).all()


def test_resume_matches_an_uninterrupted_run(reference_run, workdir):
    from volgen.training import TrainConfig, train

    _, reference, _ = reference_run
    config = TrainConfig.from_yaml(write_config(workdir, output_dir="interrupted"))
    assert config.augmentation.enabled  # the default: resuming repeats the augmentation draws too

    class Interrupt(Exception):
        pass

    def stop_at_four(step, total, loss, lr):
        if step == 4:  # after the checkpoint at step 3, before the one at step 6
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, progress=stop_at_four)
    resumed = train(config, resume=True)

    assert resumed.steps == 7
    np.testing.assert_allclose(resumed.losses, reference.losses, rtol=0, atol=1e-6)
    a, b = _weights(reference.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = (load_file(str(r.checkpoint / "model.safetensors")) for r in (reference, resumed))
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_dropout_reaches_the_unet_and_a_resumed_run_repeats_its_masks(reference_run, workdir):
    from volgen.models import load_model
    from volgen.training import TrainConfig, train

    _, reference, _ = reference_run

    def config(name):
        return TrainConfig.from_yaml(write_config(workdir, output_dir=name, model={"dropout": 0.3}))

    whole = train(config("dropout-whole"))
    assert load_model(whole.model_dir).unet.config.dropout == 0.3
    # the same run without dropout (the reference) learns differently
    assert not np.allclose(whole.losses, reference.losses, rtol=0, atol=1e-6)

    class Interrupt(Exception):
        pass

    def stop_at_four(step, total, loss, lr):
        if step == 4:
            raise Interrupt

    interrupted = config("dropout-resumed")
    with pytest.raises(Interrupt):
        train(interrupted, progress=stop_at_four)
    resumed = train(interrupted, resume=True)
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=0, atol=1e-6)
    a, b = _weights(whole.model_dir), _weights(resumed.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_an_old_one(reference_run):
    from volgen.errors import ConfigError, OutputError
    from volgen.training import train

    config, _, _ = reference_run
    with pytest.raises(OutputError, match="--resume"):
        train(config)
    changed = config.model_copy(deep=True)
    changed.training.ablation_p = 0.25
    with pytest.raises(ConfigError, match="training.ablation_p"):
        train(changed, resume=True)


def test_max_minutes_stops_early_with_checkpoint_and_export(workdir):
    from volgen.models import load_model
    from volgen.training import TrainConfig, list_checkpoints, train

    config = TrainConfig.from_yaml(
        write_config(
            workdir, output_dir="budget", max_minutes=1e-6, preview_every=0, data={"foreground_weight": 2.0}
        )
    )
    result = train(config)
    assert result.stopped_early and result.steps == 1
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["step-000001"]
    assert load_model(result.model_dir).metadata.training["steps"] == 1
    assert [p.name for p in result.previews] == ["step-000001.png"]


def test_step_batches_partition_between_ranks_and_cover_each_epoch():
    from volgen.training import StepBatchSampler

    n, batch = 10, 4
    single = StepBatchSampler(n, batch, seed=3, start_step=0, end_step=5)
    ranks = [
        StepBatchSampler(n, batch, seed=3, start_step=0, end_step=5, rank=r, world_size=2) for r in (0, 1)
    ]
    for step_single, step0, step1 in zip(single, *ranks, strict=True):
        assert step0 + step1 == step_single
    flat = [i for b in StepBatchSampler(n, batch, seed=3, start_step=0, end_step=5) for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    resumed = list(StepBatchSampler(n, batch, seed=3, start_step=2, end_step=5))
    assert resumed == list(single)[2:]
    weights = torch.tensor([0.0] * 9 + [1.0])
    weighted = StepBatchSampler(n, batch, seed=3, start_step=0, end_step=3, weights=weights)
    assert {i for b in weighted for i in b} == {9}
    with pytest.raises(Exception, match="divisible"):
        StepBatchSampler(n, 5, seed=0, start_step=0, end_step=1, world_size=2)


def test_shipped_train_configs_validate():
    from volgen.training import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    small = TrainConfig.from_yaml(root / "colin27-small.yaml")
    assert small.model.unet_config().sample_size == 64 and small.data.label_map == "colin27"
    assert small.data.source == (root / "../../data/colin27").resolve()
    tiny = TrainConfig.from_yaml(root / "tiny-test.yaml")
    assert tiny.model.unet_config().sample_size == 16


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_train_one_consistent_model(reference_run, workdir):
    from volgen.models import load_model
    from volgen.training import read_losses

    _, reference, _ = reference_run
    cfg = write_config(workdir, output_dir="ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "volgen",
        "train",
        str(cfg),
    ]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = workdir / "ddp"
    model = load_model(out / "model")
    assert model.metadata.training["num_processes"] == 2 and model.metadata.training["steps"] == 7
    losses = read_losses(out / "losses.csv")
    # the same global batches, split over two ranks: the same losses up to summation order
    np.testing.assert_allclose(losses, reference.losses, rtol=0, atol=1e-4)
    a, b = _weights(reference.model_dir), _weights(out / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2
    assert done.stdout.count("model: ") == 1  # only rank 0 reports
    assert not [p for p in out.rglob("*") if p.name.startswith(".volgen-tmp") or p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------------------------------------
# Command line: bad input gives one readable line and a non-zero exit


def _invoke(*args: str):
    from typer.testing import CliRunner

    import volgen.cli.app as cli

    cli._register()
    return CliRunner().invoke(cli.app, list(args))


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_trains_and_prints_the_model_path(workdir):
    cfg = write_config(workdir, output_dir="cli", max_steps=2, preview_every=0)
    result = _invoke("train", str(cfg), "--max-steps", "1", "--output-dir", str(workdir / "cli-override"))
    assert result.exit_code == 0, result.output
    assert f"model: {workdir / 'cli-override' / 'model'}" in result.output
    assert (workdir / "cli-override" / "model" / "volgen.json").is_file()
    assert not (workdir / "cli").exists()


def test_cli_manifest_with_missing_files(workdir):
    (workdir / "missing.csv").write_text("image,label\ndata/images/case0.nii.gz,data/labels/nope.nii.gz\n")
    line = _one_line_error(_invoke("train", str(write_config(workdir, source="missing.csv", output_dir="m"))))
    assert "missing.csv" in line and "nope.nii.gz" in line and "not found" in line


def test_cli_geometry_mismatch_names_both_files(workdir, tmp_path):
    make_case(tmp_path / "data", "bad", seed=0, label_spacing=(0.8, 1.1, 3.0))
    (tmp_path / "labels.yaml").write_text(LABELS_YAML)
    line = _one_line_error(_invoke("train", str(write_config(tmp_path))))
    assert "images/bad.nii.gz" in line and "labels/bad.nii.gz" in line and "geometry" in line


def test_cli_label_map_that_does_not_match_the_data(workdir):
    (workdir / "wrong.yaml").write_text("name: wrong\nclasses:\n  ball: 1\n  box: 2\n")  # no 7
    line = _one_line_error(
        _invoke("train", str(write_config(workdir, label_map="wrong.yaml", output_dir="w")))
    )
    assert "7" in line and "unknown" in line and "labels/case0.nii.gz" in line


def test_cli_config_with_an_unknown_key(workdir):
    cfg = write_config(workdir, output_dir="k", learning_rte=1e-3)
    line = _one_line_error(_invoke("train", str(cfg)))
    assert "unknown key 'training.learning_rte'" in line and cfg.name in line


def test_cli_config_value_out_of_range(workdir):
    line = _one_line_error(_invoke("train", str(write_config(workdir, output_dir="r", ablation_p=1.5))))
    assert "training.ablation_p" in line


def test_config_sampling_reaches_the_model_and_guidance_needs_flags(workdir):
    """``sampling:`` in a training config is what the exported model asks ``volgen generate`` for (its
    ``volgen.json``); guidance for a model trained without "specified" flags is refused before training."""
    import json

    cfg = write_config(workdir, output_dir="sampling", max_steps=1, preview_every=0)
    config = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    config["sampling"] = {"steps": 12, "guidance_scale": 1.25}
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _invoke("train", str(cfg))
    assert result.exit_code == 0, result.output
    meta = json.loads((workdir / "sampling" / "model" / "volgen.json").read_text())
    assert meta["sampling"] == {"steps": 12, "guidance_scale": 1.25}
    assert "--steps 12 --guidance-scale 1.25" in " ".join(
        _invoke("info", str(workdir / "sampling" / "model")).output.split()
    )

    config["model"]["specified_flags"] = False
    config["output_dir"] = "sampling-unflagged"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    line = _one_line_error(_invoke("train", str(cfg)))
    assert "sampling.guidance_scale 1.25" in line and "specified_flags" in line
    assert not (workdir / "sampling-unflagged").exists()


def record_unet_inputs(monkeypatch) -> list[torch.Tensor]:
    """A list that receives the input of every forward of every UNet built from now on."""
    import volgen.models

    seen: list[torch.Tensor] = []
    build = volgen.models.build_unet

    def recording_build(*args, **kwargs):
        unet = build(*args, **kwargs)
        unet.register_forward_pre_hook(lambda module, a: seen.append(a[0].detach().clone()))
        return unet

    monkeypatch.setattr(volgen.models, "build_unet", recording_build)
    return seen


def test_ablated_classes_reach_the_unet_as_unspecified_flags(workdir, monkeypatch):
    """In training, a sample's flags are 0 exactly for its ablated classes, whose mask channels are empty."""
    from volgen.training import TrainConfig, train

    seen = record_unet_inputs(monkeypatch)
    path = write_config(workdir, output_dir="flags", max_steps=4, preview_every=0, ablation_p=0.5)
    train(TrainConfig.from_yaml(path))
    inputs = torch.cat([x for x in seen if x.requires_grad is False and x.shape[0] == 4][:4])
    masks, flags = inputs[:, 1:7], inputs[:, 7:]
    assert flags.shape[1] == 2
    assert torch.all((flags == 0) | (flags == 1))
    assert torch.all(flags == flags[:, :, :1, :1])  # constant channels
    per_sample = flags[:, :, 0, 0]
    assert 0 < float(per_sample.mean()) < 1  # ablation p = 0.5 flags some classes off, not all
    for c in range(2):
        unspecified = per_sample[:, c] == 0
        assert float(masks[unspecified][:, c::2].abs().sum()) == 0.0  # an unspecified class is never drawn


def test_full_mask_p_spares_that_share_of_samples_from_ablation(workdir, monkeypatch):
    """With every class ablated (p = 1), ``training.full_mask_p`` keeps some samples whole: all their classes
    flagged specified and drawn, as in a generation from a whole mask; without it no sample is whole."""
    from volgen.training import TrainConfig, train

    specified = {}
    for p in (0.0, 0.5):
        seen = record_unet_inputs(monkeypatch)
        path = write_config(
            workdir, output_dir=f"whole-{p}", max_steps=4, preview_every=0, ablation_p=1.0, full_mask_p=p
        )
        train(TrainConfig.from_yaml(path))
        inputs = torch.cat([x for x in seen if x.requires_grad is False and x.shape[0] == 4][:4])
        flags = inputs[:, 7:, 0, 0]
        assert torch.all(flags == flags[:, :1])  # a sample is either whole or has lost every class
        specified[p] = flags[:, 0] == 1
        masks = inputs[:, 1:7]
        assert float(masks[~specified[p]].abs().sum()) == 0.0
    assert not specified[0.0].any()
    assert 0 < int(specified[0.5].sum()) < len(specified[0.5])


def test_learning_rate_is_a_function_of_the_step_matching_diffusers_cosine_with_warmup():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from volgen.training import lr_factor

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, 5, 40)
    for step in range(40):
        assert lr_factor(step, 5, 40) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        reference.step()
    assert lr_factor(0, 5, 40) == 0.0 and lr_factor(40, 5, 40) == 0.0


def test_empty_slices_pad_each_volume_with_air_on_both_ends():
    from volgen.data import PreparedVolume, with_empty_slices

    volume = PreparedVolume(
        case="c",
        image=torch.rand(5, 4, 4) * 2 - 1,
        labels=torch.ones(5, 4, 4, dtype=torch.uint8),
        window=(0, 1),
    )
    padded = with_empty_slices(volume, 2)
    assert padded.labels.shape == (9, 4, 4) and padded.image.shape == (9, 4, 4)
    assert not padded.labels[:2].any() and not padded.labels[-2:].any()
    assert torch.all(padded.image[:2] == -1.0) and torch.all(padded.image[-2:] == -1.0)
    assert torch.equal(padded.image[2:7], volume.image) and torch.equal(padded.labels[2:7], volume.labels)
    assert with_empty_slices(volume, 0) is volume


def test_augmented_training_does_not_depend_on_the_number_of_loader_workers(workdir):
    """Each sample's augmentation is seeded by (seed, step, position), so worker processes change nothing."""
    from volgen.training import TrainConfig, train

    results = []
    for workers in (0, 2):
        path = write_config(
            workdir, output_dir=f"workers{workers}", max_steps=3, preview_every=0, num_workers=workers
        )
        config = TrainConfig.from_yaml(path)
        assert config.augmentation.enabled
        results.append(train(config))
    assert results[0].losses == results[1].losses
    a, b = (_weights(r.model_dir) for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_edge_cuts_turn_samples_into_the_end_of_a_volume():
    """A cut sample's centre and one side of its context become background and its image air."""
    from volgen.data import AIR, apply_edge_cuts

    context = torch.arange(1, 6, dtype=torch.uint8).view(1, 5, 1, 1).repeat(4, 1, 2, 2)  # K = 2: 1..5
    image = torch.rand(4, 1, 2, 2)
    cuts = torch.tensor([0, 1, -2, 2])
    cut_context, cut_image = apply_edge_cuts(context, image, cuts)
    values = cut_context[:, :, 0, 0].tolist()
    assert values[0] == [1, 2, 3, 4, 5] and torch.equal(cut_image[0], image[0])  # not cut
    assert values[1] == [0, 0, 0, 4, 5]  # anatomy starts 1 slice above the centre
    assert values[2] == [1, 0, 0, 0, 0]  # anatomy ends 2 slices below the centre
    assert values[3] == [0, 0, 0, 0, 5]
    assert torch.all(cut_image[1:] == AIR)


def test_edge_cuts_are_drawn_per_step_and_reach_the_unet(workdir, monkeypatch):
    """Edge cuts are a function of (seed, step); with p = 1 every training input has an empty centre mask."""
    from volgen.training import TrainConfig, train
    from volgen.training.randomness import step_edge_cuts

    first = step_edge_cuts(3, seed=0, batch_size=64, p=0.5, context_slices=2)
    assert torch.equal(first, step_edge_cuts(3, seed=0, batch_size=64, p=0.5, context_slices=2))
    assert not torch.equal(first, step_edge_cuts(4, seed=0, batch_size=64, p=0.5, context_slices=2))
    assert 0 < int((first != 0).sum()) < 64 and set(first.abs().tolist()) <= {0, 1, 2}
    assert not step_edge_cuts(3, seed=0, batch_size=64, p=0.0, context_slices=2).any()

    seen = record_unet_inputs(monkeypatch)
    path = write_config(
        workdir, output_dir="edges", max_steps=2, preview_every=0, ablation_p=0.0, data={"edge_cut_p": 1.0}
    )
    train(TrainConfig.from_yaml(path))
    inputs = torch.cat([x for x in seen if x.shape[0] == 4][:2])
    masks = inputs[:, 1:7]  # onehot of 2 classes for slices z-1, z, z+1 (slice-major)
    for sample in masks:
        below_kept = float(sample[2:6].abs().sum()) == 0.0  # centre and the slice above cleared
        above_kept = float(sample[0:4].abs().sum()) == 0.0  # slice below and centre cleared
        assert below_kept or above_kept


def _disk_sample(radii, size=32):
    """One sample whose context slices are concentric discs of ``radii`` (class 2 inside class 1)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist = ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2).sqrt()
    slices = [(dist < r).to(torch.uint8) + (dist < r / 2).to(torch.uint8) for r in radii]
    return torch.stack(slices)


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_inplane_cuts_leave_only_air_outside_the_kept_region_and_keep_image_and_mask_aligned(kind):
    """Outside the kept region the mask is background in every context slice and the image air; inside,
    both are the sample's own; the kept region is one region per slice (no anatomy appears)."""
    from volgen.data import AIR, apply_inplane_cuts

    context = torch.stack([_disk_sample([12, 13, 12]), _disk_sample([14, 12, 9])])  # (2, 3, 32, 32)
    image = torch.rand(2, 1, 32, 32) + 0.5  # anatomy and "background" alike brighter than air
    cuts = torch.tensor([[-1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [kind, 0.3, 0.2, 0.6, 0.4, 0.7, 0.9]])
    cut_context, cut_image = apply_inplane_cuts(context, image, cuts)
    assert torch.equal(cut_context[0], context[0]) and torch.equal(cut_image[0], image[0])  # not cut
    removed = (context[1] > 0) & (cut_context[1] == 0)
    assert removed[1].any() and (cut_context[1, 1] > 0).any()  # cut, not erased whole
    assert torch.equal(cut_context[1][cut_context[1] > 0], context[1][cut_context[1] > 0])  # kept as it was
    assert not ((context[1] == 0) & (cut_context[1] > 0)).any()  # no anatomy added
    assert torch.all(cut_image[1, 0][removed[1]] == AIR)  # the centre's erased anatomy is air in the image
    kept = cut_context[1, 1] > 0
    assert torch.equal(cut_image[1, 0][kept], image[1, 0][kept])  # the kept anatomy is the sample's own
    changed = cut_image[1, 0] != image[1, 0]
    assert torch.all(cut_image[1, 0][changed] == AIR)  # whatever changed became air
    # the context slices are cut consistently (one region, sized per slice), not each on its own
    assert removed[0].any() and removed[2].any()


def test_inplane_cuts_are_drawn_per_step_and_reach_training(workdir, monkeypatch):
    """In-plane cuts are a function of (seed, step); with p = 1 the UNet's masks lose anatomy."""
    from volgen.training import TrainConfig, train
    from volgen.training.randomness import step_inplane_cuts

    first = step_inplane_cuts(3, seed=0, batch_size=64, p=0.5)
    assert torch.equal(first, step_inplane_cuts(3, seed=0, batch_size=64, p=0.5))
    assert not torch.equal(first, step_inplane_cuts(4, seed=0, batch_size=64, p=0.5))
    assert 0 < int((first[:, 0] >= 0).sum()) < 64 and set(first[:, 0].tolist()) <= {-1.0, 0.0, 1.0, 2.0, 3.0}
    assert torch.all(step_inplane_cuts(3, seed=0, batch_size=64, p=0.0)[:, 0] == -1)
    bands = step_inplane_cuts(3, seed=0, batch_size=64, p=1.0, weights=[0.0, 0.0, 0.0, 1.0])[:, 0]
    assert torch.all(bands == 3)  # a kind's weight is how often it is drawn; weight 0: never
    with pytest.raises(Exception, match="data.inplane_cut_kinds: unknown kind 'stripe'"):
        TrainConfig.from_yaml(
            write_config(workdir, output_dir="k", data={"inplane_cut_kinds": {"stripe": 1}})
        )

    foreground = []
    for p in (0.0, 1.0):
        seen = record_unet_inputs(monkeypatch)
        path = write_config(
            workdir,
            output_dir=f"inplane{p}",
            max_steps=2,
            preview_every=0,
            ablation_p=0.0,
            data={"edge_cut_p": 0.0, "empty_slices": 0, "inplane_cut_p": p},
        )
        train(TrainConfig.from_yaml(path))
        inputs = torch.cat([x for x in seen if x.shape[0] == 4][:2])
        foreground.append(float(inputs[:, 1:7].abs().sum()))  # onehot of 2 classes, slices z-1, z, z+1
    assert foreground[1] < foreground[0]


def test_erasing_a_class_makes_it_air_in_the_image_and_background_in_every_context_slice():
    from volgen.data import AIR, erase_classes

    slices = [[1, 2, 3], [2, 2, 1], [1, 2, 3]]  # z-1, z, z+1 (one row of 3 voxels each)
    context = torch.tensor(slices, dtype=torch.uint8).view(1, 3, 1, 3).repeat(2, 1, 1, 1)
    image = torch.rand(2, 1, 1, 3)
    erased_context, erased_image = erase_classes(context, image, torch.tensor([False, True]), [2])
    assert torch.equal(erased_context[0], context[0]) and torch.equal(erased_image[0], image[0])  # not chosen
    assert erased_context[1, :, 0].tolist() == [[1, 0, 3], [0, 0, 1], [1, 0, 3]]
    # the image is air where the centre slice held the class, its own elsewhere
    assert erased_image[1, 0, 0, :2].tolist() == [AIR, AIR] and erased_image[1, 0, 0, 2] == image[1, 0, 0, 2]


def test_class_erasure_is_drawn_per_step_reaches_the_unet_and_is_recorded(workdir, monkeypatch):
    from volgen.errors import ConfigError
    from volgen.models import load_model
    from volgen.training import TrainConfig, train
    from volgen.training.randomness import step_erasures

    first = step_erasures(3, seed=0, batch_size=64, p=0.5)
    assert torch.equal(first, step_erasures(3, seed=0, batch_size=64, p=0.5))
    assert not torch.equal(first, step_erasures(4, seed=0, batch_size=64, p=0.5))
    assert 0 < int(first.sum()) < 64 and not step_erasures(3, seed=0, batch_size=64, p=0.0).any()

    seen = record_unet_inputs(monkeypatch)
    erase = {"erase_classes": ["box"], "erase_p": 1.0}
    path = write_config(workdir, output_dir="erase", max_steps=2, preview_every=0, ablation_p=0.0, data=erase)
    result = train(TrainConfig.from_yaml(path))
    inputs = torch.cat([x for x in seen if x.shape[0] == 4][:2])
    # onehot of the 2 foreground classes for slices z-1, z, z+1: (B, slice, class, H, W)
    masks = inputs[:, 1:7].reshape(len(inputs), 3, 2, *inputs.shape[2:])
    assert float(masks[:, :, 1].abs().sum()) == 0.0  # no box in any context slice
    assert float(masks[:, :, 0].sum()) > 0  # the ball stays
    assert torch.all(inputs[:, -2:] == 1.0)  # both classes still flagged specified
    training = load_model(result.model_dir).metadata.training
    assert training["erase_classes"] == ["box"] and training["erase_p"] == 1.0

    bad = write_config(workdir, output_dir="erase-bad", data={"erase_classes": ["skull"], "erase_p": 0.5})
    with pytest.raises(ConfigError, match="erase_classes: unknown class 'skull'; this map has: ball, box"):
        train(TrainConfig.from_yaml(bad))
    with pytest.raises(Exception, match="data.erase_p > 0 needs data.erase_classes"):
        TrainConfig.from_yaml(write_config(workdir, output_dir="erase-none", data={"erase_p": 0.5}))


def test_a_minimal_config_gets_the_measured_recipe_and_explicit_values_win(tmp_path):
    """`volgen train`'s defaults carry the recipe the ablations chose (air slices, edge cuts, dropout), so a
    user's minimal config trains the model the benchmarks measured; a config that sets a value keeps it."""
    from volgen.models import UNetConfig
    from volgen.training.config import TrainConfig

    minimal = {"output_dir": "run", "data": {"source": "data", "label_map": "labels.yaml"}}
    (tmp_path / "minimal.yaml").write_text(yaml.safe_dump(minimal))
    config = TrainConfig.from_yaml(tmp_path / "minimal.yaml")
    assert config.data.empty_slices == 4
    assert config.data.edge_cut_p == 0.1
    assert config.data.inplane_cut_p == 0.75
    assert config.data.inplane_cut_weights() == [1.0, 1.0, 1.0, 3.0]  # half the cuts are bands
    assert config.model.unet_config().dropout == 0.1
    assert config.training.full_mask_p == 0.5
    assert config.data.erase_classes == [] and config.data.erase_p == 0.0  # per dataset, never by default
    # the embedded models' configs spell the recipe out (they are the example of enclosing-class erasure);
    # colin27-small keeps the in-plane cuts and whole masks it was trained with, colin27-native has today's
    configs = Path(__file__).parents[1] / "configs/train"
    shipped = yaml.safe_load((configs / "colin27-small.yaml").read_text())
    assert shipped["data"]["empty_slices"] == config.data.empty_slices
    assert shipped["data"]["edge_cut_p"] == config.data.edge_cut_p
    assert shipped["model"]["dropout"] == config.model.dropout
    assert shipped["data"]["erase_classes"] == ["head"]
    small = TrainConfig.from_yaml(configs / "colin27-small.yaml")
    assert small.data.inplane_cut_p == 0.5 and small.training.full_mask_p == 0.0
    native = TrainConfig.from_yaml(configs / "colin27-native.yaml")
    assert native.data.inplane_cut_p == 0.75 and native.training.full_mask_p == 0.5

    older = {
        "output_dir": "run",
        "data": {
            "source": "data",
            "label_map": "labels.yaml",
            "empty_slices": 0,
            "edge_cut_p": 0.0,
            "inplane_cut_p": 0.0,
        },
        "model": {"dropout": None},
    }
    (tmp_path / "older.yaml").write_text(yaml.safe_dump(older))
    config = TrainConfig.from_yaml(tmp_path / "older.yaml")
    assert (
        config.data.empty_slices == 0 and config.data.edge_cut_p == 0.0 and config.data.inplane_cut_p == 0.0
    )
    assert config.model.unet_config().dropout == UNetConfig.preset("small").dropout == 0.0


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: file contents, ``None`` for folders."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("where", ["data", "above", "inside", "manifest-folder"])
def test_cli_output_dir_that_is_contains_or_lies_inside_the_data_writes_nothing(tmp_path, where):
    project = tmp_path / "project"
    make_case(project / "data", "case0", seed=0)
    (project / "labels.yaml").write_text(LABELS_YAML, encoding="utf-8")
    # the user's own config.yaml next to the data: a run writing into the data folder would replace it
    source = project / "data"
    output_dir = {
        "data": project / "data",
        "above": project,
        "inside": project / "data" / "images" / "run",
    }.get(where)
    if where == "manifest-folder":  # a manifest elsewhere naming files in the output folder
        (project / "lists").mkdir()
        (project / "lists" / "m.csv").write_text(
            "image,label\n../data/images/case0.nii.gz,../data/labels/case0.nii.gz\n", encoding="utf-8"
        )
        source, output_dir = project / "lists" / "m.csv", project / "data"
    config = write_config(
        tmp_path, source=str(source), label_map=str(project / "labels.yaml"), output_dir="x", max_steps=1
    )
    text = config.read_text(encoding="utf-8").replace("output_dir: x", f"output_dir: {output_dir}")
    (project / "data" / "config.yaml").write_text(text, encoding="utf-8")
    before = _tree(project)
    line = _one_line_error(_invoke("train", str(project / "data" / "config.yaml")))
    assert line.startswith("error: ") and "output_dir" in line and "choose" in line, line
    assert _tree(project) == before


def test_cli_output_dir_that_would_replace_the_config_file(tmp_path, workdir):
    config = write_config(tmp_path, source=str(workdir / "data"), label_map=str(workdir / "labels.yaml"))
    own = tmp_path / "config.yaml"
    own.write_text(
        config.read_text(encoding="utf-8").replace("output_dir: run", "output_dir: ."), encoding="utf-8"
    )
    before = _tree(tmp_path)
    line = _one_line_error(_invoke("train", str(own)))
    assert "config file" in line and "config.yaml" in line
    assert _tree(tmp_path) == before


def test_cli_output_dir_that_is_a_file(workdir, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n", encoding="utf-8")
    config = write_config(workdir, output_dir="f", max_steps=1)
    line = _one_line_error(_invoke("train", str(config), "--output-dir", str(target)))
    assert "notes.txt" in line and "not a folder" in line
    assert target.read_text(encoding="utf-8") == "mine\n"


@pytest.mark.parametrize(
    ("labels", "change"),
    [
        (LABELS_YAML + "  cyst: 9\n", "class(es) added: cyst"),  # used to be torch's size-mismatch traceback
        ("name: shapes\nclasses:\n  ball: [2, 7]\n  box: 1\n", "ball [1] -> [2, 7]; box [2, 7] -> [1]"),
    ],
    ids=["class-added", "values-swapped"],  # swapped: used to resume silently into an inconsistent model
)
def test_cli_resume_refuses_a_changed_label_map_in_one_line(workdir, tmp_path, labels, change):
    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(LABELS_YAML, encoding="utf-8")
    config = write_config(
        tmp_path, source=str(workdir / "data"), label_map=str(labels_file), max_steps=1, preview_every=0
    )
    assert _invoke("train", str(config)).exit_code == 0
    labels_file.write_text(labels, encoding="utf-8")
    before = _tree(tmp_path / "run")
    line = _one_line_error(_invoke("train", str(config), "--resume", "--max-steps", "2"))
    assert line.startswith("error: ") and "labels.yaml" in line and change in line, line
    assert _tree(tmp_path / "run") == before


def test_cli_resume_of_a_checkpoint_without_a_label_map_record_is_one_line(workdir, tmp_path):
    """A checkpoint written before the label map was recorded: a class added is still one line."""
    import json

    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(LABELS_YAML, encoding="utf-8")
    config = write_config(
        tmp_path, source=str(workdir / "data"), label_map=str(labels_file), max_steps=1, preview_every=0
    )
    assert _invoke("train", str(config)).exit_code == 0
    state = tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json"
    record = json.loads(state.read_text(encoding="utf-8"))
    del record["label_map"]
    state.write_text(json.dumps(record), encoding="utf-8")
    labels_file.write_text(LABELS_YAML + "  cyst: 9\n", encoding="utf-8")
    result = _invoke("train", str(config), "--resume", "--max-steps", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]  # after the data's log lines (logged when not a terminal)
    assert line.startswith("error: ") and "do not fit" in line and "label map" in line, line
