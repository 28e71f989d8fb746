"""One case workflow (``volgen.generation.case``) behind ``volgen generate`` and ``volgen batch``: the same
segmentation, reference, seed and settings give the same bytes and the same sidecar from either command,
and the same refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import make_volume, rotation

from volgen import io
from volgen.batch import read_manifest

FAST = ["--steps", "2", "--device", "cpu", "--progress", "none"]
#: Sidecar fields that name where a file went or how long it took (they differ by command).
WHERE_AND_WHEN = ("output", "seconds")


def _cli(*args: object):
    from volgen.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A segmentation with oblique, anisotropic geometry, a reference on its grid and one on another grid."""
    folder = tmp_path_factory.mktemp("case")
    geometry = {"size": (11, 9, 5), "spacing": (0.8, 1.1, 2.0), "direction": rotation(0.2, -0.3, 0.1)}
    io.write_volume(make_volume("label", **geometry), folder / "seg.nii.gz")
    io.write_volume(make_volume("image", **geometry), folder / "ref.nii.gz")
    io.write_volume(make_volume("image", size=(7, 7, 7)), folder / "elsewhere.nii.gz")
    return {name: folder / f"{name}.nii.gz" for name in ("seg", "ref", "elsewhere")}


def _manifest(path: Path, segmentation: Path, reference: Path, seed: int, strength: float) -> Path:
    path.write_text(
        f"case,segmentation,reference,seed,strength\nliver,{segmentation},{reference},{seed},{strength}\n",
        encoding="utf-8",
    )
    return path


def _sidecar(path: Path) -> dict:
    data = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if key not in WHERE_AND_WHEN}


def test_generate_and_batch_write_the_same_case_alike(case, tiny_model_dir, tmp_path):
    """Two samples of one case with a reference (λ 0.6): every output byte and every sidecar field but the
    output path and the time agree between ``volgen generate --samples 2`` and ``volgen batch`` with the
    same seed."""
    seg, ref = case["seg"], case["ref"]
    settings = ["--model", tiny_model_dir, *FAST, "--scheduler", "ddim", "--noise-correlation", "0.9"]
    out = tmp_path / "generate" / "liver.nii.gz"
    out.parent.mkdir()
    result = _cli("generate", seg, "-o", out, "--samples", 2, "--seed", 7, "--reference", ref,
                  "--strength", 0.6, *settings)  # fmt: skip
    assert result.exit_code == 0, result.output

    manifest = _manifest(tmp_path / "cases.csv", seg, ref, seed=7, strength=0.6)
    batch_out = tmp_path / "batch"
    result = _cli("batch", manifest, batch_out, "--samples-per-case", 2, *settings)
    assert result.exit_code == 0, result.output
    assert {r.key: r.status for r in read_manifest(batch_out / "manifest.csv")} == {
        ("liver", 0): "done",
        ("liver", 1): "done",
    }

    for k in range(2):
        generated, batched = out.with_name(f"liver_s{k}.nii.gz"), batch_out / f"liver_s{k}.nii.gz"
        assert generated.read_bytes() == batched.read_bytes(), f"sample {k}"
        by_generate, by_batch = _sidecar(generated), _sidecar(batched)
        assert by_generate == by_batch, f"sample {k}"
        assert by_generate["settings"]["seed"] == 7 + k and by_generate["reference"] == str(ref)
    first, second = (
        sitk.GetArrayFromImage(sitk.ReadImage(str(batch_out / f"liver_s{k}.nii.gz"))) for k in (0, 1)
    )
    assert (first != second).any()  # two seeds, two volumes


def test_generate_and_batch_refuse_a_case_alike(case, tiny_model_dir, tmp_path):
    """A reference on another grid: ``generate`` exits with one error line, ``batch`` records the same line
    for the case; neither writes a volume."""
    seg, elsewhere = case["seg"], case["elsewhere"]
    out = tmp_path / "generate" / "liver.nii.gz"
    out.parent.mkdir()
    result = _cli("generate", seg, "-o", out, "--reference", elsewhere, "--strength", 0.5,
                  "--model", tiny_model_dir, *FAST)  # fmt: skip
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "grid" in lines[0]
    assert not any(out.parent.iterdir())

    manifest = _manifest(tmp_path / "cases.csv", seg, elsewhere, seed=0, strength=0.5)
    batch_out = tmp_path / "batch"
    result = _cli("batch", manifest, batch_out, "--model", tiny_model_dir, *FAST)
    assert result.exit_code == 1
    (record,) = read_manifest(batch_out / "manifest.csv")
    assert record.status == "failed" and record.error == lines[0].removeprefix("error: ")
    assert not (batch_out / "liver.nii.gz").exists()


def test_generate_is_generate_samples_with_one_sample():
    """``generate`` passes its parameters on to ``generate_samples`` by name: each must be one of its, with
    the same default."""
    import inspect

    from volgen.api import generate, generate_samples

    one, many = inspect.signature(generate).parameters, inspect.signature(generate_samples).parameters
    assert set(many) - set(one) == {"samples"}
    for name, parameter in one.items():
        assert (parameter.kind, parameter.default) == (many[name].kind, many[name].default), name
