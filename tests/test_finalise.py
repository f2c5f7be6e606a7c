"""The end of an analysis: tracks that took turns for one face on a participant's camera become one student."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from kernel.settings import Settings
from kernel.store import Analysis, FaceObservation, init_store, session_scope, students_for
from pipeline.finalise import finalise_students, join_alternating_students
from vision.tracking import TrackSummary


def _observation(analysis_id: int, stream: str, track_id: int, timestamp: float) -> FaceObservation:
    return FaceObservation(analysis_id=analysis_id, stream=stream, track_id=track_id, timestamp=timestamp,
                           box_x1=0.0, box_y1=0.0, box_x2=60.0, box_y2=80.0, detection_score=0.99, head_yaw=0.0,
                           head_pitch=0.0, head_roll=0.0, engagement_p0=0.1, engagement_p1=0.2,
                           engagement_p2=0.3, engagement_p3=0.4, engagement_level=3, engagement_score=2.0)


def test_one_participants_alternating_tracks_become_one_student_and_a_shared_camera_keeps_two(
        tmp_path: Path) -> None:
    engine = init_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    # Ana's camera: track 11 for her usual look, 12 whenever her hand covers her face (5 s of every 10).
    ana = {11: [t for t in range(30) if t % 10 < 5], 12: [t for t in range(30) if t % 10 >= 5]}
    # Ben's camera is shared: tracks 21 and 22 are two people in every frame.
    ben = {21: list(range(30)), 22: list(range(30))}
    with session_scope(engine) as session:
        analysis = Analysis(source="janus://meet/1", kind="meeting", sample_fps=1.0)
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        analysis_id = analysis.id
        summaries = []
        for stream, tracks in (("Ana", ana), ("Ben", ben)):
            for track_id, times in tracks.items():
                session.add_all(_observation(analysis_id, stream, track_id, float(t)) for t in times)
                summaries.append(TrackSummary(track_id, stream, float(times[0]), float(times[-1]), len(times),
                                              0.99 * len(times)))
    settings = Settings()
    with session_scope(engine) as session:
        joined = join_alternating_students(session, analysis_id, summaries, {"Ana", "Ben"}, settings)
        finalise_students(session, analysis_id, joined, settings, name_source_of=lambda stream: "meeting")
    with session_scope(engine) as session:
        students = {(s.label, s.track_id, s.samples_visible) for s in students_for(session, analysis_id)}
        ana_tracks = {o.track_id for o in session.exec(select(FaceObservation).where(FaceObservation.stream == "Ana"))}
    assert students == {("Ana", 11, 30), ("Ben", 21, 30), ("Ben (2)", 22, 30)}
    assert ana_tracks == {11}
    # Left alone, the same tracks are two students of Ana's.
    assert len(summaries) == 4 and len(joined) == 3


def test_streams_not_named_as_own_cameras_are_left_alone(tmp_path: Path) -> None:
    engine = init_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    summaries = [TrackSummary(1, "window", 0.0, 8.0, 5, 4.95), TrackSummary(2, "window", 1.0, 9.0, 5, 4.95)]
    with session_scope(engine) as session:
        analysis = Analysis(source="janus://meet/1", kind="meeting", sample_fps=1.0)
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        for track_id, times in ((1, (0, 2, 4, 6, 8)), (2, (1, 3, 5, 7, 9))):
            session.add_all(_observation(analysis.id, "window", track_id, float(t)) for t in times)
        assert join_alternating_students(session, analysis.id, summaries, set(), Settings()) == summaries
        assert len(join_alternating_students(session, analysis.id, summaries, {"window"}, Settings())) == 1
