"""What a restarted serve process does with the meetings its predecessor left behind."""

from __future__ import annotations

from pathlib import Path

from bot.api import MeetingRegistry
from kernel.settings import Settings
from kernel.store import Analysis, AnalysisStatus, Meeting, MeetingState, init_store, session_scope


async def test_recover_fails_meetings_whose_bot_died_with_the_previous_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    engine = init_store(settings.resolved_database_url)
    with session_scope(engine) as session:
        ids: dict[MeetingState, tuple[int, int]] = {}
        for state in (MeetingState.live, MeetingState.reconnecting, MeetingState.ended):
            analysis = Analysis(kind="meeting", source=f"janus://room/{state}",
                                status=AnalysisStatus.done if state is MeetingState.ended else AnalysisStatus.running)
            session.add(analysis)
            session.flush()
            assert analysis.id is not None
            meeting = Meeting(analysis_id=analysis.id, janus_url="http://janus.invalid/janus", room=1234,
                              display_name="ClassLens", state=state)
            session.add(meeting)
            session.flush()
            assert meeting.id is not None
            ids[state] = (meeting.id, analysis.id)

    registry = MeetingRegistry(settings, engine)
    assert await registry.recover() == 2
    assert await registry.recover() == 0  # nothing left to recover

    with session_scope(engine) as session:
        for state in (MeetingState.live, MeetingState.reconnecting):
            meeting_id, analysis_id = ids[state]
            meeting = session.get(Meeting, meeting_id)
            analysis = session.get(Analysis, analysis_id)
            assert meeting is not None and analysis is not None
            assert meeting.state is MeetingState.failed and "invite it again" in meeting.state_detail
            assert meeting.ended_at is not None
            assert analysis.status is AnalysisStatus.failed and analysis.failure_reason == meeting.state_detail
        meeting_id, analysis_id = ids[MeetingState.ended]
        ended, done = session.get(Meeting, meeting_id), session.get(Analysis, analysis_id)
        assert ended is not None and ended.state is MeetingState.ended
        assert done is not None and done.status is AnalysisStatus.done
