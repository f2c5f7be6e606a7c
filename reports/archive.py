"""The report archive: pages for signing in, listing sessions, reading reports, exporting and deleting.

Reports are rendered from the store on every request (:func:`reports.render.render_documents`)
and served under ``/sessions/{id}/`` with the same relative layout as a report folder,
so the links inside the pages work unchanged. A session that is not the user's (and
the user is no admin) answers 404 on every route, exactly like one that does not
exist, so ids cannot be probed. Every view, export and deletion is written to the
audit log in the same transaction as what it records.

Database work happens in plain ``def`` routes, which FastAPI runs in its thread pool,
so no query blocks the event loop that also carries the WHIP media endpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from classlens.webauth import (
    CSRF_FIELD,
    LoginLimiter,
    LoginRequiredError,
    PasswordCheckGate,
    PasswordChecksBusyError,
    admin_page_user,
    api_user,
    client_address,
    current_web_session,
    engine_of,
    page_user,
    require_csrf,
    safe_next_path,
    sign_in,
    sign_out,
)
from kernel.accounts import authenticate, find_user, list_users, token_summary
from kernel.audit import AuditFilter, count_events, event_actions, events_csv, query_events, record_event
from kernel.store import (
    Analysis,
    Student,
    User,
    UserRole,
    delete_analysis_data,
    is_row_id,
    session_scope,
)
from reports.aggregate import build_report_data
from reports.formatting import format_timestamp
from reports.render import MARKER_NAME, ReportOptions, render_documents

logger = logging.getLogger(__name__)

#: Most sessions one list page shows; filters narrow it down.
MAX_LISTED_SESSIONS = 200
#: Most audit events one page shows; the CSV export has them all.
MAX_LISTED_EVENTS = 300

PageUser = Annotated[User, Depends(page_user)]
AdminUser = Annotated[User, Depends(admin_page_user)]
ApiUser = Annotated[User, Depends(api_user)]
Csrf = Depends(require_csrf)

_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".csv": "text/csv; charset=utf-8",
                ".json": "application/json"}


def _format_utc(moment: datetime | None) -> str:
    if moment is None:
        return "–"
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _format_date(moment: datetime) -> str:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%a %d %b %Y, %H:%M")


@functools.cache
def archive_templates() -> Environment:
    """The Jinja2 environment of the archive pages; autoescape is on for everything but the stylesheet."""
    environment = Environment(
        loader=PackageLoader("reports", "templates/archive"),
        autoescape=select_autoescape(enabled_extensions=("html",), disabled_extensions=("css",), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update({"utc": _format_utc, "day": _format_date, "duration": format_timestamp})
    return environment


def _page(request: Request, template: str, user: User | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render an archive page with the user, the session's CSRF token and the navigation it needs."""
    body = archive_templates().get_template(template).render(
        user=user, csrf_field=CSRF_FIELD, csrf_token=current_web_session(request).csrf,
        path=request.url.path, **context,
    )
    return HTMLResponse(body, status_code=status_code)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    """An archive error page (404, 403, 429) that says what to do next."""
    return _page(request, "error.html", None, status_code=status_code, status_code_value=status_code,
                 message=message)


# ---------------------------------------------------------------------------
# Queries


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """The list page's filters, as the user typed them."""

    q: str = ""
    """Text searched in title, course and source."""
    course: str = ""
    """Exact course name."""
    teacher: str = ""
    """Owner's user id (admins only)."""
    date_from: str = ""
    """First day, ``YYYY-MM-DD``."""
    date_to: str = ""
    """Last day (inclusive), ``YYYY-MM-DD``."""

    @property
    def active(self) -> bool:
        """Whether any filter narrows the list."""
        return any((self.q, self.course, self.teacher, self.date_from, self.date_to))


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One line of the session list."""

    analysis: Analysis
    """The session."""
    students: int
    """How many students it has."""
    owner_email: str
    """The owner's email, or '' for command-line runs."""
    owner_name: str
    """The owner's display name, or ''."""

    @property
    def title(self) -> str:
        """The session's title, or its source when it has none."""
        return self.analysis.title or Path(self.analysis.source).name or f"Session {self.analysis.id}"


