"""The Slicer module's install path (VolGenLib.install) and its defaults.

The module installs volgen only from a wheel, a source archive or folder the user picked, or a URL the user
typed; never a bare project name from the package index. The panel's defaults are volgen's defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "plugins" / "slicer" / "VolGen"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from VolGenLib import (  # noqa: E402
    MODEL_STEPS,
    GenerationParameters,
    InstallSource,
    InstallSourceError,
    install_source,
    pip_arguments,
    steps_option,
)


@pytest.mark.parametrize(
    "name", ["volgen", " volgen ", "volgen==0.1.0", "VolGen>=0.1", "volgen[test]", "torch"]
)
def test_a_bare_name_is_never_installed(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InstallSourceError, match="package name"):
        install_source(name)


def test_empty_and_missing_are_refused(tmp_path):
    with pytest.raises(InstallSourceError, match="choose"):
        install_source("  ")
    with pytest.raises(InstallSourceError, match="no such file"):
        install_source(tmp_path / "volgen-0.1.0-py3-none-any.whl")


def test_wheels_and_archives_of_volgen_only(tmp_path):
    for name, kind in [
        ("volgen-0.1.0-py3-none-any.whl", "wheel"),
        ("volgen-0.1.0.tar.gz", "sdist"),
        ("volgen-0.2.0.zip", "sdist"),
    ]:
        (tmp_path / name).write_bytes(b"")
        source = install_source(str(tmp_path / name))
        assert source == InstallSource(kind, str((tmp_path / name).resolve()))
        assert pip_arguments(source) == [str((tmp_path / name).resolve())]
    for name, words in [
        ("volgenx-0.1.0-py3-none-any.whl", "not of volgen"),
        ("numpy-2.0.0.tar.gz", "not of volgen"),
        ("volgen.txt", "not a wheel"),
    ]:
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(InstallSourceError, match=words):
            install_source(tmp_path / name)


def test_a_path_with_spaces_stays_one_argument(tmp_path):
    folder = tmp_path / "my downloads"
    folder.mkdir()
    wheel = folder / "volgen-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert pip_arguments(install_source(str(wheel))) == [str(wheel.resolve())]


def test_source_folders(tmp_path):
    assert install_source(ROOT) == InstallSource("folder", str(ROOT))  # this checkout
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InstallSourceError, match="no pyproject.toml"):
        install_source(other)
    (other / "pyproject.toml").write_text('[tool.x]\nname = "volgen"\n\n[project]\nname = "something"\n')
    with pytest.raises(InstallSourceError, match="'something', not of volgen"):
        install_source(other)


def test_urls():
    url = "https://example.org/dist/volgen-0.1.0-py3-none-any.whl"
    assert pip_arguments(install_source(f"  {url} ")) == [f"volgen @ {url}"]
    git = "git+https://example.org/volgen.git@v0.1.0"
    assert install_source(git).requirement == f"volgen @ {git}"
    assert install_source(git + "#egg=volgen").requirement == git + "#egg=volgen"
    for bad, words in [("ftp://example.org/volgen.whl", "cannot install"), ("https:// x", "no spaces")]:
        with pytest.raises(InstallSourceError, match=words):
            install_source(bad)


def test_pip_accepts_what_the_helper_gives(tmp_path):
    """A real wheel of this checkout, checked by the helper, is what pip would install (dry run)."""
    from test_packaging import copy_source

    src = tmp_path / "src"
    copy_source(src)
    dist = tmp_path / "my dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(dist)], check=True
    )
    (wheel,) = dist.glob("volgen-*.whl")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index"]
    done = subprocess.run(
        [*command, *pip_arguments(install_source(str(wheel)))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Would install volgen-0.1.0" in done.stdout


def _module_tree() -> ast.Module:
    return ast.parse((MODULE_DIR / "VolGen.py").read_text(encoding="utf-8"))


def test_the_module_installs_only_checked_sources():
    calls = [
        node
        for node in ast.walk(_module_tree())
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "pip_install"
    ]
    assert calls, "the module no longer installs volgen? update this test"
    for call in calls:
        (arg,) = call.args
        assert isinstance(arg, ast.Call) and getattr(arg.func, "id", None) == "pip_arguments", ast.unparse(
            call
        )


def test_panel_defaults_are_volgens_defaults():
    from volgen.api import GenerateSettings

    library = GenerateSettings()
    panel = GenerationParameters()
    for field in ("strength", "num_inference_steps", "scheduler", "seed", "noise_correlation"):
        mine = "steps" if field == "num_inference_steps" else field
        assert getattr(panel, mine) == getattr(library, field), field
    # the parameter node takes its defaults from GenerationParameters, not from literals of its own
    node_class = next(
        n for n in ast.walk(_module_tree()) if isinstance(n, ast.ClassDef) and n.name == "VolGenParameterNode"
    )
    defaults = {
        n.target.id: n.value for n in node_class.body if isinstance(n, ast.AnnAssign) and n.value is not None
    }
    names = {f.name for f in dataclasses.fields(GenerationParameters)}
    assert ast.unparse(defaults["steps"]) == "MODEL_STEPS" and steps_option(MODEL_STEPS) is None  # no --steps
    for attr, param in [
        ("strength", "strength"),
        ("scheduler", "scheduler"),
        ("seed", "seed"),
        ("noiseCorrelation", "noise_correlation"),
        ("device", "device"),
    ]:
        value = defaults[attr]
        assert ast.unparse(value) == f"GenerationParameters.{param}" and param in names, ast.unparse(value)
    # the .ui's initial slider value agrees (shown before a parameter node is bound)
    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "VolGen.ui")
    slider = ui.find(".//widget[@name='noiseCorrelationSlider']")
    value = slider.find("./property[@name='value']/double").text
    assert float(value) == pytest.approx(library.noise_correlation)
    steps = ui.find(".//widget[@name='stepsSpinBox']")
    assert int(steps.find("./property[@name='value']/number").text) == MODEL_STEPS
    assert int(steps.find("./property[@name='minimum']/number").text) == MODEL_STEPS
    guidance = ui.find(".//widget[@name='guidanceScaleSlider']/property[@name='value']/double").text
    from volgen import defaults

    assert float(guidance) == pytest.approx(defaults.GUIDANCE_SCALE)


def test_extension_metadata_has_no_placeholders():
    cmake = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "github.com/volgen/volgen" not in cmake  # an invented home
    assert "must point at" not in cmake
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    keys = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")
    for key in keys:
        assert values.get(f"EXTENSION_{key}"), key
    # without a repository URL the icon and screenshot URLs name files of this tree, which must exist
    for key in ("ICONURL", "SCREENSHOTURLS"):
        relative = values[f"EXTENSION_{key}"].replace("${_volgen_files}/", "")
        assert (MODULE_DIR.parent / relative).is_file(), relative
    screenshot = MODULE_DIR.parent / "Screenshots" / "VolGen.png"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'VOLGEN_MINIMUM_SLICER_VERSION "5.10"' in cmake
    readme = (MODULE_DIR.parent / "README.md").read_text(encoding="utf-8")
    assert "Slicer **5.10 or newer**" in readme and "Screenshots/VolGen.png" in readme


def test_plugin_readme_states_the_defaults_of_volgen():
    from volgen import defaults

    readme = (MODULE_DIR.parent / "README.md").read_text(encoding="utf-8")
    steps = next(line for line in readme.splitlines() if line.startswith("| Steps |"))
    assert f"{defaults.STEPS} by default" in steps and "Around 20" not in readme
    samplers = next(line for line in readme.splitlines() if line.startswith("| Scheduler |"))
    listed = set(re.findall(r"`([a-z][a-z+0-9-]*)`", samplers)) - {"volgen"}
    assert listed == set(defaults.SCHEDULERS), listed ^ set(defaults.SCHEDULERS)
    assert f"`{defaults.SCHEDULER}` (the default" in samplers


def test_the_screenshot_was_made_with_the_embedded_model():
    """Screenshots/VolGen.png.json records the weights the picture was made with: when the embedded model
    changes, redo it (python plugins/slicer/Screenshots/make_screenshot.py)."""
    import hashlib
    import json

    from volgen import defaults
    from volgen.models import weights_hash

    shots = MODULE_DIR.parent / "Screenshots"
    record = json.loads((shots / "VolGen.png.json").read_text(encoding="utf-8"))
    assert record["png_sha256"] == hashlib.sha256((shots / "VolGen.png").read_bytes()).hexdigest()
    assert record["weights_sha256"] == weights_hash(defaults.MODEL_DIR), (
        "the embedded model changed since the Slicer screenshot was made: "
        "run python plugins/slicer/Screenshots/make_screenshot.py"
    )
    assert record["steps"] == defaults.STEPS
