"""``volgen evaluate`` and ``volgen train-segmenter`` end to end on small synthetic volumes."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner
from volumes import assert_same_geometry, make_volume

from volgen.cli.app import _register, app
from volgen.evaluation import CaseEvaluation, consistency, dice, find_evaluation_cases, unet_forward_flops
from volgen.io import read_image, read_label, write_volume

_register()
runner = CliRunner()

SIZE = (20, 18, 12)  # (x, y, z) voxels


def _real_for(labels: sitk.Image, seed: int) -> sitk.Image:
    """An MR-like image whose classes differ in intensity (100 per class), plus a smooth ramp and noise."""
    mask = sitk.GetArrayFromImage(labels).astype(np.float32)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in mask.shape), indexing="ij")
    values = 100.0 * mask + 50.0 + 0.5 * x + 0.3 * y + 0.4 * z + rng.normal(0.0, 3.0, mask.shape)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(labels)
    return image


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two cases: 'perfect' (generated = real) and 'flicker' (real + an offset per z slice)."""
    root = tmp_path_factory.mktemp("evaluate")
    for folder in ("labels", "images", "generated"):
        (root / folder).mkdir()
    for seed, name in enumerate(("flicker", "perfect")):
        labels = make_volume("label", size=SIZE, n_labels=3, seed=seed)
        real = _real_for(labels, seed)
        generated = real
        if name == "flicker":
            offsets = np.random.default_rng(7).normal(0.0, 15.0, (SIZE[2], 1, 1)).astype(np.float32)
            generated = sitk.GetImageFromArray(sitk.GetArrayFromImage(real) + offsets)
            generated.CopyInformation(real)
        write_volume(labels, root / "labels" / f"{name}.nii.gz")
        write_volume(real, root / "images" / f"{name}.nii.gz")
        write_volume(generated, root / "generated" / f"{name}.nii.gz")
    (root / "labels.yaml").write_text("name: boxes\nclasses:\n  a: 1\n  b: 2\n  c: 3\n")
    return root


def _one_error_line(result, *words):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:") and text.count("\n") == 0, text
    for word in words:
        assert word in text, text


def test_dice_definitions_and_consistency_ranking():
    a = np.array([0, 1, 1, 2, 2, 0])
    assert dice(a, a, [1, 2]) == {1: 1.0, 2: 1.0}  # identical
    assert dice(a, np.where(a == 1, 2, np.where(a == 2, 1, 0)), [1, 2]) == {1: 0.0, 2: 0.0}  # disjoint
    empty = dice(a, a, [3])[3]  # in neither: undefined, left out of means
    assert np.isnan(empty)
    assert CaseEvaluation("x", faithfulness={"a": 1.0, "b": 0.5, "c": empty}).mean("faithfulness") == 0.75
    # a smooth volume is ranked above the same slices shuffled along z
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in (16, 12, 12)), indexing="ij")
    smooth = np.sin(3 * z) + x + y
    shuffled = smooth[np.random.default_rng(0).permutation(16)]
    body = np.ones(smooth.shape, dtype=np.uint8)
    assert consistency(shuffled, smooth, body).ratio["z"] > 3 * consistency(smooth, smooth, body).ratio["z"]


def test_folder_convention_finds_cases(cases):
    found = find_evaluation_cases(cases)
    assert [c.case for c in found] == ["flicker", "perfect"]
    assert all(c.real is not None and c.generated.parent.name == "generated" for c in found)


