"""Conversion of face-api's face recognition network (``@vladmandic/face-api@1.7.15``) to ONNX.

The network is dlib's ResNet-34-like face recognition model (``dlib_face_recognition_resnet_model_v1``)
as ported to TensorFlow.js by face-api. The npm package ships only TFJS weights for it:
``package/model/face_recognition_model-weights_manifest.json`` (a weights manifest, no graph)
and ``package/model/face_recognition_model.bin`` (6,444,032 bytes; most tensors quantised to
uint8 with a per-tensor ``min``/``scale``; the eight filter banks of the ``conv64_*`` layers
are stored as float32). The graph is therefore rebuilt here from the package's own TypeScript
source, ``src/faceRecognitionNet/``:

* ``FaceRecognitionNet.ts``: ``input.toBatchTensor(150, true)`` (see *input* below), then
  ``normalize(x, [122.782, 117.001, 104.298]).div(255)`` (the same per-channel mean and
  divisor as the expression net; the divisor is 255, not 256), then
  ``convDown(conv32_down)`` → ``maxPool(3, 2, 'valid')`` → 3 × ``residual`` at 32 channels →
  ``residualDown`` + 3 × ``residual`` at 64 → ``residualDown`` + 2 × ``residual`` at 128 →
  ``residualDown`` + 2 × ``residual`` at 256 → ``residualDown(conv256_down_out)`` → mean over
  height and width → ``matMul`` with ``fc`` [256, 128] (no bias). The 128 values are returned
  as they are: face-api does not L2-normalise the descriptor.
* ``convLayer.ts``: every convolution is ``conv2d + bias``, then ``scaleLayer`` (a per-channel
  affine ``x * weights + biases``, dlib's folded batch norm), then an optional ReLU.
  ``convDown`` uses stride 2 and ``'valid'`` padding (7×7 for the stem, 3×3 in the residual
  blocks); ``conv``/``convNoRelu`` use stride 1 and ``'same'`` padding (3×3, one pixel all round).
* ``residualLayer.ts``: ``residual`` is ``relu(convNoRelu(conv(x)) + x)``. ``residualDown``
  adds ``convNoRelu(convDown(x))`` to ``avgPool(x, 2, 2, 'valid')``; where the channels double
  the pooled skip path is padded with zero channels (``concat([pooled, zeros], 3)``), and where
  the strided 'valid' convolution comes out one pixel smaller than the 2×2 average pool
  (8→3 versus 8→4 and 4→1 versus 4→2 at 150×150) the convolution branch gets one zero row
  at the bottom and one zero column at the right before the addition.

Feature maps at 150×150 input: 72 (stem) → 35 (max pool) → 17 → 8 → 4 → 2 (then the mean).

Crop (made at run time by :mod:`vision.recognition`):
``detectAllFaces(…).withFaceLandmarks().withFaceDescriptors()`` does not feed the recogniser
the ``alignedRect`` that the other heads use but ``landmarks.align(null,
{useDlibAlignment: true})`` (``FaceLandmarks.alignDlib``): an axis-aligned square (no rotation)
of side ``floor(mean(|mouth - left eye|, |mouth - right eye|) / 0.45)`` placed so that the
centroid of the two eye centres and the mouth centre sits at (0.5, 0.43) of it, then clipped
to the image and floored (``extractFaceTensors``). ``vision.recognition.face_api_descriptor_box`` computes it.

Input: face-api's ``NetInput.toBatchTensor(150, isCenterInputs=true)`` pads a non-square face
tensor to a square with zeros (``padToSquare``: the larger half of the difference goes after,
i.e. bottom/right), then resizes it with ``tf.image.resizeBilinear(…, [150, 150],
alignCorners=false, halfPixelCenters=false)`` (TF's legacy, corner-anchored bilinear).
``vision.recognition.face_api_input`` reproduces that for a face crop; the ONNX graph itself takes the
150×150 result.

The converted model follows the convention of ClassLens crop models:

* input ``input``: float32 ``[N, 3, 150, 150]`` (NCHW), raw RGB pixel values 0–255;
  face-api's normalisation is part of the graph;
* output ``embedding``: float32 ``[N, 128]``, face-api's descriptor exactly as
  ``computeFaceDescriptor`` returns it (not normalised; face-api compares descriptors by
  euclidean distance, with 0.6 as its ``FaceMatcher`` default threshold);
* the batch dimension is symbolic (``N``).

:func:`reference_forward` is a plain numpy forward pass of the same weights in face-api's own
channels_last layout, the reference the parity checks hold the ONNX graph to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx

# Both face-api conversions read the tarball and build graphs with the same helpers.
from model_export.face_api import (
    FACE_API_PACKAGE,
    INPUT_DIVISOR,
    MEAN_RGB,
    Float32Array,
    Float64Array,
    GraphBuilder,
    Weights,
    check_weights,
    parameter_count,
    read_tfjs_weights,
)

__all__ = [
    "EMBEDDING_SIZE",
    "INPUT_NAME",
    "INPUT_SIZE",
    "MANIFEST_MEMBER",
    "OUTPUT_NAME",
    "RESIDUAL_LAYERS",
    "WEIGHTS_MEMBER",
    "WEIGHTS_SIZE",
    "ResidualSpec",
    "build_face_api_recognition_onnx",
    "check_recognition_weights",
    "convert_face_api_recognition",
    "expected_weight_shapes",
    "multiply_accumulates",
    "parameter_count",
    "read_recognition_weights",
    "reference_forward",
]

MANIFEST_MEMBER: str = "package/model/face_recognition_model-weights_manifest.json"
"""Path of the recognition net's TFJS weights manifest inside the tarball."""
WEIGHTS_MEMBER: str = "package/model/face_recognition_model.bin"
"""Path of its single weights shard inside the tarball (the manifest names it relative to itself)."""
WEIGHTS_SIZE: int = 6_444_032
"""Size in bytes of :data:`WEIGHTS_MEMBER` in the pinned package."""

