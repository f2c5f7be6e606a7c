"""Recorded videos split into time segments that Celery workers analyse in parallel, ids stitched across.

The sampling and stitching tests need no service. The end-to-end tests start one real
worker (two prefork processes) on a queue of their own, with a store shared by the test
process and the workers (a SQLite file, then the test PostgreSQL), and compare the
segmented analysis with the local, unsegmented one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import redis
from sqlalchemy import func
from sqlmodel import Session, col, select

from classlens.analysis import AnalysisProgress, analyze_recording
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    FaceObservation,
    FrameSample,
    SegmentState,
    SegmentStatus,
    SegmentTrack,
    Student,
    delete_analysis_data,
    init_store,
    session_scope,
)
from kernel.types import ByteArray
from pipeline.models import PipelineComponents
from tests import media_factory
from tests.conftest import MEDIA_DIR, POSTGRES_URL
from tests.test_celery import BROKER_URL, Worker, _celery_worker, _in_flight, broker  # noqa: F401  (a fixture)
from vision.sources import RecordedFileSource
from vision.stitching import stitch_segment_tracks
from vision.synthetic import classroom_frames, demo_classroom_video
from workers.celery_app import make_celery_app
from workers.celery_dispatch import CeleryDispatchError
from workers.segments import SEGMENT_TRACK_STRIDE, plan_segments, segment_overrides

LECTURE = MEDIA_DIR / "WolfgangLanger_Pexels.mp4"


def _encode(path: Path, frames: list[ByteArray], fps: int, codec: str, options: dict[str, str]) -> Path:
    container_format = "matroska" if path.suffix == ".mkv" else None
    with av.open(str(path), mode="w", format=container_format) as container:
        stream: Any = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = options
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _small_classroom(seconds: float) -> list[ByteArray]:
    return [np.ascontiguousarray(f[:232, :320]) for f in classroom_frames(seconds=seconds, fps=25, size=(320, 240))]


def _samples(source: RecordedFileSource) -> list[tuple[float, bytes]]:
    return [(frame.timestamp, frame.image.tobytes()) for frame in source]


# -- (a) segments sample exactly what the whole video samples ---------------------------------------------


def _check_union(path: Path, fps: float, bounds: list[float]) -> None:
    whole = _samples(RecordedFileSource(path, fps))
    pieces: list[tuple[float, bytes]] = []
    sought = 0
    ends: list[float | None] = [*bounds[1:], None]
    for start, end in zip(bounds, ends, strict=True):
        source = RecordedFileSource(path, fps, start_seconds=start, end_seconds=end)
        part = _samples(source)
        assert all(start - 0.05 <= t and (end is None or t < end + 0.1) for t, _ in part), (start, end)
        pieces += part
        sought += source.seeked
    assert [t for t, _ in pieces] == [t for t, _ in whole]
    assert [image for _, image in pieces] == [image for _, image in whole]  # the very same pixels
    assert sought >= 1, "no segment seeked: every segment decoded from the beginning"


@pytest.mark.media
@pytest.mark.parametrize("fps", [1.0, 2.0, 3.0])
def test_segments_of_the_lecture_clip_sample_what_the_whole_clip_samples(fps: float) -> None:
    # Boundaries on and off the keyframes (every 3.003 s) and off the sampling grid.
    _check_union(LECTURE, fps, [0.0, 3.003, 5.0, 9.4, 15.0])


@pytest.mark.parametrize(("name", "codec", "options"), [
    ("bframes.mp4", "libx264", {"preset": "veryfast", "g": "50", "bf": "3"}),
    ("open-gop.mp4", "libx264", {"preset": "veryfast", "x264-params": "keyint=50:bframes=3:open-gop=1"}),
    ("intra.mkv", "mjpeg", {}),
])
def test_segments_of_generated_videos_sample_what_the_whole_video_samples(
    tmp_path: Path, name: str, codec: str, options: dict[str, str]
) -> None:
    path = _encode(tmp_path / name, _small_classroom(8.0), 25, codec, options)
    for fps in (1.0, 7.0):
        _check_union(path, fps, [0.0, 2.0, 4.9, 6.0])


def test_a_container_without_an_index_falls_back_to_decoding_from_the_start(tmp_path: Path) -> None:
    """MPEG-TS seeks land anywhere: the segment notices and decodes from the beginning instead."""
    path = tmp_path / "stream.ts"
    with av.open(str(path), mode="w", format="mpegts") as container:
        stream: Any = container.add_stream("libx264", rate=25)
        frames = _small_classroom(6.0)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"preset": "veryfast", "g": "60"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    whole = _samples(RecordedFileSource(path, 2.0))
    parts = [_samples(RecordedFileSource(path, 2.0, start_seconds=a, end_seconds=b))
             for a, b in [(0.0, 2.0), (2.0, 4.0), (4.0, None)]]
    assert [s for part in parts for s in part] == whole


def test_segment_plans_follow_the_sampling_grid() -> None:
    plan = plan_segments(19.69, 1.0, 5.0)
    assert [(s.index, s.start_seconds, s.end_seconds) for s in plan] == [
        (0, 0.0, 5.0), (1, 5.0, 10.0), (2, 10.0, 15.0), (3, 15.0, None)]
    assert plan[2].describe(4) == "segment 3 of 4 (0:10–0:15)"
    assert plan[3].first_track_id == 3 * SEGMENT_TRACK_STRIDE + 1
    # A short remainder joins the last segment; an unknown duration gives no plan.
    assert [(s.start_seconds, s.end_seconds) for s in plan_segments(3601.0, 1.0, 300.0)][-1] == (3300.0, None)
    assert len(plan_segments(3601.0, 1.0, 300.0)) == 12
    assert len(plan_segments(299.0, 1.0, 300.0)) == 1
    assert plan_segments(0.0, 1.0, 300.0) == []
    # At 3 samples a second, 5 s segments start on instants 15, 30 … exactly.
    assert [s.start_seconds * 3 for s in plan_segments(12.0, 3.0, 5.0)] == [0.0, 15.0, 30.0]


# -- (d) stitching ids across boundaries ------------------------------------------------------------------


def _track(segment: int, local: int, first: float, last: float, first_box: tuple[float, float],
           last_box: tuple[float, float] | None = None, samples: int | None = None, size: float = 60.0) -> SegmentTrack:
    fx, fy = first_box
    lx, ly = last_box or first_box
    return SegmentTrack(
        analysis_id=1, segment_index=segment, track_id=segment * SEGMENT_TRACK_STRIDE + local,
        first_seen=first, last_seen=last, samples=samples or int(last - first) + 1, score_total=0.9 * (samples or 1),
        first_x1=fx, first_y1=fy, first_x2=fx + size, first_y2=fy + size,
        last_x1=lx, last_y1=ly, last_x2=lx + size, last_y2=ly + size)


def test_stitching_joins_students_across_boundaries_by_position() -> None:
    # Segments [0, 10) and [10, 20) at 1 fps. Two students walk past each other: at the
    # boundary A (moving right) is at x=180 and B (moving left) at x=260; the later
    # segment lists them in the other order, so only their positions can pair them.
    a0 = _track(0, 1, 0.0, 9.0, (20.0, 100.0), (180.0, 100.0))
    b0 = _track(0, 2, 0.0, 9.0, (420.0, 100.0), (260.0, 100.0))
    b1 = _track(1, 1, 10.0, 19.0, (245.0, 100.0), (100.0, 100.0))
    a1 = _track(1, 2, 10.0, 19.0, (195.0, 100.0), (330.0, 100.0))
    # C leaves exactly at the boundary (last seen in the last sample before it); D arrives
    # right after it at another place: a different person, a different id.
    c0 = _track(0, 3, 2.0, 9.0, (600.0, 300.0))
    d1 = _track(1, 3, 10.0, 19.0, (20.0, 300.0))
    # E is hidden from 8 s to 14 s, across the boundary: within the max gap, back in place.
    e0 = _track(0, 4, 0.0, 7.0, (400.0, 400.0))
    e1 = _track(1, 4, 14.0, 19.0, (404.0, 402.0))
    # F, absent for 40 s (longer than the max gap), comes back in segment 5 as a new track.
    f0 = _track(0, 5, 0.0, 9.0, (800.0, 100.0))
    f5 = _track(5, 1, 50.0, 55.0, (800.0, 100.0))
    # G stays through segments 1, 2 and 3 (a chain over two boundaries).
    g1 = _track(1, 5, 12.0, 19.0, (700.0, 500.0))
    g2 = _track(2, 1, 20.0, 29.0, (702.0, 500.0))
    g3 = _track(3, 1, 30.0, 31.0, (703.0, 501.0))

    stitched = stitch_segment_tracks([b1, a1, d1, e1, g1, a0, b0, c0, e0, f0, g2, g3, f5], max_gap_seconds=30.0)

    c = stitched.canonical
    assert c[a1.track_id] == a0.track_id and c[b1.track_id] == b0.track_id
    assert c[c0.track_id] == c0.track_id and c[d1.track_id] == d1.track_id
    assert c[e1.track_id] == e0.track_id
    assert c[f5.track_id] == f5.track_id
    assert c[g2.track_id] == c[g3.track_id] == g1.track_id
    assert set(stitched.renamed) == {a1.track_id, b1.track_id, e1.track_id, g2.track_id, g3.track_id}
    summaries = {s.track_id: s for s in stitched.summaries}
    assert len(summaries) == 13 - 5
    a = summaries[a0.track_id]
    assert (a.first_seen, a.last_seen, a.samples) == (0.0, 19.0, a0.samples + a1.samples)
    assert a.score_total == pytest.approx(a0.score_total + a1.score_total)
    g = summaries[g1.track_id]
    assert (g.first_seen, g.last_seen, g.samples) == (12.0, 31.0, g1.samples + g2.samples + g3.samples)


def test_stitching_prefers_the_earliest_arrival_like_the_tracker() -> None:
    """A student who left at the boundary continues with the first face to appear in their place."""
    left = _track(0, 1, 0.0, 9.0, (100.0, 100.0))
    first_back = _track(1, 1, 12.0, 13.0, (104.0, 100.0))
    later_same_place = _track(1, 2, 16.0, 19.0, (100.0, 100.0))
    stitched = stitch_segment_tracks([left, first_back, later_same_place], max_gap_seconds=30.0)
    assert stitched.canonical[first_back.track_id] == left.track_id
    assert stitched.canonical[later_same_place.track_id] == later_same_place.track_id


# -- (b), (c): real workers ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SegmentWorkers:
    """One worker (two processes) on a queue of its own, and the store it shares with the test."""

    settings: Settings
    worker: Worker
    root: Path

    def local(self, **overrides: Any) -> Settings:
        """The same configuration without a broker: the local, unsegmented mode."""
        return self.settings.model_copy(update={"broker_url": None, **overrides})


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def segment_workers(request: pytest.FixtureRequest, broker: redis.Redis,  # noqa: F811  (imported fixture)
                    default_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SegmentWorkers]:
    """Workers and a store of each kind; every test below runs against both."""
    root = tmp_path_factory.mktemp("segments")
    url = POSTGRES_URL if request.param == "postgres" else f"sqlite:///{root / 'store.sqlite3'}"
    settings = Settings(broker_url=BROKER_URL, database_url=url, data_dir=root / "data",
                        model_cache_dir=default_models, execution_provider="cpu", intra_op_threads=1,
                        inference_queue=f"test-{uuid.uuid4().hex[:10]}", segment_seconds=5.0)
    engine = init_store(url)
    with Session(engine) as session:
        before = int(session.exec(select(func.max(Analysis.id))).one() or 0)
    worker = _celery_worker(settings, root / "worker.log", concurrency=2)
    try:
        worker.wait_ready()
        yield SegmentWorkers(settings, worker, root)
    finally:
        worker.stop()
        broker.delete(settings.inference_queue)
        # The PostgreSQL database is shared with other tests: take away what these created.
        with session_scope(engine) as session:
            created = session.exec(select(Analysis.id).where(col(Analysis.id) > before)).all()
            for analysis_id in created:
                if analysis_id is not None:
                    delete_analysis_data(session, analysis_id, keep_analysis=False)
        engine.dispose()


@pytest.fixture(scope="module")
def single_thread_components(default_models: Path) -> PipelineComponents:
    """The local mode's models with the workers' thread count, so both compute the very same numbers."""
    return PipelineComponents.load(Settings(model_cache_dir=default_models, execution_provider="cpu",
                                            intra_op_threads=1))


def _classroom_file(path: Path) -> Path:
    """The demo classroom as a file: a pan, a student arriving at 0:03, one hidden from 0:06 to 0:08."""
    return media_factory.write(path, demo_classroom_video())


_FLOATS = [name for name, field in FaceObservation.model_fields.items()
           if field.annotation in (float, float | None) and name != "timestamp"]


def _by_student(engine: Any, analysis_id: int) -> tuple[list[tuple[Any, ...]], dict[tuple[str, float], FaceObservation],
                                                        list[tuple[float, int]], set[int]]:
    with Session(engine) as session:
        students = list(session.exec(select(Student).where(col(Student.analysis_id) == analysis_id)))
        labels = {s.track_id: s.label for s in students}
        observations = list(session.exec(select(FaceObservation).where(
            col(FaceObservation.analysis_id) == analysis_id)))
        samples = list(session.exec(select(FrameSample).where(col(FrameSample.analysis_id) == analysis_id)
                                    .order_by(col(FrameSample.timestamp))))
    return (sorted((s.label, s.first_seen, s.last_seen, s.samples_visible) for s in students),
            {(labels[o.track_id], o.timestamp): o for o in observations},
            [(s.timestamp, s.faces) for s in samples],
            {o.track_id for o in observations})


@pytest.mark.redis
@pytest.mark.parametrize(("video", "segment_seconds", "segments", "students"), [
    # One person for 19.7 s: present across every boundary.
    pytest.param("lecture", 5.0, 4, 1, marks=pytest.mark.media),
    # Boundaries at 0:03 (a student arrives exactly there) and 0:06 (inside an occlusion
    # from 0:06 to 0:08: the hidden student is last seen at 0:05 and back at 0:08).
    pytest.param("classroom", 3.0, 4, 7),
])
def test_segmented_analysis_matches_the_local_mode(
    segment_workers: SegmentWorkers, single_thread_components: PipelineComponents, tmp_path: Path,
    video: str, segment_seconds: float, segments: int, students: int,
) -> None:
    path = LECTURE if video == "lecture" else _classroom_file(tmp_path / "classroom.mp4")
    settings = segment_workers.settings.model_copy(update={"segment_seconds": segment_seconds})
    local = analyze_recording(path, segment_workers.local(), out_dir=tmp_path / "local",
                              components=single_thread_components)

    plan = plan_segments(RecordedFileSource(path, 1.0).probe().duration_seconds, 1.0, settings.segment_seconds)
    assert len(plan) == segments
    progress: list[AnalysisProgress] = []
    remote = analyze_recording(path, settings, out_dir=tmp_path / "remote",
                               progress=lambda p: progress.append(dataclasses.replace(p)))

    assert local.students == remote.students == students
    assert remote.frames_sampled == local.frames_sampled and remote.faces_detected == local.faces_detected
    engine = init_store(settings.resolved_database_url)
    local_students, local_rows, local_samples, local_ids = _by_student(engine, local.analysis_id)
    remote_students, remote_rows, remote_samples, remote_ids = _by_student(engine, remote.analysis_id)
    assert remote_students == local_students
    assert remote_samples == local_samples
    # One id per student; those of segment 0 are the unsegmented run's.
    assert len(remote_ids) == students
    assert {i for i in remote_ids if i < SEGMENT_TRACK_STRIDE} <= local_ids
    assert remote_rows.keys() == local_rows.keys()
    for key, row in remote_rows.items():
        for column in _FLOATS:
            mine, theirs = getattr(row, column), getattr(local_rows[key], column)
            assert (mine is None) == (theirs is None), (key, column)
            if mine is not None:
                assert mine == pytest.approx(theirs, abs=1e-5), (key, column)
    with Session(engine) as session:
        analysis = session.get(Analysis, remote.analysis_id)
        statuses = list(session.exec(select(SegmentStatus).where(
            col(SegmentStatus.analysis_id) == remote.analysis_id)))
    assert analysis is not None and analysis.status == "done"
    assert json.loads(analysis.models_json)["detector"]["name"] == "retinaface-mnet025"
    assert analysis.duration_seconds == pytest.approx(local.frames_sampled, abs=1.0)
    assert [s.status for s in statuses] == [SegmentState.done] * segments
    assert sum(s.frames for s in statuses) == local.frames_sampled
    assert progress and progress[-1].frames_sampled == local.frames_sampled
    assert progress[-1].students_tracked == students
    assert (tmp_path / "remote" / "index.html").is_file()


@pytest.mark.redis
def test_a_redelivered_segment_changes_nothing(
    segment_workers: SegmentWorkers, tmp_path: Path, broker: redis.Redis,  # noqa: F811
) -> None:
    """Every segment delivered twice (as after a worker crash with late acks): stored once, ids stitched once."""
    path = _classroom_file(tmp_path / "classroom.mp4")
    settings = segment_workers.settings.model_copy(update={"segment_seconds": 3.0})
    from workers.segment_dispatch import SegmentDispatcher

    original = SegmentDispatcher.send

    def send_twice(self: SegmentDispatcher) -> None:
        original(self)
        original(self)

    SegmentDispatcher.send = send_twice  # type: ignore[method-assign]
    try:
        twice = analyze_recording(path, settings, out_dir=tmp_path / "twice")
    finally:
        SegmentDispatcher.send = original  # type: ignore[method-assign]
    _wait_until_idle(broker, settings.inference_queue, segment_workers.worker)
    engine = init_store(settings.resolved_database_url)
    with Session(engine) as session:
        keys = [(o.track_id, o.timestamp) for o in session.exec(select(FaceObservation).where(
            col(FaceObservation.analysis_id) == twice.analysis_id))]
        samples = session.exec(select(func.count()).select_from(FrameSample).where(
            col(FrameSample.analysis_id) == twice.analysis_id)).one()
        student_ids = {s.track_id for s in session.exec(select(Student).where(
            col(Student.analysis_id) == twice.analysis_id))}
    assert twice.students == len(student_ids) == 7
    assert len(keys) == len(set(keys)) and samples == twice.frames_sampled == 12
    # Duplicates that finished after the ids were stitched wrote nothing under segment-local ids.
    assert {track_id for track_id, _ in keys} == student_ids


def _wait_until_idle(client: redis.Redis, queue: str, worker: Worker, timeout: float = 60.0) -> None:
    """Until no message of ``queue`` waits or is being processed."""
    deadline = time.monotonic() + timeout
    while client.llen(queue) or _in_flight(client, queue):
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.redis
@pytest.mark.media
def test_a_failing_segment_fails_the_analysis_and_leaves_nothing(
    segment_workers: SegmentWorkers, tmp_path: Path, broker: redis.Redis,  # noqa: F811
) -> None:
    # Noise over 600 kB from 60 % of the file: the segments from 0:10 on cannot be decoded.
    broken = media_factory.with_garbage(LECTURE, tmp_path / "broken.mp4", 0.6, 600_000)
    settings = segment_workers.settings
    with pytest.raises(CeleryDispatchError, match=r"^segment [34] of 4 \(0:1[05]–(0:15|end)\) failed on a worker: "
                                                  r"BadInputError: .*broken\.mp4: the video is corrupt"):
        analyze_recording(broken, settings, out_dir=tmp_path / "report")
    # The other segments may still be running: let them finish, then look.
    _wait_until_idle(broker, settings.inference_queue, segment_workers.worker)
    engine = init_store(settings.resolved_database_url)
    with Session(engine) as session:
        analysis = session.exec(select(Analysis).where(col(Analysis.source) == str(broken))).one()
        assert analysis.status == "failed"
        assert analysis.failure_reason is not None and "of 4 (0:1" in analysis.failure_reason
        for model in (FaceObservation, FrameSample, Student, SegmentTrack, SegmentStatus):
            count = session.exec(select(func.count()).select_from(model).where(
                col(model.analysis_id) == analysis.id)).one()  # type: ignore[attr-defined]
            assert count == 0, model.__name__
    assert not (tmp_path / "report").exists()


@pytest.mark.redis
def test_a_batch_of_videos_is_spread_over_the_workers(segment_workers: SegmentWorkers, tmp_path: Path) -> None:
    """`classlens analyze a.mp4 b.mp4 --broker`: every video goes to the workers as segments before any is awaited."""
    classroom = _classroom_file(tmp_path / "classroom.mp4")
    group = media_factory.group_photo_video(tmp_path / "group.mp4", seconds=4, fps=5)
    settings = segment_workers.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSLENS_") or k.startswith("CLASSLENS_TEST_")}
    env.update({"CLASSLENS_MODEL_CACHE_DIR": str(settings.model_cache_dir), "CLASSLENS_DATA_DIR": str(tmp_path),
                "CLASSLENS_INFERENCE_QUEUE": settings.inference_queue, "CLASSLENS_SEGMENT_SECONDS": "5",
                "CLASSLENS_EXECUTION_PROVIDER": "cpu"})
    run = subprocess.run([sys.executable, "-m", "classlens", "analyze", str(classroom), str(group),
                          "--broker", BROKER_URL, "--db", settings.resolved_database_url, "--no-emotion",
                          "--out", str(tmp_path / "reports"), "--quiet"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr + segment_workers.worker.log_text()[-2000:]
    assert "7 students" in run.stderr and "6 students" in run.stderr
    engine = init_store(settings.resolved_database_url)
    with Session(engine) as session:
        for video, count in ((classroom, 3), (group, 1)):
            analysis = session.exec(select(Analysis).where(col(Analysis.source) == str(video))).one()
            statuses = session.exec(select(SegmentStatus).where(col(SegmentStatus.analysis_id) == analysis.id)).all()
            assert len(statuses) == count, video  # the short one too: one task per video spreads the batch
            # --no-emotion reaches the workers, whose own configuration has emotion on.
            assert "emotion" not in json.loads(analysis.models_json)
            emotions = session.exec(select(func.count()).select_from(FaceObservation).where(
                col(FaceObservation.analysis_id) == analysis.id,
                col(FaceObservation.emotion_happy).is_not(None))).one()
            assert emotions == 0
    assert (tmp_path / "reports" / "classroom" / "index.html").is_file()
    assert (tmp_path / "reports" / "group" / "index.html").is_file()


def test_segment_tasks_carry_the_producers_capture_settings() -> None:
    settings = Settings(sample_fps=2.0, detection_threshold=0.6, track_max_gap_seconds=12.0)
    overrides = segment_overrides(settings)
    assert overrides["sample_fps"] == 2.0 and overrides["track_max_gap_seconds"] == 12.0
    from workers.segments import segment_settings

    worker = Settings(batch_size=7, execution_provider="cpu")
    applied = segment_settings(worker, overrides)
    # Sampling, detection and tracking are the producer's; batching and providers the worker's.
    assert applied.detection_threshold == 0.6 and applied.batch_size == 7 and applied.execution_provider == "cpu"
    with pytest.raises(ValueError, match="cannot override database_url"):
        segment_settings(worker, {"database_url": "sqlite://"})
    with pytest.raises(ValueError, match="sample_fps"):
        segment_settings(worker, {"sample_fps": -1})


def test_a_worker_that_cannot_see_the_file_says_it_needs_a_shared_filesystem(tmp_path: Path) -> None:
    from workers.segment_dispatch import SegmentDispatcher
    from workers.segments import Segment

    settings = Settings(broker_url="redis://127.0.0.1:6379/15", database_url=f"sqlite:///{tmp_path}/s.db")
    segments = plan_segments(600.0, 1.0, 300.0)
    dispatcher = SegmentDispatcher(make_celery_app(settings),
                                   init_store(settings.resolved_database_url), 1, tmp_path / "lecture.mp4", segments,
                                   queue="cpu", overrides={}, timeout_seconds=10)
    row = SegmentStatus(analysis_id=1, segment_index=1, start_seconds=300.0, end_seconds=None,
                        status=SegmentState.failed, reason=f"BadInputError: {tmp_path}/lecture.mp4: no such file")
    error = dispatcher._failure_error(row)
    assert str(error).startswith("segment 2 of 2 (5:00–end) failed on a worker: BadInputError: ")
    assert "a filesystem they share at the same path" in str(error)
    assert Segment(3, 3600.0, 3900.0).describe() == "segment 4 (1:00:00–1:05:00)"


@pytest.mark.redis
def test_segments_nobody_takes_time_out_and_an_abandoned_analysis_is_dropped(
    broker: redis.Redis, tmp_path: Path, default_models: Path,  # noqa: F811
) -> None:
    from classlens.analysis import submit_segmented_analysis

    queue = f"test-{uuid.uuid4().hex[:10]}"
    settings = Settings(broker_url=BROKER_URL, database_url=f"sqlite:///{tmp_path / 's.sqlite3'}",
                        data_dir=tmp_path, model_cache_dir=default_models, inference_queue=queue, segment_seconds=3.0)
    video = _classroom_file(tmp_path / "classroom.mp4")
    engine = init_store(settings.resolved_database_url)
    try:
        # No worker listens on this queue: the wait gives up after the no-progress timeout, saying where it waited.
        handle = submit_segmented_analysis(video, settings)
        assert handle is not None and broker.llen(queue) == 4
        handle.dispatcher.timeout_seconds, handle.dispatcher.poll_interval_seconds = 1.0, 0.1
        with pytest.raises(CeleryDispatchError, match=rf"^no progress from the workers for 1 s: are workers running "
                                                     rf"on queue '{queue}'\? .*\(0 of 4 video segments done"):
            handle.wait()
        # Sent, then given up on (Ctrl-C in a batch): failed, its rows gone; a worker would skip its segments.
        abandoned = submit_segmented_analysis(video, settings)
        assert abandoned is not None
        abandoned.abandon("interrupted before this video's results were collected")
        with Session(engine) as session:
            for analysis_id in (handle.analysis_id, abandoned.analysis_id):
                analysis = session.get(Analysis, analysis_id)
                assert analysis is not None and analysis.status == "failed"
                assert session.exec(select(func.count()).select_from(SegmentStatus).where(
                    col(SegmentStatus.analysis_id) == analysis_id)).one() == 0
            timed_out = session.get(Analysis, handle.analysis_id)
            assert timed_out is not None and (timed_out.failure_reason or "").startswith("no progress")
    finally:
        broker.delete(queue)
