"""Real browsers as meeting participants: headless Chromium on Janus' own VideoRoom demo page.

Debian's ``janus-demos`` ships the demo page a Janus user would open
(``/usr/share/janus/demos/videoroomtest.html`` with ``videoroomtest.js``, ``janus.js`` and
``settings.js``). :func:`serve_demo` serves that folder on 127.0.0.1 (getUserMedia needs a
secure context, and http://127.0.0.1 is one) with a ``settings.js`` of our own that points
the page at the test's Janus. Every :class:`DemoPublisher` is a Chromium process of its
own, because the fake camera (``--use-file-for-fake-video-capture``) is a process-wide
flag: each one sends its own face video, made by :func:`fake_camera` from a clip in
``../shared/media``.

What the tests work around, and nothing else (the page is otherwise used as shipped):

- Debian's ``settings.js`` never defines ``token`` and ``apisecret``, which
  ``videoroomtest.js`` reads when it creates the session (a ReferenceError); ours
  defines both as null.
- The demo refuses display names that are not ASCII letters and digits; real names have
  spaces, accents and worse. :meth:`DemoPublisher.join` lifts that one check out of the
  demo's own ``registerUsername`` and joins through the page's form as a user would.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.janus import JanusRoomClient
from tests.conftest import CHROMIUM_BINARY, require
from tests.janus_server import JanusServer, LoopingVideoTrack

DEMO_DIR = Path("/usr/share/janus/demos")
#: What the VideoRoom demo needs from janus-demos (the page loads janus.js as janus.min.js through javascript/).
DEMO_FILES = (DEMO_DIR / "videoroomtest.html", DEMO_DIR / "videoroomtest.js", DEMO_DIR / "settings.js",
              DEMO_DIR / "javascript" / "janus-gateway" / "janus.min.js")
#: The demo room's settings in Debian's sample janus.plugin.videoroom.jcfg (room 1234): six publishers, 128 kbit/s.
DEMO_ROOM = {"publishers": 6, "bitrate": 128000, "fir_freq": 10}
#: The check in the demo's ``registerUsername`` that refuses names with spaces or accents.
_ALPHANUMERIC_CHECK = "/[^a-zA-Z0-9]/.test(username)"


def demo_page_installed() -> bool:
    """Whether Debian's janus-demos (and the scripts the VideoRoom demo loads) are installed."""
    return all(path.is_file() for path in DEMO_FILES)


async def create_demo_room(url: str, room: int) -> None:
    """Create ``room`` as the demo's room 1234 is configured: no PIN (the page sends none), 128 kbit/s.

    ``VideoRoomHandle.create_room`` takes no bitrate, so the request is written out here;
    it goes through the bot's own Janus client all the same.
    """
    async with JanusRoomClient(url) as admin:
        handle = await admin.attach()
        await handle.request({"request": "create", "room": room, "description": "ClassLens browser class",
                              "permanent": False, "notify_joining": True, **DEMO_ROOM}, f"creating room {room}")


def fake_camera(clip: Path, target: Path, *, seconds: float = 10.0, fps: int = 15,
                size: tuple[int, int] = (640, 360)) -> Path:
    """Write ``clip`` as a Y4M file Chromium can use as its camera: ``size``, ``fps``, at most ``seconds`` long.

    The frames play forwards then backwards, so the loop that Chromium plays has no seam
    where the face would jump (a jump is not what a webcam does). Y4M is raw video:
    Chromium reads it without decoding, which matters with several browsers on two cores.
    """
    width, height = size
    frames = LoopingVideoTrack._frames(clip, fps)  # frames picked at ``fps`` by time, looping the clip
    forward: list[bytes] = []
    first = None
    for frame in frames:
        # A clip shorter than half of ``seconds`` loops back to its first frame: stop there.
        if first is not None and frame.time == first:
            break
        first = frame.time if first is None else first
        forward.append(frame.reformat(width=width, height=height, format="yuv420p").to_ndarray().tobytes())
        if len(forward) >= seconds * fps / 2:
            break
    frames.close()  # closes the clip
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for planes in forward + forward[-2:0:-1]:
            out.write(b"FRAME\n")
            out.write(planes)
    return target


def _settings_js(janus_url: str) -> bytes:
    """The demo's settings: our Janus, no STUN server (nothing outside this machine), no token or secret."""
    return (f"var server = {json.dumps(janus_url)};\n"
            "var iceServers = [];\n"
            "// Debian's settings.js leaves these two undefined, and videoroomtest.js reads them.\n"
            "var token = null;\n"
            "var apisecret = null;\n").encode()


