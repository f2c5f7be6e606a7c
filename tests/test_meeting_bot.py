"""The meeting bot against a real Janus and real aiortc participants streaming face videos.

One Janus serves the module. The main scenario runs about half a minute of class:
two students publish from the start, one opted-out participant publishes too, a third
student joins late, one leaves early, Janus restarts (the room is recreated and the
participants rejoin, as a meeting server's clients do), and the room is destroyed at
the end of class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from sqlmodel import select

from bot.janus import JanusRoomClient, PublishedFeed, publish_tracks
from bot.meeting import MeetingBot, MeetingTarget
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    MeetingState,
    StreamGap,
    init_store,
    session_scope,
    students_for,
)
from reports.aggregate import build_report_data
from tests.conftest import MEDIA_DIR
from tests.janus_server import JanusServer, LoopingVideoTrack, free_tcp_port, janus_server, start_cli_bot  # noqa: F401  (fixture)

pytestmark = [pytest.mark.janus, pytest.mark.media]

ROOM_PIN = "s3cret"


class Participant:
    """A student's client: its own Janus session publishing a looping face video."""

    def __init__(self, url: str, room: int, name: str, video: str) -> None:
        self.url, self.room, self.name, self.video = url, room, name, video
        self.client: JanusRoomClient | None = None
        self.feed: PublishedFeed | None = None

    async def join(self) -> None:
        self.client = JanusRoomClient(self.url, keepalive_seconds=10)
        await self.client.connect()
        camera = LoopingVideoTrack(MEDIA_DIR / self.video)
        self.feed = await publish_tracks(self.client, self.room, self.name, [camera.track], pin=ROOM_PIN)

    async def leave(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        if self.client is not None:
            await self.client.aclose()
        self.feed = self.client = None

    async def drop(self) -> None:
        """What a client sees when the server restarts: its session is gone; close locally."""
        if self.feed is not None:
            await self.feed.peer.close()
        if self.client is not None:
            await self.client.aclose()
        self.feed = self.client = None


async def _create_room(url: str, room: int) -> None:
    async with JanusRoomClient(url) as admin:
        handle = await admin.attach()
        await handle.create_room(room, pin=ROOM_PIN, description="ClassLens test class")


async def _destroy_room(url: str, room: int) -> None:
    async with JanusRoomClient(url) as admin:
        handle = await admin.attach()
        await handle.destroy_room(room)


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str, bot: MeetingBot | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; bot: {bot.status}" if bot else ""))
        await asyncio.sleep(0.2)


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data", "execution_provider": "cpu", "sample_fps": 1.0,
        "bot_frame_timeout_seconds": 6.0, "bot_idle_timeout_seconds": 120.0, "bot_keepalive_seconds": 5.0,
        "bot_reconnect_attempts": 8, "bot_request_timeout_seconds": 5.0, "min_student_seconds": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


def _new_session(settings: Settings, consent: Any) -> tuple[Any, int]:
    from bot.live import create_live_analysis

    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="janus test", title="test class", owner_id=None,
                                       course="", host_email=None, consent=consent)
    return engine, analysis_id


