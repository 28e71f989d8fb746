"""Preview montages and the one class-colour table of every volgen figure."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from volumes import make_volume

from volgen.preview import (
    BACKGROUND_COLOUR,
    CLASS_COLOURS,
    class_colour,
    label_rgb,
    montage_figure,
    save_montage,
)


def test_class_colours_background_black_then_tab10_repeating():
    import matplotlib
    from matplotlib.colors import to_hex

    assert class_colour(0) == BACKGROUND_COLOUR == "#000000"
    tab10 = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    assert [class_colour(k) for k in range(1, 11)] == tab10 == list(CLASS_COLOURS)
    assert class_colour(11) == class_colour(1)
    assert len({class_colour(k) for k in range(11)}) == 11  # background differs from every class
    with pytest.raises(ValueError):
        class_colour(-1)


def test_label_rgb():
    classes = np.array([[0, 1], [2, 11]])
    rgb = label_rgb(classes)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb[0, 0], 0)
    np.testing.assert_allclose(rgb[0, 1], [0x1F / 255, 0x77 / 255, 0xB4 / 255], atol=1e-6)
    np.testing.assert_array_equal(rgb[0, 1], rgb[1, 1])  # class 11 repeats class 1


def _pair():
    seg = make_volume("label", size=(20, 18, 12), n_labels=3)
    image = make_volume("image", size=(20, 18, 12))
    return seg, image


def test_montage_has_a_legend_of_the_classes_present():
    import matplotlib.pyplot as plt

    seg, image = _pair()
    fig = montage_figure(seg, image, class_names=["background", "liver", "kidney", "spleen", "absent"])
    try:
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["background", "liver", "kidney", "spleen"]
        colours = np.array([h.get_facecolor()[:3] for h in legend.legend_handles])
        np.testing.assert_allclose(colours, label_rgb(np.arange(4)), atol=1e-6)
    finally:
        plt.close(fig)
    unnamed = montage_figure(seg, image)
    try:
        assert [t.get_text() for t in unnamed.legends[0].get_texts()] == [
            "background",
            "class 1",
            "class 2",
            "class 3",
        ]
    finally:
        plt.close(unnamed)


def test_saved_preview_shows_classes_in_the_shared_colours(tmp_path):
    seg, image = _pair()
    path = save_montage(seg, image, tmp_path / "p.png", title="t")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    present = {tuple(p) for p in np.unique(pixels, axis=0)}
    for k in range(1, 4):
        rgb = tuple(int(class_colour(k)[i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in present, f"class {k} colour {class_colour(k)} not drawn"
    with pytest.raises(Exception, match="exists"):
        save_montage(seg, image, path)
    assert sitk.GetArrayViewFromImage(seg).max() == 3
