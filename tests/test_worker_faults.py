"""Faults on the worker path, with real processes: every one ends in seconds, as a success or a named failure.

Each test starts its own ``redis-server`` (``tests/test_broker_outage.py``'s ``PrivateRedis``),
real ``celery worker`` subprocesses and a SQLite store, and drives the real producers
(:class:`~workers.celery_dispatch.CeleryDispatcher`, :class:`~workers.segment_dispatch.SegmentDispatcher`,
``classlens analyze``). Redis' visibility timeout is left long (10 minutes), as in a
deployment: recovery that finishes well within the bounds below cannot come from it.

The bounds are generous for a loaded 2-core machine; each test prints what it measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlmodel import Session, select

from kernel.store import Analysis, AnalysisStatus, FaceObservation, init_store
from kernel.types import CropBatch
from tests.conftest import MEDIA_DIR, REPO_ROOT
from tests.test_broker_outage import PrivateRedis, _copies, _free_port, _within, private_redis, store  # noqa: F401
from tests.test_celery import (  # noqa: F401  (demo_batches is a fixture)
    Store,
    Worker,
    _celery_worker,
    _keys,
    _settings,
    _workers,
    demo_batches,
)
from workers.celery_app import make_celery_app
from workers.celery_dispatch import CeleryDispatcher, CeleryDispatchError
from workers.segment_dispatch import SegmentDispatcher
from workers.segments import plan_segments, segment_overrides

#: Redis' visibility timeout in these tests: far beyond every bound, so it never does the recovering.
VISIBILITY_TIMEOUT = 600
#: How long a producer waits with no worker able to work before it fails (the setting, shortened).
UNAVAILABLE_SECONDS = 8.0
BATCH_SIZE = 8

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]


def _fault_settings(target: Store, redis: PrivateRedis, models: Path, queue: str, **overrides: object) -> object:
    return _settings(target, queue, models, broker_url=redis.url, batch_size=BATCH_SIZE,
                     broker_visibility_timeout_seconds=VISIBILITY_TIMEOUT,
                     dispatch_timeout_seconds=VISIBILITY_TIMEOUT + 60,
                     workers_unavailable_seconds=UNAVAILABLE_SECONDS, **overrides)


def _crop_producer(settings: object, target: Store, analysis_id: int) -> CeleryDispatcher:
    from kernel.settings import Settings

    assert isinstance(settings, Settings)
    return CeleryDispatcher(make_celery_app(settings), target.engine, analysis_id, queue=settings.inference_queue,
                            batch_size=BATCH_SIZE, timeout_seconds=settings.dispatch_timeout_seconds,
                            poll_interval_seconds=0.2, workers_unavailable_seconds=UNAVAILABLE_SECONDS)


def _send(producer: CeleryDispatcher, batches: list[CropBatch]) -> None:
    for batch in batches:
        producer.submit(batch)
    producer.flush()


def _exactly_once(target: Store, analysis_id: int, batches: list[CropBatch]) -> None:
    keys = target.keys(analysis_id)
    assert len(keys) == len(set(keys)), "a crop was stored twice"
    assert set(keys) == _keys(batches), f"{len(keys)} of {len(_keys(batches))} crops stored"


def _wait_until(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def test_a_worker_whose_main_process_is_killed_loses_nothing_and_costs_seconds(
    private_redis: PrivateRedis, store: Store, demo_batches: list[CropBatch], default_models: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _fault_settings(store, private_redis, default_models, f"kill-{uuid.uuid4().hex[:6]}")
    analysis = store.new_analysis("a worker dies")
    batches = _copies(demo_batches, analysis, 3)
    with _workers() as workers:
        doomed, survivor = (_celery_worker(settings, tmp_path / f"{name}.log") for name in ("doomed", "survivor"))
        workers += [doomed, survivor]
        doomed.wait_ready()
        survivor.wait_ready()
        producer = _crop_producer(settings, store, analysis)
        _within(60, "sending", lambda: _send(producer, batches))
        _wait_until(lambda: store.stored(analysis) > 0, 60, "the first results")
        doomed.process.send_signal(signal.SIGKILL)  # the main process only: its pool child is orphaned
        killed = time.monotonic()
        _within(120, "the analysis after the kill", producer.drain)
        took = time.monotonic() - killed
    print(f"completed {took:.1f} s after the worker's main process was killed")
    _exactly_once(store, analysis, batches)
    assert took < 60, f"took {took:.0f} s: recovery waited for something like the visibility timeout"


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "in-memory"])
def test_a_redis_restart_mid_analysis_completes_in_seconds_on_the_crop_path(
    persistent: bool, store: Store, demo_batches: list[CropBatch], default_models: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    redis = PrivateRedis(_free_port(), tmp_path / "redis.log", persist_dir=tmp_path / "aof" if persistent else None)
    redis.start()
    try:
        settings = _fault_settings(store, redis, default_models, f"restart-{uuid.uuid4().hex[:6]}")
        analysis = store.new_analysis("Redis restarts")
        batches = _copies(demo_batches, analysis, 4)
        with _workers() as workers:
            worker = _celery_worker(settings, tmp_path / "worker.log")
            workers.append(worker)
            worker.wait_ready()
            producer = _crop_producer(settings, store, analysis)
            _within(60, "sending", lambda: _send(producer, batches))
            _wait_until(lambda: store.stored(analysis) > 0, 60, "the first results")
            redis.stop()
            time.sleep(2.0)
            redis.start()
            restarted = time.monotonic()
            _within(120, "the analysis after the restart", producer.drain)
            took = time.monotonic() - restarted
    finally:
        redis.stop()
    print(f"completed {took:.1f} s after Redis restarted ({'appendonly' if persistent else 'in memory'})")
    _exactly_once(store, analysis, batches)
    assert took < 60, f"took {took:.0f} s"


def test_a_redis_restart_mid_analysis_completes_in_seconds_on_the_segment_path(
    private_redis: PrivateRedis, store: Store, default_models: Path, tmp_path: Path,  # noqa: F811
) -> None:
    from kernel.settings import Settings

    settings = _fault_settings(store, private_redis, default_models, f"segments-{uuid.uuid4().hex[:6]}",
                               segment_seconds=5.0)
    assert isinstance(settings, Settings)
    video = MEDIA_DIR / "WolfgangLanger_Pexels.mp4"
    from vision.sources import RecordedFileSource

    info = RecordedFileSource(video, settings.sample_fps).probe()
    segments = plan_segments(info.duration_seconds, settings.sample_fps, settings.segment_seconds)
    assert len(segments) >= 3
    analysis = store.new_analysis("segments through a Redis restart")
    with _workers() as workers:
        worker = _celery_worker(settings, tmp_path / "worker.log")
        workers.append(worker)
        worker.wait_ready()
        dispatcher = SegmentDispatcher(make_celery_app(settings), store.engine, analysis, video.resolve(), segments,
                                       queue=settings.inference_queue, overrides=segment_overrides(settings),
                                       timeout_seconds=settings.dispatch_timeout_seconds, poll_interval_seconds=0.2,
                                       workers_unavailable_seconds=UNAVAILABLE_SECONDS)
        dispatcher.send()
        private_redis.stop()  # every queued segment dies with it
        time.sleep(2.0)
        private_redis.start()
        restarted = time.monotonic()
        progress = _within(150, "the segments after the restart", dispatcher.wait)
        took = time.monotonic() - restarted
    print(f"all {len(segments)} segments done {took:.1f} s after Redis restarted")
    assert progress.done == len(segments)
    assert took < 90, f"took {took:.0f} s"


def test_workers_without_their_database_fail_the_producer_fast_with_the_reason(
    private_redis: PrivateRedis, store: Store, demo_batches: list[CropBatch], default_models: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _fault_settings(store, private_redis, default_models, f"nodb-{uuid.uuid4().hex[:6]}")
    unreachable = settings.model_copy(update={"database_url": f"postgresql://classlens@127.0.0.1:{_free_port()}/none"})
    analysis = store.new_analysis("no database on the worker")
    with _workers() as workers:
        worker = _celery_worker(unreachable, tmp_path / "worker.log")
        workers.append(worker)
        _wait_until(lambda: "cannot open its store" in worker.log_text(), 60, "the worker to report its problem")
        assert " ready." not in worker.log_text(), "the worker said ready without a store"
        producer = _crop_producer(settings, store, analysis)
        started = time.monotonic()
        with pytest.raises(CeleryDispatchError, match=r"could not work for .*cannot open its store"):
            _within(90, "the producer", lambda: (_send(producer, _copies(demo_batches, analysis, 1)),
                                                 producer.drain()))
        took = time.monotonic() - started
    print(f"the producer failed {took:.1f} s after it started sending")
    assert took < UNAVAILABLE_SECONDS + 30


def test_a_worker_on_another_store_hands_work_back_and_writes_nothing_there(
    private_redis: PrivateRedis, store: Store, demo_batches: list[CropBatch], default_models: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = _fault_settings(store, private_redis, default_models, f"stores-{uuid.uuid4().hex[:6]}")
    other_url = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    other = init_store(other_url)
    wrong = settings.model_copy(update={"database_url": other_url})
    analysis = store.new_analysis("two stores")
    batches = _copies(demo_batches, analysis, 1)
    with _workers() as workers:
        misplaced = _celery_worker(wrong, tmp_path / "misplaced.log")
        workers.append(misplaced)
        misplaced.wait_ready()
        # Alone, the misplaced worker makes the producer fail, saying why.
        producer = _crop_producer(settings, store, analysis)
        with pytest.raises(CeleryDispatchError, match=r"connected to another store"):
            _within(90, "the producer with only the misplaced worker",
                    lambda: (_send(producer, batches), producer.drain()))
        # Beside a healthy worker, everything lands in the producer's store.
        healthy = _celery_worker(settings, tmp_path / "healthy.log")
        workers.append(healthy)
        healthy.wait_ready()
        second = store.new_analysis("two stores, one healthy worker")
        more = _copies(demo_batches, second, 1)
        producer = _crop_producer(settings, store, second)
        _within(120, "the producer beside a healthy worker", lambda: (_send(producer, more), producer.drain()))
    _exactly_once(store, second, more)
    with Session(other) as session:
        assert not list(session.exec(select(FaceObservation))), "results were written to the other store"


def test_an_analysis_whose_producer_was_killed_is_failed_and_a_rerun_is_clean(
    isolated_env: Path, default_models: Path, tmp_path: Path,
) -> None:
    video = MEDIA_DIR / "WolfgangLanger_Pexels.mp4"
    database = tmp_path / "store.sqlite3"
    env = {**os.environ, "CLASSLENS_DATABASE_URL": f"sqlite:///{database}",
           "CLASSLENS_MODEL_CACHE_DIR": str(default_models), "CLASSLENS_EXECUTION_PROVIDER": "cpu",
           "CLASSLENS_PRODUCER_HEARTBEAT_SECONDS": "1", "CLASSLENS_ABANDONED_AFTER_SECONDS": "4",
           "CLASSLENS_SAMPLE_FPS": "4", "CLASSLENS_BATCH_SIZE": "4"}
    env.pop("CLASSLENS_BROKER_URL", None)
    argv = [sys.executable, "-m", "classlens", "analyze", str(video), "--out", str(tmp_path / "reports")]
    producer = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine = init_store(f"sqlite:///{database}")

    def observations() -> int:
        with Session(engine) as session:
            return len(list(session.exec(select(FaceObservation.id))))

    _wait_until(lambda: producer.poll() is None and observations() > 0, 120, "the producer's first results")
    producer.kill()  # kill -9: nothing finalises the analysis
    producer.wait(timeout=10)
    with Session(engine) as session:
        (first,) = session.exec(select(Analysis)).all()
    assert first.status is AnalysisStatus.running
    time.sleep(5)  # longer than CLASSLENS_ABANDONED_AFTER_SECONDS
    rerun = subprocess.run([*argv[:-1], str(tmp_path / "reports-2")], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    with Session(engine) as session:
        analyses = {a.id: a for a in session.exec(select(Analysis))}
        rows = list(session.exec(select(FaceObservation.analysis_id)))
    abandoned = analyses[first.id]
    assert abandoned.status is AnalysisStatus.failed
    assert abandoned.failure_reason is not None and "producer stopped" in abandoned.failure_reason
    assert first.id not in set(rows), "the abandoned analysis kept its partial rows"
    (second,) = [a for a in analyses.values() if a.id != first.id]
    assert second.status is AnalysisStatus.done and set(rows) == {second.id}
