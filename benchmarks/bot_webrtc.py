"""Benchmark: participants per bot process with real WebRTC (``benchmarks/bot.py --webrtc``).

A real Janus (Debian's ``janus``, configured as in the tests) hosts a VideoRoom. Separate
processes (``benchmarks/webrtc_publishers.py``) publish N cameras of real faces at 640×360
and 15 fps over aiortc, each its own Janus session. The measured bot is the product's own
``MeetingBot``, in this process: it joins the room like ``classlens bot join``, subscribes
to every feed over one bundled peer connection and analyses them at the sampling rate.
Everything a meeting costs the bot is therefore in the numbers: ICE, DTLS, SRTP, RTP
and RTCP, the jitter buffer, VP8 decoding of every frame, sampling, analysis and the store.

Per run, over a measuring window that starts once every feed delivers frames:

* frames received, against the 15 fps × N × window the cameras sent: the transport kept up;
* frames dropped by the sampler because analysis fell behind (must be 0);
* latency from a sampled frame's arrival to its faces' results in the store (p50, p95);
* the bot's CPU, per thread, split into transport (the event loop: ICE, DTLS, SRTP, RTP,
  jitter buffer, depacketising, sampling, Janus' API), decode (aiortc's decoder threads),
  analysis (the live thread pool, onnxruntime's threads, the dispatcher) and other
  (asyncio's default executor: the bot's own card video, store writes);
* the CPU of the publisher processes and of Janus, which share the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # imported by benchmarks/bot.py run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from bot.janus import JanusRoomClient  # noqa: E402
from bot.live import create_live_analysis  # noqa: E402
from bot.meeting import MeetingBot, MeetingTarget  # noqa: E402
from kernel.consent import ConsentPolicy  # noqa: E402
from kernel.settings import Settings  # noqa: E402
from kernel.store import init_store  # noqa: E402
from pipeline.models import PipelineComponents  # noqa: E402
from tests.janus_server import JanusServer  # noqa: E402  (the tests' Janus: same configuration)

PUBLISHERS_SCRIPT = REPO_ROOT / "benchmarks" / "webrtc_publishers.py"
SECTION_BEGIN = "<!-- benchmarks/bot.py --webrtc: begin -->"
SECTION_END = "<!-- benchmarks/bot.py --webrtc: end -->"
#: Frame rate each camera sends (webrtc_publishers.CAMERA_FPS).
CAMERA_FPS = 15
#: Seconds between every feed delivering frames and the start of the measuring window.
WARM_UP_SECONDS = 5.0
#: A run "keeps up" when this share of the frames sent arrived, none was dropped and p95 is below 1 s.
RECEIVED_SHARE_NEEDED = 0.95
LATENCY_P95_LIMIT = 1.0
#: The bot's threads by what they do (see the module docstring).
PARTS = ("transport", "decode", "analysis", "other")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Linux' limit on a thread's name (``comm``), without the terminating zero.
THREAD_NAME_LIMIT = 15
#: The name the event loop's thread runs under, and the one the model-loading thread lends
#: to the native threads (onnxruntime's) it starts.
LOOP_THREAD_NAME = "bot-loop"
MODELS_THREAD_NAME = "classlens-models"


def set_thread_name(name: str) -> None:
    """Name the calling thread for the kernel (``/proc/self/task/TID/comm``).

    Native threads (onnxruntime's pool, libvpx's decoding threads) inherit the name of the
    thread that starts them, so naming every Python thread lets the CPU split account for
    the native threads it starts too.
    """
    Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:THREAD_NAME_LIMIT])


def name_threads_for_the_kernel() -> None:
    """Make every Python thread started from now on carry its Python name in the kernel too."""
    original_run = threading.Thread.run
    if getattr(original_run, "names_threads", False):
        return

    def run(self: threading.Thread) -> None:
        with contextlib.suppress(OSError):  # not Linux: the split then counts such threads as "other"
            set_thread_name(self.name)
        original_run(self)

    run.names_threads = True  # type: ignore[attr-defined]
    threading.Thread.run = run  # type: ignore[method-assign]


def udp_receive_errors() -> int:
    """Datagrams the kernel dropped machine-wide because a socket's receive buffer was full."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RcvbufErrors")])


