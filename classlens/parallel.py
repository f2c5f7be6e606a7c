"""Several recordings at once: one process per recording in flight, onnxruntime's threads sized to match.

One analysis keeps about two cores busy at best (a decoder thread beside detection, and
the inference thread), and less during its start, its Python-bound steps and its report.
With several files, running them side by side fills those gaps; each process gets
``cores / jobs`` onnxruntime threads so that the processes do not fight over cores.

The processes are spawned (not forked): a fork of a process that already runs
onnxruntime's or FFmpeg's threads can deadlock. Each child reads the same settings
(the parent's overrides, the same environment), loads the models once and analyses
its files one after another; the store is shared (SQLite in WAL mode or PostgreSQL).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.errors import BadInputError, ClassLensError

#: How often a child sends its progress (seconds): often enough for a bar, rarely enough to cost nothing.
PROGRESS_INTERVAL_SECONDS = 0.5


@dataclass(frozen=True)
class FileProgress:
    """Progress of one file of a parallel run, as its child process last reported it."""

    index: int
    """The file's position in the command line."""
    frames_sampled: int
    """Frames sampled so far."""
    frames_expected: int | None
    """Frames the whole file will yield, when its duration is known."""
    faces_found: int
    """Faces detected so far."""
    students_tracked: int
    """Tracks that already count as students."""


@dataclass(frozen=True)
class FileResult:
    """How one file of a parallel run ended: its outcome, or the one-line error that stopped it."""

    index: int
    """The file's position in the command line."""
    outcome: Any | None
    """The :class:`~classlens.analysis.AnalysisOutcome`, or None when the analysis failed."""
    error: str | None
    """Why it failed, in one line."""
    bad_input: bool = False
    """Whether the failure was the input's fault (exit code 2)."""


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def jobs_for(files: int, requested: int, cores: int | None = None) -> int:
    """How many files to analyse at once: ``requested`` (0: one per core), never more than the files."""
    cores = cores or cpu_count()
    return max(1, min(files, requested if requested > 0 else cores))


def threads_per_job(jobs: int, configured: int, cores: int | None = None) -> int:
    """Threads onnxruntime gets in each process: the configured count, or the cores shared out among the jobs."""
    if configured:
        return configured
    return max(1, (cores or cpu_count()) // jobs)


# State of a child process (set by _start_child).
_progress_queue: Any = None
_settings_overrides: dict[str, Any] = {}
_components: Any = None


def _start_child(progress_queue: Any, overrides: dict[str, Any]) -> None:
    global _progress_queue, _settings_overrides
    _progress_queue = progress_queue
    _settings_overrides = overrides


def _analyze_in_child(index: int, path: Path, out_dir: Path | None, title: str | None) -> FileResult:
    """Analyse one file in a child process; errors come back as one line, never as a pickled exception."""
    global _components
    from classlens.analysis import AnalysisProgress, analyze_recording
    from kernel.settings import load_settings
    from pipeline.models import PipelineComponents

    last_sent = [0.0]

    def report(state: AnalysisProgress) -> None:
        now = time.monotonic()
        if now - last_sent[0] < PROGRESS_INTERVAL_SECONDS and state.frames_sampled != state.frames_expected:
            return
        last_sent[0] = now
        _progress_queue.put(FileProgress(index, state.frames_sampled, state.frames_expected, state.faces_found,
                                         state.students_tracked))

    try:
        settings = load_settings(**_settings_overrides)
        if _components is None and not settings.broker_url:
            _components = PipelineComponents.load(settings)
        outcome = analyze_recording(path, settings, out_dir=out_dir, progress=report, components=_components,
                                    title=title)
    except BadInputError as error:
        return FileResult(index, None, str(error), bad_input=True)
    except ClassLensError as error:
        return FileResult(index, None, str(error))
    return FileResult(index, outcome, None)


def analyze_in_parallel(videos: list[Path], overrides: dict[str, Any], *, jobs: int,
                        out_dirs: list[Path | None], title: str | None = None,
                        on_progress: Callable[[FileProgress], None] | None = None,
                        on_result: Callable[[FileResult], None] | None = None) -> list[FileResult]:
    """Analyse ``videos`` in ``jobs`` spawned processes; results in the order of ``videos``.

    ``overrides`` are the keyword arguments the settings are loaded with (the command
    line's); ``on_progress`` and ``on_result`` are called on the calling thread's side
    (a listener thread) as children report.
    """
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                item = progress_queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if on_progress is not None:
                on_progress(item)

    listener = threading.Thread(target=listen, name="classlens-progress", daemon=True)
    listener.start()
    results: list[FileResult | None] = [None] * len(videos)
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_child,
                                 initargs=(progress_queue, overrides)) as pool:
            futures: list[Future[FileResult]] = [
                pool.submit(_analyze_in_child, index, video, out_dirs[index], title)
                for index, video in enumerate(videos)]
            for future in as_completed(futures):
                result = future.result()
                results[result.index] = result
                if on_result is not None:
                    on_result(result)
    finally:
        stop.set()
        listener.join(timeout=2)
    return [result for result in results if result is not None]
