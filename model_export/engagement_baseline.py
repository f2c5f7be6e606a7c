"""The default engagement model: a transparent heuristic baseline, built as ONNX by code.

This model is NOT trained on DAiSEE or on any other data set. No engagement model
trained on DAiSEE (or EngageNet) can be obtained here, so the default is a hand-written
rule over attention cues (head yaw and pitch, closed eyes, gaze away from the screen)
and, when emotion inference is on, the seven FER2013 emotion probabilities. Its output
uses DAiSEE's four engagement levels so that a trained model can replace it without
changing anything downstream; its constants are judgement calls, stated and explained
below, not fitted values, and its accuracy on DAiSEE is unknown.

The rule: a score ``s`` starts at 3 (the top level) and loses points for cues of
disengagement,

    s = 3 − 1.5·clip((yaw − 20) / 25, 0, 1) − 1.0·clip((pitch − 15) / 20, 0, 1)
          − 1.5·eyes_closed − 1.0·gaze_away
          + 0.3·(happy + surprise) − 0.3·(sad + angry + disgust + fear),

and is turned into ordinal level probabilities with
``P(level ≥ k) = sigmoid(4·(s − (k − 0.5)))`` for k = 1, 2, 3, so
``probabilities = [1 − P1, P1 − P2, P2 − P3, P3]``.

Model I/O: input ``features`` float32 [N, 11] in the order of
:data:`ENGAGEMENT_FEATURES`; output ``probabilities`` float32 [N, 4] over
:data:`ENGAGEMENT_LEVELS`. The batch dimension is symbolic. The graph uses elementwise
operators only (no MatMul), so no GPU math mode (e.g. TF32) can change the result.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernel.types import ENGAGEMENT_FEATURES, ENGAGEMENT_LEVELS

BASELINE_DESCRIPTION: str = (
    "This engagement model is a transparent heuristic baseline. It is NOT trained on DAiSEE "
    "or on any other data set. On DAiSEE Validation frames it scored a balanced accuracy of "
    "0.24 over the four levels (chance is 0.25) and an AUC of 0.57 for engaged against not "
    "engaged; it almost always says 'very high'. It starts "
    "every face at the top of DAiSEE's four engagement levels (0 very low, 1 low, 2 high, "
    "3 very high) and subtracts points for cues of disengagement: the head turned sideways "
    "by more than 20 degrees (up to 1.5 points, reached at 45 degrees), the head tilted up "
    "or down by more than 15 degrees (up to 1 point, at 35 degrees), closed eyes (up to 1.5 "
    "points) and gaze away from the screen (up to 1 point). When emotion recognition is on, "
    "happiness and surprise add at most 0.3 points and sadness, anger, disgust and fear "
    "subtract at most 0.3 points; with it off, emotions play no part. The score becomes "
    "probabilities of the four levels through a smooth ordinal step at 0.5, 1.5 and 2.5. "
    "All constants are stated judgement calls, not fitted values; read its levels as a "
    "rough signal of attention; the trained classlens-engagement-v1 measured better."
)
"""A paragraph for the model manifest and reports, saying plainly what this model is."""

# --- the score -------------------------------------------------------------------------

# Start at the top level: a frontal face with open eyes looking at the screen is the
# best evidence of engagement a camera can give, and nothing below adds to it except
# a little positive affect.
BASE_SCORE: float = 3.0
"""Score of an attentive frontal face before any penalty or bonus."""

# Turning the head up to 20° is normal while watching a screen (glancing at another
# window, a second monitor's edge); beyond it the penalty ramps linearly over 25° to its
# full value at 45°, where the face is clearly turned away from the screen.
YAW_FREE_DEG: float = 20.0
"""Absolute yaw (degrees) below which the head turn costs nothing."""
YAW_RAMP_DEG: float = 25.0
"""Degrees beyond :data:`YAW_FREE_DEG` over which the yaw penalty reaches its full value."""
# A face turned away is the strongest head cue, worth one and a half levels.
YAW_PENALTY: float = 1.5
"""Full yaw penalty, in levels."""

# Webcams sit above or below the screen, so some pitch is normal; beyond 15° the penalty
# ramps over 20° to 35° (looking down at a desk or a phone). Looking down is also what
# note-taking looks like, hence a smaller penalty than for yaw.
PITCH_FREE_DEG: float = 15.0
"""Absolute pitch (degrees) below which tilting the head costs nothing."""
PITCH_RAMP_DEG: float = 20.0
"""Degrees beyond :data:`PITCH_FREE_DEG` over which the pitch penalty reaches its full value."""
PITCH_PENALTY: float = 1.0
"""Full pitch penalty, in levels."""

# Eyes closed in a sampled frame are the clearest single sign of drowsiness; blinks are
# brief and rarely sampled, so a high probability costs one and a half levels.
EYES_CLOSED_PENALTY: float = 1.5
"""Penalty for eyes certainly closed (scaled by the probability)."""
# Gaze away with a frontal head (reading a phone below the camera, looking at another
# person) is a weaker cue than a turned head, because gaze estimates are noisier.
GAZE_AWAY_PENALTY: float = 1.0
"""Penalty for gaze certainly away from the screen (scaled by the probability)."""

# Emotion is a weak and noisy cue of engagement (and is switched off where the law
# forbids it), so it may move the score by at most 0.3, less than half a level: positive
# affect (happiness, surprise) tends to go with involvement, negative affect with
# frustration or boredom. Neutral is the usual face of an attentive student and counts 0.
POSITIVE_EMOTIONS: tuple[str, ...] = ("happy", "surprise")
"""Emotions whose probabilities add to the score."""
NEGATIVE_EMOTIONS: tuple[str, ...] = ("sad", "angry", "disgust", "fear")
"""Emotions whose probabilities subtract from the score."""
POSITIVE_EMOTION_BONUS: float = 0.3
"""Score added per unit of summed positive-emotion probability."""
NEGATIVE_EMOTION_PENALTY: float = 0.3
"""Score subtracted per unit of summed negative-emotion probability."""

# --- from score to level probabilities --------------------------------------------------

# Level k is reached when the score passes k − 0.5, i.e. the score rounds to the level.
LEVEL_THRESHOLDS: tuple[float, float, float] = (0.5, 1.5, 2.5)
"""Scores at which P(level ≥ 1), P(level ≥ 2) and P(level ≥ 3) are one half."""
# A slope of 4 moves P(level ≥ k) from 0.12 to 0.88 over one level of score (±0.5
# around a threshold): soft enough to show uncertainty, sharp enough that the most
# likely level is the rounded score.
LEVEL_SLOPE: float = 4.0
"""Steepness of the ordinal sigmoid steps, per level of score."""

# Opset 17 and IR version 8 load in every onnxruntime the project supports (>= 1.20).
ONNX_OPSET: int = 17
"""ONNX operator set version of the built model."""
ONNX_IR_VERSION: int = 8
"""ONNX IR version of the built model file."""
_PRODUCER_NAME = "classlens.model_export.engagement_baseline"
# Fixed, not the package version: the bytes change only when the model itself changes.
_PRODUCER_VERSION = "1"
_GRAPH_NAME = "engagement_baseline_v1"

INPUT_NAME = "features"
"""Name of the model's input tensor."""
OUTPUT_NAME = "probabilities"
"""Name of the model's output tensor."""


