"""The Slicer module's plain-Python helper (plugins/slicer/VolGen/VolGenLib) against the real CLI.

No Slicer here: the helper builds the ``volgen generate`` command, runs it as a child process with the
tiny test model, parses its JSON progress, handles cancel and errors. Static checks make sure the Slicer
side at least compiles and that its .ui, CMake lists and icon agree with the code.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import struct
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volumes import assert_same_geometry, make_volume

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer"
MODULE_DIR = PLUGIN / "VolGen"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from VolGenLib import (  # noqa: E402
    GenerationJob,
    GenerationParameters,
    GenerationPaths,
    GenerationRunner,
    ModelInfoError,
    ParameterError,
    Segment,
    TempWorkspace,
    build_command,
    check_environment,
    error_message,
    model_classes,
    model_label_map,
    panel_error,
    parse_progress_line,
    segment_label_values,
)

PYTHON = sys.executable


# -- parameters ---------------------------------------------------------------------------------------------


def test_parameters_defaults_are_valid():
    params = GenerationParameters()
    assert params.scheduler == "dpmsolver++" and params.steps is None and not params.needs_reference


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"strength": 1.5}, "λ"),
        ({"strength": -0.1}, "λ"),
        ({"strength": float("nan")}, "λ"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"scheduler": "plms"}, "scheduler"),
        ({"seed": -1}, "seed"),
        ({"noise_correlation": 1.0}, "ρ"),
        ({"noise_correlation": -0.5}, "ρ"),
        ({"keep": ["liver"], "drop": ["kidney"]}, "either"),
        ({"device": "tpu"}, "device"),
        ({"unknown_labels": "ignore"}, "unknown labels"),
        ({"keep": ["a,b"]}, "comma"),
        ({"samples": 0}, "samples"),
        ({"samples": 1.5}, "samples"),
    ],
)
def test_parameters_reject_out_of_range(kwargs, words):
    with pytest.raises(ParameterError, match=words):
        GenerationParameters(**kwargs)


def test_parameters_from_class_checkboxes():
    all_on = GenerationParameters.from_class_selection({"liver": True, "kidney": True}, steps=3)
    assert all_on.drop is None and all_on.keep is None and all_on.steps == 3
    some = GenerationParameters.from_class_selection({"liver": True, "kidney": False, "spleen": False})
    assert some.drop == ["kidney", "spleen"]


# -- command line -------------------------------------------------------------------------------------------


def _paths(tmp_path: Path, reference: bool = False) -> GenerationPaths:
    return GenerationPaths(
        input=tmp_path / "seg.nii.gz",
        output=tmp_path / "out.nii.gz",
        reference=tmp_path / "ref.nii.gz" if reference else None,
    )


def test_build_command(tmp_path):
    params = GenerationParameters(
        model_dir="/models/abdomen",
        strength=0.3,
        steps=7,
        scheduler="ddim",
        seed=42,
        noise_correlation=0.5,
        drop=["kidney", "spleen"],
        device="cpu",
    )
    command = build_command(params, _paths(tmp_path, reference=True), python="/opt/py")
    assert command[:5] == ["/opt/py", "-m", "volgen", "generate", str(tmp_path / "seg.nii.gz")]

    def value(flag):
        return command[command.index(flag) + 1]

    assert value("--output") == str(tmp_path / "out.nii.gz")
    assert value("--model") == "/models/abdomen"
    assert value("--reference") == str(tmp_path / "ref.nii.gz")
    assert value("--strength") == "0.3"
    assert value("--drop") == "kidney,spleen" and "--keep" not in command
    assert (value("--seed"), value("--scheduler"), value("--steps")) == ("42", "ddim", "7")
    assert value("--noise-correlation") == "0.5" and value("--device") == "cpu"
    assert value("--progress") == "json" and "--overwrite" not in command


def test_build_command_defaults_and_keep(tmp_path):
    command = build_command(GenerationParameters(keep=["liver"]), _paths(tmp_path))
    assert command[0] == PYTHON  # outside Slicer the default Python is this one
    assert "--model" not in command and "--reference" not in command and "--strength" not in command
    assert command[command.index("--keep") + 1] == "liver"
    # steps and guidance left to the model: its own sampling defaults, else volgen's
    assert "--steps" not in command and "--guidance-scale" not in command


def test_build_command_needs_reference_below_lambda_one(tmp_path):
    with pytest.raises(ParameterError, match="reference"):
        build_command(GenerationParameters(strength=0.5), _paths(tmp_path))


# -- progress lines -----------------------------------------------------------------------------------------


def test_parse_progress_line():
    event = parse_progress_line(
        '{"event": "progress", "step": 2, "steps": 4, "slices_done": 14, "slices_total": 28, "fraction": 0.5,'
        ' "elapsed": 1.5}\n'
    )
    assert event.kind == "progress" and event.step == 2 and event.steps == 4
    assert event.fraction == 0.5 and event.elapsed == 1.5 and event.describe() == "step 2/4, 50%"
    done = parse_progress_line(b'{"event": "done", "output": "/x/out.nii.gz", "sidecar": "/x/out.json"}')
    assert done.kind == "done" and done.output == "/x/out.nii.gz" and done.fraction == 1.0
    error = parse_progress_line('{"event": "error", "message": "bad labels"}')
    assert error.message == "bad labels"
    computed = parse_progress_line('{"event": "progress", "slices_done": 1, "slices_total": 4}')
    assert computed.fraction == 0.25


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "\n",
        "warning: something",
        "[1, 2]",
        '"event"',
        "{not json}",
        '{"step": 1}',
        '{"event": 3}',
        '{"event": ""}',
        "{",
        "Loading pipeline components...: 100%",
        '{"event": "progress"',
        "null",
    ],
)
def test_parse_progress_line_skips_noise(line):
    assert parse_progress_line(line) is None


# -- workspace and model ------------------------------------------------------------------------------------


def test_workspace_cleanup(tmp_path):
    with TempWorkspace(tmp_path) as workspace:
        paths = workspace.paths(with_reference=True)
        assert paths.input.parent == workspace.folder and paths.reference is not None
        assert paths.sidecar == workspace.folder / "synthetic.nii.gz.json"
        paths.input.write_bytes(b"x")
    assert not workspace.exists
    kept = TempWorkspace(tmp_path, keep=True)
    assert not kept.cleanup() and kept.exists
    assert kept.cleanup(force=True) and not kept.exists
    assert TempWorkspace(tmp_path).paths().reference is None


def test_model_classes(tiny_model_dir, tmp_path):
    assert model_classes(tiny_model_dir) == ["liver", "kidney", "spleen"]
    assert model_label_map(tiny_model_dir) == {"liver": [1], "kidney": [2, 5], "spleen": [3]}
    with pytest.raises(ModelInfoError, match="not a volgen model folder"):
        model_classes(tmp_path)
    (tmp_path / "volgen.json").write_text("{broken")
    with pytest.raises(ModelInfoError, match="cannot read"):
        model_classes(tmp_path)


def test_segment_label_values():
    classes = {"liver": [1], "left_kidney": [2, 5], "spleen": [3]}
    segments = [
        Segment("s1", "Liver"),
        Segment("s2", "Left Kidney", label_value=9),
        Segment("s3", "Segment_3", 3),
        Segment("s4", "tumour", 7),
        Segment("s5", "left-kidney"),
    ]
    mapping = segment_label_values(segments, classes)
    assert mapping.values == {"s1": 1, "s2": 2, "s3": 3, "s5": 2}
    assert mapping.classes["s3"] == "spleen" and mapping.unmatched == ["tumour"]
    assert "tumour -> left out" in mapping.describe(segments)


def test_check_environment_reports_this_python():
    status = check_environment(PYTHON)
    assert status.ready, status.error
    missing = check_environment(str(Path(PYTHON).parent / "no-such-python"))
    assert not missing.ready and "not found" in missing.error


# -- runner with a stand-in process (fast, no torch) --------------------------------------------------------

FAKE_CLI = r"""
import json, sys, time
print("some library noise")
print(json.dumps({"event": "start", "segmentation": "x"}), flush=True)
for i in range(1, 4):
    print(json.dumps({"event": "progress", "step": i, "steps": 3, "fraction": i / 3}), flush=True)
    time.sleep(float(sys.argv[1]))
