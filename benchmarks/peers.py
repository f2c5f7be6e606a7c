"""Benchmark: the peer library ``fer`` and ClassLens side by side, on the same videos at the same sampling.

``fer`` (https://pypi.org/project/fer/) finds faces with OpenCV's Haar cascade (its
default) or with facenet-pytorch's MTCNN, and classifies seven emotions with a small
Keras/TFLite network. It is never a dependency of this project: this script builds a
virtual environment of its own for it (by default ``~/.cache/classlens/peers-venv``,
``--peer-venv`` to choose), installs ``fer`` and what it needs there once, and runs it
there in a subprocess.

Nothing is written to disk but that environment and, as in ``benchmarks/analyze.py``,
the temporary SQLite store and HTML reports of each ClassLens run (derived numbers
only). The 3×3 gallery video is built in memory (``analyze.build_gallery_video``); the
peer's worker gets the encoded MP4 bytes on its standard input and decodes them with
PyAV from memory. Both sides sample the same instants: the first frame at or after each
k / fps, on the stream's timestamps (with the half-frame slack ``RecordedFileSource`` uses).

Measured per file, in turn and in one run:

* ClassLens: ``classlens.analysis.analyze_recording`` in-process (models loaded once
  beforehand, and one short warm-up analysis, both reported as start-up, not timed);
* ``fer``: ``FER()`` (Haar cascade) and ``FER(mtcnn=True)``: decoding plus
  ``detect_emotions(frame)`` on every sampled frame; importing TensorFlow and ``fer``,
  building the detector and one warm-up call are reported as start-up, not timed.

Usage::

    python benchmarks/peers.py [--seconds 600] [--fps 1] [--clips NAME ...] [--write-docs]
    python benchmarks/peers.py --seconds 30               # a quick check
    python benchmarks/peers.py --peer-venv DIR --reinstall
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere (its own folder is on the path already)
    sys.path.insert(0, str(REPO_ROOT))

import analyze  # noqa: E402  (benchmarks/analyze.py: its gallery video, analysis timing, machine and docs writer)

from kernel.settings import load_settings  # noqa: E402
from pipeline.models import PipelineComponents  # noqa: E402
from vision.sources import RecordedFileSource  # noqa: E402

SECTION_BEGIN = "<!-- benchmarks/peers.py: begin -->"
SECTION_END = "<!-- benchmarks/peers.py: end -->"

CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_PEER_VENV = CACHE_HOME / "classlens" / "peers-venv"
MARKER_NAME = "classlens-peers.json"

FER_VERSION = "25.10.3"
#: What the peer environment gets, in order; each step is one ``pip install``. The
#: alternatives of a step are tried in turn until one installs.
#:
#: 1. torch and torchvision first, pinned to a matching pair: facenet-pytorch 2.6.0 pins
#:    ``torch<2.3``, which pip would otherwise fetch. facenet-pytorch needs torchvision (its
#:    ``batched_nms``), and torchvision's Linux wheels on PyPI are CUDA builds that load only
#:    with PyPI's CUDA build of torch: a CPU build of torch (such as ``2.13.0+cpu`` in a
#:    find-links folder) makes ``import torchvision`` fail ("operator torchvision::nms does
#:    not exist"). ``===`` asks for exactly the PyPI release, never a local ``+cpu`` build. The
#:    CUDA build runs on the CPU; its NVIDIA libraries cost about 3 GB of disk.
#: 2. TensorFlow for the CPU (``tensorflow-cpu``; the full ``tensorflow`` if that does not resolve).
#: 3. fer's other requirements (from its metadata, less TensorFlow and facenet-pytorch),
#:    ``setuptools<81`` (fer imports ``pkg_resources``) and PyAV to decode.
#: 4. fer and facenet-pytorch themselves without their dependencies: fer's ``tensorflow``
#:    requirement would pull the full TensorFlow over ``tensorflow-cpu``, and facenet-pytorch's
#:    pins (torch<2.3, numpy<2, Pillow<10.3) would replace the builds installed above.
INSTALL_STEPS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("torch===2.13.0", "torchvision==0.28.0"),),
    (("tensorflow-cpu",), ("tensorflow",)),
    (("opencv-contrib-python", "pandas", "requests", "tqdm>=4.62.1", "moviepy>=1.0.3,<2.0",
      "ffmpeg-python>=0.2.0", "Pillow", "matplotlib", "setuptools<81", "av"),),
    (("--no-deps", f"fer=={FER_VERSION}", "facenet-pytorch==2.6.0"),),
)
#: Distributions whose versions the marker and the docs record.
PEER_DISTRIBUTIONS = ("fer", "tensorflow-cpu", "tensorflow", "keras", "facenet-pytorch", "torch", "torchvision",
                      "opencv-contrib-python", "numpy", "av")

#: fer's detectors, as (row label, worker argument).
FER_DETECTORS = (("OpenCV Haar cascade (`FER()`, its default)", "haar"),
                 ("MTCNN (`FER(mtcnn=True)`, facenet-pytorch)", "mtcnn"))

log = logging.getLogger("benchmarks.peers")

# --------------------------------------------------------------------------- the peer's worker

#: Run with the peer environment's Python: reads an encoded video from stdin, prints one JSON line.
PEER_WORKER = r'''
import io, json, math, os, sys, time

def system_busy():
    """Seconds of CPU time all processes on the machine have used (/proc/stat, Linux)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

