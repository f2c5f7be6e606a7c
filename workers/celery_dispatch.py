"""A :class:`~workers.dispatch.CropDispatcher` that sends crop batches to Celery workers.

The producer (``classlens analyze`` with a broker configured, or the meeting bot) packs
crops into msgpack payloads and publishes them on the inference queue; workers store
the results themselves. Progress is read back from the store, the source of truth:
the analysis is complete when every distinct (stream, track, timestamp) key sent is
either stored or part of a batch the workers recorded as failed. There is no result
backend to keep in sync, and a batch redelivered after a crash is still counted once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions
from celery import Celery
from kombu.exceptions import KombuError
from sqlalchemy import Engine, func
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session, col, select

from kernel.errors import ClassLensError
from kernel.store import FaceObservation, FailedBatch, StoredBatch, store_id_of
from kernel.types import CropBatch
from workers.dispatch import DispatchStats
from workers.failures import ensure_failed_batch_table, failed_batches_for
from workers.liveness import WorkerDirectory
from workers.redelivery import Observation, Redelivery, WorkersUnavailableError
from workers.tasks import ANALYSE_CROP_BATCH_TASK

logger = logging.getLogger(__name__)

#: How kombu retries a publish while the broker is unreachable: 4 tries over about 2 s,
#: then the producer fails with a clear message instead of hanging on a dead broker.
PUBLISH_RETRY_POLICY: dict[str, float] = {
    "max_retries": 3,
    "interval_start": 0.2,
    "interval_step": 0.4,
    "interval_max": 1.0,
}

_T = TypeVar("_T")

#: Key of one observation in the store; the unique key of ``FaceObservation`` within an analysis.
ObservationKey = tuple[str, int, float]


class CeleryDispatchError(ClassLensError, RuntimeError):
    """The workers cannot be reached, stopped making progress, or gave up on batches."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def publish_error(app: Celery, what: str, exc: BaseException) -> CeleryDispatchError:
    """The one-line error for a publish that failed after kombu's retries."""
    from kombu.utils.url import maybe_sanitize_url

    broker = maybe_sanitize_url(app.conf.broker_url or "")
    return CeleryDispatchError(
        f"cannot send {what} to the broker {broker}: {first_line(exc)}; is Redis running and reachable?"
    )


def lost_work(redelivery: Redelivery, seen: Observation) -> list[str]:
    """Ids of the work a worker or the broker lost, to send again; fails when no worker can work."""
    try:
        return redelivery.to_resend(seen)
    except WorkersUnavailableError as exc:
        raise CeleryDispatchError(str(exc)) from None


