"""Benchmark: analysis of a recorded lecture against the cost of decoding it.

A 3×3 "gallery view" (1280×720, 30 fps, H.264) is built in memory from the clips and
photos in ``../shared/media``; nothing is written to disk but the temporary SQLite
store and HTML reports of each run (derived numbers only, no pixels).

Measured, all in one process and on the same in-memory video:

* decode-only: every frame decoded the way ``RecordedFileSource`` does it
  (``container.demux`` + ``packet.decode()``, ``stream.thread_type = "AUTO"``);
* decode + BGR: ``RecordedFileSource`` itself, i.e. decode-only plus the conversion of
  the sampled frames to BGR arrays;
* decode + BGR + detect: the above plus the face detector on every sampled frame;
* ``analyze_recording`` end to end (fresh temporary store and report folder per run,
  models loaded once before timing).

Usage::

    python benchmarks/analyze.py [--seconds 60] [--fps 1 2] [--repeat N] [--write-docs]
    python benchmarks/analyze.py --profile [--profile-seconds 20]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import logging
import os
import platform
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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

from classlens.analysis import analyze_recording  # noqa: E402
from kernel.settings import Settings, load_settings  # noqa: E402
from pipeline.models import PipelineComponents  # noqa: E402
from vision.sources import RecordedFileSource  # noqa: E402

DEFAULT_MEDIA_DIR = REPO_ROOT.parent / "shared" / "media"
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- benchmarks/analyze.py: begin -->"
SECTION_END = "<!-- benchmarks/analyze.py: end -->"

WIDTH, HEIGHT, FPS = 1280, 720, 30
COLUMNS = ROWS = 3
TILE_W, TILE_H = 426, 240
GAP = 1  # 3 × 426 + 2 × 1 = 1280 wide; 3 × 240 = 720 high (no gap needed vertically)
BACKGROUND = (24, 24, 24)
TILE_BACKGROUND = (40, 40, 40)

#: Tile contents in row-major order: video clips play looped, photos are stills.
TILES = (
    "single_face.mp4", "multi_face.jpg", "WolfgangLanger_Pexels.mp4",
    "single_face.jpg", "face_noface.mov", "0-f15-hao-ph.jpg",
    "noface_face.mov", "12_angry_men.jpg", "no_face.mp4",
)

#: "Both cores busy": process CPU time over wall time at least this share of the cores.
BUSY_SHARE = 0.8
#: The target: analyse at 1 fps within this factor of the decode-only time.
TARGET_RATIO = 1.5

log = logging.getLogger("benchmarks.analyze")


# --------------------------------------------------------------------------- video


def fit_tile(image: np.ndarray) -> np.ndarray:
    """Letterbox ``image`` (BGR) into one TILE_W×TILE_H tile, keeping its aspect ratio."""
    height, width = image.shape[:2]
    scale = min(TILE_W / width, TILE_H / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    tile = np.full((TILE_H, TILE_W, 3), TILE_BACKGROUND, np.uint8)
    y, x = (TILE_H - new_h) // 2, (TILE_W - new_w) // 2
    tile[y:y + new_h, x:x + new_w] = resized
    return tile


@dataclass
class TileSource:
    """The frames of one tile (a looped clip, or a single still) and their rate."""

    name: str
    frames: list[np.ndarray]
    rate: Fraction  # source frames per second; 0 for a still

    def frame_at(self, index: int) -> np.ndarray:
        """The tile's frame shown at gallery frame ``index`` (exact rational time, so deterministic)."""
        if not self.rate or len(self.frames) == 1:
            return self.frames[0]
        source_index = int(Fraction(index, FPS) * self.rate)
        return self.frames[source_index % len(self.frames)]


def load_tile(path: Path) -> TileSource:
    """Decode a clip (every frame) or read a photo, fitted to the tile size."""
    if path.suffix.lower() in {".jpg", ".jpeg", ".png"}:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot read {path}")
        return TileSource(path.name, [fit_tile(image)], Fraction(0))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(FPS)
        frames = [fit_tile(frame.to_ndarray(format="bgr24")) for frame in container.decode(stream)]
    if not frames:
        raise SystemExit(f"{path}: no frames")
    return TileSource(path.name, frames, rate)


def gallery_frames(tiles: list[TileSource], seconds: float) -> Iterator[np.ndarray]:
    """The gallery view, frame by frame (a generator: 60 s at 720p would be ~5 GB as a list)."""
    canvas = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    for index in range(round(seconds * FPS)):
        for number, tile in enumerate(tiles):
            row, column = divmod(number, COLUMNS)
            x, y = column * (TILE_W + GAP), row * TILE_H
            canvas[y:y + TILE_H, x:x + TILE_W] = tile.frame_at(index)
        yield canvas


