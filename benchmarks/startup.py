"""Benchmark: how long `classlens demo` takes with a warm model cache, and where the time goes.

Two measurements:

* wall time of whole commands, each in a fresh process as a user runs them
  (``classlens version``: start-up alone; ``classlens demo --quiet``: the demo), median of
  ``--repeat`` runs;
* the demo's phases in one fresh process: importing the command line, loading the models,
  building the demo video in memory, the analysis, the reports.

Usage::

    python benchmarks/startup.py [--repeat 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- benchmarks/startup.py: begin -->"
SECTION_END = "<!-- benchmarks/startup.py: end -->"

#: Runs in a fresh interpreter and prints the phases of the demo as JSON.
PHASES_SCRIPT = r"""
import json, sys, tempfile, time
from pathlib import Path
marks = {}
start = time.perf_counter()
import classlens.cli  # noqa: F401
marks["import the command line"] = time.perf_counter()
from kernel.settings import load_settings
from pipeline.models import PipelineComponents
settings = load_settings(database_url=f"sqlite:///{tempfile.mkdtemp()}/store.sqlite3")
components = PipelineComponents.load(settings)
marks["load the models"] = time.perf_counter()
from vision.synthetic import demo_classroom_video
video = demo_classroom_video()
marks["build the demo video"] = time.perf_counter()
from classlens.analysis import analyze_recording
outcome = analyze_recording(video, settings, out_dir=Path(tempfile.mkdtemp()) / "r", components=components,
                            title="demo class")
marks["analyse and write the reports"] = time.perf_counter()
previous, phases = start, {}
for name, at in marks.items():
    phases[name] = at - previous
    previous = at
print(json.dumps(phases))
"""


def command_seconds(argv: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    """Median wall time of ``argv`` run ``repeat`` times, each in a fresh process."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    """Measure, print, and optionally record in docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="classlens-startup-") as tmp:
        import os

        env = {**os.environ, "CLASSLENS_DATA_DIR": tmp}
        subprocess.run([python, "-m", "classlens", "demo", "--quiet"], check=True, capture_output=True, env=env)
        version = command_seconds([python, "-m", "classlens", "version"], args.repeat, env)
        demo = command_seconds([python, "-m", "classlens", "demo", "--quiet"], args.repeat, env)
        phases = json.loads(subprocess.run([python, "-c", PHASES_SCRIPT], check=True, capture_output=True,
                                           text=True, env=env, cwd=REPO_ROOT).stdout.strip().splitlines()[-1])
    rows = [f"| `classlens version` (start-up alone) | {version:.2f} |",
            f"| `classlens demo --quiet`, warm model cache | {demo:.2f} |"]
    phase_rows = [f"| {name} | {seconds:.2f} |" for name, seconds in phases.items()]
    table = "| command | median wall time (s) |\n|---|---|\n" + "\n".join(rows)
    phase_table = "| phase of the demo (one fresh process) | seconds |\n|---|---|\n" + "\n".join(phase_rows)
    print(table)
    print()
    print(phase_table)
    if args.write_docs:
        write_docs(table, phase_table, args.repeat, demo)


#: The demo's target with a warm model cache (issue "the first hour").
TARGET_SECONDS = 4.0


def write_docs(table: str, phase_table: str, repeat: int, demo_seconds: float) -> None:
    """Replace this script's section of docs/benchmarks.md, or append it."""
    import re

    verdict = "met" if demo_seconds < TARGET_SECONDS else "not met yet"
    section = f"""{SECTION_BEGIN}
## Start-up: `classlens demo` with a warm model cache (`benchmarks/startup.py`)

Measured {dt.date.today().isoformat()} on the 2-core CPU development machine; median of {repeat} runs, each in a
fresh process (`python benchmarks/startup.py --repeat {repeat} --write-docs`).

{table}

{phase_table}

The target is a demo under {TARGET_SECONDS:g} s with a warm cache: **{verdict}** ({demo_seconds:.2f} s). Two changes
cut it by about 1.7 s (5.8 s before, 4.05–4.19 s after, measured back to back on a quiet host):
`ml_dtypes` is pinned below 0.7 (0.7.0's extension took about 1 s to load, and onnx,
which insightface imports for its detector classes, loads it at start-up; 0.5.4 and 0.6.0 load in under 10 ms),
and the demo video is drawn at 2 frames per second instead of 10 (the analysis samples one per second, and the
same 12 frames, 78 faces and 7 students come out; drawing and encoding went from 1.7 s to about 0.35 s). The
phases above show what is left: start-up, the models (importing insightface and onnxruntime, creating the
sessions), and the analysis with its reports.
{SECTION_END}
"""
    text = DOCS_PATH.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END) + r"\n?", re.S)
    text = pattern.sub(lambda _m: section, text, count=1) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section)
    DOCS_PATH.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
