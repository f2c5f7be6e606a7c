"""Benchmark: Celery inference workers (real worker processes, a real Redis) against in-process inference.

Measured, with the models of the configured execution provider:

* in-process: ``analyse_crops`` alone, and ``analyse_crops`` + ``store_face_results`` (what
  ``InProcessDispatcher`` runs per batch), in crops per second, for every batch size and
  crop size of the grid: the baseline the workers are compared with;
* workers: ``classlens worker --concurrency N`` as a subprocess (N prefork processes; the
  command shares the cores among them), a fresh store per worker start, and the real
  :class:`~workers.celery_dispatch.CeleryDispatcher` publishing the crops: crops per second
  from the first publish to the moment the producer sees the last row stored;
* broker overhead per message: one 1-crop batch at a time, end to end (publish, Redis,
  worker, store, the producer seeing the row), against ``analyse_crops`` +
  ``store_face_results`` of one crop in-process;
* the wire format: the CPU time of packing and unpacking one message as Celery and kombu's
  Redis transport do it (msgpack, base64, JSON, the ``unacked`` copy), replayed in-process;
* end to end: ``analyze_recording`` (what ``classlens analyze`` runs) on the 3×3 gallery
  video of ``benchmarks/analyze.py``, in the local mode and with ``--broker`` (a
  ``classlens worker`` consuming), at 1 fps.

The crops are real: the aligned 112×112 crops of every face the capture pipeline finds in
the demo classroom video, reused round-robin with distinct (track, time) keys. The
pipeline sends 112² crops; the 64² and 224² rows resize them, and the emotion runner
resizes every crop to its model's input (64² grey) anyway, so the crop size changes the
bytes that travel and the resize work, not the model's work.

By default a private ``redis-server`` (no persistence) is started on a free port and
stopped at the end; ``--broker`` uses a running one instead.

Usage::

    python benchmarks/workers.py [--quick] [--workers 1 2 4] [--batch-sizes 1 8 32 128 256]
        [--crop-sizes 64 112 224] [--repeat 1] [--db URL] [--broker URL] [--provider cpu|cuda] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import logging
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.analyze import (  # noqa: E402
    DEFAULT_MEDIA_DIR,
    AnalysisRun,
    analyze_once,
    build_gallery_video,
    host_description,
    median_timing,
)
from kernel.settings import Settings, load_settings  # noqa: E402
from kernel.store import Analysis, delete_analysis_data, init_store, session_scope  # noqa: E402
from kernel.types import CropBatch  # noqa: E402
from pipeline.capture import CapturePipeline  # noqa: E402
from pipeline.models import (  # noqa: E402
    PipelineComponents,
    load_inference_models,
)
from tests.processes import stop_process_group  # noqa: E402  (shared with the Celery tests)
from vision.sources import RecordedFileSource  # noqa: E402
from vision.synthetic import demo_classroom_video  # noqa: E402
from workers.celery_app import make_celery_app  # noqa: E402
from workers.celery_dispatch import CeleryDispatcher  # noqa: E402
from workers.inference import InferenceModels, analyse_crops  # noqa: E402
from workers.persistence import store_face_results  # noqa: E402

DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- benchmarks/workers.py: begin -->"
SECTION_END = "<!-- benchmarks/workers.py: end -->"

#: Distinct track ids per timestamp in the synthetic keys (any number works; keys only need to be unique).
TRACKS_PER_TIMESTAMP = 64
#: Round trips of a 1-crop batch measured for the broker overhead.
DEFAULT_ROUND_TRIPS = 40

log = logging.getLogger("benchmarks.workers")


# --------------------------------------------------------------------------- crops


def real_face_crops(components: PipelineComponents) -> CropBatch:
    """The aligned 112² crops of every tracked face of the demo classroom video, as the pipeline makes them."""
    pipeline = CapturePipeline(components.detector, components.embedder, analysis_id=0, max_gap_seconds=30.0)
    batches = []
    for frame in RecordedFileSource(demo_classroom_video(), 1.0):
        batch = pipeline.capture(frame).batch
        if batch is not None:
            batches.append(batch)
    if not batches:
        raise SystemExit("the demo classroom video gave no face crops: is the detector model in the cache?")
    return CropBatch.concatenate(batches)


def resized(crops: np.ndarray, size: int) -> np.ndarray:
    """The crops at ``size``² (area averaging down, bilinear up)."""
    if crops.shape[1] == size:
        return crops
    interpolation = cv2.INTER_AREA if size < crops.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(crop, (size, size), interpolation=interpolation) for crop in crops])


@dataclass
class CropSource:
    """Real crops at every size of the grid, handed out as batches with distinct keys."""

    faces: CropBatch
    pixels: dict[int, np.ndarray] = field(default_factory=dict)

    def batches(self, analysis_id: int, size: int, batch_size: int, count: int, *, first: int = 0) -> list[CropBatch]:
        """``count`` crops of ``size``² in batches of ``batch_size``; keys ``first`` … ``first + count - 1``."""
        if size not in self.pixels:
            self.pixels[size] = resized(self.faces.crops, size)
        numbers = np.arange(first, first + count)
        index = numbers % len(self.faces)
        everything = CropBatch(
            analysis_id=analysis_id,
            streams=("main",) * count,
            track_ids=(numbers % TRACKS_PER_TIMESTAMP).astype(np.int64),
            timestamps=(numbers // TRACKS_PER_TIMESTAMP).astype(np.float64),
            crops=self.pixels[size][index],
            boxes=self.faces.boxes[index],
            detection_scores=self.faces.detection_scores[index],
            head_pose=self.faces.head_pose[index],
        )
        return [_slice(everything, start, min(count, start + batch_size)) for start in range(0, count, batch_size)]


def _slice(batch: CropBatch, start: int, stop: int) -> CropBatch:
    return CropBatch(analysis_id=batch.analysis_id, streams=batch.streams[start:stop],
                     track_ids=batch.track_ids[start:stop], timestamps=batch.timestamps[start:stop],
                     crops=batch.crops[start:stop], boxes=batch.boxes[start:stop],
                     detection_scores=batch.detection_scores[start:stop], head_pose=batch.head_pose[start:stop])


def crops_per_run(batch_size: int, min_crops: int, max_messages: int) -> int:
    """Crops sent per measurement: at least ``min_crops`` and 8 batches, at most ``max_messages`` batches."""
    return min(max(min_crops, 8 * batch_size), max_messages * batch_size)


# --------------------------------------------------------------------------- store and broker


@dataclass
class BenchStore:
    """A store for one part of the benchmark: a fresh SQLite file, or the ``--db`` database (rows removed after)."""

    url: str
    engine: Any
    created: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, db: str | None, folder: Path, name: str) -> BenchStore:
        url = db or f"sqlite:///{folder / f'{name}.sqlite3'}"
        return cls(url, init_store(url))

    def new_analysis(self, title: str) -> int:
        with session_scope(self.engine) as session:
            analysis = Analysis(source=title, title=title)
            session.add(analysis)
            session.flush()
            assert analysis.id is not None
            self.created.append(analysis.id)
            return analysis.id

    def close(self, *, remove_rows: bool) -> None:
        if remove_rows:
            with session_scope(self.engine) as session:
                for analysis_id in self.created:
                    delete_analysis_data(session, analysis_id, keep_analysis=False)
        self.engine.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A ``redis-server`` of this run alone on a free port, keeping nothing on disk; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt install redis-server), or pass --broker redis://host:port/db")
    port = _free_port()
    logfile = folder / "redis.log"
    with logfile.open("ab") as sink:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--daemonize", "no"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"redis-server did not start: {logfile.read_text(errors='replace')[-1000:]}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def redis_server_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        version = client.info("server").get("redis_version", "?")
        aof = client.config_get("appendonly").get("appendonly") == "yes"
        snapshots = bool(client.config_get("save").get("save"))
        kept = "AOF" if aof else "RDB snapshots only" if snapshots else "nothing: a restart loses every queued message"
        return f"{version}, persistence: {kept}"
    except redis.exceptions.RedisError as exc:
        return f"unknown ({exc})"
    finally:
        client.close()


#: Celery's log line for every task a worker takes.
TASK_RECEIVED = re.compile(r"Task ([\w.]+)\[[0-9a-f-]+\] received")
#: The log line of :class:`workers.tasks.WorkerResources` when a worker process has loaded its models.
LOADED = re.compile(r"worker process (\d+) loaded its models: emotion on (\[.*?\]|off), engagement on (\[.*?\])")


@dataclass
class WorkerProcesses:
    """``classlens worker --concurrency N`` in a session of its own (its pool processes die with it)."""

    process: subprocess.Popen[bytes]
    logfile: Path
    concurrency: int

    @classmethod
    def start(cls, settings: Settings, concurrency: int, workdir: Path) -> WorkerProcesses:
        logfile = workdir / f"worker-{concurrency}-{uuid.uuid4().hex[:6]}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSLENS_")}
        env.update({
            "CLASSLENS_MODEL_CACHE_DIR": str(settings.model_cache_dir),
            "CLASSLENS_EXECUTION_PROVIDER": settings.execution_provider,
            "CLASSLENS_INFERENCE_QUEUE": settings.inference_queue,
            "CLASSLENS_DATA_DIR": str(workdir / "worker-data"),
            "PYTHONUNBUFFERED": "1",
        })
        if settings.local_models_dir is not None:
            env["CLASSLENS_LOCAL_MODELS_DIR"] = str(settings.local_models_dir)
        argv = [sys.executable, "-m", "classlens", "worker", "--queues", settings.inference_queue,
                "--concurrency", str(concurrency), "--loglevel", "info",
                "--broker", str(settings.broker_url), "--db", settings.resolved_database_url]
        with logfile.open("ab") as sink:
            process = subprocess.Popen(argv, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        worker = cls(process, logfile, concurrency)
        worker.wait_for(lambda text: " ready." in text, "start", timeout=90)
        return worker

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_for(self, condition: Callable[[str], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.log_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the worker did not {what} (exit {self.process.poll()}):\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def loaded(self) -> dict[int, tuple[str, str]]:
        """Worker process id → (emotion providers, engagement providers), for every process that loaded its models."""
        return {int(m[1]): (m[2], m[3]) for m in LOADED.finditer(self.log_text())}

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the session), then kill what is left."""
        stop_process_group(self.process, grace_seconds=20)


