"""The live analysis pipeline: participants' tracks in, students labelled by display name out."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from sqlmodel import select

from bot.live import LiveSession, ReplayVideoTrack, create_live_analysis, decode_video_frames
from kernel.consent import ConsentPolicy, normalise_name
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    ConsentMode,
    FaceObservation,
    FrameSample,
    StreamGap,
    StreamStats,
    Student,
    init_store,
    session_scope,
)
from kernel.types import FrameDetections, VideoFrame
from pipeline.models import PipelineComponents
from tests.conftest import MEDIA_DIR
from vision.detection import FaceDetector


def test_consent_names_match_regardless_of_case_and_spacing() -> None:
    assert normalise_name("  Ada   LOVELACE ") == "ada lovelace"
    opt_out = ConsentPolicy.opt_out(["Ada Lovelace"])
    assert not opt_out.allows("ada  lovelace")
    assert opt_out.allows("Grace Hopper")
    opt_in = ConsentPolicy.opt_in(["Grace Hopper"])
    assert opt_in.allows(" grace hopper") and not opt_in.allows("Ada Lovelace")
    assert ConsentPolicy.everyone().allows("anyone")
    stored = ConsentPolicy.from_store(ConsentMode.opt_in, opt_in.names_json())
    assert stored == opt_in
    with pytest.raises(ValueError, match="JSON list"):
        ConsentPolicy.from_store("opt_out", '{"Ada": 1}')


class CountingTrack(ReplayVideoTrack):
    """A replayed camera that counts how often it was read (an excluded one must never be)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    async def recv(self) -> av.VideoFrame:
        self.reads += 1
        return await super().recv()


class SlowDetector(FaceDetector):
    """The real detector, made slow, to push a session behind real time."""

    def __init__(self, inner: FaceDetector, delay: float) -> None:
        self.__dict__.update(inner.__dict__)
        self._delay = delay

    def detect(self, frame: VideoFrame, long_side: int | None = None) -> FrameDetections:
        import time

        time.sleep(self._delay)
        return super().detect(frame, long_side)


def _settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp / "data", "sample_fps": 2.0, "min_student_seconds": 1.0,
                              "execution_provider": "cpu", "batch_size": 8}
    values.update(overrides)
    return Settings(**values)


def _rows(engine: Any, analysis_id: int) -> dict[str, Any]:
    with session_scope(engine) as session:
        return {
            "analysis": session.get(Analysis, analysis_id),
            "students": list(session.exec(select(Student).where(Student.analysis_id == analysis_id))),
            "observations": list(session.exec(select(FaceObservation).where(
                FaceObservation.analysis_id == analysis_id))),
            "samples": list(session.exec(select(FrameSample).where(FrameSample.analysis_id == analysis_id))),
            "stats": {s.stream: s for s in session.exec(select(StreamStats).where(
                StreamStats.analysis_id == analysis_id))},
            "gaps": list(session.exec(select(StreamGap).where(StreamGap.analysis_id == analysis_id))),
        }


@pytest.fixture(scope="module")
def single_face_frames() -> list[av.VideoFrame]:
    """Two and a half seconds of one person's camera, decoded once."""
    return decode_video_frames(MEDIA_DIR / "single_face.mp4", limit=72)


