"""Conversion of face-api's expression network (``@vladmandic/face-api@1.7.15``) to ONNX.

The npm package (MIT licence) ships only TensorFlow.js weights for the network:
``package/model/face_expression_model-weights_manifest.json`` (a TFJS weights manifest,
no graph) and ``package/model/face_expression_model.bin`` (329,468 bytes, the weights
quantised to uint8 with a per-tensor ``min``/``scale``; biases stay float32). The graph
is therefore rebuilt here from the package's own TypeScript source:

* ``src/faceFeatureExtractor/FaceFeatureExtractor.ts``: the input (RGB, 0–255, resized
  to 112×112) is normalised as ``(x - [122.782, 117.001, 104.298]) / 255``
  (``src/ops/normalize.ts`` subtracts the per-channel mean, then ``.div(255)``), then
  four dense blocks (``denseBlock4``: 3→32, 32→64, 64→128, 128→256 channels, each
  halving the resolution 112→56→28→14→7) and a 7×7 average pool (stride 2, valid),
  which on the 7×7 map is a global mean;
* ``src/faceFeatureExtractor/denseBlock.ts``: ``out1 = relu(conv0(x))`` with stride 2
  (a plain 3×3 convolution with bias in the first block, a depthwise-separable one in
  the others); then three separable 3×3 convolutions ``conv1..conv3`` at stride 1, each
  fed by the ReLU of the running sum of all previous outputs (a densely connected
  block): ``out2 = c1(out1)``, ``out3 = c2(relu(out1 + out2))``,
  ``out4 = c3(relu(out1 + (out2 + out3)))`` and the block returns
  ``relu(out1 + (out2 + (out3 + out4)))``;
* ``src/common/depthwiseSeparableConv.ts``: ``tf.separableConv2d`` (depthwise 3×3
  without bias, ``'same'`` padding, the block's stride; then pointwise 1×1) plus a bias;
* ``src/faceExpressionNet/FaceExpressionNet.ts`` and ``src/faceProcessor``: a fully
  connected layer 256→7 on the pooled features and a softmax, in the class order of
  :data:`FACE_API_EXPRESSION_LABELS`.

TensorFlow's ``'same'`` padding at stride 2 on an even size pads one row/column at the
bottom/right only (never at the top/left), unlike PyTorch's symmetric ``padding=1``; the
graph uses those asymmetric pads explicitly.

The converted model follows the convention of all ClassLens crop models:

* input ``input``: float32 ``[N, 3, 112, 112]`` (NCHW), raw RGB pixel values 0–255;
  face-api's normalisation is part of the graph;
* output ``probabilities``: float32 ``[N, 7]``, softmax, face-api's class order;
* the batch dimension is symbolic (``N``).

:func:`reference_forward` is a plain numpy forward pass of the same weights in face-api's
own channels_last layout; it documents what each layer computes and is the reference
the parity checks hold the ONNX graph to.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernel.errors import ModelSupplyError

# The tarball's pin lives with the manifest's two face-api entries, which download it.
from model_export.manifest import FACE_API_TARBALL_SHA256

FACE_API_PACKAGE: str = "@vladmandic/face-api@1.7.15"
"""The npm package (``npm pack`` tarball) whose expression weights are converted."""

MANIFEST_MEMBER: str = "package/model/face_expression_model-weights_manifest.json"
"""Path of the TFJS weights manifest inside the tarball."""
WEIGHTS_MEMBER: str = "package/model/face_expression_model.bin"
"""Path of the weights file inside the tarball (the manifest names it relative to itself)."""
WEIGHTS_SIZE: int = 329_468
"""Size in bytes of :data:`WEIGHTS_MEMBER` in the pinned package."""

FACE_API_EXPRESSION_LABELS: tuple[str, ...] = (
    "neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised",
)
"""The seven classes in the order of face-api's outputs (``FACE_EXPRESSION_LABELS``)."""

INPUT_SIZE: int = 112
"""Height and width of the network input; face-api resizes every face to this."""
MEAN_RGB: tuple[float, float, float] = (122.782, 117.001, 104.298)
"""Per-channel mean (R, G, B) that face-api subtracts from 0–255 pixels."""
INPUT_DIVISOR: float = 255.0
"""face-api divides the mean-subtracted pixels by this."""

