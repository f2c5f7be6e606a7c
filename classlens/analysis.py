"""Analysis of a recorded lecture, end to end: decode → detect → track → crop → infer → store → report.

The orchestration of one recording: its frames go through the capture pipeline
(:mod:`pipeline.capture`), its crops to inference in this process or on the Celery workers
(:mod:`workers.dispatch`, :mod:`workers.celery_dispatch`), and a long file on a broker to the
workers in time segments (:mod:`workers.segment_dispatch`); it ends with the shared final
step (:mod:`pipeline.finalise`) and the reports (:mod:`reports.render`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, update
from sqlmodel import col, select

from kernel.accounts import owner_id_for
from kernel.consent import ConsentPolicy
from kernel.errors import BadInputError, ClassLensError
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    FrameSample,
    init_store,
    insert_ignoring_duplicates,
    session_scope,
    utcnow,
)
from pipeline.capture import CapturePipeline
from pipeline.finalise import failure_reason, finalise_students, mark_failed, rename_track_observations
from pipeline.gallery import gallery_splitter_for, recorded_layout, recording_name_source
from pipeline.liveness import ProducerHeartbeat, fail_abandoned_analyses
from pipeline.models import PipelineComponents
from vision.sources import RecordedFileSource, VideoInfo, prefetched
from workers.dispatch import CropDispatcher, InProcessDispatcher

if TYPE_CHECKING:
    from workers.segment_dispatch import SegmentDispatcher, SegmentProgress

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
    """Tracks that already count as students (the rule the report applies at the end)."""
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


def _open_store(settings: Settings) -> Engine:
    """The store, with analyses whose producer died marked failed (a re-run then starts clean)."""
    engine = init_store(settings.resolved_database_url)
    fail_abandoned_analyses(engine, settings.abandoned_after_seconds)
    return engine


def recording_consent(settings: Settings) -> ConsentPolicy:
    """Whose display names a recording may analyse: everyone but ``settings.recording_opt_out``."""
    return ConsentPolicy.opt_out(settings.recording_opt_out) if settings.recording_opt_out else ConsentPolicy.everyone()


def _create_analysis(engine: Engine, source: str, settings: Settings, title: str, *, decoding: str = "") -> int:
    consent = recording_consent(settings)
    with session_scope(engine) as session:
        owner_id = owner_id_for(session, settings.analysis_owner_email)
        analysis = Analysis(kind="recording", source=source, title=title, sample_fps=settings.sample_fps,
                            emotion_inference=settings.emotion_inference, decoding=decoding,
                            owner_id=owner_id, course=settings.analysis_course,
                            consent_mode=consent.mode, consent_names_json=consent.names_json())
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        return analysis.id


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
    :class:`~kernel.errors.BadInputError` after recording the analysis as failed;
    nothing derived from a failed analysis is left in the store or on disk.

    With a broker, a file longer than ``segment_seconds`` is analysed in time segments by
    the workers (:func:`submit_segmented_analysis`); ``components`` are then not needed.

    A gallery recording's participants are named by their tiles' labels
    (``settings.video_layout``, :mod:`pipeline.gallery`); the names on
    ``settings.recording_opt_out`` are never analysed, and the list is recorded on the analysis.
    """
    if settings.broker_url and isinstance(path, Path):
        segmented = submit_segmented_analysis(path, settings, out_dir=out_dir, title=title)
        if segmented is not None:
            return segmented.wait(progress)
    engine = _open_store(settings)
    name = path.name if isinstance(path, Path) else (title or "in-memory video")
    analysis_id = _create_analysis(engine, name if isinstance(path, io.BytesIO) else str(path), settings,
                                   title or name)
    heartbeat = ProducerHeartbeat(engine, analysis_id, settings.producer_heartbeat_seconds).start()
    dispatcher: CropDispatcher | None = None
    report_dir = (out_dir or settings.resolved_reports_dir / f"analysis-{analysis_id}").resolve()
    try:
        from reports.render import ReportOptions, check_report_folder, render_reports

        # Refuse an occupied report folder before spending time on the analysis.
        check_report_folder(report_dir, analysis_id)
        source = RecordedFileSource.configured(path, settings)
        info = source.probe()
        decoding = source.decoding_plan().reason
        state = AnalysisProgress(frames_expected=info.expected_samples(settings.sample_fps))
        if progress:
            progress(state)
        components = components or PipelineComponents.load(settings)
        components = replace(components, models=components.models.for_settings(settings.emotion_inference))
        with session_scope(engine) as session:
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            analysis.models_json = json.dumps(components.models.provenance, sort_keys=True)
            analysis.decoding = decoding

        def stored(count: int) -> None:
            state.crops_stored += count

        if settings.broker_url:
            from workers.celery_app import make_celery_app
            from workers.celery_dispatch import CeleryDispatcher

            dispatcher = CeleryDispatcher(
                make_celery_app(settings), engine, analysis_id, queue=settings.inference_queue,
                batch_size=settings.batch_size, timeout_seconds=settings.dispatch_timeout_seconds, on_stored=stored,
                emotion_inference=settings.emotion_inference,
                workers_unavailable_seconds=settings.workers_unavailable_seconds)
        else:
            dispatcher = InProcessDispatcher(components.models, engine, batch_size=settings.batch_size,
                                             on_stored=stored)
        gallery = gallery_splitter_for(settings, recording_consent(settings), components.embedder)
        pipeline = CapturePipeline.configured(components.detector, components.embedder, settings,
                                              analysis_id=analysis_id, gallery=gallery)
        samples: list[FrameSample] = []
        last_timestamp = 0.0
        for frame in prefetched(source):
            captured = pipeline.capture(frame)
            if captured.batch is not None:
                dispatcher.submit(captured.batch)
            samples.extend(captured.samples)
            state.frames_sampled += 1
            state.faces_found += captured.faces
            state.students_tracked = pipeline.students_so_far()
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
            insert_ignoring_duplicates(session, samples)
            students = finalise_students(session, analysis_id, pipeline.summaries(), settings,
                                         name_source_of=recording_name_source)
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            analysis.layout = recorded_layout(pipeline.summaries())
            analysis.frames_sampled = state.frames_sampled
            analysis.faces_detected = state.faces_found
            # The container's duration when it states one; otherwise the sampled span.
            analysis.duration_seconds = info.duration_seconds or last_timestamp + 1.0 / settings.sample_fps
            # Done before rendering so the report describes a finished analysis; a render
            # failure below still marks it failed and removes what was stored.
            analysis.status = AnalysisStatus.done
            analysis.finished_at = utcnow()
            analysis.report_path = str(report_dir)
        paths = render_reports(engine, analysis_id, report_dir, ReportOptions.from_settings(settings))
        return AnalysisOutcome(analysis_id, students, state.frames_sampled, state.faces_found, report_dir,
                               report_files=[paths.overview, *paths.students, paths.csv, paths.json])
    except BaseException as exc:
        mark_failed(engine, analysis_id, failure_reason(exc))
        raise
    finally:
        heartbeat.stop()
        if dispatcher is not None:
            dispatcher.close()


