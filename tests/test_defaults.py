"""One source of generation defaults: every surface (CLI, API, pipeline, Slicer module) agrees with
:mod:`volgen.defaults`. A drift anywhere fails here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import typer

from volgen import defaults
from volgen.cli.app import _register, app
from volgen.generation import GenerateSettings
from volgen.pipeline import SegmentationToVolumePipeline

_register()
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "VolGen"

#: setting -> its value in volgen.defaults
EXPECTED = {
    "seed": defaults.SEED,
    "scheduler": defaults.SCHEDULER,
    "steps": None,  # the model's own sampling.steps, else defaults.STEPS (GenerateSettings.for_model)
    "noise_correlation": defaults.NOISE_CORRELATION,
    "fine_noise_correlation": defaults.FINE_NOISE_CORRELATION,
    "x0_smoothing": defaults.X0_SMOOTHING,
    "strength": defaults.STRENGTH,
    "slice_batch_size": defaults.SLICE_BATCH_SIZE,
    "unknown_labels": defaults.UNKNOWN_LABELS,
    "device": defaults.DEVICE,
    "precision": defaults.PRECISION,
    "slice_axes": defaults.SLICE_AXES,
    "axis_schedule": defaults.AXIS_SCHEDULE,
    "late_fraction": defaults.LATE_FRACTION,
}
#: Settings the Slicer panel does not expose: it never passes them, so ``volgen generate``'s defaults apply.
NOT_IN_PANEL = {
    "fine_noise_correlation": "--fine-noise-correlation",
    "background_fine_noise_correlation": "--rho-fine-background (the model's own, else the fine ρ)",
    "axis_schedule": "--axis-schedule",
    "late_fraction": "--late-fraction",
}


def _command_defaults(name: str) -> dict[str, object]:
    command = typer.main.get_command(app).commands[name]
    return {p.name: p.default for p in command.params}


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_cli_option_defaults(command):
    found = _command_defaults(command)
    for key, value in EXPECTED.items():
        if key in found:  # batch has no x0-smoothing
            assert found[key] == value, f"volgen {command} --{key.replace('_', '-')}"
    assert {"seed", "scheduler", "steps", "noise_correlation", "strength"} <= set(found)
    assert set(NOT_IN_PANEL) <= set(found)


def test_generate_settings_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(GenerateSettings)}
    fields["steps"] = fields.pop("num_inference_steps")
    for key, value in EXPECTED.items():
        if key in fields:
            assert fields[key] == value, f"GenerateSettings.{key}"


def test_pipeline_call_defaults():
    params = inspect.signature(SegmentationToVolumePipeline.__call__).parameters
    assert params["num_inference_steps"].default == defaults.STEPS
    assert params["noise_correlation"].default == defaults.NOISE_CORRELATION
    assert params["x0_smoothing"].default == defaults.X0_SMOOTHING
    assert params["slice_batch_size"].default == defaults.SLICE_BATCH_SIZE
    assert params["strength"].default == defaults.STRENGTH
    plan = inspect.signature(SegmentationToVolumePipeline.plan).parameters
    assert plan["guidance_interval"].default == defaults.GUIDANCE_INTERVAL
    assert params["background_fine_noise_correlation"].default == defaults.BACKGROUND_FINE_NOISE_CORRELATION
    keys = ("num_inference_steps", "noise_correlation", "x0_smoothing", "slice_batch_size")
    for key in (*keys, "background_fine_noise_correlation"):
        assert plan[key].default == params[key].default, f"plan {key}"


def test_multiaxis_sampling_takes_the_same_defaults():
    from volgen.multiaxis import generate_multiaxis

    params = inspect.signature(generate_multiaxis).parameters
    assert params["num_inference_steps"].default == defaults.STEPS
    assert params["noise_correlation"].default == defaults.NOISE_CORRELATION
    assert params["x0_smoothing"].default == defaults.X0_SMOOTHING
    assert params["scheduler"].default == defaults.SCHEDULER
    assert params["slice_batch_size"].default == defaults.SLICE_BATCH_SIZE
    assert params["guidance_scale"].default is None  # the model's default, as everywhere


def _plugin_node_defaults() -> dict[str, object]:
    """The Slicer module's parameter-node defaults, read from VolGen.py (it imports Slicer, so parse it).

    A default is either a literal or ``GenerationParameters.<field>`` (the plain-Python helper's dataclass,
    which the panel takes its defaults from); the latter is resolved through the helper."""
    sys.path.insert(0, str(PLUGIN))
    try:
        from VolGenLib import parameters
        from VolGenLib.parameters import GenerationParameters
    finally:
        sys.path.remove(str(PLUGIN))
    helper = GenerationParameters()

    def value(node: ast.expr) -> object:
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "GenerationParameters":
            return getattr(helper, node.attr)
        if isinstance(node, ast.Name):  # a constant of the helper's (MODEL_STEPS)
            return getattr(parameters, node.id)
        return ast.literal_eval(node)

    tree = ast.parse((PLUGIN / "VolGen.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(s, ast.AnnAssign) and getattr(s.target, "id", "") == "noiseCorrelation"
            for s in node.body
        ):
            return {
                s.target.id: value(s.value)
                for s in node.body
                if isinstance(s, ast.AnnAssign)
                and s.value is not None
                and isinstance(s.target, ast.Name)
                and isinstance(s.value, (ast.Constant, ast.Attribute, ast.Name))
            }
    raise AssertionError("no parameter node class with noiseCorrelation in VolGen.py")


def test_slicer_module_defaults():
    node = _plugin_node_defaults()
    assert node["noiseCorrelation"] == defaults.NOISE_CORRELATION, "Slicer panel ρ"
    assert node["scheduler"] == defaults.SCHEDULER
    assert node["seed"] == defaults.SEED
    assert node["strength"] == defaults.STRENGTH
    assert node["device"] == defaults.DEVICE

    sys.path.insert(0, str(PLUGIN))
    try:
        from VolGenLib.parameters import SCHEDULERS, GenerationParameters, steps_option
    finally:
        sys.path.remove(str(PLUGIN))
    params = GenerationParameters()
    # steps: the panel passes none, so the model decides (its own sampling.steps, else defaults.STEPS)
    assert steps_option(node["steps"]) is None and params.steps is None
    assert params.noise_correlation == defaults.NOISE_CORRELATION
    assert params.scheduler == defaults.SCHEDULER
    assert params.seed == defaults.SEED and params.strength == defaults.STRENGTH
    assert params.device == defaults.DEVICE and params.unknown_labels == defaults.UNKNOWN_LABELS
    assert set(SCHEDULERS) == set(defaults.SCHEDULERS)


def test_slicer_module_guidance_and_slice_axes_default_to_the_model():
    """The panel's guidance and slice axes: at their defaults its command line passes neither, so the model
    decides (guided with ``defaults.GUIDANCE_SCALE`` if it has flags; its own slice axis:
    ``defaults.SLICE_AXES`` is ``None``); changed, they reach ``volgen generate``. Its limits are the
    library's."""
    assert defaults.SLICE_AXES is None
    sys.path.insert(0, str(PLUGIN))
    try:
        from VolGenLib.command import build_command
        from VolGenLib.parameters import (
            GUIDANCE_SCALE,
            MAX_GUIDANCE_SCALE,
            SLICE_AXES,
            GenerationParameters,
            ParameterError,
            guidance_option,
        )
        from VolGenLib.workspace import GenerationPaths
    finally:
        sys.path.remove(str(PLUGIN))
    assert GUIDANCE_SCALE == defaults.GUIDANCE_SCALE and MAX_GUIDANCE_SCALE == defaults.MAX_GUIDANCE_SCALE
    assert SLICE_AXES == defaults.AXIS_NAMES
    fields = {f.name for f in dataclasses.fields(GenerationParameters)}
    assert not fields & set(NOT_IN_PANEL), "the panel exposes an axis schedule: compare its default here"
    node = _plugin_node_defaults()
    assert node["sliceAxes"] == "" and not {"axisSchedule", "lateFraction"} & set(node)
    assert guidance_option(GUIDANCE_SCALE) is None and guidance_option(1.0) == 1.0
    paths = GenerationPaths(input=Path("in.nii.gz"), output=Path("out.nii.gz"), reference=None)
    command = build_command(GenerationParameters(), paths, python="python")
    assert not {"--slice-axes", "--guidance-scale", *NOT_IN_PANEL.values()} & set(command)
    chosen = GenerationParameters(guidance_scale=1.0, slice_axes="Coronal, axial")
    command = build_command(chosen, paths, python="python")
    assert command[command.index("--guidance-scale") + 1] == "1.0"
    assert command[command.index("--slice-axes") + 1] == "coronal,axial"
    for bad in ({"guidance_scale": 21.0}, {"slice_axes": ["axial", "axial"]}, {"slice_axes": ["oblique"]}):
        with pytest.raises(ParameterError):
            GenerationParameters(**bad)