def _feature_weights() -> npt.NDArray[np.float32]:
    """Weights of the 11 transformed features, in :data:`ENGAGEMENT_FEATURES` order.

    The head angles enter as their clipped ramps in [0, 1], the other columns as given.
    """
    weights: dict[str, float] = {
        "head_yaw_abs_deg": -YAW_PENALTY,
        "head_pitch_abs_deg": -PITCH_PENALTY,
        "eyes_closed": -EYES_CLOSED_PENALTY,
        "gaze_away": -GAZE_AWAY_PENALTY,
        "neutral": 0.0,
    }
    weights.update(dict.fromkeys(POSITIVE_EMOTIONS, POSITIVE_EMOTION_BONUS))
    weights.update(dict.fromkeys(NEGATIVE_EMOTIONS, -NEGATIVE_EMOTION_PENALTY))
    return np.array([weights[name] for name in ENGAGEMENT_FEATURES], dtype=np.float32)


def build_engagement_baseline() -> bytes:
    """Build the baseline engagement model and return its ONNX bytes.

    The bytes are deterministic (fixed producer, opset, IR version, names and metadata),
    so the model manifest can pin their sha256.
    """
    def const(name: str, values: Any, dtype: type[np.generic] = np.float32) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)

    initializers = [
        const("split_sizes", [2, len(ENGAGEMENT_FEATURES) - 2], np.int64),
        const("angle_free_deg", [[YAW_FREE_DEG, PITCH_FREE_DEG]]),
        const("angle_ramp_deg", [[YAW_RAMP_DEG, PITCH_RAMP_DEG]]),
        const("zero", 0.0),
        const("one", 1.0),
        const("feature_weights", _feature_weights()[np.newaxis, :]),
        const("sum_axes", [1], np.int64),
        const("base_score", BASE_SCORE),
        const("level_thresholds", [LEVEL_THRESHOLDS]),
        const("level_slope", LEVEL_SLOPE),
        # Pads for [N, 3] along axis 1: one column before (value 1) or after (value 0).
        const("pad_before", [0, 1, 0, 0], np.int64),
        const("pad_after", [0, 0, 0, 1], np.int64),
    ]
    node = helper.make_node
    nodes = [
        # Head angles → penalty ramps in [0, 1]: clip((angle − free) / ramp, 0, 1).
        node("Split", [INPUT_NAME, "split_sizes"], ["angles", "cues"], name="split", axis=1),
        node("Sub", ["angles", "angle_free_deg"], ["angles_over"], name="angles_over"),
        node("Div", ["angles_over", "angle_ramp_deg"], ["angles_ramped"], name="angles_ramp"),
        node("Clip", ["angles_ramped", "zero", "one"], ["angle_terms"], name="angles_clip"),
        node("Concat", ["angle_terms", "cues"], ["terms"], name="terms", axis=1),
        # s = BASE_SCORE + Σ weight·term, elementwise and summed (no MatMul, see above).
        node("Mul", ["terms", "feature_weights"], ["weighted"], name="weighted"),
        node("ReduceSum", ["weighted", "sum_axes"], ["adjustment"], name="adjustment", keepdims=1),
        node("Add", ["adjustment", "base_score"], ["score"], name="score"),
        # P(level ≥ k) = sigmoid(slope · (s − threshold_k)), [N, 3].
        node("Sub", ["score", "level_thresholds"], ["margins"], name="margins"),
        node("Mul", ["margins", "level_slope"], ["logits"], name="logits"),
        node("Sigmoid", ["logits"], ["at_least"], name="at_least"),
        # [1, P1, P2, P3] − [P1, P2, P3, 0] = [1 − P1, P1 − P2, P2 − P3, P3]; the terms
        # telescope, so each row sums to 1.
        node("Pad", ["at_least", "pad_before", "one"], ["upper"], name="upper", mode="constant"),
        node("Pad", ["at_least", "pad_after", "zero"], ["lower"], name="lower", mode="constant"),
        node("Sub", ["upper", "lower"], [OUTPUT_NAME], name="levels"),
    ]
    feature_count, level_count = len(ENGAGEMENT_FEATURES), len(ENGAGEMENT_LEVELS)
    graph = helper.make_graph(
        nodes,
        _GRAPH_NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", feature_count])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", level_count])],
        initializer=initializers,
        doc_string=BASELINE_DESCRIPTION,
    )
    model = helper.make_model(
        graph,
        producer_name=_PRODUCER_NAME,
        producer_version=_PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        doc_string=BASELINE_DESCRIPTION,
    )
    model.ir_version = ONNX_IR_VERSION
    # The column orders travel with the file, so a runner can check its feature vector.
    helper.set_model_props(
        model,
        {
            "classlens.features": json.dumps(list(ENGAGEMENT_FEATURES)),
            "classlens.levels": json.dumps(list(ENGAGEMENT_LEVELS)),
            "classlens.trained": "false",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    serialized: bytes = model.SerializeToString()
    return serialized


def engagement_baseline_reference(features: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Compute the baseline's level probabilities [N, 4] in numpy (float64), formula by formula.

    Raises:
        ValueError: ``features`` is not [N, 11].
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(ENGAGEMENT_FEATURES):
        raise ValueError(f"expected features [N, {len(ENGAGEMENT_FEATURES)}], got shape {x.shape}")
    column = {name: x[:, i] for i, name in enumerate(ENGAGEMENT_FEATURES)}
    yaw_ramp = np.clip((column["head_yaw_abs_deg"] - YAW_FREE_DEG) / YAW_RAMP_DEG, 0.0, 1.0)
    pitch_ramp = np.clip((column["head_pitch_abs_deg"] - PITCH_FREE_DEG) / PITCH_RAMP_DEG, 0.0, 1.0)
    score = (
        BASE_SCORE
        - YAW_PENALTY * yaw_ramp
        - PITCH_PENALTY * pitch_ramp
        - EYES_CLOSED_PENALTY * column["eyes_closed"]
        - GAZE_AWAY_PENALTY * column["gaze_away"]
        + POSITIVE_EMOTION_BONUS * (column["happy"] + column["surprise"])
        - NEGATIVE_EMOTION_PENALTY
        * (column["sad"] + column["angry"] + column["disgust"] + column["fear"])
    )
    thresholds = np.asarray(LEVEL_THRESHOLDS)
    at_least = 1.0 / (1.0 + np.exp(-LEVEL_SLOPE * (score[:, np.newaxis] - thresholds)))
    ones = np.ones((len(x), 1))
    zeros = np.zeros((len(x), 1))
    upper, lower = np.hstack([ones, at_least]), np.hstack([at_least, zeros])
    probabilities: npt.NDArray[np.float64] = upper - lower
    return probabilities
