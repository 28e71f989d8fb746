"""nnU-Net v2 as the downstream segmenter (where it is installed; volgen does not install it).

For one condition and seed, in ``WORK`` (``OUT/nnunet/CONDITION/seed-S``), with ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` pointing inside it::

    WORK/raw/Dataset001_volgen/{imagesTr, labelsTr, imagesTs, dataset.json}   (volgen.batch.nnunet's layout)
    nnUNetv2_plan_and_preprocess -d 1 -c CONFIGURATION --verify_dataset_integrity
    nnUNetv2_train 1 CONFIGURATION all -tr nnUNetTrainer_<EPOCHS>epochs
    nnUNetv2_predict -i WORK/raw/Dataset001_volgen/imagesTs -o WORK/predictions -d 1 -c CONFIGURATION -f all \
        -tr nnUNetTrainer_<EPOCHS>epochs

Labels are written as the generator's class indices (``labelsTr``), images as they are (real) or as volgen
wrote them (synthetic). nnU-Net has no seed option: repetitions differ by their synthetic images and by
nnU-Net's own randomness.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from volgen.data import TrainingCase
from volgen.errors import VolgenError

logger = logging.getLogger(__name__)

COMMANDS = ("nnUNetv2_train", "nnUNetv2_plan_and_preprocess", "nnUNetv2_predict")
DATASET_ID = 1
DATASET = f"Dataset{DATASET_ID:03d}_volgen"
ENDING = ".nii.gz"


def check_nnunet() -> None:
    """Raise :class:`VolgenError` unless nnU-Net v2's commands are on the PATH."""
    for command in COMMANDS:
        if shutil.which(command) is None:
            raise VolgenError(
                f"--segmenter nnunet: {command} not found on the PATH; install nnU-Net v2 (pip install "
                "nnunetv2, best on a GPU machine) or use --segmenter volgen"
            )


def _run(argv: list[str], env: dict[str, str], log: Path) -> None:
    logger.info("running %s", " ".join(argv))
    with log.open("a", encoding="utf-8") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        try:
            done = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
        except OSError as e:
            raise VolgenError(f"{argv[0]} failed to run: {e}") from None
        out.write(done.stderr or "")
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        raise VolgenError(
            f"{argv[0]} exited with {done.returncode}: {lines[-1] if lines else '(no output)'} ({log})"
        )


def _write_pair(
    case: TrainingCase, label_map: Any, unknown: str, image_path: Path, label_path: Path | None
) -> None:
    from volgen.data import read_case
    from volgen.io import write_volume

    image, classes = read_case(case, label_map, unknown)
    classes.CopyInformation(image)  # nnU-Net wants identical geometry, not close
    write_volume(image, image_path, overwrite=True)
    if label_path is not None:
        write_volume(classes, label_path, overwrite=True)


def nnunet_scores(
    train: Sequence[TrainingCase],
    test: Sequence[TrainingCase],
    label_map: Any,
    work: Path,
    *,
    metadata: Any,
    configuration: str,
    epochs: int,
    seed: int,
    unknown_labels: str,
) -> dict[str, dict[int, float]]:
    """Train nnU-Net v2 on ``train`` and score it on ``test``: Dice per test case and foreground class."""
    import SimpleITK as sitk

    from volgen.batch.nnunet import nnunet_dataset_json
    from volgen.data import read_case
    from volgen.evaluation.metrics import dice_on_test
    from volgen.io import read_label

    check_nnunet()
    if work.exists():  # an unfinished earlier try: start clean
        shutil.rmtree(work)
    dataset = work / "raw" / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / sub).mkdir(parents=True)
    for case in train:
        _write_pair(
            case, label_map, unknown_labels,
            dataset / "imagesTr" / f"{case.case}_0000{ENDING}", dataset / "labelsTr" / f"{case.case}{ENDING}",
        )  # fmt: skip
    for case in test:
        _write_pair(case, label_map, unknown_labels, dataset / "imagesTs" / f"{case.case}_0000{ENDING}", None)
    import json

    description = nnunet_dataset_json(metadata, name=DATASET, file_ending=ENDING, num_training=len(train))
    (dataset / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(work / "results"),
    }
    trainer = f"nnUNetTrainer_{epochs}epochs"
    log = work / "nnunet.log"
    ident = str(DATASET_ID)
    _run(
        ["nnUNetv2_plan_and_preprocess", "-d", ident, "-c", configuration, "--verify_dataset_integrity"],
        env,
        log,
    )
    _run(["nnUNetv2_train", ident, configuration, "all", "-tr", trainer], env, log)
    predictions = work / "predictions"
    _run(
        ["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(predictions), "-d", ident,
         "-c", configuration, "-f", "all", "-tr", trainer],
        env, log,
    )  # fmt: skip
    scores = {}
    for case in test:
        path = predictions / f"{case.case}{ENDING}"
        if not path.is_file():
            raise VolgenError(f"nnUNetv2_predict wrote no prediction for {case.case} ({path})")
        _, classes = read_case(case, label_map, unknown_labels)
        predicted = sitk.GetArrayFromImage(read_label(path))
        scores[case.case] = dice_on_test(predicted, sitk.GetArrayFromImage(classes), label_map.num_classes)
    logger.info("nnU-Net seed %d: scored %d test case(s)", seed, len(scores))
    return scores
