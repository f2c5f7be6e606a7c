"""Fine-tuning face-api's network for emotion and engagement, shipping it with a card, evaluating it.

Tiny slices of ../shared/data, one epoch each: these check that the pieces fit and that
what is promised holds (frozen blocks stay face-api's, the card's probe passes, the
evaluation files have every figure), not how good the models are (docs/models.md).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA_DIR, require

pytestmark = [pytest.mark.torch, pytest.mark.network, pytest.mark.media]


@pytest.fixture(scope="module")
def settings(default_models: Path) -> object:
    from kernel.settings import Settings

    return Settings(model_cache_dir=default_models, execution_provider="cpu")


@pytest.fixture(scope="module")
def emotion_run(tmp_path_factory: pytest.TempPathFactory, settings: object) -> Path:
    """One epoch of ``--model face-api`` on 96 FER+ faces (64 train, 32 validation)."""
    from kernel.errors import ModelSupplyError
    from training.emotion_train import face_api_tarball, train_emotion
    from training.face_sets import read_ferplus
    from training.loop import TrainConfig

    folder = DATA_DIR / "ferplus"
    require((folder / "labels.csv").is_file(), f"needs {folder}")
    try:
        face_api_tarball(settings)  # type: ignore[arg-type]
    except ModelSupplyError as exc:
        require(False, f"needs the npm registry to download face-api once ({exc})")
    data = read_ferplus(folder, 112, splits=("test",))
    data = data.subset(np.arange(96))
    data.splits = ["train"] * 64 + ["val"] * 32
    out = tmp_path_factory.mktemp("emotion-run")
    train_emotion([folder], out, family="face-api", config=TrainConfig(epochs=1, batch_size=32, device="cpu"),
                  input_size=112, data=data, progress=False, model_options={"frozen_blocks": 3},
                  settings=settings)  # type: ignore[arg-type]
    return out


def test_fine_tuning_keeps_face_apis_frozen_blocks_and_changes_the_rest(emotion_run: Path, settings: object) -> None:
    import torch

    from training.emotion_models import FaceApiEmotionNet
    from training.emotion_train import face_api_tarball
    from training.run import RunInfo, load_trained_model

    trained, info = load_trained_model(emotion_run)
    assert info.model_family == "face-api" and info.input_spec.size == 112
    start = FaceApiEmotionNet(frozen_blocks=3)
    start.load_pretrained(face_api_tarball(settings))  # type: ignore[arg-type]
    before, after = start.state_dict(), trained.state_dict()
    frozen = [key for key in before if key.startswith(("network.dense.0.", "network.dense.1.", "network.dense.2."))]
    tuned = [key for key in before if key.startswith("network.dense.3.")]
    assert frozen and tuned
    assert all(torch.equal(before[key], after[key]) for key in frozen)
    assert any(not torch.equal(before[key], after[key]) for key in tuned)
    assert RunInfo.load(emotion_run).config["soft_targets"] is True


def test_an_emotion_run_is_evaluated_through_the_workers_runner_with_predictions(emotion_run: Path,
                                                                              settings: object,
                                                                              tmp_path: Path) -> None:
    from training.evaluate import evaluate

    result = evaluate(str(emotion_run), DATA_DIR / "ckplus48", settings=settings,  # type: ignore[arg-type]
                      out_dir=tmp_path)
    summary = json.loads((tmp_path / "evaluation.json").read_text())
    assert {"accuracy", "uar", "macro_f1"} <= summary.keys()
    assert summary["accuracy"] == pytest.approx(result.metrics.accuracy)
    with (tmp_path / "predictions.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == result.metrics.count
    assert {"image", "true", "predicted", "p_angry", "p_neutral"} <= rows[0].keys()
    assert all(abs(sum(float(row[f"p_{label}"]) for label in result.metrics.labels) - 1) < 1e-3 for row in rows)


@pytest.fixture(scope="module")
def engagement_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 DAiSEE frames, Train and Validation, every level present."""
    source = DATA_DIR / "daisee_frames"
    require((source / "labels.csv").is_file(), f"needs {source}")
    with (source / "labels.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    picked = []
    for split in ("Train", "Validation"):
        for level in "0123":
            picked += [row for row in rows if row["split"] == split and row["engagement"] == level][:6]
    folder = tmp_path_factory.mktemp("frames")
    with (folder / "labels.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "split", "engagement"])
        for index, row in enumerate(picked):
            (folder / f"{index}.jpg").symlink_to(source / row["path"])
            writer.writerow([f"{index}.jpg", row["split"], row["engagement"]])
    return folder


def test_an_engagement_model_trains_from_the_emotion_run_and_is_compared_with_the_baseline(
        emotion_run: Path, engagement_folder: Path, settings: object, tmp_path: Path) -> None:
    from model_export.model_cards import check_parity, load_packaged_model, read_card
    from training.engagement_images import evaluate_engagement_images, train_engagement_images
    from training.export import ship_run
    from training.loop import TrainConfig

    out = tmp_path / "engagement-run"
    run = train_engagement_images([engagement_folder], out, init=emotion_run, settings=settings,  # type: ignore[arg-type]
                                  config=TrainConfig(epochs=1, batch_size=16, device="cpu",
                                                     selection_metric="uar"),
                                  selection_fraction=0.25, progress=False)
    assert run.test is not None and run.baseline is not None
    assert run.test.count == run.baseline.count  # the same held-out faces for both
    assert {"test_uar", "test_engaged_auc", "baseline_test_uar"} <= run.info.metrics.keys()

    evaluated = evaluate_engagement_images(str(out), engagement_folder, settings=settings,  # type: ignore[arg-type]
                                           split="Validation", out_dir=tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert {"accuracy", "uar", "macro_f1", "auc"} <= summary.keys()
    assert summary["uar"] == pytest.approx(run.test.uar, abs=1e-6)
    assert len((tmp_path / "eval" / "predictions.csv").read_text().splitlines()) == evaluated.metrics.count + 1

    words = tmp_path / "card.json"
    words.write_text(json.dumps({"summary": "test", "data": [{"name": "DAiSEE frames", "use": "training",
                                                             "terms": "academic research"}],
                                 "command": "classlens train engagement ...", "licence": "research",
                                 "notes": []}))
    card_path = ship_run(out, "tiny-engagement", tmp_path / "packaged", template=words,
                         evaluations={"daisee validation": tmp_path / "eval" / "evaluation.json"},
                         parity_inputs=_parity(out, settings))
    card = read_card("tiny-engagement", tmp_path / "packaged")  # type: ignore[arg-type]
    assert card_path.name == "tiny-engagement.card.json" and card.role == "engagement"
    assert card.metrics["daisee validation"]["auc"] == pytest.approx(summary["auc"])
    data = load_packaged_model("tiny-engagement", card.sha256, tmp_path / "packaged")  # type: ignore[arg-type]
    assert check_parity(card, data) <= 1e-4


def _parity(run: Path, settings: object) -> np.ndarray:
    from training.engagement_images import run_parity_inputs

    return run_parity_inputs(run, settings)  # type: ignore[arg-type]


def test_an_engagement_run_starts_from_the_shipped_emotion_model(
        engagement_folder: Path, settings: object, tmp_path: Path) -> None:
    import onnx
    import onnxruntime
    import torch

    from training.engagement_images import load_emotion_init, train_engagement_images
    from training.loop import TrainConfig
    from training.run import TrainingError

    shipped = Path(__file__).resolve().parents[1] / "model_export" / "packaged" / "classlens-emotion-v1.onnx"
    network, spec, run_id = load_emotion_init(shipped, settings)  # type: ignore[arg-type]
    metadata = {prop.key: prop.value for prop in onnx.load(str(shipped)).metadata_props}
    assert run_id == metadata["classlens.run_id"] and spec.size == 112 and spec.crop_fraction == 0.9
    # The rebuilt network gives the shipped file's probabilities (on other pixels than the loader checked).
    pixels = np.random.default_rng(11).uniform(0, 255, (6, 1, 112, 112)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(shipped), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        rebuilt = torch.softmax(network(torch.from_numpy(pixels)), 1).numpy()
    assert np.abs(rebuilt - session.run(None, {"input": pixels})[0]).max() < 1e-5

    engagement = shipped.with_name("classlens-engagement-v1.onnx")
    with pytest.raises(TrainingError, match="not a face-api emotion model"):
        load_emotion_init(engagement, settings)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="no-such-model"):
        load_emotion_init(Path("no-such-model"), settings)  # type: ignore[arg-type]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TrainingError, match="not an ONNX model"):
        load_emotion_init(garbage, settings)  # type: ignore[arg-type]

    run = train_engagement_images([engagement_folder], tmp_path / "run", init=shipped,
                                  settings=settings,  # type: ignore[arg-type]
                                  config=TrainConfig(epochs=1, batch_size=16, device="cpu", selection_metric="uar"),
                                  selection_fraction=0.25, progress=False)
    assert run.info.config["init_run_id"] == run_id and run.test is not None


def test_faces_join_into_pseudo_subjects_and_the_selection_takes_whole_ones() -> None:
    from training.engagement_images import face_groups, group_disjoint_split

    rng = np.random.default_rng(3)
    people = rng.normal(size=(5, 64))
    # Twelve pictures of each of five people: each a small step from its person, as one student's clips.
    faces = np.concatenate([person + rng.normal(scale=0.08, size=(12, 64)) for person in people])
    faces = (faces / np.linalg.norm(faces, axis=1, keepdims=True)).astype(np.float32)
    order = rng.permutation(len(faces))
    faces, person_of = faces[order], np.repeat(np.arange(5), 12)[order]

    groups = face_groups(faces, same_face_cosine=0.97)
    assert len(np.unique(groups)) == 5
    for group in np.unique(groups):  # each group is one person, whole
        assert len(np.unique(person_of[groups == group])) == 1
    assert groups[0] == 0  # labels in order of first appearance
    assert len(np.unique(face_groups(faces, same_face_cosine=-1.0))) == 1

    indices = np.arange(100, 100 + len(faces), dtype=np.int64)
    selection, train = group_disjoint_split(indices, groups, 0.25, np.random.default_rng(0))
    assert sorted(np.concatenate([selection, train]).tolist()) == indices.tolist()
    assert set(groups[selection - 100].tolist()).isdisjoint(groups[train - 100].tolist())
    assert len(selection) >= 15  # at least a quarter of the faces, in whole groups


def test_an_engagement_run_can_select_on_whole_pseudo_subjects(
        emotion_run: Path, engagement_folder: Path, settings: object, tmp_path: Path) -> None:
    from training.engagement_images import train_engagement_images
    from training.loop import TrainConfig

    run = train_engagement_images([engagement_folder], tmp_path / "run", init=emotion_run,
                                  settings=settings,  # type: ignore[arg-type]
                                  config=TrainConfig(epochs=1, batch_size=16, device="cpu", selection_metric="uar"),
                                  selection_fraction=0.25, progress=False, selection_by="faces")
    sizes = run.info.config["split_sizes"]
    assert run.info.config["selection_by"] == "faces"
    assert sizes["selection"] > 0 and sizes["train"] > 0
    assert run.test is not None and run.test.count == sizes["test"]
