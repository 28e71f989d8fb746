"""The README's Python snippets run as written (with 2 steps instead of 20, on a small segmentation)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from volumes import make_volume, rotation

from volgen import io

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Generating volumes") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_the_three_python_snippets():
    snippets = _snippets()
    assert len(snippets) == 3
    assert (
        "generate(" in snippets[0] and "VolumeGenerator" in snippets[1] and "from_pretrained" in snippets[2]
    )


@pytest.mark.parametrize("index", range(3))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    seg = make_volume("label", size=(24, 20, 5), spacing=(2.0, 2.2, 3.0), direction=rotation(), n_labels=4)
    io.write_volume(seg, tmp_path / "seg.nii.gz")  # labels 0..4: the embedded model's label map
    monkeypatch.chdir(tmp_path)
    code = _snippets()[index].replace("num_inference_steps=20", "num_inference_steps=2")
    exec(compile(code, f"README.md python snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    if index == 0:
        assert printed.split() == ["synthetic.nii.gz", "synthetic.nii.gz.json"]
        assert (tmp_path / "synthetic.nii.gz.json").is_file()
    if index == 1:
        assert (tmp_path / "synthetic_1.nii.gz").is_file()
    if index == 2:
        assert printed.strip() == "torch.Size([8, 64, 64])"