if sys.argv[2] == "fail":
    print(json.dumps({"event": "error", "message": "label values unknown"}), flush=True)
    print("error: label values unknown", file=sys.stderr)
    sys.exit(1)
if sys.argv[2] == "crash":
    print("Traceback (most recent call last):\n  ...\nRuntimeError: boom", file=sys.stderr)
    sys.exit(3)
done = {"event": "done", "output": "out.nii.gz", "sidecar": "out.json", "seconds": 0.1}
print(json.dumps(done), flush=True)
"""


def test_runner_success_with_stand_in(tmp_path):
    runner = GenerationRunner([PYTHON, "-c", FAKE_CLI, "0", "ok"], cwd=tmp_path).start()
    seen = []
    result = runner.wait(timeout=60, on_event=seen.append)
    assert result.ok and result.returncode == 0 and result.output == tmp_path / "out.nii.gz"
    assert [e.kind for e in seen] == ["start", "progress", "progress", "progress", "done"]
    assert runner.noise == ["some library noise"] and runner.poll() == []


def test_runner_reports_every_sample_with_stand_in(tmp_path):
    """``--samples``: the ``done`` event lists every output; a relative path is in the CLI's folder."""
    done = {"event": "done", "output": "o_s0.nii.gz", "outputs": ["o_s0.nii.gz", "/abs/o_s1.nii.gz"]}
    script = f"import json; print(json.dumps({done!r}))"
    result = GenerationRunner([PYTHON, "-c", script], cwd=tmp_path).start().wait(timeout=60)
    assert result.ok and result.output == tmp_path / "o_s0.nii.gz"
    assert result.outputs == [tmp_path / "o_s0.nii.gz", Path("/abs/o_s1.nii.gz")]
    assert parse_progress_line(json.dumps(done)).outputs == done["outputs"]
    one = GenerationRunner([PYTHON, "-c", FAKE_CLI, "0", "ok"], cwd=tmp_path).start().wait(timeout=60)
    assert one.outputs == [one.output]  # a CLI that lists no outputs: the one it names