DENSE_BLOCK_CHANNELS: tuple[tuple[int, int], ...] = ((3, 32), (32, 64), (64, 128), (128, 256))
"""(input, output) channels of the four dense blocks ``dense0``..``dense3``."""
CONVS_PER_BLOCK: int = 4
"""``denseBlock4``: ``conv0`` (strided) and three stride-1 separable convolutions."""
FEATURE_SIZE: int = 256
"""Channels of the pooled features that the fully connected layer reads."""

# Opset 17 and IR version 8 load in every onnxruntime the project supports (>= 1.20);
# the same choice as the other converters in model_export.
ONNX_OPSET: int = 17
"""ONNX operator set version of the converted graph."""
ONNX_IR_VERSION: int = 8
"""ONNX IR version of the converted model file."""
_PRODUCER_NAME = "classlens.model_export.face_api"
# A fixed version string keeps the output byte-identical while the conversion is unchanged.
_PRODUCER_VERSION = "1"

INPUT_NAME = "input"
"""Name of the converted model's input tensor."""
OUTPUT_NAME = "probabilities"
"""Name of the converted model's output tensor."""

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
Weights = dict[str, Float32Array]
"""Dequantised weights by TFJS name, in TFJS layout (HWIO convolutions, [in, out] fc)."""

# Quantised element types that TFJS's decodeWeights dequantises with min/scale, and the
# numpy type of their stored values (little-endian, as TFJS writes them).
_MIN_SCALE_QUANTISATION: Mapping[str, np.dtype[Any]] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
}


# ---------------------------------------------------------------------------------------
# Reading the tarball
# ---------------------------------------------------------------------------------------

def verify_tarball(tarball_bytes: bytes) -> None:
    """Raise :class:`ModelSupplyError` unless the bytes are the pinned face-api tarball."""
    digest = hashlib.sha256(tarball_bytes).hexdigest()
    if digest != FACE_API_TARBALL_SHA256:
        raise ModelSupplyError(
            f"{FACE_API_PACKAGE} tarball has sha256 {digest}, expected {FACE_API_TARBALL_SHA256}; "
            "pull it again (`classlens models pull face-api-expression`) or import the original file")


def read_members(tarball_bytes: bytes, names: Sequence[str]) -> dict[str, bytes]:
    """Read the named regular files from a .tgz held in memory (nothing touches the disk)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball_bytes), mode="r:gz") as archive:
            for name in names:
                try:
                    member = archive.getmember(name)
                except KeyError:
                    raise ModelSupplyError(f"{FACE_API_PACKAGE} tarball has no {name}") from None
                # Only a regular file is read: a link could point anywhere in the archive.
                stream = archive.extractfile(member) if member.isfile() else None
                if stream is None:
                    raise ModelSupplyError(f"{name} in the {FACE_API_PACKAGE} tarball is not a regular file")
                found[name] = stream.read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ModelSupplyError(f"cannot read the {FACE_API_PACKAGE} tarball: {error}") from error
    return found


def read_tfjs_weights(tarball_bytes: bytes, manifest_member: str, weights_member: str, weights_size: int) -> Weights:
    """Verify the tarball and return one network's dequantised weights, read as TFJS reads them.

    ``manifest_member`` is the network's TFJS weights manifest in the tarball;
    ``weights_member`` its (first) weights file, which must be ``weights_size`` bytes.
    """
    verify_tarball(tarball_bytes)
    manifest_bytes = read_members(tarball_bytes, [manifest_member])[manifest_member]
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as error:
        raise ModelSupplyError(f"{manifest_member} is not valid JSON: {error}") from error
    if not isinstance(manifest, list) or not all(isinstance(group, dict) for group in manifest):
        raise ModelSupplyError(f"{manifest_member} is not a list of weight groups")
    # The manifest names its weight files relative to its own folder, as TFJS resolves them.
    folder = posixpath.dirname(manifest_member)
    group_paths = [_group_paths(group) for group in manifest]
    files = read_members(tarball_bytes, [posixpath.join(folder, path) for paths in group_paths for path in paths])
    if len(files.get(weights_member, b"")) != weights_size:
        raise ModelSupplyError(f"{weights_member} is not the {weights_size}-byte file of {FACE_API_PACKAGE}")
    weights: Weights = {}
    for group, paths in zip(manifest, group_paths, strict=True):
        # TFJS concatenates a group's shard files and decodes its weights from the result.
        buffer = b"".join(files[posixpath.join(folder, path)] for path in paths)
        weights.update(decode_tfjs_weights(buffer, group.get("weights")))
    return weights


def read_expression_weights(tarball_bytes: bytes) -> Weights:
    """Verify the tarball and return the expression network's dequantised, validated weights."""
    weights = read_tfjs_weights(tarball_bytes, MANIFEST_MEMBER, WEIGHTS_MEMBER, WEIGHTS_SIZE)
    check_expression_weights(weights)
    return weights


