"""Benchmark: how many meeting participants one bot process analyses in real time.

N participants are fed straight into a :class:`bot.live.LiveSession` as local
``ReplayVideoTrack`` objects that replay real face videos from ``../shared/media``
(decoded once into memory as YUV frames, as a WebRTC decoder hands them over) at
15 fps each. This measures the bot process itself (sampling, conversion, detection,
tracking, cropping, in-process inference, the store), not WebRTC transport or VP8/H.264
decoding, which a real meeting adds per participant (see the docs section).

For each sampling rate, N is ramped until frames are dropped. For every run:

* drops: sampled frames the bot had to drop because it fell behind (must be 0);
* CPU per participant: process CPU time / wall time / N, in cores;
* latency: from a sampled frame's arrival to its faces' results being in the store
  (p50, p95; the in-process dispatcher stores in submission order).

``--webrtc`` measures the same bot over real WebRTC instead: a real Janus room, publishers
in other processes, the product's ``MeetingBot`` receiving, decoding and analysing every
feed (``benchmarks/bot_webrtc.py`` says what is measured and how).

Usage::

    python benchmarks/bot.py [--seconds 20] [--fps 1 2] [--participants 10 20 30 40] [--write-docs]
    python benchmarks/bot.py --webrtc [--seconds 20] [--fps 1] [--participants 10 20 30 40] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from analyze import machine_info, write_docs  # noqa: E402  (benchmarks/analyze.py: machine description, docs)

from bot.live import LiveSession, ReplayVideoTrack, create_live_analysis, decode_video_frames  # noqa: E402
from kernel.consent import ConsentPolicy  # noqa: E402
from kernel.settings import Settings, load_settings  # noqa: E402
from kernel.store import init_store  # noqa: E402
from pipeline.models import PipelineComponents  # noqa: E402

DEFAULT_MEDIA_DIR = REPO_ROOT.parent / "shared" / "media"
SECTION_BEGIN = "<!-- benchmarks/bot.py: begin -->"
SECTION_END = "<!-- benchmarks/bot.py: end -->"
#: Frame rate of every replayed camera (a typical WebRTC camera track).
CAMERA_FPS = 15
#: The clips replayed, alternating between participants (one face each, 640×360).
CLIPS = ("WolfgangLanger_Pexels.mp4", "single_face.mp4")


@dataclass
class RunResult:
    """One run: N participants at one sampling rate."""

    fps: float
    participants: int
    seconds: float
    frames_sampled: int
    frames_dropped: int
    cpu_cores: float
    latency_p50: float | None
    latency_p95: float | None
    students: int
    load_average: float
    """The machine's 1-minute load average at the end of the run (other processes compete for the cores)."""

    @property
    def cpu_per_participant(self) -> float:
        """Cores used per participant."""
        return self.cpu_cores / self.participants


async def run_once(settings: Settings, components: PipelineComponents, clips: list[list[av.VideoFrame]],
                   participants: int, seconds: float) -> RunResult:
    """Run one live session with ``participants`` replayed cameras for ``seconds``."""
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="benchmark", title=f"{participants} participants",
                                       owner_id=None, course="", host_email=None, consent=ConsentPolicy.everyone())
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(participants):
        track = ReplayVideoTrack(clips[index % len(clips)], CAMERA_FPS, seconds=seconds)
        session.add_participant(f"p{index}", f"Student {index + 1:02d}", track)
    await asyncio.sleep(seconds)
    stats = session.stats
    outcome = await session.aclose()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return RunResult(settings.sample_fps, participants, seconds, outcome.frames_sampled, outcome.frames_dropped,
                     cpu / wall, stats.latency_percentile(50), stats.latency_percentile(95), outcome.students,
                     os.getloadavg()[0])