INPUT_SIZE: int = 150
"""Height and width of the network input; face-api pads and resizes every face to this."""
EMBEDDING_SIZE: int = 128
"""Length of face-api's face descriptor."""

STEM: str = "conv32_down"
"""The 7×7 stride-2 stem convolution (followed by a 3×3 stride-2 max pool)."""
STEM_KERNEL: int = 7
STEM_CHANNELS: int = 32
POOL_KERNEL: int = 3
"""``tf.maxPool(out, 3, 2, 'valid')`` after the stem."""


class ResidualSpec(NamedTuple):
    """One residual layer of ``FaceRecognitionNet.forwardInput``, in call order."""

    name: str
    """Weight prefix, e.g. ``conv64_down``."""
    channels: int
    """Output channels of both 3×3 convolutions."""
    down: bool
    """``residualDown`` (stride-2 'valid' first convolution, average-pooled skip) or ``residual``."""


RESIDUAL_LAYERS: tuple[ResidualSpec, ...] = (
    ResidualSpec("conv32_1", 32, False),
    ResidualSpec("conv32_2", 32, False),
    ResidualSpec("conv32_3", 32, False),
    ResidualSpec("conv64_down", 64, True),
    ResidualSpec("conv64_1", 64, False),
    ResidualSpec("conv64_2", 64, False),
    ResidualSpec("conv64_3", 64, False),
    ResidualSpec("conv128_down", 128, True),
    ResidualSpec("conv128_1", 128, False),
    ResidualSpec("conv128_2", 128, False),
    ResidualSpec("conv256_down", 256, True),
    ResidualSpec("conv256_1", 256, False),
    ResidualSpec("conv256_2", 256, False),
    # Same channel count in and out, yet a residualDown: it halves 4×4 to 2×2.
    ResidualSpec("conv256_down_out", 256, True),
)
"""The residual layers after the stem and max pool, exactly as ``forwardInput`` calls them."""

_FEATURE_CHANNELS = RESIDUAL_LAYERS[-1].channels

INPUT_NAME = "input"
"""Name of the converted model's input tensor."""
OUTPUT_NAME = "embedding"
"""Name of the converted model's output tensor."""
_PRODUCER_NAME = "classlens.model_export.face_api_recognition"
# A fixed version string keeps the output byte-identical while the conversion is unchanged.
_PRODUCER_VERSION = "1"


# ---------------------------------------------------------------------------------------
# Reading and checking the weights
# ---------------------------------------------------------------------------------------

def read_recognition_weights(tarball_bytes: bytes) -> Weights:
    """Verify the tarball and return the recognition network's dequantised, validated weights."""
    weights = read_tfjs_weights(tarball_bytes, MANIFEST_MEMBER, WEIGHTS_MEMBER, WEIGHTS_SIZE)
    check_recognition_weights(weights)
    return weights


