"""Sending the time segments of a recording to Celery workers, and following them in the store.

The producer's side of :mod:`workers.segments`: one ``SegmentStatus`` row per segment
(``queued``), one task per segment on the inference queue, then progress read back from
those rows, which the workers update as they go. Like the crop dispatcher, the store
is the source of truth and there is no result backend. The wait fails when a segment
failed (naming it and the worker's reason) or when nothing moved for
``dispatch_timeout_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.exceptions
from celery import Celery
from kombu.exceptions import KombuError
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session

from kernel.store import SegmentState, SegmentStatus, insert_ignoring_duplicates, session_scope, store_id_of
from workers.celery_dispatch import PUBLISH_RETRY_POLICY, CeleryDispatchError, first_line, lost_work, publish_error
from workers.liveness import WorkerDirectory
from workers.redelivery import Observation, Redelivery
from workers.segments import Segment, statuses_for
from workers.tasks import ANALYSE_RECORDING_SEGMENT_TASK

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentProgress:
    """How far the workers are with the segments of one recording."""

    segments: int
    """Segments of the recording."""
    done: int
    """Segments stored."""
    frames: int
    """Frames sampled so far, over all segments."""
    faces: int
    """Faces detected so far, over all segments."""
    models_json: str | None
    """Provenance of the models the first finished segment's worker ran (JSON), once one finished."""


class SegmentDispatcher:
    """Sends the segment tasks of one analysis and waits until the workers stored every segment.

    ``path`` must be readable by the workers at the same location (a shared filesystem).
    ``overrides`` are the per-analysis settings every segment uses
    (:func:`workers.segments.segment_overrides`).
    """

    def __init__(
        self,
        app: Celery,
        engine: Engine,
        analysis_id: int,
        path: Path,
        segments: list[Segment],
        *,
        queue: str,
        overrides: dict[str, Any],
        timeout_seconds: float,
        poll_interval_seconds: float = 0.5,
        workers_unavailable_seconds: float = 30.0,
    ) -> None:
        if not segments:
            raise ValueError("segments: expected at least one segment")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds: expected a positive number, got {timeout_seconds}")
        self.app = app
        self.engine = engine
        self.analysis_id = analysis_id
        self.path = path
        self.segments = segments
        self.queue = queue
        self.overrides = overrides
        self.timeout_seconds = timeout_seconds
        self.poll_interval_seconds = poll_interval_seconds
        self._task: Any = app.tasks[ANALYSE_RECORDING_SEGMENT_TASK]
        self._last: tuple[int, int, int] | None = None
        self._last_progress = time.monotonic()
        self._store_error: str | None = None
        self._progress = SegmentProgress(len(segments), 0, 0, 0, None)
        self._store_id = store_id_of(engine)
        self._redelivery = Redelivery(WorkerDirectory(str(app.conf.broker_url)), queue,
                                      absent_seconds=workers_unavailable_seconds)
        self._by_work_id = {self.work_id(segment.index): segment for segment in segments}

    def work_id(self, segment_index: int) -> str:
        """The id a worker reports while it holds the segment."""
        return f"{self.analysis_id}.segment.{segment_index}"

    def send(self) -> None:
        """Record every segment as queued, then publish one task per segment."""
        rows = [SegmentStatus(analysis_id=self.analysis_id, segment_index=s.index, start_seconds=s.start_seconds,
                              end_seconds=s.end_seconds, status=SegmentState.queued) for s in self.segments]
        # The rows first: a fast worker updates its row, and the producer counts them.
        with session_scope(self.engine) as session:
            insert_ignoring_duplicates(session, rows)
        for segment in self.segments:
            self._publish(segment)
        self._last_progress = time.monotonic()

    def _publish(self, segment: Segment) -> None:
        work_id = self.work_id(segment.index)
        try:
            self._task.apply_async(
                args=[self.analysis_id, str(self.path), segment.index, segment.start_seconds,
                      segment.end_seconds, self.overrides],
                kwargs={"work_id": work_id, "store_id": self._store_id},
                queue=self.queue, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
        except (KombuError, redis.exceptions.RedisError, OSError) as exc:
            raise publish_error(self.app, "video segments", exc) from exc
        self._redelivery.sent(work_id)

    def _resend_lost(self, seen: Observation) -> None:
        """Publish again the segments a worker or the broker lost; fail when no worker can work."""
        lost = [self._by_work_id[w] for w in lost_work(self._redelivery, seen) if w in self._by_work_id]
        if lost:
            logger.warning("analysis %d: sending %s again (lost with a worker or the broker)", self.analysis_id,
                           ", ".join(segment.describe(len(self.segments)) for segment in lost))
        for segment in lost:
            self._publish(segment)

    def poll(self) -> SegmentProgress:
        """Read the segments' state; raises :class:`CeleryDispatchError` naming the first failed segment."""
        seen = self._redelivery.observe()  # before the store: a segment finished in between is then seen as done
        try:
            with Session(self.engine) as session:
                rows = statuses_for(session, self.analysis_id)
        except (OperationalError, InterfaceError) as exc:
            # A store that is briefly unreachable counts as no progress, not as a failure.
            reason = first_line(exc)
            if reason != self._store_error:
                logger.warning("cannot read segment progress from the store (will keep trying): %s", reason)
            self._store_error = reason
            return self._progress
        failed = [r for r in rows if r.status == SegmentState.failed]
        if failed:
            raise self._failure_error(failed[0])
        done = [r for r in rows if r.status == SegmentState.done]
        for row in done:
            self._redelivery.confirmed(self.work_id(row.segment_index))
        self._resend_lost(seen)
        provenance = {r.models_json for r in done}
        if len(provenance) > 1:
            logger.warning("analysis %d: the workers ran different models for different segments: %s",
                           self.analysis_id, sorted(provenance))
        current = (len(done), sum(r.frames for r in rows), sum(r.faces for r in rows))
        if current != self._last:
            self._last = current
            self._last_progress = time.monotonic()
        self._progress = SegmentProgress(len(self.segments), current[0], current[1], current[2],
                                         done[0].models_json if done else None)
        return self._progress

    def wait(self, on_progress: Callable[[SegmentProgress], None] | None = None) -> SegmentProgress:
        """Wait until every segment is stored; fail on a failed segment or ``timeout_seconds`` without progress."""
        waiting_since = time.monotonic()
        while True:
            progress = self.poll()
            if on_progress is not None:
                on_progress(progress)
            if progress.done >= progress.segments:
                return progress
            quiet = time.monotonic() - max(self._last_progress, waiting_since)
            if quiet >= self.timeout_seconds:
                store = f"; the store last failed with: {self._store_error}" if self._store_error else ""
                raise CeleryDispatchError(
                    f"no progress from the workers for {self.timeout_seconds:g} s: are workers running on queue "
                    f"{self.queue!r}? is the broker reachable? ({progress.done} of {progress.segments} video "
                    f"segments done, {progress.frames} frames sampled{store})"
                )
            time.sleep(self.poll_interval_seconds)

    def _failure_error(self, row: SegmentStatus) -> CeleryDispatchError:
        segment = Segment(row.segment_index, row.start_seconds, row.end_seconds)
        reason = row.reason or "no reason recorded"
        hint = ""
        if "no such file" in reason:
            hint = ("; workers read the video from its path, so it must be on a filesystem they share at the "
                    "same path (see docs/architecture.md)")
        return CeleryDispatchError(f"{segment.describe(len(self.segments))} failed on a worker: {reason}{hint}")
