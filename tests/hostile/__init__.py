"""The hostile-input corpus: damaged, absurd and malicious inputs for every file volgen reads.

Each :class:`Hostile` case builds its input in a temporary :class:`Workspace` and returns the ``volgen``
command line that feeds it in (:class:`Invocation`). ``tests/test_hostile.py`` runs every case through the
CLI and checks what the user sees: exit code 1, exactly one line ``error: ...`` that names the input and
the problem (``Hostile.expect``), no traceback, and nothing written where the output would go.

Inputs covered (``Hostile.input``): ``segmentation``, ``dicom`` (series folders and DICOM SEG), ``reference``,
``training manifest`` (:func:`volgen.data.find_cases`), ``batch manifest`` (``volgen batch``), ``label map``,
``config`` (``volgen train`` YAML) and ``model`` folders. ``docs/reliability.md`` lists the cases.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from volumes import make_volume

from volgen import io

__all__ = [
    "CORPUS",
    "Hostile",
    "Invocation",
    "Workspace",
    "billion_laughs",
    "dicom_series",
    "nifti_bytes",
    "non_utf8_name",
]


# ------------------------------------------------------------------------------------------------ helpers


def nifti_bytes(image: sitk.Image | None = None) -> bytes:
    """The bytes of an uncompressed ``.nii`` file of ``image`` (default: a small label volume)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.nii"
        sitk.WriteImage(image if image is not None else make_volume("label"), str(path))
        return path.read_bytes()


def _patch_dims(data: bytes, dims: tuple[int, int, int]) -> bytes:
    """A NIfTI-1 file whose header claims other dimensions (``dim[1..3]``, int16 at byte 42)."""
    header = bytearray(data)
    header[42:48] = struct.pack("<3h", *dims)
    return bytes(header)


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A YAML 'billion laughs' document: ``width ** levels`` strings from a few hundred bytes of aliases."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def non_utf8_name(stem: str, suffix: str) -> str:
    """A file name holding the byte 0xFF (invalid UTF-8), as Python spells it (surrogate escape)."""
    return os.fsdecode(stem.encode() + b"\xff" + suffix.encode())