def _conv_layer_shapes(prefix: str, kernel: int, channels_in: int, channels_out: int) -> dict[str, tuple[int, ...]]:
    """Weights of one ``convLayer``: HWIO filters, bias, and the scale layer's weights/biases."""
    return {
        f"{prefix}/conv/filters": (kernel, kernel, channels_in, channels_out),
        f"{prefix}/conv/bias": (channels_out,),
        f"{prefix}/scale/weights": (channels_out,),
        f"{prefix}/scale/biases": (channels_out,),
    }


def expected_weight_shapes() -> dict[str, tuple[int, ...]]:
    """Names and TFJS shapes of every weight that face-api's recognition network loads."""
    shapes = _conv_layer_shapes(STEM, STEM_KERNEL, 3, STEM_CHANNELS)
    channels_in = STEM_CHANNELS
    for layer in RESIDUAL_LAYERS:
        shapes.update(_conv_layer_shapes(f"{layer.name}/conv1", 3, channels_in, layer.channels))
        shapes.update(_conv_layer_shapes(f"{layer.name}/conv2", 3, layer.channels, layer.channels))
        channels_in = layer.channels
    shapes["fc"] = (_FEATURE_CHANNELS, EMBEDDING_SIZE)
    return shapes


def check_recognition_weights(weights: Mapping[str, Float32Array]) -> None:
    """Raise :class:`ModelSupplyError` unless the weights are exactly the expected set and shapes."""
    check_weights(weights, expected_weight_shapes(), "recognition")


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------

def _valid_size(size: int, kernel: int, stride: int) -> int:
    """Output size of a 'valid' window (TensorFlow and ONNX's default floor rounding agree)."""
    return (size - kernel) // stride + 1


def _down_sizes(size: int) -> tuple[int, int]:
    """(convolution branch, pooled skip) spatial sizes of a ``residualDown`` on a size×size map."""
    conv_size = _valid_size(size, 3, 2)
    pooled_size = _valid_size(size, 2, 2)
    # residualDown pads the convolution branch by exactly one row and one column when the two
    # differ; any other mismatch would make face-api's tf.add fail, so it cannot occur there.
    if pooled_size - conv_size not in (0, 1):
        raise ValueError(f"residualDown on {size}x{size}: convolution {conv_size}, pool {pooled_size}")
    return conv_size, pooled_size


def multiply_accumulates(size: int = INPUT_SIZE) -> int:
    """Multiply-accumulates per face of the convolutions and the fully connected layer."""
    stem = _valid_size(size, STEM_KERNEL, 2)
    total = stem * stem * STEM_KERNEL * STEM_KERNEL * 3 * STEM_CHANNELS
    size = _valid_size(stem, POOL_KERNEL, 2)
    channels_in = STEM_CHANNELS
    for layer in RESIDUAL_LAYERS:
        conv_size, size = _down_sizes(size) if layer.down else (size, size)
        total += conv_size * conv_size * 9 * (channels_in + layer.channels) * layer.channels
        channels_in = layer.channels
    return total + _FEATURE_CHANNELS * EMBEDDING_SIZE


# ---------------------------------------------------------------------------------------
# ONNX graph
# ---------------------------------------------------------------------------------------

def _conv_layer(graph: GraphBuilder, x: str, weights: Mapping[str, Float32Array], prefix: str,
                stride: int, relu: bool) -> str:
    """``convLayer``: conv2d + bias, then the scale layer, then an optional ReLU.

    Stride 2 means face-api's ``'valid'`` padding, stride 1 its ``'same'`` padding, which for
    a 3×3 kernel at stride 1 is one pixel on every side (symmetric, unlike 'same' at stride 2).
    """
    filters = weights[f"{prefix}/conv/filters"]  # HWIO
    kernel = int(filters.shape[0])
    pad = 0 if stride == 2 else (kernel - 1) // 2
    x = graph.node("Conv", [x, graph.constant(f"{prefix}/conv/W", filters.transpose(3, 2, 0, 1)),
                            graph.constant(f"{prefix}/conv/B", weights[f"{prefix}/conv/bias"])],
                   f"{prefix}/conv", kernel_shape=[kernel, kernel], strides=[stride, stride],
                   pads=[pad] * 4, group=1, dilations=[1, 1])
    # The scale layer stays a separate Mul and Add (not folded into the filters), in face-api's
    # order, so that float32 rounding follows the JS tensors.
    channels = int(filters.shape[3])
    x = graph.node("Mul", [x, graph.constant(f"{prefix}/scale/weights",
                                             weights[f"{prefix}/scale/weights"].reshape(1, channels, 1, 1))],
                   f"{prefix}/scaled")
    x = graph.node("Add", [x, graph.constant(f"{prefix}/scale/biases",
                                             weights[f"{prefix}/scale/biases"].reshape(1, channels, 1, 1))],
                   f"{prefix}/out" if not relu else f"{prefix}/shifted")
    return graph.node("Relu", [x], f"{prefix}/out") if relu else x