def _group_paths(group: Any) -> list[str]:
    """The shard file names of one manifest group, validated."""
    paths = group.get("paths") if isinstance(group, dict) else None
    if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
        raise ModelSupplyError("face-api weights manifest: a weight group has no list of paths")
    return paths


def decode_tfjs_weights(buffer: bytes, specs: Any) -> Weights:
    """Decode one TFJS weight group exactly as ``tf.io.decodeWeights`` does.

    Each entry is read in order from ``buffer``. Unquantised float32 values are copied;
    uint8/uint16-quantised ones are dequantised as ``q * scale + min``, evaluated in
    double precision (JavaScript numbers) and then stored as float32, which the float64
    arithmetic below followed by one rounding reproduces bit for bit.
    """
    if not isinstance(specs, list):
        raise ModelSupplyError("face-api weights manifest: a weight group has no list of weights")
    weights: Weights = {}
    offset = 0
    for spec in specs:
        name, shape, dtype = spec.get("name"), spec.get("shape"), spec.get("dtype")
        if not isinstance(name, str) or not isinstance(shape, list) or dtype != "float32":
            raise ModelSupplyError(f"face-api weights manifest: unsupported weight entry {spec!r}")
        count = int(np.prod(shape, dtype=np.int64))
        quantization = spec.get("quantization")
        if quantization is None:
            stored = np.dtype("<f4")
        elif quantization.get("dtype") in _MIN_SCALE_QUANTISATION:
            stored = _MIN_SCALE_QUANTISATION[quantization["dtype"]]
        else:
            # float16 and other schemes do not occur in this package; refuse rather than guess.
            raise ModelSupplyError(f"face-api weights manifest: {name} has unsupported quantization {quantization!r}")
        size = count * stored.itemsize
        if offset + size > len(buffer):
            raise ModelSupplyError(f"face-api weights manifest: weights end before {name}")
        raw = np.frombuffer(buffer, dtype=stored, count=count, offset=offset)
        offset += size
        if quantization is None:
            values: Float32Array = raw.astype(np.float32)
        else:
            dequantised = raw.astype(np.float64) * float(quantization["scale"]) + float(quantization["min"])
            values = dequantised.astype(np.float32)
        weights[name] = values.reshape(shape)
    if offset != len(buffer):
        raise ModelSupplyError(f"face-api weights manifest: {len(buffer) - offset} bytes left after the last weight")
    return weights


def expected_weight_shapes(classes: int = len(FACE_API_EXPRESSION_LABELS)) -> dict[str, tuple[int, ...]]:
    """Names and TFJS shapes of every weight of face-api's expression network (with ``classes`` outputs)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for block, (channels_in, channels_out) in enumerate(DENSE_BLOCK_CHANNELS):
        for conv in range(CONVS_PER_BLOCK):
            prefix = f"dense{block}/conv{conv}"
            conv_in = channels_in if conv == 0 else channels_out
            if block == 0 and conv == 0:
                # The first convolution of the network is a plain 3×3 one (RGB has 3 channels).
                shapes[f"{prefix}/filters"] = (3, 3, conv_in, channels_out)
            else:
                shapes[f"{prefix}/depthwise_filter"] = (3, 3, conv_in, 1)
                shapes[f"{prefix}/pointwise_filter"] = (1, 1, conv_in, channels_out)
            shapes[f"{prefix}/bias"] = (channels_out,)
    shapes["fc/weights"] = (FEATURE_SIZE, classes)
    shapes["fc/bias"] = (classes,)
    return shapes


def check_weights(weights: Mapping[str, Float32Array], expected: Mapping[str, tuple[int, ...]], network: str) -> None:
    """Raise :class:`ModelSupplyError` unless ``weights`` are exactly the ``expected`` names and shapes, finite."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ModelSupplyError(f"face-api {network} weights: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ModelSupplyError(f"face-api {network} weight {name} has shape {weights[name].shape}, "
                                   f"expected {shape}")
        if not np.all(np.isfinite(weights[name])):
            raise ModelSupplyError(f"face-api {network} weight {name} is not finite")