async def test_bot_follows_a_class_through_joins_leaves_and_a_janus_restart(
        janus_server: JanusServer, components: Any, isolated_env: Path) -> None:  # noqa: F811
    from kernel.consent import ConsentPolicy

    server = janus_server
    room = 4321
    await _create_room(server.url, room)
    settings = _settings(isolated_env)
    engine, analysis_id = _new_session(settings, ConsentPolicy.opt_out(["  opted OUT "]))
    alice = Participant(server.url, room, "Alice", "single_face.mp4")
    bob = Participant(server.url, room, "Bob", "WolfgangLanger_Pexels.mp4")
    optout = Participant(server.url, room, "Opted Out", "single_face.mp4")
    carol = Participant(server.url, room, "Carol", "WolfgangLanger_Pexels.mp4")
    everyone = (alice, bob, optout, carol)
    bot = MeetingBot(settings, engine, analysis_id,
                     MeetingTarget(server.url, room, ROOM_PIN, settings.bot_display_name), components=components)
    task: asyncio.Task[Any] | None = None
    try:
        for participant in (alice, bob, optout):
            await participant.join()
        task = asyncio.create_task(bot.run())
        await _wait_for(lambda: set(bot.status.participants) == {"Alice", "Bob"}, 30, "Alice and Bob analysed", bot)
        assert bot.status.excluded == 1
        await _wait_for(lambda: bot.status.frames_sampled >= 6, 30, "frames analysed", bot)

        await carol.join()  # a late joiner
        await _wait_for(lambda: "Carol" in bot.status.participants, 20, "Carol analysed", bot)
        await bob.leave()  # an early leaver
        await _wait_for(lambda: "Bob" not in bot.status.participants, 20, "Bob gone", bot)
        await asyncio.sleep(4)

        server.restart()  # every session, handle and room is gone
        for participant in (alice, optout, carol):
            await participant.drop()
        await _wait_for(lambda: bot.status.state is MeetingState.reconnecting, 30, "the bot noticing the restart", bot)
        await _create_room(server.url, room)
        # People take a while to come back: longer than the frame timeout, so that a rejoiner is not
        # judged by the last frame of their previous connection.
        await asyncio.sleep(8)
        for participant in (alice, optout, carol):
            await participant.join()
        await _wait_for(lambda: bot.status.state is MeetingState.live and bot.status.gaps == 1, 40, "the bot back", bot)
        await _wait_for(lambda: set(bot.status.participants) == {"Alice", "Carol"}, 20, "resubscribed", bot)
        sampled_before = bot.status.frames_sampled
        await _wait_for(lambda: bot.status.frames_sampled >= sampled_before + 4, 30, "frames after the restart", bot)
        await asyncio.sleep(8)  # longer than the frame timeout: the rejoiners are still analysed
        assert set(bot.status.participants) == {"Alice", "Carol"}, bot.status

        await _destroy_room(server.url, room)  # the end of class
        outcome = await asyncio.wait_for(task, 120)
    finally:
        if task is not None and not task.done():
            bot.stop("test teardown")
            await asyncio.wait_for(task, 120)
        for participant in everyone:
            await participant.leave()

    assert outcome.state is MeetingState.ended, outcome.detail
    assert outcome.detail == "the meeting room was destroyed"
    assert outcome.live is not None and outcome.live.status is AnalysisStatus.done
    with session_scope(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None and analysis.status is AnalysisStatus.done
        duration = analysis.duration_seconds
        labels = {student.label for student in students_for(session, analysis_id)}
        gaps = list(session.exec(select(StreamGap).where(StreamGap.analysis_id == analysis_id)))
    assert {"Alice", "Bob", "Carol"} <= labels, labels
    assert not any("opted" in label.lower() for label in labels)
    assert len(gaps) == 1 and gaps[0].end_time > gaps[0].start_time and "reconnected" in gaps[0].reason
    # Every dispatched crop is accounted for: all stored, none lost.
    assert outcome.live.crops_stored > 0 and bot.status.crops_submitted == outcome.live.crops_stored
    assert outcome.report_dir is not None and (Path(outcome.report_dir) / "index.html").is_file()
    # The reports count time in the room: Carol joined late, Bob left early, and their absence is
    # neither "not visible" nor part of their shares (a rejoin within 10 s does not split a stay).
    with session_scope(engine) as session:
        summaries = {s.label: s for s in build_report_data(session, analysis_id).summaries}
    alice_stay, bob_stay, carol_stay = (summaries[name].presence for name in ("Alice", "Bob", "Carol"))
    assert carol_stay[0].start > alice_stay[0].start + 1 and bob_stay[-1].end < carol_stay[-1].end - 10
    assert summaries["Bob"].left_reason is not None and summaries["Bob"].left_reason.startswith("left the meeting")
    assert summaries["Alice"].left_reason == "the session ended"
    for summary in summaries.values():
        assert summary.seconds_in_room < duration


async def test_a_frozen_camera_is_kept_while_its_owner_is_in_the_room(
        janus_server: JanusServer, components: Any, isolated_env: Path) -> None:  # noqa: F811
    from kernel.consent import ConsentPolicy
    from kernel.store import StreamStats

    room = 4322
    await _create_room(janus_server.url, room)
    settings = _settings(isolated_env, bot_idle_timeout_seconds=3.0, bot_stall_seconds=1.0,
                         bot_frame_timeout_seconds=3.0, bot_absent_seconds=5.0)
    engine, analysis_id = _new_session(settings, ConsentPolicy.everyone())
    client = JanusRoomClient(janus_server.url)
    await client.connect()
    # Dave's camera freezes after about 4 s, but he stays in the room: the bot restarts his receiver,
    # subscribes again, asks the room who is there, and keeps him; it never counts him as gone.
    dave = await publish_tracks(client, room, "Dave",
                                [LoopingVideoTrack(MEDIA_DIR / "single_face.mp4", freeze_after=32).track],
                                pin=ROOM_PIN)
    bot = MeetingBot(settings, engine, analysis_id, MeetingTarget(janus_server.url, room, ROOM_PIN, "ClassLens"),
                     components=components)
    task = asyncio.create_task(bot.run())
    try:
        await _wait_for(lambda: bot.status.participants == ("Dave",), 60, "Dave analysed", bot)
        await _wait_for(lambda: bot.status.frames_sampled >= 2, 30, "Dave's first frames", bot)
        await asyncio.sleep(15)  # frozen for about 12 s: restarts, a resubscription and roll calls
        assert bot.status.participants == ("Dave",)
        assert bot.status.state is MeetingState.live
    finally:
        await dave.close()  # now he leaves: Janus says so, and the empty room ends the class
        await client.aclose()
        outcome = await asyncio.wait_for(task, 90)
        await _destroy_room(janus_server.url, room)
    assert outcome.state is MeetingState.ended
    assert outcome.detail == "nobody published video for 3 s"
    with session_scope(engine) as session:
        stats = session.exec(select(StreamStats).where(StreamStats.analysis_id == analysis_id)).one()
        analysis = session.get(Analysis, analysis_id)
    assert stats.display_name == "Dave" and stats.left_reason is not None
    assert stats.left_reason.startswith("left the meeting"), stats.left_reason
    # The class lasted until Dave's last frame, not through the bot's idle wait in the empty room.
    assert analysis is not None and stats.last_frame_at is not None
    assert analysis.duration_seconds == pytest.approx(stats.last_frame_at, abs=0.01)


@pytest.mark.parametrize(("where", "pin", "expected"), [
    ("unreachable", ROOM_PIN, "cannot reach Janus"),
    ("no-room", ROOM_PIN, "the room does not exist"),
    ("wrong-pin", "wrong", "wrong or missing PIN"),
    ("missing-pin", None, "wrong or missing PIN"),  # Janus answers 429 "missing element (pin)"
])
async def test_bad_meeting_input_fails_the_session_with_the_reason(
        janus_server: JanusServer, components: Any, isolated_env: Path,  # noqa: F811
        where: str, pin: str | None, expected: str) -> None:
    from kernel.consent import ConsentPolicy

    room = 4323
    if where != "no-room":
        await _create_room(janus_server.url, room)
    url = janus_server.url
    if where == "unreachable":
        url = f"http://{janus_server.host}:{free_tcp_port(janus_server.host)}/janus"
    settings = _settings(isolated_env)
    engine, analysis_id = _new_session(settings, ConsentPolicy.everyone())
    bot = MeetingBot(settings, engine, analysis_id, MeetingTarget(url, room, pin, "ClassLens"), components=components)
    try:
        outcome = await asyncio.wait_for(bot.run(), 60)
    finally:
        if where != "no-room":
            await _destroy_room(janus_server.url, room)
    assert outcome.state is MeetingState.failed
    assert expected in outcome.detail
    with session_scope(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None and analysis.status is AnalysisStatus.failed
        assert analysis.failure_reason is not None and expected in analysis.failure_reason


async def test_invite_api_joins_reports_state_and_leaves(janus_server: JanusServer, components: Any,  # noqa: F811
                                                         isolated_env: Path) -> None:
    import hashlib

    import httpx
    from fastapi import FastAPI, HTTPException

    from bot.api import MeetingRegistry, meetings_router
    from kernel.store import Meeting, User, UserRole

    room = 4324
    await _create_room(janus_server.url, room)
    closed = f"http://{janus_server.host}:{free_tcp_port(janus_server.host)}/janus"
    # The test's Janus listens on a private address: an admin must allow it (and here a closed port).
    settings = _settings(isolated_env, janus_allowed_urls=[janus_server.url, closed])
    engine = init_store(settings.resolved_database_url)
    with session_scope(engine) as session:
        for email, token in (("teacher@example.edu", "t-token"), ("other@example.edu", "o-token")):
            session.add(User(email=email, password_hash="-", role=UserRole.teacher,
                             api_token_hash=hashlib.sha256(token.encode()).hexdigest()))

    def bearer_user(request: Request) -> User:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        digest = hashlib.sha256(token.encode()).hexdigest()
        with session_scope(engine) as session:
            user = session.exec(select(User).where(User.api_token_hash == digest)).first()
        if user is None:
            raise HTTPException(401, "a valid API token is required")
        return user

    app = FastAPI()
    app.include_router(meetings_router(bearer_user))
    registry = MeetingRegistry(settings, engine, components=components)
    app.state.meeting_registry = registry
    alice = Participant(janus_server.url, room, "Alice", "single_face.mp4")
    teacher = {"Authorization": "Bearer t-token"}
    transport = httpx.ASGITransport(app=app)
    try:
        await alice.join()
        async with httpx.AsyncClient(transport=transport, base_url="http://classlens.test", timeout=120) as api:
            invite = {"janus_url": janus_server.url, "room": room, "pin": ROOM_PIN, "title": "Biology"}
            assert (await api.post("/api/meetings", json=invite)).status_code == 401
            created = await api.post("/api/meetings", json=invite, headers=teacher)
            assert created.status_code == 201, created.text
            meeting = created.json()
            assert meeting["state"] == "live" and ROOM_PIN not in created.text
            url = f"/api/meetings/{meeting['id']}"
            other = await api.get(url, headers={"Authorization": "Bearer o-token"})
            assert other.status_code == 404  # another teacher's meeting is not disclosed

            async def students_live() -> int:
                reply = await api.get(url, headers=teacher)
                assert reply.status_code == 200 and ROOM_PIN not in reply.text
                return int(reply.json()["students_live"])

            deadline = time.monotonic() + 40
            while await students_live() < 1:
                assert time.monotonic() < deadline, "the API never showed a live student"
                await asyncio.sleep(0.5)
            left = await api.delete(url, headers=teacher)
            assert left.status_code == 200
            assert left.json()["state"] == "ended" and left.json()["ended_at"] is not None
            assert "stopped by teacher@example.edu" in left.json()["state_detail"]

            # Not on the allowlist (Redis on the server itself): refused before anything is created.
            redis = await api.post("/api/meetings", json={**invite, "janus_url": "http://127.0.0.1:6379/"},
                                   headers=teacher)
            assert redis.status_code == 422 and "janus_allowed_urls" in redis.json()["detail"]["message"]
            # A closed port answers like any server that is not Janus: one message, no upstream detail.
            refused = await api.post("/api/meetings", json={**invite, "janus_url": closed}, headers=teacher)
            assert refused.status_code == 422
            assert refused.json()["detail"]["message"].startswith("could not join: no Janus API answered")
            assert "ConnectError" not in refused.text and "HTTP" not in refused.json()["detail"]["message"]
            wrong = await api.post("/api/meetings", json={**invite, "pin": "wrong"}, headers=teacher)
            assert wrong.status_code == 422
            assert "wrong or missing PIN" in wrong.json()["detail"]["message"]
            failed_id = wrong.json()["detail"]["meeting"]["id"]
            assert (await api.get(f"/api/meetings/{failed_id}", headers=teacher)).json()["state"] == "failed"
    finally:
        await registry.aclose()
        await alice.leave()
        await _destroy_room(janus_server.url, room)
    with session_scope(engine) as session:
        stored = session.get(Meeting, meeting["id"])
        assert stored is not None and stored.analysis_id is not None
        analysis = session.get(Analysis, stored.analysis_id)
        assert analysis is not None and analysis.status is AnalysisStatus.done
        assert [s.label for s in students_for(session, stored.analysis_id)] == ["Alice"]


def test_cli_join_leaves_cleanly_on_ctrl_c(janus_server: JanusServer, isolated_env: Path,  # noqa: F811
                                           default_models: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    room = 4325
    asyncio.run(_create_room(janus_server.url, room))
    env = {**os.environ, "CLASSLENS_EXECUTION_PROVIDER": "cpu", "JANUS_ROOM_PIN": ROOM_PIN}
    wrong = subprocess.run([sys.executable, "-m", "classlens", "bot", "join", "--janus", janus_server.url,
                            "--room", str(room + 1), "--quiet"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "the room does not exist" in wrong.stderr, wrong.stderr

    async def run_class(interrupts: int = 1, run_env: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        alice = Participant(janus_server.url, room, "Alice", "single_face.mp4")
        await alice.join()
        process = await start_cli_bot(janus_server.url, room, run_env)
        try:
            await asyncio.sleep(15)  # model loading, joining, a few sampled seconds of Alice
            for _ in range(interrupts):
                process.send_signal(signal.SIGINT)
                await asyncio.sleep(0.2)
            # A second Ctrl-C must end the command within seconds, whatever the bot was waiting for.
            out, err = await asyncio.wait_for(process.communicate(), 120 if interrupts == 1 else 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await alice.leave()
        return subprocess.CompletedProcess([], process.returncode or 0, out.decode(), err.decode())

    result = asyncio.run(run_class())
    assert result.returncode == 0, result.stderr
    assert "interrupted from the command line" in result.stderr
    report = Path(result.stdout.strip().splitlines()[-1])
    assert report.name == "index.html" and report.is_file()

    # Ctrl-C twice: the session is finalised all the same (never left "running").
    data_dir = isolated_env / "twice"
    twice = asyncio.run(run_class(2, {**env, "CLASSLENS_DATA_DIR": str(data_dir)}))
    asyncio.run(_destroy_room(janus_server.url, room))
    assert "interrupted" in twice.stderr, twice.stderr
    with session_scope(init_store(f"sqlite:///{data_dir / 'classlens.sqlite3'}")) as session:
        analysis = session.exec(select(Analysis)).one()
        assert analysis.status in (AnalysisStatus.done, AnalysisStatus.failed), analysis.status
        meeting_ended = twice.returncode == 0
        assert meeting_ended == (analysis.status is AnalysisStatus.done), (twice.returncode, twice.stderr)


def test_a_bot_stalled_for_five_seconds_recovers_every_student(janus_server: JanusServer,  # noqa: F811
                                                               isolated_env: Path, default_models: Path) -> None:
    """`kill -STOP` of the bot for 5 s: packets are lost beyond the SFU's retransmission window; nobody is lost."""
    import os
    import signal

    from kernel.store import StreamStats

    room = 4326
    asyncio.run(_create_room(janus_server.url, room))
    data_dir = isolated_env / "stall"
    env = {**os.environ, "CLASSLENS_EXECUTION_PROVIDER": "cpu", "JANUS_ROOM_PIN": ROOM_PIN,
           "CLASSLENS_DATA_DIR": str(data_dir), "CLASSLENS_BOT_FRAME_TIMEOUT_SECONDS": "6",
           "CLASSLENS_MIN_STUDENT_SECONDS": "1"}

    async def run_class() -> tuple[int, str]:
        students = [Participant(janus_server.url, room, name, video)
                    for name, video in (("Alice", "single_face.mp4"), ("Bob", "WolfgangLanger_Pexels.mp4"))]
        for student in students:
            await student.join()
        process = await start_cli_bot(janus_server.url, room, env)
        try:
            await asyncio.sleep(15)  # model loading, joining, a few sampled seconds of each
            process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(5)
            process.send_signal(signal.SIGCONT)
            await asyncio.sleep(25)  # longer than the frame timeout: a lost student would be gone by now
            process.send_signal(signal.SIGINT)
            _out, err = await asyncio.wait_for(process.communicate(), 120)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            for student in students:
                await student.leave()
        return process.returncode or 0, err.decode()

    returncode, stderr = asyncio.run(run_class())
    asyncio.run(_destroy_room(janus_server.url, room))
    assert returncode == 0, stderr
    engine = init_store(f"sqlite:///{data_dir / 'classlens.sqlite3'}")
    with session_scope(engine) as session:
        analysis = session.exec(select(Analysis)).one()
        streams = {s.display_name: s for s in session.exec(select(StreamStats))}
        labels = {student.label for student in students_for(session, int(analysis.id or 0))}
    assert analysis.status is AnalysisStatus.done
    assert set(streams) == {"Alice", "Bob"} and labels == {"Alice", "Bob"}
    for name, stats in streams.items():
        # Still analysed when the class ended, with video well after the stall.
        assert stats.left_reason == "the session ended", (name, stats.left_reason)
        assert stats.last_frame_at is not None and stats.last_frame_at > analysis.duration_seconds - 3, name