class CeleryDispatcher:
    """Sends crop batches of one analysis to Celery workers and waits for their results in the store.

    ``submit`` re-batches crops into payloads of ``batch_size`` crops and publishes them
    on ``queue``. It blocks while more than ``max_pending_crops`` crops are sent but not
    yet stored (back-pressure: a long recording must not pile gigabytes of crops into
    Redis). ``drain`` waits until every crop is accounted for and raises
    :class:`CeleryDispatchError` when batches failed or nothing moved for
    ``timeout_seconds``.
    """

    def __init__(
        self,
        app: Celery,
        engine: Engine,
        analysis_id: int,
        *,
        queue: str,
        batch_size: int,
        timeout_seconds: float,
        on_stored: Callable[[int], None] | None = None,
        max_pending_crops: int | None = None,
        poll_interval_seconds: float = 0.25,
        max_batch_delay_seconds: float | None = None,
        emotion_inference: bool = True,
        workers_unavailable_seconds: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds: expected a positive number, got {timeout_seconds}")
        self.app = app
        self.engine = engine
        self.analysis_id = analysis_id
        self.queue = queue
        self.batch_size = batch_size
        self.timeout_seconds = timeout_seconds
        self.on_stored = on_stored
        self.max_pending_crops = max_pending_crops or 64 * batch_size
        self.poll_interval_seconds = poll_interval_seconds
        self.max_batch_delay_seconds = max_batch_delay_seconds
        """A partial batch older than this is published at the next submit (live feeds); None: wait for a full one."""
        self.emotion_inference = emotion_inference
        """False: workers skip the emotion model for this analysis (they can never be made to run it)."""
        self._pending_since = 0.0
        self.stats = DispatchStats()
        """``batches_run`` counts the batches published."""
        self._task: Any = app.tasks[ANALYSE_CROP_BATCH_TASK]
        self._pending: list[CropBatch] = []
        self._pending_count = 0
        self._sent_keys: set[ObservationKey] = set()
        self._done = 0
        self._failed: list[FailedBatch] = []
        self._last_progress = time.monotonic()
        self._last_refresh = 0.0
        self._closed = False
        self._store_error: str | None = None
        # Workers create the table too, but the producer reads it before any worker may have run.
        ensure_failed_batch_table(engine)
        self._store_id = store_id_of(engine)
        # Batch ids: unique per producer (analysis, a random token, a sequence number).
        self._token = uuid.uuid4().hex[:8]
        self._sequence = 0
        # Payloads the store has not confirmed yet, to send again if a worker or the broker loses them.
        self._unconfirmed: dict[str, bytes] = {}
        self._last_receipt = 0
        self._redelivery = Redelivery(WorkerDirectory(str(app.conf.broker_url)), queue,
                                      absent_seconds=workers_unavailable_seconds)

    def submit(self, batch: CropBatch) -> None:
        """Queue crops; full batches are published at once. Blocks while too many crops are outstanding."""
        self._check_open()
        if batch.analysis_id != self.analysis_id:
            raise ValueError(f"crop batch of analysis {batch.analysis_id} sent to the dispatcher of {self.analysis_id}")
        if len(batch) == 0:
            return
        self.stats.crops_submitted += len(batch)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(batch)
        self._pending_count += len(batch)
        overdue = (self.max_batch_delay_seconds is not None
                   and time.monotonic() - self._pending_since >= self.max_batch_delay_seconds)
        if overdue and self._pending_count < self.batch_size:
            # A batch is filled up to its size or its deadline, whichever comes first.
            self.flush()
        elif self._pending_count >= self.batch_size:
            joined = self._pending[0] if len(self._pending) == 1 else CropBatch.concatenate(self._pending)
            start = 0
            while len(joined) - start >= self.batch_size:
                self._send(joined.slice(start, start + self.batch_size))
                start += self.batch_size
            rest = joined.slice(start, len(joined)) if start < len(joined) else None
            self._pending = [rest] if rest is not None else []
            self._pending_count = len(rest) if rest is not None else 0
        self._wait_for_room()

    def flush(self) -> None:
        """Publish the crops held back for a partial batch."""
        self._check_open()
        if self._pending:
            joined = self._pending[0] if len(self._pending) == 1 else CropBatch.concatenate(self._pending)
            self._pending, self._pending_count = [], 0
            self._send(joined)

    def drain(self) -> None:
        """Flush, then wait until every crop sent is stored or recorded as failed."""
        self.flush()
        expected = len(self._sent_keys)
        waiting_since = time.monotonic()
        while True:
            self._refresh()
            if self._done >= expected:
                break
            self._check_stalled(waiting_since, expected)
            time.sleep(self.poll_interval_seconds)
        if self._failed:
            raise self._failure_error()

    def close(self) -> None:
        """Drop crops not yet published; batches already published are still processed by the workers."""
        self._closed = True
        self._pending, self._pending_count = [], 0
        self._unconfirmed.clear()
        if self._redelivery.directory is not None:
            self._redelivery.directory.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CeleryDispatchError("the crop dispatcher is closed")

    def _send(self, batch: CropBatch) -> None:
        payload = batch.to_bytes()
        self._sequence += 1
        batch_id = f"{self.analysis_id}.{self._token}.{self._sequence}"
        self._publish(batch_id, payload)
        self._unconfirmed[batch_id] = payload
        self._sent_keys.update(zip(batch.streams, batch.track_ids.tolist(), batch.timestamps.tolist(), strict=True))
        self.stats.batches_run += 1

    def _publish(self, batch_id: str, payload: bytes) -> None:
        try:
            self._task.apply_async(args=[payload], kwargs={"emotion_inference": self.emotion_inference,
                                                           "batch_id": batch_id, "store_id": self._store_id},
                                   queue=self.queue, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
        except (KombuError, redis.exceptions.RedisError, OSError) as exc:
            raise publish_error(self.app, "crops", exc) from exc
        self._redelivery.sent(batch_id)

    def _resend_lost(self, seen: Observation) -> None:
        """Publish again the batches a worker or the broker lost; fail when no worker can work."""
        lost = [batch_id for batch_id in lost_work(self._redelivery, seen) if batch_id in self._unconfirmed]
        if lost:
            logger.warning("analysis %d: sending %d crop batch%s again (lost with a worker or the broker)",
                           self.analysis_id, len(lost), "" if len(lost) == 1 else "es")
        for batch_id in lost:
            self._publish(batch_id, self._unconfirmed[batch_id])

    def _confirm(self, batch_id: str) -> None:
        self._unconfirmed.pop(batch_id, None)
        self._redelivery.confirmed(batch_id)

    def _new_receipts(self, session: Session) -> list[str]:
        """Ids of the batches stored since the last read (receipts are read in row order)."""
        rows = session.exec(select(StoredBatch.id, StoredBatch.batch_id).where(
            col(StoredBatch.analysis_id) == self.analysis_id, col(StoredBatch.id) > self._last_receipt,
        ).order_by(col(StoredBatch.id))).all()
        if rows:
            self._last_receipt = max(row_id or 0 for row_id, _ in rows)
        return [batch_id for _, batch_id in rows]

    def _refresh(self) -> None:
        """Read progress from the store; report newly stored crops to ``on_stored``."""
        self._last_refresh = time.monotonic()
        seen = self._redelivery.observe()  # before the store: work finished in between is then seen as stored
        stored = self._read_store(self._count_stored, self.stats.crops_stored)
        failed = self._read_store(lambda session: failed_batches_for(session, self.analysis_id), self._failed)
        receipts: list[str] = self._read_store(self._new_receipts, [])
        for batch_id in receipts:
            self._confirm(batch_id)
        for failure in failed:
            if failure.batch_id:
                self._confirm(failure.batch_id)
        done = stored + sum(f.crops or 0 for f in failed)
        if done != self._done or len(failed) != len(self._failed):
            self._last_progress = time.monotonic()
        increment = stored - self.stats.crops_stored
        self.stats.crops_stored = stored
        self._done = done
        self._failed = failed
        if increment > 0 and self.on_stored is not None:
            self.on_stored(increment)
        if not self._failed:
            self._resend_lost(seen)

    def _count_stored(self, session: Session) -> int:
        statement = select(func.count()).select_from(FaceObservation).where(
            col(FaceObservation.analysis_id) == self.analysis_id)
        return int(session.exec(statement).one())

    def _read_store(self, read: Callable[[Session], _T], fallback: _T) -> _T:
        """Run a read; a store that is briefly unreachable counts as no progress, not as a failure."""
        try:
            with Session(self.engine) as session:
                return read(session)
        except (OperationalError, InterfaceError) as exc:
            reason = first_line(exc)
            if reason != self._store_error:
                logger.warning("cannot read progress from the store (will keep trying): %s", reason)
            self._store_error = reason
            return fallback

    def _wait_for_room(self) -> None:
        """Back-pressure: wait while too many sent crops are not yet done; refresh progress now and then."""
        if time.monotonic() - self._last_refresh < 1.0 and len(self._sent_keys) - self._done <= self.max_pending_crops:
            return
        self._refresh()
        waiting_since = time.monotonic()
        while len(self._sent_keys) - self._done > self.max_pending_crops:
            if self._failed:
                raise self._failure_error()
            self._check_stalled(waiting_since, len(self._sent_keys))
            time.sleep(self.poll_interval_seconds)
            self._refresh()

    def _check_stalled(self, waiting_since: float, expected: int) -> None:
        quiet = time.monotonic() - max(self._last_progress, waiting_since)
        if quiet < self.timeout_seconds:
            return
        if self._failed:
            # Failed batches whose size was unreadable never add up; their reason is the news.
            raise self._failure_error()
        store = f"; the store last failed with: {self._store_error}" if self._store_error else ""
        raise CeleryDispatchError(
            f"no progress from the workers for {self.timeout_seconds:g} s: are workers running on queue "
            f"{self.queue!r}? is the broker reachable? ({self._done} of {expected} crops done{store})"
        )

    def _failure_error(self) -> CeleryDispatchError:
        count = len(self._failed)
        noun = "crop batch" if count == 1 else "crop batches"
        return CeleryDispatchError(f"{count} {noun} failed on the workers: {self._failed[0].reason}")