def check_expression_weights(weights: Mapping[str, Float32Array]) -> None:
    """Raise :class:`ModelSupplyError` unless the weights are exactly the expected set and shapes."""
    check_weights(weights, expected_weight_shapes(), "expression")


def parameter_count(weights: Mapping[str, Float32Array]) -> int:
    """Total number of parameters (the network has no other state)."""
    return sum(int(value.size) for value in weights.values())


# ---------------------------------------------------------------------------------------
# ONNX graph
# ---------------------------------------------------------------------------------------

class GraphBuilder:
    """Collects ONNX nodes and initialisers with unique, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: npt.NDArray[Any]) -> str:
        """Add an initialiser and return its name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attributes: Any) -> str:
        """Add a node with one output and return the output's name."""
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attributes))
        return output

    def conv(self, x: str, name: str, weight_oihw: Float32Array, bias: Float32Array | None,
             stride: int, groups: int = 1) -> str:
        """A convolution with TensorFlow's ``'same'`` padding for a 3×3 (or 1×1) kernel."""
        kernel = int(weight_oihw.shape[-1])
        if kernel == 1:
            pads = [0, 0, 0, 0]
        elif stride == 1:
            pads = [1, 1, 1, 1]
        else:
            # 'same' at stride 2 on an even size needs one extra row/column in total and
            # TensorFlow puts it at the bottom/right: [top, left, bottom, right] = [0, 0, 1, 1].
            pads = [0, 0, 1, 1]
        inputs = [x, self.constant(f"{name}/W", weight_oihw)]
        if bias is not None:
            inputs.append(self.constant(f"{name}/B", bias))
        return self.node("Conv", inputs, name, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=pads, group=groups, dilations=[1, 1])

    def normalised_input(self, grey: bool = False) -> str:
        """face-api's input normalisation of :data:`INPUT_NAME`: ``(x - MEAN_RGB) / 255``.

        Sub then Div (not a folded Mul by 1/255), in the order face-api applies them, so the
        float32 results match its tensors to the last bit. It is not folded into the first
        convolution because that convolution's zero padding lives in normalised space. A
        ``grey`` input (one channel) is repeated to the three channels first.
        """
        source = INPUT_NAME
        if grey:
            source = self.node("Concat", [INPUT_NAME, INPUT_NAME, INPUT_NAME], "grey_as_rgb", axis=1)
        mean = np.asarray(MEAN_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
        x = self.node("Sub", [source, self.constant("mean_rgb", mean)], "centred")
        return self.node("Div", [x, self.constant("divisor", np.asarray(INPUT_DIVISOR, dtype=np.float32))],
                         "normalised")

    def finish(self, name: str, input_size: int, output: str, output_size: int, *, doc: str,
               properties: Mapping[str, str], channels: int = 3) -> onnx.ModelProto:
        """The checked model: input ``[N, C, S, S]``, one output ``[N, output_size]``, the source in its metadata."""
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                           ["N", channels, input_size, input_size])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", output_size])],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name=_PRODUCER_NAME,
            producer_version=_PRODUCER_VERSION, ir_version=ONNX_IR_VERSION, doc_string=doc)
        helper.set_model_props(model, {
            **properties, "source": f"npm:{FACE_API_PACKAGE} sha256:{FACE_API_TARBALL_SHA256}"})
        onnx.checker.check_model(model, full_check=True)
        return model

    def separable(self, x: str, prefix: str, weights: Mapping[str, Float32Array], stride: int) -> str:
        """``depthwiseSeparableConv``: depthwise 3×3 (no bias), pointwise 1×1, plus bias."""
        depthwise = weights[f"{prefix}/depthwise_filter"]  # [3, 3, C, 1]
        pointwise = weights[f"{prefix}/pointwise_filter"]  # [1, 1, C, out]
        channels = int(depthwise.shape[2])
        x = self.conv(x, f"{prefix}/depthwise", depthwise.transpose(2, 3, 0, 1), None, stride, groups=channels)
        return self.conv(x, f"{prefix}/pointwise", pointwise.transpose(3, 2, 0, 1), weights[f"{prefix}/bias"], 1)


