"""Command line of the web app: ``classlens serve`` and ``classlens users`` (add, list, token, password, disable, …).

The web stack (FastAPI, uvicorn, argon2) is imported inside the commands, so that
``classlens --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sqlmodel import Session

    from kernel.store import User


class RoleChoice(enum.StrEnum):
    """The roles ``users add`` offers; mirrors :class:`kernel.store.UserRole` without importing the store."""

    teacher = "teacher"
    admin = "admin"


users_app = typer.Typer(help="Manage the archive's users and their API tokens.", no_args_is_help=True)

_console = Console(stderr=True)
_out = Console()


#: The server options ``classlens serve`` and ``classlens bot serve`` share.
HostOption = Annotated[str | None, typer.Option(
    "--host", help="Interface to listen on (default: 127.0.0.1, the serve_host setting).")]
PortOption = Annotated[int | None, typer.Option("--port", help="TCP port (default: 8000, the serve_port setting).")]
DatabaseOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store.")]
ProxyHeadersOption = Annotated[bool, typer.Option(
    "--proxy-headers", help="Trust X-Forwarded-For/-Proto from a reverse proxy on this machine.")]


def serve(
    host: HostOption = None,
    port: PortOption = None,
    db: DatabaseOption = None,
    proxy_headers: ProxyHeadersOption = False,
    meetings: Annotated[bool, typer.Option(
        "--meetings/--no-meetings",
        help="Also serve the invite API and WHIP endpoint and run the bots here (off when `classlens bot serve` "
             "runs them in a process of its own).")] = True,
) -> None:
    """Serve the report archive, the bot's invite API and its WHIP endpoint."""
    run_server(host=host, port=port, db=db, proxy_headers=proxy_headers, archive=True, meetings=meetings)


def run_server(*, host: str | None, port: int | None, db: str | None, proxy_headers: bool,
               archive: bool, meetings: bool) -> None:
    """Build the app with the chosen parts and run it under uvicorn until interrupted."""
    from classlens.cli_common import user_errors
    from kernel.settings import load_settings

    with user_errors():
        import uvicorn

        from classlens.server import create_app
        from classlens.webauth import cookie_secure

        settings = load_settings(serve_host=host, serve_port=port, database_url=db)
        app = create_app(settings, archive=archive, meetings=meetings)
        _warn_without_users(app.state.engine)
        if archive and cookie_secure(settings) and not (settings.public_url or "").startswith("https://"):
            # Browsers drop Secure cookies over plain http, and sign-in then fails without saying why.
            _console.print("[yellow]note:[/] the session cookie is Secure: serve this behind HTTPS and set "
                           "CLASSLENS_PUBLIC_URL=https://…, or sign-in will not stick (docs/archive.md)",
                           highlight=False)
        what = "ClassLens archive" if archive else "ClassLens meeting bot (invite API and WHIP)"
        _console.print(f"{what} on http://{settings.serve_host}:{settings.serve_port}/", highlight=False)
        # server_header=False: no "server: uvicorn" banner telling an attacker what to aim at.
        uvicorn.run(app, host=settings.serve_host, port=settings.serve_port, proxy_headers=proxy_headers,
                    forwarded_allow_ips="127.0.0.1" if proxy_headers else None, log_level="info",
                    server_header=False)


def _warn_without_users(engine: object) -> None:
    from sqlalchemy import Engine
    from sqlmodel import select

    from kernel.store import User, session_scope

    assert isinstance(engine, Engine)
    with session_scope(engine) as session:
        if session.exec(select(User.id)).first() is None:
            _console.print("[yellow]no user yet:[/] add one with `classlens users add EMAIL --role admin`")


def _read_password(password_stdin: bool) -> str:
    """The new password: from standard input with ``--password-stdin``, else typed twice at a terminal."""
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    from kernel.accounts import PASSWORD_RULE
    from kernel.errors import BadInputError

    if not sys.stdin.isatty():
        raise BadInputError("standard input is not a terminal, so the password cannot be typed: pipe it in with "
                            f"--password-stdin (rule: {PASSWORD_RULE})")

    _console.print(f"Password: {PASSWORD_RULE}.", highlight=False)
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@users_app.command("add")
def users_add(
    email: Annotated[str, typer.Argument(help="The user's email; it is the login name.")],
    role: Annotated[RoleChoice, typer.Option("--role", help="teacher: own sessions; admin: everyone's.")] = (
        RoleChoice.teacher),
    name: Annotated[str, typer.Option("--name", help="Display name shown in the archive.")] = "",
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of standard input instead of a prompt.")
    ] = False,
    db: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store.")] = None,
) -> None:
    """Add a teacher or admin who can sign in to the archive."""
    from classlens.cli_common import user_errors
    from kernel.settings import load_settings

    with user_errors():
        from kernel.accounts import create_user
        from kernel.store import UserRole, init_store, session_scope

        engine = init_store(load_settings(database_url=db).resolved_database_url)
        password = _read_password(password_stdin)
        with session_scope(engine) as session:
            user = create_user(session, email, password, role=UserRole(role.value), display_name=name)
        _out.print(f"added {user.role} {user.email}", highlight=False)