def vp8_decode_cores(frames: list[av.VideoFrame]) -> float:
    """Cores one participant's VP8 decoding takes at CAMERA_FPS: the clip encoded in memory, decoded single-threaded.

    A real meeting decodes every frame of every participant before the bot samples; the
    replayed tracks skip that, so it is measured separately and added in the docs.
    """
    import io

    encoded = io.BytesIO()
    with av.open(encoded, "w", format="webm") as output:
        stream = output.add_stream("libvpx", rate=CAMERA_FPS)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for frame in frames:
            copy = frame.reformat(format="yuv420p")
            copy.pts = None
            output.mux(stream.encode(copy))
        output.mux(stream.encode())
    encoded.seek(0)
    started, decoded = time.process_time(), 0
    with av.open(encoded, "r") as container:
        container.streams.video[0].thread_type = "NONE"
        for _frame in container.decode(video=0):
            decoded += 1
    return (time.process_time() - started) / decoded * CAMERA_FPS


def seconds_text(value: float | None) -> str:
    """Latency for the table."""
    return "–" if value is None else f"{value:.2f}"


def markdown_table(results: list[RunResult]) -> str:
    """The results as a markdown table."""
    lines = ["| sample fps | participants | frames analysed | frames dropped | CPU (cores of "
             f"{len(os.sched_getaffinity(0))}) | CPU per participant | latency p50 (s) | latency p95 (s) | students "
             "| load average |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.fps:g} | {r.participants} | {r.frames_sampled} | {r.frames_dropped} | {r.cpu_cores:.2f} | "
                     f"{r.cpu_per_participant:.3f} | {seconds_text(r.latency_p50)} | {seconds_text(r.latency_p95)} | "
                     f"{r.students} | {r.load_average:.1f} |")
    return "\n".join(lines)


def sustained(results: list[RunResult], fps: float) -> int:
    """The most participants run at ``fps`` without a drop."""
    return max((r.participants for r in results if r.fps == fps and r.frames_dropped == 0), default=0)


def docs_section(info: dict[str, str], command: str, table: str, results: list[RunResult], decode: float) -> str:
    """This benchmark's section of docs/benchmarks.md."""
    rates = sorted({r.fps for r in results})
    summary = "; ".join(f"at {fps:g} fps: {sustained(results, fps)} participants without drops" for fps in rates)
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    clean = [r for r in results if not r.frames_dropped]
    frame_ms = 1000 * sum(r.cpu_cores * r.seconds for r in clean) / max(sum(r.frames_sampled for r in clean), 1)
    class_of_30 = [r for r in clean if r.fps == 1 and r.participants == 30]
    first_drops = [r for r in results if r.frames_dropped]
    reading = (f"Every analysed frame costs about {frame_ms:.0f} ms of CPU (BGR conversion, detection, tracking, "
               "crops, emotion and engagement inference, the store), spread over both cores by onnxruntime and the "
               "thread pool")
    if class_of_30:
        reading += f"; a class of 30 at 1 fps took {class_of_30[0].cpu_cores:.2f} cores"
    if first_drops:
        reading += ("; drops start when the process would need more than the CPU it gets: "
                    + ", ".join(f"{r.cpu_cores:.2f} cores at {r.participants} participants and {r.fps:g} fps "
                                f"(load average {r.load_average:.1f})" for r in first_drops))
    reading += ". With other processes on the machine the limit comes earlier; the load average column shows them."
    return f"""{SECTION_BEGIN}
## Bot: live participants per process (`benchmarks/bot.py`)

Measured {dt.date.today().isoformat()} on a CPU-only machine shared with other work; absolute numbers hold for
this machine only.

{machine}

Command (from the repository root):

```
{command}
```

Every participant is a local `ReplayVideoTrack` replaying a real face clip (640×360, decoded once into
memory) at {CAMERA_FPS} fps into one `LiveSession` with in-process inference and a SQLite store. This
measures the bot process itself: every frame is received and sampled, sampled frames are converted to BGR,
detected, tracked, cropped and inferred on, and the results are stored. WebRTC transport and VP8/H.264
decoding, which a real meeting adds for every participant's full frame rate, are not included.
CPU = process CPU time / wall time; latency = a sampled frame's arrival → its faces' results in the store;
load average = the machine's 1-minute load average at the end of the run (on {len(os.sched_getaffinity(0))} cores;
above that, other processes took part of the CPU).
The ramp stops at the first run that drops frames.

{table}

Result: {summary}. VP8 decoding of one participant's camera (640×360, {CAMERA_FPS} fps, measured in the
same run, single-threaded) adds {decode:.3f} cores per participant, e.g. {30 * decode:.2f} cores for a class of 30;
aiortc's RTP/SRTP handling in Python adds more that this benchmark does not measure.

{reading}
{SECTION_END}
"""


