"""The audit log: who viewed, exported, deleted or invited what, and when.

Events are written in the same transaction as the action they describe, so a deletion
without its audit event (or the other way round) cannot be committed. An event holds
one line of context and never pixels, passwords or tokens.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, func
from sqlmodel import Session, col, select

from kernel.spreadsheets import spreadsheet_safe
from kernel.store import AuditEvent, User

#: Longest detail kept; longer text is cut (a detail is context, not a payload).
MAX_DETAIL_CHARS = 500
#: Columns of the CSV export, in order.
CSV_COLUMNS = ("at", "actor_id", "actor_email", "action", "target_kind", "target_id", "detail")


def record_event(
    session: Session,
    actor: User | None,
    action: str,
    target_kind: str = "",
    target_id: str | int = "",
    detail: str = "",
) -> AuditEvent:
    """Add an audit event to the caller's transaction; ``actor`` None is recorded as 'anonymous'."""
    one_line = " ".join(detail.split())[:MAX_DETAIL_CHARS]
    event = AuditEvent(
        actor_id=actor.id if actor is not None else None,
        actor_email=actor.email if actor is not None else "anonymous",
        action=action,
        target_kind=target_kind,
        target_id=str(target_id),
        detail=one_line,
    )
    session.add(event)
    return event


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What part of the audit log to show; every field is optional."""

    action: str = ""
    """Only events with this action."""
    actor: str = ""
    """Only events whose actor email contains this text."""
    target_id: str = ""
    """Only events about this target id."""
    since: datetime | None = None
    """Only events at or after this moment."""
    until: datetime | None = None
    """Only events before this moment."""


def _conditions(where: AuditFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if where.action:
        conditions.append(col(AuditEvent.action) == where.action)
    if where.actor:
        conditions.append(col(AuditEvent.actor_email).contains(where.actor.strip().lower()))
    if where.target_id:
        conditions.append(col(AuditEvent.target_id) == where.target_id)
    if where.since is not None:
        conditions.append(col(AuditEvent.at) >= where.since)
    if where.until is not None:
        conditions.append(col(AuditEvent.at) < where.until)
    return conditions


def query_events(
    session: Session, where: AuditFilter | None = None, *, limit: int | None = 200, offset: int = 0
) -> list[AuditEvent]:
    """Audit events matching ``where``, newest first."""
    statement = (
        select(AuditEvent)
        .where(*_conditions(where or AuditFilter()))
        .order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc())
    )
    if limit is not None:
        statement = statement.limit(limit).offset(offset)
    return list(session.exec(statement))


def count_events(session: Session, where: AuditFilter | None = None) -> int:
    """How many audit events match ``where``."""
    statement = select(func.count()).select_from(AuditEvent).where(*_conditions(where or AuditFilter()))
    return int(session.exec(statement).one())


def event_actions(session: Session) -> list[str]:
    """Every action that occurs in the log, sorted (for the filter menu)."""
    return sorted(session.exec(select(AuditEvent.action).distinct()))


def _utc_text(moment: datetime) -> str:
    # SQLite hands back naive datetimes; the store writes UTC.
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="seconds")


def events_csv(events: Sequence[AuditEvent]) -> str:
    """The events as CSV text with a header row; times in ISO 8601 UTC."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for event in events:
        writer.writerow([
            _utc_text(event.at), "" if event.actor_id is None else event.actor_id,
            spreadsheet_safe(event.actor_email), spreadsheet_safe(event.action), spreadsheet_safe(event.target_kind),
            spreadsheet_safe(event.target_id), spreadsheet_safe(event.detail),
        ])
    return buffer.getvalue()
