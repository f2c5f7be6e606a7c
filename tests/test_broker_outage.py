"""A broker outage in the middle of an analysis: Redis dies, comes back empty, and nobody hangs.

Every test here starts a private ``redis-server`` on a free port that keeps nothing on
disk (no RDB snapshot, no AOF), so a restart is a real restart: queued and unacknowledged
messages die with it. The worker is a real ``celery worker`` subprocess and the producer
the real :class:`~workers.celery_dispatch.CeleryDispatcher` (helpers from
``tests/test_celery.py``).

The product behaviour these tests hold the dispatcher to:

* a broker that restarts while the workers are idle costs nothing: the worker reconnects
  by itself and the next batches are stored, each crop exactly once;
* batches that were waiting in Redis when it died are lost with it (they were only ever
  in Redis' memory). The producer of that analysis must then either complete with every
  crop stored exactly once (by publishing the lost batches again: the store's writes are
  idempotent, so that is safe) or fail with a :class:`CeleryDispatchError` that names the
  broker and says how many crops are done, at the latest when its no-progress timeout
  (``dispatch_timeout_seconds``) runs out;
* a publish while the broker is down fails within seconds, naming the broker;
* a broker that stops answering without closing its connections (a paused process, a
  network partition) fails the publish too, instead of blocking the producer forever.

Every blocking producer call runs under a bound well above the dispatcher's own timeouts,
so a hang fails the test with a message instead of stalling the run. The bounds check for
hangs, not for speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from kernel.store import init_store
from kernel.types import CropBatch
from tests.conftest import require
from tests.test_celery import (  # noqa: F401  (demo_batches is a fixture)
    Store,
    Worker,
    _celery_worker,
    _keys,
    _relabel,
    _settings,
    _workers,
    demo_batches,
)
from workers.celery_app import make_celery_app
from workers.celery_dispatch import CeleryDispatcher, CeleryDispatchError

#: The shortest timeouts the settings validator accepts: dispatch > visibility + 10.
VISIBILITY_TIMEOUT = 5
DISPATCH_TIMEOUT = 16
#: How long Redis stays down in the middle of the analysis.
OUTAGE_SECONDS = 3.0
BATCH_SIZE = 8

_T = TypeVar("_T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclasses.dataclass
class PrivateRedis:
    """A ``redis-server`` of this test alone, on a fixed port across restarts; by default it keeps nothing on disk."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    persist_dir: Path | None = None
    """With a folder: an append-only file there, written on every command (``appendfsync always``)."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def start(self, timeout: float = 15.0) -> None:
        argv = [str(shutil.which("redis-server")), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--daemonize", "no"]
        if self.persist_dir is None:
            argv += ["--appendonly", "no"]
        else:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.persist_dir)]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        pytest.fail(f"redis-server did not start on port {self.port}:\n{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it; with nothing persisted, every message is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections open but answers nothing (a hung host, a partition)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    require(shutil.which("redis-server") is not None, "needs the redis-server binary (apt install redis-server)")
    server = PrivateRedis(_free_port(), tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A temporary SQLite file shared by the test and its worker."""
    path = tmp_path / "store.sqlite3"
    url = f"sqlite:///{path}"
    return Store(path, url, init_store(url))


def _within(seconds: float, what: str, call: Callable[[], _T]) -> _T:
    """Run a blocking producer call; fail the test, saying what hung, if it has not returned after ``seconds``."""
    outcome: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test thread below
            error.append(exc)

    thread = threading.Thread(target=run, name=f"producer: {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{what}: still blocked after {seconds:g} s; the producer hangs")
    if error:
        raise error[0]
    return outcome[0]


def _copies(batches: list[CropBatch], analysis_id: int, copies: int, *, offset: int = 0) -> list[CropBatch]:
    """The real crops ``copies`` times over, at class times shifted by 1000 s per copy (distinct keys)."""
    out = []
    for copy in range(offset, offset + copies):
        for batch in _relabel(batches, analysis_id):
            out.append(dataclasses.replace(batch, timestamps=batch.timestamps + 1000.0 * copy))
    return out