#: Settings of ``GenerateSettings`` the panel leaves to ``volgen generate``'s defaults, and why.
PANEL_LEAVES = {
    **NOT_IN_PANEL,
    "x0_smoothing": "--x0-smoothing (off by default; an expert knob)",
    "slice_batch_size": "--slice-batch-size (auto; it never changes the result)",
    "resampling": "--resampling (mask-guided by default; linear reproduces volumes of older volgen)",
}
#: ``GenerateSettings`` field -> the Slicer helper's ``GenerationParameters`` field, where the names differ.
PANEL_NAMES = {"num_inference_steps": "steps"}


def _plugin_helper():
    """The Slicer helper package ``VolGenLib`` (plain Python)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        import VolGenLib
    finally:
        sys.path.remove(str(PLUGIN))
    return VolGenLib


def test_slicer_panel_offers_every_generation_setting():
    """Every setting of a generation is in the panel or named here as left to the CLI's default: a new
    knob must be added to the panel (or here, with its reason)."""
    helper = _plugin_helper()
    panel = {f.name for f in dataclasses.fields(helper.GenerationParameters)}
    for field in dataclasses.fields(GenerateSettings):
        name = PANEL_NAMES.get(field.name, field.name)
        assert name in panel or field.name in PANEL_LEAVES, f"the Slicer panel lacks {field.name}"
    assert {"guidance_scale", "slice_axes", "samples"} <= panel


def test_slicer_panel_samples():
    """``--samples`` in the panel: volgen's default and limit (parameter node, spin box), passed to
    ``volgen generate`` only when changed, checked before a run."""
    helper = _plugin_helper()
    assert helper.SAMPLES == defaults.SAMPLES and helper.MAX_SAMPLES == defaults.MAX_SAMPLES
    assert helper.GenerationParameters().samples == defaults.SAMPLES
    assert _plugin_node_defaults()["samples"] == defaults.SAMPLES
    tree = ET.parse(PLUGIN / "Resources" / "UI" / "VolGen.ui")
    box = next(w for w in tree.iter("widget") if w.get("name") == "samplesSpinBox")
    limits = {
        p.get("name"): int(p.findtext("number")) for p in box.iter("property") if p.find("number") is not None
    }
    assert (limits["minimum"], limits["maximum"]) == (1, defaults.MAX_SAMPLES)
    paths = helper.GenerationPaths(input=Path("in.nii.gz"), output=Path("out.nii.gz"))
    assert "--samples" not in helper.build_command(helper.GenerationParameters(), paths, python="py")
    three = helper.build_command(helper.GenerationParameters(samples=3), paths, python="py")
    assert three[three.index("--samples") + 1] == "3"
    for bad in (0, defaults.MAX_SAMPLES + 1, 2.0, True):
        with pytest.raises(helper.ParameterError, match="samples"):
            helper.GenerationParameters(samples=bad)
