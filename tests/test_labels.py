"""Label maps and typed configs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volgen.config import StrictModel, load_yaml
from volgen.errors import ConfigError, LabelError
from volgen.labels import LabelMap, load_label_map


@pytest.fixture
def label_map() -> LabelMap:
    return LabelMap(name="abdomen", classes={"liver": 1, "kidney": [2, 7], "spleen": [3]})


def test_classes_are_contiguous_with_background_zero(label_map):
    assert label_map.class_names == ["background", "liver", "kidney", "spleen"]
    assert label_map.num_classes == 4
    assert label_map.value_to_class() == {0: 0, 1: 1, 2: 2, 7: 2, 3: 3}


def test_remap_several_values_to_one_class(label_map):
    labels = np.array([[0, 1, 2], [7, 3, 0]], dtype=np.int16)
    assert label_map.remap(labels).tolist() == [[0, 1, 2], [2, 3, 0]]


def test_unknown_values_are_an_error_listing_them(label_map):
    with pytest.raises(LabelError, match=r"seg\.nii\.gz.*unknown.*: 4, 9") as info:
        label_map.remap(np.array([0, 4, 9, 1]), source="seg.nii.gz")
    assert "--unknown-labels background" in str(info.value)


def test_unknown_values_as_background(label_map):
    assert label_map.remap(np.array([0, 4, 9, 1]), unknown="background").tolist() == [0, 0, 0, 1]


def test_present_counts_classes(label_map):
    classes = label_map.remap(np.array([0, 0, 1, 2, 7, 7]))
    assert label_map.present(classes) == {"background": 2, "liver": 1, "kidney": 3}


def test_selection_keep_and_drop(label_map):
    assert label_map.selection() == [1, 2, 3]
    assert label_map.selection(keep=["spleen", "liver"]) == [1, 3]
    assert label_map.selection(drop=["kidney"]) == [1, 3]
    with pytest.raises(LabelError, match="unknown class 'lung'.*liver, kidney, spleen"):
        label_map.selection(drop=["lung"])
    with pytest.raises(LabelError, match="not both"):
        label_map.selection(keep=["liver"], drop=["kidney"])


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("classes: {liver: 1, kidney: 1}", "mapped to both"),
        ("classes: {background: 1}", "background"),
        ("classes: {liver: -2}", ">= 0"),
        ("classes: {liver: 1.5}", "integer"),
        ("classes: {}", "non-empty"),
        ("classes: {liver: 1}\ncolour: red", "unknown key 'colour'"),
        ("classes: [unclosed", "not valid YAML"),
    ],
)
def test_bad_label_maps_are_one_clear_error(tmp_path, text, phrase):
    path = tmp_path / "labels.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=phrase) as info:
        LabelMap.from_yaml(path)
    assert "labels.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_round_trip_and_presets(tmp_path, label_map):
    import yaml

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(label_map.to_dict()))
    assert LabelMap.from_yaml(path) == label_map
    colin = load_label_map("colin27")
    assert colin.class_names == ["background", "head", "csf", "grey_matter", "white_matter"]


def test_config_errors_name_the_key(tmp_path):
    from pydantic import Field

    class Settings(StrictModel):
        steps: int = Field(10, ge=1)

    path = tmp_path / "c.yaml"
    path.write_text("steps: 0\n")
    with pytest.raises(ConfigError, match="'steps'.*greater than or equal to 1"):
        load_yaml(path, Settings)
    path.write_text("stpes: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'stpes'"):
        load_yaml(path, Settings)
    path.write_text("steps: 4\n")
    assert load_yaml(path, Settings).steps == 4


@settings(max_examples=40, deadline=None)
@given(
    mapping=st.dictionaries(st.integers(1, 300), st.integers(1, 5), min_size=1, max_size=12),
    data=st.data(),
)
def test_remap_property(mapping, data):
    """Every known value lands on its class; the result only ever holds valid class indices."""
    classes = {f"c{k}": [v for v, c in mapping.items() if c == k] for k in sorted(set(mapping.values()))}
    label_map = LabelMap(classes=classes)
    values = [0, *mapping]
    labels = np.array(data.draw(st.lists(st.sampled_from(values), min_size=1, max_size=50)), dtype=np.int32)
    out = label_map.remap(labels)
    table = label_map.value_to_class()
    assert out.tolist() == [table[v] for v in labels.tolist()]
    assert out.max() < label_map.num_classes
