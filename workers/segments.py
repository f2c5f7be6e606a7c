"""Time segments of a recorded video, each analysed end to end by one worker.

A long recording is cut into segments on the sampling grid (:func:`plan_segments`). A
worker decodes its segment (seeking to the keyframe before it), detects, tracks with
track ids of the segment's own range (``segment_index * 1_000_000 + n``), runs inference
in its own process and stores the results: :class:`~kernel.store.FrameSample` and
:class:`~kernel.store.FaceObservation` rows, and one
:class:`~kernel.store.SegmentTrack` per track (numbers only: times, counts, first
and last box) from which the producer stitches ids across the boundaries
(:mod:`vision.stitching`).

A segment is written in one transaction, together with the ``done`` mark of its
:class:`~kernel.store.SegmentStatus` row, and only while the analysis is still
running. A redelivered or duplicated segment task (``acks_late``) therefore either finds
the segment done and writes nothing, or is the one that writes it; a segment that
finishes after its analysis failed or was finalised writes nothing either.

The video is read from its path: workers must see the producer's file at the same path
(a shared or network filesystem). In-memory videos never take this route.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, col, select

from kernel.consent import ConsentPolicy
from kernel.errors import ConfigurationError
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    FaceObservation,
    FrameSample,
    SegmentState,
    SegmentStatus,
    SegmentTrack,
    insert_ignoring_duplicates,
    utcnow,
)
from kernel.types import CropBatch, FrameDetections
from pipeline.capture import CapturePipeline
from pipeline.gallery import gallery_splitter_for
from pipeline.models import CaptureModels
from vision.sources import RecordedFileSource, prefetched
from workers.inference import InferenceModels, analyse_crops
from workers.persistence import observation_rows, write_while_running

logger = logging.getLogger(__name__)

#: Track ids of segment k are ``k * SEGMENT_TRACK_STRIDE + 1, + 2 …``: unique within the
#: analysis without any coordination between workers, and segment 0's ids are exactly
#: those of an unsegmented run.
SEGMENT_TRACK_STRIDE = 1_000_000

#: Settings the producer decides for every segment of its analysis (sampling, detection,
#: tracking), so that all segments agree whatever the workers' own environment says.
#: Inference models and execution providers stay the workers' own; emotion inference
#: runs only when both the producer and the worker's deployment allow it.
SEGMENT_SETTINGS: tuple[str, ...] = (
    "sample_fps", "detector", "recognizer", "detector_input_size", "detection_threshold", "min_face_pixels",
    "track_max_gap_seconds", "emotion_inference", "video_layout", "ocr_language", "decode_mode",
    "sample_tolerance_seconds", "full_search_seconds",
)

#: How often a worker writes its segment's frame count (the producer's progress and liveness signal).
PROGRESS_INTERVAL_SECONDS = 2.0

#: Rows per INSERT statement: SQLite and PostgreSQL cap the parameters of one statement.
_ROWS_PER_STATEMENT = 500

#: Longest failure reason kept (one line for a person, not a traceback).
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class Segment:
    """One time segment of a recording: the sampling instants in [start, end) of class time."""

    index: int
    """Position in the recording, from 0."""
    start_seconds: float
    """First instant covered (on the sampling grid)."""
    end_seconds: float | None
    """First instant not covered; None for the last segment (up to the end of the video)."""

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"segment index: expected an integer of 0 or more, got {self.index!r}")
        if not isinstance(self.start_seconds, int | float) or not math.isfinite(self.start_seconds) \
                or self.start_seconds < 0:
            raise ValueError(f"segment start: expected a time of 0 s or later, got {self.start_seconds!r}")
        if self.end_seconds is not None and (not isinstance(self.end_seconds, int | float)
                                             or not self.end_seconds > self.start_seconds):
            raise ValueError(f"segment end: expected a time after {self.start_seconds}, got {self.end_seconds!r}")

    @property
    def first_track_id(self) -> int:
        """The first track id of this segment's range."""
        return self.index * SEGMENT_TRACK_STRIDE + 1

    def describe(self, count: int | None = None) -> str:
        """``segment 3 of 4 (0:10–0:15)``, or ``segment 3 (0:10–0:15)``: how a person refers to it."""
        end = "end" if self.end_seconds is None else clock(self.end_seconds)
        of = f" of {count}" if count is not None else ""
        return f"segment {self.index + 1}{of} ({clock(self.start_seconds)}–{end})"