def _wait_for_log(worker: Worker, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while worker.log_text().count(text) < count:
        if time.monotonic() > deadline or worker.process.poll() is not None:
            pytest.fail(f"the worker never logged {text!r} {count} time(s):\n{worker.log_text()[-3000:]}")
        time.sleep(0.1)


def _submit_all(dispatcher: CeleryDispatcher, batches: list[CropBatch]) -> None:
    for batch in batches:
        dispatcher.submit(batch)
    dispatcher.flush()


def _submit_and_drain(dispatcher: CeleryDispatcher, batches: list[CropBatch]) -> None:
    _submit_all(dispatcher, batches)
    dispatcher.drain()


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_a_broker_restart_mid_analysis_completes_or_fails_with_a_reason_and_never_hangs(
    private_redis: PrivateRedis, store: Store, demo_batches: list[CropBatch],  # noqa: F811  (the imported fixture)
    default_models: Path, tmp_path: Path,
) -> None:
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    settings = _settings(store, queue, default_models, broker_url=private_redis.url, batch_size=BATCH_SIZE,
                         broker_visibility_timeout_seconds=VISIBILITY_TIMEOUT,
                         dispatch_timeout_seconds=DISPATCH_TIMEOUT)
    app = make_celery_app(settings)
    bound = DISPATCH_TIMEOUT + 15.0  # the dispatcher gives up by itself well before this

    def dispatcher_for(analysis_id: int) -> CeleryDispatcher:
        return CeleryDispatcher(app, store.engine, analysis_id, queue=queue, batch_size=BATCH_SIZE,
                                timeout_seconds=settings.dispatch_timeout_seconds, poll_interval_seconds=0.1)

    interrupted = store.new_analysis("interrupted by the outage")
    before, during = _copies(demo_batches, interrupted, 1), _copies(demo_batches, interrupted, 4, offset=1)
    with _workers() as workers:
        worker = _celery_worker(settings, tmp_path / "worker.log")
        workers.append(worker)
        worker.wait_ready()
        _wait_for_log(worker, "Connected to redis://", 1, 10)

        # Before the outage: everything sent is stored.
        producer = dispatcher_for(interrupted)
        _within(bound, "sending before the outage", lambda: _submit_and_drain(producer, before))
        assert store.keys(interrupted) == sorted(_keys(before))

        # Many batches at once, faster than one worker process takes them; Redis dies with a backlog.
        _within(bound, "sending the batches the outage catches", lambda: _submit_all(producer, during))
        backlog = private_redis.client().llen(queue)
        private_redis.stop()
        assert backlog > 0, "the worker took every batch before Redis stopped: nothing was at stake"
        _wait_for_log(worker, "Connection to broker lost", 1, 15)
        time.sleep(OUTAGE_SECONDS)
        private_redis.start()
        # The worker reconnects by itself (broker_connection_max_retries=None), to an empty Redis.
        _wait_for_log(worker, "Connected to redis://", 2, 30)

        # The interrupted analysis completes, or fails saying why; it does not wait forever.
        failure: CeleryDispatchError | None = None
        try:
            _within(bound, "waiting for the interrupted analysis", producer.drain)
        except CeleryDispatchError as exc:
            failure = exc
        sent = _keys(before + during)
        keys = store.keys(interrupted)
        assert len(keys) == len(set(keys)), "a crop was stored twice"
        assert _keys(before) <= set(keys) <= sent
        if failure is None:
            assert set(keys) == sent
        else:
            reason = str(failure)
            print(f"the interrupted analysis failed, as it may: {reason}")
            assert "broker" in reason, reason
            done = re.search(r"(\d+) of (\d+) crops", reason)
            assert done is not None, reason
            assert (int(done[1]), int(done[2])) == (len(keys), len(sent)), reason
            assert len(keys) < len(sent)

        # After the restart the same app publishes again and the worker consumes again.
        after = store.new_analysis("after the outage")
        batches = _copies(demo_batches, after, 1)
        recovered = dispatcher_for(after)
        _within(bound, "sending after the restart", lambda: _submit_and_drain(recovered, batches))
        keys = store.keys(after)
        assert keys == sorted(_keys(batches))  # every crop, each once

        # While the broker is down, sending fails within seconds and names the broker.
        private_redis.stop()
        down = store.new_analysis("broker down")
        refused = dispatcher_for(down)
        started = time.monotonic()
        with pytest.raises(CeleryDispatchError, match=rf"^cannot send crops to the broker "
                                                     rf"{re.escape(private_redis.url)}: .*"
                                                     r"is Redis running and reachable\?$"):
            _within(bound, "sending while the broker is down",
                    lambda: _submit_all(refused, _copies(demo_batches, down, 1)))
        print(f"sending to the stopped broker gave up after {time.monotonic() - started:.1f} s")
        assert store.stored(down) == 0


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_broker_that_stops_answering_fails_the_producer_instead_of_blocking_it(
    private_redis: PrivateRedis, store: Store, demo_batches: list[CropBatch],  # noqa: F811  (the imported fixture)
    default_models: Path,
) -> None:
    queue = f"paused-{uuid.uuid4().hex[:8]}"
    settings = _settings(store, queue, default_models, broker_url=private_redis.url, batch_size=1,
                         broker_visibility_timeout_seconds=VISIBILITY_TIMEOUT,
                         dispatch_timeout_seconds=DISPATCH_TIMEOUT)
    app = make_celery_app(settings)
    analysis_id = store.new_analysis("paused broker")
    batches = _copies(demo_batches[:1], analysis_id, 2)
    dispatcher = CeleryDispatcher(app, store.engine, analysis_id, queue=queue, batch_size=1,
                                  timeout_seconds=settings.dispatch_timeout_seconds)
    dispatcher.submit(batches[0])  # the producer's connection to the broker is open and in use
    # kombu retries a publish 4 times (PUBLISH_RETRY_POLICY), each try waiting up to socket_timeout.
    socket_timeout = app.conf.broker_transport_options.get("socket_timeout")
    bound = 6 * (socket_timeout or 4) + 10
    private_redis.pause()
    try:
        with pytest.raises(CeleryDispatchError, match=r"^cannot send crops to the broker "):
            _within(bound, "sending to a broker that stopped answering", lambda: dispatcher.submit(batches[1]))
    finally:
        private_redis.resume()
        private_redis.stop()