def send_and_wait(app: Any, store: BenchStore, analysis_id: int, batches: list[CropBatch], queue: str,
                  batch_size: int, *, poll: float = 0.01) -> float:
    """Publish every batch through a :class:`CeleryDispatcher` and wait until all are stored; wall seconds."""
    dispatcher = CeleryDispatcher(app, store.engine, analysis_id, queue=queue, batch_size=batch_size,
                                  timeout_seconds=120, poll_interval_seconds=poll)
    try:
        started = time.perf_counter()
        for batch in batches:
            dispatcher.submit(batch)
        dispatcher.drain()
        wall = time.perf_counter() - started
    finally:
        dispatcher.close()
    expected = sum(len(b) for b in batches)
    if dispatcher.stats.crops_stored != expected:
        raise SystemExit(f"workers stored {dispatcher.stats.crops_stored} of {expected} crops")
    return wall


def warm_up(worker: WorkerProcesses, app: Any, store: BenchStore, source: CropSource, queue: str) -> None:
    """Send 1-crop batches until every process of the worker has loaded its models (not measured)."""
    analysis_id = store.new_analysis("warm-up")
    first = 0
    deadline = time.monotonic() + 120
    while len(worker.loaded()) < worker.concurrency:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(worker.loaded())} of {worker.concurrency} worker processes loaded "
                             f"their models:\n{worker.log_text()[-3000:]}")
        count = 4 * worker.concurrency
        send_and_wait(app, store, analysis_id, source.batches(analysis_id, 112, 1, count, first=first), queue, 1)
        first += count