def shown(name: str) -> str:
    """How volgen shows a file name that is not valid UTF-8 (its bytes, invalid ones as ``\\xNN``)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _labels(values: np.ndarray, *, like: sitk.Image | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    reference = like if like is not None else make_volume("label", size=values.shape[::-1])
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


def dicom_series(folder: Path, *, modality: str = "CT", size=(12, 10, 7)) -> list[Path]:
    """A volgen-written DICOM series (one file per slice) in ``folder``; its files sorted by name."""
    image = make_volume("ct" if modality == "CT" else "image", size=size)
    io.write_volume(image, folder, format="dicom", modality=modality)
    return sorted(folder.iterdir())


# -------------------------------------------------------------------------------------------- workspace


@dataclass
class Invocation:
    """A command line for one case.

    Attributes:
        args: Arguments of ``volgen`` (the command first).
        names: Text the error line must contain to name the input (a file name or path).
        untouched: Paths where outputs would go; each must not exist afterwards, or be an empty folder.
    """

    args: list[str]
    names: str
    untouched: list[Path] = field(default_factory=list)


@dataclass
class Workspace:
    """A temporary folder with what the cases need: an empty output folder, a model, training data."""

    root: Path
    model: Path

    def __post_init__(self) -> None:
        self.out = self.root / "out"
        self.out.mkdir(exist_ok=True)

    # -- inputs
    def good_segmentation(self, name: str = "seg.nii.gz") -> Path:
        """A valid segmentation the tiny model knows (labels 0..3)."""
        path = self.root / name
        io.write_volume(make_volume("label"), path, overwrite=True)
        return path

    def write(self, image: sitk.Image, name: str) -> Path:
        path = self.root / name
        sitk.WriteImage(image, str(path), name.endswith((".gz", ".mha", ".nrrd")))
        return path

    def raw(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def text(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        return path

    def model_copy(self) -> Path:
        folder = self.root / "model"
        if not folder.exists():
            shutil.copytree(self.model, folder)
        return folder

    # -- commands
    def generate(
        self, segmentation: Path, *extra: str, model: Path | None = None, names: str = ""
    ) -> Invocation:
        """``volgen generate SEGMENTATION -o out/syn.nii.gz --model ...`` (one fast step)."""
        args = ["generate", str(segmentation), "-o", str(self.out / "syn.nii.gz")]
        args += ["--model", str(model or self.model), "--steps", "1", "--device", "cpu", "--progress", "none"]
        return Invocation(args + list(extra), names or segmentation.name, [self.out])

    def reference(self, reference: Path) -> Invocation:
        """``volgen generate`` of a good segmentation with ``--reference REFERENCE --strength 0.5``."""
        seg = self.good_segmentation()
        return self.generate(seg, "--reference", str(reference), "--strength", "0.5", names=reference.name)

    def training_data(self) -> Path:
        """``data/images`` + ``data/labels`` (two small cases) and ``labels.yaml``; returns ``data``."""
        data = self.root / "data"
        if not data.exists():
            for sub in ("images", "labels"):
                (data / sub).mkdir(parents=True)
            for k in range(2):
                io.write_volume(make_volume("label", n_labels=2), data / "labels" / f"case{k}.nii.gz")
                io.write_volume(make_volume("image", seed=k), data / "images" / f"case{k}.nii.gz")
            self.text("labels.yaml", "name: shapes\nclasses:\n  ball: 1\n  box: 2\n")
        return data

    def train(
        self,
        *,
        config: Path | None = None,
        source: str = "data",
        label_map: str = "labels.yaml",
        names: str = "",
    ) -> Invocation:
        """``volgen train CONFIG`` of a tiny run writing to ``run/`` (which must not appear)."""
        self.training_data()
        if config is None:
            settings = {"max_steps": 2, "batch_size": 2, "checkpoint_every": 1, "preview_every": 0}
            document = {
                "output_dir": "run",
                "data": {"source": source, "label_map": label_map},
                "model": {"preset": "tiny"},
                "training": settings,
            }
            config = self.text("train.yaml", yaml.safe_dump(document))
        return Invocation(["train", str(config)], names or config.name, [self.root / "run"])

    def batch(self, manifest: Path, names: str = "") -> Invocation:
        """``volgen batch MANIFEST batch-out --model ...`` (``batch-out`` must not appear)."""
        out = self.root / "batch-out"
        args = ["batch", str(manifest), str(out), "--model", str(self.model), "--steps", "1"]
        args += ["--device", "cpu", "--progress", "none"]
        return Invocation(args, names or manifest.name, [out])


@dataclass(frozen=True)
class Hostile:
    """One hostile case: which input it attacks, what the error line must say, how to build it."""

    id: str
    input: str
    expect: str
    build: Callable[[Workspace], Invocation]
    what: str = ""


CORPUS: list[Hostile] = []


def case(id: str, input: str, expect: str, what: str = "") -> Callable:
    def register(build: Callable[[Workspace], Invocation]) -> Callable[[Workspace], Invocation]:
        what_ = what or (build.__doc__ or "")
        CORPUS.append(Hostile(id=id, input=input, expect=expect, build=build, what=what_))
        return build

    return register


# ------------------------------------------------------------------------------------------ segmentations


@case("seg-corrupt-gzip", "segmentation", "corrupt gzip data")
def _corrupt_gzip(ws: Workspace) -> Invocation:
    """.nii.gz whose deflate stream is damaged in the middle."""
    data = bytearray(gzip.compress(nifti_bytes()))
    data[40:80] = b"\x00" * 40
    return ws.generate(ws.raw("seg.nii.gz", bytes(data)))


@case("seg-truncated-gzip", "segmentation", "corrupt gzip data")
def _truncated_gzip(ws: Workspace) -> Invocation:
    """.nii.gz cut in half (the gzip stream ends early)."""
    data = gzip.compress(nifti_bytes())
    return ws.generate(ws.raw("seg.nii.gz", data[: len(data) // 2]))


@case("seg-truncated-nifti", "segmentation", "NIfTI image data is truncated")
def _truncated_nifti(ws: Workspace) -> Invocation:
    """.nii with the last 100 bytes of voxel data missing."""
    data = nifti_bytes()
    return ws.generate(ws.raw("seg.nii", data[:-100]))


@case("seg-huge-header", "segmentation", "header claims 8000000000 voxels")
def _huge_header(ws: Workspace) -> Invocation:
    """.nii whose header claims 2000³ voxels (the file holds a few hundred)."""
    return ws.generate(ws.raw("seg.nii", _patch_dims(nifti_bytes(), (2000, 2000, 2000))))


@case("seg-huge-metaimage", "segmentation", "header claims 8000000000 voxels")
def _huge_mha(ws: Workspace) -> Invocation:
    """.mha text header claiming 2000³ voxels."""
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 2000 2000 2000\nElementType = MET_UCHAR\n"
        "ElementDataFile = LOCAL\n"
    )
    return ws.generate(ws.raw("seg.mha", header.encode() + b"\x00" * 64))


@case("seg-zero-dimension", "segmentation", "empty image (a dimension has size 0")
def _zero_dim(ws: Workspace) -> Invocation:
    """.nii whose header has a dimension of size 0."""
    return ws.generate(ws.raw("seg.nii", _patch_dims(nifti_bytes(), (12, 0, 7))))


@case("seg-empty-file", "segmentation", "file is empty (0 bytes)")
def _empty(ws: Workspace) -> Invocation:
    """A 0-byte .nii.gz."""
    return ws.generate(ws.raw("seg.nii.gz", b""))


@case("seg-2d", "segmentation", "2D image; expected a 3D volume")
def _two_d(ws: Workspace) -> Invocation:
    """A 2D label image."""
    return ws.generate(ws.write(sitk.GetImageFromArray(np.ones((10, 12), np.uint8)), "seg.nii.gz"))


@case("seg-4d", "segmentation", "4D image; expected a 3D volume")
def _four_d(ws: Workspace) -> Invocation:
    """A 4D volume (three time points)."""
    return ws.generate(ws.write(sitk.JoinSeries([make_volume("label")] * 3), "seg.nii.gz"))


@case("seg-rgb", "segmentation", "multi-component image (3 values per voxel")
def _rgb(ws: Workspace) -> Invocation:
    """An RGB volume (three components per voxel)."""
    rgb = sitk.GetImageFromArray(np.zeros((7, 10, 12, 3), np.uint8), isVector=True)
    return ws.generate(ws.write(rgb, "seg.mha"))


@case("seg-float-labels", "segmentation", "float labels with non-integer values (e.g. 0.5)")
def _float_labels(ws: Workspace) -> Invocation:
    """Float voxels with fractional values (a probability map, not labels)."""
    values = sitk.GetArrayFromImage(make_volume("label")).astype(np.float32) * 0.5
    return ws.generate(ws.write(_labels(values), "seg.nii.gz"))


@case("seg-nan", "segmentation", "NaN/Inf in segmentation")
def _nan(ws: Workspace) -> Invocation:
    """Float labels with a NaN voxel (ITK would read it as 0)."""
    values = sitk.GetArrayFromImage(make_volume("label")).astype(np.float32)
    values[3, 4, 5] = np.nan
    return ws.generate(ws.write(_labels(values), "seg.nii.gz"))


@case("seg-inf", "segmentation", "NaN/Inf in segmentation")
def _inf(ws: Workspace) -> Invocation:
    """Float labels with -Inf in an uncompressed .nii."""
    values = sitk.GetArrayFromImage(make_volume("label")).astype(np.float64)
    values[0, 0, 0] = -np.inf
    return ws.generate(ws.write(_labels(values), "seg.nii"))


@case("seg-negative-labels", "segmentation", "negative label values (-7, -1)")
def _negative(ws: Workspace) -> Invocation:
    """int16 labels with the values -1 and -7."""
    values = sitk.GetArrayFromImage(make_volume("label")).astype(np.int16)
    values[0, 0, :2] = (-1, -7)
    return ws.generate(ws.write(_labels(values), "seg.nrrd"))


@case("seg-label-2147483647", "segmentation", "label values unknown to label map 'test': 2147483647")
def _int32_max(ws: Workspace) -> Invocation:
    """int32 labels holding 2**31-1, a value the model's label map does not know."""
    values = sitk.GetArrayFromImage(make_volume("label")).astype(np.int32)
    values[1, 1, 1] = 2**31 - 1
    return ws.generate(ws.write(_labels(values), "seg.nii.gz"))


