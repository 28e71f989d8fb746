"""The Slicer module's MRML side, headless: a real MRML scene from the ``slicer-core`` wheel.

MRML nodes with oblique, anisotropic geometry -> NIfTI written by Slicer's storage node -> the real
``volgen generate`` with the tiny model -> a scalar volume node whose size, spacing, origin and
IJK-to-RAS directions match the input. Skipped where ``slicer-core`` is not installed
(``pip install slicer-core``; it brings its own vtk).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volumes import assert_same_geometry, make_volume

pytest.importorskip(
    "slicer_core",
    reason="slicer-core (Slicer's MRML libraries without the GUI) is not installed: pip install slicer-core",
)
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core's", allow_module_level=True)

MODULE_DIR = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "VolGen"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from VolGenLib import GenerationParameters  # noqa: E402
from VolGenMRML import (  # noqa: E402
    InputError,
    NodeGeneration,
    dimensions,
    export_inputs,
    ijk_to_ras,
    labelmap_node_from_array,
    segments_of,
    voxels,
)
from vtkmodules.vtkCommonMath import vtkMatrix4x4  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CLASSES = {"liver": [1], "kidney": [2, 5], "spleen": [3]}  # the tiny model's label map


def ijk_to_ras_of(image: sitk.Image) -> np.ndarray:
    """The IJK-to-RAS matrix Slicer gives a SimpleITK (LPS) image."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix


def add_volume(scene, image: sitk.Image, kind: str = "labelmap", name: str = "input"):
    """A labelmap (or scalar) volume node in ``scene`` with ``image``'s voxels and geometry."""
    node = labelmap_node_from_array(sitk.GetArrayFromImage(image), ijk_to_ras_of(image), name=name)
    if kind == "scalar":
        scalar = slicer.vtkMRMLScalarVolumeNode()
        scalar.SetName(name)
        scalar.SetAndObserveImageData(node.GetImageData())
        matrix = vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        scalar.SetIJKToRASMatrix(matrix)
        node = scalar
    scene.AddNode(node)
    return node


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(True)


@pytest.fixture
def seg_image() -> sitk.Image:
    return make_volume("label", size=(12, 10, 7), spacing=(0.7, 0.9, 2.5))  # oblique direction by default


def test_labelmap_node_round_trips_through_nifti(scene, seg_image, tmp_path):
    node = add_volume(scene, seg_image)
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras_of(seg_image), atol=1e-9)
    report = export_inputs(node, tmp_path / "seg.nii.gz", classes=CLASSES)
    written = sitk.ReadImage(str(report.input))
    assert_same_geometry(written, seg_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(seg_image))


def _transformed_input_and_output(scene, image: sitk.Image):
    """A transform, a labelmap node of ``image`` under it and an empty scalar volume node, in ``scene``."""
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    node = add_volume(scene, image)
    node.SetAndObserveTransformNodeID(transform.GetID())
    output = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(output)
    return transform, node, output


def test_generate_from_a_labelmap_node(scene, seg_image, tiny_model_dir, tmp_path):
    """Labelmap node -> exported NIfTI -> real CLI -> scalar volume node on the input's grid."""
    transform, node, output = _transformed_input_and_output(scene, seg_image)
    events = []
    params = GenerationParameters(model_dir=str(tiny_model_dir), steps=2, scheduler="ddim", device="cpu")
    generation = NodeGeneration(
        node, output, params, python=sys.executable, workspace_root=tmp_path, on_progress=events.append
    ).start()
    outcome = generation.wait(timeout=300)
    assert outcome.ok, (outcome.error, outcome.run.stderr if outcome.run else None)
    assert [e.kind for e in events][-1] == "done" and any(e.kind == "progress" for e in events)

    assert dimensions(output) == dimensions(node) == seg_image.GetSize()
    np.testing.assert_allclose(ijk_to_ras(output), ijk_to_ras(node), rtol=0, atol=1e-5)
    assert output.GetTransformNodeID() == transform.GetID()
    assert output.GetName() == "input synthetic"
    values = voxels(output)
    assert values.shape == voxels(node).shape and np.isfinite(values).all()
    assert not any(tmp_path.iterdir())  # temporary folder removed


