"""MR DICOM output without a Modality LUT: how intensities are stored, and that it reads back."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from volumes import make_volume

from volgen.io.dicom import MR_STORED_MAX, mr_storage, write_dicom_series


def _write(image: sitk.Image, folder):
    write_dicom_series(image, folder, modality="MR")
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    stored = np.stack([ds.pixel_array for ds in datasets])
    item = datasets[0].RealWorldValueMappingSequence[0]
    return datasets[0], stored, float(item.RealWorldValueSlope), float(item.RealWorldValueIntercept)


def test_whole_number_intensities_are_stored_as_they_are(tmp_path):
    image = sitk.Cast(make_volume("image", size=(9, 8, 5)) / 5, sitk.sitkUInt8)  # a uint8 scale, 0..~200
    first, stored, slope, intercept = _write(image, tmp_path / "u8")
    assert "RescaleSlope" not in first and first.PixelRepresentation == 0
    assert (slope, intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(stored, sitk.GetArrayFromImage(image))


def test_negative_whole_numbers_are_stored_signed(tmp_path):
    image = sitk.Cast(make_volume("ct", size=(9, 8, 5)), sitk.sitkInt16)
    first, stored, slope, intercept = _write(image, tmp_path / "s16")
    assert "RescaleSlope" not in first and first.PixelRepresentation == 1
    np.testing.assert_array_equal(stored, sitk.GetArrayFromImage(image))


def test_float_intensities_use_the_full_unsigned_range(tmp_path):
    image = make_volume("image", size=(9, 8, 5))
    first, stored, slope, intercept = _write(image, tmp_path / "f32")
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    assert stored.min() == 0 and stored.max() == MR_STORED_MAX
    np.testing.assert_allclose(stored * slope + intercept, values, atol=slope * 0.51)
    assert intercept == pytest.approx(values.min())


def test_mr_storage_rules():
    assert mr_storage(np.array([[0, 255]], np.uint8)) == (1.0, 0.0, False)
    assert mr_storage(np.array([[-3.0, 7.0]])) == (1.0, 0.0, True)
    assert mr_storage(np.array([[0.0, 70000.0]]))[2] is False  # too large for 16 bit: mapped
    slope, intercept, signed = mr_storage(np.array([[0.5, 2.5]], np.float32))
    assert (slope, intercept, signed) == (pytest.approx(2.0 / MR_STORED_MAX), 0.5, False)


def test_volgen_reads_its_mr_output_back_as_intensities(tmp_path):
    from volgen.io import read_image

    image = make_volume("image", size=(9, 8, 5))
    _, _, slope, _ = _write(image, tmp_path / "mr")
    back = read_image(tmp_path / "mr")
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image), rtol=0, atol=slope * 0.51 + 1e-5
    )