@case("seg-label-2**40", "segmentation", "label values too large (max 1.09951e+12")
def _too_large(ws: Workspace) -> Invocation:
    """float64 labels holding 2**40 (does not fit 32-bit labels)."""
    values = sitk.GetArrayFromImage(make_volume("label")).astype(np.float64)
    values[1, 1, 1] = 2.0**40
    return ws.generate(ws.write(_labels(values), "seg.nii.gz"))


@case("seg-symlink-loop", "segmentation", "symbolic link that leads nowhere")
def _symlink_loop(ws: Workspace) -> Invocation:
    """seg.nii.gz -> loop.nii.gz -> seg.nii.gz."""
    (ws.root / "seg.nii.gz").symlink_to("loop.nii.gz")
    (ws.root / "loop.nii.gz").symlink_to("seg.nii.gz")
    return ws.generate(ws.root / "seg.nii.gz")


@case("seg-non-utf8-name", "segmentation", "path is not valid UTF-8")
def _non_utf8(ws: Workspace) -> Invocation:
    """A valid segmentation whose name holds the byte 0xFF (SimpleITK aborts the process on such names)."""
    good = ws.good_segmentation()
    bad = ws.root / non_utf8_name("seg_", ".nii.gz")
    good.rename(bad)
    return ws.generate(bad, names=shown(bad.name))


@case("seg-markup-name", "segmentation", "corrupt gzip data")
def _markup_name(ws: Workspace) -> Invocation:
    """A corrupt file named ``seg[bold].nii.gz``: the error line must show the name, not rich markup."""
    return ws.generate(ws.raw("seg[bold].nii.gz", b"\x1f\x8b" + b"\x00" * 64))


@case("seg-unknown-type", "segmentation", "unknown file type (no extension)")
def _unknown_type(ws: Workspace) -> Invocation:
    """A text file with no extension (e.g. /etc/passwd)."""
    return ws.generate(ws.raw("passwd", b"root:x:0:0:root:/root:/bin/bash\n"))


# ------------------------------------------------------------------------------------------------- DICOM


@case("dicom-mixed-series", "dicom", "folder holds 2 DICOM series, expected one")
def _mixed_series(ws: Workspace) -> Invocation:
    """A folder holding the slices of two series."""
    folder = ws.root / "series"
    dicom_series(folder)
    for path in dicom_series(ws.root / "other", size=(12, 10, 5)):
        shutil.move(path, folder / f"B_{path.name}")
    return ws.generate(folder)


