"""DICOM: synthetic CT/MR series (validated with dciodvfy, converted with dcm2niix), DICOM SEG input,
multi-series folders."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from volumes import array, assert_same_geometry, make_volume, rotation

from volgen.errors import InputError, OutputError
from volgen.io import (
    SYNTHETIC_STATEMENT,
    describe,
    list_dicom_series,
    read_image,
    read_label,
    write_dicom_series,
    write_volume,
)

DCIODVFY = shutil.which("dciodvfy")
DCM2NIIX = shutil.which("dcm2niix")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed")


def _volume(modality: str) -> sitk.Image:
    return make_volume("ct" if modality == "CT" else "image")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _mapping(ds: pydicom.Dataset) -> tuple[float, float]:
    """(slope, intercept) from stored values to intensities: Rescale (CT) or Real World Value Mapping (MR)."""
    if "RescaleSlope" in ds:
        return float(ds.RescaleSlope), float(ds.RescaleIntercept)
    item = ds.RealWorldValueMappingSequence[0]
    return float(item.RealWorldValueSlope), float(item.RealWorldValueIntercept)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CT and one MR series written by volgen (shared by the read-only tests below)."""
    root = tmp_path_factory.mktemp("series")
    return {
        modality: write_dicom_series(_volume(modality), root / modality, modality=modality)  # type: ignore[arg-type]
        for modality in ("CT", "MR")
    }


# ------------------------------------------------------------------------------------------- writing


@needs_dciodvfy
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dciodvfy_finds_no_errors(series: dict[str, Path], modality: str) -> None:
    files = _files(series[modality])
    assert len(files) == 7
    for path in files:
        result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}:\n{output}"
        assert ("CTImage" if modality == "CT" else "MRImage") in output
        # one warning is left, on purpose: Laterality is empty because it is unknown, which the standard
        # permits (it was 7 warnings per MR file: rescale in an MR IOD, empty Study ID, ...)
        warnings = [line for line in output.splitlines() if line.startswith("Warning")]
        assert len(warnings) == 1 and "<Laterality>" in warnings[0], f"{path.name}:\n{output}"


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_attributes(series: dict[str, Path], modality: str) -> None:
    image = _volume(modality)
    datasets = [pydicom.dcmread(p) for p in _files(series[modality])]
    first = datasets[0]
    assert first.SOPClassUID == (
        "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    )
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.Modality == modality
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert first.ImageComments == SYNTHETIC_STATEMENT
    assert "SYNTHETIC" in first.SeriesDescription
    assert first.BurnedInAnnotation == "NO"
    assert first.Manufacturer == "volgen"
    assert str(first.PatientName) == ""
    assert first.PatientID == "VOLGEN"
    # one study/series/frame of reference, fresh UIDs per instance
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[keyword].value for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 8))
    # geometry tags
    direction = np.reshape(rotation(), (3, 3))
    spacing = image.GetSpacing()
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([spacing[1], spacing[0]])
    assert [float(v) for v in first.ImageOrientationPatient] == pytest.approx(
        [*direction[:, 0], *direction[:, 1]], abs=1e-12
    )
    assert float(first.SliceThickness) == pytest.approx(spacing[2])
    assert float(first.SpacingBetweenSlices) == pytest.approx(spacing[2])
    for k, ds in enumerate(datasets):
        expected = np.asarray(image.GetOrigin()) + k * spacing[2] * direction[:, 2]
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected, abs=1e-9)
    assert (first.Rows, first.Columns) == (image.GetSize()[1], image.GetSize()[0])
    # pixel values map back through the rescale (CT) or the real world value mapping (MR, no Modality LUT)
    slope, intercept = _mapping(first)
    stored = np.stack([ds.pixel_array for ds in datasets]).astype(np.float64)
    values = stored * slope + intercept
    reference = array(image).astype(np.float64)
    if modality == "CT":
        assert first.pixel_array.dtype == np.int16
        assert (slope, intercept) == (1.0, 0.0)
        np.testing.assert_array_equal(values, reference)
    else:
        assert first.pixel_array.dtype == np.uint16
        assert "RescaleSlope" not in first and "RescaleIntercept" not in first
        np.testing.assert_allclose(values, reference, atol=slope * 0.51)
        assert (
            f"{first.RealWorldValueMappingSequence[0].RealWorldValueSlope:.6g}"[:6]
            in first.DerivationDescription
        )
        lo, hi = np.percentile(reference, [1, 99])
        lo, hi = (lo - intercept) / slope, (hi - intercept) / slope  # the window is in stored values
        assert lo <= float(first.WindowCenter) <= hi
        return
    lo, hi = np.percentile(reference, [1, 99])
    assert lo <= float(first.WindowCenter) <= hi
    assert float(first.WindowWidth) > 0


