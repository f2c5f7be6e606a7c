"""The producer's side of recovery: what to send again, and when to stop waiting for the workers.

Redis gives a message back to the queue only once its visibility timeout has passed (minutes,
since it must outlast the longest task), and a broker restart without persistence loses what it
held. So the producer keeps every batch or segment the store has not confirmed, and decides from
the workers' reports (:mod:`workers.liveness`) each time it polls:

- work that a live worker held, and that no worker holds now and the store has not confirmed,
  was lost with its worker (killed, or its task cancelled when the broker went away): send it
  again;
- work that no worker ever held, while the queue is empty, is nowhere: lost with a broker
  restart, or reserved by a worker's main process that died. After a grace of a few seconds
  (the moment between a worker taking a message and reporting it), send it again;
- no live worker on the queue for ``absent_seconds``, or every live one reporting a problem for
  that long: fail now, naming the cause.

Sending twice is harmless: the store ignores the second copy of every row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions

from workers.liveness import WorkerDirectory, WorkerReport

logger = logging.getLogger(__name__)

#: Seconds an unclaimed piece of work must have been out, with the queue empty, before it is sent again.
UNCLAIMED_GRACE_SECONDS = 5.0


class WorkersUnavailableError(Exception):
    """No worker can do the work: none consumes the queue, or every one reports a problem."""


@dataclass
class _Outstanding:
    sent_at: float
    held: bool = False
    resent: int = 0


@dataclass(frozen=True)
class Observation:
    """What the workers said at one poll (read before the store, so that nothing stored is missed)."""

    reports: list[WorkerReport] | None
    """Reports of the live workers on the queue; None when the broker could not be read."""
    queue_length: int
    """Messages waiting in the queue."""
    at: float
    """When it was read (monotonic)."""

    @property
    def held(self) -> set[str]:
        """Ids of the work any live worker holds."""
        return {work for report in self.reports or () for work in report.work}


class Redelivery:
    """Tracks the work of one producer until the store confirms it; see the module docstring."""

    def __init__(self, directory: WorkerDirectory | None, queue: str, *, absent_seconds: float,
                 grace_seconds: float = UNCLAIMED_GRACE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.queue = queue
        self.absent_seconds = absent_seconds
        self.grace_seconds = grace_seconds
        self.clock = clock
        self._outstanding: dict[str, _Outstanding] = {}
        self._unavailable_since: float | None = None
        self._broker_error: str | None = None
        self.resent_total = 0
        """Pieces of work sent again so far."""

    @property
    def outstanding(self) -> int:
        """Pieces of work sent and not yet confirmed."""
        return len(self._outstanding)

    def sent(self, work_id: str) -> None:
        """Note work just published (again)."""
        previous = self._outstanding.get(work_id)
        self._outstanding[work_id] = _Outstanding(self.clock(), resent=previous.resent + 1 if previous else 0)

    def confirmed(self, work_id: str) -> None:
        """The store has the work's results (or its failure): it is never sent again."""
        self._outstanding.pop(work_id, None)

    def observe(self) -> Observation:
        """Read the workers' reports and the queue; call before reading the store."""
        now = self.clock()
        if self.directory is None:
            return Observation(None, 0, now)
        try:
            reports = self.directory.reports(self.queue)
            length = self.directory.queue_length(self.queue)
        except (redis.exceptions.RedisError, OSError) as exc:
            if str(exc) != self._broker_error:
                logger.warning("cannot read the workers' reports from the broker (will keep trying): %s", exc)
            self._broker_error = str(exc)
            return Observation(None, 0, now)
        self._broker_error = None
        return Observation(reports, length, now)

    def to_resend(self, seen: Observation) -> list[str]:
        """Ids of the work to send again, given what the workers said (call after the store's confirmations).

        Raises :class:`WorkersUnavailableError` when no worker has been able to work for ``absent_seconds``.
        """
        if seen.reports is None:
            return []  # the broker is away: nothing is known, nothing can be sent
        self._check_available(seen)
        held = seen.held
        resend: list[str] = []
        for work_id, work in self._outstanding.items():
            if work_id in held:
                work.held = True
            elif work.held:
                resend.append(work_id)  # its worker lost it
            elif seen.queue_length == 0 and seen.at - work.sent_at >= self.grace_seconds:
                resend.append(work_id)  # in no queue and with no worker: lost with the broker or a dead worker
        return resend

    def _check_available(self, seen: Observation) -> None:
        reports = seen.reports or []
        able = [r for r in reports if r.problem is None]
        if not self._outstanding or able:
            self._unavailable_since = None
            return
        if self._unavailable_since is None:
            self._unavailable_since = seen.at
        if seen.at - self._unavailable_since < self.absent_seconds:
            return
        waited = f"{self.absent_seconds:g} s"
        if not reports:
            raise WorkersUnavailableError(
                f"no worker has consumed queue {self.queue!r} for {waited}: start one with "
                f"`classlens worker --queue {self.queue}` (and check that it reaches the same broker)")
        problems = sorted({r.problem for r in reports if r.problem})
        raise WorkersUnavailableError(
            f"the workers on queue {self.queue!r} could not work for {waited}: " + "; ".join(problems)
            + f" ({len(reports)} worker process{'es' if len(reports) != 1 else ''})")
