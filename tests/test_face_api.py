"""face-api's expression network: pinned download, rebuilt graph, parity, and the runtime's contract."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import MEDIA_DIR, require

pytestmark = pytest.mark.network



def _face_crops() -> np.ndarray:
    """RGB 112×112 centre crops of the labelled photos in ../shared/media."""
    require(MEDIA_DIR.is_dir(), "needs ../shared/media")
    crops = []
    for name in ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"):
        image = cv2.imread(str(MEDIA_DIR / name))
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        square = image[top:top + side, left:left + side]
        crops.append(cv2.cvtColor(cv2.resize(square, (112, 112), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32)


def test_a_tarball_with_another_hash_is_refused() -> None:
    from kernel.errors import ModelSupplyError
    from model_export.face_api import convert_face_api_expression

    with pytest.raises(ModelSupplyError, match="sha256"):
        convert_face_api_expression(b"not the face-api package")


def test_the_onnx_graph_matches_the_numpy_reference_on_faces_and_noise(face_api_tarball: bytes) -> None:
    import onnxruntime

    from model_export.face_api import convert_face_api_expression, read_expression_weights, reference_forward

    inputs = np.concatenate([_face_crops(), np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112))
                             .astype(np.float32)])
    session = onnxruntime.InferenceSession(convert_face_api_expression(face_api_tarball),
                                           providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": inputs})[0]
    reference = reference_forward(read_expression_weights(face_api_tarball), inputs)
    assert np.abs(onnx_out - reference).max() < 1e-5
    assert np.allclose(onnx_out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.torch
def test_the_weights_of_a_built_graph_read_back_as_the_weights_it_was_built_from() -> None:
    from kernel.errors import ModelSupplyError
    from kernel.types import EMOTION_LABELS
    from model_export.face_api import (
        build_face_api_expression_onnx,
        expected_weight_shapes,
        expression_weights_from_onnx,
    )

    rng = np.random.default_rng(5)
    weights = {name: rng.normal(size=shape).astype(np.float32)
               for name, shape in expected_weight_shapes(len(EMOTION_LABELS)).items()}
    graph = build_face_api_expression_onnx(weights, grey=True, labels=EMOTION_LABELS)
    read_back = expression_weights_from_onnx(graph)
    assert read_back.keys() == weights.keys()
    for name, value in weights.items():
        assert np.array_equal(read_back[name], value), name

    del graph.graph.initializer[-1]
    with pytest.raises(ModelSupplyError, match="no weight"):
        expression_weights_from_onnx(graph)


def test_the_torch_module_matches_the_onnx_graph(face_api_tarball: bytes) -> None:
    import onnxruntime
    import torch

    from model_export.face_api import convert_face_api_expression
    from training.face_api_net import build_face_api_expression_net

    inputs = _face_crops()
    session = onnxruntime.InferenceSession(convert_face_api_expression(face_api_tarball),
                                           providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch_out = torch.softmax(build_face_api_expression_net(face_api_tarball)(torch.from_numpy(inputs)), 1)
    assert np.abs(torch_out.numpy() - session.run(None, {"input": inputs})[0]).max() < 1e-5


def test_the_runtime_model_gives_the_same_probabilities_in_the_products_class_order(face_api_tarball: bytes) -> None:
    import onnxruntime

    from kernel.types import EMOTION_LABELS
    from model_export.face_api import (
        FACE_API_EXPRESSION_LABELS,
        FACE_API_TO_PRODUCT,
        convert_face_api_expression,
        convert_face_api_for_runtime,
    )

    inputs = _face_crops()
    original = onnxruntime.InferenceSession(convert_face_api_expression(face_api_tarball),
                                            providers=["CPUExecutionProvider"]).run(None, {"input": inputs})[0]
    runtime = onnxruntime.InferenceSession(convert_face_api_for_runtime(face_api_tarball),
                                           providers=["CPUExecutionProvider"]).run(None, {"input": inputs})[0]
    for column, face_api_label in enumerate(FACE_API_EXPRESSION_LABELS):
        product_column = EMOTION_LABELS.index(FACE_API_TO_PRODUCT[face_api_label])
        assert np.allclose(runtime[:, product_column], original[:, column], atol=1e-6)


def test_the_pulled_model_runs_in_the_workers_runner_and_reads_a_smile(face_api_tarball: bytes,
                                                                       tmp_path: Path) -> None:
    from kernel.types import EMOTION_LABELS
    from model_export.cache import ModelCache
    from workers.runners import EmotionRunner

    archives = tmp_path / "from"
    archives.mkdir()
    (archives / "vladmandic-face-api-1.7.15.tgz").write_bytes(face_api_tarball)
    cache = ModelCache(tmp_path / "cache")
    path = cache.pull("face-api-expression", search_dirs=[archives], allow_download=False)
    runner = EmotionRunner(path, preference="cpu")
    assert (runner.size, runner.colour) == (112, "rgb")
    happy = cv2.resize(cv2.imread(str(MEDIA_DIR / "0-f15-hao-ph.jpg")), (112, 112))
    probabilities = runner.predict(happy[np.newaxis])
    assert EMOTION_LABELS[int(probabilities[0].argmax())] == "happy"


def _t1_descriptors_inputs(insightface_images: Path, default_models: Path) -> np.ndarray:
    """face-api's 150×150 inputs for the six faces of t1.jpg, and for their mirror images."""
    from kernel.settings import Settings
    from training.emotion_data import load_runtime_detector
    from vision.recognition import face_api_descriptor_box, face_api_input

    detector, _ = load_runtime_detector(Settings(model_cache_dir=default_models, execution_provider="cpu"))
    from vision.sources import VideoFrame

    image = cv2.imread(str(insightface_images / "t1.jpg"))
    detections = detector.detect(VideoFrame(image=image, timestamp=0.0, stream="t1"))
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    inputs = []
    for points in detections.keypoints:
        mouth = tuple((points[3] + points[4]) / 2)
        x, y, width, height = face_api_descriptor_box(tuple(points[0]), tuple(points[1]), mouth,  # type: ignore[arg-type]
                                                      image.shape[1], image.shape[0])
        face = rgb[y:y + height, x:x + width]
        inputs += [face_api_input(face), face_api_input(np.ascontiguousarray(face[:, ::-1]))]
    return np.stack(inputs)