# --------------------------------------------------------------------------- measurements


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Grid:
    """What was measured over the grid: crops per second, per (crop size, batch size[, workers]), every repeat."""

    inference: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    inference_store: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    workers: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)
    crops: dict[int, int] = field(default_factory=dict)  # batch size → crops per run
    model_input: int = 0  # side of the emotion model's input (every crop is resized to it)
    payload_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # (size, batch) → message body


def measure_in_process(models: InferenceModels, store: BenchStore, source: CropSource, grid: Grid,
                       args: argparse.Namespace) -> None:
    """``analyse_crops`` alone and with ``store_face_results``, crops per second, over the grid."""
    for size in args.crop_sizes:
        for batch_size in args.batch_sizes:
            count = grid.crops[batch_size]
            batches = source.batches(0, size, batch_size, count)
            grid.payload_bytes[(size, batch_size)] = len(batches[0].to_bytes())
            analyse_crops(batches[0], models)  # warm this shape
            for _ in range(args.inproc_repeat):
                started = time.perf_counter()
                for batch in batches:
                    analyse_crops(batch, models)
                grid.inference.setdefault((size, batch_size), []).append(count / (time.perf_counter() - started))
                analysis_id = store.new_analysis(f"in-process {size} {batch_size}")
                relabelled = [replace(batch, analysis_id=analysis_id) for batch in batches]
                started = time.perf_counter()
                for batch in relabelled:
                    store_face_results(store.engine, batch, analyse_crops(batch, models))
                grid.inference_store.setdefault((size, batch_size), []).append(
                    count / (time.perf_counter() - started))
            print(f"in-process {size}² batch {batch_size}: {_median(grid.inference[(size, batch_size)]):.0f} crops/s "
                  f"inference, {_median(grid.inference_store[(size, batch_size)]):.0f} with the store", file=sys.stderr)


@dataclass
class Overhead:
    """One 1-crop batch at a time: in-process time vs the end-to-end round trip through the broker."""

    in_process: list[float] = field(default_factory=list)
    publish: list[float] = field(default_factory=list)
    round_trip: list[float] = field(default_factory=list)
    payload_bytes: int = 0


def measure_in_process_single(models: InferenceModels, store: BenchStore, source: CropSource, overhead: Overhead,
                              round_trips: int) -> None:
    analysis_id = store.new_analysis("in-process single crops")
    for number, batch in enumerate(source.batches(analysis_id, 112, 1, round_trips + 3)):
        started = time.perf_counter()
        store_face_results(store.engine, batch, analyse_crops(batch, models))
        if number >= 3:  # the first ones warm up
            overhead.in_process.append(time.perf_counter() - started)


def measure_round_trips(app: Any, store: BenchStore, source: CropSource, queue: str, overhead: Overhead,
                        round_trips: int) -> None:
    """Publish one 1-crop batch, wait until the producer sees it stored, repeat."""
    analysis_id = store.new_analysis("round trips")
    dispatcher = CeleryDispatcher(app, store.engine, analysis_id, queue=queue, batch_size=1, timeout_seconds=120,
                                  poll_interval_seconds=0.001)
    batches = source.batches(analysis_id, 112, 1, round_trips + 3)
    overhead.payload_bytes = len(batches[0].to_bytes())
    try:
        for number, batch in enumerate(batches):
            started = time.perf_counter()
            dispatcher.submit(batch)  # batch_size 1: published at once
            published = time.perf_counter()
            dispatcher.drain()
            done = time.perf_counter()
            if number >= 3:
                overhead.publish.append(published - started)
                overhead.round_trip.append(done - started)
    finally:
        dispatcher.close()


def measure_workers(settings: Settings, store: BenchStore, source: CropSource, grid: Grid, overhead: Overhead,
                    args: argparse.Namespace, workdir: Path, providers: dict[str, set[str]]) -> None:
    """For each worker concurrency: start ``classlens worker``, warm it up, run the grid, stop it."""
    app = make_celery_app(settings)
    queue = settings.inference_queue
    for concurrency in args.workers:
        started = time.perf_counter()
        worker = WorkerProcesses.start(settings, concurrency, workdir)
        try:
            warm_up(worker, app, store, source, queue)
            for emotion, engagement in worker.loaded().values():
                providers.setdefault("workers", set()).add(f"emotion {emotion}, engagement {engagement}")
            print(f"{concurrency} worker process(es) ready and warm in {time.perf_counter() - started:.1f} s "
                  "(not measured)", file=sys.stderr)
            if concurrency == 1:
                measure_round_trips(app, store, source, queue, overhead, args.round_trips)
                print(f"1-crop round trip through the broker: {_median(overhead.round_trip) * 1e3:.1f} ms "
                      f"(median of {len(overhead.round_trip)})", file=sys.stderr)
            for size in args.crop_sizes:
                for batch_size in args.batch_sizes:
                    count = grid.crops[batch_size]
                    for _ in range(args.repeat):
                        analysis_id = store.new_analysis(f"workers {concurrency} {size} {batch_size}")
                        batches = source.batches(analysis_id, size, batch_size, count)
                        wall = send_and_wait(app, store, analysis_id, batches, queue, batch_size)
                        grid.workers.setdefault((concurrency, size, batch_size), []).append(count / wall)
                    print(f"{concurrency} worker process(es), {size}² batch {batch_size}: "
                          f"{_median(grid.workers[(concurrency, size, batch_size)]):.0f} crops/s", file=sys.stderr)
        finally:
            worker.stop()


