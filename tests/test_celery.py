"""Celery dispatch with a real Redis and real worker processes.

Every test marked ``redis`` starts its own worker subprocesses on a queue of its own (so stray messages
of another run never reach them), with the store in a temporary SQLite file shared by
the test process and the workers. Redis database 15 is flushed once per module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from sqlalchemy import Engine, delete, func
from sqlmodel import Session, col, select

from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    FaceObservation,
    FailedBatch,
    delete_analysis_data,
    init_store,
    observations_for,
    session_scope,
)
from kernel.types import CropBatch
from pipeline.capture import crop_batch_for
from pipeline.models import PipelineComponents
from tests.conftest import POSTGRES_URL, REPO_ROOT, require
from tests.processes import stop_process_group
from vision.sources import RecordedFileSource
from vision.synthetic import demo_classroom_video
from vision.tracking import StudentTracker
from workers.celery_app import make_celery_app
from workers.celery_dispatch import CeleryDispatcher, CeleryDispatchError
from workers.dispatch import InProcessDispatcher
from workers.failures import failed_batches_for
from workers.tasks import ANALYSE_CROP_BATCH_TASK

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
BROKER_URL = os.environ.get("CLASSLENS_TEST_BROKER_URL", f"redis://{REDIS_HOST}:{REDIS_PORT}/15")
#: Short, so that a message of a killed worker comes back within the test (production: minutes).
VISIBILITY_TIMEOUT = int(os.environ.get("CLASSLENS_TEST_VISIBILITY_TIMEOUT", "10"))

ObservationKey = tuple[str, int, float]


def _redis_up() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker() -> Iterator[redis.Redis]:
    """Redis db 15, emptied: the broker of every test here."""
    require(_redis_up(), f"needs Redis on {REDIS_HOST}:{REDIS_PORT} (apt install redis-server)")
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def demo_batches(components: Any) -> list[CropBatch]:
    """Crop batches of the demo classroom made by the real capture pipeline (one per sampled frame)."""
    assert isinstance(components, PipelineComponents)
    tracker = StudentTracker(max_gap_seconds=30.0, embedder=components.embedder)
    batches = []
    for frame in RecordedFileSource(demo_classroom_video(), 1.0):
        detections = tracker.update(components.detector.detect(frame), frame.image)
        if len(detections):
            batches.append(crop_batch_for(0, frame, detections))
    assert sum(len(b) for b in batches) > 50
    return batches


@dataclasses.dataclass
class Store:
    """The store shared by the test and its workers: a temporary SQLite file, or the test PostgreSQL."""

    path: Path | None
    url: str
    engine: Engine
    created: list[int] = dataclasses.field(default_factory=list)

    def new_analysis(self, title: str) -> int:
        with session_scope(self.engine) as session:
            analysis = Analysis(source=title, title=title)
            session.add(analysis)
            session.flush()
            assert analysis.id is not None
            self.created.append(analysis.id)
            return analysis.id

    def stored(self, analysis_id: int) -> int:
        with session_scope(self.engine) as session:
            statement = select(func.count()).select_from(FaceObservation).where(
                col(FaceObservation.analysis_id) == analysis_id)
            return int(session.exec(statement).one())

    def keys(self, analysis_id: int) -> list[ObservationKey]:
        with session_scope(self.engine) as session:
            return [(o.stream, o.track_id, o.timestamp) for o in observations_for(session, analysis_id)]

    def remove_created(self) -> None:
        with session_scope(self.engine) as session:
            for analysis_id in self.created:
                delete_analysis_data(session, analysis_id, keep_analysis=False)
                session.execute(delete(FailedBatch).where(col(FailedBatch.analysis_id) == analysis_id))


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A SQLite file by default; ``postgres`` (indirect parametrisation) for the shared test database."""
    if getattr(request, "param", "sqlite") == "postgres":
        shared = Store(None, POSTGRES_URL, init_store(POSTGRES_URL))
        try:
            yield shared
        finally:
            shared.remove_created()
            shared.engine.dispose()
        return
    path = tmp_path / "store.sqlite3"
    url = f"sqlite:///{path}"
    yield Store(path, url, init_store(url))