def test_samples_go_into_one_node_each(scene, seg_image, tiny_model_dir, tmp_path):
    """The panel's samples: sample 0 fills the output node, sample k a new node ``<output> s<k>`` of the
    same scene, each on the input's grid under its transform."""
    transform, node, output = _transformed_input_and_output(scene, seg_image)
    params = GenerationParameters(
        model_dir=str(tiny_model_dir), steps=2, scheduler="ddim", device="cpu", seed=4, samples=3
    )
    generation = NodeGeneration(node, output, params, python=sys.executable, workspace_root=tmp_path)
    outcome = generation.start().wait(timeout=300)
    assert outcome.ok, (outcome.error, outcome.run.stderr if outcome.run else None)
    nodes = outcome.output_nodes
    assert nodes[0] is output and outcome.output_node is output and len(nodes) == 3
    assert [n.GetName() for n in nodes] == ["input synthetic", "input synthetic s1", "input synthetic s2"]
    for sample in nodes:
        assert sample.GetScene() is scene and sample.GetTransformNodeID() == transform.GetID()
        assert dimensions(sample) == seg_image.GetSize()
        np.testing.assert_allclose(ijk_to_ras(sample), ijk_to_ras(node), rtol=0, atol=1e-5)
    assert not np.array_equal(voxels(nodes[0]), voxels(nodes[1]))  # seeds 4 and 5
    assert not any(tmp_path.iterdir())


def test_segmentation_is_exported_by_segment_name(scene, tmp_path):
    """Segments get the model's label values by name, else by their own value; others are left out."""
    image = make_volume("label", size=(12, 10, 7), n_labels=4)  # values 1..4; 4 is unknown to the model
    labelmap = add_volume(scene, image, name="labels")
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, segmentation, ""
    )
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    assert len(ids) == 4
    for segment_id, name in zip(ids, ["Kidney", "LIVER", "Segment_3", "tumour"], strict=True):
        seg.GetSegment(segment_id).SetName(name)

    reference = add_volume(scene, make_volume("image", size=(12, 10, 7)), kind="scalar", name="ct")
    report = export_inputs(
        segmentation,
        tmp_path / "seg.nii.gz",
        classes=CLASSES,
        reference_node=reference,
        reference_path=tmp_path / "ref.nii.gz",
    )
    written = sitk.ReadImage(str(report.input))
    assert_same_geometry(written, image, atol=1e-4)
    assert_same_geometry(sitk.ReadImage(str(report.reference)), image, atol=1e-4)
    lut = np.array([0, 2, 1, 3, 0])  # Kidney -> 2, LIVER -> 1, Segment_3 keeps 3 (spleen), tumour left out
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), lut[sitk.GetArrayFromImage(image)])
    assert "tumour" in report.notes[0]

    # without a reference image: the segmentation's own grid, or the segments' bounding box when it has none
    boxed = export_inputs(segmentation, tmp_path / "boxed.nii.gz", classes=CLASSES)
    assert any("no reference geometry" in note for note in boxed.notes)
    boxed_image = sitk.ReadImage(str(boxed.input))
    assert boxed_image.GetSize() < image.GetSize()  # cropped to the segments
    assert np.count_nonzero(sitk.GetArrayFromImage(boxed_image)) == np.count_nonzero(
        lut[sitk.GetArrayFromImage(image)]
    )
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    own = export_inputs(segmentation, tmp_path / "own.nii.gz", classes=CLASSES)
    assert_same_geometry(sitk.ReadImage(str(own.input)), image, atol=1e-4)
    assert not any("reference geometry" in note for note in own.notes)

    segmentation.GetDisplayNode().SetSegmentVisibility(ids[0], False)
    assert [s.name for s in segments_of(segmentation)] == ["LIVER", "Segment_3", "tumour"]


def test_unusable_inputs_are_refused(scene, seg_image, tmp_path):
    labelmap = add_volume(scene, seg_image)
    other = add_volume(scene, make_volume("image", size=(5, 5, 5)), kind="scalar", name="elsewhere")
    with pytest.raises(InputError, match="not on the grid"):
        export_inputs(
            labelmap,
            tmp_path / "a.nii.gz",
            classes=CLASSES,
            reference_node=other,
            reference_path=tmp_path / "b.nii.gz",
        )
    with pytest.raises(InputError, match="scalar volume"):
        export_inputs(other, tmp_path / "a.nii.gz", classes=CLASSES)
    output = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(output)
    with pytest.raises(InputError, match="reference"):
        NodeGeneration(labelmap, output, GenerationParameters(strength=0.5), workspace_root=tmp_path)