@pytest.mark.media
def test_the_recognition_graph_matches_its_reference_and_tells_people_apart(
        face_api_tarball: bytes, insightface_images: Path, default_models: Path) -> None:
    import onnxruntime

    from model_export.face_api_recognition import (
        convert_face_api_recognition,
        read_recognition_weights,
        reference_forward,
    )

    inputs = _t1_descriptors_inputs(insightface_images, default_models)
    assert inputs.shape == (12, 3, 150, 150)
    session = onnxruntime.InferenceSession(convert_face_api_recognition(face_api_tarball),
                                           providers=["CPUExecutionProvider"])
    descriptors = session.run(None, {"input": inputs})[0]
    assert np.abs(descriptors - reference_forward(read_recognition_weights(face_api_tarball), inputs)).max() < 1e-5
    faces, mirrored = descriptors[0::2], descriptors[1::2]
    distances = np.linalg.norm(faces[:, None] - mirrored[None], axis=2)
    # Each face is nearest to its own mirror image, under face-api's 0.6 match threshold.
    assert (distances.argmin(axis=1) == np.arange(6)).all()
    assert (np.diag(distances) < 0.6).all()


def test_the_runtime_crop_and_the_converted_network_agree_on_sizes() -> None:
    from model_export import face_api_recognition
    from vision import recognition

    assert recognition.FACE_API_INPUT_SIZE == face_api_recognition.INPUT_SIZE
    assert recognition.FACE_API_EMBEDDING_SIZE == face_api_recognition.EMBEDDING_SIZE


def _tfjs_resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """tfjs-backend-cpu's resizeBilinear (no aligned corners, no half pixels), in double precision."""
    source = (image.shape[0] / size) * np.arange(size, dtype=np.float64)
    low = np.maximum(np.floor(source), 0.0).astype(np.intp)
    high = np.minimum(np.ceil(source), image.shape[0] - 1).astype(np.intp)
    frac = source - low
    top_rows, bottom_rows = image[low], image[high]
    top = top_rows[:, low] + (top_rows[:, high] - top_rows[:, low]) * frac[None, :, None]
    bottom = bottom_rows[:, low] + (bottom_rows[:, high] - bottom_rows[:, low]) * frac[None, :, None]
    return top + (bottom - top) * frac[:, None, None]


@pytest.mark.parametrize("shape", [(130, 128), (61, 60), (41, 40), (300, 290), (150, 150), (9, 200)])
def test_face_api_input_pads_and_resizes_as_tfjs_does(shape: tuple[int, int]) -> None:
    from vision.recognition import face_api_input

    face = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3)).astype(np.uint8)
    height, width = shape
    difference = abs(height - width)
    after = int(np.floor(difference * 0.5 + 0.5))
    pad = (difference - after, after)
    square = np.pad(face.astype(np.float64), ((0, 0), pad, (0, 0)) if height > width else (pad, (0, 0), (0, 0)))
    expected = square if square.shape[0] == 150 else _tfjs_resize_bilinear(square, 150)
    produced = face_api_input(face)
    assert produced.shape == (3, 150, 150) and produced.dtype == np.float32
    assert np.abs(produced - expected.transpose(2, 0, 1)).max() < 0.002