def cpu_seconds_of(stat_path: Path) -> float:
    """User + system CPU seconds from a ``/proc/.../stat`` file (0 if it is gone)."""
    try:
        text = stat_path.read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def part_of_thread(name: str) -> str:
    """Which part of the bot a thread works for, from its kernel name (see :func:`name_threads_for_the_kernel`)."""
    if name == LOOP_THREAD_NAME:
        return "transport"
    if name.startswith("classlens-"):
        return "analysis"  # the live pool, the dispatcher, onnxruntime's threads
    if name == "video-decoder":
        return "decode"  # aiortc's decoder threads and libvpx's own
    return "other"


def bot_cpu_by_part() -> dict[str, float]:
    """CPU seconds this process's threads have used so far, summed per part."""
    totals = dict.fromkeys(PARTS, 0.0)
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        totals[part_of_thread(name)] += cpu_seconds_of(task / "stat")
    return totals


def load_components_naming_their_threads(settings: Settings) -> PipelineComponents:
    """Load the models on this thread under the analysis' name, so onnxruntime's threads carry it."""
    name_threads_for_the_kernel()
    set_thread_name(MODELS_THREAD_NAME)
    try:
        return PipelineComponents.load(settings)
    finally:
        set_thread_name(LOOP_THREAD_NAME)


@dataclass
class Snapshot:
    """The bot's counters at one moment."""

    wall: float
    cpu: dict[str, float]
    janus_cpu: float
    udp_errors: int
    received: int
    sampled: int
    dropped: int
    latencies_recorded: int
    latencies: list[float] = field(repr=False)


@dataclass
class WebRtcRun:
    """One run: N real WebRTC participants, the bot sampling at one rate."""

    fps: float
    participants: int
    seconds: float
    frames_sent: int
    frames_received: int
    frames_sampled: int
    frames_dropped: int
    latency_p50: float | None
    latency_p95: float | None
    bot_cores: dict[str, float]
    publisher_cores: float
    janus_cores: float
    load_average: float
    students: int
    udp_drops: int
    """Datagrams the kernel dropped in the window because a receive buffer was full (the bot read too late)."""
    loop_lag_p95: float
    """p95 of how late the bot's event loop ran a timer due every 50 ms, in seconds."""

    @property
    def received_share(self) -> float:
        """Frames that arrived at the bot, of those the cameras sent in the window."""
        return self.frames_received / max(self.frames_sent, 1)

    @property
    def kept_up(self) -> bool:
        """Every frame sent arrived (within 5 %), none was dropped, and p95 latency is under a second."""
        return (self.frames_dropped == 0 and self.received_share >= RECEIVED_SHARE_NEEDED
                and self.latency_p95 is not None and self.latency_p95 < LATENCY_P95_LIMIT)

    @property
    def bot_total(self) -> float:
        """Cores the bot process used."""
        return sum(self.bot_cores.values())


def snapshot(bot: MeetingBot, janus_pid: int) -> Snapshot:
    """The bot's CPU per part, Janus' CPU and the live counters now."""
    stats = bot.live_stats
    assert stats is not None
    return Snapshot(time.monotonic(), bot_cpu_by_part(), cpu_seconds_of(Path(f"/proc/{janus_pid}/stat")),
                    udp_receive_errors(),
                    stats.frames_received, stats.frames_sampled, stats.frames_dropped,
                    len(stats.latencies), stats.latencies)


async def start_publishers(janus: JanusServer, room: int, participants: int, processes: int,
                           media_dir: Path) -> list[asyncio.subprocess.Process]:
    """Start the publisher processes and wait until every participant publishes."""
    started: list[asyncio.subprocess.Process] = []
    first = 1
    for index in range(processes):
        count = participants // processes + (1 if index < participants % processes else 0)
        if not count:
            continue
        started.append(await asyncio.create_subprocess_exec(
            sys.executable, str(PUBLISHERS_SCRIPT), janus.url, str(room), "--first", str(first), "--count",
            str(count), "--media-dir", str(media_dir), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE))
        first += count
    for process in started:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=180)
        if line.strip() != b"ready":
            raise RuntimeError(f"a publisher process did not start (it said {line!r}); see its stderr above")
    return started


async def stop_publishers(publishers: list[asyncio.subprocess.Process]) -> float:
    """Close the publishers' standard input; return the cores they used while publishing, together."""
    cores = 0.0
    for process in publishers:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
    for process in publishers:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
            cores += float(json.loads(line)["cores"]) if line.strip() else 0.0
        except (TimeoutError, ValueError):
            process.kill()
        await process.wait()
    return cores