def _parse_day(text: str) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


def _start_of(day: date) -> datetime:
    # Days are UTC days, like every time the archive shows.
    return datetime.combine(day, time.min, tzinfo=UTC)


def visible_to(user: User) -> Any:
    """SQL condition: the sessions ``user`` may see (admins: all; teachers: their own)."""
    if user.role == UserRole.admin:
        return col(Analysis.id).is_not(None)
    return col(Analysis.owner_id) == user.id


def list_sessions(session: Session, user: User, where: SessionFilter) -> tuple[list[SessionRow], bool]:
    """The sessions ``user`` may see that match ``where``, newest first, and whether the list was cut."""
    students = (
        select(col(Student.analysis_id), func.count().label("students"))
        .group_by(col(Student.analysis_id))
        .subquery()
    )
    statement = (
        select(Analysis, func.coalesce(students.c.students, 0), User.email, User.display_name)
        .join(students, students.c.analysis_id == col(Analysis.id), isouter=True)
        .join(User, col(User.id) == col(Analysis.owner_id), isouter=True)
        .where(visible_to(user))
    )
    if where.q.strip():
        pattern = f"%{where.q.strip()}%"
        statement = statement.where(or_(col(Analysis.title).ilike(pattern), col(Analysis.course).ilike(pattern),
                                        col(Analysis.source).ilike(pattern)))
    if where.course:
        statement = statement.where(col(Analysis.course) == where.course)
    if where.teacher and user.role == UserRole.admin and where.teacher.isdigit():
        statement = statement.where(col(Analysis.owner_id) == int(where.teacher))
    first, last = _parse_day(where.date_from), _parse_day(where.date_to)
    if first is not None:
        statement = statement.where(col(Analysis.created_at) >= _start_of(first))
    if last is not None and last < date.max:  # up to the last day of the calendar means no upper bound
        statement = statement.where(col(Analysis.created_at) < _start_of(last + timedelta(days=1)))
    statement = statement.order_by(col(Analysis.created_at).desc(), col(Analysis.id).desc())
    rows = list(session.exec(statement.limit(MAX_LISTED_SESSIONS + 1)))
    listed = [SessionRow(analysis=a, students=int(n), owner_email=email or "", owner_name=name or "")
              for a, n, email, name in rows[:MAX_LISTED_SESSIONS]]
    return listed, len(rows) > MAX_LISTED_SESSIONS


def _filter_choices(session: Session, user: User) -> tuple[list[str], list[User]]:
    """Courses among the sessions the user may see, and (for admins) the teachers who own sessions."""
    courses = sorted(c for c in session.exec(select(Analysis.course).where(visible_to(user)).distinct()) if c)
    teachers: list[User] = []
    if user.role == UserRole.admin:
        owners = select(Analysis.owner_id).where(col(Analysis.owner_id).is_not(None)).distinct()
        teachers = list(session.exec(select(User).where(col(User.id).in_(owners)).order_by(col(User.email))))
    return courses, teachers


def visible_analysis(session: Session, user: User, analysis_id: int) -> Analysis:
    """The session with this id if ``user`` may see it; otherwise 404, whether it exists or not."""
    # An id beyond what the store's keys hold names no session (and would overflow the query).
    analysis = session.get(Analysis, analysis_id) if is_row_id(analysis_id) else None
    if analysis is not None and user.role != UserRole.admin and analysis.owner_id != user.id:
        # Someone else's session: the same 404 as a missing one, but an admin can see who tried.
        record_event(session, user, "refused", "session", analysis_id, "not the user's session")
        session.commit()
        analysis = None
    if analysis is None:
        raise HTTPException(status_code=404, detail="Not Found")
    return analysis