@pytest.mark.media
async def test_participants_become_students_named_by_display_name(
    isolated_env: Path, components: PipelineComponents, single_face_frames: list[av.VideoFrame],
) -> None:
    settings = _settings(isolated_env)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="janus://room/1234", title="Physics", owner_id=None,
                                       course="PHY1", host_email="t@example.org",
                                       consent=ConsentPolicy.opt_out(["Eve Example"]))
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    lecture = decode_video_frames(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", limit=96)
    ada = ReplayVideoTrack(single_face_frames, 15, seconds=4.0)
    bob = ReplayVideoTrack(lecture, 15, seconds=4.0)
    eve = CountingTrack(single_face_frames, 15, seconds=4.0)
    assert session.add_participant("p1", "Ada", ada)
    assert session.add_participant("p2", "Bob", bob)
    assert not session.add_participant("p3", "  eve EXAMPLE", eve)
    await asyncio.sleep(4.5)  # both tracks end on their own after 4 s
    live = session.stats
    assert live.excluded == 1
    assert {p.display_name for p in live.participants.values()} == {"Ada", "Bob"}
    session.record_gap(1.0, 1.5, "reconnecting to the meeting server")
    outcome = await session.aclose()
    assert await session.aclose() == outcome  # idempotent

    assert outcome.status is AnalysisStatus.done
    assert outcome.students == 2 and outcome.frames_dropped == 0
    rows = _rows(engine, analysis_id)
    analysis = rows["analysis"]
    assert analysis.kind == "meeting" and analysis.status is AnalysisStatus.done
    assert analysis.consent_mode is ConsentMode.opt_out and json.loads(analysis.consent_names_json) == ["Eve Example"]
    # The class ends at its last frame: 4 s of video at 15 fps, the last one 1/15 s before the end.
    assert 3.5 <= analysis.duration_seconds <= 4.5
    assert sorted(s.label for s in rows["students"]) == ["Ada", "Bob"]
    # Every crop dispatched is accounted for: one observation per face of a kept student.
    assert {o.stream for o in rows["observations"]} == {"Ada", "Bob"}
    assert len(rows["observations"]) == sum(s.samples_visible for s in rows["students"])
    # 4 s at 2 fps per participant: 8 samples each, on one shared class clock.
    for stream in ("Ada", "Bob"):
        stats = rows["stats"][stream]
        assert stats.frames_received == 60
        assert stats.frames_sampled == len([s for s in rows["samples"] if s.stream == stream])
        assert 7 <= stats.frames_sampled <= 9
        assert stats.frames_dropped == 0
        assert stats.left_reason == "the track ended"
    assert "Eve Example" not in rows["stats"] and eve.reads == 0  # never subscribed, never read
    assert [(g.start_time, g.end_time, g.stream) for g in rows["gaps"]] == [(1.0, 1.5, None)]
    assert live.latency_percentile(50) is not None


@pytest.mark.media
async def test_faces_on_a_shared_camera_are_students_of_that_feed(
    isolated_env: Path, components: PipelineComponents, insightface_images: Path,
) -> None:
    import cv2

    settings = _settings(isolated_env)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="whip", title="Group", owner_id=None, course="",
                                       host_email=None, consent=ConsentPolicy.opt_in(["Room 4"]))
    image = cv2.imread(str(insightface_images / "t1.jpg"))
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv420p")
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    assert session.add_participant("cam", "Room 4", ReplayVideoTrack([frame], 5, seconds=3.0))
    assert not session.add_participant("other", "Somebody Else", ReplayVideoTrack([frame], 5, seconds=3.0))
    await asyncio.sleep(3.3)
    outcome = await session.aclose()
    students = _rows(engine, analysis_id)["students"]
    assert outcome.students == len(students) >= 5
    labels = sorted(s.label for s in students)
    assert labels[0] == "Room 4"
    assert labels[1:] == sorted(f"Room 4 ({n})" for n in range(2, len(students) + 1))
    assert {s.stream for s in students} == {"Room 4"}


@pytest.mark.media
async def test_a_session_that_falls_behind_drops_frames_and_counts_them(
    isolated_env: Path, components: PipelineComponents, single_face_frames: list[av.VideoFrame],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _settings(isolated_env, sample_fps=10.0, live_queue_frames=1, live_worker_threads=1,
                         live_behind_seconds=0.2)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="test", title="Overloaded", owner_id=None,
                                       course="", host_email=None, consent=ConsentPolicy.everyone())
    slow = PipelineComponents(SlowDetector(components.detector, 0.3), components.embedder, components.models)
    session = LiveSession(settings, engine, analysis_id, components=slow)
    await session.start()
    track = ReplayVideoTrack(single_face_frames, 20, seconds=3.0)
    with caplog.at_level(logging.WARNING, logger="bot.live"):
        assert session.add_participant("p1", "Ada", track)
        # Waits on the session's own counters, not on the clock: a loaded machine only makes them slower.
        deadline = time.monotonic() + 30
        while session.stats.participants["p1"].frames_dropped == 0:  # visible while the class runs
            assert time.monotonic() < deadline, "no frame was dropped although the detector is far too slow"
            await asyncio.sleep(0.05)
        assert session.seconds_since_last_frame("p1") is not None
        assert session.seconds_since_last_frame("nobody") is None
        while (ada := session.stats.participants.get("p1")) is not None and ada.active:  # ends after 60 frames
            assert time.monotonic() < deadline + 30, "the replayed track did not end"
            await asyncio.sleep(0.05)
        outcome = await session.aclose()
    stats = _rows(engine, analysis_id)["stats"]["Ada"]
    assert outcome.frames_dropped == stats.frames_dropped > 0
    assert stats.frames_received == 60
    # Every due frame was either analysed or dropped (3 s at 10 fps: about 30 due).
    assert 28 <= stats.frames_sampled + stats.frames_dropped <= 31
    assert any("behind real time" in r.getMessage() for r in caplog.records)


