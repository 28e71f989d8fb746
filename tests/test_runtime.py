"""One thread policy for the CLI and the Python API: OMP_WAIT_POLICY=PASSIVE is in the environment before
torch (and with it OpenMP) loads, whichever entry point is used; a user's own value is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from volgen.runtime import WAIT_POLICY, WAIT_POLICY_VARIABLE, apply_thread_policy

ROOT = Path(__file__).resolve().parents[1]

# Records OMP_WAIT_POLICY at the moment `import torch` starts, i.e. what OpenMP will read.
_RECORD = """
import os, sys
class _Watch:
    seen = "torch never imported"
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and _Watch.seen == "torch never imported":
            _Watch.seen = os.environ.get("OMP_WAIT_POLICY", "unset")
        return None
sys.meta_path.insert(0, _Watch())
import atexit
atexit.register(lambda: print("AT_TORCH_IMPORT=" + _Watch.seen, flush=True))
"""


def _run(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY_VARIABLE}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", _RECORD + code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def _seen(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].removeprefix("AT_TORCH_IMPORT=")


def test_python_api_sets_the_policy_before_torch_loads():
    code = "from volgen.api import generate\nimport torch  # as generate() does when called"
    assert _seen(_run(code)) == WAIT_POLICY


def test_command_line_sets_the_same_policy_before_torch_loads():
    code = (
        "import sys\nfrom volgen.cli.app import main\n"
        "sys.argv = ['volgen', 'info', 'volgen/default_model/colin27-small']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    )
    assert _seen(_run(code)) == WAIT_POLICY


def test_a_users_own_value_wins():
    assert _seen(_run("import volgen\nimport torch", OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE"


def test_torch_imported_first_is_reported_not_hidden():
    result = _run(
        "import torch\nimport volgen\nimport os\nassert 'OMP_WAIT_POLICY' not in os.environ",
        OMP_NUM_THREADS=None,
    )
    assert _seen(result) == "unset"
    assert "torch was imported before volgen" in result.stderr
    assert "OMP_WAIT_POLICY=PASSIVE" in result.stderr


@pytest.mark.parametrize(
    ("environ", "torch_loaded", "expected_env", "source"),
    [
        ({}, False, WAIT_POLICY, "volgen"),
        ({"OMP_WAIT_POLICY": "active"}, False, "active", "user"),
        ({"OMP_WAIT_POLICY": "active"}, True, "active", "user"),
        ({}, True, None, "too late"),
    ],
)
def test_apply_thread_policy(environ, torch_loaded, expected_env, source):
    policy = apply_thread_policy(environ, torch_loaded=torch_loaded)
    assert environ.get(WAIT_POLICY_VARIABLE) == expected_env
    assert policy.source == source
    assert policy.wait_policy == expected_env
