"""Crop batches the workers could not process, recorded in the store.

A payload that cannot be decoded, has the wrong shapes, or fails for any reason that a
retry would not fix is a poison message: retrying it would only block the queue. The
worker records it here and moves on; the producer that waits for the analysis reads
these rows and fails with the recorded reason instead of waiting for crops that will
never arrive. Only numbers and text are stored, never the payload (it holds face crops).
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, inspect
from sqlalchemy.exc import DatabaseError
from sqlmodel import Session, col, select

from kernel.store import MAX_ROW_ID, FailedBatch, session_scope

logger = logging.getLogger(__name__)

#: Longest failure reason kept; a reason is one line for a person, not a traceback.
MAX_REASON_CHARS = 1000



def ensure_failed_batch_table(engine: Engine) -> None:
    """Create the failed-batch table when missing; safe when several processes race to create it."""
    table = FailedBatch.__table__  # type: ignore[attr-defined]
    if inspect(engine).has_table(table.name):
        return
    try:
        table.create(engine, checkfirst=True)
    except DatabaseError:
        # Another process created it between our check and our CREATE TABLE.
        if not inspect(engine).has_table(table.name):
            raise


def _bounded(value: int | None) -> int | None:
    """Keep an id or count that fits the column; anything else is unknown."""
    if value is None or not 0 <= value <= MAX_ROW_ID:
        return None
    return value


def record_failed_batch(engine: Engine, *, analysis_id: int | None, reason: str, crops: int | None,
                        batch_id: str | None = None) -> None:
    """Record a batch the workers gave up on; the reason is cut to one line of at most 1000 characters."""
    lines = reason.strip().splitlines()
    line = (lines[0] if lines else "") or "unknown error"
    with session_scope(engine) as session:
        session.add(FailedBatch(analysis_id=_bounded(analysis_id), reason=line[:MAX_REASON_CHARS],
                                crops=_bounded(crops), batch_id=batch_id[:200] if batch_id else None))
    logger.warning("crop batch of analysis %s (%s crops) failed: %s", analysis_id, crops, line)


def failed_batches_for(session: Session, analysis_id: int | None) -> list[FailedBatch]:
    """Failed batches of an analysis, oldest first; ``None`` lists those whose analysis was unreadable."""
    column = col(FailedBatch.analysis_id)
    condition = column.is_(None) if analysis_id is None else column == analysis_id
    statement = select(FailedBatch).where(condition).order_by(col(FailedBatch.created_at), col(FailedBatch.id))
    return list(session.exec(statement))