@pytest.mark.parametrize(
    ("mode", "message"), [("fail", "label values unknown"), ("crash", "RuntimeError: boom")]
)
def test_runner_failure_with_stand_in(tmp_path, mode, message):
    result = GenerationRunner([PYTHON, "-c", FAKE_CLI, "0", mode], cwd=tmp_path).start().wait(timeout=60)
    assert not result.ok and result.output is None and message in result.error


def test_runner_poll_and_cancel_with_stand_in(tmp_path):
    runner = GenerationRunner([PYTHON, "-c", FAKE_CLI, "30", "ok"], cwd=tmp_path).start()
    _first_progress(runner.poll, lambda: runner.finished, runner)
    runner.cancel(timeout=5)
    result = runner.result()
    assert result.cancelled and result.error is None and result.output is None
    assert runner.process.returncode is not None and not runner.running


def test_error_message_fallbacks():
    assert error_message([], ["Traceback", "ModuleNotFoundError: No module named volgen"], 1).startswith(
        "volgen is not installed"
    )
    assert error_message([], ["╭─ Error ─╮", "│ Invalid value for '--steps' │", "╰──╯"], 2).endswith(
        "Invalid value for '--steps'"
    )
    assert error_message([], [], 0) is None
    assert "signal 9" in error_message([], [], -9)


def _first_progress(poll, finished, runner, timeout: float = 180.0):
    """Poll (as a Qt timer would) until the first ``progress`` event."""
    deadline = time.monotonic() + timeout
    while True:
        event = next((e for e in poll() if e.kind == "progress"), None)
        if event is not None:
            return event
        assert not finished(), runner.stderr_lines
        assert time.monotonic() < deadline, "no progress event"
        time.sleep(0.05)


