"""Writing worker results to the store: idempotently, and only while their analysis runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from kernel.store import (
    Analysis,
    AnalysisStatus,
    FaceObservation,
    StoredBatch,
    insert_ignoring_duplicates,
    session_scope,
)
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


def store_face_results(engine: Engine, batch: CropBatch, results: FaceAnalysisBatch, *,
                       batch_id: str | None = None, only_while_running: bool = True) -> int:
    """Insert the observations of a batch while its analysis runs; a retried batch inserts nothing twice.

    Returns the rows offered, or 0 when the analysis no longer runs (failed, finished or
    deleted): a batch that a worker finishes after its producer gave up must not grow the
    analysis. ``batch_id`` (the producer's id) is stored as the batch's receipt in the same
    transaction. The producer's own in-process inference passes ``only_while_running=False``:
    it stops its dispatcher before it finalises or fails the analysis, so there is no late
    batch to keep out.
    """
    rows = observation_rows(batch, results)
    if not only_while_running:
        with session_scope(engine) as session:
            insert_ignoring_duplicates(session, rows)
        return len(rows)

    def write(session: Session) -> bool:
        insert_ignoring_duplicates(session, rows)
        if batch_id is not None:
            insert_ignoring_duplicates(session, [StoredBatch(analysis_id=batch.analysis_id, batch_id=batch_id,
                                                             crops=len(batch))])
        return True

    return len(rows) if write_while_running(engine, batch.analysis_id, write) else 0


def analysis_exists(engine: Engine, analysis_id: int) -> bool:
    """Whether the analysis row is (still) in the store."""
    with Session(engine) as session:
        return session.get(Analysis, analysis_id) is not None


def write_while_running(engine: Engine, analysis_id: int, write: Callable[[Session], bool]) -> bool:
    """Run ``write`` in a transaction that commits only while the analysis is running; True when committed.

    The producer fails or finalises an analysis in a transaction whose first statement
    updates the analysis row. Checking the status in the same transaction as the writes
    means a segment never lands after the producer cleaned up or stitched ids:

    - PostgreSQL: the check comes first, ``FOR SHARE``, so it waits for such a producer
      (and the producer waits for us). Both take the analysis row's lock before any
      other, so they cannot deadlock.
    - SQLite: a read does not open a transaction (pysqlite) but a write does, taking the
      database's write lock; so the writes come first and the check runs under that lock.

    ``write`` returning False rolls back as well.
    """
    try:
        with Session(engine) as session:
            try:
                check_first = session.get_bind().dialect.name == "postgresql"
                if check_first and not _running(session, analysis_id):
                    session.rollback()
                    return False
                if not write(session):
                    session.rollback()
                    return False
                session.flush()
                if not check_first and not _running(session, analysis_id):
                    session.rollback()
                    return False
                session.commit()
                return True
            except BaseException:
                session.rollback()
                raise
    except IntegrityError:
        # The analysis row is gone (deleted while the segment ran): nothing to write to.
        if not analysis_exists(engine, analysis_id):
            return False
        raise


def _running(session: Session, analysis_id: int) -> bool:
    status = session.exec(
        select(Analysis.status).where(col(Analysis.id) == analysis_id).with_for_update(read=True)
    ).first()
    return status == AnalysisStatus.running