@dataclass
class SegmentedAnalysis:
    """A recorded file whose time segments were sent to the workers; :meth:`wait` stitches and reports it."""

    analysis_id: int
    """Id of the analysis in the store."""
    name: str
    """The file's name, for messages."""
    settings: Settings
    """The producer's settings."""
    engine: Engine
    """The store."""
    info: VideoInfo
    """What the container says about the video."""
    report_dir: Path
    """Where the reports go."""
    dispatcher: SegmentDispatcher
    """Follows the segment tasks."""
    heartbeat: ProducerHeartbeat
    """Stamps the analysis as alive until it is finished, failed or abandoned."""
    finished: bool = False
    """Whether the analysis was completed, failed or abandoned."""

    def wait(self, progress: ProgressCallback | None = None) -> AnalysisOutcome:
        """Wait for every segment, stitch ids across the boundaries, store the students and render the reports.

        Fails like :func:`analyze_recording`: a failed segment (named in the error), no
        progress for ``dispatch_timeout_seconds`` or an interruption marks the analysis
        failed and removes everything derived for it.
        """
        settings = self.settings
        state = AnalysisProgress(frames_expected=self.info.expected_samples(settings.sample_fps))
        try:
            from reports.render import ReportOptions, render_reports

            def update_state(segments: SegmentProgress) -> None:
                state.frames_sampled, state.faces_found = segments.frames, segments.faces
                state.crops_stored = segments.faces
                if progress:
                    progress(state)

            result = self.dispatcher.wait(update_state)
            if result.frames == 0:
                raise BadInputError(f"{self.name}: the video contains no frames that can be decoded")
            students, frames, last_timestamp = _finalise_segmented(self.engine, self.analysis_id, settings,
                                                                   self.info, result, self.report_dir)
            state.frames_sampled, state.students_tracked, state.class_time = frames, students, last_timestamp
            if progress:
                progress(state)
            paths = render_reports(self.engine, self.analysis_id, self.report_dir,
                                   ReportOptions.from_settings(settings))
            return AnalysisOutcome(self.analysis_id, students, frames, result.faces, self.report_dir,
                                   report_files=[paths.overview, *paths.students, paths.csv, paths.json])
        except BaseException as exc:
            mark_failed(self.engine, self.analysis_id, failure_reason(exc))
            raise
        finally:
            self.finished = True
            self.heartbeat.stop()

    def abandon(self, reason: str) -> None:
        """Give up without waiting: the analysis is marked failed, and workers drop its segments."""
        if not self.finished:
            self.finished = True
            self.heartbeat.stop()
            mark_failed(self.engine, self.analysis_id, reason)


