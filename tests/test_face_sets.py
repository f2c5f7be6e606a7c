"""FER+, CK+ and engagement image folders: label mapping, what is left out, splits, and bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from kernel.types import EMOTION_LABELS
from tests.conftest import DATA_DIR, require
from training.run import TrainingError


def _require_data(name: str) -> Path:
    folder = DATA_DIR / name
    require((folder / "labels.csv").is_file(), f"needs the labelled data set {folder}")
    return folder


def _write_table(folder: Path, header: list[str], rows: list[list[object]]) -> None:
    with (folder / "labels.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def test_ferplus_maps_votes_to_the_products_classes_and_leaves_out_what_has_none() -> None:
    from training.face_sets import read_ferplus

    folder = _require_data("ferplus")
    data = read_ferplus(folder, 48, fer2013_weight=0.0)
    assert data.targets is not None
    assert np.allclose(data.targets.sum(axis=1), 1.0, atol=1e-5)
    # With no weight on FER2013's label, the soft target is the vote share and its argmax the FER+ majority.
    agrees = (data.targets.argmax(axis=1) == data.labels).mean()
    assert agrees > 0.99
    for reason in ("unknown (crowd disagreed)", "contempt (no product class)", "test face also in training"):
        assert data.dropped[reason] > 0, reason
    assert set(data.splits) == {"train", "test"}
    with (folder / "labels.csv").open(newline="") as stream:
        duplicated = {row["path"] for row in csv.DictReader(stream) if row["test_image_also_in_training"] == "1"}
    assert not duplicated & {source.rsplit(":", 1)[-1] for source in data.sources if "FER2013Valid" in source}
    assert data.inputs.shape[1:] == (1, 48, 48) and data.inputs.max() <= 255


def test_the_fer2013_label_weight_moves_mass_to_the_original_label() -> None:
    from training.face_sets import read_ferplus

    folder = _require_data("ferplus")
    plain = read_ferplus(folder, 48, fer2013_weight=0.0, splits=("test",))
    blended = read_ferplus(folder, 48, fer2013_weight=0.5, splits=("test",))
    assert plain.targets is not None and blended.targets is not None
    fear = EMOTION_LABELS.index("fear")
    assert blended.targets[:, fear].sum() > plain.targets[:, fear].sum()
    assert plain.fingerprint() != blended.fingerprint()


def test_ckplus_is_split_by_subject_with_contempt_left_out() -> None:
    from training.emotion_data import concatenate_sets, split_by_subject
    from training.face_sets import read_ckplus

    data = read_ckplus(_require_data("ckplus48"), 48)
    assert data.dropped["contempt"] > 0
    assert "neutral" not in {EMOTION_LABELS[i] for i in data.labels.tolist()}
    splits = split_by_subject(data, val_fraction=0.15, test_fraction=0.15, seed=0)
    subjects = {name: {data.subjects[i] for i in index.tolist()} for name, index in splits.items()}
    assert not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["val"]
    combined = concatenate_sets([data, data.subset(np.arange(10))], seed=0)
    assert len(combined) == len(data) + 10 and set(combined.splits) <= {"train", "val", "test"}


def test_a_training_split_without_validation_gets_a_validation_slice_of_training_not_of_test() -> None:
    from training.emotion_data import EmotionSet, split_by_subject

    data = EmotionSet(inputs=np.zeros((100, 1, 4, 4), np.float32), labels=np.zeros(100, np.int64),
                      subjects=[f"s{i // 2}" for i in range(100)], sources=[str(i) for i in range(100)],
                      splits=["train"] * 80 + ["test"] * 20)
    splits = split_by_subject(data, val_fraction=0.25, test_fraction=0.0, seed=0)
    assert splits["test"].tolist() == list(range(80, 100))
    assert 16 <= len(splits["val"]) <= 24 and set(splits["val"].tolist()) <= set(range(80))
    val_subjects = {data.subjects[i] for i in splits["val"].tolist()}
    assert not val_subjects & {data.subjects[i] for i in splits["train"].tolist()}


@pytest.mark.media
def test_engagement_images_are_read_through_the_runtime_with_bad_rows_counted(tmp_path: Path,
                                                                               default_models: Path) -> None:
    from kernel.settings import Settings
    from training.engagement_images import labelled_rows_fingerprint, read_engagement_images

    source = _require_data("daisee_frames")
    with (source / "labels.csv").open(newline="") as stream:
        rows = [row for row in csv.DictReader(stream)][:: 700]
    folder = tmp_path / "frames"
    folder.mkdir()
    table = []
    for index, row in enumerate(rows):
        (folder / f"{index}.jpg").symlink_to(source / row["path"])
        table.append([f"{index}.jpg", row["split"], row["engagement"]])
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    table += [["broken.jpg", "Train", 2], ["0.jpg", "Train", 7], ["0.jpg", "Somewhere", 1]]
    _write_table(folder, ["path", "split", "engagement"], table)
    settings = Settings(model_cache_dir=default_models, execution_provider="cpu")
    data = read_engagement_images(folder, settings=settings, cache_dir=tmp_path / "cache")
    assert data.dropped["unreadable image"] == 1
    assert data.dropped["engagement label '7' outside 0-3"] == 1
    assert data.dropped["unknown split 'Somewhere'"] == 1
    assert len(data) + data.dropped["no face found"] == len(rows)
    assert data.crops.shape[1:] == (112, 112, 3) and data.crops.dtype == np.uint8
    assert set(data.splits) <= {"train", "test"}
    # The keypoint cache holds numbers only, and a second read uses it.
    cached = next((tmp_path / "cache").glob("keypoints-*.json")).read_text()
    assert "jpg" in cached and len(cached) < 1000 * len(rows)  # a crop alone would be 37 kB
    again = read_engagement_images(folder, settings=settings, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.crops, data.crops)
    assert labelled_rows_fingerprint([folder]) == data.rows_fingerprint


def test_an_engagement_folder_without_usable_rows_is_one_clear_error(tmp_path: Path) -> None:
    from kernel.settings import Settings
    from training.engagement_images import read_engagement_images

    _write_table(tmp_path, ["path", "engagement"], [["a.jpg", "high"]])
    with pytest.raises(TrainingError, match="no usable row"):
        read_engagement_images(tmp_path, settings=Settings())
    _write_table(tmp_path, ["file", "mood"], [["a.jpg", "2"]])
    with pytest.raises(TrainingError, match="needs an image column"):
        read_engagement_images(tmp_path, settings=Settings())


def _tiny_ferplus(folder: Path) -> None:
    """A FER+-style folder: two good faces, a corrupt PNG, an unknown usage and an unknown-majority face."""
    import cv2

    (folder / "data").mkdir(parents=True)
    face = np.full((48, 48), 128, np.uint8)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / "data" / name), face)
    (folder / "data" / "broken.png").write_bytes(b"not a png")
    header = ["path", "usage", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
              "contempt", "unknown", "NF", "ferplus_majority", "fer2013_label", "pixel_md5", "n_exact_copies",
              "test_image_also_in_training"]
    votes = {"happy": [0, 8, 0, 0, 0, 0, 0, 0, 2, 0], "neutral": [9, 0, 0, 1, 0, 0, 0, 0, 0, 0]}
    rows = [
        ["data/a.png", "Training", *votes["happy"], "happiness", "happy", "m1", 1, 0],
        ["data/b.png", "PublicTest", *votes["neutral"], "neutral", "neutral", "m2", 1, 0],
        ["data/broken.png", "Training", *votes["happy"], "happiness", "happy", "m3", 1, 0],
        ["data/a.png", "Someday", *votes["happy"], "happiness", "happy", "m4", 1, 0],
        ["data/a.png", "Training", *votes["happy"], "unknown", "happy", "m5", 1, 0],
    ]
    _write_table(folder, header, rows)


def test_a_ferplus_folder_with_bad_rows_skips_and_counts_them(tmp_path: Path) -> None:
    from training.face_sets import read_ferplus

    _tiny_ferplus(tmp_path)
    data = read_ferplus(tmp_path, 48)
    assert len(data) == 2 and data.splits == ["train", "test"]
    assert data.dropped == {"unreadable image": 1, "unknown usage Someday": 1, "unknown (crowd disagreed)": 1}
    with pytest.raises(TrainingError, match="no usable FER\\+ face"):
        read_ferplus(tmp_path, 48, splits=("heldout",))


def test_evaluating_a_ferplus_split_that_is_not_there_is_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    _tiny_ferplus(tmp_path / "ferplus")
    result = subprocess.run([sys.executable, "-m", "classlens", "evaluate", "fer-mini-xception", "--data",
                             str(tmp_path / "ferplus"), "--split", "PrivateTest"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "PublicTest or Training" in result.stderr
