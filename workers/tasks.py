"""Celery tasks of the inference workers.

One thin task: decode a :class:`~kernel.types.CropBatch` payload, run the pure
:func:`~workers.inference.analyse_crops`, store the results idempotently. The models and
the store engine are loaded lazily, once per worker process, by :class:`InferenceTask`.

Errors split in two. Transient ones (the database or the broker unreachable or busy, a
task past its soft time limit) are retried with exponential backoff up to
``task_max_retries``. Everything else is a poison message that no retry would fix: it is
recorded as a :class:`~kernel.store.FailedBatch` with its reason, and the task
returns normally so the worker goes on with the next batch.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import numpy as np
import redis.exceptions
from celery import Task, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from kernel.errors import ClassLensError, ConfigurationError
from kernel.settings import Settings
from kernel.store import make_engine, store_id_of
from kernel.types import CROP_SIZE, CropBatch
from pipeline.models import CaptureModels, capture_key, load_capture_models, load_inference_models
from workers.failures import ensure_failed_batch_table, record_failed_batch
from workers.inference import InferenceModels, analyse_crops
from workers.lifecycle import WorkerState, current_reporter, settings_of
from workers.liveness import WorkerReporter
from workers.persistence import analysis_exists, store_face_results
from workers.segments import Segment, analyse_segment, record_segment_failure, segment_settings

__all__ = [
    "ANALYSE_CROP_BATCH_TASK",
    "ANALYSE_RECORDING_SEGMENT_TASK",
    "InferenceTask",
    "SegmentTask",
    "WorkerResources",
    "analyse_crop_batch",
    "analyse_recording_segment",
]

logger = logging.getLogger(__name__)

#: Registered name of :func:`analyse_crop_batch`, used for routing and by producers.
ANALYSE_CROP_BATCH_TASK = "classlens.analyse_crop_batch"

#: Registered name of :func:`analyse_recording_segment`, used for routing and by producers.
ANALYSE_RECORDING_SEGMENT_TASK = "classlens.analyse_recording_segment"

#: Longest wait before a retry; kept well below the visibility timeout, because a
#: retry waiting for its countdown holds its message unacknowledged.
MAX_RETRY_COUNTDOWN_SECONDS = 60.0


def _warmup_batch() -> CropBatch:
    """One grey crop: enough to run every session's first (slow, allocating) inference."""
    return CropBatch(
        analysis_id=0,
        streams=("warmup",),
        track_ids=np.zeros(1, np.int64),
        timestamps=np.zeros(1, np.float64),
        crops=np.full((1, CROP_SIZE, CROP_SIZE, 3), 128, np.uint8),
        boxes=np.zeros((1, 4), np.float32),
        detection_scores=np.ones(1, np.float32),
        head_pose=np.zeros((1, 3), np.float32),
    )


@dataclass
class WorkerResources:
    """What one worker process loads once and keeps: the models and a store engine."""

    settings: Settings
    """The settings the resources are built from."""
    pid: int
    """The process they belong to; a forked child must not reuse its parent's sessions or connections."""

    @cached_property
    def models(self) -> InferenceModels:
        """The inference models, loaded and warmed up on first use."""
        models = load_inference_models(self.settings)
        analyse_crops(_warmup_batch(), models)
        emotion = models.emotion.session.get_providers() if models.emotion is not None else "off"
        # The providers that really run: the CPU and GPU onnxruntime builds share a module
        # folder, so which one is installed is only known here.
        logger.info("worker process %d loaded its models: emotion on %s, engagement on %s",
                    self.pid, emotion, models.engagement.session.get_providers())
        return models

    @cached_property
    def engine(self) -> Engine:
        """The store engine of this process (tables are created by the producer)."""
        return make_engine(self.settings.resolved_database_url)

    @cached_property
    def store_id(self) -> str:
        """The id of the store this process writes to."""
        return store_id_of(self.engine)

    @cached_property
    def failure_engine(self) -> Engine:
        """The store engine, with the failed-batch table guaranteed to exist."""
        ensure_failed_batch_table(self.engine)
        return self.engine


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: the store or broker unreachable or busy, or a task cut short by time."""
    if isinstance(exc, SoftTimeLimitExceeded | OperationalError | redis.exceptions.ConnectionError
                  | redis.exceptions.TimeoutError | ConnectionError | TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message``, the one line a person needs."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def describe_payload(payload: object) -> tuple[int | None, int | None]:
    """The analysis id and crop count a payload claims, as far as they can be read; never raises."""
    try:
        data = msgpack.unpackb(payload, raw=False) if isinstance(payload, bytes | bytearray) else None
    except Exception:  # msgpack raises several unrelated types on garbage
        return None, None
    if not isinstance(data, dict):
        return None, None
    analysis_id = data.get("analysis_id")
    crops: Any = data.get("crops")
    shape = crops.get("shape") if isinstance(crops, dict) else None
    streams = data.get("streams")
    count: Any = shape[0] if isinstance(shape, list) and shape else (
        len(streams) if isinstance(streams, list) else None)
    return (analysis_id if isinstance(analysis_id, int) else None,
            count if isinstance(count, int) else None)


def retry_countdown(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 1, 2, 4 … up to a minute, with jitter.

    The jitter spreads out the retries of many workers that hit the same outage.
    """
    return min(MAX_RETRY_COUNTDOWN_SECONDS, 2.0 ** retries) * random.uniform(0.5, 1.0)


