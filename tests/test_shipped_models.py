"""Models ClassLens trained and ships: each loads, matches its card, and keeps parity with its training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kernel.errors import ModelSupplyError
from model_export.manifest import MANIFEST
from model_export.model_cards import (
    CARD_SUFFIX,
    check_parity,
    load_packaged_model,
    packaged_folder,
    packaged_names,
    read_card,
)
from tests.conftest import DATA_DIR, require

SHIPPED = [spec.name for spec in MANIFEST.values() if spec.source.kind == "packaged"]


def test_every_packaged_manifest_entry_ships_a_model_and_a_card() -> None:
    assert SHIPPED, "the manifest names no shipped model"
    assert sorted(SHIPPED) == packaged_names()


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_loads_matches_its_card_and_keeps_parity(name: str) -> None:

    spec = MANIFEST[name]
    card = read_card(name)
    data = load_packaged_model(name, spec.source.sha256)
    assert check_parity(card, data) <= 1e-4
    assert card.role == spec.role and tuple(card.labels) == spec.labels
    # Every card names the split each figure comes from, and the terms of every data set used.
    assert all(figures.get("split") or name.startswith("training run") for name, figures in card.metrics.items())
    assert all(entry.get("terms") for entry in card.data)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_runs_in_the_workers_runner(name: str, tmp_path: Path) -> None:
    import numpy as np

    from model_export.cache import ModelCache
    from workers.runners import EmotionRunner, EngagementRunner

    path = ModelCache(tmp_path).ensure(name)
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    if MANIFEST[name].role == "emotion":
        probabilities = EmotionRunner(path, preference="cpu").predict(crops)
    else:
        probabilities = EngagementRunner(path, preference="cpu").predict(np.zeros((3, 11), np.float32), crops)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture
def copied_package(tmp_path: Path) -> Path:
    """A writable copy of the shipped models, to tamper with."""
    folder = tmp_path / "packaged"
    shutil.copytree(Path(str(packaged_folder())), folder)
    return folder


def test_a_changed_model_file_refuses_to_load_and_says_why(copied_package: Path) -> None:
    name = SHIPPED[0]
    model = copied_package / f"{name}.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelSupplyError, match="model card says"):
        load_packaged_model(name, MANIFEST[name].source.sha256, copied_package)


def test_a_card_that_disagrees_with_the_manifest_refuses_to_load(copied_package: Path) -> None:
    name = SHIPPED[0]
    with pytest.raises(ModelSupplyError, match="card and the manifest disagree"):
        load_packaged_model(name, "0" * 64, copied_package)


def test_a_malformed_or_missing_card_refuses_to_load(copied_package: Path) -> None:
    name = SHIPPED[0]
    card = copied_package / f"{name}{CARD_SUFFIX}"
    card.write_text("{not json")
    with pytest.raises(ModelSupplyError, match="not a valid model card"):
        load_packaged_model(name, MANIFEST[name].source.sha256, copied_package)
    card.unlink()
    with pytest.raises(ModelSupplyError, match="ships no model card"):
        load_packaged_model(name, MANIFEST[name].source.sha256, copied_package)


def test_a_card_that_names_other_training_data_refuses_to_load(copied_package: Path) -> None:
    name = SHIPPED[0]
    card_path = copied_package / f"{name}{CARD_SUFFIX}"
    card = json.loads(card_path.read_text())
    card["data_fingerprint"] = "f" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelSupplyError, match="trained on data with fingerprint"):
        load_packaged_model(name, MANIFEST[name].source.sha256, copied_package)


def test_a_card_whose_outputs_drifted_fails_the_parity_check() -> None:
    name = SHIPPED[0]
    card = read_card(name)
    card.parity.outputs[0][0] += 0.01
    with pytest.raises(ModelSupplyError, match="differ from the training run"):
        check_parity(card, load_packaged_model(name, MANIFEST[name].source.sha256))


def test_the_shipped_models_are_the_defaults() -> None:
    from kernel.settings import Settings

    settings = Settings()
    defaults = {"emotion": settings.emotion_model, "engagement": settings.engagement_model}
    for name in SHIPPED:
        assert defaults[MANIFEST[name].role] == name


@pytest.mark.parametrize("name", SHIPPED)
def test_a_cards_data_fingerprint_is_the_fingerprint_of_the_data_in_shared(name: str) -> None:
    """The card says which data made the model; recompute it from ../shared/data."""
    require((DATA_DIR / "ferplus" / "labels.csv").is_file(), f"needs the labelled data in {DATA_DIR}")
    card = read_card(name)
    recipe = card.fingerprint_recipe
    if recipe["kind"] == "emotion":
        from training.emotion_data import concatenate_sets
        from training.face_sets import load_emotion_data

        sets = [load_emotion_data(DATA_DIR / folder, 48, faces="as-is", fer2013_weight=recipe["fer2013_weight"])
                for folder in recipe["folders"]]
        fingerprint = concatenate_sets(sets).fingerprint()
    else:
        from training.engagement_images import labelled_rows_fingerprint

        fingerprint = labelled_rows_fingerprint([DATA_DIR / folder for folder in recipe["folders"]])
    assert fingerprint == card.data_fingerprint, json.dumps(recipe)


def test_with_emotion_inference_off_engagement_reads_no_expressions_unless_chosen(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The trained engagement model grew from the emotion network, so emotion off means the pose-and-eyes baseline."""
    from kernel.settings import Settings

    monkeypatch.delenv("CLASSLENS_ENGAGEMENT_MODEL", raising=False)
    assert Settings(model_cache_dir=tmp_path).engagement_model == "classlens-engagement-v1"
    off = Settings(model_cache_dir=tmp_path, emotion_inference=False)
    assert off.engagement_model == "engagement-baseline-v1"
    chosen = Settings(model_cache_dir=tmp_path, emotion_inference=False, engagement_model="classlens-engagement-v1")
    assert chosen.engagement_model == "classlens-engagement-v1"


@pytest.mark.media
def test_a_batch_with_emotion_off_is_scored_without_the_expression_reading_engagement_model(
        default_models: Path) -> None:
    """A producer's emotion switch reaches workers loaded with emotion on: their engagement model too."""
    from kernel.settings import Settings
    from pipeline.models import load_inference_models

    models = load_inference_models(Settings(model_cache_dir=default_models, execution_provider="cpu"))
    assert models.provenance["engagement"]["name"] == "classlens-engagement-v1"
    off = models.for_settings(emotion_inference=False)
    assert off.emotion is None and off.engagement is models.engagement_without_emotion
    assert off.engagement.input_kind == "features"
    assert off.provenance["engagement"]["name"] == "engagement-baseline-v1" and "emotion" not in off.provenance
    assert models.for_settings(emotion_inference=True) is models