@dataclass
class WireCost:
    """CPU time of the wire format of one message, producer side and worker side, measured in this process."""

    size: int
    batch_size: int
    message_bytes: int
    producer: float
    worker: float


def measure_wire_format(source: CropSource, args: argparse.Namespace) -> list[WireCost]:
    """Replay what Celery and kombu's Redis transport do to one message, without the network.

    Producer: ``CropBatch.to_bytes``, Celery's msgpack of the task arguments, kombu's base64 of
    the body and the JSON envelope pushed to Redis. Worker: the JSON envelope read back, its
    copy into Redis' ``unacked`` hash (what makes redelivery possible with ``acks_late``), the
    base64 and msgpack decoding and ``CropBatch.from_bytes``.
    """
    import base64
    import json

    import msgpack

    costs = []
    batch_sizes = sorted({b for b in args.batch_sizes if b in (1, 32)} | {max(args.batch_sizes)})
    for size in args.crop_sizes:
        for batch_size in batch_sizes:
            batch = source.batches(0, size, batch_size, batch_size)[0]

            def produce(batch: CropBatch = batch) -> str:
                body = msgpack.packb([[batch.to_bytes()], {}, {"callbacks": None}], use_bin_type=True)
                # kombu.utils.json.dumps is json.dumps with an encoder for types a message does not hold here.
                return json.dumps({"body": base64.b64encode(body).decode(), "content-encoding": "binary",
                                   "content-type": "application/x-msgpack", "headers": {"task": "analyse"},
                                   "properties": {"body_encoding": "base64", "delivery_tag": "x"}})

            def consume(raw: str) -> int:
                message = json.loads(raw)
                json.dumps([message, "", "cpu"])  # the unacknowledged copy
                args_, _kwargs, _embed = msgpack.unpackb(base64.b64decode(message["body"]), raw=False)
                return len(CropBatch.from_bytes(args_[0]))

            raw = produce()
            consume(raw)
            runs = 3 if len(raw) < 20e6 else 1
            producer, worker = [], []
            for _ in range(runs):
                started = time.perf_counter()
                raw = produce()
                producer.append(time.perf_counter() - started)
                started = time.perf_counter()
                consume(raw)
                worker.append(time.perf_counter() - started)
            costs.append(WireCost(size, batch_size, len(raw), _median(producer), _median(worker)))
    return costs


@dataclass
class EndToEnd:
    """``analyze_recording`` on the gallery video at 1 fps: local, and with a broker and N worker processes."""

    seconds: float
    local: list[AnalysisRun] = field(default_factory=list)
    broker: dict[int, list[AnalysisRun]] = field(default_factory=dict)
    tasks: dict[int, set[str]] = field(default_factory=dict)  # worker processes → task names the worker ran


def measure_end_to_end(args: argparse.Namespace, settings: Settings, components: PipelineComponents,
                       source: CropSource, workdir: Path, broker_url: str) -> EndToEnd | None:
    """Local mode vs ``--broker`` on the gallery video (models loaded once; a fresh store per local run)."""
    if args.gallery_seconds <= 0:
        return None
    try:
        video: io.BytesIO = build_gallery_video(args.media, args.gallery_seconds)
    except SystemExit as exc:
        print(f"skipping the end-to-end comparison: {exc}", file=sys.stderr)
        return None
    result = EndToEnd(args.gallery_seconds)
    local: dict[str, Any] = {"execution_provider": settings.execution_provider}
    analyze_once(video, 1.0, components, local)  # warm-up, not measured
    for concurrency in args.e2e_workers:
        db = args.db or f"sqlite:///{workdir / f'e2e-{concurrency}.sqlite3'}"
        remote = {**local, "broker_url": broker_url, "database_url": db,
                  "inference_queue": settings.inference_queue}
        # Not model_copy: it would keep the cached resolved_database_url of the settings copied.
        worker_settings = load_settings(execution_provider=settings.execution_provider, broker_url=broker_url,
                                        database_url=db, inference_queue=settings.inference_queue)
        store = BenchStore(db, init_store(db))
        worker = WorkerProcesses.start(worker_settings, concurrency, workdir)
        try:
            # Warm every worker process (not measured), then alternate local and broker runs.
            warm_up(worker, make_celery_app(worker_settings), store, source, settings.inference_queue)
            warmed = len(worker.log_text())
            for number in range(args.e2e_repeat):
                if len(result.local) < args.e2e_repeat:
                    run = analyze_once(video, 1.0, components, local)
                    result.local.append(run)
                    print(f"[{number + 1}/{args.e2e_repeat}] local: {run.timing.wall:.2f} s, {run.faces} faces, "
                          f"{run.students} students", file=sys.stderr)
                run = analyze_once(video, 1.0, components, remote)
                result.broker.setdefault(concurrency, []).append(run)
                print(f"[{number + 1}/{args.e2e_repeat}] --broker, {concurrency} worker process(es): "
                      f"{run.timing.wall:.2f} s, {run.faces} faces, {run.students} students", file=sys.stderr)
            # Which path the broker mode took: crop batches (CeleryDispatcher) or other tasks.
            result.tasks[concurrency] = set(TASK_RECEIVED.findall(worker.log_text()[warmed:]))
        finally:
            worker.stop()
            store.close(remove_rows=args.db is not None)
    return result


# --------------------------------------------------------------------------- report


