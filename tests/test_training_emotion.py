"""Training core and the emotion side: metrics, data readers, training + resume, export, evaluation.

The data sets are made here in their real formats from real faces of ../shared/media:
a FER2013 CSV of 48×48 grey rows, and a labels.csv folder of photos. Labels are
assigned round-robin: these tests check the machinery (formats, determinism, resume,
export parity, loading in the workers, every metric), not how well a model learns.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernel.types import EMOTION_LABELS
from training.metrics import (
    binary_auc,
    classify_metrics,
    confusion_matrix,
    engaged_auc,
    macro_f1,
    subgroup_metrics,
    unweighted_average_recall,
)

from .conftest import DEFAULT_MODELS, MEDIA_DIR

PHOTOS = ("solvay_conference.jpg", "12_angry_men.jpg", "multi_face.jpg")


# --- metrics (numpy only) ----------------------------------------------------------------


def test_confusion_f1_and_uar_match_hand_computed_values() -> None:
    truth = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    matrix = confusion_matrix(truth, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # Recalls 2/3, 1/2, 1; precisions 1, 1/2, 1/2; F1s 0.8, 0.5, 2/3.
    assert unweighted_average_recall(truth, predicted, 3) == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert macro_f1(truth, predicted, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class absent from the truth does not count in the means.
    assert unweighted_average_recall([0, 1], [0, 0], 5) == pytest.approx(0.5)


def test_auc_counts_ties_as_half_and_engaged_auc_splits_levels() -> None:
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert binary_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert math.isnan(binary_auc([0.2, 0.3], [1, 1]))
    probabilities = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.4, 0.4], [0.0, 0.6, 0.3, 0.1],
                              [0.0, 0.0, 0.2, 0.8]])
    # Engaged scores 0.1, 0.8, 0.4, 1.0 for levels 0, 2, 1, 3: every engaged one ranks above.
    assert engaged_auc(probabilities, [0, 2, 1, 3]) == pytest.approx(1.0)
    assert engaged_auc(probabilities, [3, 0, 1, 2]) == pytest.approx(0.5)


def test_classify_metrics_reports_every_figure_and_subgroups() -> None:
    truth = np.array([0, 1, 2, 3, 3, 2])
    scores = np.eye(4)[[0, 1, 1, 3, 2, 2]]
    metrics = classify_metrics(truth, scores, ("a", "b", "c", "d"), ordinal_levels=True)
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.engaged_auc is not None and 0.0 <= metrics.engaged_auc <= 1.0
    assert metrics.extra["level_mae"] == pytest.approx(2 / 6)
    per_class = metrics.to_dict()["per_class"]
    assert isinstance(per_class, dict) and set(per_class) == {"a", "b", "c", "d"}
    groups = subgroup_metrics(truth, scores, ["x", "x", "y", "y", "y", "x"], ("a", "b", "c", "d"))
    assert groups["x"].count == 3 and groups["x"].accuracy == pytest.approx(1.0)
    assert groups["y"].accuracy == pytest.approx(1 / 3)


# --- data made in the real formats ----------------------------------------------------------


@pytest.fixture(scope="module")
def face_crops(default_models: Path) -> list[np.ndarray]:
    """Runtime crops (aligned 112×112 BGR) of every face in a few photos of ../shared/media."""
    import cv2

    from kernel.settings import Settings
    from kernel.types import VideoFrame
    from training.emotion_data import load_runtime_detector
    from vision.geometry import align_face

    detector, _ = load_runtime_detector(Settings(model_cache_dir=default_models))
    crops = []
    for name in PHOTOS:
        raw = cv2.imread(str(MEDIA_DIR / name))
        assert raw is not None, name
        image = np.asarray(raw, np.uint8)
        detections = detector.detect(VideoFrame("test", 0.0, image))
        crops += [align_face(image, keypoints) for keypoints in detections.keypoints]
    assert len(crops) >= 21, f"expected at least three faces per emotion class, found {len(crops)}"
    return crops


@pytest.fixture(scope="module")
def fer_csv(face_crops: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FER2013 CSV (``emotion,pixels,Usage``) of 48×48 grey rows of real faces."""
    from workers.runners import emotion_model_input

    path = tmp_path_factory.mktemp("fer") / "fer2013.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["emotion", "pixels", "Usage"])
        for index, crop in enumerate(face_crops):
            grey = emotion_model_input(crop[np.newaxis], 48)[0, 0].astype(np.uint8)
            usage = "Training" if index % 5 < 3 else "PublicTest" if index % 5 == 3 else "PrivateTest"
            writer.writerow([index % 7, " ".join(str(v) for v in grey.ravel()), usage])
    return path