@contextlib.contextmanager
def serve_demo(janus_url: str) -> Iterator[str]:
    """Serve the demo folder on 127.0.0.1 (a port the OS picks) in a thread; yields the page's URL."""
    settings = _settings_js(janus_url)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(DEMO_DIR), **kwargs)

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/settings.js":
                super().do_GET()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(settings)))
            self.end_headers()
            self.wfile.write(settings)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per script and stylesheet would bury the test's own output

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/videoroomtest.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class DemoPublisher:
    """One participant: a headless Chromium process whose camera is ``camera``, on the demo page.

    ``join`` opens the page for ``room``, starts the demo and joins under ``name``; the
    demo then publishes the camera (and the fake microphone) and subscribes to everyone
    else, as it does for a person.
    """

    def __init__(self, playwright: Any, page_url: str, room: int, name: str, camera: Path, *,
                 viewport: dict[str, int] | None = None) -> None:
        self.playwright, self.page_url, self.room, self.name, self.camera = playwright, page_url, room, name, camera
        self.viewport = viewport
        """The page's size in CSS pixels (Playwright's default, 1280×720, when None)."""
        self.browser: Any = None
        self.page: Any = None
        self.console: list[str] = []
        """The page's errors and warnings, for failure messages."""

    async def launch(self) -> None:
        """Start this participant's own Chromium with its fake camera and microphone."""
        self.browser = await self.playwright.chromium.launch(executable_path=CHROMIUM_BINARY, args=[
            "--no-sandbox",
            "--use-fake-ui-for-media-stream",  # grant camera and microphone without asking
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={self.camera}",
            "--autoplay-policy=no-user-gesture-required",  # remote feeds play without a click
        ])

    async def join(self, timeout: float = 60.0) -> None:
        """Open the demo page, press Start, and join the room under ``name`` through the page's form.

        The demo's join refuses names that are not ASCII letters and digits, so the one
        check is lifted out of its ``registerUsername`` first; everything else (the join
        request, publishing, subscribing) is the demo's own code.
        """
        if self.page is None:
            self.page = await (self.browser.new_page(viewport=self.viewport) if self.viewport
                               else self.browser.new_page())
            self.page.on("console", self._console)
            self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
            await self.page.goto(f"{self.page_url}?room={self.room}")
        else:
            await self.page.reload()  # what a person does after the server went away
        await self.page.click("#start")
        await self.page.wait_for_selector("#username", state="visible", timeout=timeout * 1000)
        lifted = await self.page.evaluate("""(check) => {
            const source = registerUsername.toString();
            if (!source.includes(check)) return false;
            // A global function declaration: the Enter key's handler looks it up by name at each press.
            window.registerUsername = (0, eval)("(" + source.replace(check, "false") + ")");
            return true;
        }""", _ALPHANUMERIC_CHECK)
        assert lifted, f"videoroomtest.js no longer checks names with {_ALPHANUMERIC_CHECK}; update the workaround"
        await self.page.fill("#username", self.name)
        await self.page.press("#username", "Enter")
        # The demo shows its bandwidth menu once Janus says our PeerConnection is up: we are publishing.
        await self.page.wait_for_selector("#bitrateset", state="visible", timeout=timeout * 1000)

    async def wait_for_remote(self, display: str, timeout: float = 60.0) -> None:
        """Wait until the page shows ``display``'s feed as a playing video (a remote panel with frames)."""
        await self.page.wait_for_function("""(display) => {
            for (let i = 1; i < 6; i++) {
                const label = document.getElementById("remote" + i);
                const video = document.querySelector("#videoremote" + i + " video");
                if (label && label.textContent === display && video && video.videoWidth > 0) return true;
            }
            return false;
        }""", arg=display, timeout=timeout * 1000)

    async def unpublish(self) -> None:
        """Press the demo's Unpublish button: the camera stops, the participant stays on the page."""
        await self.page.click("#unpublish")

    async def leave(self) -> None:
        """Press the demo's Stop button: the page destroys its Janus session, and Janus tells the room at once.

        (Closing the tab is no quicker way out: janus.js' unload handler does not get its
        ``destroy`` through, and Janus notices the silent session only after its 60 s timeout.)
        """
        await self.page.click("#start")
        # Once its session is destroyed the demo reloads itself: the page's introduction is back.
        await self.page.wait_for_selector("#details", state="attached", timeout=30_000)

    async def close(self) -> None:
        """Leave as a person closing the tab does (janus.js destroys its session on unload), then quit Chromium."""
        if self.page is not None:
            with contextlib.suppress(Exception):
                await self.page.close(run_before_unload=True)
            self.page = None
        if self.browser is not None:
            with contextlib.suppress(Exception):
                await self.browser.close()
            self.browser = None

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"{message.type}: {message.text}")


@pytest.fixture(scope="module")
def demo_url(janus_server: JanusServer) -> Iterator[str]:
    """The demo page, served on 127.0.0.1 and pointed at the module's Janus."""
    # Module-scoped fixtures run before the per-test marker check: fail loudly in CI here too.
    require(demo_page_installed(), "needs Debian's janus-demos package (run scripts/setup-system)")
    with serve_demo(janus_server.url) as url:
        yield url


@pytest.fixture
async def playwright() -> AsyncIterator[Any]:
    """Playwright for one test; leaving it kills every Chromium the test launched, whatever happened."""
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        yield driver