def machine_info(settings: Settings, broker_url: str, private_broker: bool, store_url: str,
                 providers: dict[str, set[str]], load: tuple[tuple[float, ...], tuple[float, ...]]) -> dict[str, str]:
    """What the numbers were measured on."""
    import celery
    import kombu
    import onnxruntime
    import redis

    before, after = load
    store = "SQLite (a fresh temporary file per worker start)" if store_url.startswith("sqlite") else (
        f"{store_url.split('://', 1)[0]} (`--db`; the benchmark's rows are removed afterwards)")
    return {
        **host_description(),
        "load average (1, 5, 15 min) before / after": f"{', '.join(f'{v:.2f}' for v in before)} / "
                                                       f"{', '.join(f'{v:.2f}' for v in after)}",
        "Python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "Celery / kombu / redis-py": f"{celery.__version__} / {kombu.__version__} / {redis.__version__}",
        "broker": f"Redis {redis_server_version(broker_url)}, "
                  + ("a private redis-server started by the benchmark" if private_broker else "`--broker`"),
        "store": store,
        "execution provider requested": settings.execution_provider,
        "providers that ran, in-process": "; ".join(sorted(providers.get("in-process", {"not measured"}))),
        "providers that ran, workers (from their logs)": "; ".join(sorted(providers.get("workers", {"not measured"}))),
        "onnxruntime threads": "in-process and 1 worker process: onnxruntime's choice (all cores); N > 1 worker "
                               "processes: cores // N each, at least 1 (`workers.worker_main.threads_per_process`)",
    }


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:,.0f}"  # NaN: not measured