def clock(seconds: float) -> str:
    """Class time as ``h:mm:ss`` or ``m:ss``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plan_segments(duration_seconds: float, sample_fps: float, segment_seconds: float) -> list[Segment]:
    """Cut a recording into segments of about ``segment_seconds`` whose boundaries lie on the sampling grid.

    The last segment runs to the end of the video (the container's duration may be a
    little off). A remainder shorter than a quarter segment joins the one before it
    rather than costing a worker its own task. An unknown duration gives no plan.
    """
    if duration_seconds <= 0 or sample_fps <= 0 or segment_seconds <= 0:
        return []
    per_segment = max(1, round(segment_seconds * sample_fps))
    total = max(1, math.ceil(duration_seconds * sample_fps))
    count = max(1, math.ceil(total / per_segment))
    if count > 1 and total - (count - 1) * per_segment < per_segment / 4:
        count -= 1
    return [
        Segment(index, index * per_segment / sample_fps,
                None if index == count - 1 else (index + 1) * per_segment / sample_fps)
        for index in range(count)
    ]


def segment_settings(base: Settings, overrides: dict[str, Any] | None) -> Settings:
    """The worker's settings with the producer's per-analysis values (:data:`SEGMENT_SETTINGS`), validated."""
    if not overrides:
        return base
    if not isinstance(overrides, dict):
        raise ValueError(f"settings_overrides: expected a mapping, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(SEGMENT_SETTINGS))
    if unknown:
        raise ValueError(f"settings_overrides: a segment cannot override {', '.join(map(str, unknown))}")
    return Settings.model_validate({**base.model_dump(), **overrides})


def segment_overrides(settings: Settings) -> dict[str, Any]:
    """The producer's values of :data:`SEGMENT_SETTINGS`, as sent with every segment task."""
    return {name: getattr(settings, name) for name in SEGMENT_SETTINGS}


@dataclass
class SegmentOutcome:
    """What a worker did with one segment."""

    frames: int
    """Frames sampled."""
    faces: int
    """Faces detected."""
    tracks: int
    """Tracks the segment's tracker started."""
    stored: bool
    """False when nothing was written: the analysis no longer runs, or a twin delivery stored the segment first."""


class _TrackEnds:
    """First and last box of every track of a segment."""

    def __init__(self) -> None:
        self.first: dict[int, np.ndarray[Any, Any]] = {}
        self.last: dict[int, np.ndarray[Any, Any]] = {}

    def update(self, detections: FrameDetections) -> None:
        for track_id, box in zip(detections.track_ids.tolist(), detections.boxes, strict=True):
            self.first.setdefault(int(track_id), box)
            self.last[int(track_id)] = box


def analyse_segment(
    engine: Engine,
    analysis_id: int,
    path: Path,
    segment: Segment,
    settings: Settings,
    capture: CaptureModels,
    models: InferenceModels,
) -> SegmentOutcome:
    """Decode, detect, track and analyse one segment, then store it in one transaction.

    ``settings`` are the worker's, with the producer's :data:`SEGMENT_SETTINGS` applied.
    Returns without writing when the analysis is no longer running (it failed, was
    cancelled or is finished) or another delivery of the same task stored the segment.
    Errors (bad video, store errors) propagate to the task, which retries or records them.
    """
    # The producer may have switched emotion off (where the law forbids it): then compute none at all.
    models = models.for_settings(settings.emotion_inference)
    provenance = json.dumps({**capture.provenance, **models.provenance}, sort_keys=True)
    if not _progress(engine, analysis_id, segment, 0, 0):
        logger.info("analysis %d: %s skipped (the analysis no longer runs, or the segment is stored already)",
                    analysis_id, segment.describe())
        return SegmentOutcome(0, 0, 0, stored=False)
    source = RecordedFileSource.configured(path, settings, start_seconds=segment.start_seconds,
                                           end_seconds=segment.end_seconds)
    pipeline = CapturePipeline.configured(capture.detector, capture.embedder, settings, analysis_id=analysis_id,
                                          first_track_id=segment.first_track_id,
                                          gallery=gallery_splitter_for(settings, _consent_of(engine, analysis_id),
                                                                       capture.embedder))
    ends = _TrackEnds()
    samples: list[FrameSample] = []
    observations: list[FaceObservation] = []
    pending: list[CropBatch] = []
    pending_count = frames = faces = 0
    reported = time.monotonic()
    decoded: Iterator[Any] = prefetched(source)
    try:
        for frame in decoded:
            captured = pipeline.capture(frame)
            if captured.batch is not None:
                for part in captured.detections:
                    ends.update(part)
                pending.append(captured.batch)
                pending_count += len(captured.batch)
                if pending_count >= settings.batch_size:
                    observations.extend(_infer(pending, models))
                    pending, pending_count = [], 0
            samples.extend(captured.samples)
            frames += 1
            faces += captured.faces
            if time.monotonic() - reported >= PROGRESS_INTERVAL_SECONDS:
                reported = time.monotonic()
                if not _progress(engine, analysis_id, segment, frames, faces):
                    logger.info("analysis %d: %s abandoned (the analysis stopped, or a twin delivery stored it)",
                                analysis_id, segment.describe())
                    return SegmentOutcome(frames, faces, len(pipeline.summaries()), stored=False)
    finally:
        close = getattr(decoded, "close", None)
        if close is not None:
            close()  # stops the decoder thread when we leave early
    if pending:
        observations.extend(_infer(pending, models))
    tracks: list[SegmentTrack] = []
    for summary in pipeline.summaries():
        first, last = ends.first[summary.track_id], ends.last[summary.track_id]
        tracks.append(SegmentTrack(
            analysis_id=analysis_id, segment_index=segment.index, stream=summary.stream,
            track_id=summary.track_id, first_seen=summary.first_seen, last_seen=summary.last_seen,
            samples=summary.samples, score_total=summary.score_total,
            first_x1=float(first[0]), first_y1=float(first[1]), first_x2=float(first[2]), first_y2=float(first[3]),
            last_x1=float(last[0]), last_y1=float(last[1]), last_x2=float(last[2]), last_y2=float(last[3]),
        ))
    if tracks and tracks[-1].track_id >= (segment.index + 1) * SEGMENT_TRACK_STRIDE:
        raise ValueError(f"{segment.describe()}: more tracks than its id range holds")

    def write(session: Session) -> bool:
        done = _set_status(session, analysis_id, segment, {
            "status": SegmentState.done, "frames": frames, "faces": faces, "reason": None,
            "models_json": provenance,
        })
        if not done:
            return False  # another delivery of this task stored the segment (or recorded its failure)
        rows: Sequence[SQLModel]
        for rows in (samples, observations, tracks):
            for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                insert_ignoring_duplicates(session, rows[start:start + _ROWS_PER_STATEMENT])
        return True

    stored = write_while_running(engine, analysis_id, write)
    if not stored:
        logger.info("analysis %d: %s not stored (the analysis no longer runs, or a twin delivery stored it)",
                    analysis_id, segment.describe())
    return SegmentOutcome(frames, faces, len(tracks), stored=stored)


