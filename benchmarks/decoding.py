"""Benchmark: analysing recordings below the decode floor, several at once, and two hours long.

On the 3×3 gallery of ``benchmarks/analyze.py`` (1280×720, 30 fps, H.264, built in
memory from ``../shared/media``), written with a keyframe every N seconds as meeting
recorders do, and with x264's own placement (at most every 250 frames, and at scene cuts):

* **the floor**: every frame decoded (``container.demux`` + ``packet.decode()``);
* **each decode mode** (``vision.keyframes``): ``RecordedFileSource`` with ``sequential``
  and with ``auto`` (which chooses keyframes, seek or sequential per file): wall time,
  frames decoded, the largest distance of a sample from its instant;
* **decoding and the face search alone**: the samples of each mode through the analysis's own
  face search (``vision.detection.ScaledSearch``, as the settings configure it) and nothing
  else: a lower bound on the analysis that no later stage can lower;
* **the analysis**: ``analyze_recording`` (models loaded once beforehand) with each mode:
  wall time against the floor, frames, faces and students found;
* **several recordings at once**: ``classlens analyze f1 … fK --jobs J`` as a user runs
  it, whole process, in recordings per hour;
* **start-up**: ``classlens analyze`` of a 60 s clip, whole process, against the analysis
  alone in a warm process;
* **memory**: peak RSS and RSS over time of ``classlens analyze`` on a 10-minute and on
  a 2-hour recording (the 10-minute one's packets repeated, not re-encoded).

Videos handed to a ``classlens`` process live in memory files (``os.memfd_create``,
opened as ``/proc/<pid>/fd/<n>``): no frame is written to disk.

Usage::

    python benchmarks/decoding.py [--seconds 600] [--keyframe-seconds 1 2 0] [--write-docs]
    python benchmarks/decoding.py --seconds 60 --quick     # a smoke run: short, no 2-hour file
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.analyze import (  # noqa: E402
    DEFAULT_MEDIA_DIR,
    FPS,
    HEIGHT,
    WIDTH,
    Timing,
    build_gallery_video,
    decode_only,
    encode_stream,
    machine_info,
    timed,
    write_docs,
)
from classlens.analysis import analyze_recording  # noqa: E402
from kernel.settings import DecodeMode, load_settings  # noqa: E402
from pipeline.models import PipelineComponents  # noqa: E402
from vision.detection import ScaledSearch  # noqa: E402
from vision.sources import RecordedFileSource  # noqa: E402

SECTION_BEGIN = "<!-- benchmarks/decoding.py: begin -->"
SECTION_END = "<!-- benchmarks/decoding.py: end -->"
MODES = (DecodeMode.sequential, DecodeMode.auto)
#: The camera recording: one student at a webcam.
CAMERA_CLIP = "WolfgangLanger_Pexels.mp4"


# --------------------------------------------------------------------------- videos in memory files


@contextmanager
def memory_file(name: str) -> Iterator[Path]:
    """A file that lives in memory only (Linux memfd), as a path another process can open."""
    descriptor = os.memfd_create(name)
    try:
        yield Path(f"/proc/{os.getpid()}/fd/{descriptor}")
    finally:
        os.close(descriptor)


def fill(path: Path, data: bytes) -> Path:
    """Write ``data`` into the memory file at ``path``."""
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def write_repeated(video: io.BytesIO, times: int, path: Path) -> float:
    """Write ``video``'s packets ``times`` over, one after another on the clock, into ``path`` (no re-encoding).

    Returns the new duration in seconds.
    """
    video.seek(0)
    with av.open(video) as source, av.open(str(path), mode="w", format="mp4") as target:
        stream = source.streams.video[0]
        output = target.add_stream_from_template(stream)
        packets = [packet for packet in source.demux(stream) if packet.dts is not None]
        frame_step = packets[1].pts - packets[0].pts if len(packets) > 1 else 1
        period = max(p.pts for p in packets) + min(abs(frame_step), 1 << 30)
        for round_number in range(times):
            for packet in packets:
                copy = av.Packet(bytes(packet))
                copy.pts, copy.dts = packet.pts + round_number * period, packet.dts + round_number * period
                copy.time_base, copy.is_keyframe = packet.time_base, packet.is_keyframe
                copy.stream = output
                target.mux(copy)
        return float(period * times * stream.time_base)


def build_camera_video(media_dir: Path, seconds: float, keyframe_seconds: float | None) -> io.BytesIO:
    """One webcam picture at 1280×720 (WolfgangLanger_Pexels.mp4, one student, looped), in memory."""
    with av.open(str(media_dir / CAMERA_CLIP)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(FPS)
        clip = [cv2.resize(frame.to_ndarray(format="bgr24"), (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
                for frame in container.decode(stream)]

    def frames() -> Iterator[np.ndarray]:
        for index in range(round(seconds * FPS)):
            yield clip[int(Fraction(index, FPS) * rate) % len(clip)]

    return encode_stream(frames(), FPS, keyframe_seconds)


# --------------------------------------------------------------------------- in-process measurements


@dataclass
class ModeRun:
    """One decode mode on one video."""

    mode: DecodeMode
    plan: str = ""
    decode: Timing | None = None
    frames_decoded: int = 0
    samples: int = 0
    largest_offset: float = 0.0
    searched: Timing | None = None
    analysis: Timing | None = None
    frames_sampled: int = 0
    faces: int = 0
    students: int = 0


@dataclass
class VideoRun:
    """Everything measured on one keyframe spacing."""

    label: str
    keyframe_seconds: float
    megabytes: float
    floor: Timing
    frames: int
    modes: list[ModeRun] = field(default_factory=list)


def measure_modes(video: io.BytesIO, fps: float, components: PipelineComponents, data_dir: Path) -> list[ModeRun]:
    """Decode with each mode, then analyse with each mode."""
    runs = []
    for mode in MODES:
        run = ModeRun(mode)
        source = RecordedFileSource(video, fps, decode_mode=mode)
        run.plan = f"{source.decoding_plan().mode}: {source.decoding_plan().reason}"
        run.decode, run.samples = timed(lambda s=source: sum(1 for _ in s))
        run.frames_decoded, run.largest_offset = source.frames_decoded, source.largest_offset
        run.searched, _ = timed(lambda v=video, m=mode: decode_and_search(v, fps, m, components))
        with tempfile.TemporaryDirectory(prefix="classlens-bench-", dir=data_dir) as tmp:
            settings = load_settings(data_dir=Path(tmp), sample_fps=fps, decode_mode=mode, execution_provider="cpu")
            run.analysis, outcome = timed(lambda s=settings, t=tmp: analyze_recording(
                video, s, out_dir=Path(t) / "report", components=components, title="benchmark gallery"))
        run.frames_sampled, run.faces, run.students = outcome.frames_sampled, outcome.faces_detected, outcome.students
        print(f"  {mode}: {run.plan}; decode {run.decode.wall:.2f} s ({run.frames_decoded} frames), "
              f"decode + face search {run.searched.wall:.2f} s, analyze {run.analysis.wall:.2f} s, "
              f"{run.frames_sampled} frames, {run.faces} faces, {run.students} students", file=sys.stderr)
        runs.append(run)
    return runs


def decode_and_search(video: io.BytesIO, fps: float, mode: DecodeMode, components: PipelineComponents) -> int:
    """Decode the samples in ``mode`` and run the analysis's face search on each; the faces found."""
    settings = load_settings(sample_fps=fps, decode_mode=mode, execution_provider="cpu")
    search = ScaledSearch(components.detector, full_pass_seconds=settings.full_search_seconds,
                          sample_interval=1.0 / fps)
    return sum(len(search.detect(frame)) for frame in RecordedFileSource(video, fps, decode_mode=mode))