class InferenceTask(Task):  # type: ignore[misc]  # celery ships no type information
    """Base of the inference tasks: models and store engine loaded lazily, once per worker process.

    Not in ``worker_process_init``: a process that never gets a task never loads a model,
    and a failure to load is reported on the batch that needed the model.
    """

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    _resources: WorkerResources | None = None

    @property
    def settings(self) -> Settings:
        """The settings of the app this task belongs to."""
        return settings_of(self.app)

    @property
    def resources(self) -> WorkerResources:
        """The models and engine of the current process, created on first use after a fork."""
        pid = os.getpid()
        if self._resources is None or self._resources.pid != pid:
            self._resources = WorkerResources(self.settings, pid)
        return self._resources

    @property
    def models(self) -> InferenceModels:
        """The inference models of this worker process (loaded on first access)."""
        return self.resources.models

    @property
    def engine(self) -> Engine:
        """The store engine of this worker process."""
        return self.resources.engine

    def retry_or_hand_back(self, exc: Exception, what: str, work: HeldWork) -> NoReturn:
        """After a transient error: retry on this worker while retries remain, then hand the work back.

        A retry waits its countdown holding the work (the producer must not send it again
        meanwhile). After ``task_max_retries`` the message goes back to the queue for any
        worker (another may reach the database): a batch is never dropped for a problem
        that is not its own. Always raises.
        """
        retries: int = self.request.retries
        max_retries = self.settings.task_max_retries
        if retries < max_retries:
            countdown = retry_countdown(retries)
            logger.warning("%s: %s; retry %d of %d in %.1f s", what, describe_error(exc), retries + 1, max_retries,
                           countdown)
            work.wait_for_retry(countdown)
            raise self.retry(exc=exc, countdown=countdown, max_retries=max_retries) from None
        logger.warning("%s: %s after %d retries; handing it back to the queue", what, describe_error(exc), retries)
        time.sleep(HAND_BACK_PAUSE_SECONDS)  # a worker that cannot work must not spin on the same message
        raise Reject(f"handed back after {retries} retries: {describe_error(exc)}", requeue=True)

    def give_up(self, payload: object, reason: str, *, analysis_id: int | None = None,
                crops: int | None = None, batch_id: str | None = None) -> int:
        """Record a batch as failed (reading what the payload claims when not given); returns 0 crops."""
        claimed_id, claimed_crops = describe_payload(payload)
        analysis_id = analysis_id if analysis_id is not None else claimed_id
        crops = crops if crops is not None else claimed_crops
        try:
            record_failed_batch(self.resources.failure_engine, analysis_id=analysis_id, reason=reason, crops=crops,
                                batch_id=batch_id)
        except Exception:
            # The store is unreachable too: the failure cannot be recorded, so let Celery
            # log it; the producer will report that the workers stopped making progress.
            logger.exception("could not record a failed crop batch of analysis %s: %s", analysis_id, reason)
            raise
        return 0


