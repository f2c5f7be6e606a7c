"""A gallery recording made through a real meeting page: Janus's own VideoRoom demo, recorded in Chromium.

Several headless Chromiums join the demo room (Debian's ``janus-demos``) under display
names with spaces, accents and apostrophes, each publishing a fake camera made from a
face video. One more Chromium joins as the teacher and is recorded: its page, with every
participant's panel and name badge, is captured through the DevTools screencast (what
Playwright's own video recorder uses; its encoder is not installable here) and encoded in
memory to H.264 at 5 fps, as a screen recorder would. A participant joins late and one
leaves. The recording is then analysed like any recording a teacher has, and must give one
student per participant, named exactly as they typed. (A shared window over WHIP is tested in
test_whip.py with a synthetic gallery.)
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
from sqlmodel import select

from classlens.analysis import analyze_recording
from kernel.settings import load_settings
from kernel.store import Analysis, Student, init_store, session_scope
from tests.conftest import MEDIA_DIR
from tests.demo_publishers import DemoPublisher, create_demo_room, demo_url, fake_camera, playwright  # noqa: F401  (fixtures)
from tests.janus_server import JanusServer, janus_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.janus, pytest.mark.media, pytest.mark.browser, pytest.mark.ocr]

#: Who is in the class from the start, and the face video their camera shows.
PRESENT = (("Zoë Martín", "single_face.mp4"), ("Seán O'Neill", "WolfgangLanger_Pexels.mp4"),
           ("Ana Lee", "face_noface.mov"))
#: Joins about 6 s into the recording.
LATE = ("Jean-Luc Dubois", "WolfgangLanger_Pexels.mp4")
#: Leaves about 12 s into the recording.
LEAVER = "Seán O'Neill"
#: The recorded page: three panels per row, two rows of them, as a teacher's window shows them.
VIEWPORT = {"width": 1280, "height": 1000}
#: Frames per second of the encoded recording (screen recorders default to 5–30).
RECORDING_FPS = 5


class ScreenRecorder:
    """The DevTools screencast of one page: JPEG frames with their times, kept compressed in memory."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.frames: list[tuple[float, bytes]] = []
        self._session: Any = None
        self._acks: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        self._session = await self.page.context.new_cdp_session(self.page)
        self._session.on("Page.screencastFrame", self._frame)
        await self._session.send("Page.startScreencast", {
            "format": "jpeg", "quality": 90, "maxWidth": VIEWPORT["width"], "maxHeight": VIEWPORT["height"]})

    def _frame(self, params: dict[str, Any]) -> None:
        self.frames.append((time.monotonic(), base64.b64decode(params["data"])))
        # Chromium sends the next frame once this one is acknowledged.
        ack = asyncio.ensure_future(self._session.send("Page.screencastFrameAck", {"sessionId": params["sessionId"]}))
        self._acks.add(ack)
        ack.add_done_callback(self._acks.discard)

    async def stop(self) -> None:
        await self._session.send("Page.stopScreencast")
        await self._session.detach()

    def encode(self) -> io.BytesIO:
        """The recording as an H.264 MP4 at RECORDING_FPS: each tick shows the latest screencast frame."""
        assert self.frames, "the screencast delivered no frame"
        start, end = self.frames[0][0], self.frames[-1][0]
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as container:
            stream: Any = container.add_stream("libx264", rate=RECORDING_FPS)
            first = cv2.imdecode(np.frombuffer(self.frames[0][1], np.uint8), cv2.IMREAD_COLOR)
            stream.height, stream.width = (first.shape[0] // 2) * 2, (first.shape[1] // 2) * 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            index, latest = 0, first
            for tick in range(int((end - start) * RECORDING_FPS) + 1):
                at = start + tick / RECORDING_FPS
                while index + 1 < len(self.frames) and self.frames[index + 1][0] <= at:
                    index += 1
                    latest = cv2.imdecode(np.frombuffer(self.frames[index][1], np.uint8), cv2.IMREAD_COLOR)
                image = latest[:stream.height, :stream.width]
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        buffer.seek(0)
        return buffer


@pytest.mark.timeout(420)
async def test_a_recording_of_the_janus_demo_page_gives_one_named_student_per_participant(
        janus_server: JanusServer, playwright: Any, demo_url: str, tmp_path: Path,  # noqa: F811
        isolated_env: Path, components: Any) -> None:
    room = 4321
    await create_demo_room(janus_server.url, room)
    cameras = {clip: fake_camera(MEDIA_DIR / clip, tmp_path / f"{Path(clip).stem}.y4m")
               for clip in {clip for _, clip in (*PRESENT, LATE)} | {"no_face.mp4"}}
    present = [DemoPublisher(playwright, demo_url, room, name, cameras[clip]) for name, clip in PRESENT]
    late = DemoPublisher(playwright, demo_url, room, LATE[0], cameras[LATE[1]])
    # The teacher records their own window; their camera shows no face (they are not a student).
    teacher = DemoPublisher(playwright, demo_url, room, "Teacher", cameras["no_face.mp4"], viewport=VIEWPORT)
    everyone = [*present, late, teacher]
    try:
        for publisher in everyone:
            await publisher.launch()
        await asyncio.gather(*(publisher.join() for publisher in present))
        await teacher.join()
        for publisher in present:
            await teacher.wait_for_remote(publisher.name)
        recorder = ScreenRecorder(teacher.page)
        await recorder.start()
        await asyncio.sleep(6)
        await late.join()
        await teacher.wait_for_remote(late.name)
        await asyncio.sleep(6)
        leaver = next(p for p in present if p.name == LEAVER)
        await leaver.leave()
        await asyncio.sleep(6)
        await recorder.stop()
    finally:
        for publisher in everyone:
            await publisher.close()
    recording = recorder.encode()

    outcome = await asyncio.to_thread(analyze_recording, recording, load_settings(), out_dir=isolated_env / "report",
                                      components=components, title="recorded demo class")
    engine = init_store(load_settings().resolved_database_url)
    with session_scope(engine) as session:
        analysis = session.get(Analysis, outcome.analysis_id)
        students = list(session.exec(select(Student).where(Student.analysis_id == outcome.analysis_id)))
    assert analysis is not None and analysis.layout == "gallery"
    names = sorted(s.label for s in students)
    assert names == sorted([*(name for name, _ in PRESENT), LATE[0]]), names
    assert all(s.name_source == "label" for s in students)
    by_name = {s.label: s for s in students}
    # The late joiner appears after the start, the leaver is gone before the end.
    assert by_name[LATE[0]].first_seen >= 3.0
    assert by_name[LEAVER].last_seen <= analysis.duration_seconds - 3.0