@pytest.fixture(scope="module")
def labels_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels.csv folder like facial_expressions_dev: ``images/`` links to real photos, with subgroups."""
    folder = tmp_path_factory.mktemp("labels")
    (folder / "images").mkdir()
    names = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg", "single_face.jpg"]
    labels = ["surprise", "happiness", "anger", "disgust", "neutral", "contempt"]
    rows = []
    for index in range(12):
        photo = names[index % len(names)]
        image = f"Person_{index % 4}_{index:04d}.jpg"
        (folder / "images" / image).symlink_to(MEDIA_DIR / photo)
        rows.append({"image": image, "emotion": labels[index % len(labels)], "group": "ab"[index % 2]})
    with (folder / "labels.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "emotion", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture
def private_cache(tmp_path: Path, default_models: Path) -> Path:
    """A model cache of its own (exports go there) that links the default models of the shared one."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in DEFAULT_MODELS:
        (cache / name).symlink_to(default_models / name)
    return cache


@pytest.mark.media
def test_fer2013_reader_keeps_usage_splits_and_rejects_bad_rows(fer_csv: Path, tmp_path: Path) -> None:
    from training.emotion_data import split_by_subject
    from training.face_sets import load_emotion_data
    from training.run import TrainingError

    data = load_emotion_data(fer_csv, 64)
    assert data.inputs.shape[1:] == (1, 64, 64) and data.inputs.dtype == np.float32
    assert data.inputs.min() >= 0.0 and data.inputs.max() <= 255.0
    assert data.labels.tolist() == [i % 7 for i in range(len(data))]
    splits = split_by_subject(data)
    assert {name: len(idx) for name, idx in splits.items()} == {
        "train": sum(1 for i in range(len(data)) if i % 5 < 3),
        "val": sum(1 for i in range(len(data)) if i % 5 == 3),
        "test": sum(1 for i in range(len(data)) if i % 5 == 4)}
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    with pytest.raises(TrainingError, match="line 2"):
        load_emotion_data(bad, 48)


@pytest.mark.media
def test_labels_csv_folder_detects_faces_like_the_runtime(labels_folder: Path, default_models: Path,
                                                          tmp_path: Path) -> None:
    from kernel.settings import Settings
    from training.emotion_data import split_by_subject
    from training.face_sets import load_emotion_data

    settings = Settings(model_cache_dir=default_models)
    data = load_emotion_data(labels_folder, 48, settings=settings, cache_dir=tmp_path)
    assert data.dropped["contempt"] == 2  # AffectNet's contempt has no FER2013 class
    assert len(data) == 10 and set(data.groups) == {"a", "b"}
    assert data.subjects[0] == "Person_0"
    cached = json.loads(next(tmp_path.glob("keypoints-*.json")).read_text())
    # Only numbers are cached: five (x, y) keypoints per photo.
    assert all(np.asarray(points).shape == (5, 2) for points in cached.values())
    splits = split_by_subject(data, val_fraction=0.25, test_fraction=0.25)
    owners = {name: {data.subjects[i] for i in idx} for name, idx in splits.items()}
    assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]


# --- training, resume, export, workers ------------------------------------------------------


class _InterruptedError(Exception):
    """Stands for a run killed after its first epoch."""


def _stop_after_first(epoch: int, line: dict[str, float]) -> None:
    if epoch == 1:
        raise _InterruptedError