#: Pause before a message is handed back to the queue, so that a worker that cannot do it does not spin on it.
HAND_BACK_PAUSE_SECONDS = 1.0
#: How long past a retry's countdown its work stays reported as held (the retry's start, a loaded worker).
RETRY_HOLD_MARGIN_SECONDS = 15.0


class HeldWork:
    """One task's batch or segment, as this worker process reports it (:mod:`workers.liveness`)."""

    def __init__(self, work_id: str | None, reporter: WorkerReporter | None) -> None:
        self.work_id = work_id
        self.reporter = reporter
        self.retry_countdown: float | None = None

    def refuse_another_store(self, task: InferenceTask, store_id: str | None) -> None:
        """Hand the work back (raises :class:`Reject`) when it is meant for another store than this worker's."""
        if store_id is None:
            return
        mine = WorkerState.store_id or task.resources.store_id
        if store_id == mine:
            return
        problem = (f"connected to another store than its producer's (this worker's store {mine[:8]}…, the work's "
                   f"{store_id[:8]}…): check the worker's CLASSLENS_DATABASE_URL")
        logger.error("%s; handing the work back", problem)
        if self.reporter is not None:
            self.reporter.set_problem(problem)
        time.sleep(HAND_BACK_PAUSE_SECONDS)
        raise Reject(problem, requeue=True)

    def working(self) -> None:
        """The work succeeded: whatever stopped this process is over."""
        if self.reporter is not None:
            self.reporter.set_problem(None)

    def problem(self, exc: BaseException) -> None:
        """Report what stops this process (a transient error it will retry)."""
        if self.reporter is not None:
            database = isinstance(exc, OperationalError | DBAPIError)
            self.reporter.set_problem(f"cannot reach the database: {describe_error(exc)}" if database
                                      else describe_error(exc))

    def wait_for_retry(self, countdown: float) -> None:
        """The task retries in ``countdown`` seconds: keep the work reported as held until then."""
        self.retry_countdown = countdown


@contextmanager
def holding(work_id: str | None) -> Iterator[HeldWork]:
    """Report ``work_id`` as held by this process while the task runs (and through a retry's wait)."""
    reporter = current_reporter()
    work = HeldWork(work_id, reporter)
    if reporter is not None and work_id is not None:
        reporter.hold(work_id)
    try:
        yield work
    finally:
        if reporter is not None and work_id is not None:
            if work.retry_countdown is not None:
                reporter.hold(work_id, work.retry_countdown + RETRY_HOLD_MARGIN_SECONDS)
            else:
                reporter.release(work_id)


@shared_task(bind=True, base=InferenceTask, name=ANALYSE_CROP_BATCH_TASK)  # type: ignore[untyped-decorator]
def analyse_crop_batch(self: InferenceTask, payload: bytes, emotion_inference: bool = True,
                       batch_id: str | None = None, store_id: str | None = None) -> int:
    """Analyse one packed :class:`CropBatch` and store the results; returns the number of crops.

    ``emotion_inference=False`` (the producer's ``--no-emotion``) skips the emotion model for
    this batch. It can only switch emotion off: a worker configured without emotion never runs it.
    ``batch_id`` is the producer's id of the batch: the worker reports it as held while it works
    on it and stores it as the batch's receipt. ``store_id`` is the id of the producer's store:
    a worker connected to another store hands the batch back instead of writing it there.
    """
    with holding(batch_id) as work:
        work.refuse_another_store(self, store_id)
        if not isinstance(payload, bytes | bytearray):
            return self.give_up(payload, f"payload: expected bytes, got {type(payload).__name__}", batch_id=batch_id)
        try:
            batch = CropBatch.from_bytes(bytes(payload))
        except Exception as exc:  # a payload that does not decode now never will
            return self.give_up(payload, describe_error(exc), batch_id=batch_id)
        try:
            results = analyse_crops(batch, self.models.for_settings(emotion_inference))
            stored = store_face_results(self.engine, batch, results, batch_id=batch_id)
            work.working()
            if not stored and not analysis_exists(self.engine, batch.analysis_id):
                # Deleted while its crops were analysed: its producer must hear why nothing arrives.
                return self.give_up(payload, f"analysis {batch.analysis_id} no longer exists (deleted while it ran)",
                                    analysis_id=batch.analysis_id, crops=len(batch), batch_id=batch_id)
        except Exception as exc:
            if not is_transient(exc):
                logger.exception("crop batch of analysis %d failed", batch.analysis_id)
                return self.give_up(payload, describe_error(exc), analysis_id=batch.analysis_id, crops=len(batch),
                                    batch_id=batch_id)
            work.problem(exc)
            self.retry_or_hand_back(exc, f"crop batch of analysis {batch.analysis_id}", work)
        return len(batch)


