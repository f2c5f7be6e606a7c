"""Privacy controls that remove data: retention of whole sessions, and forgetting one student.

Both work on the store's schema generically where they can, so tables added later are
covered without changes here:

* :func:`run_retention` deletes every session created more than ``retention_days`` ago,
  with every row derived from it (:func:`~kernel.store.delete_analysis_data`) and its
  rendered report folder, and records what it did as an :class:`~kernel.store.AuditEvent`
  by the actor ``system``.
* :func:`forget_student` deletes one student of one session from every table that holds
  per-student rows: every table with an ``analysis_id`` column and a ``track_id`` column
  (matched on stream and track), and every table with an ``analysis_id`` and a ``stream``
  column but no ``track_id`` when the stream is the student's own (a meeting participant's
  feed; in a recording every student shares the stream ``main``, whose rows hold only
  face counts). It then re-renders the session's reports without the student.

Audit events never name the student: the event that records a deletion must not become
the trace it was meant to remove.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, delete, update
from sqlmodel import SQLModel, col, select

from kernel.errors import BadInputError
from kernel.settings import Settings
from kernel.store import Analysis, AnalysisStatus, AuditEvent, Student, delete_analysis_data, session_scope, utcnow

logger = logging.getLogger(__name__)

#: Actor recorded on audit events of scheduled and command-line maintenance.
SYSTEM_ACTOR = "system"

#: Name of the marker file a rendered report folder holds (see :mod:`reports.render`).
_REPORT_MARKER = ".classlens-report.json"


@dataclass
class RetentionResult:
    """What one retention run deleted (or, in a dry run, would delete)."""

    cutoff: datetime | None
    """Sessions created before this moment are expired; None when retention is off (``retention_days = 0``)."""
    deleted_analysis_ids: list[int] = field(default_factory=list)
    """Ids of the expired sessions (deleted unless ``dry_run``)."""
    deleted_report_dirs: list[Path] = field(default_factory=list)
    """Report folders removed with them."""
    dry_run: bool = False
    """True when nothing was deleted, only listed."""


@dataclass
class ForgetResult:
    """What :func:`forget_student` removed."""

    analysis_id: int
    """The session the student was part of."""
    rows_deleted: dict[str, int]
    """Table name → rows deleted from it."""
    reports_rerendered: Path | None
    """The report folder rendered again without the student, if the session had one."""


def _created_at_utc(moment: datetime) -> datetime:
    # SQLite returns naive datetimes for what was stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=utcnow().tzinfo)


def _is_report_of(folder: Path, analysis_id: int) -> bool:
    """Whether ``folder`` is a rendered report folder whose marker names ``analysis_id``.

    Checked before deleting so that a report path edited by hand, or a folder reused for
    something else, is never removed by retention.
    """
    try:
        marker = json.loads((folder / _REPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("analysis_id") == analysis_id


def run_retention(engine: Engine, settings: Settings, now: datetime | None = None, *,
                  dry_run: bool = False) -> RetentionResult:
    """Delete every session created more than ``settings.retention_days`` days before ``now``.

    Rows derived from each session and the session row itself go in one transaction per
    session; then its report folder is removed (only when the folder's marker names the
    session). One audit event by ``system`` records each deleted session. With
    ``retention_days = 0`` nothing is deleted. ``dry_run`` lists without deleting.
    """
    if settings.retention_days == 0:
        return RetentionResult(cutoff=None, dry_run=dry_run)
    cutoff = (now or utcnow()) - timedelta(days=settings.retention_days)
    with session_scope(engine) as session:
        candidates = list(session.exec(select(Analysis.id, Analysis.created_at, Analysis.report_path)))
    expired = [(int(analysis_id), report_path) for analysis_id, created_at, report_path in candidates
               if analysis_id is not None and _created_at_utc(created_at) < cutoff]
    result = RetentionResult(cutoff=cutoff, dry_run=dry_run)
    for analysis_id, report_path in sorted(expired):
        result.deleted_analysis_ids.append(analysis_id)
        folder = Path(report_path) if report_path else None
        if folder is not None and _is_report_of(folder, analysis_id):
            result.deleted_report_dirs.append(folder)
        if dry_run:
            continue
        with session_scope(engine) as session:
            delete_analysis_data(session, analysis_id, keep_analysis=False)
            session.add(AuditEvent(actor_email=SYSTEM_ACTOR, action="deleted", target_kind="session",
                                   target_id=str(analysis_id),
                                   detail=f"retention: older than {settings.retention_days} days"))
        # After the commit: a folder left behind by a crash here is only a report without rows,
        # and the next run cannot find it any more, so it is logged rather than retried.
        if folder is not None and folder in result.deleted_report_dirs:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                logger.warning("retention: could not remove the report folder %s of session %d", folder, analysis_id)
    return result


def per_student_tables() -> tuple[list[Table], list[Table]]:
    """Tables holding rows about individual students, found in the schema.

    Returns the tables keyed by (analysis, stream, track) and those keyed by (analysis,
    stream) only. Tables registered later (live sessions, workers) are found as long as
    their modules were imported, which :func:`~kernel.store.init_store` does.
    """
    by_track: list[Table] = []
    by_stream: list[Table] = []
    for table in SQLModel.metadata.sorted_tables:
        columns = set(table.columns.keys())
        if "analysis_id" not in columns or table.name == Student.__tablename__:
            continue
        if "track_id" in columns:
            by_track.append(table)
        elif "stream" in columns:
            by_stream.append(table)
    return by_track, by_stream


def _without_name(names_json: str, label: str) -> str:
    """The consent list without the student's name, compared as the consent policy compares names."""
    from kernel.consent import normalise_name

    try:
        names = json.loads(names_json)
    except ValueError:
        return names_json
    if not isinstance(names, list):
        return names_json
    forgotten = normalise_name(label)
    return json.dumps([name for name in names if not (isinstance(name, str) and normalise_name(name) == forgotten)])