def submit_segmented_analysis(
    path: Path,
    settings: Settings,
    *,
    out_dir: Path | None = None,
    title: str | None = None,
    single_segment: bool = False,
) -> SegmentedAnalysis | None:
    """Start analysing a recorded file in time segments on the Celery workers, when that applies.

    It applies with a broker, to a file whose duration is known and longer than
    ``segment_seconds``; with ``single_segment`` to shorter files too (a batch of videos
    then spreads over the workers, one task per video). Returns None otherwise, and for a
    file that cannot even be probed: :func:`analyze_recording` then takes the regular
    route, which records and reports the bad input. The workers read the file at
    ``path.resolve()``: it must be on a filesystem they share.
    """
    if not settings.broker_url:
        return None
    try:
        source = RecordedFileSource.configured(path, settings)
        info = source.probe()
        decoding = source.decoding_plan().reason
    except BadInputError:
        return None
    from workers.segments import plan_segments, segment_overrides

    segments = plan_segments(info.duration_seconds, settings.sample_fps, settings.segment_seconds)
    if not segments or (len(segments) == 1 and not single_segment):
        return None
    engine = _open_store(settings)
    analysis_id = _create_analysis(engine, str(path), settings, title or path.name, decoding=decoding)
    report_dir = (out_dir or settings.resolved_reports_dir / f"analysis-{analysis_id}").resolve()
    heartbeat = ProducerHeartbeat(engine, analysis_id, settings.producer_heartbeat_seconds).start()
    try:
        from reports.render import check_report_folder
        from workers.celery_app import make_celery_app
        from workers.segment_dispatch import SegmentDispatcher

        check_report_folder(report_dir, analysis_id)
        dispatcher = SegmentDispatcher(
            make_celery_app(settings), engine, analysis_id, path.resolve(), segments,
            queue=settings.inference_queue, overrides=segment_overrides(settings),
            timeout_seconds=settings.dispatch_timeout_seconds,
            workers_unavailable_seconds=settings.workers_unavailable_seconds)
        dispatcher.send()
    except BaseException as exc:
        heartbeat.stop()
        mark_failed(engine, analysis_id, failure_reason(exc))
        raise
    logger.info("analysis %d: %s sent to the workers as %d segments", analysis_id, path.name, len(segments))
    return SegmentedAnalysis(analysis_id, path.name, settings, engine, info, report_dir, dispatcher, heartbeat)


def _finalise_segmented(engine: Engine, analysis_id: int, settings: Settings, info: VideoInfo,
                        result: SegmentProgress, report_dir: Path) -> tuple[int, int, float]:
    """Stitch the segments' tracks, rewrite observation ids, create students; returns (students, frames, last time)."""
    from vision.stitching import stitch_segment_tracks
    from workers.segments import segment_tracks_for

    with session_scope(engine) as session:
        # A write first: it takes SQLite's write lock and PostgreSQL's row lock, so that no late
        # or duplicate segment delivery can store rows between reading tracks and rewriting ids.
        locked: Any = session.execute(update(Analysis).where(
            col(Analysis.id) == analysis_id, col(Analysis.status) == AnalysisStatus.running,
        ).values(status=AnalysisStatus.running))
        if locked.rowcount != 1:
            raise ClassLensError(f"analysis {analysis_id} stopped running while its segments were collected")
        stitched = stitch_segment_tracks(segment_tracks_for(session, analysis_id),
                                         max_gap_seconds=settings.track_max_gap_seconds)
        rename_track_observations(session, analysis_id, stitched.renamed)
        students = finalise_students(session, analysis_id, stitched.summaries, settings,
                                     name_source_of=recording_name_source)
        frames, last = session.exec(select(func.count(), func.max(FrameSample.timestamp)).where(
            col(FrameSample.analysis_id) == analysis_id)).one()
        last_timestamp = float(last or 0.0)
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None
        analysis.models_json = result.models_json or "{}"
        analysis.layout = recorded_layout(stitched.summaries)
        analysis.frames_sampled = int(frames)
        analysis.faces_detected = result.faces
        # The container's duration when it states one; otherwise the sampled span.
        analysis.duration_seconds = info.duration_seconds or last_timestamp + 1.0 / settings.sample_fps
        analysis.status = AnalysisStatus.done
        analysis.finished_at = utcnow()
        analysis.report_path = str(report_dir)
    return students, int(frames), last_timestamp