def build_face_api_expression_onnx(weights: Mapping[str, Float32Array], *, grey: bool = False,
                                   labels: Sequence[str] = FACE_API_EXPRESSION_LABELS) -> onnx.ModelProto:
    """Build the checked ONNX model of face-api's expression network from its weights.

    The defaults build face-api's own network. A network fine-tuned from it
    (:class:`training.emotion_models.FaceApiEmotionNet`) passes its weights in the same TFJS
    layout, ``grey=True`` for its one-channel input and its own output ``labels``.
    """
    check_weights(weights, expected_weight_shapes(len(labels)), "expression")
    graph = GraphBuilder()
    x = graph.normalised_input(grey)
    for block in range(len(DENSE_BLOCK_CHANNELS)):
        prefix = f"dense{block}"
        if block == 0:
            filters = weights[f"{prefix}/conv0/filters"]  # HWIO
            conv0 = graph.conv(x, f"{prefix}/conv0", filters.transpose(3, 2, 0, 1),
                               weights[f"{prefix}/conv0/bias"], 2)
        else:
            conv0 = graph.separable(x, f"{prefix}/conv0", weights, 2)
        out1 = graph.node("Relu", [conv0], f"{prefix}/out1")
        out2 = graph.separable(out1, f"{prefix}/conv1", weights, 1)
        # The additions keep denseBlock4's nesting, a + (b + (c + d)), so float rounding matches.
        in3 = graph.node("Relu", [graph.node("Add", [out1, out2], f"{prefix}/sum12")], f"{prefix}/in3")
        out3 = graph.separable(in3, f"{prefix}/conv2", weights, 1)
        sum23 = graph.node("Add", [out2, out3], f"{prefix}/sum23")
        in4 = graph.node("Relu", [graph.node("Add", [out1, sum23], f"{prefix}/sum123")], f"{prefix}/in4")
        out4 = graph.separable(in4, f"{prefix}/conv3", weights, 1)
        sum34 = graph.node("Add", [out3, out4], f"{prefix}/sum34")
        sum234 = graph.node("Add", [out2, sum34], f"{prefix}/sum234")
        x = graph.node("Relu", [graph.node("Add", [out1, sum234], f"{prefix}/sum1234")], f"{prefix}/out")
    # tf.avgPool([7, 7], [2, 2], 'valid') on the 7×7 map: a single window, i.e. the mean.
    x = graph.node("AveragePool", [x], "pooled", kernel_shape=[7, 7], strides=[2, 2], pads=[0, 0, 0, 0])
    x = graph.node("Flatten", [x], "features", axis=1)
    x = graph.node("Gemm", [x, graph.constant("fc/weights", weights["fc/weights"]),
                            graph.constant("fc/bias", weights["fc/bias"])], "logits")
    graph.node("Softmax", [x], OUTPUT_NAME, axis=-1)

    return graph.finish(
        "face_api_expression", INPUT_SIZE, OUTPUT_NAME, len(labels), channels=1 if grey else 3,
        doc=f"face-api expression network from {FACE_API_PACKAGE} (MIT); input {'grey' if grey else 'RGB'} "
            f"0-255 NCHW; labels {','.join(labels)}",
        properties={"labels": json.dumps(list(labels))})


