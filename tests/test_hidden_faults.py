"""Faults a hidden corpus found (issue 25), outside batch conversion: each test reproduced its fault first.

Outputs that collide with each other, a signal after the outputs are in place, DICOM of left-handed grids,
tracebacks instead of one line, and names or values printed wrong. ``docs/reliability.md`` lists them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import Workspace
from test_hostile import invoke, one_error_line, snapshot


@pytest.fixture
def workspace(tmp_path, tiny_model_dir) -> Workspace:
    return Workspace(tmp_path, tiny_model_dir)


# ------------------------------------------------------------------------- outputs against each other


@pytest.mark.parametrize("preview", ["sidecar", "output"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_preview_named_like_the_runs_own_sidecar_or_output_is_refused(
    workspace: Workspace, preview: str, overwrite: bool
) -> None:
    """``--preview`` naming the run's sidecar (or ``-o``) used to replace it, exit 0."""
    invocation = workspace.generate(workspace.good_segmentation())
    out = workspace.out / "syn.nii.gz"
    if overwrite:  # a finished earlier run: its output and sidecar must survive the refused one
        assert invoke(*invocation.args).exit_code == 0
    target = {"sidecar": workspace.out / "syn.nii.gz.json", "output": out}[preview]
    extra = ["--preview", str(target)] + (["--overwrite"] if overwrite else [])
    before = snapshot(workspace.root)
    line = one_error_line(invoke(*invocation.args, *extra))
    assert f"the preview is the {preview}" in line and "choose another preview" in line, line
    assert snapshot(workspace.root) == before


def test_samples_whose_previews_collide_with_another_samples_outputs_are_refused(
    workspace: Workspace,
) -> None:
    """With ``--samples 2``, a preview ``syn.nii.gz`` is numbered like the outputs (``syn_s0.nii.gz``)."""
    invocation = workspace.generate(workspace.good_segmentation())
    before = snapshot(workspace.root)
    line = one_error_line(
        invoke(*invocation.args, "--samples", "2", "--preview", str(workspace.out / "syn.nii.gz"))
    )
    assert "syn_s0.nii.gz" in line and "the preview is the output" in line, line
    assert snapshot(workspace.root) == before


def test_check_apart_names_how_outputs_collide(tmp_path: Path) -> None:
    from volgen import io
    from volgen.errors import OutputError

    io.check_apart([("output", tmp_path / "a"), ("sidecar", tmp_path / "a.json"), ("preview", None)])
    with pytest.raises(OutputError, match="the preview lies inside the output"):
        io.check_apart([("output", tmp_path / "series"), ("preview", tmp_path / "series" / "p.png")])
    (tmp_path / "link").symlink_to(tmp_path / "a.json")
    with pytest.raises(OutputError, match="the preview is the sidecar"):
        io.check_apart([("sidecar", tmp_path / "a.json"), ("preview", tmp_path / "link")])