@pytest.fixture
def queue(broker: redis.Redis) -> Iterator[str]:
    """A queue name used by this test only; its leftovers are removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    broker.delete(name)


def _settings(store: Store, queue: str, model_cache_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": BROKER_URL, "database_url": store.url, "model_cache_dir": model_cache_dir,
        "execution_provider": "cpu", "intra_op_threads": 1, "inference_queue": queue, "batch_size": 8,
        **overrides,
    }
    return Settings(**values)


def _relabel(batches: list[CropBatch], analysis_id: int) -> list[CropBatch]:
    return [dataclasses.replace(b, analysis_id=analysis_id) for b in batches]


def _keys(batches: list[CropBatch]) -> set[ObservationKey]:
    return {(s, int(t), float(ts)) for b in batches
            for s, t, ts in zip(b.streams, b.track_ids, b.timestamps, strict=True)}


@dataclasses.dataclass
class Worker:
    """A worker subprocess in a session of its own, so that its pool children die with it."""

    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log_text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"the worker did not start (exit {self.process.poll()}):\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        """``kill -9`` of the worker and its pool processes: a crash, nothing is acknowledged."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then kill whatever is left."""
        stop_process_group(self.process, grace_seconds=15)


def _worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSLENS_") or k.startswith("CLASSLENS_TEST_")}
    env.update({
        "CLASSLENS_BROKER_URL": str(settings.broker_url),
        "CLASSLENS_DATABASE_URL": settings.resolved_database_url,
        "CLASSLENS_MODEL_CACHE_DIR": str(settings.model_cache_dir),
        "CLASSLENS_EXECUTION_PROVIDER": settings.execution_provider,
        "CLASSLENS_INTRA_OP_THREADS": str(settings.intra_op_threads),
        "CLASSLENS_INFERENCE_QUEUE": settings.inference_queue,
        "CLASSLENS_TASK_MAX_RETRIES": str(settings.task_max_retries),
        "CLASSLENS_TEST_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _spawn(argv: list[str], settings: Settings, log: Path) -> Worker:
    with log.open("ab") as sink:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=_worker_env(settings), stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Worker(process, log)


def _celery_worker(settings: Settings, log: Path, *, concurrency: int = 1) -> Worker:
    """``celery -A workers.celery_app worker``, exactly as a deployment would run it."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "-Q", settings.inference_queue, "--concurrency", str(concurrency), "--pool", "prefork",
            "--loglevel", "INFO", "--hostname", f"{log.stem}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip", "--without-mingle"]
    return _spawn(argv, settings, log)


def _run_worker(settings: Settings, log: Path) -> Worker:
    """:func:`workers.worker_main.run_worker` (what ``classlens worker`` calls) with a short visibility timeout."""
    code = ("import os; from kernel.settings import load_settings; from workers.worker_main import run_worker; "
            "s = load_settings(); run_worker(s, [s.inference_queue], 1, 'info', "
            "visibility_timeout_seconds=int(os.environ['CLASSLENS_TEST_VISIBILITY_TIMEOUT']))")
    return _spawn([sys.executable, "-c", code], settings, log)


@contextlib.contextmanager
def _workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


_FLOAT_COLUMNS = [name for name, field in FaceObservation.model_fields.items()
                  if field.annotation in (float, float | None) and name != "timestamp"]


@pytest.mark.redis
@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_workers_store_the_same_results_as_in_process_inference(
    broker: redis.Redis, store: Store, queue: str, components: Any, demo_batches: list[CropBatch],
    default_models: Path, tmp_path: Path,
) -> None:
    settings = _settings(store, queue, default_models)
    local_id, celery_id = store.new_analysis("in-process"), store.new_analysis("celery")
    local = InProcessDispatcher(components.models, store.engine, batch_size=settings.batch_size)
    try:
        for batch in _relabel(demo_batches, local_id):
            local.submit(batch)
        local.drain()
    finally:
        local.close()

    progress: list[int] = []
    with _workers() as workers:
        # Two worker processes writing the same SQLite file at once, beside the test process.
        workers.append(_celery_worker(settings, tmp_path / "worker.log", concurrency=2))
        dispatcher = CeleryDispatcher(make_celery_app(settings), store.engine, celery_id, queue=queue,
                                      batch_size=settings.batch_size, timeout_seconds=60, on_stored=progress.append)
        for batch in _relabel(demo_batches, celery_id):
            dispatcher.submit(batch)
        dispatcher.drain()
        dispatcher.close()
        log = workers[0].log_text()

    expected = _keys(demo_batches)
    assert sum(progress) == len(expected) == dispatcher.stats.crops_stored
    assert dispatcher.stats.batches_run == -(-len(expected) // settings.batch_size)
    assert "CPUExecutionProvider" in log, log[-2000:]
    with session_scope(store.engine) as session:
        local_rows = {(o.stream, o.track_id, o.timestamp): o for o in observations_for(session, local_id)}
        celery_rows = {(o.stream, o.track_id, o.timestamp): o for o in observations_for(session, celery_id)}
    assert set(celery_rows) == set(local_rows) == expected
    for key, row in celery_rows.items():
        for column in _FLOAT_COLUMNS:
            mine, theirs = getattr(row, column), getattr(local_rows[key], column)
            assert (mine is None) == (theirs is None), (key, column)
            if mine is not None:
                assert mine == pytest.approx(theirs, abs=1e-5), (key, column)
        assert row.engagement_level == local_rows[key].engagement_level
        assert row.emotion_neutral is not None


@pytest.mark.redis
def test_poison_batches_are_recorded_and_the_worker_carries_on(
    broker: redis.Redis, store: Store, queue: str, demo_batches: list[CropBatch], default_models: Path,
    tmp_path: Path,
) -> None:
    settings = _settings(store, queue, default_models)
    app = make_celery_app(settings)
    task = app.tasks[ANALYSE_CROP_BATCH_TASK]
    poisoned_id, good_id = store.new_analysis("poisoned"), store.new_analysis("good")
    # Random bytes, then a well-formed payload whose crops lost their channel axis.
    task.apply_async(args=[random.Random(7).randbytes(600)], queue=queue)
    wrong = msgpack.unpackb(dataclasses.replace(demo_batches[0], analysis_id=poisoned_id).to_bytes(), raw=False)
    count = len(demo_batches[0])
    wrong["crops"]["shape"] = [count, 112, 336]
    task.apply_async(args=[msgpack.packb(wrong, use_bin_type=True)], queue=queue)

    with _workers() as workers:
        workers.append(_celery_worker(settings, tmp_path / "worker.log"))
        good = CeleryDispatcher(app, store.engine, good_id, queue=queue, batch_size=8, timeout_seconds=60)
        for batch in _relabel(demo_batches[1:3], good_id):
            good.submit(batch)
        good.drain()

        # A batch the store refuses (its analysis was deleted meanwhile) fails its own dispatcher.
        missing_id = good_id + 1000
        orphan = CeleryDispatcher(app, store.engine, missing_id, queue=queue, batch_size=8, timeout_seconds=60)
        orphan.submit(dataclasses.replace(demo_batches[3], analysis_id=missing_id))
        with pytest.raises(CeleryDispatchError,
                           match=r"^1 crop batch failed on the workers: analysis \d+ no longer exists"):
            orphan.drain()

    assert store.keys(good_id) == sorted(_keys(demo_batches[1:3]))
    assert store.stored(missing_id) == 0
    with session_scope(store.engine) as session:
        unreadable = failed_batches_for(session, None)
        wrong_shape = failed_batches_for(session, poisoned_id)
        refused = failed_batches_for(session, missing_id)
        assert failed_batches_for(session, good_id) == []
    assert len(unreadable) == 1 and unreadable[0].reason.startswith("ValueError: CropBatch payload")
    assert unreadable[0].crops is None
    assert len(wrong_shape) == 1 and wrong_shape[0].crops == count
    assert f"CropBatch.crops: expected shape [?, ?, ?, 3], got [{count}, 112, 336]" in wrong_shape[0].reason
    assert len(refused) == 1 and refused[0].crops == len(demo_batches[3])
    assert store.stored(poisoned_id) == 0


def _in_flight(broker: redis.Redis, queue: str) -> int:
    """Messages of ``queue`` delivered to a worker and not yet acknowledged."""
    return sum(1 for raw in broker.hvals("unacked") if json.loads(raw)[2] == queue)


@pytest.mark.redis
def test_a_killed_worker_loses_nothing_and_duplicates_nothing(
    broker: redis.Redis, store: Store, queue: str, demo_batches: list[CropBatch], default_models: Path,
    tmp_path: Path,
) -> None:
    settings = _settings(store, queue, default_models, batch_size=4)
    analysis_id = store.new_analysis("crash")
    batches = _relabel(demo_batches, analysis_id)
    first, rest = batches[:3], batches[3:]
    app = make_celery_app(settings, visibility_timeout_seconds=VISIBILITY_TIMEOUT)
    dispatcher = CeleryDispatcher(app, store.engine, analysis_id, queue=queue, batch_size=4, timeout_seconds=60)
    with _workers() as workers:
        workers.append(_run_worker(settings, tmp_path / "first.log"))
        for batch in first:
            dispatcher.submit(batch)
        dispatcher.drain()
        assert store.stored(analysis_id) == len(_keys(first))

        # Hold the database's write lock: the worker takes the next batch, runs inference and
        # then waits to store it, holding an unacknowledged message when it is killed.
        assert store.path is not None
        lock = sqlite3.connect(store.path, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            for batch in rest:
                dispatcher.submit(batch)
            dispatcher.flush()
            deadline = time.monotonic() + 30
            while _in_flight(broker, queue) == 0:
                assert time.monotonic() < deadline, workers[0].log_text()[-3000:]
                time.sleep(0.05)
            time.sleep(0.5)
            workers[0].kill()
            killed_at = time.monotonic()
        finally:
            lock.rollback()
            lock.close()
        assert _in_flight(broker, queue) == 1
        assert store.stored(analysis_id) == len(_keys(first))

        workers.append(_run_worker(settings, tmp_path / "second.log"))
        dispatcher.drain()
        recovered_after = time.monotonic() - killed_at
        print(f"all crops stored {recovered_after:.1f} s after the kill (visibility timeout {VISIBILITY_TIMEOUT} s)")

        # The producer may have sent the killed worker's batch again already; Redis still gives the
        # original back after its visibility timeout, and the second worker stores it as a duplicate.
        deadline = time.monotonic() + VISIBILITY_TIMEOUT + 30
        while _in_flight(broker, queue) or broker.llen(queue):
            assert time.monotonic() < deadline, (f"in flight {_in_flight(broker, queue)}, queued "
                                                 f"{broker.llen(queue)}:\n{workers[-1].log_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(1.0)
    keys = store.keys(analysis_id)
    assert len(keys) == len(set(keys)) == len(_keys(batches))
    assert set(keys) == _keys(batches)
    with session_scope(store.engine) as session:
        assert failed_batches_for(session, analysis_id) == []


@pytest.mark.redis
def test_dispatcher_says_when_no_worker_listens_or_the_broker_is_down(
    broker: redis.Redis, store: Store, queue: str, demo_batches: list[CropBatch], default_models: Path,
) -> None:
    settings = _settings(store, queue, default_models)
    analysis_id = store.new_analysis("nobody listens")
    dispatcher = CeleryDispatcher(make_celery_app(settings), store.engine, analysis_id, queue=queue,
                                  batch_size=8, timeout_seconds=2)
    dispatcher.submit(dataclasses.replace(demo_batches[0], analysis_id=analysis_id))
    with pytest.raises(CeleryDispatchError, match=rf"no progress from the workers for 2 s: are workers running on "
                                                 rf"queue '{queue}'\? is the broker reachable\?"):
        dispatcher.drain()
    assert broker.llen(queue) == 1  # the batch waits in Redis for a worker

    down = _settings(store, queue, default_models, broker_url="redis://127.0.0.1:1/0")
    unreachable = CeleryDispatcher(make_celery_app(down), store.engine, analysis_id, queue=queue,
                                   batch_size=8, timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(CeleryDispatchError, match=r"cannot send crops to the broker redis://127.0.0.1:1/0: .*"
                                                 r"is Redis running and reachable\?"):
        unreachable.submit(dataclasses.replace(demo_batches[0], analysis_id=analysis_id))
        unreachable.flush()
    print(f"publishing to a dead broker gave up after {time.monotonic() - started:.1f} s")


@pytest.mark.redis
def test_transient_store_errors_are_retried_then_handed_back_never_dropped(
    broker: redis.Redis, store: Store, queue: str, demo_batches: list[CropBatch], default_models: Path,
    tmp_path: Path,
) -> None:
    settings = _settings(store, queue, default_models, task_max_retries=3)
    app = make_celery_app(settings)
    gone_id, back_id = store.new_analysis("table gone"), store.new_analysis("table back")
    observations = FaceObservation.__table__  # type: ignore[attr-defined]
    with _workers() as workers:
        workers.append(_celery_worker(settings, tmp_path / "worker.log"))
        workers[0].wait_ready()  # it opened the store (creating missing tables) before saying so
        # A missing table is an OperationalError like a dropped connection or a locked database.
        observations.drop(store.engine)
        # The only worker cannot store: it retries, hands the batch back to the queue, and says why in
        # its report; the producer fails as soon as no worker has been able to work for a while.
        gone = CeleryDispatcher(app, store.engine, gone_id, queue=queue, batch_size=8, timeout_seconds=60,
                                workers_unavailable_seconds=5)
        gone.submit(dataclasses.replace(demo_batches[0], analysis_id=gone_id))
        started = time.monotonic()
        with pytest.raises(CeleryDispatchError, match=r"could not work for 5 s: cannot reach the database: "
                                                     r"OperationalError: .*no such table: faceobservation"):
            gone.drain()
        print(f"the producer failed {time.monotonic() - started:.1f} s after sending")
        with session_scope(store.engine) as session:  # what its producer does next (the rows' table is gone)
            failed = session.get(Analysis, gone_id)
            assert failed is not None
            failed.status = AnalysisStatus.failed
        deadline = time.monotonic() + 30
        while "handing it back to the queue" not in workers[0].log_text():
            assert time.monotonic() < deadline, workers[0].log_text()[-3000:]
            time.sleep(0.1)

        back = CeleryDispatcher(app, store.engine, back_id, queue=queue, batch_size=8, timeout_seconds=60)
        back.submit(dataclasses.replace(demo_batches[1], analysis_id=back_id))
        back.flush()
        deadline = time.monotonic() + 30
        while f"crop batch of analysis {back_id}: OperationalError" not in workers[0].log_text():
            assert time.monotonic() < deadline, workers[0].log_text()[-3000:]
            time.sleep(0.02)
        # The store comes back while the batch waits for its retry (1 s, then 2 s, then 4 s).
        observations.create(store.engine)
        back.drain()
        log = workers[0].log_text()

    assert store.keys(back_id) == sorted(_keys(demo_batches[1:2]))
    assert f"crop batch of analysis {gone_id}: OperationalError" in log
    assert "retry 3 of 3" in log and "retry 1 of 3" in log
    assert store.stored(gone_id) == 0  # handed back, then discarded: its analysis had failed
    with session_scope(store.engine) as session:
        assert failed_batches_for(session, back_id) == []
        assert failed_batches_for(session, gone_id) == []  # a store outage is not the batch's fault


def test_the_app_acks_late_and_redelivers_after_the_time_limit(tmp_path: Path) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:6379/0", database_url=f"sqlite:///{tmp_path}/s.db",
                        inference_queue="gpu", task_time_limit_seconds=120)
    conf = make_celery_app(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["msgpack"] and conf.task_serializer == "msgpack"
    assert conf.task_soft_time_limit < conf.task_time_limit == 120
    # A healthy task (time limit plus the longest retry countdown) is never redelivered.
    assert conf.broker_transport_options["visibility_timeout"] > 120 + 60
    assert conf.task_routes[ANALYSE_CROP_BATCH_TASK] == {"queue": "gpu"}
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"}


@pytest.mark.parametrize(("broker_url", "message"), [
    (None, "broker_url: not set; set CLASSLENS_BROKER_URL"),
    ("amqp://guest@localhost//", "broker_url: expected a Redis URL"),
])
def test_a_missing_or_foreign_broker_is_a_configuration_error(broker_url: str | None, message: str) -> None:
    from kernel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=re.escape(message)):
        make_celery_app(Settings(broker_url=broker_url))


def test_worker_arguments_are_checked() -> None:
    from kernel.errors import ConfigurationError
    from workers.worker_main import worker_argv

    argv = worker_argv(["cpu", "gpu"], 2, "info")
    assert argv[argv.index("--queues") + 1] == "cpu,gpu" and argv[argv.index("--pool") + 1] == "prefork"
    assert str(os.getpid()) in argv[argv.index("--hostname") + 1]
    for queues, concurrency, level, bad in [([], 1, "info", "queues"), (["cpu"], 0, "info", "concurrency"),
                                            (["cpu"], 1, "loud", "loglevel")]:
        with pytest.raises(ConfigurationError, match=f"^{bad}: "):
            worker_argv(queues, concurrency, level)


@pytest.mark.redis
def test_analyze_with_a_broker_matches_the_local_mode(
    broker: redis.Redis, queue: str, tmp_path: Path, default_models: Path
) -> None:
    """`classlens worker` + `classlens analyze --broker` give the same students and numbers as the local mode."""
    from tests import media_factory

    video = media_factory.group_photo_video(tmp_path / "class.mp4", seconds=4, fps=5)
    local_db = f"sqlite:///{tmp_path / 'local.sqlite3'}"
    remote_db = f"sqlite:///{tmp_path / 'remote.sqlite3'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSLENS_") or k.startswith("CLASSLENS_TEST_")}
    env.update({"CLASSLENS_MODEL_CACHE_DIR": str(default_models), "CLASSLENS_DATA_DIR": str(tmp_path / "data"),
                "CLASSLENS_INFERENCE_QUEUE": queue, "CLASSLENS_EXECUTION_PROVIDER": "cpu",
                "CLASSLENS_DISPATCH_TIMEOUT_SECONDS": "700", "PYTHONUNBUFFERED": "1"})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "classlens", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)

    local = cli("analyze", str(video), "--db", local_db, "--out", str(tmp_path / "local"), "--quiet")
    assert local.returncode == 0, local.stderr
    log = tmp_path / "worker.log"
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "classlens", "worker", "--queues", queue,
                                    "--broker", BROKER_URL, "--db", remote_db], cwd=tmp_path, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker(process, log)
    try:
        worker.wait_ready()
        remote = cli("analyze", str(video), "--db", remote_db, "--broker", BROKER_URL,
                     "--out", str(tmp_path / "remote"), "--quiet")
        assert remote.returncode == 0, remote.stderr + worker.log_text()[-2000:]
    finally:
        worker.stop()
    assert "6 students" in local.stderr and "6 students" in remote.stderr

    def rows(url: str) -> dict[tuple[int, float], tuple[float, ...]]:
        engine = init_store(url)
        with Session(engine) as session:
            found = session.exec(select(FaceObservation)).all()
        return {(o.track_id, o.timestamp): (o.engagement_score, o.emotion_happy or 0.0, o.head_yaw) for o in found}

    local_rows, remote_rows = rows(local_db), rows(remote_db)
    assert local_rows.keys() == remote_rows.keys() and len(local_rows) == 6 * 4
    for key, values in local_rows.items():
        assert remote_rows[key] == pytest.approx(values, abs=1e-5)
    assert (tmp_path / "remote" / "index.html").is_file()


@pytest.mark.redis
def test_a_partial_batch_goes_out_at_its_deadline(
    broker: redis.Redis, store: Store, queue: str, demo_batches: list[CropBatch], default_models: Path,
) -> None:
    """Live feeds: crops are sent when the batch is full or its deadline passed, whichever comes first."""
    settings = _settings(store, queue, default_models)
    analysis_id = store.new_analysis("deadline")
    small = [dataclasses.replace(b, analysis_id=analysis_id) for b in demo_batches[:3]]
    assert all(len(b) < 64 for b in small)
    waiting = CeleryDispatcher(make_celery_app(settings), store.engine, analysis_id, queue=queue,
                               batch_size=64, timeout_seconds=5, max_batch_delay_seconds=0.2)
    waiting.submit(small[0])
    assert broker.llen(queue) == 0  # not full, deadline not reached: held back
    time.sleep(0.3)
    waiting.submit(small[1])
    assert broker.llen(queue) == 1  # deadline passed: both batches went out as one message
    patient = CeleryDispatcher(make_celery_app(settings), store.engine, analysis_id, queue=queue,
                               batch_size=64, timeout_seconds=5)
    patient.submit(small[2])
    time.sleep(0.3)
    assert broker.llen(queue) == 1  # without a deadline, a partial batch waits for the flush


@pytest.mark.redis
def test_a_producer_without_emotion_gets_no_emotion_from_workers_that_have_it(
    broker: redis.Redis, store: Store, queue: str, demo_batches: list[CropBatch], default_models: Path,
    tmp_path: Path,
) -> None:
    """--no-emotion on the producer switches emotion off on the workers for that analysis only."""
    settings = _settings(store, queue, default_models)  # the worker runs with emotion inference on
    without, with_emotion = store.new_analysis("no emotion"), store.new_analysis("emotion")
    with _workers() as workers:
        workers.append(_celery_worker(settings, tmp_path / "worker.log"))
        for analysis_id, emotion in ((without, False), (with_emotion, True)):
            dispatcher = CeleryDispatcher(make_celery_app(settings), store.engine, analysis_id, queue=queue,
                                          batch_size=settings.batch_size, timeout_seconds=60,
                                          emotion_inference=emotion)
            for batch in _relabel(demo_batches[:2], analysis_id):
                dispatcher.submit(batch)
            dispatcher.drain()
            dispatcher.close()
    with session_scope(store.engine) as session:
        off = observations_for(session, without)
        on = observations_for(session, with_emotion)
    assert off and all(o.emotion_happy is None and o.emotion_neutral is None for o in off)
    assert on and all(o.emotion_neutral is not None for o in on)
    # Engagement is still computed without emotion, from the attention cues alone.
    assert all(0 <= o.engagement_level <= 3 for o in off)