@case("dicom-missing-slice", "dicom", "slices are not evenly spaced (missing slices?)")
def _missing_slice(ws: Workspace) -> Invocation:
    """A series with its middle slice deleted."""
    files = dicom_series(ws.root / "series")
    files[len(files) // 2].unlink()
    return ws.generate(ws.root / "series")


@case("dicom-uneven-spacing", "dicom", "slices are not evenly spaced")
def _uneven_spacing(ws: Workspace) -> Invocation:
    """Slice positions drift: the last slices are 1 mm further apart than the others."""
    import pydicom

    files = dicom_series(ws.root / "series")
    for k, path in enumerate(files[4:], start=1):
        ds = pydicom.dcmread(path)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        position = np.array([float(v) for v in ds.ImagePositionPatient]) + k * 1.0 * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.save_as(path)
    return ws.generate(ws.root / "series")


@case("dicom-pixel-spacing-differs", "dicom", "slices have different pixel spacing (PixelSpacing)")
def _pixel_spacing(ws: Workspace) -> Invocation:
    """One slice claims another in-plane spacing than the rest."""
    import pydicom

    files = dicom_series(ws.root / "series")
    ds = pydicom.dcmread(files[3])
    ds.PixelSpacing = [2.0, 2.0]
    ds.save_as(files[3])
    return ws.generate(ws.root / "series")


@case("dicom-seg-overlap", "dicom", "overlapping segments; volgen needs one label per voxel")
def _seg_overlap(ws: Workspace) -> Invocation:
    """A DICOM SEG whose segment 2 lies inside segment 1 (two labels per voxel)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in dicom_series(ws.root / "ct")]
    labels = sitk.GetArrayFromImage(make_volume("label"))
    binary = np.stack([labels >= 1, labels >= 2], axis=-1).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"organ {n}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in (1, 2)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=binary,
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
    )
    path = ws.root / "overlap.dcm"
    seg.save_as(path)
    return ws.generate(path)


@case("dicom-non-utf8-file", "dicom", "holds a file whose path is not valid UTF-8")
def _dicom_non_utf8(ws: Workspace) -> Invocation:
    """A series folder in which one slice's file name holds the byte 0xFF."""
    files = dicom_series(ws.root / "series")
    files[2].rename(files[2].with_name(non_utf8_name("IM_", ".dcm")))
    return ws.generate(ws.root / "series", names="series")


# --------------------------------------------------------------------------------------------- reference


@case("ref-nan", "reference", "NaN/Inf values in image")
def _ref_nan(ws: Workspace) -> Invocation:
    """A reference image with a NaN voxel."""
    values = sitk.GetArrayFromImage(make_volume("image"))
    values[2, 2, 2] = np.nan
    return ws.reference(ws.write(_labels(values), "ref.nii.gz"))


@case("ref-truncated", "reference", "NIfTI image data is truncated")
def _ref_truncated(ws: Workspace) -> Invocation:
    """A reference .nii missing its last voxels."""
    return ws.reference(ws.raw("ref.nii", nifti_bytes(make_volume("image"))[:-64]))


@case("ref-4d", "reference", "4D image; expected a 3D volume")
def _ref_4d(ws: Workspace) -> Invocation:
    """A 4D reference (two volumes)."""
    return ws.reference(ws.write(sitk.JoinSeries([make_volume("image")] * 2), "ref.nii.gz"))


@case("ref-rgb", "reference", "multi-component image (3 values per voxel")
def _ref_rgb(ws: Workspace) -> Invocation:
    """An RGB reference."""
    rgb = sitk.GetImageFromArray(np.zeros((7, 10, 12, 3), np.uint8), isVector=True)
    return ws.reference(ws.write(rgb, "ref.nrrd"))


# ------------------------------------------------------------------------------------ training manifests


@case("train-manifest-escape", "training manifest", "unknown file type (no extension)")
def _train_escape(ws: Workspace) -> Invocation:
    """A CSV manifest naming ``../../(...)/etc/passwd``: read (paths may leave the folder) and refused."""
    escape = "../" * 40 + "etc/passwd"
    if not Path("/etc/passwd").is_file():  # pragma: no cover - every Linux has it
        ws.raw("passwd", b"root:x:0:0\n")
        escape = "passwd"
    manifest = ws.text("cases.csv", f"image,label\n{escape},{escape}\n")
    return ws.train(source=manifest.name, names="etc/passwd")


@case("train-manifest-duplicate-ids", "training manifest", "duplicate case ids: same")
def _train_duplicates(ws: Workspace) -> Invocation:
    """Two manifest entries with the same case id."""
    ws.training_data()
    rows = [f"data/images/case{k}.nii.gz,data/labels/case{k}.nii.gz,same" for k in range(2)]
    manifest = ws.text("cases.csv", "image,label,case\n" + "\n".join(rows) + "\n")
    return ws.train(source=manifest.name, names=manifest.name)


@case("train-manifest-yaml-bomb", "training manifest", "YAML bomb")
def _train_bomb(ws: Workspace) -> Invocation:
    """A YAML manifest that is a billion-laughs alias bomb."""
    manifest = ws.text("cases.yaml", billion_laughs() + "cases: *a8\n")
    return ws.train(source=manifest.name, names=manifest.name)


@case("train-manifest-not-utf8", "training manifest", "not a readable CSV manifest")
def _train_not_utf8(ws: Workspace) -> Invocation:
    """A CSV manifest in Latin-1 with bytes that are not UTF-8."""
    manifest = ws.raw("cases.csv", "image,label\nd\xe9j\xe0.nii.gz,x.nii.gz\n".encode("latin-1"))
    return ws.train(source=manifest.name, names=manifest.name)


# --------------------------------------------------------------------------------------- batch manifests


@case("batch-manifest-duplicate-ids", "batch manifest", "duplicate case id 'same'")
def _batch_duplicates(ws: Workspace) -> Invocation:
    """Two entries with the same case id (they would write the same output)."""
    seg = ws.good_segmentation()
    manifest = ws.text("cases.csv", f"segmentation,case\n{seg},same\n{seg},SAME\n")
    return ws.batch(manifest)


@case("batch-manifest-case-id-traversal", "batch manifest", "case id '../../evil' must be letters")
def _batch_traversal(ws: Workspace) -> Invocation:
    """A case id that would put the output outside OUT_DIR (``../../evil``)."""
    seg = ws.good_segmentation()
    manifest = ws.text("cases.yaml", f"- segmentation: {seg}\n  case: ../../evil\n")
    return ws.batch(manifest)


@case("batch-manifest-yaml-bomb", "batch manifest", "YAML bomb")
def _batch_bomb(ws: Workspace) -> Invocation:
    """A billion-laughs YAML manifest."""
    return ws.batch(ws.text("cases.yaml", billion_laughs() + "cases: *a8\n"))


@case("batch-manifest-recursive-alias", "batch manifest", "refers to itself")
def _batch_recursive(ws: Workspace) -> Invocation:
    """A YAML manifest whose list contains itself (``&a [*a]``)."""
    return ws.batch(ws.text("cases.yaml", "cases: &a [*a]\n"))


@case("batch-manifest-deep-nesting", "batch manifest", "nested too deeply")
def _batch_deep(ws: Workspace) -> Invocation:
    """A YAML manifest nested 600 levels deep (PyYAML's parser recurses)."""
    return ws.batch(ws.text("cases.yaml", "[" * 600 + "]" * 600 + "\n"))


@case("batch-manifest-not-utf8", "batch manifest", "not UTF-8 text")
def _batch_not_utf8(ws: Workspace) -> Invocation:
    """A CSV manifest with Latin-1 bytes."""
    return ws.batch(ws.raw("cases.csv", "segmentation\nd\xe9j\xe0.nii.gz\n".encode("latin-1")))


@case("batch-manifest-python-tag", "batch manifest", "could not determine a constructor")
def _batch_python_tag(ws: Workspace) -> Invocation:
    """A YAML manifest with a ``!!python/object/apply`` tag (code execution under ``yaml.load``)."""
    marker = ws.root / "pwned"
    text = f"- segmentation: !!python/object/apply:os.system ['touch {marker}']\n"
    return ws.batch(ws.text("cases.yaml", text))


# -------------------------------------------------------------------------------------------- label maps


@case("label-map-negative-value", "label map", "label values must be >= 0, got -3")
def _lm_negative(ws: Workspace) -> Invocation:
    """A class mapped to the value -3."""
    ws.training_data()
    ws.text("labels.yaml", "name: bad\nclasses:\n  ball: -3\n  box: 2\n")
    return ws.train(names="labels.yaml")


@case("label-map-value-twice", "label map", "label value 2 is mapped to both 'ball' and 'box'")
def _lm_twice(ws: Workspace) -> Invocation:
    """One source value mapped to two classes."""
    ws.training_data()
    ws.text("labels.yaml", "name: bad\nclasses:\n  ball: [1, 2]\n  box: 2\n")
    return ws.train(names="labels.yaml")


@case("label-map-float-value", "label map", "label values must be an integer")
def _lm_float(ws: Workspace) -> Invocation:
    """A class mapped to 1.5."""
    ws.training_data()
    ws.text("labels.yaml", "name: bad\nclasses:\n  ball: 1.5\n  box: 2\n")
    return ws.train(names="labels.yaml")


@case("label-map-path-in-class-name", "label map", "must be letters, digits, '_' or '-'")
def _lm_name(ws: Workspace) -> Invocation:
    """A class named ``../../x`` (class names end up in file and folder names)."""
    ws.training_data()
    ws.text("labels.yaml", "name: bad\nclasses:\n  ../../x: 1\n  box: 2\n")
    return ws.train(names="labels.yaml")


@case("label-map-yaml-bomb", "label map", "YAML bomb")
def _lm_bomb(ws: Workspace) -> Invocation:
    """A label map that is a billion-laughs bomb."""
    ws.training_data()
    ws.text("labels.yaml", billion_laughs() + "classes: {ball: *a8}\n")
    return ws.train(names="labels.yaml")


# ----------------------------------------------------------------------------------------------- configs


@case("config-yaml-bomb", "config", "YAML bomb")
def _cfg_bomb(ws: Workspace) -> Invocation:
    """A training config that is a billion-laughs bomb."""
    return ws.train(config=ws.text("bomb.yaml", billion_laughs() + "training: *a8\n"))


@case("config-python-tag", "config", "could not determine a constructor")
def _cfg_python_tag(ws: Workspace) -> Invocation:
    """A config with ``!!python/object/apply:os.system`` (runs code under ``yaml.load``/``unsafe_load``)."""
    marker = ws.root / "pwned"
    text = f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    return ws.train(config=ws.text("evil.yaml", text))


@case("config-binary", "config", "not UTF-8 text")
def _cfg_binary(ws: Workspace) -> Invocation:
    """Random bytes named .yaml."""
    return ws.train(config=ws.raw("noise.yaml", bytes(range(256)) * 4))


@case("config-too-large", "config", "larger than 16 MiB")
def _cfg_large(ws: Workspace) -> Invocation:
    """A 17 MiB config (sparse file)."""
    path = ws.root / "large.yaml"
    with path.open("wb") as f:
        f.truncate(17 * 2**20)
    return ws.train(config=path)


@case("config-deep-nesting", "config", "nested too deeply")
def _cfg_deep(ws: Workspace) -> Invocation:
    """A config nested 600 levels deep."""
    return ws.train(config=ws.text("deep.yaml", "output_dir: " + "[" * 600 + "]" * 600 + "\n"))


@case("config-not-a-mapping", "config", "expected a mapping of keys, got list")
def _cfg_list(ws: Workspace) -> Invocation:
    """A config that is a list."""
    return ws.train(config=ws.text("list.yaml", "- output_dir: run\n"))


# ------------------------------------------------------------------------------------------------ models


@case("model-pickle-bin", "model", "holds pickle weights (unet/diffusion_pytorch_model.bin)")
def _model_bin(ws: Workspace) -> Invocation:
    """A model folder with a pickle ``.bin`` next to the safetensors weights."""
    model = ws.model_copy()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04\x95cos\nsystem\n")
    return ws.generate(ws.good_segmentation(), model=model, names="model")


@case("model-pickle-pt", "model", "holds pickle weights (extra.pt)")
def _model_pt(ws: Workspace) -> Invocation:
    """A model folder with a pickle ``.pt`` file."""
    model = ws.model_copy()
    (model / "extra.pt").write_bytes(b"PK\x03\x04 pickle inside")
    return ws.generate(ws.good_segmentation(), model=model, names="model")


@case("model-metadata-disagrees", "model", "needs a UNet with 13 input channels, but unet/ has 10")
def _model_disagrees(ws: Workspace) -> Invocation:
    """volgen.json names 4 foreground classes; the UNet was built for 3."""
    model = ws.model_copy()
    meta = json.loads((model / "volgen.json").read_text())
    meta["label_map"]["classes"]["lung"] = [9]
    (model / "volgen.json").write_text(json.dumps(meta))
    return ws.generate(ws.good_segmentation(), model=model, names="model")


@case("model-metadata-deep-json", "model", "nested too deeply")
def _model_deep(ws: Workspace) -> Invocation:
    """volgen.json nested 100000 levels deep (Python's JSON parser recurses)."""
    model = ws.model_copy()
    (model / "volgen.json").write_text("[" * 100_000 + "]" * 100_000)
    return ws.generate(ws.good_segmentation(), model=model, names="volgen.json")


@case("model-no-metadata", "model", "not a volgen model folder (no volgen.json)")
def _model_no_meta(ws: Workspace) -> Invocation:
    """A diffusers folder without volgen.json."""
    model = ws.model_copy()
    (model / "volgen.json").unlink()
    return ws.generate(ws.good_segmentation(), model=model, names="model")


@case("model-truncated-weights", "model", "cannot load the UNet or scheduler")
def _model_truncated(ws: Workspace) -> Invocation:
    """A safetensors file cut short."""
    model = ws.model_copy()
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return ws.generate(ws.good_segmentation(), model=model, names="model")


@case(
    "model-huge-schedule", "model", "num_train_timesteps must be an integer in 1..100000, got 1000000000000"
)
def _model_schedule(ws: Workspace) -> Invocation:
    """A scheduler config asking for 10^12 training timesteps (terabytes of betas)."""
    model = ws.model_copy()
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["num_train_timesteps"] = 10**12
    path.write_text(json.dumps(config))
    return ws.generate(ws.good_segmentation(), model=model, names="scheduler/scheduler_config.json")


# ------------------------------------------------------------------------ headers and geometry (issue 16)


def _nifti_patch(data: bytes, offset: int, fmt: str, *values: float) -> bytes:
    """A NIfTI-1 file with ``values`` packed (little endian ``fmt``) at byte ``offset`` of its header."""
    header = bytearray(data)
    size = struct.calcsize("<" + fmt)
    header[offset : offset + size] = struct.pack("<" + fmt, *values)
    return bytes(header)


@case("seg-nifti-offset-nan", "segmentation", "NIfTI data offset (vox_offset) is nan")
def _offset_nan(ws: Workspace) -> Invocation:
    """A .nii whose vox_offset (a float in NIfTI-1) is NaN."""
    return ws.generate(ws.raw("seg.nii", _nifti_patch(nifti_bytes(), 108, "f", float("nan"))))


@case("info-nifti-offset-inf", "segmentation", "NIfTI data offset (vox_offset) is inf")
def _offset_inf_info(ws: Workspace) -> Invocation:
    """`volgen info` of a .nii whose vox_offset is +Inf."""
    path = ws.raw("seg.nii", _nifti_patch(nifti_bytes(), 108, "f", float("inf")))
    return Invocation(["info", str(path)], path.name)


@case("seg-nifti-bitpix", "segmentation", "bitpix 16 but datatype 2 has 8 bits per voxel")
def _bitpix(ws: Workspace) -> Invocation:
    """A uint8 .nii whose bitpix says 16 (ITK would read the missing half as zeros)."""
    return ws.generate(ws.raw("seg.nii", _nifti_patch(nifti_bytes(), 72, "h", 16)))


@case("seg-nifti-sheared", "segmentation", "NIfTI sform axes are not orthogonal")
def _sheared_nifti(ws: Workspace) -> Invocation:
    """A .nii whose sform shears its grid (ITK would straighten it silently)."""
    data = _nifti_patch(nifti_bytes(), 254, "h", 1)  # sform_code: scanner
    data = _nifti_patch(data, 280, "12f", 0.7, 0.6, 0, 10, 0, 0.9, 0, 20, 0, 0, 2.5, 30)
    return ws.generate(ws.raw("seg.nii", data))


@case("seg-nrrd-sheared", "segmentation", "direction matrix is not orthonormal")
def _sheared_nrrd(ws: Workspace) -> Invocation:
    """An .nrrd whose space directions are not orthogonal."""
    header = (
        "NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 5 6\n"
        "space directions: (1,0,0) (0.5,1,0) (0,0,2)\nencoding: raw\nspace origin: (0,0,0)\n\n"
    )
    return ws.generate(ws.raw("seg.nrrd", header.encode() + bytes(4 * 5 * 6)))


@case("seg-one-voxel", "segmentation", "expected a 3D volume")
def _one_voxel(ws: Workspace) -> Invocation:
    """A 1x1x1 segmentation (refused before any generation)."""
    return ws.generate(ws.write(sitk.Image([1, 1, 1], sitk.sitkUInt8), "seg.nii.gz"))


@case("seg-one-slice", "segmentation", "expected a 3D volume")
def _one_slice(ws: Workspace) -> Invocation:
    """A 16x16x1 segmentation (one slice; refused before any generation)."""
    return ws.generate(ws.write(sitk.Image([16, 16, 1], sitk.sitkUInt8), "seg.nrrd"))


@case("seg-layered-undeclared-value", "segmentation", "holds value 7 that no segment declares")
def _layered_undeclared(ws: Workspace) -> Invocation:
    """A layered Slicer .seg.nrrd with a voxel value no segment declares."""
    labels = sitk.GetArrayFromImage(make_volume("label"))
    layers = [np.where(labels == 1, 1, 0).astype(np.uint8), np.where(labels >= 2, 7, 0).astype(np.uint8)]
    image = sitk.Compose([sitk.GetImageFromArray(layer) for layer in layers])
    for i, (name, value, layer) in enumerate([("a", 1, 0), ("b", 2, 1)]):
        image.SetMetaData(f"Segment{i}_ID", f"Segment_{i + 1}")
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", str(layer))
    path = ws.root / "layers.seg.nrrd"
    sitk.WriteImage(image, str(path), True)
    return ws.generate(path)


@case("seg-fifo", "segmentation", "is a named pipe (FIFO), not a regular file")
def _fifo(ws: Workspace) -> Invocation:
    """A named pipe called seg.nii.gz (reading it would block forever)."""
    os.mkfifo(ws.root / "seg.nii.gz")
    return ws.generate(ws.root / "seg.nii.gz")


@case("seg-nrrd-fifo-data-file", "segmentation", "is a named pipe (FIFO)")
def _nrrd_fifo(ws: Workspace) -> Invocation:
    """A detached .nrrd header whose data file is a named pipe."""
    os.mkfifo(ws.root / "seg.raw")
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: seg.raw\n"
    return ws.generate(ws.raw("seg.nrrd", header.encode()), names="seg.raw")


@case("seg-mha-missing-data-file", "segmentation", "the data file the .mha names is missing (gone.raw)")
def _mha_missing(ws: Workspace) -> Invocation:
    """A MetaImage header naming a data file that does not exist (MetaIO would print its own line)."""
    header = "ObjectType = Image\nNDims = 3\nDimSize = 4 5 6\nElementType = MET_UCHAR\n"
    header += "ElementDataFile = gone.raw\n"
    return ws.generate(ws.raw("seg.mha", header.encode()))


@case("seg-newline-in-name", "segmentation", "corrupt gzip data")
def _newline_name(ws: Workspace) -> Invocation:
    """A corrupt file whose name holds a newline and a forged error line, and a terminal escape sequence."""
    path = ws.raw("seg\nerror: all good\x1b[2J.nii.gz", b"\x1f\x8bnot really")
    return ws.generate(path, names="seg\\nerror: all good\\x1b[2J.nii.gz")


@case("dicom-nan-position", "dicom", "ImagePositionPatient/ImageOrientationPatient hold NaN/Inf")
def _dicom_nan(ws: Workspace) -> Invocation:
    """A series whose third slice has ImagePositionPatient (nan, 0, 0)."""
    import pydicom

    files = dicom_series(ws.root / "series")
    ds = pydicom.dcmread(files[3])
    ds["ImagePositionPatient"].value = ["nan", "0", "0"]
    ds.save_as(files[3])
    return ws.generate(ws.root / "series", names="series")


@case("dicom-non-orthogonal", "dicom", "ImageOrientationPatient is not two orthogonal unit vectors")
def _dicom_skew(ws: Workspace) -> Invocation:
    """A series whose row and column directions are 60 degrees apart (ITK would straighten them)."""
    import pydicom

    for path in dicom_series(ws.root / "series"):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0.5, 0.8660254, 0]
        ds.save_as(path)
    return ws.generate(ws.root / "series", names="series")