def test_fresh_uids_and_patient_info(tmp_path: Path) -> None:
    image = make_volume("ct")
    a = write_dicom_series(image, tmp_path / "a", modality="CT")
    b = write_dicom_series(
        image,
        tmp_path / "b",
        modality="CT",
        series_description="my synthetic CT",
        patient_info={"PatientName": "Doe^Jane", "PatientID": "P42", "StudyInstanceUID": "1.2.3.4"},
    )
    first_a, first_b = pydicom.dcmread(_files(a)[0]), pydicom.dcmread(_files(b)[0])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert first_a[keyword].value != first_b[keyword].value
    assert str(first_b.PatientName) == "Doe^Jane"
    assert first_b.PatientID == "P42"
    assert first_b.StudyInstanceUID == "1.2.3.4"
    assert first_b.SeriesDescription == "my synthetic CT"
    assert first_b.ImageComments == SYNTHETIC_STATEMENT
    with pytest.raises(OutputError, match="unknown patient_info keys"):
        write_dicom_series(image, tmp_path / "c", modality="CT", patient_info={"OtherPatientIDs": "x"})
    with pytest.raises(ValueError, match="modality"):
        write_dicom_series(image, tmp_path / "d", modality="PET")  # type: ignore[arg-type]


def test_ct_values_outside_int16_are_rescaled(tmp_path: Path) -> None:
    image = sitk.Cast(make_volume("ct"), sitk.sitkFloat32) * 40.0  # up to 60000 "HU"
    folder = write_dicom_series(image, tmp_path / "wide", modality="CT")
    back = read_image(folder)
    slope = float(pydicom.dcmread(_files(folder)[0]).RescaleSlope)
    assert slope > 1
    np.testing.assert_allclose(array(back), array(image), atol=slope * 0.51)


def _oriented(image: sitk.Image) -> sitk.Image:
    """The same grid with axes permuted/flipped to the orientation closest to LPS: invariant to the
    axis flips and reorderings converters make."""
    return sitk.DICOMOrient(image, "LPS")


