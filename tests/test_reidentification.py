"""Re-identification within a session with a face-embedding model (MobileFaceNet through insightface)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from kernel.types import VideoFrame
from tests.conftest import LOCAL_MODELS_DIR
from vision.detection import FaceDetector
from vision.recognition import ArcFaceEmbedder
from vision.synthetic import bundled_image
from vision.tracking import StudentTracker


def _canvas() -> np.ndarray:
    return np.full((720, 1280, 3), 128, np.uint8)


def _place(canvas: np.ndarray, face: np.ndarray, x: int, y: int) -> None:
    canvas[y:y + face.shape[0], x:x + face.shape[1]] = face


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, np.ndarray]:
    portrait = bundled_image("Tom_Hanks_54745.png")
    group = bundled_image("t1.jpg")
    other = group[120:420, 60:300]  # one person of the group photo, with some margin
    scale = 300 / portrait.shape[0]
    portrait = cv2.resize(portrait, (int(portrait.shape[1] * scale), 300))
    return np.ascontiguousarray(portrait), np.ascontiguousarray(other)


def _scenario(faces: tuple[np.ndarray, np.ndarray]) -> list[VideoFrame]:
    """Person A sits left; person B sits right, then leaves; A is hidden, then reappears where B sat."""
    person_a, person_b = faces
    frames = []
    for t in range(10):
        canvas = _canvas()
        if t <= 3:
            _place(canvas, person_a, 80, 200)
            _place(canvas, person_b, 900, 200)
        elif t >= 6:
            _place(canvas, person_a, 900, 200)
        frames.append(VideoFrame(stream="main", timestamp=float(t), image=canvas))
    return frames


def _ids(frames: list[VideoFrame], detector: FaceDetector, tracker: StudentTracker) -> list[list[int]]:
    result = []
    for frame in frames:
        detections = tracker.update(detector.detect(frame), frame.image)
        order = np.argsort(detections.boxes[:, 0])
        result.append([int(i) for i in detections.track_ids[order]])
    return result


@pytest.mark.media
def test_embedding_keeps_a_student_who_moved_while_hidden(faces: tuple[np.ndarray, np.ndarray],
                                                          default_models: Path) -> None:
    detector = FaceDetector(default_models / "retinaface-mnet025" / "model.onnx", preference="cpu")
    embedder = ArcFaceEmbedder(LOCAL_MODELS_DIR / "MobileFaceNet.onnx", imagenet_normalisation=True, preference="cpu")
    frames = _scenario(faces)
    with_embedding = _ids(frames, detector, StudentTracker(max_gap_seconds=30, embedder=embedder))
    a, b = with_embedding[0]
    assert a != b
    assert with_embedding[4] == [] and with_embedding[5] == []
    assert all(ids == [a] for ids in with_embedding[6:]), with_embedding
    # Geometry alone cannot know: A reappears where B sat, so A is taken for B.
    geometry_only = _ids(frames, detector, StudentTracker(max_gap_seconds=30))
    assert geometry_only[6] == [geometry_only[0][1]]


@pytest.mark.media
def test_same_person_embeddings_are_close_and_different_people_far(faces: tuple[np.ndarray, np.ndarray],
                                                                   default_models: Path) -> None:
    detector = FaceDetector(default_models / "retinaface-mnet025" / "model.onnx", preference="cpu")
    embedder = ArcFaceEmbedder(LOCAL_MODELS_DIR / "MobileFaceNet.onnx", imagenet_normalisation=True, preference="cpu")
    person_a, person_b = faces
    canvas = _canvas()
    _place(canvas, person_a, 80, 200)
    _place(canvas, person_b, 900, 200)
    moved = _canvas()
    _place(moved, cv2.resize(person_a, None, fx=0.8, fy=0.8), 500, 300)
    first = detector.detect(VideoFrame("main", 0.0, canvas))
    second = detector.detect(VideoFrame("main", 1.0, moved))
    order = np.argsort(first.boxes[:, 0])
    embeddings = embedder.embed(canvas, first.keypoints[order])
    again = embedder.embed(moved, second.keypoints)
    assert float(embeddings[0] @ again[0]) > 0.8
    assert float(embeddings[1] @ again[0]) < 0.4


class _CountingEmbedder:
    """The default recogniser, counting the faces it is asked to embed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.scale = inner.scale
        self.calls: list[int] = []

    def embed(self, image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        self.calls.append(len(keypoints))
        return self.inner.embed(image, keypoints)  # type: ignore[no-any-return]


@pytest.mark.media
def test_a_face_that_stays_is_embedded_every_few_seconds_and_a_cut_to_another_person_at_once(
        faces: tuple[np.ndarray, np.ndarray], components: Any) -> None:
    person_a, person_b = faces
    frames = []
    for t in range(12):
        canvas = _canvas()
        _place(canvas, person_a if t < 9 else person_b, 480 + 2 * t, 200)  # a cut to B, in the same place, at 0:09
        frames.append(VideoFrame(stream="main", timestamp=float(t), image=canvas))
    embedder = _CountingEmbedder(components.embedder)
    tracker = StudentTracker(max_gap_seconds=30, embedder=embedder)
    ids, embedded = [], []
    for frame in frames:
        before = sum(embedder.calls)
        ids.append(_ids([frame], components.detector, tracker)[0])
        embedded.append(sum(embedder.calls) - before)
    # A is embedded at 0:00, again after EMBEDDING_REFRESH_SECONDS (0:05); in between it takes its track's embedding.
    assert embedded[:9] == [1, 0, 0, 0, 0, 1, 0, 0, 0]
    # B looks different from what sat there: embedded at once, and appearance makes B a new student.
    assert embedded[9] == 1
    assert ids[:9] == [[ids[0][0]]] * 9
    assert ids[9][0] != ids[0][0] and ids[10:] == [ids[9]] * 2