def encode_stream(frames: Iterator[np.ndarray], fps: int, keyframe_seconds: float | None = None) -> io.BytesIO:
    """Encode BGR frames to an in-memory H.264 MP4 with the settings of ``vision.synthetic.encode_video``.

    ``encode_video`` takes a list, which would hold every raw frame in memory; this
    streams the same encoder settings (libx264, veryfast, crf 20, yuv420p), except that
    x264 runs frame threads: PyAV's default (slice threads) makes x264 cut every frame
    into slices, which lets the decoder use slice threading that most real recordings
    (one slice per frame) do not allow, and so flatters decoding. ``keyframe_seconds`` puts a
    keyframe exactly that often (None: x264's default, at most every 250 frames, and at scene cuts).
    """
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream: Any = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuv420p"
        stream.thread_type = "FRAME"
        options = {"preset": "veryfast", "crf": "20"}
        if keyframe_seconds is not None:
            interval = max(1, round(fps * keyframe_seconds))
            options.update({"g": str(interval), "x264-params": f"keyint={interval}:min-keyint={interval}:scenecut=0"})
        stream.options = options
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buffer.seek(0)
    return buffer


def build_gallery_video(media_dir: Path, seconds: float, keyframe_seconds: float | None = None) -> io.BytesIO:
    """The 3×3 gallery video of ``seconds`` seconds, in memory (keyframes: see :func:`encode_stream`)."""
    missing = [name for name in TILES if not (media_dir / name).is_file()]
    if missing:
        raise SystemExit(f"missing media in {media_dir}: {', '.join(missing)}")
    tiles = [load_tile(media_dir / name) for name in TILES]
    return encode_stream(gallery_frames(tiles, seconds), FPS, keyframe_seconds)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall time and process CPU time (all threads) of one measured call."""

    wall: float
    cpu: float

    @property
    def cores_busy(self) -> float:
        """Average number of cores busy (CPU time over wall time)."""
        return self.cpu / self.wall if self.wall else 0.0


def timed(function: Callable[[], Any]) -> tuple[Timing, Any]:
    """Run ``function`` once; its wall time and the process CPU time it used."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = function()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Timing(wall, cpu), result


def median_timing(timings: list[Timing]) -> Timing:
    """Median wall time, and the CPU time of the run with that wall time (or the mean of the two middle ones)."""
    ordered = sorted(timings, key=lambda t: t.wall)
    middle = len(ordered) // 2
    picked = ordered[middle - 1:middle + 1] if len(ordered) % 2 == 0 else [ordered[middle]]
    return Timing(statistics.fmean(t.wall for t in picked), statistics.fmean(t.cpu for t in picked))


def decode_only(video: io.BytesIO, *, skip_non_reference: bool = False) -> int:
    """Decode the way ``RecordedFileSource`` does (demux + ``packet.decode()``, ``thread_type = "AUTO"``).

    Every frame by default; with ``skip_non_reference`` the decoder drops non-reference
    frames, as the source does when its samples are far enough apart. Returns the frames decoded.
    """
    video.seek(0)
    frames = 0
    with av.open(video, mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if skip_non_reference:
            stream.codec_context.skip_frame = "NONREF"
        for packet in container.demux(stream):
            for _frame in packet.decode():
                frames += 1
    return frames


def source_skips_non_reference(video: io.BytesIO, sample_fps: float) -> bool:
    """Whether ``RecordedFileSource`` drops non-reference frames at this rate (False for sources that never do)."""
    source = RecordedFileSource(video, sample_fps)
    decides = getattr(source, "skips_non_reference_frames", None)
    return bool(decides(source.probe())) if decides else False


def decode_convert(video: io.BytesIO, sample_fps: float) -> int:
    """``RecordedFileSource`` itself: decode as it does, convert the sampled frames to BGR; frames decoded."""
    source = RecordedFileSource(video, sample_fps)
    for _frame in source:
        pass
    return int(source.frames_decoded)


def decode_convert_detect(video: io.BytesIO, sample_fps: float, components: PipelineComponents) -> int:
    """Decode + BGR as above, and the face detector on every sampled frame; the faces found."""
    return sum(len(components.detector.detect(frame)) for frame in RecordedFileSource(video, sample_fps))


@dataclass
class AnalysisRun:
    """One ``analyze_recording`` run."""

    timing: Timing
    frames_sampled: int
    faces: int
    students: int


def analyze_once(video: io.BytesIO, sample_fps: float, components: PipelineComponents,
                 overrides: dict[str, Any]) -> AnalysisRun:
    """``analyze_recording`` with a fresh temporary store and report folder."""
    with tempfile.TemporaryDirectory(prefix="classlens-bench-") as tmp:
        settings = load_settings(data_dir=Path(tmp), sample_fps=sample_fps, **overrides)
        timing, outcome = timed(lambda: analyze_recording(video, settings, out_dir=Path(tmp) / "report",
                                                          components=components, title="benchmark gallery"))
    return AnalysisRun(timing, outcome.frames_sampled, outcome.faces_detected, outcome.students)


@dataclass
class FpsResult:
    """Everything measured at one sampling rate."""

    sample_fps: float
    skips_non_reference: bool = False
    source_decoded: int = 0
    analysis: list[AnalysisRun] = field(default_factory=list)
    source_decode: list[Timing] = field(default_factory=list)
    convert: list[Timing] = field(default_factory=list)
    detect: list[Timing] = field(default_factory=list)


# --------------------------------------------------------------------------- report


def code_version() -> str:
    """The commit measured, and which tracked files differed from it (read-only git queries)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def host_description() -> dict[str, str]:
    """The code, CPU, RAM and OS the numbers were measured on (Linux: /proc)."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "code": code_version(),
        "CPU": f"{cpu_model}, {len(os.sched_getaffinity(0))} cores usable (nproc), os.cpu_count() = {os.cpu_count()}",
        "RAM": ram,
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
    }

