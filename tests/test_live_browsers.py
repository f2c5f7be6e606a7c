"""A live class with real browsers: headless Chromiums on Janus' own VideoRoom demo page, and the bot's CLI.

The aiortc participants of test_meeting_bot.py speak the bot's own Janus client; here
each student is what a person runs: Chromium (Debian's) on the demo page Debian ships
(``janus-demos``), publishing a fake camera made from a face video, with audio, at the
demo room's 128 kbit/s cap, and subscribing to everyone else. The bot joins as
``classlens bot join`` in its own process and leaves on Ctrl-C (SIGINT), as an operator
runs it. Display names carry spaces, accents and HTML, and each report must name its
student exactly so.

Every scenario must end with exactly one report per participant, every participant
present, and the session done: a plain class, the bot stopped for 5 s, a Janus restart
after which the browsers rejoin 20 s later, and a student who leaves mid-class.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    FaceObservation,
    StreamGap,
    StreamStats,
    init_store,
    session_scope,
    students_for,
)
from tests.conftest import MEDIA_DIR
from tests.demo_publishers import DemoPublisher, create_demo_room, demo_url, fake_camera, playwright  # noqa: F401  (fixtures)
from tests.janus_server import JanusServer, janus_server, start_cli_bot  # noqa: F401  (fixture)

pytestmark = [pytest.mark.janus, pytest.mark.media, pytest.mark.browser]

#: The class: display names a person types (spaces, accents, markup) and the face video each camera shows.
STUDENTS = (("Zoë Martín", "single_face.mp4"), ("Ana <b>Lee</b>", "WolfgangLanger_Pexels.mp4"),
            ("Jean-Luc Dubois", "single_face.mp4"))
NAMES = tuple(name for name, _ in STUDENTS)
#: The name the bot shows in the meeting when the operator gives none.
BOT_NAME = Settings.model_fields["bot_display_name"].default
#: The bot's frame timeout in these tests: after a stall or a rejoin, a lost student would be gone this soon.
FRAME_TIMEOUT = 6.0
#: Room numbers, one per test; the first is the demo's own room 1234.
_ROOMS = itertools.count(1234)


@pytest.fixture(scope="module")
def cameras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One Y4M camera per clip the class uses (640x360, 15 fps), shared read-only by the browsers."""
    folder = tmp_path_factory.mktemp("cameras")
    clips = sorted({clip for _, clip in STUDENTS})
    return {clip: fake_camera(MEDIA_DIR / clip, folder / f"{Path(clip).stem}.y4m") for clip in clips}


class CliBot:
    """``classlens bot join`` in its own process; its output is read as it comes, so a pipe never fills."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout, self.stderr = bytearray(), bytearray()
        assert process.stdout is not None and process.stderr is not None
        self._readers = [asyncio.create_task(self._drain(process.stdout, self.stdout)),
                         asyncio.create_task(self._drain(process.stderr, self.stderr))]

    @staticmethod
    async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
        while chunk := await stream.read(65536):
            into.extend(chunk)

    def send(self, signum: int) -> None:
        """Send a signal to the bot (SIGSTOP, SIGCONT, SIGINT)."""
        self.process.send_signal(signum)

    async def interrupt(self, timeout: float = 120.0) -> int:
        """Ctrl-C: the bot leaves, finalises the session and writes the reports; returns its exit code."""
        self.send(signal.SIGINT)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        """Teardown after a failure: no bot outlives its test."""
        if self.process.returncode is None:
            self.process.kill()  # SIGKILL ends a SIGSTOPped process too
            await self.process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def tail(self, lines: int = 30) -> str:
        """The end of the bot's stderr, for failure messages."""
        return "\n".join(self.stderr.decode(errors="replace").splitlines()[-lines:])