def sampled_frames(data, fps, counts):
    """BGR frames at the first frame at or after each k / fps, as RecordedFileSource samples."""
    import av
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        if rate and fps * 3 <= rate:
            stream.codec_context.skip_frame = "NONREF"  # as the source does when samples are far apart
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        slack = 0.5 / rate if rate else 0.0
        interval = 1.0 / fps
        next_sample = 0.0
        for packet in container.demux(stream):
            for frame in packet.decode():
                counts["decoded"] += 1
                if frame.pts is None:
                    continue
                timestamp = float(frame.pts * frame.time_base) - start
                if timestamp < next_sample - slack:
                    continue
                yield frame.to_ndarray(format="bgr24")
                next_sample = (math.floor((timestamp + slack) / interval) + 1) * interval

def main():
    detector_name, fps = sys.argv[1], float(sys.argv[2])
    data = sys.stdin.buffer.read()
    started = time.perf_counter()
    if detector_name == "mtcnn":
        # torch (with torchvision, which loads triton) before TensorFlow: the other way round,
        # triton's LLVM clashes with TensorFlow's and the process dies of a segmentation fault.
        import facenet_pytorch  # noqa: F401
    import av, numpy, tensorflow
    try:
        from fer import FER
    except ImportError:  # fer 25.10.3's package exports nothing; the class lives in fer.fer
        from fer.fer import FER
    detector = FER(mtcnn=detector_name == "mtcnn")
    # Warm-up (part of start-up): one call on the first frame, so first-use costs are not timed.
    counts = {"decoded": 0}
    for image in sampled_frames(data, fps, counts):
        detector.detect_emotions(image)
        break
    startup = time.perf_counter() - started

    counts = {"decoded": 0}
    frames = faces = 0
    busy0, cpu0, wall0 = system_busy(), time.process_time(), time.perf_counter()
    for image in sampled_frames(data, fps, counts):
        frames += 1
        faces += len(detector.detect_emotions(image))  # fer takes BGR (OpenCV order), as documented
    wall, cpu, busy = time.perf_counter() - wall0, time.process_time() - cpu0, system_busy() - busy0

    from importlib import metadata
    versions = {}
    for name in ("fer", "tensorflow", "tensorflow-cpu", "keras", "facenet-pytorch", "torch", "opencv-contrib-python"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions["TensorFlow (imported)"] = tensorflow.__version__
    if "torch" in sys.modules:
        versions["torch (imported)"] = sys.modules["torch"].__version__
    import platform
    versions["Python"] = platform.python_version()
    versions["PyAV"] = av.__version__
    versions["numpy"] = numpy.__version__
    print(json.dumps({"frames": frames, "faces": faces, "decoded": counts["decoded"], "wall_s": wall,
                      "cpu_s": cpu, "system_busy_s": busy, "startup_s": startup, "versions": versions}))

main()
'''


# --------------------------------------------------------------------------- the peer's environment


@dataclass
class PeerEnv:
    """The peer's virtual environment, as its marker file describes it."""

    path: Path
    installed: list[list[str]]  # the alternative of each install step that was installed
    versions: dict[str, str]
    install_seconds: float
    size_bytes: int
    reused: bool = False

    @property
    def python(self) -> Path:
        """The environment's Python interpreter."""
        return self.path / "bin" / "python"


def directory_size(path: Path) -> int:
    """Bytes of all regular files under ``path`` (symbolic links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def requirement_spec() -> list[list[list[str]]]:
    """The install steps as plain lists, to compare with a marker file (JSON has no tuples)."""
    return [[list(alternative) for alternative in step] for step in INSTALL_STEPS]


def pip_install(python: Path, arguments: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``pip install ARGUMENTS`` with ``python``; output captured, not checked."""
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *arguments]
    print(f"  $ {shlex.join(command[1:])}", file=sys.stderr)
    return subprocess.run(command, capture_output=True, text=True, check=False)


def installed_versions(python: Path) -> dict[str, str]:
    """Versions of :data:`PEER_DISTRIBUTIONS` installed in the environment of ``python``."""
    script = ("import json, importlib.metadata as m\nout = {}\n"
              f"for name in {list(PEER_DISTRIBUTIONS)!r}:\n"
              "    try:\n        out[name] = m.version(name)\n    except m.PackageNotFoundError:\n        pass\n"
              "print(json.dumps(out))")
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(result.stdout)
    return versions


def read_marker(path: Path) -> PeerEnv | None:
    """The environment at ``path`` if its marker says it holds today's install steps; else None."""
    marker = path / MARKER_NAME
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("requirements") != requirement_spec() or not (path / "bin" / "python").exists():
        return None
    return PeerEnv(path, data["installed"], data["versions"], data["install_seconds"], data["size_bytes"],
                   reused=True)


def ensure_peer_venv(path: Path, *, reinstall: bool = False) -> PeerEnv:
    """The peer's environment at ``path``: reused when its marker matches, else created and installed.

    Each step of :data:`INSTALL_STEPS` is one ``pip install``; a step's alternatives are
    tried in turn. The marker (``classlens-peers.json``) is written last, so an
    interrupted install is redone from the start the next time.
    """
    if not reinstall and (existing := read_marker(path)) is not None:
        return existing
    if path.exists() and any(path.iterdir()) and not (path / "pyvenv.cfg").exists():
        raise SystemExit(f"{path} is neither empty nor a virtual environment: not replacing it (choose --peer-venv)")
    print(f"installing fer {FER_VERSION} and its requirements into {path} (once; several minutes)", file=sys.stderr)
    started = time.perf_counter()
    (path / MARKER_NAME).unlink(missing_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = path / "bin" / "python"
    installed: list[list[str]] = []
    for step in INSTALL_STEPS:
        failures = []
        for alternative in step:
            result = pip_install(python, list(alternative))
            if result.returncode == 0:
                installed.append(list(alternative))
                break
            failures.append(f"pip install {shlex.join(alternative)}:\n" + tail(result.stderr or result.stdout, 20))
        else:
            raise SystemExit("installing the peer environment failed:\n\n" + "\n\n".join(failures))
    env = PeerEnv(path, installed, installed_versions(python), time.perf_counter() - started, directory_size(path))
    marker = {"requirements": requirement_spec(), "installed": env.installed, "versions": env.versions,
              "install_seconds": round(env.install_seconds, 1), "size_bytes": env.size_bytes,
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    (path / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    print(f"installed in {env.install_seconds:.0f} s, {env.size_bytes / 2**30:.2f} GiB", file=sys.stderr)
    return env


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, without pip's notes about unusable index locations."""
    kept = [line for line in text.splitlines() if "is ignored: it is neither a file nor a directory" not in line]
    return "\n".join(kept[-lines:])


# --------------------------------------------------------------------------- measuring


def system_busy() -> float:
    """Seconds of CPU time that all processes on the machine have used so far (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One measured line of the table: one tool on one file."""

    peer: str
    detector: str
    frames: int
    faces: int
    startup_s: float
    wall_s: float
    cpu_s: float
    other_s: float  # CPU seconds other processes used during the timed part
    students: int | None = None
    note: str = ""

    @property
    def cores_busy(self) -> float:
        """Average cores this tool kept busy (its CPU time over wall time)."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def other_cores(self) -> float:
        """Average cores that other processes kept busy meanwhile."""
        return max(0.0, self.other_s) / self.wall_s if self.wall_s else 0.0


@dataclass
class FileResult:
    """All rows measured on one video."""

    name: str
    description: str
    size_bytes: int
    rows: list[Row] = field(default_factory=list)

    @property
    def classlens(self) -> Row:
        """The ClassLens row (measured first)."""
        return self.rows[0]


def run_classlens(video: io.BytesIO, sample_fps: float, components: PipelineComponents,
                  overrides: dict[str, Any], startup_s: float, detector: str) -> Row:
    """Time ``analyze_recording`` as ``benchmarks/analyze.py``'s ``analyze_once`` does."""
    plan = RecordedFileSource.configured(video, load_settings(sample_fps=sample_fps, **overrides)).decoding_plan()
    busy0 = system_busy()
    run = analyze.analyze_once(video, sample_fps, components, overrides)
    other = system_busy() - busy0 - run.timing.cpu
    return Row("ClassLens", f"insightface {detector} (`analyze_recording`, all stages)", run.frames_sampled,
               run.faces, startup_s, run.timing.wall, run.timing.cpu, other, students=run.students,
               note=f"decoding: {plan.mode.value}")


def run_fer(env: PeerEnv, data: bytes, sample_fps: float, detector: str, label: str) -> Row:
    """Run ``fer`` with ``detector`` in the peer environment on the encoded video ``data`` (sent on stdin)."""
    command = [str(env.python), "-c", PEER_WORKER, detector, f"{sample_fps:g}"]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONNOUSERSITE": "1"}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(command, input=data, capture_output=True, check=False, env=environment,
                            cwd=tempfile.gettempdir())
    stderr = result.stderr.decode("utf-8", "replace")
    lines = [line for line in result.stdout.decode("utf-8", "replace").splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"fer ({detector}) failed with exit status {result.returncode}:\n{tail(stderr, 30)}")
    out = json.loads(lines[-1])
    env.versions.update({f"worker: {key}": value for key, value in out["versions"].items()})
    return Row(f"fer {out['versions'].get('fer', FER_VERSION)}", label, out["frames"], out["faces"],
               out["startup_s"], out["wall_s"], out["cpu_s"], out["system_busy_s"] - out["cpu_s"],
               note=f"decoded {out['decoded']} frames")


# --------------------------------------------------------------------------- report


def markdown_table(results: list[FileResult], sample_fps: float) -> str:
    """One table over all files: a ClassLens row, then the peer rows, per file."""
    lines = [
        f"Sampling: {sample_fps:g} fps on every side. \"wall s\" is the timed part only (decoding + detection + "
        "emotion, and for ClassLens everything `analyze_recording` does); \"start-up s\" (not timed) is loading "
        "the models and one warm-up. CPU = the tool's CPU time / wall time, in cores; \"others\" = cores that "
        "other processes on the machine kept busy meanwhile.",
        "",
        "| file | peer | detector | frames sampled | faces | students | start-up s | wall s | CPU (cores) "
        "| others (cores) | wall / ClassLens | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        base = result.classlens
        for row in result.rows:
            ratio = "1.00× (reference)" if row is base else f"{row.wall_s / base.wall_s:.2f}×"
            students = "–" if row.students is None else str(row.students)
            lines.append(
                f"| {result.name} | {row.peer} | {row.detector} | {row.frames} | {row.faces} | {students} | "
                f"{row.startup_s:.1f} | {row.wall_s:.2f} | {row.cores_busy:.2f} | {row.other_cores:.2f} | {ratio} "
                f"| {row.note} |"
            )
    return "\n".join(lines)


def interpretation(results: list[FileResult]) -> str:
    """Plain words computed from the numbers: who is faster on each file, by how much, and who finds more faces."""
    paragraphs = []
    for result in results:
        base = result.classlens
        sentences = []
        for row in result.rows[1:]:
            ratio = row.wall_s / base.wall_s if base.wall_s else float("inf")
            speed = (f"takes {ratio:.2f}× ClassLens's wall time" if ratio >= 1
                     else f"takes {ratio:.2f}× ClassLens's wall time ({1 / ratio:.2f}× faster)")
            faces = (f"finds {row.faces / base.faces:.0%} of the faces ClassLens finds ({row.faces} vs {base.faces})"
                     if base.faces else f"finds {row.faces} faces where ClassLens finds none")
            frames = "" if row.frames == base.frames else f" (it sampled {row.frames} frames, ClassLens {base.frames})"
            sentences.append(f"fer with {row.detector.split(' (')[0]} {speed} and {faces}{frames}")
        fastest = min(result.rows, key=lambda r: r.wall_s)
        most = max(result.rows, key=lambda r: r.faces)
        if all(row.faces == most.faces for row in result.rows):
            faces_text = f"every side finds the same {most.faces} faces"
        else:
            faces_text = f"most faces: {most.peer} with {most.detector.split(' (')[0]} ({most.faces})"
        paragraphs.append(
            f"On {result.name}: " + "; ".join(sentences) + f". Fastest: {fastest.peer} with "
            f"{fastest.detector.split(' (')[0]} ({fastest.wall_s:.2f} s); {faces_text}. "
            "ClassLens's time also covers what fer does not do: "
            f"tracking {base.students} student{'' if base.students == 1 else 's'}, the engagement model, the store "
            "and the reports."
        )
    paragraphs.append(
        "The faces are counts, not checked against a ground truth: a detector that finds more may also find "
        "things that are not faces, and one that finds fewer may miss small or turned faces (fer's Haar cascade "
        "ignores faces under 50 px)."
    )
    loaded = [row for result in results for row in result.rows if row.other_cores >= 0.25]
    if loaded:
        worst = max(loaded, key=lambda r: r.other_cores)
        paragraphs.append(
            f"Other processes were busy during {len(loaded)} of the {sum(len(r.rows) for r in results)} timed runs "
            f"(up to {worst.other_cores:.2f} cores, during {worst.peer} with {worst.detector.split(' (')[0]}): "
            "those times are inflated by the contention, and the ratios are less certain than the table's digits."
        )
    else:
        paragraphs.append("No other process kept as much as a quarter of a core busy during any timed run.")
    return "\n\n".join(paragraphs)


def machine_info(env: PeerEnv, classlens_components: PipelineComponents, settings: Any) -> dict[str, str]:
    """What the numbers were measured on, ClassLens's side as ``benchmarks/analyze.py`` writes it, then fer's."""
    info = analyze.machine_info(settings, classlens_components)
    peer_versions = {key.removeprefix("worker: "): value for key, value in env.versions.items()
                     if key.startswith("worker: ")} or env.versions
    home = Path.home()
    shown = f"~/{env.path.relative_to(home)}" if env.path.is_relative_to(home) else str(env.path)
    info["peer environment"] = (
        f"`{shown}` ({env.size_bytes / 2**30:.2f} GiB, installed in {env.install_seconds:.0f} s: "
        + "; ".join(f"`pip install {shlex.join(step)}`" for step in env.installed) + ")"
    )
    info["peer versions (in the peer environment)"] = ", ".join(
        f"{name} {version}" for name, version in sorted(peer_versions.items()))
    return info


def docs_section(info: dict[str, str], command: str, videos: str, table: str, words: str) -> str:
    """The section of docs/benchmarks.md that this script owns."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    return f"""{SECTION_BEGIN}
## Peers side by side (`benchmarks/peers.py`)

ClassLens against the peer library [fer](https://pypi.org/project/fer/), on the same
in-memory videos at the same sampling rate, in one run. Measured {today} on a CPU-only
machine; absolute times hold for this machine only, ratios are measured within one run.

{machine}

Command (from the repository root):

```
{command}
```

{videos}

{table}

{words}

How it is measured: fer is never a dependency of ClassLens. The script keeps it in a
virtual environment of its own (`--peer-venv`, default `~/.cache/classlens/peers-venv`),
installed once from PyPI (torch 2.13.0 and torchvision 0.28.0 first, PyPI's builds, as
torchvision's wheels load only with those; TensorFlow for the CPU; then fer and
facenet-pytorch without their dependencies, whose pins would pull the full TensorFlow and
torch 2.2) and reused while its marker file lists the same install steps. fer
runs there in a subprocess that gets the encoded MP4 on its standard input and decodes it
with PyAV from memory, as ClassLens does (`thread_type = "AUTO"`, non-reference frames
skipped when samples are three or more frames apart), and samples the first frame at or
after each instant k / fps on the stream's timestamps (half a frame of slack, as
`RecordedFileSource`). Each sampled frame goes as a BGR array (the order fer documents and
converts from) to `detect_emotions`, which finds the faces and classifies each one's
emotion (fer's default quantized TFLite model). fer's default detector is OpenCV's Haar
cascade with `min_face_size = 50` px; `FER(mtcnn=True)` uses facenet-pytorch's MTCNN
(which fer hands the BGR frame as it is). Importing TensorFlow and fer, building the
detector and one warm-up call on the first frame are reported as start-up, not timed.
ClassLens runs in the benchmark's own process as in `benchmarks/analyze.py`:
`PipelineComponents.load` (execution provider `cpu`) and a warm-up analysis of a short
gallery video before timing, then `analyze_recording` with a fresh temporary store and
report folder per file; its decoding plan (`decode_mode = auto`) is in the note column.
ClassLens does more per frame than fer: it also tracks students, estimates head pose and
engagement, and writes the store and the reports. Every side is timed once;
"others" is the machine's CPU time (`/proc/stat`) during the timed part less the tool's own.
No frame or face crop is written to disk on either side.
{SECTION_END}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="length of the gallery video (default 600; e.g. 30 for a quick check)")
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate on every side (default 1)")
    parser.add_argument("--clips", nargs="*", default=["WolfgangLanger_Pexels.mp4"], metavar="NAME",
                        help="camera clips of --media to measure too, read into memory "
                             "(default WolfgangLanger_Pexels.mp4; none: --clips)")
    parser.add_argument("--media", type=Path, default=analyze.DEFAULT_MEDIA_DIR, help="folder of the test media")
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                        help=f"the peer's virtual environment (default {DEFAULT_PEER_VENV})")
    parser.add_argument("--reinstall", action="store_true", help="rebuild the peer environment even if it matches")
    parser.add_argument("--no-mtcnn", action="store_true", help="skip fer with MTCNN (the slowest row)")
    parser.add_argument("--write-docs", action="store_true", help="write/update this script's section of "
                        "docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.fps <= 0:
        parser.error("--seconds and --fps must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Install (or reuse) the peer environment, build the videos, measure every side, print and record."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"execution_provider": "cpu"}
    env = ensure_peer_venv(args.peer_venv.expanduser(), reinstall=args.reinstall)
    print(f"peer environment {env.path}: " + ", ".join(f"{k} {v}" for k, v in sorted(env.versions.items())),
          file=sys.stderr)

    started = time.perf_counter()
    gallery = analyze.build_gallery_video(args.media, args.seconds)
    data = gallery.getvalue()
    print(f"generated the gallery video in {time.perf_counter() - started:.1f} s (not measured): "
          f"{args.seconds:g} s, {len(data) / 1e6:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()[:16]}",
          file=sys.stderr)
    videos: list[tuple[str, str, io.BytesIO]] = [(
        f"gallery {args.seconds:g} s",
        f"3×3 gallery, {analyze.WIDTH}×{analyze.HEIGHT}, {analyze.FPS} fps, H.264, {args.seconds:g} s, "
        f"{len(data) / 1e6:.1f} MB, built in memory by `benchmarks/analyze.py`", gallery)]
    for name in args.clips:
        clip = io.BytesIO((args.media / name).read_bytes())
        info = RecordedFileSource(clip, args.fps).probe()
        description = (f"{name}: {info.width}×{info.height}, {info.average_fps:.2f} fps, {info.codec}, "
                       f"{info.duration_seconds:.1f} s, {clip.getbuffer().nbytes / 1e6:.1f} MB, read into memory")
        videos.append((name, description, clip))

    settings = load_settings(**overrides)
    started = time.perf_counter()
    components = PipelineComponents.load(settings)
    loaded = time.perf_counter() - started
    # Warm-up (not measured, part of start-up): first-use costs of the store, the report templates and onnxruntime.
    warm_video = analyze.build_gallery_video(args.media, 3.0)
    started = time.perf_counter()
    analyze.analyze_once(warm_video, args.fps, components, overrides)
    classlens_startup = loaded + time.perf_counter() - started
    print(f"ClassLens: loaded the models and warmed up in {classlens_startup:.1f} s (not measured)", file=sys.stderr)

    detectors = [d for d in FER_DETECTORS if not (args.no_mtcnn and d[1] == "mtcnn")]
    results: list[FileResult] = []
    for name, description, video in videos:
        result = FileResult(name, description, video.getbuffer().nbytes)
        row = run_classlens(video, args.fps, components, overrides, classlens_startup, str(settings.detector))
        result.rows.append(row)
        print(f"{name}: ClassLens {row.wall_s:.2f} s, {row.frames} frames, {row.faces} faces, {row.students} "
              f"students ({row.note})", file=sys.stderr)
        for label, detector in detectors:
            row = run_fer(env, video.getvalue(), args.fps, detector, label)
            result.rows.append(row)
            print(f"{name}: fer {detector} {row.wall_s:.2f} s, {row.frames} frames, {row.faces} faces "
                  f"(start-up {row.startup_s:.1f} s, {row.note})", file=sys.stderr)
        results.append(result)

    table = markdown_table(results, args.fps)
    words = interpretation(results)
    videos_text = "Videos:\n\n" + "\n".join(f"- {description}" for _name, description, _video in videos)
    print()
    print(videos_text)
    print()
    print(table)
    print()
    print(words)
    if args.write_docs:
        command = "python benchmarks/peers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        info = machine_info(env, components, settings)
        analyze.write_docs(docs_section(info, command.strip(), videos_text, table, words), SECTION_BEGIN, SECTION_END)
        print(f"\nwrote {analyze.DOCS_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
