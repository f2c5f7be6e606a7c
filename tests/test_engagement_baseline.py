"""The heuristic engagement baseline: ONNX graph against the numpy formula, and its behaviour."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from kernel.types import ENGAGEMENT_FEATURES
from model_export.engagement_baseline import (
    BASELINE_DESCRIPTION,
    ENGAGEMENT_LEVELS,
    build_engagement_baseline,
    engagement_baseline_reference,
)

TOLERANCE = 1e-6
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(build_engagement_baseline(), providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, features: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    batch = np.ascontiguousarray(features, dtype=np.float32)
    result: npt.NDArray[np.float32] = session.run(["probabilities"], {"features": batch})[0]
    return result


def face(**values: float) -> npt.NDArray[np.float32]:
    """One feature row; unnamed features are 0 (unknown cue, or emotion inference off)."""
    unknown = set(values) - set(ENGAGEMENT_FEATURES)
    assert not unknown, unknown
    return np.array([[values.get(name, 0.0) for name in ENGAGEMENT_FEATURES]], dtype=np.float32)


def random_features(rng: np.random.Generator, count: int) -> npt.NDArray[np.float32]:
    emotions = rng.dirichlet(np.full(7, 0.5), count)
    emotions[: count // 4] = 0.0  # emotion inference switched off
    return np.column_stack([
        rng.uniform(0, 90, count),
        rng.uniform(0, 60, count),
        rng.uniform(0, 1, count),
        rng.uniform(0, 1, count),
        emotions,
    ]).astype(np.float32)


def edge_case_features() -> npt.NDArray[np.float32]:
    rows = [
        face(),
        face(neutral=1.0),
        # The ends and middles of the head-angle ramps, and far beyond them.
        *(face(head_yaw_abs_deg=yaw) for yaw in (19.999, 20.0, 32.5, 45.0, 45.001, 90.0, 180.0)),
        *(face(head_pitch_abs_deg=pitch) for pitch in (15.0, 25.0, 35.0, 90.0)),
        face(eyes_closed=1.0),
        face(gaze_away=1.0),
        face(head_yaw_abs_deg=180, head_pitch_abs_deg=90, eyes_closed=1, gaze_away=1, sad=1),
        face(head_yaw_abs_deg=180, head_pitch_abs_deg=90, eyes_closed=1, gaze_away=1,
             fear=0.5, angry=0.5),
        face(happy=1.0),
        face(surprise=0.5, happy=0.5),
        # Scores exactly on the level thresholds: 2.5, 1.5 and 0.5.
        face(eyes_closed=1.0 / 3.0),
        face(eyes_closed=1.0),
        face(eyes_closed=1.0, gaze_away=1.0),
        *(face(**{emotion: 1.0}) for emotion in EMOTIONS),
    ]
    return np.concatenate(rows)


def test_io_follows_the_documented_contract() -> None:
    model = onnx.load_from_string(build_engagement_baseline())
    onnx.checker.check_model(model, full_check=True)
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert graph_input.name == "features"
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["N", 11]
    assert graph_output.name == "probabilities"
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == ["N", 4]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classlens.features"]) == list(ENGAGEMENT_FEATURES)
    assert json.loads(props["classlens.levels"]) == list(ENGAGEMENT_LEVELS)
    assert ENGAGEMENT_FEATURES[4:] == EMOTIONS
    assert ENGAGEMENT_LEVELS == ("very low", "low", "high", "very high")
    assert "MatMul" not in {node.op_type for node in model.graph.node}


def test_description_says_it_is_an_untrained_heuristic() -> None:
    assert "heuristic baseline" in BASELINE_DESCRIPTION
    assert "NOT trained on DAiSEE" in BASELINE_DESCRIPTION


def test_builds_are_byte_identical() -> None:
    assert build_engagement_baseline() == build_engagement_baseline()


@pytest.mark.parametrize("count", [1, 7, 256])
def test_random_features_match_reference(session: ort.InferenceSession, count: int) -> None:
    features = random_features(np.random.default_rng(count), count)
    actual = run(session, features)
    assert actual.shape == (count, 4)
    assert float(np.max(np.abs(actual - engagement_baseline_reference(features)))) <= TOLERANCE


def test_edge_case_features_match_reference(session: ort.InferenceSession) -> None:
    features = edge_case_features()
    actual = run(session, features)
    assert float(np.max(np.abs(actual - engagement_baseline_reference(features)))) <= TOLERANCE


def test_rows_are_probability_distributions(session: ort.InferenceSession) -> None:
    rng = np.random.default_rng(3)
    features = np.concatenate([edge_case_features(), random_features(rng, 500)])
    for probabilities in (run(session, features), engagement_baseline_reference(features)):
        assert np.all(probabilities >= 0.0)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=TOLERANCE)


def test_reference_matches_the_formula_worked_by_hand() -> None:
    def sigmoid(x: float) -> float:
        return float(1.0 / (1.0 + np.exp(-x)))

    # Yaw 32.5° (half the ramp: −0.75), pitch 25° (half: −0.5), eyes closed 0.2 (−0.3),
    # happy 0.5 (+0.15), sad 0.5 (−0.15): s = 3 − 0.75 − 0.5 − 0.3 = 1.45.
    row = face(head_yaw_abs_deg=32.5, head_pitch_abs_deg=25, eyes_closed=0.2, happy=0.5, sad=0.5)
    p1, p2, p3 = (sigmoid(4 * (1.45 - t)) for t in (0.5, 1.5, 2.5))
    expected = np.array([[1 - p1, p1 - p2, p2 - p3, p3]])
    assert np.allclose(engagement_baseline_reference(row), expected, atol=1e-6)


def test_attentive_frontal_face_is_engaged(session: ort.InferenceSession) -> None:
    for row in (face(neutral=1.0), face()):  # with and without emotion inference
        assert int(run(session, row)[0].argmax()) >= 2
        assert int(engagement_baseline_reference(row)[0].argmax()) >= 2


def test_face_turned_away_with_eyes_closed_is_disengaged(session: ort.InferenceSession) -> None:
    for row in (
        face(head_yaw_abs_deg=60, eyes_closed=1.0),
        face(head_yaw_abs_deg=60, eyes_closed=1.0, neutral=1.0),
    ):
        assert int(run(session, row)[0].argmax()) == 0
        assert int(engagement_baseline_reference(row)[0].argmax()) == 0


def test_turning_away_never_raises_the_expected_level(session: ort.InferenceSession) -> None:
    yaws = np.linspace(0, 120, 121)
    rows = np.concatenate([face(head_yaw_abs_deg=float(yaw), neutral=1.0) for yaw in yaws])
    expected_level = run(session, rows) @ np.arange(4)
    assert np.all(np.diff(expected_level) <= 1e-6)
    assert expected_level[0] > 2.5 and expected_level[-1] < expected_level[0] - 1.0


def test_reference_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[N, 11\]"):
        engagement_baseline_reference(np.zeros((3, 10)))