def _is_report_of(folder: Path, analysis_id: int) -> bool:
    """Whether ``folder`` is the rendered report of this analysis (its marker says so)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("analysis_id") == analysis_id


def delete_session(session: Session, actor: User, analysis: Analysis) -> Path | None:
    """Delete a session's rows and record who did it; returns the report folder to remove after the commit."""
    assert analysis.id is not None
    folder = Path(analysis.report_path) if analysis.report_path else None
    title = analysis.title or analysis.source
    delete_analysis_data(session, analysis.id, keep_analysis=False)
    record_event(session, actor, "deleted", "session", analysis.id, f"{title} ({analysis.course or 'no course'})")
    return folder if folder is not None and _is_report_of(folder, analysis.id) else None


def _login_refused(request: Request, status_code: int, wait: float, next_path: str, email: str,
                   message: str) -> Response:
    """The login form again with ``message`` (``{seconds}`` filled in) and a Retry-After header."""
    seconds = max(1, int(wait + 0.999))
    response = _page(request, "login.html", None, status_code=status_code, next_path=safe_next_path(next_path),
                     email=email, error=message.format(seconds=seconds))
    response.headers["Retry-After"] = str(seconds)
    return response


def _session_json(row: SessionRow) -> dict[str, Any]:
    a = row.analysis
    return {
        "id": a.id, "title": row.title, "kind": a.kind, "course": a.course, "status": str(a.status),
        "created_at": _format_utc(a.created_at), "duration_seconds": a.duration_seconds,
        "students": row.students, "owner": row.owner_email or None, "email_status": str(a.email_status),
        "report": f"/sessions/{a.id}/",
    }


# ---------------------------------------------------------------------------
# Routes