def machine_info(settings: Settings, components: PipelineComponents) -> dict[str, str]:
    """What the numbers were measured on."""
    import insightface
    import onnxruntime

    libav = getattr(av, "library_versions", {}).get("libavcodec")
    return {
        **host_description(),
        "Python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "PyAV": f"{av.__version__}" + (f" (libavcodec {'.'.join(map(str, libav))})" if libav else ""),
        "insightface": insightface.__version__,
        "numpy / OpenCV": f"{np.__version__} / {cv2.__version__}",
        "execution provider": ", ".join(components.detector.providers),
        "detector": f"{settings.detector}, detector_input_size = {settings.detector_input_size}",
        "onnxruntime threads": "onnxruntime's choice (all cores)" if not settings.intra_op_threads
        else str(settings.intra_op_threads),
    }


def markdown_tables(seconds: float, frames: int, decode: Timing, results: list[FpsResult], repeat: int) -> str:
    """The floors table and the analysis table."""
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"Video: 3×3 gallery, {WIDTH}×{HEIGHT}, {FPS} fps, H.264, {seconds:g} s ({frames} frames), in memory. "
        f"Times are medians of {repeat} run(s); CPU = process CPU time / wall time, in cores (of {cores}).",
        "",
        "| floor | fps | frames decoded | wall s | CPU (cores) |",
        "|---|---:|---:|---:|---:|",
        f"| decode-only, every frame | – | {frames} | {decode.wall:.2f} | {decode.cores_busy:.2f} |",
    ]
    for result in results:
        fps = f"{result.sample_fps:g}"
        if result.skips_non_reference:
            timing = median_timing(result.source_decode)
            lines.append(f"| decode-only, non-reference frames skipped (as the source does at {fps} fps) | {fps} | "
                         f"{result.source_decoded} | {timing.wall:.2f} | {timing.cores_busy:.2f} |")
        convert, detect = median_timing(result.convert), median_timing(result.detect)
        lines.append(f"| `RecordedFileSource`: its decode + BGR of sampled frames | {fps} | {result.source_decoded} | "
                     f"{convert.wall:.2f} | {convert.cores_busy:.2f} |")
        lines.append(f"| `RecordedFileSource` + face detector | {fps} | {result.source_decoded} | {detect.wall:.2f} | "
                     f"{detect.cores_busy:.2f} |")
    lines += [
        "",
        "| sample fps | frames sampled | faces | students | analyze wall s | min–max s | CPU (cores) | frames/s "
        "| faces/s | analyze / decode-only (every frame) | analyze / source decode + BGR |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        run = result.analysis[0]
        timing = median_timing([r.timing for r in result.analysis])
        convert = median_timing(result.convert)
        walls = [r.timing.wall for r in result.analysis]
        lines.append(
            f"| {result.sample_fps:g} | {run.frames_sampled} | {run.faces} | {run.students} | {timing.wall:.2f} | "
            f"{min(walls):.2f}–{max(walls):.2f} | {timing.cores_busy:.2f} | {run.frames_sampled / timing.wall:.1f} | "
            f"{run.faces / timing.wall:.1f} | {timing.wall / decode.wall:.2f}× | {timing.wall / convert.wall:.2f}× |"
        )
    return "\n".join(lines)


def interpretation(decode: Timing, frames: int, results: list[FpsResult]) -> str:
    """Plain words about the target, computed from the numbers."""
    cores = len(os.sched_getaffinity(0))
    one = next((r for r in results if r.sample_fps == 1), None)
    if one is None:
        return "The target is stated for 1 fps; 1 fps was not measured in this run."
    timing = median_timing([r.timing for r in one.analysis])
    convert, detect = median_timing(one.convert), median_timing(one.detect)
    source_decode = median_timing(one.source_decode) if one.skips_non_reference else decode
    ratio = timing.wall / decode.wall
    busy = timing.cores_busy >= BUSY_SHARE * cores
    verdict = "**met**" if ratio <= TARGET_RATIO and busy else "**not met**"
    text = [
        f"Target: *analyze at 1 fps within {TARGET_RATIO}× of decode-only time, with both cores busy*: {verdict} "
        f"on this machine. Analysis takes {ratio:.2f}× the time to decode every frame (target ≤ {TARGET_RATIO}×: "
        f"{'within' if ratio <= TARGET_RATIO else 'outside'} it); the process keeps {timing.cores_busy:.2f} of "
        f"{cores} cores busy on average ({'≥' if busy else '<'} {BUSY_SHARE:.0%} of the cores, our threshold for "
        "\"both cores busy\").",
    ]
    if one.skips_non_reference:
        text += ["", (
            f"At 1 fps the source skips non-reference frames: it decodes {one.source_decoded} of {frames} frames, "
            f"in {source_decode.wall:.2f} s instead of {decode.wall:.2f} s. Against that decode "
            f"the analysis takes {timing.wall / source_decode.wall:.2f}×."
        )]
    text += ["", (
        f"At 1 fps, of the {timing.wall:.2f} s: the source's decoding costs {source_decode.wall:.2f} s "
        f"({source_decode.wall / timing.wall:.0%}), converting the sampled frames to BGR "
        f"{max(0.0, convert.wall - source_decode.wall):.2f} s, running the detector on them "
        f"{max(0.0, detect.wall - convert.wall):.2f} s, and everything else (tracking, crops, emotion and "
        "engagement inference on its thread, the store, the reports, and their contention with the decoder for "
        f"the cores) {max(0.0, timing.wall - detect.wall):.2f} s. Decoding alone keeps "
        f"{source_decode.cores_busy:.2f} cores busy."
    )]
    return "\n".join(text)


def docs_section(info: dict[str, str], command: str, tables: str, words: str) -> str:
    """The section of docs/benchmarks.md that this script owns."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    return f"""{SECTION_BEGIN}
## Recorded-lecture analysis vs decode (`benchmarks/analyze.py`)

Measured {today} on a CPU-only machine; absolute times hold for this machine only,
ratios are measured within one run.

{machine}

Command (from the repository root):

```
{command}
```

{tables}

{words}

How it is measured: the gallery video is built in memory from `../shared/media` (nine
tiles of about 426×240: five looped clips and four photos; libx264 veryfast, crf 20,
with frame threads so that, as in most real recordings, frames are not cut into slices)
and decoded from memory. The models are loaded once (`PipelineComponents.load`,
execution provider `cpu`) before any timing; each `analyze_recording` run gets a fresh
temporary SQLite store and report folder. "decode-only" decodes with `container.demux` +
`packet.decode()` and `thread_type = "AUTO"`, as `RecordedFileSource` does: every frame
(the floor the target is stated against) and, at sampling rates where the source skips
non-reference frames, also with `skip_frame = "NONREF"`. The "`RecordedFileSource`" rows
iterate the source itself (its decoding plus the BGR conversion of the sampled frames),
then add the face detector on each sampled frame. The floors and the analyses are run in
turn, `--repeat` times (default 3), and the medians reported.

Reading the CPU column: process CPU time includes onnxruntime's intra-op threads
spin-waiting for work after each run (`session.intra_op.allow_spinning`, on by
default), so a figure near the core count does not by itself mean the cores do useful
work. The gallery's faces are small (a 426×240 tile per participant), so the detector's
input size changes what is found, not only how fast: compare `faces` before comparing
times when running with `--set detector_input_size=...`.
{SECTION_END}
"""


def write_docs(section: str, begin: str = SECTION_BEGIN, end: str = SECTION_END) -> None:
    """Create docs/benchmarks.md, or replace the section between ``begin`` and ``end`` of it (or append it).

    Every benchmark script owns one such section; the default markers are this script's.
    """
    if DOCS_PATH.exists():
        text = DOCS_PATH.read_text(encoding="utf-8")
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _match: section, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = ("# Benchmarks\n\nEach benchmark in `benchmarks/` prints a table and records it here with the machine "
                "it ran on (see the design guide, section 6).\n\n" + section)
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def profile_analysis(video: io.BytesIO, components: PipelineComponents, overrides: dict[str, Any],
                     top: int) -> None:
    """cProfile one 1-fps analysis; print the top functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    run = analyze_once(video, 1.0, components, overrides)
    profiler.disable()
    print(f"\nProfile of one 1-fps analysis: {run.timing.wall:.2f} s wall, {run.timing.cores_busy:.2f} cores, "
          f"{run.frames_sampled} frames, {run.faces} faces (cProfile sees the main thread only; "
          "emotion/engagement inference runs on the dispatcher's thread)\n")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(top)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the gallery video (default 60)")
    parser.add_argument("--fps", type=float, nargs="+", default=[1.0, 2.0], help="sampling rates (default 1 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported "
                        "(default 3)")
    parser.add_argument("--media", type=Path, default=DEFAULT_MEDIA_DIR, help="folder of the test media")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="a setting to override for every run, e.g. detector_input_size=320 (repeatable)")
    parser.add_argument("--write-docs", action="store_true", help="write/update docs/benchmarks.md")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark: cProfile one 1-fps analysis of a --profile-seconds video")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeat < 1 or any(f <= 0 for f in args.fps):
        parser.error("--seconds, --repeat and --fps must be positive")
    if any("=" not in item for item in args.overrides):
        parser.error("--set takes KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"execution_provider": "cpu"}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    seconds = args.profile_seconds if args.profile else args.seconds

    started = time.perf_counter()
    video = build_gallery_video(args.media, seconds)
    data = video.getvalue()
    print(f"generated the gallery video in {time.perf_counter() - started:.1f} s (not measured): "
          f"{seconds:g} s, {len(data) / 1e6:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()[:16]}",
          file=sys.stderr)

    settings = load_settings(**overrides)
    started = time.perf_counter()
    components = PipelineComponents.load(settings)
    print(f"loaded the models in {time.perf_counter() - started:.1f} s (not measured)", file=sys.stderr)
    # Warm-up (not measured): first-use costs of the store, the report templates and onnxruntime.
    analyze_once(video, 1.0, components, overrides)

    if args.profile:
        profile_analysis(video, components, overrides, args.profile_top)
        return 0

    decodes: list[Timing] = []
    results = [FpsResult(fps, skips_non_reference=source_skips_non_reference(video, fps)) for fps in args.fps]
    frames = 0
    for number in range(args.repeat):
        timing, frames = timed(lambda: decode_only(video))
        decodes.append(timing)
        print(f"[{number + 1}/{args.repeat}] decode-only: {frames} frames in {timing.wall:.2f} s "
              f"({timing.cores_busy:.2f} cores)", file=sys.stderr)
        for result in results:
            if result.skips_non_reference:
                timing, _ = timed(lambda: decode_only(video, skip_non_reference=True))
                result.source_decode.append(timing)
            timing, result.source_decoded = timed(lambda r=result: decode_convert(video, r.sample_fps))
            result.convert.append(timing)
            timing, _ = timed(lambda r=result: decode_convert_detect(video, r.sample_fps, components))
            result.detect.append(timing)
            run = analyze_once(video, result.sample_fps, components, overrides)
            result.analysis.append(run)
            print(f"[{number + 1}/{args.repeat}] {result.sample_fps:g} fps: analyze {run.timing.wall:.2f} s "
                  f"({run.timing.cores_busy:.2f} cores), {run.frames_sampled} frames, {run.faces} faces, "
                  f"{run.students} students; the source decoded {result.source_decoded} frames", file=sys.stderr)

    decode = median_timing(decodes)
    tables = markdown_tables(seconds, frames, decode, results, args.repeat)
    words = interpretation(decode, frames, results)
    print()
    print(tables)
    print()
    print(words)
    if args.write_docs:
        command = "python benchmarks/analyze.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_docs(docs_section(machine_info(settings, components), command.strip(), tables, words))
        print(f"\nwrote {DOCS_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