def _pads(graph: GraphBuilder, name: str, channels_after: int = 0, spatial_after: int = 0) -> str:
    """An ONNX ``Pad`` pads input (NCHW begins, then ends) that zero-extends at the end only."""
    pads = np.asarray([0, 0, 0, 0, 0, channels_after, spatial_after, spatial_after], dtype=np.int64)
    return graph.constant(name, pads)


def build_face_api_recognition_onnx(weights: Mapping[str, Float32Array]) -> onnx.ModelProto:
    """Build the checked ONNX model of face-api's recognition network from its weights."""
    check_recognition_weights(weights)
    graph = GraphBuilder()
    x = graph.normalised_input()
    x = _conv_layer(graph, x, weights, STEM, 2, relu=True)
    x = graph.node("MaxPool", [x], "stem_pool", kernel_shape=[POOL_KERNEL, POOL_KERNEL], strides=[2, 2],
                   pads=[0, 0, 0, 0])
    size = _valid_size(_valid_size(INPUT_SIZE, STEM_KERNEL, 2), POOL_KERNEL, 2)
    channels_in = STEM_CHANNELS
    for layer in RESIDUAL_LAYERS:
        prefix = layer.name
        if not layer.down:
            out = _conv_layer(graph, x, weights, f"{prefix}/conv1", 1, relu=True)
            out = _conv_layer(graph, out, weights, f"{prefix}/conv2", 1, relu=False)
            summed = graph.node("Add", [out, x], f"{prefix}/sum")
        else:
            conv_size, pooled_size = _down_sizes(size)
            out = _conv_layer(graph, x, weights, f"{prefix}/conv1", 2, relu=True)
            out = _conv_layer(graph, out, weights, f"{prefix}/conv2", 1, relu=False)
            if conv_size != pooled_size:
                # face-api concatenates a zero row (bottom) and a zero column (right) to the
                # convolution branch, after its scale layer, so those positions are exactly 0.
                out = graph.node("Pad", [out, _pads(graph, f"{prefix}/pad_hw", spatial_after=1)],
                                 f"{prefix}/padded", mode="constant")
            skip = graph.node("AveragePool", [x], f"{prefix}/pooled", kernel_shape=[2, 2], strides=[2, 2],
                              pads=[0, 0, 0, 0])
            if layer.channels != channels_in:
                # concat([pooled, zeros(pooled.shape)], 3): the new channels come last, as zeros.
                if layer.channels != 2 * channels_in:
                    raise ValueError(f"{prefix}: face-api only doubles channels in residualDown")
                skip = graph.node("Pad", [skip, _pads(graph, f"{prefix}/pad_c", channels_after=channels_in)],
                                  f"{prefix}/skip", mode="constant")
            summed = graph.node("Add", [skip, out], f"{prefix}/sum")
            size = pooled_size
        x = graph.node("Relu", [summed], f"{prefix}/relu")
        channels_in = layer.channels
    # Opset 17's ReduceMean still takes its axes as an attribute (an input from opset 18).
    x = graph.node("ReduceMean", [x], "global_mean", axes=[2, 3], keepdims=0)
    graph.node("MatMul", [x, graph.constant("fc", weights["fc"])], OUTPUT_NAME)

    return graph.finish(
        "face_api_recognition", INPUT_SIZE, OUTPUT_NAME, EMBEDDING_SIZE,
        doc=f"face-api face recognition network (dlib ResNet) from {FACE_API_PACKAGE} (MIT); "
            f"input RGB 0-255 NCHW {INPUT_SIZE}x{INPUT_SIZE}; output the unnormalised "
            f"{EMBEDDING_SIZE}-d descriptor (compare by euclidean distance)",
        properties={"preprocessing": "pad to square with zeros (extra after), resizeBilinear alignCorners=false "
                                     "halfPixelCenters=false to 150x150, RGB 0-255"})