# --------------------------------------------------------------------------- whole processes


@dataclass
class ProcessRun:
    """A ``classlens`` command run as a user runs it."""

    wall: float
    peak_rss_mib: float
    rss_over_time: list[tuple[float, float]]
    output: str


#: Runs ``python -m classlens ARGS`` as its child and prints the child's peak RSS (KiB) on its last line.
PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run([sys.executable, '-m', 'classlens', *sys.argv[1:]]).returncode\n"
    "print(f'PEAK_RSS_KIB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')\n"
    "sys.exit(code)\n"
)


def run_classlens(arguments: list[str], *, sample_every: float = 2.0) -> ProcessRun:
    """Run ``python -m classlens …`` in a fresh process: wall time, exact peak RSS, and RSS every ``sample_every`` s.

    The memory files' paths (``/proc/<this pid>/fd/<n>``) can be opened by any process of
    the same user while this one holds them open.
    """
    started = time.perf_counter()
    wrapper = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(sample_every):
            try:
                children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
                if not children:
                    continue
                for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        samples.append((time.perf_counter() - started, int(line.split()[1]) / 1024))
            except OSError:
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = wrapper.communicate()
    wall = time.perf_counter() - started
    done.set()
    if wrapper.returncode != 0:
        raise SystemExit(f"classlens {' '.join(arguments)} failed ({wrapper.returncode}):\n{output}")
    peak_line = [line for line in output.splitlines() if line.startswith("PEAK_RSS_KIB=")][-1]
    return ProcessRun(wall, int(peak_line.split("=", 1)[1]) / 1024, samples, output)


