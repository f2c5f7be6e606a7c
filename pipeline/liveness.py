"""Signs of life of an analysis' producer, and the clean-up of analyses whose producer died.

The process that runs an analysis (``classlens analyze``, the meeting bot, the WHIP ingest)
is its producer: it samples, dispatches and finalises. If it is killed (``kill -9``, a lost
machine), nobody finalises the analysis, which would stay "running" with partial rows
forever. So every producer stamps ``Analysis.heartbeat_at`` every
``producer_heartbeat_seconds`` while it runs (:class:`ProducerHeartbeat`), and
:func:`fail_abandoned_analyses` marks running analyses without a recent stamp failed and
removes their partial rows, as any failed analysis' are (:func:`pipeline.finalise.mark_failed`).
It runs when ``classlens analyze`` or a worker starts, and on the maintenance schedule.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import Engine, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from kernel.store import Analysis, AnalysisStatus, last_sign_of_life, utcnow
from pipeline.finalise import mark_failed

logger = logging.getLogger(__name__)


def stamp_heartbeat(engine: Engine, analysis_id: int) -> None:
    """Record that the analysis' producer is alive now."""
    with Session(engine) as session:
        session.execute(update(Analysis).where(col(Analysis.id) == analysis_id,
                                               col(Analysis.status) == AnalysisStatus.running)
                        .values(heartbeat_at=utcnow()))
        session.commit()


class ProducerHeartbeat:
    """A daemon thread that stamps one analysis' heartbeat every ``interval_seconds`` until stopped.

    A store that is briefly unreachable costs a stamp, not the analysis: the thread logs
    once and tries again at the next interval.
    """

    def __init__(self, engine: Engine, analysis_id: int, interval_seconds: float) -> None:
        self.engine = engine
        self.analysis_id = analysis_id
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ProducerHeartbeat:
        """Stamp now, then keep stamping in the background; returns self."""
        stamp_heartbeat(self.engine, self.analysis_id)
        self._thread = threading.Thread(target=self._run, name=f"classlens-heartbeat-{self.analysis_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop stamping (idempotent); the analysis is then finalised or failed by its producer."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_seconds):
            try:
                stamp_heartbeat(self.engine, self.analysis_id)
                failing = False
            except OperationalError as exc:
                if not failing:
                    logger.warning("analysis %d: cannot stamp its heartbeat (will keep trying): %s",
                                   self.analysis_id, str(exc).splitlines()[0])
                failing = True


def abandoned_reason(last_sign: str) -> str:
    """The failure reason of an analysis whose producer stopped."""
    return (f"its producer stopped without finishing it (no sign of life since {last_sign} UTC); "
            "partial results were removed, run it again")


def fail_abandoned_analyses(engine: Engine, stale_after_seconds: float) -> list[int]:
    """Mark running analyses failed whose producer has not stamped for ``stale_after_seconds``; returns their ids.

    An analysis that never stamped (made by an older release) counts from its creation.
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    last_sign = last_sign_of_life()
    with Session(engine) as session:
        stale = list(session.exec(select(Analysis.id, last_sign).where(
            col(Analysis.status) == AnalysisStatus.running, last_sign < cutoff)))
    failed: list[int] = []
    for analysis_id, seen in stale:
        if analysis_id is None:
            continue
        if not mark_failed(engine, analysis_id, abandoned_reason(f"{seen:%Y-%m-%d %H:%M:%S}"),
                           only_if_silent_since=cutoff):
            continue  # its producer stamped in the meantime
        failed.append(analysis_id)
        logger.warning("analysis %d: its producer stopped (no sign of life since %s); marked failed",
                       analysis_id, seen)
    return failed
