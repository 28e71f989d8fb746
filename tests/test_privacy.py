"""Privacy: nothing that identifies a patient travels from an input into an output.

An input DICOM series (and a DICOM SEG made from it) is stamped with identifying attributes - names, IDs,
dates, institution, physicians, accession number, the input's UIDs, nested sequences and a private tag. Every
output (DICOM series, NIfTI, NRRD, sidecar) is then searched for each of those values: in every element of
every dataset (file meta and nested sequences included) and in the raw bytes of every file. Only
``--copy-patient-info`` brings the patient and study identifiers across, and never the input's series or
instance UIDs, its institution or its physicians. Sidecars record paths exactly as the user gave them.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pydicom
import pytest
import typer
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from volumes import make_volume

from volgen import io
from volgen.cli.app import _register, app

_register()
COMMAND = typer.main.get_command(app)

ROOT_UID = "1.2.826.0.1.3680043.10.999"  # made-up UIDs, recognisable in any output
IDENTIFYING = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "PID-8675309",
    "PatientBirthDate": "19610704",
    "PatientSex": "F",
    "PatientAge": "058Y",
    "PatientAddress": "12 Elm Street Springfield",
    "OtherPatientIDs": "MRN-5550123",
    "PatientTelephoneNumbers": "555-0199",
    "EthnicGroup": "Martian",
    "InstitutionName": "St Elsewhere General Hospital",
    "InstitutionAddress": "1 Hospital Plaza Boston",
    "InstitutionalDepartmentName": "Radiology West",
    "ReferringPhysicianName": "House^Gregory",
    "PerformingPhysicianName": "Quinn^Michaela",
    "OperatorsName": "Tech^Tessa",
    "StationName": "CTROOM7",
    "DeviceSerialNumber": "SN-424242",
    "AccessionNumber": "ACC-2020-77",
    "StudyID": "STUDY-9001",
    "StudyDescription": "CONFIDENTIAL abdomen study",
    "SeriesDescription": "CONFIDENTIAL venous phase",
    "StudyDate": "20200202",
    "SeriesDate": "20200203",
    "AcquisitionDate": "20200204",
    "ContentDate": "20200205",
    "StudyTime": "101112",
    "StudyInstanceUID": f"{ROOT_UID}.1",
    "SeriesInstanceUID": f"{ROOT_UID}.2",
    "FrameOfReferenceUID": f"{ROOT_UID}.3",
}
NESTED = {
    "ReferencedSOPInstanceUID": f"{ROOT_UID}.7.1",
    "RequestedProcedureID": "REQPROC-31337",
}
PRIVATE = "PRIVATE-PHI-Jane-Doe"
COPIED = ("PatientName", "PatientID")  # what --copy-patient-info must bring across (at least)
NEVER_COPIED = (
    "SeriesInstanceUID",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PatientAddress",
    "OtherPatientIDs",
    "SeriesDescription",
    "StationName",
    "DeviceSerialNumber",
)


def identify(folder: Path) -> list[str]:
    """Stamp every file of a DICOM series with the identifying values; return every value stamped."""
    values = list(IDENTIFYING.values()) + list(NESTED.values()) + [PRIVATE]
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = f"{ROOT_UID}.5.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        values.append(ds.SOPInstanceUID)
        reference = Dataset()
        reference.ReferencedSOPClassUID = ds.SOPClassUID
        reference.ReferencedSOPInstanceUID = NESTED["ReferencedSOPInstanceUID"]
        ds.ReferencedStudySequence = Sequence([reference])
        request = Dataset()
        request.RequestedProcedureID = NESTED["RequestedProcedureID"]
        ds.RequestAttributesSequence = Sequence([request])
        block = ds.private_block(0x0011, "ACME PHI", create=True)
        block.add_new(0x01, "LO", PRIVATE)
        ds.save_as(path, enforce_file_format=True)
    return values


def all_values(ds: Dataset) -> list[str]:
    """The string form of every element value, file meta and nested sequences included."""
    out = []
    datasets = [ds] + ([ds.file_meta] if hasattr(ds, "file_meta") else [])
    while datasets:
        current = datasets.pop()
        for element in current:
            if element.VR == "SQ":
                datasets.extend(element.value)
            elif element.tag != 0x7FE00010:  # pixel data: checked as raw bytes below
                out.append(str(element.value))
    return out


def leaks(paths: list[Path], secrets: list[str]) -> list[str]:
    """Which secret appears where (DICOM elements, and the raw - decompressed - bytes of every file)."""
    found = []
    for path in paths:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        texts = [raw.decode("latin-1")]
        if path.suffix == ".dcm":
            texts += all_values(pydicom.dcmread(path))
        for secret in secrets:
            probes = {secret, secret.replace("^", " "), secret.split("^")[0]} - {"", "F"}
            if any(p.lower() in t.lower() for p in probes for t in texts):
                found.append(f"{secret!r} in {path.name}")
    return found


def invoke(*args: object):
    return CliRunner().invoke(COMMAND, [str(a) for a in args])


@pytest.fixture(scope="module")
def identified(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A DICOM series of labels and a DICOM SEG of the same labels, both full of identifying attributes."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    root = tmp_path_factory.mktemp("identified")
    series = root / "series"
    labels = make_volume("label")
    io.write_volume(labels, series, format="dicom", modality="CT")
    secrets = identify(series)
    stamped = [v for v in [*IDENTIFYING.values(), *NESTED.values(), PRIVATE] if len(v) > 1]  # not sex "F"
    assert len(leaks(sorted(series.iterdir())[:1], stamped)) == len(stamped)  # the search finds them all

    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(labels)
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(p) for p in sorted(series.iterdir())],
        pixel_array=array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=f"organ {n}",
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
            for n in (1, 2, 3)
        ],
        series_instance_uid=f"{ROOT_UID}.8",
        series_number=2,
        sop_instance_uid=f"{ROOT_UID}.9",
        instance_number=1,
        manufacturer="ACME",
        manufacturer_model_name="SegMaster",
        software_versions="1",
        device_serial_number=IDENTIFYING["DeviceSerialNumber"],
    )
    seg_path = root / "seg.dcm"
    seg.save_as(seg_path)
    assert str(pydicom.dcmread(seg_path).PatientName) == IDENTIFYING["PatientName"]  # highdicom copied it
    return series, seg_path, secrets + [f"{ROOT_UID}.8", f"{ROOT_UID}.9"]


def _outputs(out: Path) -> list[Path]:
    files = sorted(out.iterdir()) if out.is_dir() else [out]
    return files + [out.with_name(out.name + ".json")]


@pytest.mark.parametrize("source", ["series", "seg"])
@pytest.mark.parametrize("output", ["dicom", "out.nii.gz", "out.nrrd"])
def test_no_identifying_value_reaches_any_output(source, output, identified, tiny_model_dir, tmp_path):
    series, seg, secrets = identified
    out = tmp_path / output
    args = ["generate", series if source == "series" else seg, "-o", out, "--model", tiny_model_dir]
    args += ["--steps", "1", "--progress", "none", "--device", "cpu"]
    if output == "dicom":
        args += ["--format", "dicom"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    files = _outputs(out)
    assert len(files) >= 2
    assert leaks(files, secrets) == []
    if output == "dicom":
        ds = pydicom.dcmread(files[0])
        assert str(ds.PatientName) == "" and ds.PatientID == "VOLGEN"
        assert "DERIVED" in ds.ImageType and "SYNTHETIC" in ds.ImageComments


def test_copy_patient_info_copies_the_patient_and_nothing_else(identified, tiny_model_dir, tmp_path):
    series, _, secrets = identified
    out = tmp_path / "copied"
    result = invoke(
        "generate", series, "-o", out, "--format", "dicom", "--model", tiny_model_dir, "--steps", "1",
        "--progress", "none", "--device", "cpu", "--copy-patient-info",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ds = pydicom.dcmread(sorted(out.iterdir())[0])
    assert str(ds.PatientName) == IDENTIFYING["PatientName"]
    assert ds.PatientID == IDENTIFYING["PatientID"]
    never = [IDENTIFYING[k] for k in NEVER_COPIED] + list(NESTED.values()) + [PRIVATE]
    never += [s for s in secrets if s.startswith(f"{ROOT_UID}.5.")]  # the input's SOP instance UIDs
    assert leaks(_outputs(out), never) == []


def test_sidecars_record_paths_as_given(tiny_model_dir, tmp_path, monkeypatch):
    """Relative paths stay relative, so a shared sidecar does not reveal where (or whose) the data was."""
    work = tmp_path / "Doe_Jane_private"
    (work / "cases").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, work / "model")
    io.write_volume(make_volume("label"), work / "cases" / "seg.nii.gz")
    reference = make_volume("image")
    io.write_volume(reference, work / "cases" / "ref.nii.gz")
    monkeypatch.chdir(work)
    (work / "out").mkdir()
    result = invoke(
        "generate", "cases/seg.nii.gz", "-o", "out/syn.nii.gz", "--model", "model", "--steps", "2",
        "--reference", "cases/ref.nii.gz", "--strength", "0.5", "--progress", "none", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = (work / "out" / "syn.nii.gz.json").read_text()
    sidecar = json.loads(text)
    assert sidecar["segmentation"] == "cases/seg.nii.gz"
    assert sidecar["output"] == "out/syn.nii.gz"
    assert sidecar["reference"] == "cases/ref.nii.gz"
    assert sidecar["model"]["path"] == "model"
    assert str(tmp_path) not in text and "Doe_Jane" not in text

    result = invoke("generate", "cases/seg.nii.gz", "--model", "model", "--steps", "1", "--progress", "none")
    assert result.exit_code == 0, result.output
    text = (work / "cases" / "seg_synthetic.nii.gz.json").read_text()
    assert json.loads(text)["output"] == os.path.join("cases", "seg_synthetic.nii.gz")
    assert str(tmp_path) not in text and "Doe_Jane" not in text

    (work / "labels").mkdir()
    shutil.copy(work / "cases" / "seg.nii.gz", work / "labels" / "seg.nii.gz")
    result = invoke("batch", "labels", "batch", "--model", "model", "--steps", "1", "--progress", "none")
    assert result.exit_code == 0, result.output
    text = (work / "batch" / "seg.nii.gz.json").read_text()
    assert str(tmp_path) not in text and "Doe_Jane" not in text
    assert json.loads(text)["segmentation"] == os.path.join("labels", "seg.nii.gz")