def test_panel_error_speaks_the_panel_language(tmp_path):
    paths = _paths(tmp_path, reference=True)
    message = (
        f"{paths.input}: label values unknown to label map 'x': 7 "
        "(use --unknown-labels background to treat them as background)"
    )
    shown = panel_error(message, paths)
    assert str(tmp_path) not in shown and shown.startswith("the input segmentation: label values unknown")
    assert "Treat unknown label values as background" in shown
    assert panel_error("--noise-correlation (ρ) must be in [0, 1), got 1.0") == "ρ must be in [0, 1), got 1.0"


# -- the real CLI ------------------------------------------------------------------------------------------
# The three runs start together (each spends most of its time importing torch); each test follows its own.


def _bad_labels() -> sitk.Image:
    seg = make_volume("label", size=(8, 8, 4), n_labels=3)
    array = sitk.GetArrayFromImage(seg)
    array[0, 0, 0] = 7  # unknown to the tiny model's label map
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(seg)
    return bad


@pytest.fixture(scope="module")
def cli_jobs(tiny_model_dir, tmp_path_factory):
    """Four started ``volgen generate`` jobs: ``ok`` (2 steps), ``samples`` (two samples), ``long`` (to
    cancel), ``bad`` (fails)."""
    model = str(tiny_model_dir)
    root = tmp_path_factory.mktemp("slicer-jobs")
    specs = {
        "ok": (
            GenerationParameters(
                model_dir=model, steps=2, scheduler="ddim", seed=3, device="cpu", drop=["spleen"]
            ),
            make_volume("label", size=(12, 10, 7), spacing=(0.7, 0.9, 2.5)),  # oblique, anisotropic
            {},
        ),
        "samples": (
            GenerationParameters(model_dir=model, steps=2, scheduler="ddim", seed=5, device="cpu", samples=2),
            make_volume("label", size=(10, 9, 5), spacing=(0.8, 1.1, 2.0)),
            {},
        ),
        "long": (
            GenerationParameters(model_dir=model, steps=1000, scheduler="ddpm", device="cpu"),
            make_volume("label", size=(48, 40, 60), spacing=(0.8, 0.8, 1.5)),
            {"keep_files": True},
        ),
        "bad": (GenerationParameters(model_dir=model, steps=1, device="cpu"), _bad_labels(), {}),
    }
    jobs = {}
    for name, (params, image, options) in specs.items():
        folder = root / name
        job = GenerationJob(params, python=PYTHON, workspace_root=folder, **options)
        sitk.WriteImage(image, str(job.paths.input))
        jobs[name] = (job.start(), image, folder)
    yield jobs
    for job, _, _ in jobs.values():
        job.cancel(timeout=5)


def test_generate_through_the_real_cli(cli_jobs):
    job, seg, _ = cli_jobs["ok"]
    assert job.command[:4] == [PYTHON, "-m", "volgen", "generate"]
    events = []
    result = job.wait(timeout=300, on_event=events.append)
    assert result.ok, (result.error, result.stderr)
    lines = [e for e in events if e.kind == "progress"]
    assert lines and events[0].kind == "start" and events[-1].kind == "done"
    assert job.runner.noise == []  # every stdout line was a JSON event
    fractions = [e.fraction for e in lines]
    assert all(b >= a for a, b in zip(fractions, fractions[1:], strict=False)) and fractions[-1] == 1.0
    assert lines[-1].step == lines[-1].steps == 2

    out = sitk.ReadImage(str(result.output))
    assert_same_geometry(out, seg)
    assert np.isfinite(sitk.GetArrayViewFromImage(out)).all()
    sidecar = json.loads(job.paths.sidecar.read_text())
    assert sidecar["settings"]["drop"] == ["spleen"] and sidecar["settings"]["num_inference_steps"] == 2
    job.close()
    assert not job.workspace.exists