def forget_student(engine: Engine, settings: Settings, analysis_id: int, student_label: str,
                   *, actor_email: str = SYSTEM_ACTOR, actor_id: int | None = None) -> ForgetResult:
    """Delete every row about one student of one session, then re-render the session's reports.

    The student is found by the label shown in reports ("Student 3" or a meeting display
    name). Raises :class:`~kernel.errors.BadInputError` when the session does not exist,
    is still running, or has no student with that label. The consent list of the session
    stops naming the student as well.
    """
    rows_deleted: dict[str, int] = {}
    with session_scope(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        if analysis is None:
            raise BadInputError(f"no session with id {analysis_id}")
        if analysis.status == AnalysisStatus.running:
            raise BadInputError(f"session {analysis_id} is still running; forget the student once it has finished")
        students = list(session.exec(select(Student).where(col(Student.analysis_id) == analysis_id)))
        matching = [s for s in students if s.label == student_label]
        if not matching:
            known = ", ".join(sorted(s.label for s in students)) or "none"
            raise BadInputError(f"session {analysis_id} has no student {student_label!r} (students: {known})")
        by_track, by_stream = per_student_tables()
        for student in matching:
            shares_stream = any(s.stream == student.stream and s.id != student.id for s in students)
            for table in by_track:
                deleted = session.execute(delete(table).where(
                    table.c.analysis_id == analysis_id, table.c.stream == student.stream,
                    table.c.track_id == student.track_id))
                rows_deleted[table.name] = rows_deleted.get(table.name, 0) + _count(deleted)
            if not shares_stream:
                for table in by_stream:
                    deleted = session.execute(delete(table).where(
                        table.c.analysis_id == analysis_id, table.c.stream == student.stream))
                    rows_deleted[table.name] = rows_deleted.get(table.name, 0) + _count(deleted)
        session.execute(delete(Student).where(col(Student.id).in_([s.id for s in matching])))
        rows_deleted[str(Student.__tablename__)] = len(matching)
        session.execute(update(Analysis).where(col(Analysis.id) == analysis_id).values(
            consent_names_json=_without_name(analysis.consent_names_json, student_label)))
        session.add(AuditEvent(actor_id=actor_id, actor_email=actor_email, action="deleted", target_kind="student",
                               target_id=str(analysis_id),
                               detail=f"forgot one student's data ({sum(rows_deleted.values())} rows)"))
        report_path = analysis.report_path
    rerendered = _rerender(engine, settings, analysis_id, report_path)
    return ForgetResult(analysis_id=analysis_id, rows_deleted=rows_deleted, reports_rerendered=rerendered)


def _count(result: Any) -> int:
    count = getattr(result, "rowcount", 0)
    return int(count) if isinstance(count, int) and count > 0 else 0


def _rerender(engine: Engine, settings: Settings, analysis_id: int, report_path: str | None) -> Path | None:
    """Render a session's reports again, replacing the folder that still shows a forgotten student."""
    if not report_path:
        return None
    folder = Path(report_path)
    if not folder.is_dir():
        return None
    from reports.render import ReportOptions, render_reports

    render_reports(engine, analysis_id, folder, ReportOptions.from_settings(settings))
    return folder
