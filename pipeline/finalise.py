"""The step every analysis ends with: students from track summaries, or a failure recorded.

A recording, a segmented recording and a live session all finish here, so what counts as
a student and what a failed analysis leaves behind are decided once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, update
from sqlmodel import Session, col, select

from kernel.settings import Settings
from kernel.store import (
    NAME_FROM_NONE,
    Analysis,
    AnalysisStatus,
    FaceObservation,
    Student,
    delete_analysis_data,
    last_sign_of_life,
    session_scope,
    utcnow,
)
from pipeline.capture import StudentRule
from vision.tracking import TrackSummary, alternating_tracks

logger = logging.getLogger(__name__)


def label_students(students: list[TrackSummary], name_source_of: Callable[[str], str | None],
                   ) -> list[tuple[str, str]]:
    """Each student's label and its source, in order of first appearance.

    A student of a named stream (a meeting participant's feed, a gallery tile's label:
    ``name_source_of`` gives the source, None for a stream without a name) is called by the
    stream's name, and further faces on that stream ``"Name (2)"``…; a stream key is the
    display name (``"Name [2]"`` when two participants share one, so their students stay
    distinct). Every other student is ``"Student 1…n"``.
    """
    labels: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    numbered = 0
    for summary in students:
        source = name_source_of(summary.stream)
        if source is not None:
            count = seen.get(summary.stream, 0) + 1
            seen[summary.stream] = count
            labels.append((summary.stream if count == 1 else f"{summary.stream} ({count})", source))
        else:
            numbered += 1
            labels.append((f"Student {numbered}", NAME_FROM_NONE))
    return labels


def rename_track_observations(session: Session, analysis_id: int, renamed: Mapping[int, int]) -> None:
    """Give the observations of each track in ``renamed`` the id of the track it was joined to."""
    for old, new in renamed.items():
        session.execute(update(FaceObservation).where(
            col(FaceObservation.analysis_id) == analysis_id, col(FaceObservation.track_id) == old,
        ).values(track_id=new))


def join_alternating_students(session: Session, analysis_id: int, summaries: list[TrackSummary],
                              streams: Collection[str], settings: Settings) -> list[TrackSummary]:
    """Make one student of the tracks that took turns for one face on each of ``streams``.

    ``streams`` are participants' own cameras, where two students who never share a frame
    and keep alternating are one person the recogniser was unsure of
    (:func:`vision.tracking.alternating_tracks`). Only tracks the student rule admits are
    joined; their observations take the kept track's id. Returns the summaries with each
    joined group as one.
    """
    rule = StudentRule.from_settings(settings)
    admitted = [s for s in summaries if s.stream in streams and rule.admits(s)]
    per_stream = Counter(s.stream for s in admitted)
    # Only a stream with two or more students can have any to join: most have one, and cost no query.
    candidates = [s.track_id for s in admitted if per_stream[s.stream] > 1]
    if not candidates:
        return summaries
    rows = session.exec(select(FaceObservation.stream, FaceObservation.track_id, FaceObservation.timestamp).where(
        col(FaceObservation.analysis_id) == analysis_id, col(FaceObservation.track_id).in_(candidates)))
    by_stream: dict[str, list[tuple[int, float]]] = {}
    for stream, track_id, timestamp in rows:
        by_stream.setdefault(stream, []).append((track_id, timestamp))
    joined: dict[int, int] = {}
    for appearances in by_stream.values():
        joined.update(alternating_tracks(appearances))
    if not joined:
        return summaries
    rename_track_observations(session, analysis_id, joined)
    merged = {s.track_id: replace(s) for s in summaries if s.track_id not in joined}
    for summary in summaries:
        if summary.track_id in joined:
            merged[joined[summary.track_id]].absorb(summary)
    logger.info("analysis %d: %d tracks joined to the students whose face they took turns for", analysis_id,
                len(joined))
    return [merged[s.track_id] for s in summaries if s.track_id in merged]


def unnamed(stream: str) -> str | None:
    """No stream has a name: every student is numbered."""
    return None


def finalise_students(session: Session, analysis_id: int, summaries: list[TrackSummary], settings: Settings, *,
                      name_source_of: Callable[[str], str | None] = unnamed) -> int:
    """Create Student rows for tracks seen long enough; drop observations of the rest.

    Students of the streams ``name_source_of`` names (a meeting participant's display name,
    a gallery tile's label; it returns how the name was found) are called by the stream's
    name; the rest are ``Student 1…n`` in order of first appearance.
    """
    rule = StudentRule.from_settings(settings)  # the rule progress displays count by, too
    students = [s for s in summaries if rule.admits(s)]
    students.sort(key=lambda s: (s.first_seen, s.track_id))
    for summary, (label, source) in zip(students, label_students(students, name_source_of), strict=True):
        session.add(Student(analysis_id=analysis_id, stream=summary.stream, track_id=summary.track_id,
                            label=label, name_source=source, first_seen=summary.first_seen,
                            last_seen=summary.last_seen, samples_visible=summary.samples))
    transient = [s.track_id for s in summaries if s not in students]
    if transient:
        session.execute(delete(FaceObservation).where(
            FaceObservation.analysis_id == analysis_id,  # type: ignore[arg-type]
            FaceObservation.track_id.in_(transient),  # type: ignore[attr-defined]
        ))
    return len(students)


def mark_failed(engine: Engine, analysis_id: int, reason: str, *,
                only_if_silent_since: datetime | None = None) -> bool:
    """Remove everything half-written and record why the analysis failed; False when it was left alone.

    The analysis row is marked before anything is deleted, in the same transaction: that
    takes SQLite's write lock or PostgreSQL's row lock first, so a segment worker about to
    store (it checks the status in its own transaction) either committed before and its
    rows are deleted here, or sees ``failed`` and writes nothing.

    ``only_if_silent_since`` fails the analysis only while it is still running and its
    producer has shown no sign of life since then (:mod:`pipeline.liveness`), so a
    producer that stamped its heartbeat a moment ago keeps its analysis.
    """
    statement = update(Analysis).where(col(Analysis.id) == analysis_id)
    if only_if_silent_since is not None:
        statement = statement.where(col(Analysis.status) == AnalysisStatus.running,
                                    last_sign_of_life() < only_if_silent_since)
    with session_scope(engine) as session:
        result: Any = session.execute(statement.values(
            status=AnalysisStatus.failed, failure_reason=reason, finished_at=utcnow(), report_path=None))
        if only_if_silent_since is not None and not result.rowcount:
            return False
        delete_analysis_data(session, analysis_id)
    return True


def failure_reason(exc: BaseException) -> str:
    """The one line recorded on a failed analysis."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and exc.strerror:
        # "No such file or directory: /x", not "[Errno 2] No such file or directory: '/x'".
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror.lower()}{where}"
    reason = str(exc) or type(exc).__name__
    return reason.splitlines()[0]