def test_samples_through_the_real_cli(cli_jobs):
    """The panel's samples: ``--samples 2`` writes two volumes (seeds 5 and 6), and the run reports both."""
    job, seg, _ = cli_jobs["samples"]
    assert job.command[job.command.index("--samples") + 1] == "2"
    result = job.wait(timeout=300)
    assert result.ok, (result.error, result.stderr)
    assert [p.name for p in result.outputs] == ["synthetic_s0.nii.gz", "synthetic_s1.nii.gz"]
    assert result.output == result.outputs[0]
    arrays = []
    for k, path in enumerate(result.outputs):
        out = sitk.ReadImage(str(path))
        assert_same_geometry(out, seg)
        arrays.append(sitk.GetArrayFromImage(out))
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        assert sidecar["settings"]["seed"] == 5 + k
    assert not np.array_equal(arrays[0], arrays[1])
    job.close()
    assert not job.workspace.exists


def test_cancel_the_real_cli(cli_jobs):
    job, _, folder = cli_jobs["long"]
    first = _first_progress(job.poll, lambda: job.finished, job.runner, timeout=300)
    assert first.step == 1 and first.steps == 1000
    job.cancel(timeout=10)
    result = job.runner.result()
    assert result.cancelled and result.output is None and result.error is None
    assert job.runner.process.returncode is not None and not job.runner.running  # the process is gone
    assert not job.workspace.exists and not job.paths.output.exists()  # no files, even with keep_files
    assert list(folder.iterdir()) == []


def test_cli_error_is_surfaced(cli_jobs):
    job, _, _ = cli_jobs["bad"]
    result = job.wait(timeout=300)
    assert not result.ok and result.returncode == 1 and result.output is None
    assert "label values unknown" in result.error and "7" in result.error
    assert any(line.startswith("error:") and "unknown" in line for line in result.stderr)
    job.close()
    assert not job.workspace.exists


# -- the Slicer side, statically ----------------------------------------------------------------------------


def _python_files() -> list[Path]:
    return sorted(MODULE_DIR.rglob("*.py"))


def test_plugin_python_compiles(tmp_path):
    for path in _python_files():
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_helper_imports_no_slicer():
    banned = {"slicer", "qt", "vtk", "ctk", "vtkmodules", "slicer_core", "__main__"}
    for path in sorted((MODULE_DIR / "VolGenLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_mrml_module_imports_no_qt():
    """The MRML functions use MRML classes only: no Qt, no application, no ``slicer.util`` (GUI helpers)."""
    for path in sorted((MODULE_DIR / "VolGenMRML").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in {"qt", "ctk", "slicer.util"} for n in names), path.name
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "slicer"
            ):
                assert node.attr not in {"app", "util", "modules", "mrmlScene"}, (
                    f"{path.name}: slicer.{node.attr}"
                )


def test_ui_file_matches_the_widget():
    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "VolGen.ui")
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "VolGen.py").read_text(encoding="utf-8")))
    assert used and used <= set(widgets), sorted(used - set(widgets))
    assert widgets["inputSelector"] == "qMRMLNodeComboBox" and widgets["strengthSlider"] == "ctkSliderWidget"
    assert widgets["modelPathLineEdit"] == "ctkPathLineEdit"
    bound = {p.findtext("string") for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    source = (MODULE_DIR / "VolGen.py").read_text(encoding="utf-8")
    for name in bound:
        assert re.search(rf"^\s+{name}: ", source, re.M), f"{name} is bound in the .ui but not a parameter"


def test_cmake_lists_every_module_file():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in _python_files():
        relative = path.relative_to(MODULE_DIR).as_posix()
        if relative == "VolGen.py" or relative.startswith("Testing/"):
            continue
        assert relative in text, f"{relative} missing from MODULE_PYTHON_SCRIPTS"
    assert "slicerMacroBuildScriptedModule" in text
    top = (PLUGIN / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(VolGen)" in top and "Slicer_EXTENSION_GENERATE_CONFIG" in top


def test_icon_is_a_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "VolGen.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