def expression_weights_from_onnx(model: onnx.ModelProto) -> Weights:
    """The TFJS-layout weights of a graph that :func:`build_face_api_expression_onnx` built (its inverse).

    This is how a fine-tuned network shipped as ONNX (``classlens-emotion-v1``) becomes a
    starting point for training again. Raises :class:`ModelSupplyError` when the graph is not
    one of ours (a missing or misshapen weight).
    """
    from onnx import numpy_helper

    stored = {tensor.name: numpy_helper.to_array(tensor).astype(np.float32) for tensor in model.graph.initializer}

    def take(name: str) -> Float32Array:
        if name not in stored:
            raise ModelSupplyError(f"not a face-api expression graph: it has no weight {name!r}")
        return np.ascontiguousarray(stored[name])

    weights: dict[str, Float32Array] = {}
    for block in range(len(DENSE_BLOCK_CHANNELS)):
        for conv in range(4):
            prefix = f"dense{block}/conv{conv}"
            if block == 0 and conv == 0:
                weights[f"{prefix}/filters"] = np.ascontiguousarray(take(f"{prefix}/W").transpose(2, 3, 1, 0))
                weights[f"{prefix}/bias"] = take(f"{prefix}/B")
            else:
                # The builder's transposes undone: depthwise [C,1,3,3] → [3,3,C,1], pointwise [out,C,1,1] → [1,1,C,out].
                weights[f"{prefix}/depthwise_filter"] = np.ascontiguousarray(
                    take(f"{prefix}/depthwise/W").transpose(2, 3, 0, 1))
                weights[f"{prefix}/pointwise_filter"] = np.ascontiguousarray(
                    take(f"{prefix}/pointwise/W").transpose(2, 3, 1, 0))
                weights[f"{prefix}/bias"] = take(f"{prefix}/pointwise/B")
    weights["fc/weights"], weights["fc/bias"] = take("fc/weights"), take("fc/bias")
    check_weights(weights, expected_weight_shapes(int(weights["fc/bias"].shape[0])), "expression")
    return weights


def convert_face_api_expression(tarball_bytes: bytes) -> bytes:
    """Verify the pinned face-api tarball and return its expression network as ONNX bytes."""
    serialised: bytes = build_face_api_expression_onnx(read_expression_weights(tarball_bytes)).SerializeToString()
    return serialised


# ---------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------

