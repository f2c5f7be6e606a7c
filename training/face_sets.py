"""Pre-cropped labelled face sets: FER+ (FER2013 with crowd votes) and CK+ (48×48).

Both sets are 48×48 grey faces framed like the runtime's centred emotion crop, so their
pixels are only resized to the model's input size (no detection). Each reader returns an
:class:`training.emotion_data.EmotionSet`; FER+ adds a soft target per face.

**FER+ vocabulary.** Each face has ten crowd votes over ``neutral, happiness, surprise,
sadness, anger, disgust, fear, contempt, unknown, NF`` and FER2013's original label.

* The seven emotions map onto the product's classes (``happiness`` → happy, ``sadness`` →
  sad, ``anger`` → angry).
* ``contempt`` has no product class. Its votes are left out of the soft target; a face whose
  FER+ majority is contempt is left out and counted (FER+ Training has 120 such faces).
* ``unknown`` (the crowd could not agree) and ``NF`` (not a face) faces are left out and
  counted, as the FER+ authors do; their stray votes on other faces are ignored.
* The soft target is the share of each class among the seven emotions' votes, blended with
  FER2013's own label: ``(1 − w) · votes + w · one-hot(fer2013)``. FER2013's label has ten
  times more fear and disgust than the FER+ majority; the blend keeps those classes alive.
* The hard label (for metrics) is the FER+ majority (the FER+ rule: single votes dropped,
  the winner needs more than half).

**Evaluation rows.** PublicTest faces that are pixel-identical to a Training face
(``test_image_also_in_training``) are dropped from the test split, so a memorised training
face never counts as a correct answer.

**CK+** has no neutral class; ``contempt`` is left out and counted. Its subjects split it.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from kernel.types import EMOTION_LABELS
from training.emotion_data import (
    DEFAULT_FER2013_WEIGHT,
    EmotionSet,
    FaceHandling,
    label_index,
    list_photo_samples,
    read_fer2013_csv,
    read_photos,
    resize_square,
)
from training.run import TrainingError

if TYPE_CHECKING:
    from kernel.settings import Settings

FERPLUS_EMOTION_VOTES: dict[str, str] = {
    "neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
    "anger": "angry", "disgust": "disgust", "fear": "fear",
}
"""FER+ vote column → product emotion class."""

FERPLUS_LEFT_OUT_MAJORITIES: dict[str, str] = {
    "contempt": "contempt (no product class)", "unknown": "unknown (crowd disagreed)", "NF": "not a face",
}
"""FER+ majority labels whose faces are left out, with the reason that is counted."""

FERPLUS_USAGE_SPLITS: dict[str, str] = {"Training": "train", "PublicTest": "test", "PrivateTest": "heldout"}
"""FER+ usage → split. PublicTest is the test split: model selection uses a slice of Training."""



def is_ferplus_folder(path: Path) -> bool:
    """Whether ``path`` is a folder whose ``labels.csv`` has the FER+ vote columns."""
    return labels_header(path) >= {"path", "usage", "ferplus_majority", *FERPLUS_EMOTION_VOTES}


def is_ckplus_folder(path: Path) -> bool:
    """Whether ``path`` is a folder whose ``labels.csv`` has CK+'s ``path, label, subject`` columns."""
    header = labels_header(path)
    return header >= {"path", "label", "subject"} and "usage" not in header


def labels_header(path: Path) -> set[str]:
    """The column names of a folder's ``labels.csv`` (spaces stripped); empty when it has none."""
    table = path / "labels.csv"
    if not table.is_file():
        return set()
    with table.open(newline="") as stream:
        return {name.strip() for name in next(csv.reader(stream), [])}