@pytest.mark.media
@pytest.mark.torch
@pytest.mark.parametrize(("family", "options"), [("mini-xception", {}), ("resnet", {"width": 8, "blocks": 1})])
def test_training_resumes_exports_and_runs_in_the_workers(
    family: str, options: dict[str, Any], fer_csv: Path, face_crops: list[np.ndarray], private_cache: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from typer.testing import CliRunner

    from classlens.cli import app
    from kernel.settings import Settings, load_settings
    from pipeline.models import load_inference_models
    from training.emotion_train import train_emotion
    from training.export import export_run
    from training.loop import TrainConfig
    from training.run import RunInfo
    from workers.runners import emotion_model_input

    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, seed=7, device="cpu")
    whole = train_emotion(fer_csv, tmp_path / "whole", family=family, config=config, input_size=48,
                          model_options=options, progress=False)
    with pytest.raises(_InterruptedError):
        train_emotion(fer_csv, tmp_path / "resumed", family=family, config=config, input_size=48,
                      model_options=options, progress=False, on_epoch_end=_stop_after_first)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1
    resumed = train_emotion(fer_csv, tmp_path / "resumed", family=family, config=config, input_size=48,
                            model_options=options, progress=False)
    assert resumed.result.resumed_from == 1 and resumed.result.epochs_run == 1
    weights = [torch.load(run / "checkpoint.pt", weights_only=True)["model"]
               for run in (tmp_path / "whole", tmp_path / "resumed")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert [line["train_loss"] for line in whole.result.history] == \
        [line["train_loss"] for line in resumed.result.history]

    info = RunInfo.load(tmp_path / "whole")
    assert info.labels == list(EMOTION_LABELS) and info.input_spec.size == 48
    assert info.data_fingerprint == resumed.info.data_fingerprint and len(info.data_fingerprint) == 64
    assert whole.test is not None and whole.test.count == info.config["split_sizes"]["test"]
    report = (tmp_path / "whole" / "report.html").read_text()
    assert report.count("<svg") >= 3 and "macro_f1" in report  # curves + confusion matrices

    crops = np.stack(face_crops[:8])
    exported = export_run(tmp_path / "whole", f"test-{family}", cache_dir=private_cache,
                          parity_inputs=emotion_model_input(crops, 48))
    assert exported.parity_max_abs_diff <= 1e-4
    half = export_run(tmp_path / "whole", f"test-{family}-fp16", cache_dir=private_cache, fp16=True,
                      parity_inputs=emotion_model_input(crops, 48))
    assert half.size_bytes < exported.size_bytes * 0.75

    models = load_inference_models(Settings(model_cache_dir=private_cache, emotion_model=f"test-{family}",
                                            execution_provider="cpu"))
    assert models.emotion is not None and models.provenance["emotion"]["name"] == f"test-{family}"
    probabilities = models.emotion.predict(crops)
    with torch.no_grad():
        expected = torch.softmax(whole_model(tmp_path / "whole")(torch.from_numpy(emotion_model_input(crops, 48))),
                                 dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)

    for key in [k for k in os.environ if k.startswith("CLASSLENS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CLASSLENS_MODEL_CACHE_DIR", str(private_cache))
    outcome = CliRunner().invoke(app, ["models", "use", "emotion", f"test-{family}"])
    assert outcome.exit_code == 0, outcome.output
    assert load_settings().emotion_model == f"test-{family}"
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and f"test-{family}" in listed.output and "exported from a training" in listed.output
    monkeypatch.setenv("CLASSLENS_EMOTION_MODEL", "fer-mini-xception")
    assert load_settings().emotion_model == "fer-mini-xception"  # the environment still wins
    refused = CliRunner().invoke(app, ["models", "use", "engagement", f"test-{family}"])
    assert refused.exit_code == 2


def whole_model(run_dir: Path) -> Any:
    """The run's best model, rebuilt from run.json."""
    from training.run import load_trained_model

    return load_trained_model(run_dir)[0]


@pytest.mark.media
@pytest.mark.torch
def test_evaluate_default_and_trained_models(labels_folder: Path, fer_csv: Path, default_models: Path,
                                             tmp_path: Path) -> None:
    from kernel.settings import Settings
    from training.emotion_train import train_emotion
    from training.evaluate import evaluate
    from training.loop import TrainConfig

    settings = Settings(model_cache_dir=default_models)
    result = evaluate("fer-mini-xception", labels_folder, settings=settings, out_dir=tmp_path / "eval")
    metrics = result.metrics
    assert metrics.count == 10 and result.dropped["contempt"] == 2
    for value in (metrics.accuracy, metrics.macro_f1, metrics.uar):
        assert 0.0 <= value <= 1.0
    assert metrics.confusion.sum() == 10 and set(result.subgroups) == {"a", "b"}
    assert sum(group.count for group in result.subgroups.values()) == 10
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["metrics"]["accuracy"] == pytest.approx(metrics.accuracy)
    assert "<svg" in (tmp_path / "eval" / "evaluation.html").read_text()
    assert "| **all** (10 faces)" in result.per_class_markdown()

    train_emotion(fer_csv, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=8, device="cpu"),
                  input_size=48, progress=False)
    on_fer = evaluate(str(tmp_path / "run"), fer_csv, settings=settings, split="PrivateTest")
    with fer_csv.open() as stream:
        private = sum(1 for row in csv.DictReader(stream) if row["Usage"] == "PrivateTest")
    assert on_fer.metrics.count == private
