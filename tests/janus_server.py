"""A real Janus server for the bot's integration tests, configured in a temporary folder.

Only the plain-HTTP transport and the VideoRoom plugin are loaded. The HTTP API listens
on an ephemeral port of the machine's own (non-loopback) address, and ICE is restricted
to that address too: aiortc and Janus both ignore loopback candidates, so media has to
flow over the machine's real interface. Rooms are created by the tests through the API;
the configuration file holds none. Admin API, event handlers and loggers are off.
"""

from __future__ import annotations

import asyncio
import fractions
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require

JANUS_BINARY = Path("/usr/bin/janus")
_LIBRARY_ROOT = Path("/usr/lib/x86_64-linux-gnu/janus")


def machine_address() -> str:
    """The IPv4 address of the interface that the default route leaves through (never loopback).

    A UDP ``connect`` sends no packet; it only asks the kernel which source address it
    would use, which is the address other peers on the network reach this machine at.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))
        address = str(probe.getsockname()[0])
    except OSError:
        address = ""
    finally:
        probe.close()
    if not address or address.startswith("127."):
        raise RuntimeError("this machine has no non-loopback IPv4 address; Janus media cannot flow")
    return address


def free_tcp_port(host: str) -> int:
    """A TCP port the OS says is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _library_folder(kind: str) -> Path:
    """Janus' plugin/transport folder; Debian's multiarch path, or whatever holds the libraries."""
    folder = _LIBRARY_ROOT / kind
    if folder.is_dir():
        return folder
    matches = sorted(Path("/usr/lib").glob(f"*/janus/{kind}"))
    if not matches:
        raise RuntimeError(f"cannot find Janus' {kind} folder under /usr/lib")
    return matches[0]


def _others(kind: str, keep: str) -> str:
    """Comma-separated library names of ``kind`` to disable: everything but ``keep``."""
    names = sorted(p.name for p in _library_folder(kind).glob("libjanus_*.so"))
    return ",".join(name for name in names if name != keep)


class JanusServer:
    """One Janus process with its own configuration folder; ``restart`` keeps the port."""

    def __init__(self, workdir: Path, *, rtp_ports: int = 100) -> None:
        self.workdir = workdir
        self.host = machine_address()
        self.port = free_tcp_port(self.host)
        # A small RTP range per server (one port per peer connection, bundled), at a random spot
        # so that parallel test runs rarely meet.
        low = random.randrange(20000, 39000, 100)
        self.rtp_port_range = f"{low}-{low + rtp_ports - 1}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "janus.log"
        self._write_config()

    @property
    def url(self) -> str:
        """Base URL of the Janus HTTP API."""
        return f"http://{self.host}:{self.port}/janus"

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "janus.jcfg").write_text(f"""general: {{
    configs_folder = "{self.workdir}"
    plugins_folder = "{_library_folder('plugins')}"
    transports_folder = "{_library_folder('transports')}"
    events_folder = "{_library_folder('events')}"
    loggers_folder = "{_library_folder('loggers')}"
    debug_level = 4
    debug_timestamps = true
    debug_colors = false
    session_timeout = 60
    server_name = "ClassLensTestJanus"
}}
certificates: {{
}}
media: {{
    ipv6 = false
    rtp_port_range = "{self.rtp_port_range}"
}}
nat: {{
    nice_debug = false
    ignore_mdns = true
    full_trickle = false
    ice_enforce_list = "{self.host}"
}}
plugins: {{
    disable = "{_others('plugins', 'libjanus_videoroom.so')}"
}}
transports: {{
    disable = "{_others('transports', 'libjanus_http.so')}"
}}
loggers: {{
    disable = "{_others('loggers', '')}"
}}
events: {{
    broadcast = false
    disable = "{_others('events', '')}"
}}
""")
        (self.workdir / "janus.transport.http.jcfg").write_text(f"""general: {{
    json = "compact"
    base_path = "/janus"
    http = true
    port = {self.port}
    ip = "{self.host}"
    https = false
}}
admin: {{
    admin_http = false
    admin_https = false
}}
cors: {{
}}
""")
        (self.workdir / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")

    def start(self, timeout: float = 20.0) -> None:
        """Start Janus and wait until its HTTP API answers ``info``."""
        if self.process is not None:
            raise RuntimeError("Janus is already running")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(JANUS_BINARY), "-C", str(self.workdir / "janus.jcfg"), "-F", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Janus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                reply = httpx.get(f"{self.url}/info", timeout=1.0)
                if reply.status_code == 200 and "janus.plugin.videoroom" in reply.json().get("plugins", {}):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Janus did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop Janus (SIGTERM, then SIGKILL if it lingers)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start again on the same port: every session, handle and room is gone."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        """The end of Janus' log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class LoopingVideoTrack:
    """A participant's camera: a face video decoded with PyAV, looped, at a few frames per second.

    aiortc's MediaPlayer cannot loop these short files, and a low frame rate keeps the
    test's encoders cheap. Decoding runs in a thread so the event loop never blocks.
    ``freeze_after`` frames, the camera stops sending while its connection stays up.
    """

    def __init__(self, path: Path, fps: float = 8.0, *, freeze_after: int | None = None) -> None:
        from aiortc import MediaStreamTrack

        frames = self._frames(path, fps)
        clock = {"start": 0.0, "count": 0}
        frozen = asyncio.Event()  # never set: a frozen camera keeps the connection but sends nothing

        class _Track(MediaStreamTrack):
            kind = "video"

            async def recv(inner) -> Any:  # noqa: N805  (the inner track; self is the wrapper)
                if freeze_after is not None and clock["count"] >= freeze_after:
                    await frozen.wait()
                now = time.monotonic()
                if clock["count"] == 0:
                    clock["start"] = now
                due = clock["start"] + clock["count"] / fps
                if due > now:
                    await asyncio.sleep(due - now)
                frame = await asyncio.to_thread(next, frames)
                frame.pts = round(clock["count"] / fps * 90000)
                frame.time_base = fractions.Fraction(1, 90000)
                clock["count"] += 1
                return frame

        self.track = _Track()

    @staticmethod
    def _frames(path: Path, fps: float) -> Any:
        import av

        while True:
            with av.open(str(path)) as container:
                next_due = 0.0
                for frame in container.decode(video=0):
                    if frame.time is not None and frame.time + 1e-6 < next_due:
                        continue
                    next_due = (frame.time or 0.0) + 1.0 / fps
                    yield frame


@pytest.fixture(scope="module")
def janus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JanusServer]:
    """A running Janus for one test module; stopped at teardown whatever happened."""
    # Module-scoped fixtures run before the per-test marker check, so check here too (fails in CI).
    require(JANUS_BINARY.exists(), "needs Debian's janus package (run scripts/setup-system)")
    server = JanusServer(tmp_path_factory.mktemp("janus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def start_cli_bot(janus_url: str, room: int, env: dict[str, str], *options: str) -> asyncio.subprocess.Process:
    """``classlens bot join`` as its own process (as a host runs it), quiet, with stdout and stderr piped."""
    import sys

    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "classlens", "bot", "join", "--janus", janus_url, "--room", str(room), "--quiet",
        *options, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