@pytest.mark.media
async def test_a_failed_session_records_why_and_keeps_nothing(
    isolated_env: Path, components: PipelineComponents, single_face_frames: list[av.VideoFrame],
) -> None:
    settings = _settings(isolated_env)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="test", title="Broken", owner_id=None,
                                       course="", host_email=None, consent=ConsentPolicy.everyone())
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    session.add_participant("p1", "Ada", ReplayVideoTrack(single_face_frames, 15, seconds=10.0))
    await asyncio.sleep(1.5)
    await session.fail("the meeting server went away")
    outcome = await session.aclose()  # after fail: the same failed outcome, nothing more written
    rows = _rows(engine, analysis_id)
    assert outcome.status is AnalysisStatus.failed
    assert rows["analysis"].status is AnalysisStatus.failed
    assert rows["analysis"].failure_reason == "the meeting server went away"
    assert rows["observations"] == [] and rows["samples"] == [] and rows["students"] == []
    with pytest.raises(RuntimeError, match="has ended"):
        session.add_participant("p2", "Bob", ReplayVideoTrack(single_face_frames, 15, seconds=1.0))


@pytest.mark.media
async def test_a_reconnect_continues_the_stream_and_namesakes_stay_apart(
    isolated_env: Path, components: PipelineComponents, single_face_frames: list[av.VideoFrame],
) -> None:
    settings = _settings(isolated_env)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="test", title="Namesakes", owner_id=None,
                                       course="", host_email=None, consent=ConsentPolicy.everyone())
    lecture = decode_video_frames(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", limit=96)
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    assert session.add_participant("p1", "Ada", ReplayVideoTrack(single_face_frames, 15, seconds=10.0))
    assert session.add_participant("p2", "Ada", ReplayVideoTrack(lecture, 15, seconds=10.0))
    await asyncio.sleep(2.0)
    session.remove_participant("p1", "connection lost")
    assert session.add_participant("p1-again", "Ada", ReplayVideoTrack(single_face_frames, 15, seconds=10.0))
    await asyncio.sleep(2.0)
    outcome = await session.aclose()
    rows = _rows(engine, analysis_id)
    assert outcome.status is AnalysisStatus.done
    assert set(rows["stats"]) == {"Ada", "Ada [2]"}
    assert {s.display_name for s in rows["stats"].values()} == {"Ada"}
    # The reconnected participant continues the same stream: one student, frames of both connections.
    assert sorted(s.label for s in rows["students"]) == ["Ada", "Ada [2]"]
    assert rows["stats"]["Ada"].frames_received >= 45  # one connection alone delivers at most 31 in 2 s
    assert rows["stats"]["Ada"].left_reason == "the session ended"


@pytest.mark.media
@pytest.mark.redis
async def test_with_a_broker_celery_workers_infer_and_every_crop_is_accounted_for(
    isolated_env: Path, components: PipelineComponents, single_face_frames: list[av.VideoFrame],
) -> None:
    import uuid

    from tests.test_celery import BROKER_URL, _celery_worker

    settings = _settings(isolated_env, broker_url=BROKER_URL, inference_queue=f"test-live-{uuid.uuid4().hex[:8]}",
                         intra_op_threads=1)
    engine = init_store(settings.resolved_database_url)
    worker = _celery_worker(settings, isolated_env / "worker.log")
    try:
        await asyncio.to_thread(worker.wait_ready, 90.0)
        analysis_id = create_live_analysis(engine, settings, source="test", title="Celery", owner_id=None,
                                           course="", host_email=None, consent=ConsentPolicy.everyone())
        session = LiveSession(settings, engine, analysis_id, components=components)
        await session.start()
        assert session.add_participant("p1", "Ada", ReplayVideoTrack(single_face_frames, 15, seconds=4.0))
        await asyncio.sleep(4.3)
        outcome = await session.aclose()
    finally:
        await asyncio.to_thread(worker.stop)
    rows = _rows(engine, analysis_id)
    assert outcome.status is AnalysisStatus.done, rows["analysis"].failure_reason
    assert [s.label for s in rows["students"]] == ["Ada"]
    # The worker stored one observation per detected face; the session waited for all of them.
    assert outcome.crops_stored == len(rows["observations"]) == rows["students"][0].samples_visible >= 6


@pytest.mark.media
async def test_emotion_switched_off_stores_no_emotion_even_with_shared_models(
    isolated_env: Path, components: PipelineComponents, single_face_frames: list[av.VideoFrame],
) -> None:
    settings = _settings(isolated_env, emotion_inference=False)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="test", title="No emotion", owner_id=None,
                                       course="", host_email=None, consent=ConsentPolicy.everyone())
    assert components.models.emotion is not None  # the shared models could infer emotion
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    session.add_participant("p1", "Ada", ReplayVideoTrack(single_face_frames, 15, seconds=2.0))
    await asyncio.sleep(2.3)
    await session.aclose()
    rows = _rows(engine, analysis_id)
    assert rows["observations"] and all(o.emotion_happy is None for o in rows["observations"])
    assert rows["analysis"].emotion_inference is False
    assert "emotion" not in json.loads(rows["analysis"].models_json)