def _read_grey(path: Path, size: int) -> npt.NDArray[np.float32] | None:
    """A face image as grey 0–255 float32 at ``size``×``size``; None when it cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        return None
    return resize_square(np.asarray(image, np.uint8), size).astype(np.float32)


@dataclass(frozen=True)
class _FerPlusRow:
    path: Path
    split: str
    target: npt.NDArray[np.float32]
    label: int
    identity: str


def _ferplus_rows(folder: Path, fer2013_weight: float, splits: tuple[str, ...],
                  dropped: Counter[str]) -> list[_FerPlusRow]:
    table = folder / "labels.csv"
    rows: list[_FerPlusRow] = []
    with table.open(newline="") as stream:
        for number, row in enumerate(csv.DictReader(stream), start=2):
            split = FERPLUS_USAGE_SPLITS.get(row["usage"].strip())
            if split is None:
                dropped[f"unknown usage {row['usage'].strip()}"] += 1
                continue
            if split not in splits:
                continue
            majority = row["ferplus_majority"].strip()
            if majority in FERPLUS_LEFT_OUT_MAJORITIES:
                dropped[FERPLUS_LEFT_OUT_MAJORITIES[majority]] += 1
                continue
            try:
                votes = np.zeros(len(EMOTION_LABELS), np.float32)
                for column, product_class in FERPLUS_EMOTION_VOTES.items():
                    votes[EMOTION_LABELS.index(product_class)] = float(row[column])
                label = label_index(majority)
                original = label_index(row["fer2013_label"])
            except (ValueError, TrainingError) as exc:
                raise TrainingError(f"{table}, line {number}: {exc}") from None
            if label is None or votes.sum() <= 0:
                dropped["no emotion votes"] += 1
                continue
            if split == "test" and row.get("test_image_also_in_training", "0").strip() == "1":
                dropped["test face also in training"] += 1
                continue
            target = votes / votes.sum()
            if original is not None and fer2013_weight > 0:
                target = (1.0 - fer2013_weight) * target
                target[original] += fer2013_weight
            rows.append(_FerPlusRow(path=folder / row["path"], split=split, target=target.astype(np.float32),
                                    label=label, identity=row.get("pixel_md5", "") or row["path"]))
    return rows


def read_ferplus(folder: Path, size: int, *, fer2013_weight: float = DEFAULT_FER2013_WEIGHT,
                 splits: tuple[str, ...] = ("train", "test"), progress: bool = False) -> EmotionSet:
    """FER+ faces of ``splits`` at ``size``×``size`` with soft targets (see the module docstring).

    The subject of each face is its pixel hash, so exact copies inside Training stay in one
    split when a validation slice is carved out of it.
    """
    from training.loop import progress_bar

    if not 0.0 <= fer2013_weight <= 1.0:
        raise TrainingError(f"the FER2013 label weight must be within 0–1, got {fer2013_weight}")
    dropped: Counter[str] = Counter()
    rows = _ferplus_rows(folder, fer2013_weight, splits, dropped)
    inputs, kept = [], []
    for row in progress_bar(rows, "FER+ faces", enabled=progress):
        image = _read_grey(row.path, size)
        if image is None:
            dropped["unreadable image"] += 1
            continue
        inputs.append(image)
        kept.append(row)
    if not kept:
        raise TrainingError(f"{folder}: no usable FER+ face in the splits {', '.join(splits)}")
    return EmotionSet(
        inputs=np.stack(inputs)[:, np.newaxis], labels=np.array([row.label for row in kept], np.int64),
        subjects=[row.identity for row in kept],
        sources=[f"ferplus:{row.identity}:{row.path.name}" for row in kept],
        splits=[row.split for row in kept], dropped=dropped,
        targets=np.stack([row.target for row in kept]),
        description=f"FER+ {folder.name} ({', '.join(splits)}; FER2013 label weight {fer2013_weight:g})",
    )


def read_ckplus(folder: Path, size: int) -> EmotionSet:
    """CK+ faces at ``size``×``size``; contempt is left out and counted; subjects from the table."""
    table = folder / "labels.csv"
    dropped: Counter[str] = Counter()
    inputs, labels, subjects, sources = [], [], [], []
    with table.open(newline="") as stream:
        for row in csv.DictReader(stream):
            try:
                label = label_index(row["label"])
            except TrainingError:
                dropped[f"unknown label {row['label'].strip()}"] += 1
                continue
            if label is None:
                dropped[row["label"].strip().lower()] += 1
                continue
            image = _read_grey(folder / row["path"], size)
            if image is None:
                dropped["unreadable image"] += 1
                continue
            inputs.append(image)
            labels.append(label)
            subjects.append(f"ckplus:{row['subject'].strip()}")
            sources.append(f"ckplus:{row['path']}")
    if not labels:
        raise TrainingError(f"{folder}: no usable CK+ face ({dict(dropped)})")
    return EmotionSet(
        inputs=np.stack(inputs)[:, np.newaxis], labels=np.array(labels, np.int64), subjects=subjects,
        sources=sources, dropped=dropped, description=f"CK+ {folder.name}",
    )


def load_emotion_data(
    path: Path,
    size: int,
    *,
    faces: FaceHandling = "detect",
    settings: Settings | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
    fer2013_weight: float = DEFAULT_FER2013_WEIGHT,
) -> EmotionSet:
    """Read any supported emotion data set.

    A FER2013 CSV, a FER+ or CK+ folder (this module), a ``labels.csv``
    folder of photos, or class folders. ``fer2013_weight`` is the weight of FER2013's own
    label in FER+ soft targets.
    """
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_fer2013_csv(path, size)
    if is_ferplus_folder(path):
        return read_ferplus(path, size, fer2013_weight=fer2013_weight, progress=progress)
    if is_ckplus_folder(path):
        return read_ckplus(path, size)
    if not path.is_dir():
        raise TrainingError(f"{path}: expected a FER2013 CSV, a folder with labels.csv, or a folder per class")
    samples, kind = list_photo_samples(path)
    return read_photos(samples, size, faces=faces, settings=settings, cache_dir=cache_dir,
                       description=f"{kind} {path}", progress=progress)
