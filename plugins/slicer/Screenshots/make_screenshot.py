"""Make ``VolGen.png``, the extension's screenshot, from the module's own logic output.

The module's MRML side (``VolGenMRML``, the code the panel runs) on a real MRML scene from Slicer's core
libraries (``pip install slicer-core``, no GUI): the example segmentation imported as a segmentation node
with segments named after the default model's classes, ``NodeGeneration`` (export, ``volgen generate`` as a
child process, result read back into a scalar volume node), then the input and the output node drawn with
volgen's preview (same class colours as every volgen figure). It is not a capture of the Slicer window.

    python plugins/slicer/Screenshots/make_screenshot.py      # writes plugins/slicer/Screenshots/VolGen.png

It also writes ``VolGen.png.json`` next to the picture: the embedded model's weights hash, the settings and
the picture's own hash. ``tests/test_slicer_install.py`` compares that hash with the embedded model's, so the
screenshot is redone whenever the embedded weights change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent / "VolGen"))

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--segmentation", type=Path, default=ROOT / "examples" / "colin27_tissues_2mm.nii.gz")
    parser.add_argument("--steps", type=int, default=None, help="default: volgen's (volgen/defaults.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=HERE / "VolGen.png")
    args = parser.parse_args()
    from volgen import defaults

    args.steps = defaults.STEPS if args.steps is None else args.steps

    import matplotlib.pyplot as plt
    import slicer
    from VolGenLib import GenerationParameters, model_classes
    from VolGenMRML import NodeGeneration, ijk_to_ras, labelmap_node_from_array, same_grid, voxels

    from volgen.api import default_model_dir
    from volgen.preview import montage_figure

    seg = sitk.ReadImage(str(args.segmentation))
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(seg.GetDirection(), (3, 3)) @ np.diag(seg.GetSpacing())
    matrix[:3, 3] = seg.GetOrigin()
    scene = slicer.vtkMRMLScene()
    labelmap = labelmap_node_from_array(sitk.GetArrayFromImage(seg), LPS_TO_RAS @ matrix, name="colin27")
    scene.AddNode(labelmap)
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, "")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    classes = model_classes(default_model_dir())  # foreground: head, csf, grey_matter, white_matter
    segments = segmentation.GetSegmentation()
    for i in range(
        segments.GetNumberOfSegments()
    ):  # segments in label order 1, 2, ...: name them as a user would
        segments.GetNthSegment(i).SetName(classes[i].replace("_", " ").title())
    output = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(output)

    params = GenerationParameters(
        model_dir=str(default_model_dir()), steps=args.steps, seed=args.seed, device="cpu"
    )
    with tempfile.TemporaryDirectory() as tmp:
        generation = NodeGeneration(
            segmentation, output, params, python=sys.executable, workspace_root=Path(tmp)
        )
        outcome = generation.start().wait()
    if not outcome.ok:
        raise SystemExit(f"generation failed: {outcome.error}")
    assert same_grid(output, labelmap), "the output node is not on the segmentation's grid"
    print(f"output node '{output.GetName()}': {outcome.notes}")

    result = sitk.GetImageFromArray(voxels(output).astype(np.float32))  # (k, j, i) like the input
    result.CopyInformation(seg)
    assert np.allclose(ijk_to_ras(output), LPS_TO_RAS @ matrix, atol=1e-4)
    fig = montage_figure(
        seg,
        result,
        class_names=["background", *classes],
        title=f"VolGen module: segmentation node -> '{output.GetName()}' "
        f"(default model, {args.steps} steps, seed {args.seed})",
    )
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    record = screenshot_record(args.output)
    from volgen.models import weights_hash

    record.update(weights_sha256=weights_hash(default_model_dir()), steps=args.steps, seed=args.seed)
    record_path = args.output.with_name(args.output.name + ".json")
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output} and {record_path}")


def screenshot_record(png: Path) -> dict:
    """What the screenshot record says about the picture itself (its SHA-256)."""
    return {"png_sha256": hashlib.sha256(png.read_bytes()).hexdigest()}


if __name__ == "__main__":
    main()