def _infer(batches: list[CropBatch], models: InferenceModels) -> list[FaceObservation]:
    batch = batches[0] if len(batches) == 1 else CropBatch.concatenate(batches)
    return observation_rows(batch, analyse_crops(batch, models))


def record_segment_failure(engine: Engine, analysis_id: int, segment: Segment, reason: str) -> bool:
    """Mark a segment failed with a one-line reason; returns False when the analysis no longer runs."""
    lines = reason.strip().splitlines()
    line = ((lines[0] if lines else "") or "unknown error")[:MAX_REASON_CHARS]
    stored = write_while_running(engine, analysis_id, lambda session: _set_status(
        session, analysis_id, segment, {"status": SegmentState.failed, "reason": line}))
    logger.warning("analysis %d, %s failed: %s", analysis_id, segment.describe(), line)
    return stored


def _consent_of(engine: Engine, analysis_id: int) -> ConsentPolicy:
    """Whose display names the analysis may analyse, as the producer recorded it."""
    with Session(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        if analysis is None:
            return ConsentPolicy.everyone()
        return ConsentPolicy.from_store(analysis.consent_mode, analysis.consent_names_json)


def _progress(engine: Engine, analysis_id: int, segment: Segment, frames: int, faces: int) -> bool:
    """Write the segment's counts (status running); False when the analysis no longer runs or the segment is final."""
    return write_while_running(engine, analysis_id, lambda session: _set_status(
        session, analysis_id, segment, {"status": SegmentState.running, "frames": frames, "faces": faces}))


def _set_status(session: Session, analysis_id: int, segment: Segment, values: dict[str, Any]) -> bool:
    """Insert or update the segment's status row unless it is already done or failed; True when it changed.

    Upsert with a condition, so that of two deliveries of one segment only the first to
    finish marks it done, and nothing overwrites a final state.
    """
    table = SegmentStatus.__table__  # type: ignore[attr-defined]
    row = {"analysis_id": analysis_id, "segment_index": segment.index, "start_seconds": segment.start_seconds,
           "end_seconds": segment.end_seconds, **values, "updated_at": utcnow()}
    changes = {key: row[key] for key in (*values, "updated_at")}
    open_states = [SegmentState.queued, SegmentState.running]
    dialect = session.get_bind().dialect.name
    statement: Any
    if dialect == "postgresql":
        statement = postgresql.insert(table).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=["analysis_id", "segment_index"], set_=changes, where=table.c.status.in_(open_states))
    elif dialect == "sqlite":
        statement = sqlite.insert(table).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=["analysis_id", "segment_index"], set_=changes, where=table.c.status.in_(open_states))
    else:
        raise ConfigurationError(f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL")
    result: Any = session.execute(statement)
    return bool(result.rowcount)


def statuses_for(session: Session, analysis_id: int) -> list[SegmentStatus]:
    """The segment rows of an analysis, in segment order."""
    statement = select(SegmentStatus).where(col(SegmentStatus.analysis_id) == analysis_id).order_by(
        col(SegmentStatus.segment_index))
    return list(session.exec(statement))


def segment_tracks_for(session: Session, analysis_id: int) -> Sequence[SegmentTrack]:
    """The per-segment tracks of an analysis, in segment and id order."""
    statement = select(SegmentTrack).where(col(SegmentTrack.analysis_id) == analysis_id).order_by(
        col(SegmentTrack.segment_index), col(SegmentTrack.track_id))
    return list(session.exec(statement))