async def loop_lags(seconds: float, period: float = 0.05) -> list[float]:
    """Sleep ``period`` at a time for ``seconds``; return how late each wake-up came (the loop's lag)."""
    lags: list[float] = []
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        await asyncio.sleep(period)
        lags.append(max(0.0, time.monotonic() - now - period))
    return lags


async def wait_for_every_feed(bot: MeetingBot, participants: int, timeout: float) -> None:
    """Wait until the bot receives frames from every participant."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = bot.live_stats
        if stats is not None and sum(1 for p in stats.participants.values() if p.frames_received) >= participants:
            return
        await asyncio.sleep(0.5)
    stats = bot.live_stats
    seen = 0 if stats is None else sum(1 for p in stats.participants.values() if p.frames_received)
    raise RuntimeError(f"only {seen} of {participants} feeds delivered frames within {timeout:.0f} s")


async def run_webrtc_once(settings: Settings, components: PipelineComponents, janus: JanusServer,
                          participants: int, seconds: float, processes: int, media_dir: Path) -> WebRtcRun:
    """One class: ``participants`` publishers, the bot joined, measured for ``seconds``."""
    room = 7000 + participants
    async with JanusRoomClient(janus.url) as admin:
        await (await admin.attach()).create_room(room, publishers=participants + 2,
                                                  description=f"benchmark, {participants} participants")
    publishers = await start_publishers(janus, room, participants, processes, media_dir)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="benchmark", title=f"{participants} over WebRTC",
                                       owner_id=None, course="", host_email=None, consent=ConsentPolicy.everyone())
    bot = MeetingBot(settings, engine, analysis_id, MeetingTarget(janus.url, room, None, "ClassLens benchmark"),
                     components=components)
    task = asyncio.create_task(bot.run())
    publisher_cores = 0.0
    try:
        await wait_for_every_feed(bot, participants, timeout=120)
        await asyncio.sleep(WARM_UP_SECONDS)
        assert janus.process is not None
        load_before = os.getloadavg()[0]
        before = snapshot(bot, janus.process.pid)
        lags = await loop_lags(seconds)
        after = snapshot(bot, janus.process.pid)
        load_after = os.getloadavg()[0]
        students = bot.status.students_live
    finally:
        bot.stop("the benchmark ended")
        await task
        publisher_cores = await stop_publishers(publishers)
    wall = after.wall - before.wall
    new_latencies = after.latencies[len(after.latencies) - (after.latencies_recorded - before.latencies_recorded):] \
        if after.latencies_recorded > before.latencies_recorded else []
    window = np.asarray(new_latencies) if new_latencies else None
    return WebRtcRun(
        fps=settings.sample_fps, participants=participants, seconds=wall,
        frames_sent=round(participants * CAMERA_FPS * wall),
        frames_received=after.received - before.received, frames_sampled=after.sampled - before.sampled,
        frames_dropped=after.dropped - before.dropped,
        latency_p50=None if window is None else float(np.percentile(window, 50)),
        latency_p95=None if window is None else float(np.percentile(window, 95)),
        bot_cores={part: (after.cpu[part] - before.cpu[part]) / wall for part in PARTS},
        publisher_cores=publisher_cores, janus_cores=(after.janus_cpu - before.janus_cpu) / wall,
        load_average=max(load_before, load_after), students=students, udp_drops=after.udp_errors - before.udp_errors,
        loop_lag_p95=float(np.percentile(np.asarray(lags), 95)) if lags else 0.0)


async def webrtc_ramp(base: Settings, components: PipelineComponents, *, fps: float, participants: list[int],
                      seconds: float, processes: int, media_dir: Path) -> list[WebRtcRun]:
    """Ramp the participants at ``fps`` until the bot no longer keeps up."""
    results: list[WebRtcRun] = []
    with tempfile.TemporaryDirectory(prefix="classlens-bot-webrtc-") as tmp:
        janus = JanusServer(Path(tmp) / "janus", rtp_ports=max(participants) * 2 + 50)
        janus.start()
        try:
            for count in participants:
                settings = base.model_copy(update={"sample_fps": fps, "data_dir": Path(tmp) / f"{fps}-{count}"})
                result = await run_webrtc_once(settings, components, janus, count, seconds, processes, media_dir)
                results.append(result)
                print(webrtc_table([result]).splitlines()[-1], flush=True)
                if not result.kept_up:
                    break
        finally:
            janus.stop()
    return results


def seconds_text(value: float | None) -> str:
    """A latency for the table."""
    return "–" if value is None else f"{value:.2f}"


def webrtc_table(results: list[WebRtcRun]) -> str:
    """The runs as a markdown table."""
    lines = ["| participants | frames received / sent | frames analysed | dropped | latency p50 / p95 (s) "
             "| bot CPU (cores) | transport | decode | analysis | other | per participant | publishers | Janus "
             "| UDP datagrams lost in full buffers | event loop lag p95 (ms) | load average | kept up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.bot_cores
        lines.append(
            f"| {r.participants} | {r.frames_received} / {r.frames_sent} ({100 * r.received_share:.0f} %) "
            f"| {r.frames_sampled} | {r.frames_dropped} | {seconds_text(r.latency_p50)} / "
            f"{seconds_text(r.latency_p95)} | {r.bot_total:.2f} | {c['transport']:.2f} | {c['decode']:.2f} "
            f"| {c['analysis']:.2f} | {c['other']:.2f} | {r.bot_total / r.participants:.3f} "
            f"| {r.publisher_cores:.2f} | {r.janus_cores:.2f} | {r.udp_drops} | {1000 * r.loop_lag_p95:.0f} "
            f"| {r.load_average:.1f} | "
            f"{'yes' if r.kept_up else 'no'} |")
    return "\n".join(lines)


def per_participant_text(results: list[WebRtcRun]) -> str:
    """The bot's CPU per participant and part, averaged over the runs that kept up."""
    kept = [r for r in results if r.kept_up] or results
    shares = {part: float(np.mean([r.bot_cores[part] / r.participants for r in kept])) for part in PARTS}
    return ", ".join(f"{part} {1000 * value:.1f}" for part, value in shares.items())