def throughput(video: io.BytesIO, copies: int, jobs_options: list[int], work: Path) -> list[tuple[int, float]]:
    """Wall time of ``classlens analyze`` on ``copies`` recordings at each ``--jobs``."""
    data = video.getvalue()
    results = []
    with memory_files(copies) as paths:
        for path in paths:
            fill(path, data)
        for jobs in jobs_options:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                run = run_classlens(["analyze", *map(str, paths), "--jobs", str(jobs), "--quiet", "--out",
                                     f"{tmp}/reports", "--db", f"sqlite:///{tmp}/store.sqlite3"],
)
            print(f"  {copies} recordings, --jobs {jobs}: {run.wall:.1f} s", file=sys.stderr)
            results.append((jobs, run.wall))
    return results


@contextmanager
def memory_files(count: int) -> Iterator[list[Path]]:
    """``count`` memory files at once."""
    descriptors = [os.memfd_create(f"recording-{index}") for index in range(count)]
    try:
        yield [Path(f"/proc/{os.getpid()}/fd/{descriptor}") for descriptor in descriptors]
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def whole_process(path: Path, work: Path, fps: float) -> ProcessRun:
    """``classlens analyze`` on one recording in a memory file, whole process."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        return run_classlens(["analyze", str(path), "--fps", f"{fps:g}", "--quiet", "--out", f"{tmp}/report",
                              "--db", f"sqlite:///{tmp}/store.sqlite3"])


# --------------------------------------------------------------------------- report


def tables(seconds: float, fps: float, videos: list[VideoRun]) -> str:
    """The decode-floor table."""
    lines = [f"### Decode modes and the analysis ({seconds / 60:g} min recordings, {fps:g} fps)", "",
             "| recording | mode that ran | decoding: s (frames) | vs floor | largest offset | "
             "decoding + face search s | vs floor | analysis s | vs floor | frames | faces | students |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for video in videos:
        spacing = (f"{video.label}, keyframes every {video.keyframe_seconds:g} s" if video.keyframe_seconds
                   else f"{video.label}, x264's keyframes")
        lines.append(f"| {spacing}: floor (every frame) | – | {video.floor.wall:.2f} ({video.frames}) | 1.00 | – | – "
                     f"| – | – | – | – | – | – |")
        for run in video.modes:
            assert run.decode is not None and run.searched is not None and run.analysis is not None
            chosen = run.plan.split(":", 1)[0]
            label = f"{run.mode}" if run.mode != DecodeMode.auto else f"auto → {chosen}"
            lines.append(f"| {spacing} | {label} | {run.decode.wall:.2f} ({run.frames_decoded}) | "
                         f"{run.decode.wall / video.floor.wall:.2f} | {run.largest_offset:.2f} s | "
                         f"{run.searched.wall:.2f} | {run.searched.wall / video.floor.wall:.2f} | "
                         f"{run.analysis.wall:.2f} | {run.analysis.wall / video.floor.wall:.2f} | "
                         f"{run.frames_sampled} | {run.faces} | {run.students} |")
    return "\n".join(lines)


def docs_section(info: dict[str, str], command: str, body: str, plans: list[str]) -> str:
    """The section of docs/benchmarks.md that this script owns."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    plan_lines = "\n".join(f"- {plan}" for plan in plans)
    return f"""{SECTION_BEGIN}
## Below the decode floor, several at once, two hours long (`benchmarks/decoding.py`)

Measured {today}; absolute times hold for this machine only, ratios within one run.

{machine}

Command (from the repository root):

```
{command}
```

{body}

What `auto` chose, and why (the line each report shows under "Data quality"):

{plan_lines}

How it is measured: the gallery is `benchmarks/analyze.py`'s, encoded with a keyframe
exactly every N s (`keyint=min-keyint=N·30`, no scene-cut keyframes) or with x264's own
placement. "floor" decodes every frame; "decoding" iterates `RecordedFileSource` (decode +
BGR of the samples) in the mode shown; "analysis" is `analyze_recording` with the models
loaded beforehand and a fresh SQLite store. "largest offset" is the largest distance of a
sample from its sampling instant (the sequential path takes the first frame at or after
the instant; the others a frame within ±half an interval). Whole-process runs start
`python -m classlens analyze` on videos held in memory files (`memfd`); peak RSS is the
process's maximum resident set.
{SECTION_END}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the gallery (default 600)")
    parser.add_argument("--keyframe-seconds", type=float, nargs="+", default=[1.0, 2.0, 0.0],
                        help="keyframe spacings to measure; 0: x264's own (default 1 2 0)")
    parser.add_argument("--camera-keyframe-seconds", type=float, nargs="*", default=[2.0],
                        help="keyframe spacings of the camera recording (one student at a webcam; default 2)")
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate (default 1)")
    parser.add_argument("--copies", type=int, default=4, help="recordings for the throughput runs (default 4)")
    parser.add_argument("--copy-seconds", type=float, default=120.0, help="length of each (default 120)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values to compare (default 1 2)")
    parser.add_argument("--long-hours", type=float, default=2.0, help="length of the long recording (default 2)")
    parser.add_argument("--quick", action="store_true", help="skip the throughput and 2-hour runs")
    parser.add_argument("--media", type=Path, default=DEFAULT_MEDIA_DIR, help="folder of the test media")
    parser.add_argument("--write-docs", action="store_true", help="write/update docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; with ``--write-docs`` record them."""
    args = parse_args(argv)
    settings = load_settings(execution_provider="cpu")
    components = PipelineComponents.load(settings)
    work = Path(tempfile.mkdtemp(prefix="classlens-decoding-"))
    videos: list[VideoRun] = []
    plans: list[str] = []
    spacing_two: io.BytesIO | None = None
    kinds = [("3×3 gallery", spacing) for spacing in args.keyframe_seconds]
    kinds += [("camera, one student", spacing) for spacing in args.camera_keyframe_seconds]
    for label, keyframe_seconds in kinds:
        started = time.perf_counter()
        video = (build_gallery_video(args.media, args.seconds, keyframe_seconds or None) if "gallery" in label
                 else build_camera_video(args.media, args.seconds, keyframe_seconds or None))
        print(f"built the {args.seconds:g} s {label}, keyframes {keyframe_seconds or 'x264'}: "
              f"{len(video.getvalue()) / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s (not measured)",
              file=sys.stderr)
        if keyframe_seconds == 2.0 and "gallery" in label:
            spacing_two = video
        floor, frames = timed(lambda v=video: decode_only(v))
        print(f"  floor: {frames} frames in {floor.wall:.2f} s", file=sys.stderr)
        run = VideoRun(label, keyframe_seconds, len(video.getvalue()) / 1e6, floor, frames,
                       measure_modes(video, args.fps, components, work))
        videos.append(run)
        spacing_text = f"keyframes every {keyframe_seconds:g} s" if keyframe_seconds else "x264's keyframes"
        plans.extend(f"{label}, {spacing_text}: {m.plan}" for m in run.modes if m.mode == DecodeMode.auto)
    body = [tables(args.seconds, args.fps, videos)]

    clip = build_gallery_video(args.media, 60.0, 2.0)
    with memory_file("clip") as path:
        fill(path, clip.getvalue())
        whole = whole_process(path, work, args.fps)
    in_process = next(m for m in measure_modes(clip, args.fps, components, work) if m.mode == DecodeMode.auto)
    assert in_process.analysis is not None
    body.append("### Start-up: a 60 s clip (keyframes every 2 s)\n\n| measured | s |\n|---|---:|\n"
                f"| `classlens analyze clip.mp4` whole process | {whole.wall:.2f} |\n"
                f"| the analysis alone, warm process | {in_process.analysis.wall:.2f} |\n"
                f"| **start-up and exit** | **{whole.wall - in_process.analysis.wall:.2f}** |")

    if not args.quick:
        copy = build_gallery_video(args.media, args.copy_seconds, 2.0)
        runs = throughput(copy, args.copies, args.jobs, work)
        rows = "\n".join(f"| {jobs} | {wall:.1f} | {args.copies * 3600 / wall:.0f} |" for jobs, wall in runs)
        body.append(f"### Several recordings at once ({args.copies} × {args.copy_seconds / 60:g} min, keyframes "
                    f"every 2 s)\n\n| `--jobs` | wall s | recordings per hour |\n|---:|---:|---:|\n{rows}")
        memory_rows = []
        base = spacing_two or build_gallery_video(args.media, args.seconds, 2.0)
        with memory_file("ten-minutes") as path:
            fill(path, base.getvalue())
            short = whole_process(path, work, args.fps)
        memory_rows.append((f"{args.seconds / 60:g} min", short))
        with memory_file("two-hours") as path:
            hours = write_repeated(base, max(1, round(args.long_hours * 3600 / args.seconds)), path)
            long = whole_process(path, work, args.fps)
        memory_rows.append((f"{hours / 3600:g} h", long))
        lines = ["### Memory over a recording's length (keyframes every 2 s)", "",
                 "| recording | wall s | peak RSS MiB | RSS at 25 / 50 / 75 / 100 % of the run, MiB |",
                 "|---|---:|---:|---|"]
        for name, run in memory_rows:
            points = [run.rss_over_time[min(len(run.rss_over_time) - 1, int(len(run.rss_over_time) * q))][1]
                      for q in (0.25, 0.5, 0.75, 0.999)] if run.rss_over_time else []
            lines.append(f"| {name} | {run.wall:.0f} | {run.peak_rss_mib:.0f} | "
                         f"{' / '.join(f'{p:.0f}' for p in points)} |")
        body.append("\n".join(lines))

    text = "\n\n".join(body)
    print(text)
    if args.write_docs:
        command = "python benchmarks/decoding.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        info: dict[str, Any] = machine_info(settings, components)
        write_docs(docs_section(info, command.strip(), text, plans), SECTION_BEGIN, SECTION_END)
        print("wrote docs/benchmarks.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