def archive_router(rate_limiter: LoginLimiter, password_gate: PasswordCheckGate) -> APIRouter:
    """The archive's pages and its small read-only API.

    Login attempts are counted by ``rate_limiter`` before any password is checked, and
    ``password_gate`` bounds how many checks run at once.
    """
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/sessions", status_code=303)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/sessions") -> Response:
        """The sign-in page; a signed-in user goes straight on."""
        if current_web_session(request).user_id is not None:
            try:
                page_user(request)
                return RedirectResponse(safe_next_path(next), status_code=303)
            except LoginRequiredError:
                pass  # a session that ended (password changed, user deleted) shows the form
        return _page(request, "login.html", None, next_path=safe_next_path(next), email="", error="")

    @router.post("/login", dependencies=[Csrf])
    def login(request: Request, email: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
              next: Annotated[str, Form()] = "/sessions") -> Response:
        """Check the password, limited per address and email; start the session."""
        address = client_address(request)
        reservation = rate_limiter.reserve(address, email)
        if not reservation.granted:
            return _login_refused(request, 429, reservation.retry_after, next, email,
                                  "Too many attempts. Wait {seconds} seconds, then try again.")
        try:
            with password_gate.slot(), session_scope(engine_of(request)) as session:
                user = authenticate(session, email, password)
                if user is None:
                    # Only an address that has an account is recorded: people type passwords into the email field.
                    known = find_user(session, email)
                    detail = f"email {known.email}" if known is not None else "an email with no account"
                    record_event(session, None, "login_failed", "user", (known.id or "") if known else "", detail)
                else:
                    record_event(session, user, "login", "user", user.id or "", "")
        except PasswordChecksBusyError:
            rate_limiter.give_back(reservation)  # nothing was checked: the attempt does not count
            return _login_refused(request, 503, 1.0, next, email,
                                  "The server is busy signing other people in. Try again in {seconds} seconds.")
        if user is None:
            return _page(request, "login.html", None, status_code=401, next_path=safe_next_path(next),
                         email=email, error="That email and password do not match an account.")
        rate_limiter.give_back(reservation)
        sign_in(request, user)
        return RedirectResponse(safe_next_path(next), status_code=303)

    @router.post("/logout", dependencies=[Csrf])
    def logout(request: Request) -> RedirectResponse:
        """End the session, and every other browser session of the user (copied cookies included)."""
        sign_out(request)
        return RedirectResponse("/login", status_code=303)

    @router.get("/sessions", response_class=HTMLResponse)
    def sessions_page(
        request: Request, user: PageUser, q: str = "", course: str = "", teacher: str = "",
        date_from: Annotated[str, Query(alias="from")] = "", date_to: Annotated[str, Query(alias="to")] = "",
        deleted: str = "",
    ) -> HTMLResponse:
        """The session list with its filters and search."""
        where = SessionFilter(q=q, course=course, teacher=teacher, date_from=date_from, date_to=date_to)
        bad_dates = [text for text in (date_from, date_to) if text and _parse_day(text) is None]
        with session_scope(engine_of(request)) as session:
            rows, cut = list_sessions(session, user, where)
            courses, teachers = _filter_choices(session, user)
        return _page(request, "sessions.html", user, rows=rows, cut=cut, where=where, courses=courses,
                     teachers=teachers, bad_dates=bad_dates, deleted=deleted if deleted.isdigit() else "",
                     max_listed=MAX_LISTED_SESSIONS)

    @router.get("/sessions/{analysis_id}", include_in_schema=False)
    def session_root(request: Request, analysis_id: int, user: PageUser) -> RedirectResponse:
        """The report's folder URL (with the slash the pages' relative links need)."""
        with session_scope(engine_of(request)) as session:
            visible_analysis(session, user, analysis_id)
        return RedirectResponse(f"/sessions/{analysis_id}/", status_code=307)

    @router.get("/sessions/{analysis_id}/delete", response_class=HTMLResponse)
    def delete_form(request: Request, analysis_id: int, user: PageUser) -> HTMLResponse:
        """Ask before deleting: what will be gone, and that it cannot be undone."""
        with session_scope(engine_of(request)) as session:
            analysis = visible_analysis(session, user, analysis_id)
            students = session.exec(select(func.count()).where(col(Student.analysis_id) == analysis_id)).one()
        return _page(request, "confirm_delete.html", user, analysis=analysis, students=students,
                     title=analysis.title or analysis.source)

    @router.post("/sessions/{analysis_id}/delete", dependencies=[Csrf])
    def delete(request: Request, analysis_id: int, user: PageUser) -> RedirectResponse:
        """Delete the session with all its data and its report folder."""
        with session_scope(engine_of(request)) as session:
            analysis = visible_analysis(session, user, analysis_id)
            folder = delete_session(session, user, analysis)
        if folder is not None:
            # After the commit: the rows are gone either way; a folder that resists is logged, not fatal.
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                logger.warning("could not remove the report folder %s of deleted session %d", folder, analysis_id)
        return RedirectResponse(f"/sessions?deleted={analysis_id}", status_code=303)

    @router.get("/sessions/{analysis_id}/{document:path}")
    def report_document(request: Request, analysis_id: int, document: str, user: PageUser) -> Response:
        """A file of the session's report (overview, student page, CSV or JSON), rendered from the store."""
        key = document or "index.html"
        with session_scope(engine_of(request)) as session:
            visible_analysis(session, user, analysis_id)
            data = build_report_data(session, analysis_id)
            documents = render_documents(data, ReportOptions.from_settings(request.app.state.settings))
            text = documents.get(key)
            if text is None or key == MARKER_NAME:
                raise HTTPException(status_code=404, detail="Not Found")
            exported = not key.endswith(".html")
            record_event(session, user, "exported" if exported else "viewed", "session", analysis_id, key)
        suffix = Path(key).suffix
        if exported:
            filename = f"classlens-session-{analysis_id}-{Path(key).name}"
            return Response(text, media_type=_MEDIA_TYPES.get(suffix, "text/plain; charset=utf-8"),
                            headers={"Content-Disposition": f'attachment; filename="{filename}"'})
        # The class-wide page may hide per-student rows (small classes); the host still reaches each report here.
        students = [(f"students/{t.student.file_name}", t.label) for t in data.timelines
                    if f"students/{t.student.file_name}" in documents]
        bar = archive_templates().get_template("report_bar.html").render(
            analysis_id=analysis_id, title=data.analysis.display_title, students=students, current=key,
            is_student=key.startswith("students/"))
        return HTMLResponse(_with_archive_bar(text, Markup(bar)))

    @router.get("/admin/audit", response_class=HTMLResponse)
    def audit_page(request: Request, user: AdminUser, action: str = "", actor: str = "",
                   session_id: Annotated[str, Query(alias="session")] = "") -> HTMLResponse:
        """The audit log, newest first, filtered by action, actor or session."""
        where = AuditFilter(action=action, actor=actor, target_id=session_id)
        with session_scope(engine_of(request)) as session:
            events = query_events(session, where, limit=MAX_LISTED_EVENTS)
            total = count_events(session, where)
            actions = event_actions(session)
        return _page(request, "audit.html", user, events=events, total=total, actions=actions, action=action,
                     actor=actor, session_id=session_id, max_listed=MAX_LISTED_EVENTS)

    @router.get("/admin/audit.csv")
    def audit_csv(request: Request, user: AdminUser, action: str = "", actor: str = "",
                  session_id: Annotated[str, Query(alias="session")] = "") -> Response:
        """Every matching audit event as CSV; the export itself is audited."""
        where = AuditFilter(action=action, actor=actor, target_id=session_id)
        with session_scope(engine_of(request)) as session:
            text = events_csv(query_events(session, where, limit=None))
            record_event(session, user, "exported", "audit", "", f"action={action} actor={actor} session={session_id}")
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="classlens-audit.csv"'})

    @router.get("/admin/users", response_class=HTMLResponse)
    def users_page(request: Request, user: AdminUser) -> HTMLResponse:
        """Who has an account, their state, API token and last sign-in (managed with `classlens users`)."""
        with session_scope(engine_of(request)) as session:
            users = list_users(session)
            counts = session.exec(select(col(Analysis.owner_id), func.count()).group_by(col(Analysis.owner_id)))
            owned = {owner_id: int(count) for owner_id, count in counts}
        tokens = {listed.id: token_summary(listed) for listed in users}
        return _page(request, "users.html", user, users=users, owned=owned, tokens=tokens)

    @router.get("/api/sessions")
    def api_sessions(request: Request, user: ApiUser) -> JSONResponse:
        """The sessions the token's user may see, newest first."""
        with session_scope(engine_of(request)) as session:
            rows, cut = list_sessions(session, user, SessionFilter())
        return JSONResponse({"sessions": [_session_json(row) for row in rows], "truncated": cut})

    @router.get("/api/sessions/{analysis_id}")
    def api_session(request: Request, analysis_id: int, user: ApiUser) -> JSONResponse:
        """One session's facts; 404 when it is not the user's."""
        with session_scope(engine_of(request)) as session:
            analysis = visible_analysis(session, user, analysis_id)
            students = session.exec(select(func.count()).where(col(Student.analysis_id) == analysis_id)).one()
            owner = session.get(User, analysis.owner_id) if analysis.owner_id is not None else None
        row = SessionRow(analysis=analysis, students=int(students), owner_email=owner.email if owner else "",
                         owner_name=owner.display_name if owner else "")
        return JSONResponse(_session_json(row))

    return router


def _with_archive_bar(page: str, bar: Markup) -> str:
    """Put the archive's navigation bar at the top of a report page.

    Report pages are self-contained files that also work offline from a folder, so
    they know nothing of the archive; the bar is added here instead of in them.
    """
    marker = "<body>"
    index = page.find(marker)
    if index < 0:
        return str(bar) + page
    cut = index + len(marker)
    return page[:cut] + "\n" + str(bar) + page[cut:]