def webrtc_docs_section(info: dict[str, str], command: str, results: list[WebRtcRun], fps: float) -> str:
    """The WebRTC section of docs/benchmarks.md."""
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    kept = [r.participants for r in results if r.kept_up]
    best = max(kept, default=0)
    first_miss = next((r for r in results if not r.kept_up), None)
    cores = len(os.sched_getaffinity(0))
    kept_runs = [r for r in results if r.kept_up] or results
    per_participant = float(np.mean([r.bot_total / r.participants for r in kept_runs]))
    projection = cores / per_participant if per_participant else 0.0
    summary = (f"**{best} participants** kept up at {fps:g} fps in one bot process on this {cores}-core machine, "
               f"which also ran the publishers and Janus")
    if first_miss is not None:
        summary += (f"; at {first_miss.participants} the bot did not keep up "
                    f"({100 * first_miss.received_share:.0f} % of frames received, {first_miss.frames_dropped} "
                    f"dropped, p95 {seconds_text(first_miss.latency_p95)} s, load average "
                    f"{first_miss.load_average:.1f})")
    return f"""{SECTION_BEGIN}
## Bot: live participants per process over real WebRTC (`benchmarks/bot.py --webrtc`)

Measured {dt.date.today().isoformat()} on a CPU-only machine; absolute numbers hold for this machine only.

{machine}

Command (from the repository root):

```
{command}
```

A real Janus VideoRoom on this machine; N participants publish real face clips (640×360, 15 fps, VP8 at
400 kbit/s, a keyframe every 2 s) from separate aiortc processes (`benchmarks/webrtc_publishers.py`; the
clips are encoded once, so the senders stay cheap); the product's `MeetingBot` joins the room, subscribes to
every feed and samples each at {fps:g} fps. The window of each run starts {WARM_UP_SECONDS:g} s after every
feed delivers frames. "Kept up" = at least {100 * RECEIVED_SHARE_NEEDED:.0f} % of the frames sent arrived,
none was dropped by the sampler and p95 frame arrival → results stored is under {LATENCY_P95_LIMIT:g} s.
CPU columns are cores (CPU seconds per second of wall time) of the bot's threads: transport = the event
loop (ICE, DTLS, SRTP, RTP/RTCP, jitter buffer, depacketising, sampling, Janus' API), decode = aiortc's VP8
decoder threads, analysis = the live thread pool, onnxruntime and the dispatcher, other = asyncio's default
executor (the bot's card video, store writes). Publishers and Janus are the other processes on the same
cores; the load average counts them all.

{webrtc_table(results)}

Result: {summary}. The bot spends, per participant (millicores, over the runs that kept up):
{per_participant_text(results)}. At {1000 * per_participant:.1f} millicores per participant, two cores
given to the bot alone would carry about {projection:.0f} participants (a projection from the measured
per-participant cost, not a measured run).
{SECTION_END}
"""
