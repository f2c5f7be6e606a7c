"""``classlens bot join``: send the meeting bot into a Janus VideoRoom from the command line.

The command shows a live status line (state, participants, students, frames). Ctrl-C
makes the bot leave cleanly: the session is finalised and its reports are written. A
join that fails (unreachable server, no such room, wrong PIN) prints one line and exits
with code 2; the session is recorded as failed with the reason.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated, Any

import typer
from rich.console import Console

from classlens.cli_common import check_fps
from classlens.cli_serve import DatabaseOption, HostOption, PortOption, ProxyHeadersOption, run_server

bot_app = typer.Typer(help="Run the meeting bot: join a live class and analyse it.", no_args_is_help=True)
_console = Console(stderr=True)
_out = Console()


def _status_line(status: Any) -> str:
    names = ", ".join(status.participants) or "nobody yet"
    line = (f"[bold]{status.state.value}[/] · {status.students_live} students · {status.frames_sampled} frames · "
            f"analysing: {names}")
    if status.excluded:
        line += f" · {status.excluded} not analysed (consent)"
    if status.gaps:
        line += f" · {status.gaps} reconnection{'s' if status.gaps != 1 else ''}"
    return line


async def _run_bot(settings: Any, target: Any, consent: Any, title: str, course: str, host_email: str | None,
                   quiet: bool) -> Any:
    from bot.live import create_live_analysis
    from bot.meeting import MeetingBot
    from kernel.accounts import owner_id_for
    from kernel.store import init_store, session_scope

    engine = await asyncio.to_thread(init_store, settings.resolved_database_url)

    def create() -> int:
        with session_scope(engine) as session:
            owner_id = owner_id_for(session, settings.analysis_owner_email)
        return create_live_analysis(engine, settings, source=f"{target.janus_url} room {target.room}",
                                    title=title or f"meeting in room {target.room}", owner_id=owner_id,
                                    course=course or settings.analysis_course, host_email=host_email, consent=consent)

    analysis_id = await asyncio.to_thread(create)
    with _console.status("joining…", spinner="dots") as live_line:
        def show(status: Any) -> None:
            if not quiet:
                live_line.update(_status_line(status))

        bot = MeetingBot(settings, engine, analysis_id, target, on_status=show)
        loop = asyncio.get_running_loop()
        run = asyncio.ensure_future(bot.run())

        def interrupted() -> None:
            # The first Ctrl-C (or SIGTERM) asks the bot to leave and finalise; a second one cancels
            # what it is waiting for, and it finalises with what it has.
            if bot.stop_requested:
                run.cancel()
            bot.stop("interrupted from the command line")

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, interrupted)
        try:
            return await run
        except asyncio.CancelledError:
            if bot.outcome is None:
                raise
            return bot.outcome  # cancelled by a second Ctrl-C, and finalised on the way out
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


@bot_app.command("join")
def join(
    janus: Annotated[str, typer.Option("--janus", help="URL of the Janus HTTP API, e.g. http://meet:8088/janus.")],
    room: Annotated[int, typer.Option("--room", min=1, help="The VideoRoom room number.")],
    pin: Annotated[str | None, typer.Option("--pin", envvar="JANUS_ROOM_PIN",
                                            help="The room's PIN (or the JANUS_ROOM_PIN variable).")] = None,
    display_name: Annotated[str | None, typer.Option(
        "--display-name", help="The bot's name in the meeting (default: the bot_display_name setting).")] = None,
    fps: Annotated[float | None, typer.Option(
        "--fps", callback=check_fps, help="Frames sampled per second of each student's video, above 0 and at "
                                          "most 30 (default: the sample_fps setting, 1).")]
    = None,
    db: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store (default: SQLite file).")]
    = None,
    title: Annotated[str, typer.Option("--title", help="Name of the class shown in reports.")] = "",
    course: Annotated[str, typer.Option(
        "--course", help="Course the session belongs to (default: the analysis_course setting).")] = "",
    owner: Annotated[str | None, typer.Option(
        "--owner", help="Email of the ClassLens user who owns the session and sees it in the archive "
                        "(default: the analysis_owner_email setting).")] = None,
    host_email: Annotated[str | None, typer.Option("--host-email", help="Where the after-class email goes.")]
    = None,
    opt_out: Annotated[list[str] | None, typer.Option(
        "--opt-out", help="Display name never to analyse (repeatable).")] = None,
    opt_in: Annotated[list[str] | None, typer.Option(
        "--opt-in", help="Analyse only these display names (repeatable).")] = None,
    idle_timeout: Annotated[float | None, typer.Option(
        "--idle-timeout", help="Leave after this many seconds without anyone publishing.")] = None,
    max_duration: Annotated[float | None, typer.Option(
        "--max-duration", help="Leave after this many seconds in any case.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No status line.")] = False,
) -> None:
    """Join a Janus VideoRoom as a visible participant and analyse the class until it ends (Ctrl-C leaves)."""
    from bot.meeting import MeetingTarget
    from classlens.cli_common import user_errors
    from kernel.consent import ConsentPolicy
    from kernel.errors import BadInputError
    from kernel.settings import load_settings
    from kernel.store import MeetingState

    with user_errors():
        if opt_in and opt_out:
            raise BadInputError("--opt-in and --opt-out cannot be combined: a session has one consent list")
        if not janus.startswith(("http://", "https://")):
            raise BadInputError(f"--janus must be the http(s) URL of the Janus API, got {janus!r}")
        settings = load_settings(sample_fps=fps, database_url=db, bot_idle_timeout_seconds=idle_timeout,
                                 bot_max_duration_seconds=max_duration, analysis_owner_email=owner)
        consent = (ConsentPolicy.opt_in(opt_in) if opt_in else ConsentPolicy.opt_out(opt_out) if opt_out
                   else ConsentPolicy.everyone())
        target = MeetingTarget(janus_url=janus, room=room, pin=pin,
                               display_name=display_name or settings.bot_display_name)
        outcome = asyncio.run(_run_bot(settings, target, consent, title, course, host_email, quiet))
        if outcome.state is MeetingState.failed:
            raise BadInputError(f"the bot could not stay in the meeting: {outcome.detail}")
        live = outcome.live
        _console.print(f"session {outcome.analysis_id} ended: {outcome.detail}; "
                       f"{live.students if live else 0} students, {live.frames_sampled if live else 0} frames",
                       highlight=False, soft_wrap=True)
        if outcome.report_dir:
            _out.print(f"{outcome.report_dir}/index.html", highlight=False, soft_wrap=True)


@bot_app.command("serve")
def serve_bots(
    host: HostOption = None,
    port: PortOption = None,
    db: DatabaseOption = None,
    proxy_headers: ProxyHeadersOption = False,
) -> None:
    """Run the meeting bots in a process of their own: the invite API and the WHIP endpoint, no archive.

    A deployment routes /api/meetings and /api/whip to this process and runs the archive with
    'classlens serve --no-meetings' (docs/deploy.md).
    """
    run_server(host=host, port=port, db=db, proxy_headers=proxy_headers, archive=False, meetings=True)