#: Detector configurations one worker process keeps loaded (producers may ask for different ones).
_MAX_CAPTURE_CONFIGURATIONS = 2


class SegmentTask(InferenceTask):
    """Base of the segment task: :class:`InferenceTask`'s models and engine, plus the capture models.

    The detector (and optional recognizer) are loaded lazily, once per worker process and
    detector configuration, like the inference models.
    """

    _capture: tuple[int, dict[tuple[object, ...], CaptureModels]] | None = None

    def capture_models(self, settings: Settings) -> CaptureModels:
        """The detector and recognizer for ``settings``, loaded on first use in this process."""
        pid = os.getpid()
        if self._capture is None or self._capture[0] != pid:
            self._capture = (pid, {})
        loaded = self._capture[1]
        key = capture_key(settings)
        if key not in loaded:
            if len(loaded) >= _MAX_CAPTURE_CONFIGURATIONS:
                loaded.pop(next(iter(loaded)))
            loaded[key] = load_capture_models(settings)
            logger.info("worker process %d loaded its detector %s on %s", pid, settings.detector,
                        loaded[key].detector.providers)
        return loaded[key]


@shared_task(bind=True, base=SegmentTask, name=ANALYSE_RECORDING_SEGMENT_TASK)  # type: ignore[untyped-decorator]
def analyse_recording_segment(self: SegmentTask, analysis_id: int, path: str, segment_index: int, start: float,
                              end: float | None, settings_overrides: dict[str, Any] | None = None,
                              work_id: str | None = None, store_id: str | None = None) -> int:
    """Decode, detect, track and analyse one time segment of a recorded file; returns the frames sampled.

    The work is :func:`workers.segments.analyse_segment`. Transient errors are retried
    like a crop batch's, then handed back to the queue; anything else marks the segment
    failed with its reason, which fails the analysis. A segment past the soft time limit is
    not retried: it would run out of time again. ``work_id`` and ``store_id`` are as for
    :func:`analyse_crop_batch`.
    """
    if not isinstance(analysis_id, int) or isinstance(analysis_id, bool):
        logger.error("segment task without a readable analysis id (%r): dropped", analysis_id)
        return 0
    with holding(work_id) as work:
        work.refuse_another_store(self, store_id)
        try:
            segment = Segment(segment_index, start, end)
        except ValueError as exc:
            if not isinstance(segment_index, int) or isinstance(segment_index, bool) or segment_index < 0:
                logger.error("segment task of analysis %d without a readable segment index: %s", analysis_id, exc)
                return 0
            record_segment_failure(self.engine, analysis_id, Segment(segment_index, 0.0, None), describe_error(exc))
            return 0
        try:
            if not isinstance(path, str) or not path:
                raise ValueError(f"path: expected the video's path, got {path!r}")
            settings = segment_settings(self.settings, settings_overrides)
        except (ValueError, ConfigurationError) as exc:  # pydantic's ValidationError is a ValueError
            record_segment_failure(self.engine, analysis_id, segment, describe_error(exc))
            return 0
        try:
            outcome = analyse_segment(self.engine, analysis_id, Path(path), segment, settings,
                                      self.capture_models(settings), self.models)
        except SoftTimeLimitExceeded:
            reason = (f"took longer than the task time limit ({self.settings.task_time_limit_seconds} s); "
                      "lower segment_seconds or raise task_time_limit_seconds")
        except Exception as exc:
            if is_transient(exc):
                work.problem(exc)
                self.retry_or_hand_back(exc, f"segment {segment.index} of analysis {analysis_id}", work)
            if not isinstance(exc, ClassLensError):  # bad input needs its message, not a traceback
                logger.exception("segment %d of analysis %d failed", segment.index, analysis_id)
            reason = describe_error(exc)
        else:
            work.working()
            return outcome.frames
        record_segment_failure(self.engine, analysis_id, segment, reason)
        return 0