def _pad_same(x: Float64Array, stride: int) -> Float64Array:
    """Zero-pad an NHWC map for a 3×3 kernel as TensorFlow's ``'same'`` does."""
    height, width = x.shape[1], x.shape[2]

    def before_after(size: int) -> tuple[int, int]:
        out = -(-size // stride)
        total = max((out - 1) * stride + 3 - size, 0)
        return total // 2, total - total // 2  # the odd row/column goes after

    return np.pad(x, ((0, 0), before_after(height), before_after(width), (0, 0)))


def _windows(x: Float64Array, stride: int) -> list[tuple[int, int, Float64Array]]:
    """The nine shifted views (dy, dx, view) that a 3×3 'same' convolution sums over."""
    padded = _pad_same(x, stride)
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    return [(dy, dx, padded[:, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride, :])
            for dy in range(3) for dx in range(3)]


def _conv3x3(x: Float64Array, filters: Float32Array, bias: Float32Array, stride: int) -> Float64Array:
    """``tf.conv2d(x, filters, stride, 'same') + bias`` in NHWC with HWIO filters."""
    total: Float64Array = np.zeros((), dtype=np.float64)
    for dy, dx, view in _windows(x, stride):
        total = total + view @ filters[dy, dx].astype(np.float64)
    return total + bias.astype(np.float64)


def _separable(x: Float64Array, weights: Mapping[str, Float32Array], prefix: str, stride: int) -> Float64Array:
    """``depthwiseSeparableConv``: per-channel 3×3, then 1×1 across channels, then bias."""
    depthwise = weights[f"{prefix}/depthwise_filter"].astype(np.float64)
    mixed: Float64Array = np.zeros((), dtype=np.float64)
    for dy, dx, view in _windows(x, stride):
        mixed = mixed + view * depthwise[dy, dx, :, 0]
    pointwise = weights[f"{prefix}/pointwise_filter"][0, 0].astype(np.float64)
    out: Float64Array = mixed @ pointwise + weights[f"{prefix}/bias"].astype(np.float64)
    return out


def reference_forward(weights: Mapping[str, Float32Array], pixels: npt.NDArray[Any]) -> Float64Array:
    """Probabilities ``[N, 7]`` for RGB pixels ``[N, 3, 112, 112]`` in 0–255, in float64.

    A direct transcription of face-api's forward pass in its own NHWC layout; float64
    makes it a reference that both float32 implementations (TFJS, ONNX) are compared to.
    """
    check_expression_weights(weights)
    images = np.asarray(pixels, dtype=np.float64)
    if images.ndim != 4 or images.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected pixels [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {images.shape}")
    x = (images.transpose(0, 2, 3, 1) - np.asarray(MEAN_RGB, dtype=np.float64)) / INPUT_DIVISOR

    def relu(value: Float64Array) -> Float64Array:
        return np.maximum(value, 0.0)

    for block in range(len(DENSE_BLOCK_CHANNELS)):
        prefix = f"dense{block}"
        if block == 0:
            conv0 = _conv3x3(x, weights[f"{prefix}/conv0/filters"], weights[f"{prefix}/conv0/bias"], 2)
        else:
            conv0 = _separable(x, weights, f"{prefix}/conv0", 2)
        out1 = relu(conv0)
        out2 = _separable(out1, weights, f"{prefix}/conv1", 1)
        out3 = _separable(relu(out1 + out2), weights, f"{prefix}/conv2", 1)
        out4 = _separable(relu(out1 + (out2 + out3)), weights, f"{prefix}/conv3", 1)
        x = relu(out1 + (out2 + (out3 + out4)))
    features = x.mean(axis=(1, 2))  # the 7×7 average pool over the whole 7×7 map
    logits = features @ weights["fc/weights"].astype(np.float64) + weights["fc/bias"].astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: Float64Array = shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


# ---------------------------------------------------------------------------------------
# The runtime's contract
# ---------------------------------------------------------------------------------------

FACE_API_TO_PRODUCT: dict[str, str] = {
    "neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry",
    "fearful": "fear", "disgusted": "disgust", "surprised": "surprise",
}
"""face-api class name → the product's emotion class name."""

RUNTIME_INPUT_SPEC: dict[str, object] = {
    "kind": "image", "channels": 3, "size": INPUT_SIZE, "colour": "rgb", "value_range": "0-255",
    "crop_fraction": 0.9,
}
"""What :class:`workers.runners.EmotionRunner` feeds the converted model (``classlens.input_spec``)."""


def product_order() -> list[int]:
    """Index into face-api's outputs of each product class, in the product's order."""
    from kernel.types import EMOTION_LABELS

    by_product = {product: FACE_API_EXPRESSION_LABELS.index(name) for name, product in FACE_API_TO_PRODUCT.items()}
    return [by_product[label] for label in EMOTION_LABELS]


def convert_face_api_for_runtime(tarball_bytes: bytes) -> bytes:
    """face-api's expression network with outputs in the product's class order and its input spec.

    The fully connected layer's columns are permuted (the softmax is unchanged by that), and
    the metadata the emotion runner reads is set: ``classlens.labels`` and
    ``classlens.input_spec`` (RGB 112×112 of the centred 90 % of the aligned crop).
    """
    from kernel.types import EMOTION_LABELS

    weights = dict(read_expression_weights(tarball_bytes))
    order = product_order()
    weights["fc/weights"] = np.ascontiguousarray(weights["fc/weights"][:, order])
    weights["fc/bias"] = np.ascontiguousarray(weights["fc/bias"][order])
    model = build_face_api_expression_onnx(weights)
    del model.metadata_props[:]
    helper.set_model_props(model, {
        "classlens.labels": json.dumps(list(EMOTION_LABELS)),
        "classlens.input_spec": json.dumps(RUNTIME_INPUT_SPEC, sort_keys=True),
        "classlens.task": "emotion",
        "source": f"npm:{FACE_API_PACKAGE} sha256:{FACE_API_TARBALL_SHA256}",
    })
    onnx.checker.check_model(model, full_check=True)
    serialised: bytes = model.SerializeToString()
    return serialised
