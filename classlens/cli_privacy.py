"""Command line of the privacy controls: ``classlens retention run|beat`` and ``classlens forget``.

Registered in :mod:`classlens.cli`; heavy imports stay inside the commands so that
``classlens --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

retention_app = typer.Typer(help="Delete sessions older than retention_days, now or on a schedule.",
                            no_args_is_help=True)

console = Console(stderr=True)
out = Console()

DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store (default: SQLite file).")]


@retention_app.command("run")
def retention_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the expired sessions without deleting them.")]
    = False,
    db: DbOption = None,
) -> None:
    """Delete every session older than retention_days, with its rows and report folder."""
    from classlens.cli_common import user_errors
    from classlens.privacy import run_retention
    from kernel.settings import load_settings
    from kernel.store import init_store

    with user_errors():
        settings = load_settings(database_url=db)
        engine = init_store(settings.resolved_database_url)
        result = run_retention(engine, settings, dry_run=dry_run)
        if result.cutoff is None:
            console.print("retention is off (retention_days = 0): nothing deleted")
            return
        verb = "would delete" if dry_run else "deleted"
        console.print(f"{verb} {len(result.deleted_analysis_ids)} session(s) created before "
                      f"{result.cutoff:%Y-%m-%d %H:%M} UTC", highlight=False)
        for analysis_id in result.deleted_analysis_ids:
            out.print(str(analysis_id), highlight=False)


@retention_app.command("beat")
def retention_beat(
    broker: Annotated[str | None, typer.Option("--broker", help="Celery broker URL (redis://host:6379/0).")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="debug, info, warning or error.")] = "info",
) -> None:
    """Run Celery beat: sends the retention job every retention_interval_hours to maintenance_queue."""
    from classlens.cli_common import user_errors
    from kernel.errors import ConfigurationError
    from kernel.settings import load_settings

    with user_errors():
        from workers.celery_app import make_celery_app

        settings = load_settings(broker_url=broker)
        if settings.retention_days == 0:
            raise ConfigurationError("retention_days is 0 (keep forever): there is nothing to schedule")
        if loglevel.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigurationError(f"loglevel: expected debug, info, warning or error, got {loglevel!r}")
        app = make_celery_app(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # Beat remembers when each job last ran, so a restart does not run retention at once again.
        schedule_file = settings.data_dir / "celerybeat-schedule"
        app.Beat(loglevel=loglevel.upper(), schedule=str(schedule_file)).run()


def forget(
    session_id: Annotated[int, typer.Option("--session", help="Id of the session (analysis) the student was in.")],
    student: Annotated[str, typer.Option("--student", help="The student's label in the reports, e.g. 'Student 3'.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOption = None,
) -> None:
    """Delete one student's data from a session (every table) and re-render its reports without them."""
    from classlens.cli_common import user_errors
    from classlens.privacy import forget_student
    from kernel.settings import load_settings
    from kernel.store import init_store

    with user_errors():
        settings = load_settings(database_url=db)
        engine = init_store(settings.resolved_database_url)
        if not yes and not typer.confirm(f"Delete every record of {student!r} in session {session_id}?"):
            console.print("nothing deleted")
            raise typer.Exit(code=1)
        result = forget_student(engine, settings, session_id, student)
        rows = ", ".join(f"{table} {count}" for table, count in sorted(result.rows_deleted.items()) if count)
        console.print(f"session {session_id}: deleted {student!r} ({rows})", highlight=False, soft_wrap=True)
        if result.reports_rerendered is not None:
            out.print(str(result.reports_rerendered / "index.html"), highlight=False, soft_wrap=True)
