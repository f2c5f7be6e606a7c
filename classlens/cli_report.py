"""``classlens report SESSION``: render a session's reports again and, optionally, (re-)send the email."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kernel.errors import ClassLensError

_console = Console(stderr=True)
_out = Console()


def report(
    session_id: Annotated[int, typer.Argument(metavar="SESSION", help="The session's (analysis's) id.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Report folder. Default: where it was rendered before, else reports_dir."),
    ] = None,
    email: Annotated[bool, typer.Option("--email", help="Email the report to the host (again).")] = False,
    to: Annotated[
        str | None, typer.Option("--to", help="Send to this address instead of the session's host (implies --email).")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help="Store URL (overrides CLASSLENS_DATABASE_URL).")] = None,
) -> None:
    """Render a session's reports and, with --email, send the after-class email (again).

    Exits with 1 and one line when the mail server refuses the message or cannot be
    reached after every retry; the report is on disk either way.
    """
    try:
        from kernel.settings import load_settings
        from kernel.store import init_store
        from reports.delivery import deliver_after_session

        settings = load_settings(database_url=db)
        engine = init_store(settings.resolved_database_url)
        want_email = email or to is not None
        result = deliver_after_session(
            settings, engine, session_id, out_dir=out, send_email=want_email, recipient=to, resend=True
        )
    except ClassLensError as error:
        _console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=error.exit_code) from None
    _out.print(f"report of session {session_id}: {result.report.overview}", highlight=False, soft_wrap=True)
    if not want_email:
        return
    if result.email_status.value == "sent":
        _out.print(f"emailed to {result.recipient} ({result.attempts} attempt(s))", highlight=False)
        return
    reason = result.email_detail or "not sent"
    if result.refused:
        _console.print(f"[bold red]error:[/] email to {result.recipient} failed: {reason}", highlight=False,
                       soft_wrap=True)
    else:
        _console.print(f"[bold red]error:[/] email not sent: {reason}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)