def test_evaluate_with_the_intensity_segmenter(cases, tmp_path):
    manifest = tmp_path / "cases.csv"
    lines = ["case,segmentation,generated,real"] + [
        f"{n},{cases}/labels/{n}.nii.gz,{cases}/generated/{n}.nii.gz,{cases}/images/{n}.nii.gz"
        for n in ("perfect", "flicker")
    ]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    args = [
        "evaluate",
        str(manifest),
        str(out),
        "--segmenter",
        "intensity",
        "--labels",
        str(cases / "labels.yaml"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "perfect" in result.output and "flicker" in result.output
    assert (out / "evaluation.png").stat().st_size > 10_000
    assert (out / "planes.png").stat().st_size > 10_000  # real and generated in three planes
    assert "per plane" in result.output and "texture" in result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["classes"] == ["background", "a", "b", "c"]
    perfect, flicker = report["cases"]
    # generated == real: consistency ratios 1, the same Dice as the segmenter's own on real, agreement 1
    assert all(abs(v - 1) < 1e-9 for v in perfect["consistency"]["ratio"].values())
    assert perfect["faithfulness"] == perfect["segmenter_on_real"]
    assert perfect["segmenter_on_real"]["mean"] > 0.95
    assert perfect["agreement"]["mean"] == 1.0
    gen, real = perfect["intensity"]["b"]["generated"], perfect["intensity"]["b"]["real"]
    assert gen == real and 240 < gen["median"] < 270
    # per-slice offsets: flicker along z (the axial axis of this oblique grid), in-plane unchanged
    ratio = flicker["consistency"]["ratio"]
    assert ratio["z"] > 1.3 and abs(ratio["x"] - 1) < 1e-6 and abs(ratio["y"] - 1) < 1e-6
    assert flicker["consistency"]["anisotropy"] > 1.3
    # per plane: the perfect case scores 1.0 everywhere; the flicker shows along z, inside the body only
    for metrics in perfect["planes"].values():
        assert metrics["step_body"]["ratio"] == 1.0 and metrics["texture"]["ratio"] == 1.0
        assert metrics["feature_distance"] == 0.0
    planes = flicker["planes"]
    assert planes["z"]["step_body"]["ratio"] > 1.3 and abs(planes["x"]["step_body"]["ratio"] - 1) < 1e-6
    assert planes["z"]["step_background"]["ratio"] > 1.3  # the offsets are in the background too
    assert set(report["summary"]["planes"]) == {"z", "y", "x"}
    assert report["summary"]["cases"] == 2 and report["summary"]["consistency"]["ratio"]["z"] > 1.1
    no_planes = runner.invoke(app, [*args[:2], str(tmp_path / "lean"), *args[3:], "--no-planes"])
    assert no_planes.exit_code == 0 and "per plane" not in no_planes.output
    assert not (tmp_path / "lean" / "planes.png").exists()
    # the outputs exist now: a second run needs --overwrite
    _one_error_line(runner.invoke(app, args), "evaluation.json", "already exists")
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_train_segmenter_then_evaluate_with_it(cases, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for folder in ("images", "labels"):
        (data / folder / "perfect.nii.gz").write_bytes((cases / folder / "perfect.nii.gz").read_bytes())
    folder = tmp_path / "segmenter"
    result = runner.invoke(
        app,
        ["train-segmenter", str(data), "-o", str(folder), "--labels", str(cases / "labels.yaml")]
        + ["--steps", "3", "--slice-size", "16", "--channels", "4,8", "--batch-size", "4"],
    )
    assert result.exit_code == 0, result.output
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from volgen.segmenter import load_segmenter

    segmenter = load_segmenter(folder)
    assert segmenter.label_map.class_names == ["background", "a", "b", "c"]
    image = read_image(cases / "images" / "perfect.nii.gz")
    predicted = segmenter.predict(image)
    assert_same_geometry(predicted, image)
    assert predicted.GetPixelID() == sitk.sitkUInt8
    assert int(sitk.GetArrayViewFromImage(predicted).max()) <= 3
    # the segmenter's own label map remaps the masks (no --labels needed)
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(cases), str(out), "--segmenter", str(folder)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["classes"] == ["background", "a", "b", "c"] and len(report["cases"]) == 2


def test_external_segmenter_command(cases, tmp_path):
    script = tmp_path / "threshold.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import numpy as np
            import SimpleITK as sitk

            image = sitk.ReadImage(sys.argv[1])
            values = sitk.GetArrayFromImage(image)
            labels = sitk.GetImageFromArray(np.digitize(values, [100.0, 200.0, 300.0]).astype(np.uint8))
            labels.CopyInformation(image)
            sitk.WriteImage(labels, sys.argv[2])
            """
        )
    )
    out = tmp_path / "eval"
    command = f"{sys.executable} {script} {{input}} {{output}}"
    result = runner.invoke(app, ["evaluate", str(cases), str(out), "--segmenter-command", command])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["segmenter"].startswith("command:")
    perfect = report["cases"][1]
    assert perfect["case"] == "perfect" and perfect["faithfulness"]["mean"] > 0.95
    # without --labels the mask values are the classes
    assert report["classes"] == ["background", "1", "2", "3"]
    failing = f"{sys.executable} -c 'import sys; sys.exit(\"segmentation failed\")' {{input}} {{output}}"
    _one_error_line(
        runner.invoke(app, ["evaluate", str(cases), str(tmp_path / "e2"), "--segmenter-command", failing]),
        "segmentation failed",
    )


def test_bad_inputs_are_one_error_line(cases, tmp_path):
    out = str(tmp_path / "eval")
    missing = tmp_path / "missing.csv"
    missing.write_text(f"segmentation,generated\n{cases}/labels/perfect.nii.gz,{tmp_path}/nope.nii.gz\n")
    _one_error_line(
        runner.invoke(app, ["evaluate", str(missing), out, "--segmenter", "intensity"]), "nope.nii.gz"
    )
    _one_error_line(runner.invoke(app, ["evaluate", str(cases), out]), "choose one segmenter")
    no_real = tmp_path / "no_real.csv"
    no_real.write_text(
        f"segmentation,generated\n{cases}/labels/perfect.nii.gz,{cases}/generated/perfect.nii.gz\n"
    )
    _one_error_line(runner.invoke(app, ["evaluate", str(no_real), out, "--segmenter", "intensity"]), "real")
    # a generated volume on another grid than its segmentation
    shifted = read_image(cases / "generated" / "perfect.nii.gz")
    shifted.SetSpacing([s * 1.5 for s in shifted.GetSpacing()])
    write_volume(shifted, tmp_path / "shifted.nii.gz")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"segmentation,generated\n{cases}/labels/perfect.nii.gz,{tmp_path}/shifted.nii.gz\n")
    _one_error_line(
        runner.invoke(app, ["evaluate", str(bad), out, "--segmenter-command", "x {input} {output}"]),
        "shifted.nii.gz",
        "not on the grid",
    )
    _one_error_line(
        runner.invoke(app, ["evaluate", str(cases), out, "--segmenter", str(tmp_path)]), "segmenter"
    )
    labels = read_label(cases / "labels" / "perfect.nii.gz")
    assert labels.GetSize() == SIZE
    _one_error_line(
        runner.invoke(
            app, ["train-segmenter", str(tmp_path), "-o", str(tmp_path / "s"), "--labels", "colin27"]
        ),
        "images/",
    )


def test_flop_counter_counts_the_tiny_unet(tiny_model_dir):
    from volgen.models import load_model

    unet = load_model(tiny_model_dir).unet
    one = unet_forward_flops(unet, 1)
    assert one > 0 and unet_forward_flops(unet, 2) == 2 * one


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_external_segmenter_printing_bytes_that_are_not_utf8(cases, tmp_path, fails):
    """A segmenter's output in another encoding used to end in a UnicodeDecodeError traceback."""
    script = tmp_path / "latin1.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            import numpy as np
            import SimpleITK as sitk

            sys.stdout.buffer.write(b"Fortschritt: 50 \\xb5s \\xff\\xfe\\n")
            sys.stderr.buffer.write(b"Warnung: \\xe4\\xf6\\xfc\\n")
            if {fails}:
                sys.stderr.buffer.write(b"Fehler \\xe4\\x1b[31m rot\\n")
                sys.exit(3)
            image = sitk.ReadImage(sys.argv[1])
            labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 200).astype(np.uint8))
            labels.CopyInformation(image)
            sitk.WriteImage(labels, sys.argv[2])
            """
        )
    )
    command = f"{sys.executable} {script} {{input}} {{output}}"
    result = runner.invoke(app, ["evaluate", str(cases), str(tmp_path / "e"), "--segmenter-command", command])
    assert "Traceback" not in result.output and not isinstance(result.exception, UnicodeError)
    if fails:
        _one_error_line(result, "exited with 3", "Fehler \\xe4")
        assert "\x1b" not in result.output  # nor does the program's terminal escape reach the terminal
    else:
        assert result.exit_code == 0, result.output
