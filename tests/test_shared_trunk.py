"""The default emotion and engagement models run as one graph, with the very same numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kernel.types import CropBatch, VideoFrame
from pipeline.capture import crop_batch_for
from pipeline.models import PipelineComponents
from tests.conftest import MEDIA_DIR
from vision.tracking import StudentTracker
from workers.inference import InferenceModels, analyse_crops
from workers.runners import EmotionRunner, EngagementRunner
from workers.shared_trunk import SharedTrunkRunner, fuse_shared_trunk


def _real_crops(components: PipelineComponents) -> CropBatch:
    """Aligned crops of every face in the media folder's photos (13 faces and more)."""
    batches = []
    tracker = StudentTracker(max_gap_seconds=30.0)
    for name in ("multi_face.jpg", "single_face.jpg", "12_angry_men.jpg", "0-f1-su-ph.jpg", "45-m7-di-ph.jpg"):
        image = cv2.imread(str(MEDIA_DIR / name))
        assert image is not None
        frame = VideoFrame(name, 0.0, image)
        batches.append(crop_batch_for(0, frame, tracker.update(components.detector.detect(frame), image)))
    return CropBatch.concatenate(batches)


@pytest.fixture(scope="module")
def models(components: PipelineComponents) -> InferenceModels:
    return components.models


@pytest.mark.media
def test_the_fused_graph_gives_each_models_own_numbers(components: PipelineComponents, models: InferenceModels) -> None:
    fused = models.emotion_and_engagement
    assert fused is not None and models.emotion is not None
    # The first three blocks of face-api's network are frozen in both (docs/models.md).
    assert fused.shared_nodes >= 50
    batch = _real_crops(components)
    assert len(batch) >= 13
    emotions, levels = fused.predict(batch.crops)
    assert emotions == pytest.approx(models.emotion.predict(batch.crops), abs=1e-5)
    features = np.zeros((len(batch), 0), np.float32)
    assert levels == pytest.approx(models.engagement.predict(features, batch.crops), abs=1e-5)
    assert np.allclose(emotions.sum(axis=1), 1.0, atol=1e-5) and np.allclose(levels.sum(axis=1), 1.0, atol=1e-5)

    together = analyse_crops(batch, models)
    apart = analyse_crops(batch, dataclasses.replace(models, emotion_and_engagement=None))
    assert together.emotion_probabilities == pytest.approx(apart.emotion_probabilities, abs=1e-5)
    assert together.engagement_probabilities == pytest.approx(apart.engagement_probabilities, abs=1e-5)


def test_emotion_off_never_runs_the_fused_graph(models: InferenceModels) -> None:
    without = models.for_settings(emotion_inference=False)
    assert without.emotion is None and without.emotion_and_engagement is None and without.shared_runner() is None
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    batch = CropBatch(analysis_id=0, streams=("main",) * 3, track_ids=np.arange(3), timestamps=np.zeros(3),
                      crops=crops, boxes=np.tile(np.array([0, 0, 60, 60], np.float32), (3, 1)),
                      detection_scores=np.ones(3, np.float32), head_pose=np.zeros((3, 3), np.float32))
    result = analyse_crops(batch, without)
    assert result.emotion_probabilities is None and result.engagement_probabilities.shape == (3, 4)


def test_a_runner_swapped_in_does_not_use_a_fused_graph_of_other_models(models: InferenceModels) -> None:
    assert models.emotion is not None
    other = EmotionRunner(models.emotion.model_path, preference="cpu")
    assert dataclasses.replace(models, emotion=other).shared_runner() is None


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def test_models_that_differ_from_the_first_weights_share_only_what_comes_before(default_models: Path) -> None:
    engagement = _load(default_models / "classlens-engagement-v1" / "model.onnx")
    emotion = _load(default_models / "classlens-emotion-v1" / "model.onnx")
    changed = onnx.ModelProto()
    changed.CopyFrom(engagement)
    first_conv = next(index for index, node in enumerate(changed.graph.node) if node.op_type == "Conv")
    weight_name = changed.graph.node[first_conv].input[1]
    weight = next(t for t in changed.graph.initializer if t.name == weight_name)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.001), weight_name))
    fused = fuse_shared_trunk(emotion, changed)
    assert fused is not None and fused[1] == first_conv
    full = fuse_shared_trunk(emotion, engagement)
    assert full is not None and full[1] > first_conv


def test_models_that_cannot_share_are_run_apart(default_models: Path) -> None:
    emotion = _load(default_models / "classlens-emotion-v1" / "model.onnx")
    baseline = _load(default_models / "engagement-baseline-v1" / "model.onnx")
    assert fuse_shared_trunk(emotion, baseline) is None  # a feature-row model: another input
    assert fuse_shared_trunk(emotion, emotion) is None  # the same model twice: nothing to gain
    mini_xception = EmotionRunner(default_models / "fer-mini-xception" / "model.onnx", preference="cpu")
    engagement = EngagementRunner(default_models / "classlens-engagement-v1" / "model.onnx", preference="cpu")
    assert SharedTrunkRunner.fused(mini_xception, engagement) is None  # 64 px crops against 112 px