@users_app.command("list")
def users_list(db: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store.")] = None) -> None:
    """Show every user: email, name, role, state, API token (scope and expiry), last sign-in."""
    from classlens.cli_common import user_errors
    from kernel.settings import load_settings

    with user_errors():
        from kernel.accounts import list_users, token_summary
        from kernel.store import init_store, session_scope

        engine = init_store(load_settings(database_url=db).resolved_database_url)
        with session_scope(engine) as session:
            users = list_users(session)
        table = Table()
        for column in ("email", "name", "role", "state", "API token", "last sign-in"):
            table.add_column(column)
        for user in users:
            last = user.last_login_at.strftime("%Y-%m-%d %H:%M") if user.last_login_at else "never"
            table.add_row(user.email, user.display_name, str(user.role), "disabled" if user.disabled else "active",
                          token_summary(user), last)
        Console(width=max(_out.width, 100)).print(table)


class ScopeChoice(enum.StrEnum):
    """The token scopes ``users token`` offers; mirrors :class:`kernel.store.TokenScope`."""

    full = "full"
    whip = "whip"


DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the store.")]
EmailArgument = Annotated[str, typer.Argument(help="The user's email.")]

#: Who the audit log names for changes made with `classlens users` on the server.
CLI_ACTOR = "cli"


@contextlib.contextmanager
def _changing_user(email: str, db: str | None, action: str) -> Iterator[tuple[Session, User]]:
    """Open the store, find the user (one-line error if missing), and audit ``action`` on them by the CLI."""
    from kernel.accounts import AccountError, find_user
    from kernel.settings import load_settings
    from kernel.store import AuditEvent, init_store, session_scope

    engine = init_store(load_settings(database_url=db).resolved_database_url)
    with session_scope(engine) as session:
        user = find_user(session, email)
        if user is None:
            raise AccountError(f"no user with the email {email.strip().lower()}; add one with `classlens users add`")
        session.add(AuditEvent(actor_email=CLI_ACTOR, action=action, target_kind="user", target_id=str(user.id),
                               detail=user.email))
        yield session, user


@users_app.command("token")
def users_token(
    email: Annotated[str, typer.Argument(help="Whose token to create (replaces any earlier token).")],
    scope: Annotated[ScopeChoice, typer.Option(
        "--scope", help="full: the whole API; whip: only pushing video through WHIP.")] = ScopeChoice.full,
    expires_days: Annotated[float | None, typer.Option(
        "--expires-days", min=0.01, help="Days until the token stops working (default: never).")] = None,
    revoke: Annotated[bool, typer.Option("--revoke", help="Remove the user's token instead of creating one.")] = False,
    db: DbOption = None,
) -> None:
    """Create an API token for the invite API and WHIP (printed once, stored only as a hash), or revoke it."""
    from classlens.cli_common import user_errors

    with user_errors():
        from kernel.accounts import issue_api_token, revoke_api_token
        from kernel.store import TokenScope, utcnow

        with _changing_user(email, db, "token_revoked" if revoke else "token_issued") as (session, user):
            if revoke:
                had_token = revoke_api_token(session, user)
                _out.print(f"revoked the API token of {user.email}" if had_token
                           else f"{user.email} had no API token", highlight=False)
                return
            expires = utcnow() + datetime.timedelta(days=expires_days) if expires_days else None
            token = issue_api_token(session, user, scope=TokenScope(scope.value), expires_at=expires)
        until = f", until {expires:%Y-%m-%d %H:%M} UTC" if expires else ""
        _console.print(f"API token ({scope.value} scope{until}; shown once, store it now):", highlight=False)
        _out.print(token, highlight=False, soft_wrap=True)


@users_app.command("password")
def users_password(
    email: EmailArgument,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the new password from the first line of standard input.")] = False,
    db: DbOption = None,
) -> None:
    """Set a user's password; every browser session of theirs ends."""
    from classlens.cli_common import user_errors

    with user_errors():
        from kernel.accounts import set_password

        password = _read_password(password_stdin)
        with _changing_user(email, db, "password_changed") as (session, user):
            set_password(session, user, password)
        _out.print(f"changed the password of {user.email}; their sessions are signed out", highlight=False)


@users_app.command("disable")
def users_disable(email: EmailArgument, db: DbOption = None) -> None:
    """Stop a user: no sign-in, their API token refused, their browser sessions ended; their sessions stay."""
    _set_disabled(email, db, disabled=True)


@users_app.command("enable")
def users_enable(email: EmailArgument, db: DbOption = None) -> None:
    """Let a disabled user sign in again (their API token works again unless it expired)."""
    _set_disabled(email, db, disabled=False)


def _set_disabled(email: str, db: str | None, *, disabled: bool) -> None:
    from classlens.cli_common import user_errors

    with user_errors():
        from kernel.accounts import set_disabled

        with _changing_user(email, db, "user_disabled" if disabled else "user_enabled") as (session, user):
            set_disabled(session, user, disabled)
        _out.print(f"{'disabled' if disabled else 'enabled'} {user.email}", highlight=False)


@users_app.command("remove")
def users_remove(
    email: EmailArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    db: DbOption = None,
) -> None:
    """Delete a user; the sessions they owned stay in the archive (admins see them) without an owner."""
    from classlens.cli_common import user_errors

    with user_errors():
        from kernel.accounts import remove_user

        if not yes:
            typer.confirm(f"Remove {email.strip().lower()}? Their API token and sign-in stop at once", abort=True)
        with _changing_user(email, db, "user_removed") as (session, user):
            owned = remove_user(session, user)
        kept = f"; {owned} session(s) they owned stay, without an owner" if owned else ""
        _out.print(f"removed {user.email}{kept}", highlight=False)