@needs_dcm2niix
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dcm2niix_converts_back_to_the_same_grid(
    series: dict[str, Path], tmp_path: Path, modality: str
) -> None:
    result = subprocess.run(
        [DCM2NIIX, "-o", str(tmp_path), "-f", "out", "-z", "n", str(series[modality])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    converted = sitk.ReadImage(str(tmp_path / "out.nii"))
    image = _volume(modality)
    # dcm2niix flips axes (to its preferred storage order): compare the grids up to axis flips
    slope, intercept = _mapping(pydicom.dcmread(_files(series[modality])[0]))
    if modality == "MR":  # dcm2niix gives the stored values (MR has no Modality LUT): map them back
        converted = sitk.Cast(converted, sitk.sitkFloat64) * slope + intercept
    a, b = _oriented(converted), _oriented(image)
    assert_same_geometry(a, b, atol=1e-3)
    tolerance = 0.0 if modality == "CT" else slope
    np.testing.assert_allclose(array(a), array(b), atol=tolerance * 0.51 + 1e-3)
    # the voxel centres are at the same physical places
    resampled = sitk.Resample(converted, image, sitk.Transform(), sitk.sitkNearestNeighbor, -5000.0)
    np.testing.assert_allclose(array(resampled), array(image), atol=tolerance * 0.51 + 1e-3)


# ------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_read_series_back_exactly(series: dict[str, Path], modality: str) -> None:
    image = _volume(modality)
    back = read_image(series[modality])
    assert_same_geometry(back, image, atol=1e-5)
    info = describe(series[modality])
    assert info.format == "DICOM series"
    assert not info.is_label


def _two_series_folder(root: Path) -> tuple[Path, list[str]]:
    folder = root / "mixed"
    folder.mkdir()
    uids = []
    for name, modality in (("a", "CT"), ("b", "MR")):
        out = write_dicom_series(
            _volume(modality),
            root / name,
            modality=modality,
            series_description=f"series {name}",  # type: ignore[arg-type]
        )
        for path in _files(out):
            shutil.copy(path, folder / f"{name}_{path.name}")
        uids.append(pydicom.dcmread(_files(out)[0]).SeriesInstanceUID)
    return folder, uids


def test_folder_with_two_series_lists_them(tmp_path: Path) -> None:
    folder, uids = _two_series_folder(tmp_path)
    with pytest.raises(InputError) as info:
        read_image(folder)
    message = str(info.value)
    assert "mixed" in message
    assert "holds 2 DICOM series" in message
    for uid in uids:
        assert uid in message
    assert '"series a" (CT, 7 slices)' in message
    assert '"series b" (MR, 7 slices)' in message
    # a series can be chosen
    assert len(list_dicom_series(folder)) == 2
    back = read_image(folder, series=uids[0])
    np.testing.assert_array_equal(array(back), array(make_volume("ct")).astype(np.float32))
    with pytest.raises(InputError, match="no series 9.9.9"):
        read_image(folder, series="9.9.9")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no DICOM series found"):
        read_label(tmp_path / "empty")


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    folder = write_dicom_series(make_volume("ct"), tmp_path / "gap", modality="CT")
    _files(folder)[3].unlink()
    with pytest.raises(InputError, match="not evenly spaced"):
        read_image(folder)


def test_label_volume_through_dicom_series(tmp_path: Path) -> None:
    labels = make_volume("label")
    folder = write_volume(labels, tmp_path / "labels", format="dicom", modality="CT")
    back = read_label(folder)
    assert back.GetPixelID() == sitk.sitkUInt16
    assert_same_geometry(back, labels)
    np.testing.assert_array_equal(array(back), array(labels))


# --------------------------------------------------------------------------------------------- SEG


def _make_seg(source: Path, out: Path, pixel_array: np.ndarray, *, omit_empty_frames: bool = False) -> Path:
    """A DICOM SEG on the CT series ``source`` (highdicom); ``pixel_array`` is (slices, rows, columns)
    with segment numbers, or (slices, rows, columns, segments) binary."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in _files(source)]
    n_segments = int(pixel_array.max()) if pixel_array.ndim == 3 else pixel_array.shape[-1]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"organ {n}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in range(1, n_segments + 1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="volgen tests",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=omit_empty_frames,
    )
    seg.save_as(out)
    return out


def test_read_dicom_seg(series: dict[str, Path], tmp_path: Path) -> None:
    labels = array(make_volume("label"))
    path = _make_seg(series["CT"], tmp_path / "seg.dcm", labels)
    image = read_label(path)
    assert_same_geometry(image, _volume("CT"), atol=1e-5)
    np.testing.assert_array_equal(array(image), labels)
    info = describe(path)
    assert info.format == "DICOM SEG"
    assert info.is_label
    assert info.label_names == {1: "organ 1", 2: "organ 2", 3: "organ 3"}
    assert info.label_counts == dict(
        zip(*[v.tolist() for v in np.unique(labels, return_counts=True)], strict=True)
    )
    # a folder holding just the SEG file reads the same
    (tmp_path / "segfolder").mkdir()
    shutil.copy(path, tmp_path / "segfolder" / "seg.dcm")
    np.testing.assert_array_equal(array(read_label(tmp_path / "segfolder")), labels)


def test_read_sparse_dicom_seg_is_placed_correctly(series: dict[str, Path], tmp_path: Path) -> None:
    labels = array(make_volume("label"))
    labels[0] = 0
    labels[-1] = 0
    path = _make_seg(series["CT"], tmp_path / "sparse.dcm", labels, omit_empty_frames=True)
    image = read_label(path)
    assert image.GetSize()[2] == 5  # only the stored frames
    reference = _volume("CT")
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(array(resampled), labels)


def test_overlapping_dicom_seg_is_refused(series: dict[str, Path], tmp_path: Path) -> None:
    labels = array(make_volume("label"))
    binary = np.stack([labels >= 1, labels >= 2], axis=-1).astype(np.uint8)  # segment 2 inside segment 1
    path = _make_seg(series["CT"], tmp_path / "overlap.dcm", binary)
    with pytest.raises(InputError) as info:
        read_label(path)
    assert "overlap.dcm" in str(info.value)
    assert "overlapping segments" in str(info.value)
