"""One source of generation defaults: every surface (CLI, API, pipeline, Slicer module) agrees with
:mod:`volgen.defaults`. A drift anywhere fails here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
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
    "steps": defaults.STEPS,
    "noise_correlation": defaults.NOISE_CORRELATION,
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
#: Settings the Slicer panel does not expose: it never passes them, so ``volgen generate``'s defaults apply
#: (the model's own slice axis; the axis schedule then has nothing to schedule).
NOT_IN_PANEL = {
    "slice_axes": "--slice-axes",
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


def _plugin_node_defaults() -> dict[str, object]:
    """The Slicer module's parameter-node defaults, read from VolGen.py (it imports Slicer, so parse it).

    A default is either a literal or ``GenerationParameters.<field>`` (the plain-Python helper's dataclass,
    which the panel takes its defaults from); the latter is resolved through the helper."""
    sys.path.insert(0, str(PLUGIN))
    try:
        from VolGenLib.parameters import GenerationParameters
    finally:
        sys.path.remove(str(PLUGIN))
    helper = GenerationParameters()

    def value(node: ast.expr) -> object:
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "GenerationParameters":
            return getattr(helper, node.attr)
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
                and isinstance(s.value, (ast.Constant, ast.Attribute))
            }
    raise AssertionError("no parameter node class with noiseCorrelation in VolGen.py")


def test_slicer_module_defaults():
    node = _plugin_node_defaults()
    assert node["noiseCorrelation"] == defaults.NOISE_CORRELATION, "Slicer panel ρ"
    assert node["steps"] == defaults.STEPS
    assert node["scheduler"] == defaults.SCHEDULER
    assert node["seed"] == defaults.SEED
    assert node["strength"] == defaults.STRENGTH
    assert node["device"] == defaults.DEVICE

    sys.path.insert(0, str(PLUGIN))
    try:
        from VolGenLib.parameters import SCHEDULERS, GenerationParameters
    finally:
        sys.path.remove(str(PLUGIN))
    params = GenerationParameters()
    assert params.noise_correlation == defaults.NOISE_CORRELATION
    assert params.steps == defaults.STEPS and params.scheduler == defaults.SCHEDULER
    assert params.seed == defaults.SEED and params.strength == defaults.STRENGTH
    assert params.device == defaults.DEVICE and params.unknown_labels == defaults.UNKNOWN_LABELS
    assert set(SCHEDULERS) == set(defaults.SCHEDULERS)


def test_slicer_module_leaves_the_slice_axes_to_the_model():
    """The panel has no slice-axes setting and its command line passes none: it generates along the model's
    own axis, which is ``volgen generate``'s default (``defaults.SLICE_AXES`` is ``None``)."""
    assert defaults.SLICE_AXES is None
    sys.path.insert(0, str(PLUGIN))
    try:
        from VolGenLib.command import build_command
        from VolGenLib.parameters import GenerationParameters
        from VolGenLib.workspace import GenerationPaths
    finally:
        sys.path.remove(str(PLUGIN))
    fields = {f.name for f in dataclasses.fields(GenerationParameters)}
    assert not fields & set(NOT_IN_PANEL), "the panel exposes a slice-axes setting: compare its default here"
    node = _plugin_node_defaults()
    assert not {"sliceAxes", "axisSchedule", "lateFraction"} & set(node)
    paths = GenerationPaths(input=Path("in.nii.gz"), output=Path("out.nii.gz"), reference=None)
    command = build_command(GenerationParameters(), paths, python="python")
    assert not set(NOT_IN_PANEL.values()) & set(command)
