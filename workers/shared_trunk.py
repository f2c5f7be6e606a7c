"""Two crop models that share their first layers, run as one graph.

The default engagement model was grown from the default emotion model with its first three
blocks frozen (docs/models.md), so both compute the very same features for most of their
work: 85 % of each model's time per crop at batch 32 on the CPU. :func:`fuse_shared_trunk`
finds the layers two ONNX graphs have in common (same operators, same attributes, same
weights, fed by the same input) and builds one graph that runs them once and then both
heads. :class:`SharedTrunkRunner` runs that graph and is used only after it has given the
two models' own outputs on a probe batch; otherwise each model runs alone, as before.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kernel.runtime import create_session
from kernel.types import CROP_SIZE, ByteArray, FloatArray
from workers.runners import EmotionRunner, EngagementRunner

logger = logging.getLogger(__name__)

#: Largest difference from the separate models' outputs that the fused graph may show on the
#: probe batch (float32 arithmetic of the same operations, possibly fused differently).
PARITY_TOLERANCE = 1e-5

#: Prefix of the second model's own tensors in the fused graph.
SECOND_PREFIX = "second/"


def _attributes(node: Any) -> list[bytes]:
    return sorted(attribute.SerializeToString() for attribute in node.attribute)


def fuse_shared_trunk(first: Any, second: Any) -> tuple[Any, int] | None:
    """One ONNX graph computing both models' outputs, their common first layers once.

    Nodes are compared in the graphs' own (topological) order from the start: a node of
    ``second`` is shared when its operator and attributes equal ``first``'s node at the same
    place and each input is either the corresponding shared tensor or an initializer with the
    same values. The fused graph keeps ``first``'s input and outputs, then ``second``'s outputs
    under :data:`SECOND_PREFIX`. Returns the model and the number of shared nodes, or None
    when the models share nothing or differ in opsets or inputs.
    """
    import onnx
    from onnx import numpy_helper

    if ([(o.domain, o.version) for o in first.opset_import] != [(o.domain, o.version) for o in second.opset_import]
            or len(first.graph.input) != 1 or len(second.graph.input) != 1
            or first.graph.input[0].type != second.graph.input[0].type):
        return None
    first_weights = {t.name: numpy_helper.to_array(t) for t in first.graph.initializer}
    second_weights = {t.name: t for t in second.graph.initializer}
    renamed: dict[str, str] = {str(second.graph.input[0].name): str(first.graph.input[0].name)}

    def same_input(mine: str, theirs: str) -> bool:
        if mine in renamed:
            return renamed[mine] == theirs
        if mine in second_weights and theirs in first_weights:
            values = numpy_helper.to_array(second_weights[mine])
            other = first_weights[theirs]
            return bool(values.dtype == other.dtype and values.shape == other.shape
                        and np.array_equal(values, other))
        return mine == theirs == ""

    shared = 0
    for mine, theirs in zip(second.graph.node, first.graph.node, strict=False):
        if (mine.op_type != theirs.op_type or mine.domain != theirs.domain or len(mine.input) != len(theirs.input)
                or len(mine.output) != len(theirs.output) or _attributes(mine) != _attributes(theirs)
                or not all(same_input(a, b) for a, b in zip(mine.input, theirs.input, strict=True))):
            break
        renamed.update(zip(mine.output, theirs.output, strict=True))
        shared += 1
    if shared in (0, len(second.graph.node)):
        return None  # nothing in common, or the same model twice

    def name(tensor: str) -> str:
        return renamed.get(tensor, SECOND_PREFIX + tensor if tensor else tensor)

    graph = onnx.GraphProto()
    graph.CopyFrom(first.graph)
    graph.name = f"{first.graph.name}+{second.graph.name}"
    used: set[str] = set()
    for node in list(second.graph.node)[shared:]:
        copy = graph.node.add()
        copy.CopyFrom(node)
        copy.name = SECOND_PREFIX + node.name
        del copy.input[:]
        copy.input.extend(name(tensor) for tensor in node.input)
        del copy.output[:]
        copy.output.extend(name(tensor) for tensor in node.output)
        used.update(tensor for tensor in node.input if tensor in second_weights and tensor not in renamed)
    for tensor in used:
        weight = graph.initializer.add()
        weight.CopyFrom(second_weights[tensor])
        weight.name = SECOND_PREFIX + tensor
    for output in second.graph.output:
        copy = graph.output.add()
        copy.CopyFrom(output)
        copy.name = name(output.name)
    fused = onnx.helper.make_model(graph, opset_imports=list(first.opset_import))
    fused.ir_version = first.ir_version
    onnx.checker.check_model(fused)
    return fused, shared


class SharedTrunkRunner:
    """The emotion model and a crop-reading engagement model run as one graph over the same crops."""

    def __init__(self, session: Any, emotion: EmotionRunner, engagement: EngagementRunner, shared_nodes: int) -> None:
        self.session = session
        self.emotion = emotion
        """The emotion runner whose input preparation both models share."""
        self.engagement = engagement
        """The engagement runner whose outputs the graph's second head gives."""
        self.shared_nodes = shared_nodes
        """Nodes the two models have in common and the fused graph runs once."""
        self.input_name: str = session.get_inputs()[0].name
        self.output_names = [emotion.output_name, SECOND_PREFIX + engagement.output_name]

    @classmethod
    def fused(cls, emotion: EmotionRunner, engagement: EngagementRunner, *, preference: str = "auto",
              intra_op_threads: int = 0) -> SharedTrunkRunner | None:
        """The two models as one graph, or None when they cannot share their work.

        They can when the engagement model reads crops prepared exactly as the emotion model's
        (size, colour, framing, value range), their graphs begin with the same layers, and the
        fused graph reproduces both models' outputs on a probe batch.
        """
        import onnx

        if engagement.input_kind != "image" or (
                engagement.size, engagement.colour, engagement.crop_fraction, engagement.value_range) != (
                emotion.size, emotion.colour, emotion.crop_fraction, emotion.value_range):
            return None
        result = fuse_shared_trunk(onnx.load(str(emotion.model_path)), onnx.load(str(engagement.model_path)))
        if result is None:
            return None
        model, shared = result
        session = create_session(model.SerializeToString(), preference=preference, intra_op_threads=intra_op_threads,
                                 label=f"emotion and engagement models, {shared} layers shared")
        runner = cls(session, emotion, engagement, shared)
        probe = np.random.default_rng(0).integers(0, 256, (4, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        emotions, levels = runner.predict(probe)
        expected = emotion.predict(probe), engagement.predict(np.zeros((len(probe), 0), np.float32), probe)
        difference = max(float(np.abs(emotions - expected[0]).max()), float(np.abs(levels - expected[1]).max()))
        if difference > PARITY_TOLERANCE:
            logger.warning("the fused emotion and engagement graph differs from the models by %.2g; "
                           "running them separately", difference)
            return None
        return runner

    def predict(self, crops: ByteArray) -> tuple[FloatArray, FloatArray]:
        """Emotion probabilities [N,7] and engagement level probabilities [N,4] for BGR crops."""
        first, second = self.session.run(self.output_names, {self.input_name: self.emotion.preprocess(crops)})
        return np.asarray(first, np.float32), np.asarray(second, np.float32)