async def main_async(args: argparse.Namespace) -> tuple[list[RunResult], float]:
    """Ramp the participants at every sampling rate; stop a rate at its first run with drops."""
    base = load_settings(execution_provider="cpu", live_worker_threads=args.threads)
    components = await asyncio.to_thread(PipelineComponents.load, base)
    clips = [decode_video_frames(args.media_dir / name, limit=CAMERA_FPS * 10) for name in CLIPS]
    decode = vp8_decode_cores(clips[0])
    print(f"VP8 decoding: {decode:.3f} cores per participant at {CAMERA_FPS} fps", flush=True)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="classlens-bot-bench-") as tmp:
        for fps in args.fps:
            for participants in args.participants:
                settings = base.model_copy(update={"sample_fps": fps, "data_dir": Path(tmp) / f"{fps}-{participants}"})
                result = await run_once(settings, components, clips, participants, args.seconds)
                results.append(result)
                print(markdown_table([result]).splitlines()[-1], flush=True)
                if result.frames_dropped:
                    break
    return results, decode


def main() -> None:
    """Parse arguments, run the ramp, print the table and optionally record it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="class time per run")
    parser.add_argument("--fps", type=float, nargs="+", default=[1.0, 2.0], help="sampling rates")
    parser.add_argument("--participants", type=int, nargs="+", default=[10, 20, 30, 40, 50, 60],
                        help="participant counts to ramp through")
    parser.add_argument("--threads", type=int, default=None,
                        help="live_worker_threads (default: the setting's default)")
    parser.add_argument("--media-dir", type=Path, default=DEFAULT_MEDIA_DIR)
    parser.add_argument("--webrtc", action="store_true",
                        help="real WebRTC: a Janus room, publishers in other processes, the MeetingBot")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="with --webrtc: the bot's event loop (uvloop reads many datagrams per wake-up)")
    parser.add_argument("--publisher-processes", type=int, default=2,
                        help="with --webrtc: processes the publishers are spread over")
    parser.add_argument("--write-docs", action="store_true", help="record the results in docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f ms %(levelname)s %(name)s: %(message)s")
    if args.webrtc:
        # The pre-encoded publishers cannot answer a keyframe request, so each new subscription
        # fails to decode until the clip's next keyframe (at most 2 s): expected, not news.
        logging.getLogger("aiortc.rtcrtpreceiver").setLevel(logging.ERROR)
        main_webrtc(args)
        return
    results, decode = asyncio.run(main_async(args))
    table = markdown_table(results)
    print()
    print(table)
    if args.write_docs:
        base = load_settings(execution_provider="cpu")
        components = PipelineComponents.load(base)
        command = "python benchmarks/bot.py " + shlex.join(sys.argv[1:])
        write_docs(docs_section(machine_info(base, components), command.strip(), table, results, decode),
                   SECTION_BEGIN, SECTION_END)


def main_webrtc(args: argparse.Namespace) -> None:
    """The ramp over real WebRTC, one sampling rate after another; optionally recorded in the docs."""
    import bot_webrtc

    base = load_settings(execution_provider="cpu", live_worker_threads=args.threads)
    components = bot_webrtc.load_components_naming_their_threads(base)
    results = []
    if args.event_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    for fps in args.fps:
        results.extend(asyncio.run(bot_webrtc.webrtc_ramp(
            base, components, fps=fps, participants=args.participants, seconds=args.seconds,
            processes=args.publisher_processes, media_dir=args.media_dir)))
    print()
    print(bot_webrtc.webrtc_table(results))
    if args.write_docs:
        command = "python benchmarks/bot.py " + shlex.join(sys.argv[1:])
        write_docs(bot_webrtc.webrtc_docs_section(machine_info(base, components), command.strip(), results,
                                                  args.fps[0]),
                   bot_webrtc.SECTION_BEGIN, bot_webrtc.SECTION_END)


if __name__ == "__main__":
    main()