def convert_face_api_recognition(tarball_bytes: bytes) -> bytes:
    """Verify the pinned face-api tarball and return its face recognition network as ONNX bytes."""
    model = build_face_api_recognition_onnx(read_recognition_weights(tarball_bytes))
    serialised: bytes = model.SerializeToString()
    return serialised


# ---------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------

def _conv_layer_reference(x: Float64Array, weights: Mapping[str, Float32Array], prefix: str,
                          stride: int, relu: bool) -> Float64Array:
    """``convLayer`` in NHWC with HWIO filters, as a sum of shifted matrix products."""
    filters = weights[f"{prefix}/conv/filters"].astype(np.float64)
    kernel = int(filters.shape[0])
    if stride == 1:
        pad = (kernel - 1) // 2
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = _valid_size(x.shape[1], kernel, stride)
    out_w = _valid_size(x.shape[2], kernel, stride)
    total: Float64Array = np.zeros((x.shape[0], out_h, out_w, filters.shape[3]), dtype=np.float64)
    for dy in range(kernel):
        for dx in range(kernel):
            view = x[:, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride, :]
            total += view @ filters[dy, dx]
    total = total + weights[f"{prefix}/conv/bias"].astype(np.float64)
    total = total * weights[f"{prefix}/scale/weights"].astype(np.float64)
    total = total + weights[f"{prefix}/scale/biases"].astype(np.float64)
    return np.maximum(total, 0.0) if relu else total


def _pool_reference(x: Float64Array, kernel: int, reduce: str) -> Float64Array:
    """Stride-2 'valid' max or average pooling of an NHWC map."""
    out_h, out_w = _valid_size(x.shape[1], kernel, 2), _valid_size(x.shape[2], kernel, 2)
    views = np.stack([x[:, dy:dy + 2 * (out_h - 1) + 1:2, dx:dx + 2 * (out_w - 1) + 1:2, :]
                      for dy in range(kernel) for dx in range(kernel)])
    pooled: Float64Array = views.max(axis=0) if reduce == "max" else views.mean(axis=0)
    return pooled


def reference_forward(weights: Mapping[str, Float32Array], pixels: npt.NDArray[Any]) -> Float64Array:
    """Descriptors ``[N, 128]`` for RGB pixels ``[N, 3, 150, 150]`` in 0–255, in float64.

    A direct transcription of ``FaceRecognitionNet.forwardInput`` in face-api's NHWC layout;
    float64 makes it a reference that both float32 implementations (TFJS, ONNX) are held to.
    """
    check_recognition_weights(weights)
    images = np.asarray(pixels, dtype=np.float64)
    if images.ndim != 4 or images.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected pixels [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {images.shape}")
    x = (images.transpose(0, 2, 3, 1) - np.asarray(MEAN_RGB, dtype=np.float64)) / INPUT_DIVISOR
    x = _conv_layer_reference(x, weights, STEM, 2, relu=True)
    x = _pool_reference(x, POOL_KERNEL, "max")
    for layer in RESIDUAL_LAYERS:
        if not layer.down:
            out = _conv_layer_reference(x, weights, f"{layer.name}/conv1", 1, relu=True)
            out = _conv_layer_reference(out, weights, f"{layer.name}/conv2", 1, relu=False)
            x = np.maximum(out + x, 0.0)
            continue
        out = _conv_layer_reference(x, weights, f"{layer.name}/conv1", 2, relu=True)
        out = _conv_layer_reference(out, weights, f"{layer.name}/conv2", 1, relu=False)
        pooled = _pool_reference(x, 2, "mean")
        if out.shape[1] != pooled.shape[1]:
            out = np.pad(out, ((0, 0), (0, 1), (0, 1), (0, 0)))  # zero row below, zero column right
        if out.shape[3] != pooled.shape[3]:
            pooled = np.pad(pooled, ((0, 0), (0, 0), (0, 0), (0, out.shape[3] - pooled.shape[3])))
        x = np.maximum(pooled + out, 0.0)
    descriptors: Float64Array = x.mean(axis=(1, 2)) @ weights["fc"].astype(np.float64)
    return descriptors