@case("dicom-fifo-in-folder", "dicom", "is a named pipe (FIFO)")
def _dicom_fifo(ws: Workspace) -> Invocation:
    """A series folder that also holds a named pipe (GDCM would block opening it)."""
    dicom_series(ws.root / "series")
    os.mkfifo(ws.root / "series" / "IM9999.dcm")
    return ws.generate(ws.root / "series", names="IM9999.dcm")


@case("ref-absurd-values", "reference", "holds values beyond +-1e+09")
def _ref_absurd(ws: Workspace) -> Invocation:
    """A reference with voxels of +-3e38 (a damaged float file)."""
    values = sitk.GetArrayFromImage(make_volume("image"))
    values[1, 1, 1], values[2, 2, 2] = 3e38, -3e38
    return ws.reference(ws.write(_labels(values), "ref.nii.gz"))


@case("model-nan-weights", "model", "the UNet weights hold NaN/Inf")
def _model_nan(ws: Workspace) -> Invocation:
    """A model whose safetensors weights hold a NaN (it would write an all-zero volume)."""
    from safetensors.numpy import load_file, save_file

    model = ws.model_copy()
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(k for k, v in tensors.items() if v.dtype.kind == "f")[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    save_file(tensors, str(weights))
    return ws.generate(ws.good_segmentation(), model=model, names="model")


def _scheduler_config(ws: Workspace, **changes: object) -> Path:
    model = ws.model_copy()
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return model


@case("model-one-timestep", "model", "num_train_timesteps must be an integer >= 2, got 1")
def _model_one_step(ws: Workspace) -> Invocation:
    """A scheduler config with a single training timestep."""
    model = _scheduler_config(ws, num_train_timesteps=1)
    return ws.generate(ws.good_segmentation(), model=model, names="scheduler_config.json")


@case("model-nan-beta", "model", "beta_end must be a finite number in (0, 1), got nan")
def _model_nan_beta(ws: Workspace) -> Invocation:
    """A scheduler config whose beta_end is NaN (JSON's NaN)."""
    model = _scheduler_config(ws, beta_end=float("nan"))
    return ws.generate(ws.good_segmentation(), model=model, names="scheduler_config.json")


@case("model-fifo-config", "model", "is a named pipe (FIFO)")
def _model_fifo(ws: Workspace) -> Invocation:
    """A model whose scheduler_config.json is a named pipe (reading it would block forever)."""
    model = ws.model_copy()
    path = model / "scheduler" / "scheduler_config.json"
    path.unlink()
    os.mkfifo(path)
    return ws.generate(ws.good_segmentation(), model=model, names="scheduler_config.json")


@case("batch-manifest-nul-in-path", "batch manifest", "holds a NUL byte; not a file name")
def _batch_nul(ws: Workspace) -> Invocation:
    """A CSV manifest whose segmentation cell holds a NUL byte (os.stat raises ValueError on it)."""
    return ws.batch(ws.text("cases.csv", "segmentation\nseg\x00.nii.gz\n"))


@case("batch-manifest-case-named-manifest", "batch manifest", "would be the run's manifest")
def _batch_case_manifest(ws: Workspace) -> Invocation:
    """A case id `manifest.csv` with `--format dicom` (its output folder would be OUT_DIR/manifest.csv)."""
    seg = ws.good_segmentation()
    invocation = ws.batch(
        ws.text("cases.csv", f"segmentation,case\n{seg},manifest.csv\n"), names="manifest.csv"
    )
    invocation.args += ["--format", "dicom"]
    return invocation


@case(
    "batch-manifest-seed-overflow",
    "batch manifest",
    "case 'a': seed 9223372036854775807 gives sample 1 (--samples-per-case 2) the seed 9223372036854775808",
)
def _batch_seed_overflow(ws: Workspace) -> Invocation:
    """A manifest seed of 2**63-1 with `--samples-per-case 2` (sample 1 would need 2**63; `--seed` is not
    given and must not be blamed)."""
    seg = ws.good_segmentation()
    invocation = ws.batch(ws.text("cases.csv", f"segmentation,case,seed\n{seg},a,{2**63 - 1}\n"))
    invocation.args += ["--samples-per-case", "2"]
    return invocation


# -------------------------------------------------------------------------------- batch options (issue 16)


def _batch_with(ws: Workspace, *extra: str, names: str) -> Invocation:
    folder = ws.root / "cases"
    folder.mkdir(exist_ok=True)
    io.write_volume(make_volume("label"), folder / "a.nii.gz", overwrite=True)
    invocation = ws.batch(folder, names=names)
    invocation.args += list(extra)
    return invocation


@case("batch-samples-per-case-huge", "batch options", "--samples-per-case must be in 1..10000")
def _batch_samples(ws: Workspace) -> Invocation:
    """--samples-per-case 1000000000 (planning it would take gigabytes)."""
    return _batch_with(ws, "--samples-per-case", "1000000000", names="--samples-per-case")


@case(
    "batch-steps-beyond-schedule",
    "batch options",
    "--steps must be at most the model's 1000 training timesteps",
)
def _batch_steps(ws: Workspace) -> Invocation:
    """--steps 5000 with a model trained on 1000 timesteps."""
    invocation = _batch_with(ws, names="got 5000")
    invocation.args[invocation.args.index("--steps") + 1] = "5000"
    return invocation


@case("batch-seed-huge", "batch options", "--seed must be an integer in 0..9223372036854775807")
def _batch_seed(ws: Workspace) -> Invocation:
    """--seed 2**70 (torch generators take 64-bit seeds)."""
    return _batch_with(ws, "--seed", str(2**70), names="--seed")


@case("batch-max-memory-inf", "batch options", "--max-memory must be a positive size such as 8G or 512M")
def _batch_memory(ws: Workspace) -> Invocation:
    """--max-memory inf."""
    return _batch_with(ws, "--max-memory", "inf", names="'inf'")


@case("batch-out-dir-links-to-input", "batch options", "is the input folder")
def _batch_link(ws: Workspace) -> Invocation:
    """OUT_DIR is a symbolic link to the input folder (it would replace every input)."""
    invocation = _batch_with(ws, names="out_link")
    link = ws.root / "out_link"
    link.symlink_to(ws.root / "cases")
    invocation.args[2] = str(link)
    invocation.untouched = []
    return invocation


# ------------------------------------------------------------------------------------- outputs (issue 16)


@case("out-is-the-input", "output", "the output is the input")
def _out_input(ws: Workspace) -> Invocation:
    """`-o` names the input itself, with --overwrite."""
    seg = ws.good_segmentation()
    invocation = ws.generate(seg, "--overwrite")
    invocation.args[3] = str(seg)
    return invocation


@case("out-dicom-folder-holds-the-input", "output", "the output contains the input")
def _out_dicom_contains(ws: Workspace) -> Invocation:
    """`-o data --format dicom --overwrite` where data/ holds the input (it would delete data/)."""
    (ws.root / "data").mkdir()
    seg = ws.good_segmentation("data/seg.nii.gz")
    invocation = ws.generate(seg, "--format", "dicom", "--overwrite", names="data")
    invocation.args[3] = str(ws.root / "data")
    return invocation


@case("out-sidecar-in-model-folder", "output", "lies inside the model folder")
def _out_model(ws: Workspace) -> Invocation:
    """`-o model/volgen.nii`: its sidecar model/volgen.json would replace the model's metadata."""
    model = ws.model_copy()
    invocation = ws.generate(ws.good_segmentation(), "--overwrite", model=model, names="volgen")
    invocation.args[3] = str(model / "volgen.nii")
    return invocation


@case("out-name-too-long", "output", "file name too long")
def _out_long(ws: Workspace) -> Invocation:
    """A DICOM output folder whose name (240 bytes) leaves no room for volgen's temporary name."""
    name = "d" * 240
    invocation = ws.generate(ws.good_segmentation(), "--format", "dicom", names=name)
    invocation.args[3] = str(ws.out / name)
    return invocation
