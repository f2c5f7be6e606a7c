"""Analysis of a recorded lecture, end to end: decode → detect → track → crop → infer → store → report.

This module wires the apps together for one recording. The stages themselves live in
``bot`` (source, detection, tracking, crops), ``workers`` (inference, persistence,
dispatch) and ``reports``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete
from sqlmodel import Session

from bot.detection import FaceDetector
from bot.geometry import align_face, head_poses
from bot.sources import RecordedFileSource, prefetched
from bot.tracking import FaceEmbedder, StudentTracker, TrackSummary, is_student
from classlens.errors import BadInputError
from classlens.settings import Settings
from classlens.store import (
    Analysis,
    AnalysisStatus,
    FaceObservation,
    FrameSample,
    Student,
    delete_analysis_data,
    init_store,
    insert_ignoring_duplicates,
    session_scope,
    utcnow,
)
from classlens.types import CROP_SIZE, CropBatch, FrameDetections, VideoFrame
from model_export.cache import ModelCache, resolve_model
from workers.dispatch import CropDispatcher, InProcessDispatcher
from workers.inference import InferenceModels
from workers.runners import EmotionRunner, EngagementRunner

logger = logging.getLogger(__name__)


@dataclass
class AnalysisProgress:
    """Counters shown on the progress bar."""

    frames_expected: int | None = None
    """Samples the whole recording will yield, when its duration is known."""
    frames_sampled: int = 0
    """Frames sampled and run through detection so far."""
    faces_found: int = 0
    """Faces detected so far (all frames)."""
    students_tracked: int = 0
    """Tracks seen in at least two samples so far."""
    crops_stored: int = 0
    """Faces whose results are already in the store."""
    class_time: float = 0.0
    """Class time of the latest sampled frame, in seconds."""


ProgressCallback = Callable[[AnalysisProgress], None]


@dataclass
class AnalysisOutcome:
    """What ``analyze`` reports at the end."""

    analysis_id: int
    """Id of the analysis in the store."""
    students: int
    """Students found (tracks seen long enough)."""
    frames_sampled: int
    """Frames sampled."""
    faces_detected: int
    """Faces detected over all sampled frames."""
    report_dir: Path | None
    """Folder of the rendered reports."""
    report_files: list[Path] = field(default_factory=list)
    """Every file written for the reports."""


def model_cache_for(settings: Settings) -> ModelCache:
    """The model cache configured by the settings."""
    return ModelCache(settings.model_cache_dir, local_models_dir=settings.local_models_dir,
                      index_url=settings.package_index_url)


@dataclass
class PipelineComponents:
    """The loaded models of the capture and inference sides, loaded once per process."""

    detector: FaceDetector
    """Face detector."""
    embedder: FaceEmbedder | None
    """Optional face-embedding model for re-identification within a session."""
    models: InferenceModels
    """Emotion and engagement runners."""

    @classmethod
    def load(cls, settings: Settings) -> PipelineComponents:
        """Resolve, pull if needed, and load every configured model."""
        cache = model_cache_for(settings)
        common: dict[str, Any] = {"preference": settings.execution_provider,
                                  "intra_op_threads": settings.intra_op_threads}
        detector_model = resolve_model(cache, settings.detector)
        detector = FaceDetector(detector_model.path, input_size=settings.detector_input_size,
                                threshold=settings.detection_threshold,
                                min_face_pixels=settings.min_face_pixels, **common)
        provenance: dict[str, dict[str, object]] = {"detector": detector_model.provenance()}
        embedder = None
        if settings.recognizer:
            recognizer_model = resolve_model(cache, settings.recognizer)
            imagenet = bool(recognizer_model.spec and recognizer_model.spec.extra.get("input_mean") == "imagenet")
            embedder = FaceEmbedder(recognizer_model.path, imagenet_normalisation=imagenet, **common)
            provenance["recognizer"] = recognizer_model.provenance()
        emotion = None
        if settings.emotion_inference:
            emotion_model = resolve_model(cache, settings.emotion_model)
            emotion = EmotionRunner(emotion_model.path, **common)
            provenance["emotion"] = emotion_model.provenance()
        engagement_model = resolve_model(cache, settings.engagement_model)
        engagement = EngagementRunner(engagement_model.path, **common)
        provenance["engagement"] = engagement_model.provenance()
        return cls(detector, embedder, InferenceModels(engagement=engagement, emotion=emotion,
                                                       provenance=provenance))


def crop_batch_for(analysis_id: int, frame: VideoFrame, detections: FrameDetections) -> CropBatch:
    """Aligned crops, head pose and ids of every tracked face of one frame."""
    count = len(detections)
    crops = np.empty((count, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for index in range(count):
        crops[index] = align_face(frame.image, detections.keypoints[index])
    return CropBatch(
        analysis_id=analysis_id,
        streams=(frame.stream,) * count,
        track_ids=detections.track_ids,
        timestamps=np.full(count, frame.timestamp, np.float64),
        crops=crops,
        boxes=detections.boxes,
        detection_scores=detections.scores,
        head_pose=head_poses(detections.keypoints, detections.frame_size),
    )


def _create_analysis(engine: Engine, source: str, settings: Settings, title: str) -> int:
    with session_scope(engine) as session:
        analysis = Analysis(kind="recording", source=source, title=title, sample_fps=settings.sample_fps,
                            emotion_inference=settings.emotion_inference)
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        return analysis.id


def _mark_failed(engine: Engine, analysis_id: int, reason: str) -> None:
    """Remove everything half-written and record why the analysis failed."""
    with session_scope(engine) as session:
        delete_analysis_data(session, analysis_id)
        analysis = session.get(Analysis, analysis_id)
        if analysis is not None:
            analysis.status = AnalysisStatus.failed
            analysis.failure_reason = reason
            analysis.finished_at = utcnow()
            analysis.report_path = None


def _finalise_students(session: Session, analysis_id: int, summaries: list[TrackSummary],
                       settings: Settings) -> int:
    """Create Student rows for tracks seen long enough; drop observations of the rest."""
    interval = 1.0 / settings.sample_fps
    students = [s for s in summaries if is_student(s, min_seconds=settings.min_student_seconds,
                                                    sample_interval=interval, min_score=settings.min_student_score)]
    students.sort(key=lambda s: (s.first_seen, s.track_id))
    for number, summary in enumerate(students, start=1):
        session.add(Student(analysis_id=analysis_id, stream=summary.stream, track_id=summary.track_id,
                            label=f"Student {number}", first_seen=summary.first_seen,
                            last_seen=summary.last_seen, samples_visible=summary.samples))
    transient = [s.track_id for s in summaries if s not in students]
    if transient:
        session.execute(delete(FaceObservation).where(
            FaceObservation.analysis_id == analysis_id,  # type: ignore[arg-type]
            FaceObservation.track_id.in_(transient),  # type: ignore[attr-defined]
        ))
    return len(students)


def analyze_recording(
    path: Path | io.BytesIO,
    settings: Settings,
    *,
    out_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    components: PipelineComponents | None = None,
    title: str | None = None,
) -> AnalysisOutcome:
    """Analyse one recorded video and render its reports.

    Bad input (missing, unreadable, empty or corrupt video) raises
    :class:`~classlens.errors.BadInputError` after recording the analysis as failed;
    nothing derived from a failed analysis is left in the store or on disk.
    """
    engine = init_store(settings.resolved_database_url)
    name = path.name if isinstance(path, Path) else (title or "in-memory video")
    analysis_id = _create_analysis(engine, name if isinstance(path, io.BytesIO) else str(path), settings,
                                   title or name)
    dispatcher: CropDispatcher | None = None
    report_dir = (out_dir or settings.resolved_reports_dir / f"analysis-{analysis_id}").resolve()
    try:
        from reports.render import check_report_folder, render_reports

        # Refuse an occupied report folder before spending time on the analysis.
        check_report_folder(report_dir, analysis_id)
        source = RecordedFileSource(path, settings.sample_fps)
        info = source.probe()
        state = AnalysisProgress(frames_expected=info.expected_samples(settings.sample_fps))
        if progress:
            progress(state)
        components = components or PipelineComponents.load(settings)
        with session_scope(engine) as session:
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            analysis.models_json = json.dumps(components.models.provenance, sort_keys=True)

        def stored(count: int) -> None:
            state.crops_stored += count

        if settings.broker_url:
            from workers.celery_app import make_celery_app
            from workers.celery_dispatch import CeleryDispatcher

            dispatcher = CeleryDispatcher(
                make_celery_app(settings), engine, analysis_id, queue=settings.inference_queue,
                batch_size=settings.batch_size, timeout_seconds=settings.dispatch_timeout_seconds, on_stored=stored)
        else:
            dispatcher = InProcessDispatcher(components.models, engine, batch_size=settings.batch_size,
                                             on_stored=stored)
        tracker = StudentTracker(max_gap_seconds=settings.track_max_gap_seconds, embedder=components.embedder)
        samples: list[dict[str, Any]] = []
        last_timestamp = 0.0
        for frame in prefetched(source):
            detections = components.detector.detect(frame)
            detections = tracker.update(detections, frame.image)
            if len(detections):
                dispatcher.submit(crop_batch_for(analysis_id, frame, detections))
            samples.append({"analysis_id": analysis_id, "stream": frame.stream,
                            "timestamp": frame.timestamp, "faces": len(detections)})
            state.frames_sampled += 1
            state.faces_found += len(detections)
            state.students_tracked = sum(1 for s in tracker.summaries() if s.samples >= 2)
            state.class_time = frame.timestamp
            last_timestamp = frame.timestamp
            if progress:
                progress(state)
        if state.frames_sampled == 0:
            raise BadInputError(f"{name}: the video contains no frames that can be decoded")
        dispatcher.drain()
        if progress:
            progress(state)
        with session_scope(engine) as session:
            insert_ignoring_duplicates(session, FrameSample, samples)
            students = _finalise_students(session, analysis_id, tracker.summaries(), settings)
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            analysis.frames_sampled = state.frames_sampled
            analysis.faces_detected = state.faces_found
            # The container's duration when it states one; otherwise the sampled span.
            analysis.duration_seconds = info.duration_seconds or last_timestamp + 1.0 / settings.sample_fps
            # Done before rendering so the report describes a finished analysis; a render
            # failure below still marks it failed and removes what was stored.
            analysis.status = AnalysisStatus.done
            analysis.finished_at = utcnow()
            analysis.report_path = str(report_dir)
        paths = render_reports(engine, analysis_id, report_dir)
        return AnalysisOutcome(analysis_id, students, state.frames_sampled, state.faces_found, report_dir,
                               report_files=[paths.overview, *paths.students, paths.csv, paths.json])
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        _mark_failed(engine, analysis_id, reason.splitlines()[0])
        raise
    finally:
        if dispatcher is not None:
            dispatcher.close()
