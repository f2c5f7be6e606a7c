"""Worker reports: which worker processes are alive, what they are working on, what stops them.

Every worker process (each pool child of ``classlens worker``, and the main process while
it waits for its store) keeps one short-lived key in Redis, the broker it already talks to:

``classlens:worker:<host>:<pid>`` → JSON ``{"node", "queues", "store_id", "problem", "work", "at"}``

rewritten every :data:`REPORT_INTERVAL_SECONDS` with a time-to-live of
``worker_report_ttl_seconds``. A process that dies (``kill -9``, a lost machine) stops
rewriting it, and Redis forgets it a few seconds later. Producers read these keys
(:class:`WorkerDirectory`) to learn, within seconds and without waiting for Redis'
visibility timeout:

- which of their batches or segments a live worker holds (``work``): one that a worker held
  and that is neither held nor stored any more was lost with its worker, and is sent again;
- whether any worker consumes their queue at all, and whether every one of them is stuck on
  a ``problem`` (an unreachable database, another store, missing models), so that they fail
  fast with the workers' own reason instead of waiting for progress that cannot come.

Only ids and one-line reasons go into Redis; never a crop, never a name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
import redis.exceptions

logger = logging.getLogger(__name__)

#: Prefix of every worker's report key.
KEY_PREFIX = "classlens:worker:"
#: How often a worker rewrites its report.
REPORT_INTERVAL_SECONDS = 2.0
#: Kombu's Redis transport keeps a queue's messages in these lists: the queue's name for
#: priority 0, then the name, a separator and the step for the other priority steps.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def redis_client(url: str) -> redis.Redis:
    """A Redis client for reports, with short timeouts: a report must never hang its process."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


@dataclass(frozen=True)
class WorkerReport:
    """What one worker process said about itself, as read back by a producer."""

    node: str
    """``host:pid`` of the process."""
    queues: tuple[str, ...]
    """The queues it consumes."""
    store_id: str | None
    """Id of the store it writes to (None before it could open one)."""
    problem: str | None
    """Why it cannot work right now, in one line; None when it can."""
    work: tuple[str, ...]
    """Ids of the batches or segments it holds now (running, or waiting to retry)."""
    at: float
    """When it wrote the report (seconds since the epoch, its own clock)."""

    @classmethod
    def parse(cls, raw: bytes | str) -> WorkerReport | None:
        """A report from its JSON, or None for anything unreadable."""
        try:
            data = json.loads(raw)
            return cls(node=str(data["node"]), queues=tuple(str(q) for q in data.get("queues") or ()),
                       store_id=data.get("store_id"), problem=data.get("problem"),
                       work=tuple(str(w) for w in data.get("work") or ()), at=float(data.get("at") or 0.0))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class WorkerReporter:
    """The report of this process: what it holds and what stops it, rewritten in a daemon thread.

    ``hold`` and ``release`` are called by the tasks; ``set_problem`` by whatever finds
    one (the task on a store error, the start-up check). Broker errors while writing are
    logged once and otherwise ignored: a report is a hint for producers, never a reason
    to fail a task.
    """

    url: str
    queues: tuple[str, ...]
    ttl_seconds: float
    node: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    store_id: str | None = None
    problem: str | None = None
    _held: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _client: redis.Redis | None = None
    _failing: bool = False

    @property
    def key(self) -> str:
        """The key of the report in Redis."""
        return KEY_PREFIX + self.node

    def start(self, *, watch_parent: bool = False) -> WorkerReporter:
        """Write the report now and then every few seconds; returns self.

        ``watch_parent`` (pool children): stop reporting once the worker's main process is
        gone, so that an orphaned child does not look like a live worker.
        """
        parent = os.getppid()
        self.write()
        self._thread = threading.Thread(target=self._run, args=(parent if watch_parent else None,),
                                        name="classlens-worker-report", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, forget: bool = True) -> None:
        """Stop reporting; ``forget`` deletes the key at once (a clean exit)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if forget:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                self._redis().delete(self.key)

    def hold(self, work_id: str, seconds: float | None = None) -> None:
        """Report ``work_id`` as held: until :meth:`release`, or for ``seconds`` (a retry's wait)."""
        with self._lock:
            self._held[work_id] = time.monotonic() + seconds if seconds is not None else float("inf")
        self.write()

    def release(self, work_id: str) -> None:
        """Stop reporting ``work_id`` (stored, recorded as failed, or handed back to the queue)."""
        with self._lock:
            self._held.pop(work_id, None)
        self.write()

    def set_problem(self, problem: str | None) -> None:
        """Report what stops this process (one line), or None once it works again."""
        if problem != self.problem:
            self.problem = problem
            self.write()

    def snapshot(self) -> dict[str, object]:
        """The report as it would be written now."""
        now = time.monotonic()
        with self._lock:
            for work_id in [w for w, until in self._held.items() if until < now]:
                del self._held[work_id]
            work = sorted(self._held)
        return {"node": self.node, "queues": list(self.queues), "store_id": self.store_id, "problem": self.problem,
                "work": work, "at": time.time()}

    def write(self) -> None:
        """Write the report (with its time-to-live) now."""
        try:
            self._redis().set(self.key, json.dumps(self.snapshot()), px=int(self.ttl_seconds * 1000))
            self._failing = False
        except (redis.exceptions.RedisError, OSError) as exc:
            if not self._failing:
                logger.warning("cannot write this worker's report to the broker (will keep trying): %s", exc)
            self._failing = True

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client(self.url)
        return self._client

    def _run(self, parent: int | None) -> None:
        while not self._stop.wait(REPORT_INTERVAL_SECONDS):
            if parent is not None and os.getppid() != parent:
                logger.warning("the worker's main process is gone; this pool process stops reporting")
                return
            self.write()


class WorkerDirectory:
    """A producer's view of the workers: their reports and the length of a queue, read from Redis."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = redis_client(url)

    def reports(self, queue: str) -> list[WorkerReport]:
        """Reports of the live worker processes consuming ``queue``."""
        keys = list(self._client.scan_iter(match=KEY_PREFIX + "*", count=200))
        if not keys:
            return []
        found = [WorkerReport.parse(raw) for raw in self._client.mget(keys) if raw is not None]
        return [r for r in found if r is not None and queue in r.queues]

    def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue`` (every priority), not counting those a worker holds."""
        names: Iterable[str] = (queue, *(f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS))
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        return int(sum(pipe.execute()))

    def close(self) -> None:
        """Close the connection."""
        self._client.close()
