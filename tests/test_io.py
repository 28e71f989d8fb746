"""volgen.io: reading, checking, writing volumes with exact geometry."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volumes import ORIGIN, SIZE, SPACING, array, assert_same_geometry, make_volume, rotation

from volgen.errors import InputError, OutputError
from volgen.io import (
    Geometry,
    atomic_directory,
    atomic_write,
    describe,
    from_torchio,
    output_format,
    read_image,
    read_label,
    read_volume,
    to_torchio,
    write_volume,
)

FORMATS = [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", "dicom"]


def _out(tmp_path: Path, fmt: str, stem: str = "out") -> tuple[Path, str | None]:
    if fmt == "dicom":
        return tmp_path / stem, "dicom"
    return tmp_path / f"{stem}{fmt}", None


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- geometry


def test_geometry_of_apply_close_to_and_dict() -> None:
    image = make_volume("label")
    geometry = Geometry.of(image)
    assert geometry.size == SIZE
    assert geometry.spacing == SPACING
    assert geometry.origin == ORIGIN
    assert geometry.direction == pytest.approx(rotation())
    other = sitk.Image(SIZE, sitk.sitkFloat32)
    geometry.apply(other)
    assert Geometry.of(other) == geometry
    shifted = Geometry(geometry.size, geometry.spacing, (ORIGIN[0] + 1e-3, *ORIGIN[1:]), geometry.direction)
    assert geometry.close_to(shifted, atol=1e-2)
    assert not geometry.close_to(shifted, atol=1e-4)
    assert not geometry.close_to(Geometry((12, 10, 8), SPACING, ORIGIN, geometry.direction))
    assert json.loads(json.dumps(geometry.to_dict()))["size"] == list(SIZE)
    assert geometry.voxel_volume_mm3 == pytest.approx(0.7 * 0.9 * 2.5)
    # the affine maps index (i, j, k) to the physical point SimpleITK computes
    point = geometry.affine @ np.array([3, 2, 1, 1.0])
    assert point[:3] == pytest.approx(image.TransformIndexToPhysicalPoint((3, 2, 1)))
    with pytest.raises(ValueError, match="does not match"):
        geometry.apply(sitk.Image((4, 4, 4), sitk.sitkUInt8))


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["label", "image"])
def test_geometry_and_values_round_trip(tmp_path: Path, fmt: str, kind: str) -> None:
    image = make_volume(kind)  # type: ignore[arg-type]
    path, format_ = _out(tmp_path, fmt)
    written = write_volume(image, path, format=format_, modality="MR")
    assert written == path
    back = read_volume(path, kind=kind)  # type: ignore[arg-type]
    assert_same_geometry(back, image, atol=1e-5)
    if kind == "label":
        assert back.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)
        np.testing.assert_array_equal(array(back), array(image))
    else:
        assert back.GetPixelID() == sitk.sitkFloat32
        values = array(image)
        # DICOM stores int16 with a rescale slope: precision is half a slope
        atol = (values.max() - values.min()) / 65534 if fmt == "dicom" else 0.0
        np.testing.assert_allclose(array(back), values, rtol=0, atol=atol * 0.51 + 1e-6)
    # nothing but the output (and the .mhd data file) is left in the folder
    expected = {path.name} | ({"out.zraw"} if fmt == ".mhd" else set())
    assert set(_listing(tmp_path)) == expected


def test_ct_round_trip_through_dicom_keeps_whole_hu(tmp_path: Path) -> None:
    image = make_volume("ct")
    write_volume(image, tmp_path / "ct", format="dicom", modality="CT")
    back = read_image(tmp_path / "ct")
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(array(back), array(image).astype(np.float32))


def test_left_handed_direction_through_dicom_is_the_same_grid(tmp_path: Path) -> None:
    direction = np.asarray(rotation()).reshape(3, 3)
    direction[:, 2] *= -1  # determinant -1: not expressible in DICOM
    image = make_volume("label", direction=direction.ravel())
    write_volume(image, tmp_path / "lh", format="dicom")
    back = read_label(tmp_path / "lh")
    assert np.linalg.det(np.reshape(back.GetDirection(), (3, 3))) > 0
    # same voxels at the same physical places
    resampled = sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor, 99)
    np.testing.assert_array_equal(array(resampled), array(image))


def test_written_volume_keeps_pixel_type_and_drops_metadata(tmp_path: Path) -> None:
    image = make_volume("ct")
    image.SetMetaData("PatientName", "Doe^Jane")
    write_volume(image, tmp_path / "ct.nrrd")
    assert b"Doe^Jane" not in (tmp_path / "ct.nrrd").read_bytes()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "ct.nrrd"))
    reader.ReadImageInformation()
    assert reader.GetPixelID() == sitk.sitkInt16
    # and metadata of inputs is not carried by what volgen reads
    back = read_image(tmp_path / "ct.nrrd")
    assert not [k for k in back.GetMetaDataKeys() if "Patient" in k]


settings_geometry = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@settings_geometry
@given(
    spacing=st.tuples(*[st.floats(0.2, 6.0)] * 3),
    origin=st.tuples(*[st.floats(-200.0, 200.0)] * 3),
    quaternion=st.tuples(*[st.floats(-1.0, 1.0)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1),
    flip=st.booleans(),
)
def test_nifti_geometry_round_trip_property(
    tmp_path: Path,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    quaternion: tuple[float, float, float, float],
    flip: bool,
) -> None:
    w, x, y, z = np.asarray(quaternion) / np.linalg.norm(quaternion)
    direction = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    if flip:
        direction[:, 2] *= -1  # left-handed grids too
    image = make_volume("label", size=(4, 3, 2), spacing=spacing, origin=origin, direction=direction.ravel())
    path = tmp_path / "prop.nii.gz"
    write_volume(image, path, overwrite=True)
    back = read_label(path)
    # NIfTI stores float32: 1e-5 mm holds for |origin| <= 200 mm
    assert_same_geometry(back, image, atol=1e-5)
    np.testing.assert_array_equal(array(back), array(image))


# -------------------------------------------------------------------------------------- Slicer seg.nrrd


def _slicer_seg(path: Path, layers: list[np.ndarray], segments: list[tuple[str, int, int]]) -> None:
    """Write a Slicer-style .seg.nrrd: one (z, y, x) uint8 array per layer; segments (name, value, layer)."""
    if len(layers) == 1:
        image = sitk.GetImageFromArray(layers[0])
    else:
        image = sitk.Compose([sitk.GetImageFromArray(layer) for layer in layers])
    Geometry.of(make_volume("label")).apply(image)
    for i, (name, value, layer) in enumerate(segments):
        image.SetMetaData(f"Segment{i}_ID", f"Segment_{i + 1}")
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", str(layer))
    sitk.WriteImage(image, str(path), True)


def test_read_slicer_segmentation_3d(tmp_path: Path) -> None:
    labels = array(make_volume("label"))
    path = tmp_path / "case.seg.nrrd"
    _slicer_seg(path, [labels], [("liver", 1, 0), ("spleen", 2, 0), ("kidney", 3, 0)])
    image = read_label(path)
    assert_same_geometry(image, make_volume("label"))
    np.testing.assert_array_equal(array(image), labels)
    info = describe(path)
    assert info.format == "Slicer segmentation"
    assert info.is_label
    assert info.label_names == {1: "liver", 2: "spleen", 3: "kidney"}


def test_read_layered_slicer_segmentation_merges_layers(tmp_path: Path) -> None:
    labels = array(make_volume("label"))
    layer0 = np.where(labels == 1, 1, 0).astype(np.uint8)
    layer1 = np.where(labels >= 2, labels, 0).astype(np.uint8)  # values 2 and 3
    path = tmp_path / "layers.seg.nrrd"
    _slicer_seg(path, [layer0, layer1], [("a", 1, 0), ("b", 2, 1), ("c", 3, 1)])
    image = read_label(path)
    assert image.GetDimension() == 3
    assert image.GetNumberOfComponentsPerPixel() == 1
    assert_same_geometry(image, make_volume("label"))
    np.testing.assert_array_equal(array(image), labels)
    assert describe(path).label_names == {1: "a", 2: "b", 3: "c"}


def test_layered_slicer_segmentation_with_repeated_values_is_renumbered(tmp_path: Path) -> None:
    labels = array(make_volume("label", n_labels=2))
    layers = [np.where(labels == 1, 1, 0).astype(np.uint8), np.where(labels == 2, 1, 0).astype(np.uint8)]
    path = tmp_path / "same.seg.nrrd"
    _slicer_seg(path, layers, [("first", 1, 0), ("second", 1, 1)])
    np.testing.assert_array_equal(array(read_label(path)), labels)
    assert describe(path).label_names == {1: "first", 2: "second"}


def test_overlapping_layered_slicer_segmentation_is_refused(tmp_path: Path) -> None:
    labels = array(make_volume("label"))
    layers = [(labels >= 1).astype(np.uint8), (labels >= 2).astype(np.uint8)]
    path = tmp_path / "overlap.seg.nrrd"
    _slicer_seg(path, layers, [("outer", 1, 0), ("inner", 1, 1)])
    with pytest.raises(InputError, match="overlapping segments") as info:
        read_label(path)
    assert "overlap.seg.nrrd" in str(info.value)


# ----------------------------------------------------------------------------------------- bad inputs


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), True)
    return path


def _nifti_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.nii"
        sitk.WriteImage(make_volume("label"), str(path))
        return path.read_bytes()


def _patch_dims(data: bytes, dims: tuple[int, int, int]) -> bytes:
    header = bytearray(data)
    header[42:48] = struct.pack("<3h", *dims)
    return bytes(header)


def _bad_missing(tmp: Path) -> Path:
    return tmp / "missing.nii.gz"


def _bad_extension(tmp: Path) -> Path:
    (tmp / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    return tmp / "slice.png"


def _bad_empty(tmp: Path) -> Path:
    (tmp / "empty.nii.gz").write_bytes(b"")
    return tmp / "empty.nii.gz"


def _bad_not_gzip(tmp: Path) -> Path:
    (tmp / "plain.nii.gz").write_bytes(_nifti_bytes())
    return tmp / "plain.nii.gz"


def _bad_corrupt_gzip(tmp: Path) -> Path:
    data = bytearray(gzip.compress(_nifti_bytes()))
    data[40:80] = b"\x00" * 40
    (tmp / "corrupt.nii.gz").write_bytes(bytes(data))
    return tmp / "corrupt.nii.gz"


def _bad_truncated_gzip(tmp: Path) -> Path:
    data = gzip.compress(_nifti_bytes())
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp / "cut.nii.gz"


def _bad_truncated_nifti(tmp: Path) -> Path:
    data = _nifti_bytes()
    (tmp / "short.nii").write_bytes(data[: len(data) - 100])
    return tmp / "short.nii"


def _bad_truncated_nifti_in_gzip(tmp: Path) -> Path:
    data = _nifti_bytes()
    (tmp / "short.nii.gz").write_bytes(gzip.compress(data[: len(data) - 100]))
    return tmp / "short.nii.gz"


def _bad_garbage_nrrd(tmp: Path) -> Path:
    (tmp / "garbage.nrrd").write_bytes(b"this is not an image\n" * 10)
    return tmp / "garbage.nrrd"


def _bad_truncated_nrrd(tmp: Path) -> Path:
    path = tmp / "full.nrrd"
    sitk.WriteImage(make_volume("image"), str(path))  # uncompressed
    data = path.read_bytes()
    path.unlink()
    (tmp / "truncated.nrrd").write_bytes(data[:-60])
    return tmp / "truncated.nrrd"


def _bad_mhd_without_data(tmp: Path) -> Path:
    path = _write(make_volume("label"), tmp / "header.mhd")
    (tmp / "header.zraw").unlink()
    return path


def _bad_2d(tmp: Path) -> Path:
    return _write(sitk.GetImageFromArray(np.zeros((10, 12), np.uint8)), tmp / "flat.nii.gz")


def _bad_4d(tmp: Path) -> Path:
    volumes = [make_volume("label") for _ in range(3)]
    return _write(sitk.JoinSeries(volumes), tmp / "series.nii.gz")


def _bad_rgb(tmp: Path) -> Path:
    return _write(sitk.GetImageFromArray(np.zeros((7, 10, 12, 3), np.uint8), isVector=True), tmp / "rgb.mha")


def _bad_zero_dim(tmp: Path) -> Path:
    (tmp / "zero.nii").write_bytes(_patch_dims(_nifti_bytes(), (12, 0, 7)))
    return tmp / "zero.nii"


def _bad_huge(tmp: Path) -> Path:
    (tmp / "huge.nii").write_bytes(_patch_dims(_nifti_bytes(), (5000, 5000, 5000)))
    return tmp / "huge.nii"


def _bad_huge_nrrd(tmp: Path) -> Path:
    header = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4000 4000 4000\nencoding: raw\n\n"
    (tmp / "huge.nrrd").write_bytes(header + b"\x00" * 100)
    return tmp / "huge.nrrd"


def _bad_single_dicom(tmp: Path) -> Path:
    write_volume(make_volume("ct"), tmp / "series", format="dicom", modality="CT")
    return sorted((tmp / "series").iterdir())[0]


def _bad_fake_dicom(tmp: Path) -> Path:
    (tmp / "fake.dcm").write_bytes(b"hello, I am not DICOM at all" * 3)
    return tmp / "fake.dcm"


def _bad_no_dicom_folder(tmp: Path) -> Path:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("nothing here")
    return tmp / "notes"


BAD_INPUTS = {
    "missing": (_bad_missing, "file not found"),
    "extension": (_bad_extension, "unknown file type (.png)"),
    "empty": (_bad_empty, "file is empty (0 bytes)"),
    "not-gzip": (_bad_not_gzip, "corrupt gzip data"),
    "corrupt-gzip": (_bad_corrupt_gzip, "corrupt gzip data"),
    "truncated-gzip": (_bad_truncated_gzip, "corrupt gzip data"),
    "truncated-nifti": (_bad_truncated_nifti, "NIfTI image data is truncated"),
    "truncated-nifti-gz": (_bad_truncated_nifti_in_gzip, "NIfTI image data is truncated"),
    "garbage-nrrd": (_bad_garbage_nrrd, "not a valid NRRD file"),
    "truncated-nrrd": (_bad_truncated_nrrd, "NRRD image data is truncated or corrupt"),
    "mhd-without-data": (_bad_mhd_without_data, "the data file the .mhd names is missing"),
    "2d": (_bad_2d, "2D image; expected a 3D volume"),
    "4d": (_bad_4d, "4D image; expected a 3D volume"),
    "rgb": (_bad_rgb, "multi-component image (3 values per voxel"),
    "zero-dim": (_bad_zero_dim, "empty image (a dimension has size 0"),
    "huge-nifti": (_bad_huge, "header claims 125000000000 voxels"),
    "huge-nrrd": (_bad_huge_nrrd, "header claims 64000000000 voxels"),
    "single-dicom": (_bad_single_dicom, "pass the folder that holds the whole series"),
    "fake-dicom": (_bad_fake_dicom, "not a DICOM file"),
    "no-dicom": (_bad_no_dicom_folder, "no DICOM series found"),
}


@pytest.mark.parametrize("kind", ["label", "image"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error(tmp_path: Path, case: str, kind: str) -> None:
    make, phrase = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        read_volume(path, kind=kind)  # type: ignore[arg-type]
    message = str(info.value)
    assert path.name in message
    assert phrase in message
    assert "\n" not in message
    assert "sitk::" not in message and "ITK" not in message
    if kind == "label":  # describe() goes through the same checks
        with pytest.raises(InputError, match="."):
            describe(path)


def _label_file(tmp: Path, values: np.ndarray, name: str) -> Path:
    image = sitk.GetImageFromArray(values)
    Geometry.of(make_volume("label", size=values.shape[::-1])).apply(image)
    return _write(image, tmp / name)


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        (np.array([0.0, 1.0, 0.5, 2.0]), "float labels with non-integer values (e.g. 0.5)"),
        # the value exactly as stored (float32), not rounded to "1" by a short format
        (np.array([0.0, 1.0000001, 2.0]), f"non-integer values (e.g. {float(np.float32(1.0000001))!r})"),
        (np.array([0.0, 2.0, 3.0e-30]), f"non-integer values (e.g. {float(np.float32(3.0e-30))!r})"),
        (np.array([0.0, 1.0, np.nan, 2.0]), "NaN/Inf in segmentation"),
        (np.array([0.0, np.inf, 1.0, 2.0]), "NaN/Inf in segmentation"),
        (np.array([0, -1, 2, -3, -1]), "negative label values (-3, -1)"),
    ],
)
def test_bad_label_values(tmp_path: Path, values: np.ndarray, phrase: str) -> None:
    volume = np.zeros((3, 4, 5), dtype=values.dtype)
    volume.flat[: values.size] = values
    path = _label_file(
        tmp_path, volume.astype(np.float32 if values.dtype.kind == "f" else np.int16), "bad.nii.gz"
    )
    with pytest.raises(InputError) as info:
        read_label(path)
    assert "bad.nii.gz" in str(info.value)
    assert phrase in str(info.value)


@pytest.mark.parametrize("name", ["nan.nrrd", "nan.nii", "nan.nii.gz", "nan.mha"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_image_with_nan_or_inf_is_refused(tmp_path: Path, name: str, bad: float) -> None:
    # ITK's NIfTI reader turns NaN/Inf into 0: volgen scans the NIfTI data itself
    volume = np.ones((3, 4, 5), np.float64 if name.endswith(".mha") else np.float32)
    volume[1, 2, 3] = bad
    path = _label_file(tmp_path, volume, name)
    with pytest.raises(InputError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: NaN/Inf values in image"


@pytest.mark.parametrize(
    ("dtype", "max_value", "expected"),
    [
        (np.uint8, 5, sitk.sitkUInt8),
        (np.uint16, 300, sitk.sitkUInt16),
        (np.int16, 7, sitk.sitkUInt16),
        (np.int32, 70000, sitk.sitkUInt32),
        (np.float32, 4, sitk.sitkUInt16),
        (np.float64, 70000, sitk.sitkUInt32),
    ],
)
def test_label_pixel_types(tmp_path: Path, dtype: type, max_value: int, expected: int) -> None:
    volume = np.zeros((3, 4, 5), dtype=dtype)
    volume[1, 1, 1] = max_value
    image = read_label(_label_file(tmp_path, volume, "labels.nrrd"))
    assert image.GetPixelID() == expected
    assert int(array(image).max()) == max_value


def test_image_is_float32(tmp_path: Path) -> None:
    image = read_image(_write(make_volume("ct"), tmp_path / "ct.mha"))
    assert image.GetPixelID() == sitk.sitkFloat32


def test_4d_with_one_volume_is_read_as_3d(tmp_path: Path) -> None:
    path = _write(sitk.JoinSeries([make_volume("label")]), tmp_path / "one.nii.gz")
    assert read_label(path).GetSize() == (12, 10, 7)


def test_kind_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        read_volume(tmp_path / "x.nii.gz", kind="mask")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- describe


def test_describe_label_counts_and_volumes(tmp_path: Path) -> None:
    image = make_volume("label")
    path = write_volume(image, tmp_path / "seg.nii.gz")
    info = describe(path)
    assert info.format == "NIfTI"
    assert info.is_label
    assert info.dtype == "uint8"
    assert (info.min, info.max) == (0.0, 3.0)
    values, counts = np.unique(array(image), return_counts=True)
    assert info.label_counts == dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert sum(info.label_counts.values()) == int(np.prod(SIZE))
    assert info.volume_ml(1) == pytest.approx(info.label_counts[1] * 0.7 * 0.9 * 2.5 / 1000)
    assert info.volume_ml(42) == 0.0
    assert info.geometry.close_to(Geometry.of(image))
    assert json.loads(json.dumps(info.to_dict()))["label_counts"]["0"] == info.label_counts[0]


@pytest.mark.parametrize(
    ("kind", "name", "fmt"), [("image", "mr.mha", "MetaImage"), ("ct", "ct.nrrd", "NRRD")]
)
def test_describe_images_are_not_labels(tmp_path: Path, kind: str, name: str, fmt: str) -> None:
    info = describe(write_volume(make_volume(kind), tmp_path / name))  # type: ignore[arg-type]
    assert info.format == fmt
    assert not info.is_label
    assert info.label_counts == {}


def test_describe_with_explicit_kind(tmp_path: Path) -> None:
    path = write_volume(make_volume("image"), tmp_path / "mr.nii.gz")
    with pytest.raises(InputError, match="float labels with non-integer values"):
        describe(path, kind="label")
    info = describe(write_volume(make_volume("label"), tmp_path / "seg.nrrd"), kind="image")
    assert not info.is_label


# -------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    ("name", "format_", "expected"),
    [
        ("a.nii.gz", None, "nifti"),
        ("a.NII", None, "nifti"),
        ("a.nrrd", None, "nrrd"),
        ("a.seg.nrrd", None, "nrrd"),
        ("a.mha", None, "mha"),
        ("a.mhd", None, "mha"),
        ("series", "dicom", "dicom"),
        ("series.v1", "DICOM", "dicom"),
        ("a.nii.gz", "nifti", "nifti"),
    ],
)
def test_output_format(name: str, format_: str | None, expected: str) -> None:
    assert output_format(name, format_) == expected


@pytest.mark.parametrize(
    ("name", "format_", "phrase"),
    [
        ("a.png", None, "unknown output extension .png"),
        ("series", None, "no file extension"),
        ("a.nii.gz", "nrrd", "does not match format 'nrrd'"),
        ("a.nii.gz", "dicom", "must not end with .nii.gz"),
        ("a.nii.gz", "jpeg", "unknown output format 'jpeg'"),
    ],
)
def test_output_format_errors(name: str, format_: str | None, phrase: str) -> None:
    with pytest.raises(OutputError) as info:
        output_format(name, format_)
    assert name in str(info.value)
    assert phrase in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_output_is_refused_without_overwrite(tmp_path: Path, fmt: str) -> None:
    path, format_ = _out(tmp_path, fmt)
    write_volume(make_volume("label"), path, format=format_)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(OutputError, match="already exists"):
        write_volume(make_volume("label", n_labels=1), path, format=format_)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    write_volume(make_volume("label", n_labels=1), path, format=format_, overwrite=True)
    assert int(array(read_label(path)).max()) == 1
    assert not [p for p in tmp_path.rglob(".volgen-tmp-*")]


def test_existing_empty_folder_can_take_a_dicom_series(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    write_volume(make_volume("label"), tmp_path / "dicom", format="dicom")
    assert len(list((tmp_path / "dicom").iterdir())) == SIZE[2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_output_folder(tmp_path: Path, fmt: str) -> None:
    path, format_ = _out(tmp_path / "nowhere", fmt)
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(make_volume("label"), path, format=format_)
    assert not (tmp_path / "nowhere").exists()


def test_output_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.nii.gz").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_volume(make_volume("label"), tmp_path / "x.nii.gz", overwrite=True)


def test_writing_a_2d_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="expected a 3D single-component image"):
        write_volume(sitk.Image((4, 4), sitk.sitkUInt8), tmp_path / "flat.nii.gz")


@pytest.mark.parametrize("fmt", [".nii.gz", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, existing: bool
) -> None:
    path = tmp_path / f"out{fmt}"
    if existing:
        write_volume(make_volume("label"), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_writer(image: sitk.Image, filename: str, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"half a volume")  # the temporary file exists, then the disk "fills"
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", failing_writer)
    with pytest.raises(OutputError, match="could not write") as info:
        write_volume(make_volume("label", n_labels=1), path, overwrite=True)
    assert path.name in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_failed_dicom_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom

    folder = tmp_path / "dicom"
    write_volume(make_volume("label"), folder, format="dicom")
    before = sorted(p.name for p in folder.iterdir())
    calls = []
    original = pydicom.Dataset.save_as

    def failing_save(self: pydicom.Dataset, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(self, filename, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    with pytest.raises(OutputError, match="No space left on device"):
        write_volume(make_volume("label", n_labels=1), folder, format="dicom", overwrite=True)
    assert _listing(tmp_path) == ["dicom"]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert int(array(read_label(folder)).max()) == 3  # the old series, untouched


def test_atomic_write_and_directory(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("model.json") and tmp.name.startswith(".")
        tmp.write_text("{}")
        assert not target.exists()
    assert target.read_text() == "{}"
    with pytest.raises(ZeroDivisionError), atomic_write(target, overwrite=True) as tmp:
        tmp.write_text("broken")
        _ = 1 / 0
    assert target.read_text() == "{}"
    assert _listing(tmp_path) == ["model.json"]

    folder = tmp_path / "model"
    with atomic_directory(folder) as tmp:
        (tmp / "volgen.json").write_text("a")
    assert _listing(folder) == ["volgen.json"]
    with pytest.raises(OutputError, match="already exists"), atomic_directory(folder):
        pass
    with pytest.raises(KeyError), atomic_directory(folder, overwrite=True) as tmp:
        (tmp / "volgen.json").write_text("b")
        raise KeyError("interrupted")
    assert (folder / "volgen.json").read_text() == "a"
    with atomic_directory(folder, overwrite=True) as tmp:
        (tmp / "volgen.json").write_text("b")
        (tmp / "unet").mkdir()
    assert _listing(folder) == ["unet", "volgen.json"]
    assert _listing(tmp_path) == ["model", "model.json"]
    # a folder holding anything volgen does not write there is never replaced, even with overwrite
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="volgen did not write"), atomic_directory(folder, overwrite=True):
        pass
    assert (folder / "notes.txt").read_text() == "mine"


# -------------------------------------------------------------------------------------------- torchio


@pytest.mark.parametrize("kind", ["label", "image"])
def test_torchio_round_trip(tmp_path: Path, kind: str) -> None:
    import torchio as tio

    image = make_volume(kind)  # type: ignore[arg-type]
    tio_image = to_torchio(image, kind=kind)  # type: ignore[arg-type]
    assert isinstance(tio_image, tio.LabelMap if kind == "label" else tio.ScalarImage)
    assert tuple(tio_image.shape) == (1, *SIZE)  # (C, x, y, z)
    # the same affine TorchIO computes when it reads the file itself
    path = write_volume(image, tmp_path / "v.nrrd")
    np.testing.assert_allclose(tio_image.affine, tio.ScalarImage(path).affine, atol=1e-9)
    back = from_torchio(tio_image)
    assert_same_geometry(back, image, atol=1e-5)
    np.testing.assert_array_equal(array(back), array(image))
    if kind == "label":
        assert back.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)


def test_torchio_single_slice_stays_3d() -> None:
    image = make_volume("label", size=(5, 4, 1))
    back = from_torchio(to_torchio(image, kind="label"))
    assert back.GetDimension() == 3
    assert_same_geometry(back, image)


def test_file_names_with_spaces_and_unicode(tmp_path: Path) -> None:
    folder = tmp_path / "dossier à lire"
    folder.mkdir()
    path = write_volume(make_volume("label"), folder / "seg é.nii.gz")
    assert os.path.exists(path)
    np.testing.assert_array_equal(array(read_label(path)), array(make_volume("label")))