@dataclass
class LiveClass:
    """One scenario's class: Janus, the room, the students' browsers, the bot and its store."""

    janus: JanusServer
    room: int
    publishers: list[DemoPublisher]
    engine: Engine
    data_dir: Path
    bot: CliBot | None = None
    stderr: str = ""
    stdout: str = ""

    def latest_observations(self) -> dict[str, float]:
        """Per stream, the class time of the newest face result the bot has stored (results are written live)."""
        with session_scope(self.engine) as session:
            rows = session.exec(select(FaceObservation.stream, func.max(FaceObservation.timestamp))
                                .group_by(FaceObservation.stream)).all()
        return {str(stream): float(latest) for stream, latest in rows}

    def diagnostics(self) -> str:
        """What a failure message needs: the bot's stderr, Janus' log, and the pages' errors."""
        pages = "\n".join(f"{p.name}: {p.console[-5:]}" for p in self.publishers)
        bot = self.bot.tail() if self.bot is not None else self.stderr
        return f"\n--- bot stderr ---\n{bot}\n--- Janus log ---\n{self.janus.log_tail(20)}\n--- pages ---\n{pages}"

    async def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` (the store, or the pages) until it holds; fail with the diagnostics after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.bot is not None and self.bot.process.returncode is not None:
                raise AssertionError(f"the bot exited ({self.bot.process.returncode}) while waiting for {what}"
                                     + self.diagnostics())
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + self.diagnostics())
            await asyncio.sleep(0.5)

    async def analysed_after(self, names: tuple[str, ...], class_time: float, timeout: float, what: str) -> None:
        """Wait until every one of ``names`` has a face result later than ``class_time`` on the bot's class clock."""
        def fresh() -> bool:
            latest = self.latest_observations()
            return all(latest.get(name, -1.0) > class_time for name in names)

        await self.wait_until(fresh, timeout, what)

    def now(self) -> float:
        """The newest class time the store has seen from anyone: the bot's clock, as far as the test can read it."""
        return max(self.latest_observations().values(), default=0.0)

    async def wait_for_bot_in_every_page(self, timeout: float = 60.0) -> None:
        """The bot is a visible participant: each student's page plays its card under its name."""
        await asyncio.gather(*(p.wait_for_remote(BOT_NAME, timeout) for p in self.publishers if p.page is not None))

    async def end(self) -> None:
        """Ctrl-C the bot; it must exit 0 (the session finalised) and print where the reports are."""
        assert self.bot is not None
        try:
            code = await self.bot.interrupt()
        finally:
            await self.bot.kill()
            self.stderr = self.bot.stderr.decode(errors="replace")
            self.stdout = self.bot.stdout.decode(errors="replace")
            self.bot = None
            print(f"--- bot stderr ---\n{self.stderr}")  # pytest shows it when the test fails
        assert code == 0, f"the bot exited with {code}" + self.diagnostics()
        assert "interrupted from the command line" in self.stderr, self.stderr

    def reports(self, names: tuple[str, ...] = NAMES) -> dict[str, StreamStats]:
        """Check that the session is done with one student and one stream per participant, named exactly.

        Returns each participant's stream statistics for the scenario's own checks.
        """
        with session_scope(self.engine) as session:
            analysis = session.exec(select(Analysis)).one()
            stats = list(session.exec(select(StreamStats).where(StreamStats.analysis_id == analysis.id)))
            labels = [student.label for student in students_for(session, int(analysis.id or 0))]
        for row in stats:
            print(f"stream {row.stream!r}: frames {row.first_frame_at}..{row.last_frame_at}, "
                  f"{row.frames_sampled} sampled, left: {row.left_reason}")
        assert analysis.status is AnalysisStatus.done, (analysis.status, analysis.failure_reason)
        # Exactly one each: no "Name (2)" student, no "Name [2]" stream, nobody missing.
        assert sorted(labels) == sorted(names), labels
        assert sorted(s.display_name for s in stats) == sorted(names), [s.display_name for s in stats]
        assert all(s.stream == s.display_name for s in stats), [(s.stream, s.display_name) for s in stats]
        report = Path(self.stdout.strip().splitlines()[-1])
        assert report.name == "index.html" and report.is_file(), self.stdout
        # The class overview hides per-student rows below five students (privacy); each student has their own
        # page, headed by the name as typed, its markup shown as text and never rendered.
        pages = [page.read_text(encoding="utf-8") for page in sorted((report.parent / "students").glob("*.html"))]
        headings = sorted(heading for page in pages for heading in re.findall(r"<h1>(.*?)</h1>", page))
        assert headings == sorted(html.escape(name) for name in names), headings
        assert not any("<b>Lee</b>" in page for page in [report.read_text(encoding="utf-8"), *pages])
        return {s.display_name: s for s in stats}

    def duration(self) -> float:
        """The class length the session recorded (seconds)."""
        with session_scope(self.engine) as session:
            return session.exec(select(Analysis)).one().duration_seconds


@pytest.fixture
async def live_class(janus_server: JanusServer, playwright: Any, demo_url: str, cameras: dict[str, Path],  # noqa: F811
                     isolated_env: Path, default_models: Path) -> AsyncIterator[LiveClass]:
    """A class in its own room (one per test: the module shares one Janus) that is torn down whatever happened.

    The students join from their browsers, then the bot joins; the test gets the class once
    the bot analyses every student and every page shows the bot.
    """
    room = next(_ROOMS)
    await create_demo_room(janus_server.url, room)
    data_dir = isolated_env / "data"
    # The test opens the store first (creating it), so it can read the bot's results while the class runs.
    engine = init_store(f"sqlite:///{data_dir / 'classlens.sqlite3'}")
    publishers = [DemoPublisher(playwright, demo_url, room, name, cameras[clip]) for name, clip in STUDENTS]
    live = LiveClass(janus_server, room, publishers, engine, data_dir)
    try:
        for publisher in publishers:
            await publisher.launch()
        await asyncio.gather(*(publisher.join() for publisher in publishers))
        env = {**os.environ, "CLASSLENS_EXECUTION_PROVIDER": "cpu", "CLASSLENS_DATA_DIR": str(data_dir),
               "CLASSLENS_BOT_FRAME_TIMEOUT_SECONDS": str(FRAME_TIMEOUT), "CLASSLENS_MIN_STUDENT_SECONDS": "1"}
        # One sampled frame per second per student: the two CI cores also run Janus and three Chromiums.
        live.bot = CliBot(await start_cli_bot(janus_server.url, room, env, "--fps", "1"))
        await live.analysed_after(NAMES, -1.0, 120, "the bot analysing every student")
        await live.wait_for_bot_in_every_page()
        yield live
    finally:
        if live.bot is not None:
            await live.bot.kill()
        for publisher in live.publishers:
            await publisher.close()


@pytest.mark.timeout(240)
async def test_a_class_of_browsers_is_reported_student_by_student(live_class: LiveClass) -> None:
    """Three browsers, about 30 s of class, Ctrl-C: one report per student, under the name they typed."""
    await live_class.wait_until(lambda: live_class.now() >= 30, 90, "30 s of class")
    await live_class.analysed_after(NAMES, live_class.now() - 5, 30, "every student in the last seconds")
    await live_class.end()
    stats = live_class.reports()
    for name, stream in stats.items():
        assert stream.left_reason == "the session ended", (name, stream.left_reason)
        assert stream.frames_sampled >= 15, (name, stream.frames_sampled)


@pytest.mark.timeout(240)
async def test_a_bot_stopped_for_five_seconds_keeps_every_browser(live_class: LiveClass) -> None:
    """``kill -STOP`` for 5 s: Chromium's packets are lost past the SFU's window; every student is analysed after."""
    assert live_class.bot is not None
    await live_class.wait_until(lambda: live_class.now() >= 8, 60, "a few seconds of class")
    stalled_at = live_class.now()
    live_class.bot.send(signal.SIGSTOP)
    await asyncio.sleep(5)
    live_class.bot.send(signal.SIGCONT)
    # Longer than the frame timeout after the stall: a student the bot had lost would be gone by now.
    await live_class.analysed_after(NAMES, stalled_at + 5 + FRAME_TIMEOUT + 2, 90, "every student after the stall")
    await live_class.end()
    stats = live_class.reports()
    duration = live_class.duration()
    for name, stream in stats.items():
        assert stream.left_reason == "the session ended", (name, stream.left_reason)
        assert stream.last_frame_at is not None and stream.last_frame_at > duration - 3, (name, stream.last_frame_at)
        assert stream.last_frame_at > stalled_at + 5 + FRAME_TIMEOUT, (name, stream.last_frame_at)


@pytest.mark.timeout(300)
async def test_browsers_rejoining_after_a_janus_restart_are_reported_once(live_class: LiveClass) -> None:
    """Janus restarts; the room is recreated; the students reload the page 20 s later and join under the same names."""
    await live_class.wait_until(lambda: live_class.now() >= 6, 60, "a few seconds of class")
    restarted_at = live_class.now()
    await asyncio.to_thread(live_class.janus.restart)  # every session, handle and room is gone
    await create_demo_room(live_class.janus.url, live_class.room)  # the meeting server's host recreates it
    await asyncio.sleep(20)  # the class waits for the students to notice and come back
    await asyncio.gather(*(publisher.join() for publisher in live_class.publishers))
    await live_class.wait_for_bot_in_every_page(90)  # the bot rejoined, visibly
    await live_class.analysed_after(NAMES, restarted_at + 20 + FRAME_TIMEOUT, 90, "every student after the rejoin")
    await live_class.end()
    stats = live_class.reports()
    with session_scope(live_class.engine) as session:
        gaps = list(session.exec(select(StreamGap).where(StreamGap.stream == None)))  # noqa: E711  (SQL IS NULL)
    assert len(gaps) == 1 and "reconnected" in gaps[0].reason, [(g.reason, g.start_time, g.end_time) for g in gaps]
    for name, stream in stats.items():
        assert stream.left_reason == "the session ended", (name, stream.left_reason)
        # Video after the rejoin, not only before the restart.
        assert stream.last_frame_at is not None and stream.last_frame_at > restarted_at + 20, (name, stream)


@pytest.mark.timeout(240)
async def test_a_browser_that_leaves_mid_class_is_reported_as_gone(live_class: LiveClass) -> None:
    """One student presses the demo's Stop (their session ends); they keep their report, the others go on."""
    leaver, *stayers = live_class.publishers
    await live_class.wait_until(lambda: live_class.now() >= 8, 60, "a few seconds of class")
    left_at = live_class.now()
    await leaver.leave()
    stayed = tuple(p.name for p in stayers)
    await live_class.analysed_after(stayed, left_at + FRAME_TIMEOUT + 4, 60, "the others after the leave")
    await live_class.end()
    stats = live_class.reports()
    gone = stats[leaver.name]
    assert gone.left_reason is not None and gone.left_reason.startswith("left the meeting"), gone.left_reason
    assert gone.last_frame_at is not None and gone.last_frame_at < left_at + 5, gone.last_frame_at
    for name in stayed:
        assert stats[name].left_reason == "the session ended", (name, stats[name].left_reason)
        assert stats[name].last_frame_at is not None and stats[name].last_frame_at > left_at + FRAME_TIMEOUT, name
