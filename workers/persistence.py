"""Writing worker results to the store, idempotently."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sqlalchemy import Engine

from kernel.store import FaceObservation, insert_ignoring_duplicates, session_scope
from kernel.types import EMOTION_LABELS, CropBatch, FaceAnalysisBatch, FloatArray


def _known(values: FloatArray | None, index: int) -> float | None:
    """A cue's value, or None when it is unknown (no model, or NaN: the face was not found)."""
    if values is None:
        return None
    value = float(values[index])
    return value if math.isfinite(value) else None


def observation_rows(batch: CropBatch, results: FaceAnalysisBatch) -> list[FaceObservation]:
    """One store row per crop: numbers only, never pixels."""
    if len(batch) != len(results):
        raise ValueError(f"results for {len(results)} crops, batch has {len(batch)}")
    levels = np.arange(4, dtype=np.float32)
    engagement = results.engagement_probabilities
    expected = engagement @ levels
    best = engagement.argmax(axis=1)
    rows = []
    for index in range(len(batch)):
        box = batch.boxes[index]
        yaw, pitch, roll = (float(v) for v in batch.head_pose[index])
        row: dict[str, Any] = {
            "analysis_id": batch.analysis_id,
            "stream": batch.streams[index],
            "track_id": int(batch.track_ids[index]),
            "timestamp": float(batch.timestamps[index]),
            "box_x1": float(box[0]), "box_y1": float(box[1]), "box_x2": float(box[2]), "box_y2": float(box[3]),
            "detection_score": float(batch.detection_scores[index]),
            "head_yaw": yaw, "head_pitch": pitch, "head_roll": roll,
            "eyes_closed": _known(results.eyes_closed, index),
            "gaze_away": _known(results.gaze_away, index),
            "engagement_level": int(best[index]),
            "engagement_score": float(expected[index]),
        }
        for level in range(4):
            row[f"engagement_p{level}"] = float(engagement[index, level])
        for column, label in enumerate(EMOTION_LABELS):
            probabilities = results.emotion_probabilities
            row[f"emotion_{label}"] = None if probabilities is None else float(probabilities[index, column])
        rows.append(FaceObservation(**row))
    return rows


def store_face_results(engine: Engine, batch: CropBatch, results: FaceAnalysisBatch) -> int:
    """Insert the observations of a batch; a retried batch inserts nothing twice. Returns rows offered."""
    rows = observation_rows(batch, results)
    with session_scope(engine) as session:
        insert_ignoring_duplicates(session, rows)
    return len(rows)
