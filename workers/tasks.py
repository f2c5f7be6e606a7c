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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis.exceptions
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from kernel.errors import ClassLensError, ConfigurationError
from kernel.settings import Settings, load_settings
from kernel.store import make_engine
from kernel.types import CROP_SIZE, CropBatch
from pipeline.models import CaptureModels, capture_key, load_capture_models, load_inference_models
from workers.failures import ensure_failed_batch_table, record_failed_batch
from workers.inference import InferenceModels, analyse_crops
from workers.persistence import store_face_results
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

#: Attribute of a Celery app that holds the :class:`Settings` it was built from.
SETTINGS_ATTRIBUTE = "classlens_settings"

#: Longest wait before a retry; kept well below the visibility timeout, because a
#: retry waiting for its countdown holds its message unacknowledged.
MAX_RETRY_COUNTDOWN_SECONDS = 60.0


def settings_of(app: Any) -> Settings:
    """The settings a Celery app was built with; the environment's for an app built elsewhere."""
    configured = getattr(app, SETTINGS_ATTRIBUTE, None)
    return configured if isinstance(configured, Settings) else load_settings()


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

    def retry_or_give_up(self, exc: Exception, what: str) -> str:
        """Retry the task after a transient error while retries remain (raises); else the reason it failed.

        ``what`` names the work in the warning, e.g. "crop batch of analysis 3".
        """
        retries: int = self.request.retries
        max_retries = self.settings.task_max_retries
        if retries < max_retries:
            countdown = retry_countdown(retries)
            logger.warning("%s: %s; retry %d of %d in %.1f s", what, describe_error(exc), retries + 1, max_retries,
                           countdown)
            raise self.retry(exc=exc, countdown=countdown, max_retries=max_retries) from None
        return f"gave up after {retries} retries: {describe_error(exc)}"

    def give_up(self, payload: object, reason: str, *, analysis_id: int | None = None,
                crops: int | None = None) -> int:
        """Record a batch as failed (reading what the payload claims when not given); returns 0 crops."""
        claimed_id, claimed_crops = describe_payload(payload)
        analysis_id = analysis_id if analysis_id is not None else claimed_id
        crops = crops if crops is not None else claimed_crops
        try:
            record_failed_batch(self.resources.failure_engine, analysis_id=analysis_id, reason=reason, crops=crops)
        except Exception:
            # The store is unreachable too: the failure cannot be recorded, so let Celery
            # log it; the producer will report that the workers stopped making progress.
            logger.exception("could not record a failed crop batch of analysis %s: %s", analysis_id, reason)
            raise
        return 0


@shared_task(bind=True, base=InferenceTask, name=ANALYSE_CROP_BATCH_TASK)  # type: ignore[untyped-decorator]
def analyse_crop_batch(self: InferenceTask, payload: bytes, emotion_inference: bool = True) -> int:
    """Analyse one packed :class:`CropBatch` and store the results; returns the number of crops.

    ``emotion_inference=False`` (the producer's ``--no-emotion``) skips the emotion model for
    this batch. It can only switch emotion off: a worker configured without emotion never runs it.
    """
    if not isinstance(payload, bytes | bytearray):
        return self.give_up(payload, f"payload: expected bytes, got {type(payload).__name__}")
    try:
        batch = CropBatch.from_bytes(bytes(payload))
    except Exception as exc:  # a payload that does not decode now never will
        return self.give_up(payload, describe_error(exc))
    try:
        results = analyse_crops(batch, self.models.for_settings(emotion_inference))
        store_face_results(self.engine, batch, results)
    except Exception as exc:
        if is_transient(exc):
            reason = self.retry_or_give_up(exc, f"crop batch of analysis {batch.analysis_id}")
        else:
            logger.exception("crop batch of analysis %d failed", batch.analysis_id)
            reason = describe_error(exc)
        return self.give_up(payload, reason, analysis_id=batch.analysis_id, crops=len(batch))
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
                              end: float | None, settings_overrides: dict[str, Any] | None = None) -> int:
    """Decode, detect, track and analyse one time segment of a recorded file; returns the frames sampled.

    The work is :func:`workers.segments.analyse_segment`. Transient errors are retried
    like a crop batch's; anything else marks the segment failed with its reason, which
    fails the analysis. A segment past the soft time limit is not retried: it would run
    out of time again.
    """
    if not isinstance(analysis_id, int) or isinstance(analysis_id, bool):
        logger.error("segment task without a readable analysis id (%r): dropped", analysis_id)
        return 0
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
            reason = self.retry_or_give_up(exc, f"segment {segment.index} of analysis {analysis_id}")
        else:
            if not isinstance(exc, ClassLensError):  # bad input needs its message, not a traceback
                logger.exception("segment %d of analysis %d failed", segment.index, analysis_id)
            reason = describe_error(exc)
    else:
        return outcome.frames
    record_segment_failure(self.engine, analysis_id, segment, reason)
    return 0