def markdown_tables(args: argparse.Namespace, grid: Grid, overhead: Overhead, wire: list[WireCost],
                    e2e: EndToEnd | None) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"Crops per second (higher is better), medians of {args.repeat} run(s) for the workers and "
        f"{args.inproc_repeat} for in-process; this machine has {cores} cores. Crops per run: "
        + ", ".join(f"{grid.crops[b]} at batch {b}" for b in args.batch_sizes) + ".",
        "",
        "| crop | batch | `CropBatch` payload | in-process: inference | in-process: inference + store | "
        + " | ".join(f"{n} worker process{'es' if n > 1 else ''}" for n in args.workers)
        + " | best workers / in-process (with store) |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(args.workers) + "---:|",
    ]
    for size in args.crop_sizes:
        for batch_size in args.batch_sizes:
            in_store = _median(grid.inference_store.get((size, batch_size), []))
            by_workers = [_median(grid.workers.get((n, size, batch_size), [])) for n in args.workers]
            best = max((v for v in by_workers if v == v), default=float("nan"))
            body = grid.payload_bytes.get((size, batch_size), 0)
            ratio = f"{best / in_store:.2f}×" if best == best and in_store == in_store else "–"
            lines.append(
                f"| {size}² | {batch_size} | {body / 1e6:.2f} MB | "
                f"{_fmt(_median(grid.inference.get((size, batch_size), [])))} | {_fmt(in_store)} | "
                + " | ".join(_fmt(v) for v in by_workers) + f" | {ratio} |")
    if overhead.round_trip:
        in_process, trip = _median(overhead.in_process), _median(overhead.round_trip)
        lines += [
            "",
            f"Broker overhead per message: one 1-crop batch (112², `CropBatch` payload "
            f"{overhead.payload_bytes / 1e3:.1f} kB) at a time, medians of {len(overhead.round_trip)}:",
            "",
            "| measure | ms |",
            "|---|---:|",
            f"| in-process: `analyse_crops` + `store_face_results` of 1 crop | {in_process * 1e3:.2f} |",
            f"| producer: pack + publish (`CeleryDispatcher.submit`) | {_median(overhead.publish) * 1e3:.2f} |",
            f"| end to end: publish → Redis → worker → store → producer sees the row | {trip * 1e3:.2f} |",
            f"| **broker overhead per message** (end to end − in-process) | **{(trip - in_process) * 1e3:.2f}** |",
        ]
        one = _median(grid.workers.get((1, 112, 1), []))
        inproc_one = _median(grid.inference_store.get((112, 1), []))
        if one == one and inproc_one == inproc_one:
            lines.append(f"| pipelined cost per message at batch 1, 1 worker process (1 / crops/s − in-process "
                         f"1 / crops/s, 112²) | {(1 / one - 1 / inproc_one) * 1e3:.2f} |")
    if wire:
        lines += [
            "",
            "Wire format, CPU time per message measured in this process (no network): what Celery and kombu's Redis "
            "transport do to a batch (producer: pack, msgpack, base64, JSON; worker: JSON, the copy kept in the "
            "`unacked` hash for redelivery, base64, msgpack, unpack):",
            "",
            "| crop | batch | Redis message | producer ms | worker ms | both, ms per crop |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for cost in wire:
            lines.append(f"| {cost.size}² | {cost.batch_size} | {cost.message_bytes / 1e6:.2f} MB | "
                         f"{cost.producer * 1e3:.2f} | {cost.worker * 1e3:.2f} | "
                         f"{(cost.producer + cost.worker) * 1e3 / cost.batch_size:.3f} |")
    if e2e is not None and e2e.local:
        local = median_timing([r.timing for r in e2e.local])
        lines += [
            "",
            f"End to end: `analyze_recording` on the 3×3 gallery video ({e2e.seconds:g} s, 1280×720, 30 fps) at "
            f"1 fps, medians of {len(e2e.local)}; wall s of the producer process (the workers run beside it):",
            "",
            "| mode | wall s | min–max s | frames | faces | students | vs local |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| local (in-process inference thread) | {local.wall:.2f} | "
            f"{min(r.timing.wall for r in e2e.local):.2f}–{max(r.timing.wall for r in e2e.local):.2f} | "
            f"{e2e.local[0].frames_sampled} | {e2e.local[0].faces} | {e2e.local[0].students} | 1.00× |",
        ]
        for concurrency, runs in sorted(e2e.broker.items()):
            timing = median_timing([r.timing for r in runs])
            tasks = ", ".join(f"`{name}`" for name in sorted(e2e.tasks.get(concurrency, set()))) or "none seen"
            lines.append(
                f"| `--broker`, `classlens worker --concurrency {concurrency}` (tasks: {tasks}) | {timing.wall:.2f} | "
                f"{min(r.timing.wall for r in runs):.2f}–{max(r.timing.wall for r in runs):.2f} | "
                f"{runs[0].frames_sampled} | {runs[0].faces} | {runs[0].students} | {timing.wall / local.wall:.2f}× |")
    return "\n".join(lines)


def interpretation(args: argparse.Namespace, grid: Grid, overhead: Overhead, wire: list[WireCost],
                   e2e: EndToEnd | None) -> str:
    """Plain words computed from the numbers."""
    cores = len(os.sched_getaffinity(0))
    text: list[str] = []
    size = 112 if 112 in args.crop_sizes else args.crop_sizes[0]

    def workers_at(n: int, batch: int) -> float:
        return _median(grid.workers.get((n, size, batch), []))

    batch = max((b for b in args.batch_sizes if b <= 32), default=args.batch_sizes[0])
    inproc = _median(grid.inference_store.get((size, batch), []))
    measured = [n for n in args.workers if workers_at(n, batch) == workers_at(n, batch)]
    if inproc == inproc and measured:
        parts = ", ".join(f"{n} process{'es' if n > 1 else ''} {_fmt(workers_at(n, batch))}" for n in measured)
        best = max(workers_at(n, batch) for n in measured)
        text.append(
            f"At the pipeline's crop size ({size}²) and batch {batch}, in-process inference with the store "
            f"runs {_fmt(inproc)} crops/s; the workers: {parts} crops/s, the best {best / inproc:.2f}× in-process.")
        one = workers_at(1, batch) if 1 in measured else float("nan")
        cost = next((c for c in wire if c.size == size and c.batch_size == batch), None)
        if one == one and cost is not None:
            gap = batch / one - batch / inproc
            text[-1] += (
                f" Per message of {batch} crops, 1 worker process takes {gap * 1e3:.1f} ms longer than in-process; "
                f"the wire format alone costs {(cost.producer + cost.worker) * 1e3:.1f} ms of CPU per message "
                f"({cost.producer * 1e3:.1f} ms producer, {cost.worker * 1e3:.1f} ms worker, measured separately), "
                "the rest is Redis, Celery's receive/ack/log path and the producer's polling, all on the same cores.")
    cells = [(s_, b) for s_ in args.crop_sizes for b in args.batch_sizes
             if _median(grid.inference_store.get((s_, b), [])) == _median(grid.inference_store.get((s_, b), []))]

    def ratio_over_grid(numerator: int, denominator: int) -> list[float]:
        ratios = []
        for s_, b in cells:
            top = _median(grid.workers.get((numerator, s_, b), []))
            bottom = _median(grid.workers.get((denominator, s_, b), []))
            if top == top and bottom == bottom and bottom > 0:
                ratios.append(top / bottom)
        return ratios

    def summary(ratios: list[float]) -> str:
        mean = float(np.exp(np.mean(np.log(ratios))))
        return f"{mean:.2f}× (geometric mean over {len(ratios)} grid points, {min(ratios):.2f}–{max(ratios):.2f}×)"

    paragraph = [f"This machine has {cores} cores, and the producer (packing, publishing, polling the store) runs on "
                 "them beside the workers."]
    if 1 in args.workers and 2 in args.workers and (two := ratio_over_grid(2, 1)):
        paragraph.append(f"2 worker processes against 1: {summary(two)}; a single process leaves a core idle while "
                         "it waits for Redis and for the store's commit, a second one fills those gaps.")
    more = [n for n in args.workers if n > cores]
    if cores in args.workers:
        for n in more:
            ratios = ratio_over_grid(n, cores)
            if not ratios:
                continue
            mean = float(np.exp(np.mean(np.log(ratios))))
            paragraph.append(f"{n} processes against {cores}: {summary(ratios)}.")
            if mean < 0.95:
                paragraph.append("More processes than cores cost throughput: they only share the same cores (each "
                                 "with fewer onnxruntime threads) and add context switches.")
            elif mean <= 1.05:
                paragraph.append("More processes than cores do not help: there is no more CPU to give them.")
            else:
                paragraph.append("More processes than cores add no CPU; what they gain comes from overlapping the "
                                 "time processes spend blocked (Redis round trips, the store's commit), it is "
                                 "small, and of the size of the run-to-run noise on this machine (see `--repeat`).")
    def best_workers(s_: int, b: int) -> float:
        return max((_median(grid.workers.get((n, s_, b), [])) for n in measured), default=0.0)

    beaten = [(s_, b) for s_, b in cells if best_workers(s_, b) >= _median(grid.inference_store[(s_, b)])]
    if cells and measured:
        where = ", ".join(f"{s_}² batch {b}" for s_, b in beaten)
        paragraph.append(
            f"The best worker count matched or beat the in-process loop (inference then store, one batch at a time, "
            f"as `InProcessDispatcher` runs it) at {len(beaten)} of {len(cells)} grid points"
            + (f" ({where}: there the store's commits of one process run beside another's inference, which the "
               "sequential in-process loop cannot do, and the wire format is cheap)" if beaten else "")
            + ". On one machine, Celery workers buy isolation and a path to more machines, not speed.")
    text += ["", " ".join(paragraph)]
    if overhead.round_trip:
        in_process, trip = _median(overhead.in_process), _median(overhead.round_trip)
        per_message = trip - in_process
        ms = per_message * 1e3
        text += ["", (
            f"Broker overhead: a 1-crop batch takes {trip * 1e3:.1f} ms end to end against {in_process * 1e3:.1f} "
            f"ms in-process, i.e. about {ms:.1f} ms per message for publishing, Redis, the worker's receive, "
            "unpack, ack and log lines, and the producer noticing the row (it polls the store every 1 ms here; "
            f"`classlens analyze` polls every 250 ms while draining). Per crop that is {ms:.1f} ms at batch 1, "
            f"{ms / 32:.2f} ms at batch 32 and {ms / 256:.3f} ms at batch 256: batches of 32 (the default "
            "`batch_size`) make the per-message cost small next to inference.")]
    def wire_note(crop: int) -> str:
        costs = [c for c in wire if c.size == crop and c.batch_size > 1]
        inproc_big = _median(grid.inference_store.get((crop, max(args.batch_sizes)), []))
        if not costs or inproc_big != inproc_big:
            return ""
        per_crop = max((c.producer + c.worker) / c.batch_size for c in costs)
        return (f"The wire format alone costs up to {per_crop * 1e3:.2f} ms of CPU per {crop}² crop, against "
                f"{1e3 / inproc_big:.2f} ms for in-process inference and store. ")

    big = max(args.crop_sizes)
    if big != size and args.workers:
        n = args.workers[0]
        batch_big = max(args.batch_sizes)
        small_rate, big_rate = workers_at(n, batch_big), _median(grid.workers.get((n, big, batch_big), []))
        body_small = grid.payload_bytes.get((size, batch_big), 0)
        body_big = grid.payload_bytes.get((big, batch_big), 0)
        if small_rate == small_rate and big_rate == big_rate and body_small:
            text += ["", (
                f"Crop size: the emotion model sees the same {grid.model_input}² grey input whatever arrives, so "
                f"{big}² crops cost in "
                f"transport and resizing: at batch {batch_big} a message carries {body_big / 1e6:.1f} MB instead of "
                f"{body_small / 1e6:.1f} MB, and {n} worker process{'es' if n > 1 else ''} "
                f"{'run' if n > 1 else 'runs'} {_fmt(big_rate)} crops/s instead of {_fmt(small_rate)}. "
                + (wire_note(big) if wire_note(big) else "")
                + "Sending 112² crops (as the pipeline does) rather than larger ones is right.")]
    if e2e is not None and e2e.local and e2e.broker:
        local = median_timing([r.timing for r in e2e.local])
        parts = " and ".join(f"{median_timing([r.timing for r in runs]).wall / local.wall:.2f}× (with {n} worker "
                             f"process{'es' if n > 1 else ''})" for n, runs in sorted(e2e.broker.items()))
        same = all(r.faces == e2e.local[0].faces and r.students == e2e.local[0].students
                   for runs in e2e.broker.values() for r in runs)
        text += ["", (
            f"End to end at 1 fps, `analyze --broker` takes {parts} of the local time"
            f"{' and finds the same faces and students' if same else ' (faces or students differ: see the table)'}. "
            f"On one {cores}-core machine the workers compete with decoding and detection for the same cores, so "
            "the broker mode cannot be faster here; its point is to move inference to other machines (or a GPU) "
            "when the capture side is the bottleneck, and to keep several producers (meeting bots) fed by one "
            "worker pool.")]
    return "\n".join(text)


def docs_section(info: dict[str, str], command: str, tables: str, words: str) -> str:
    """The section of docs/benchmarks.md that this script owns."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    return f"""{SECTION_BEGIN}
## Celery inference workers vs in-process inference (`benchmarks/workers.py`)

Measured {today} on a CPU-only machine with real `classlens worker` processes and a real
Redis; absolute numbers hold for this machine only, ratios are measured within one run.
The machine may have been shared with other work: the load average before and after the
run is listed; medians of few runs carry that noise.

{machine}

Command (from the repository root):

```
{command}
```

{tables}

{words}

How it is measured: the crops are the aligned 112² crops of every face the capture
pipeline (`CapturePipeline`: detector, tracker, crops) finds in the demo classroom video, reused
round-robin under distinct (track, time) keys; the 64² and 224² rows resize them with
OpenCV. The emotion runner resizes every crop to its model's 64² grey input, so the crop
size changes the bytes that travel and the resize, not the model's work. In-process:
`analyse_crops` on each batch, and `analyse_crops` + `store_face_results` into a fresh
store (what `InProcessDispatcher` runs per batch, without its thread). Workers:
`classlens worker --concurrency N` as a subprocess (prefork pool, the `info` log level
a deployment runs with), started once per N with a fresh store, every process warmed up
(models loaded) before timing; each measurement is a new analysis whose crops a
`CeleryDispatcher` publishes in batches of the given size, timed from the first publish
until the dispatcher sees the last row stored (it polls the store every 10 ms here). The
producer runs on the same cores as the workers, as `classlens analyze --broker` does on
one machine. The broker is a private `redis-server` without persistence unless `--broker`
is given. End to end: `analyze_recording` on the gallery video of
`benchmarks/analyze.py`, passed in memory to `analyze_recording` (what `classlens analyze`
runs; models loaded once, local runs get a fresh temporary store, the broker runs share the
worker's store), local and broker runs alternating. An in-memory video takes the
crop-batch path with a broker (the producer decodes, detects and tracks; the workers run
emotion and engagement inference on `CeleryDispatcher`'s batches); the table names the
tasks the worker ran. The wire-format
table replays, in one process and without the network, what Celery and kombu's Redis
transport do to each message: Celery packs the task arguments with msgpack, kombu wraps
the body in base64 inside a JSON envelope, and the worker, which acknowledges late, keeps
a JSON copy of every message it holds in Redis' `unacked` hash until it acknowledges.

GPU workers: no GPU numbers here; no GPU machine was lent to the session that ran this.
The same script with `--provider cuda` measures GPU workers: it passes
`execution_provider=cuda` to the in-process models and the workers and sends the crops to
the `gpu` queue (`inference_queue=gpu`); the provider lines above then say whether
`CUDAExecutionProvider` really ran.
{SECTION_END}
"""


def write_docs(section: str) -> None:
    """Replace this script's section of docs/benchmarks.md, or append it at the end; nothing else changes."""
    text = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.exists() else (
        "# Benchmarks\n\nEach benchmark in `benchmarks/` prints a table and records it here with the machine "
        "it ran on (see the design guide, section 6).\n")
    pattern = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _match: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (about a minute): 1 and 2 processes, batches 1 and 32, 112² only, few crops, "
                             "a 10 s gallery video")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker processes (default 1 2 4)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 32 128 256")
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=None, help="crop sides (default 64 112 224)")
    parser.add_argument("--crops", type=int, default=None,
                        help="crops per measurement, at least 8 batches' worth (default 1024)")
    parser.add_argument("--max-messages", type=int, default=None,
                        help="at most this many batches per measurement (default 256: caps batch 1 at 256 crops)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per worker measurement (default 2)")
    parser.add_argument("--inproc-repeat", type=int, default=None, help="runs per in-process measurement (default 3)")
    parser.add_argument("--round-trips", type=int, default=None,
                        help=f"1-crop round trips for the broker overhead (default {DEFAULT_ROUND_TRIPS})")
    parser.add_argument("--gallery-seconds", type=float, default=None,
                        help="length of the end-to-end gallery video (default 60; 0 skips the end-to-end part)")
    parser.add_argument("--e2e-workers", type=int, nargs="+", default=None,
                        help="worker processes for the end-to-end `--broker` runs (default 1 2)")
    parser.add_argument("--e2e-repeat", type=int, default=None, help="end-to-end runs per mode (default 3)")
    parser.add_argument("--media", type=Path, default=DEFAULT_MEDIA_DIR, help="folder of the test media")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL of the store (default: fresh SQLite files); "
                        "e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--broker", default=None,
                        help="Redis URL to use (default: start a private redis-server on a free port)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="execution provider of the models; cuda also sends the crops to the gpu queue")
    parser.add_argument("--write-docs", action="store_true", help="update this script's section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "workers": [1, 2] if quick else [1, 2, 4],
        "batch_sizes": [1, 32] if quick else [1, 8, 32, 128, 256],
        "crop_sizes": [112] if quick else [64, 112, 224],
        "crops": 128 if quick else 1024,
        "max_messages": 64 if quick else 256,
        "repeat": 1 if quick else 2,
        "inproc_repeat": 1 if quick else 3,
        "round_trips": 10 if quick else DEFAULT_ROUND_TRIPS,
        "gallery_seconds": 10.0 if quick else 60.0,
        "e2e_workers": [1] if quick else [1, 2],
        "e2e_repeat": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    numbers = [*args.workers, *args.batch_sizes, *args.crop_sizes, *args.e2e_workers, args.crops, args.max_messages,
               args.repeat, args.inproc_repeat, args.round_trips, args.e2e_repeat]
    if any(n < 1 for n in numbers) or args.gallery_seconds < 0:
        parser.error("counts and sizes must be positive (--gallery-seconds 0 skips the end-to-end part)")
    if any(s < 16 for s in args.crop_sizes):
        parser.error("--crop-sizes: at least 16 pixels")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_before = os.getloadavg()
    if args.provider == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise SystemExit("--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                             f"({onnxruntime.get_available_providers()}); install the gpu extra")
    queue = "gpu" if args.provider == "cuda" else "cpu"
    providers: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory(prefix="classlens-workers-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        if args.broker:
            broker_url = args.broker
            print(f"using the broker {broker_url}: other workers on queue {queue!r} there would take crops too",
                  file=sys.stderr)
        else:
            broker_url = stack.enter_context(private_redis(workdir))

        base = load_settings(execution_provider=args.provider)
        started = time.perf_counter()
        components = PipelineComponents.load(base)
        source = CropSource(real_face_crops(components))
        print(f"loaded the models and cut {len(source.faces)} real face crops in {time.perf_counter() - started:.1f} s "
              "(not measured)", file=sys.stderr)
        models = load_inference_models(base)
        emotion = models.emotion.session.get_providers() if models.emotion is not None else "off"
        providers["in-process"] = {f"emotion {emotion}, engagement {models.engagement.session.get_providers()}"}

        grid = Grid(crops={b: crops_per_run(b, args.crops, args.max_messages) for b in args.batch_sizes})
        grid.model_input = models.emotion.size if models.emotion is not None else 0
        wire = measure_wire_format(source, args)
        overhead = Overhead()

        # (c) the in-process baseline, and the in-process half of (b)
        inproc_store = BenchStore.open(args.db, workdir, "in-process")
        try:
            measure_in_process(models, inproc_store, source, grid, args)
            measure_in_process_single(models, inproc_store, source, overhead, args.round_trips)
        finally:
            inproc_store.close(remove_rows=args.db is not None)

        # (a) the workers, and the broker half of (b)
        worker_store = BenchStore.open(args.db, workdir, "workers")
        settings = load_settings(execution_provider=args.provider, broker_url=broker_url,
                                 database_url=worker_store.url, inference_queue=queue)
        try:
            measure_workers(settings, worker_store, source, grid, overhead, args, workdir, providers)
        finally:
            worker_store.close(remove_rows=args.db is not None)

        # (d) analyze --broker against the local mode
        e2e = measure_end_to_end(args, settings, components, source, workdir, broker_url)
        info = machine_info(settings, broker_url, not args.broker, worker_store.url, providers,
                            (load_before, os.getloadavg()))

    tables = markdown_tables(args, grid, overhead, wire, e2e)
    words = interpretation(args, grid, overhead, wire, e2e)
    print()
    print(tables)
    print()
    print(words)
    if args.write_docs:
        command = "python benchmarks/workers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_docs(docs_section(info, command.strip(), tables, words))
        print(f"\nwrote {DOCS_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
