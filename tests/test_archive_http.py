"""The archive web app over HTTP: sign-in, who may see what, CSRF, rate limits, exports, deletion, audit.

The sessions are real: the pipeline analyses ``single_face.mp4`` once per session on
a SQLite store; two teachers own them and an admin sees everything. Every route is
requested as a visitor, as the owner, as another teacher and as the admin.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import itsdangerous
import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, func
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from classlens.analysis import analyze_recording
from classlens.webauth import SECRET_KEY_FILE, SESSION_COOKIE, SessionCookies, load_secret_key
from kernel.accounts import (
    AccountError,
    authenticate,
    create_user,
    hash_password,
    issue_api_token,
    user_for_token,
)
from kernel.audit import AuditFilter, events_csv, query_events, record_event
from kernel.errors import BadInputError
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AuditEvent,
    FaceObservation,
    Student,
    User,
    UserRole,
    delete_analysis_data,
    init_store,
    session_scope,
)
from tests.conftest import LOCAL_MODELS_DIR, MEDIA_DIR

PASSWORD = "correct horse battery staple"
XSS_TITLE = "<script>alert('x')</script> Chemistry"


@dataclass
class ArchiveWorld:
    """Real sessions in a SQLite store, their owners and the settings of the app that serves them."""

    root: Path
    settings: Settings
    engine: Engine
    teacher_a: str = "ada@school.example"
    teacher_b: str = "ben@school.example"
    admin: str = "root@school.example"
    sessions: dict[str, int] = field(default_factory=dict)
    student_pages: dict[str, str] = field(default_factory=dict)

    def app(self, **overrides: Any) -> FastAPI:
        from classlens.server import create_app

        return create_app(self.settings.model_copy(update=overrides))


def build_archive_world(root: Path, components: Any, model_cache_dir: Path) -> ArchiveWorld:
    """Analyse the test clip for each session, then give the sessions owners, courses and dates."""
    settings = Settings(
        data_dir=root / "data", model_cache_dir=model_cache_dir,
        local_models_dir=LOCAL_MODELS_DIR if LOCAL_MODELS_DIR.is_dir() else None,
        execution_provider="cpu", sample_fps=4.0, session_cookie_secure=False,
    )
    plan = {  # name -> (title, course, owner, days ago)
        "algebra": ("Algebra, week 3", "Maths 7B", "ada@school.example", 1),
        "geometry": ("Geometry, week 4", "Maths 7B", "ada@school.example", 0),
        "doomed": ("Statistics, week 1", "Maths 8A", "ada@school.example", 3),
        "biology": ("Cells and tissues", "Biology 9", "ben@school.example", 2),
        "xss": (XSS_TITLE, "Chemistry 9", "ben@school.example", 5),
    }
    world = ArchiveWorld(root=root, settings=settings, engine=init_store(settings.resolved_database_url))
    with session_scope(world.engine) as session:
        owners = {
            world.teacher_a: create_user(session, world.teacher_a, PASSWORD, display_name="Ada Lovelace"),
            world.teacher_b: create_user(session, world.teacher_b, PASSWORD, display_name="Ben Franklin"),
            world.admin: create_user(session, world.admin, PASSWORD, role=UserRole.admin, display_name="Admin"),
        }
        owner_ids = {email: user.id for email, user in owners.items()}
    for name, (title, _course, _owner, _days) in plan.items():
        outcome = analyze_recording(MEDIA_DIR / "single_face.mp4", settings, out_dir=root / "reports" / name,
                                    components=components, title=title)
        world.sessions[name] = outcome.analysis_id
    # A command-line run that failed: no owner, so only admins see it.
    with pytest.raises(BadInputError):
        analyze_recording(root / "missing.mp4", settings, components=components, title="Lost recording")
    now = datetime.now(UTC)
    with session_scope(world.engine) as session:
        for name, (_title, course, owner, days) in plan.items():
            analysis = session.get(Analysis, world.sessions[name])
            assert analysis is not None
            analysis.course = course
            analysis.owner_id = owner_ids[owner]
            analysis.created_at = now - timedelta(days=days)
            session.add(analysis)
        orphan = session.exec(select(Analysis).where(Analysis.title == "Lost recording")).one()
        world.sessions["orphan"] = int(orphan.id or 0)
    from reports.aggregate import build_report_data
    from reports.render import render_documents

    for name in ("algebra", "biology"):
        with session_scope(world.engine) as session:
            documents = render_documents(build_report_data(session, world.sessions[name]))
        pages = sorted(key for key in documents if key.startswith("students/"))
        assert pages, f"the test clip must give session {name} at least one student"
        world.student_pages[name] = pages[0]
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, components: Any, default_models: Path) -> ArchiveWorld:
    return build_archive_world(tmp_path_factory.mktemp("archive"), components, default_models)


@pytest.fixture(scope="module")
def app(world: ArchiveWorld) -> FastAPI:
    return world.app()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def sign_in(app: FastAPI, email: str, password: str = PASSWORD) -> TestClient:
    client = TestClient(app)
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"email": email, "password": password, "csrf_token": token},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    return client


@pytest.fixture
def clients(app: FastAPI, world: ArchiveWorld) -> Iterator[dict[str, TestClient]]:
    # Per test: signing out (in some tests) ends every session of that user, these included.
    signed = {
        "anonymous": TestClient(app),
        "owner": sign_in(app, world.teacher_a),
        "other": sign_in(app, world.teacher_b),
        "admin": sign_in(app, world.admin),
    }
    yield signed
    for client in signed.values():
        client.close()


def _session_routes(world: ArchiveWorld) -> list[str]:
    a = world.sessions["algebra"]
    return [f"/sessions/{a}/", f"/sessions/{a}/index.html", f"/sessions/{a}/{world.student_pages['algebra']}",
            f"/sessions/{a}/timelines.csv", f"/sessions/{a}/timelines.json", f"/sessions/{a}/delete"]


@pytest.mark.media
@pytest.mark.parametrize("role", ["anonymous", "owner", "other", "admin"])
def test_every_session_route_answers_by_role(world: ArchiveWorld, clients: dict[str, TestClient], role: str) -> None:
    client = clients[role]
    for route in _session_routes(world):
        response = client.get(route, follow_redirects=False)
        expected = {"anonymous": 303, "owner": 200, "other": 404, "admin": 200}[role]
        assert response.status_code == expected, (route, response.status_code)
        if role == "anonymous":
            assert response.headers["location"].startswith("/login?next=/sessions/")
        if role == "other":
            # Indistinguishable from a session that does not exist: no title, no data.
            assert "Algebra" not in response.text
            missing = client.get(route.replace(f"/{world.sessions['algebra']}/", "/999999/"), follow_redirects=False)
            assert missing.status_code == 404
    bare = client.get(f"/sessions/{world.sessions['algebra']}", follow_redirects=False)
    assert bare.status_code == {"anonymous": 303, "owner": 307, "other": 404, "admin": 307}[role]


@pytest.mark.media
@pytest.mark.parametrize("role", ["anonymous", "owner", "other", "admin"])
def test_list_admin_and_api_routes_answer_by_role(
    world: ArchiveWorld, clients: dict[str, TestClient], role: str
) -> None:
    client = clients[role]
    page_expectations = {
        "/sessions": {"anonymous": 303, "owner": 200, "other": 200, "admin": 200},
        "/admin/audit": {"anonymous": 303, "owner": 404, "other": 404, "admin": 200},
        "/admin/audit.csv": {"anonymous": 303, "owner": 404, "other": 404, "admin": 200},
        "/admin/users": {"anonymous": 303, "owner": 404, "other": 404, "admin": 200},
    }
    for route, expected in page_expectations.items():
        assert client.get(route, follow_redirects=False).status_code == expected[role], route
    # The API never takes the cookie: everyone without a token gets 401 JSON.
    api_routes = [("GET", "/api/sessions"), ("GET", f"/api/sessions/{world.sessions['algebra']}"),
                  ("POST", "/api/meetings"), ("GET", "/api/meetings/1"), ("DELETE", "/api/meetings/1"),
                  ("POST", "/api/whip"), ("GET", f"/api/whip/sessions/{world.sessions['algebra']}")]
    for method, route in api_routes:
        response = client.request(method, route)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in response.json()["detail"]
        assert "set-cookie" not in response.headers  # API clients never get a session cookie


@pytest.mark.media
def test_teachers_list_only_their_own_sessions_and_admins_everyone(
    world: ArchiveWorld, clients: dict[str, TestClient]
) -> None:
    owner = clients["owner"].get("/sessions").text
    other = clients["other"].get("/sessions").text
    admin = clients["admin"].get("/sessions").text
    assert "Algebra, week 3" in owner and "Cells and tissues" not in owner and "Lost recording" not in owner
    assert "Cells and tissues" in other and "Algebra, week 3" not in other
    for title in ("Algebra, week 3", "Cells and tissues", "Lost recording", "Ada Lovelace", "Ben Franklin"):
        assert title in admin
    assert "failed" in admin and "command line" in admin
    # A failed command-line run has no owner: admins can open its (failure) report, teachers cannot.
    orphan = f"/sessions/{world.sessions['orphan']}/"
    failure = clients["admin"].get(orphan)
    assert failure.status_code == 200 and "missing.mp4" in failure.text
    assert clients["owner"].get(orphan).status_code == 404


@pytest.mark.media
def test_titles_are_escaped(clients: dict[str, TestClient]) -> None:
    page = clients["other"].get("/sessions").text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Chemistry" in page


@pytest.mark.media
def test_filters_and_search_narrow_the_list(world: ArchiveWorld, clients: dict[str, TestClient]) -> None:
    owner = clients["owner"]
    by_course = owner.get("/sessions", params={"course": "Maths 8A"}).text
    assert "Statistics, week 1" in by_course and "Algebra, week 3" not in by_course
    search = owner.get("/sessions", params={"q": "geometry"}).text
    assert "Geometry, week 4" in search and "Algebra, week 3" not in search
    today = datetime.now(UTC).date()
    recent = owner.get("/sessions", params={"from": (today - timedelta(days=1)).isoformat(),
                                             "to": today.isoformat()}).text
    assert "Geometry, week 4" in recent and "Algebra, week 3" in recent and "Statistics, week 1" not in recent
    future = owner.get("/sessions", params={"from": (today + timedelta(days=3)).isoformat()}).text
    assert "No session matches these filters" in future
    bad = owner.get("/sessions", params={"from": "yesterday"}).text
    assert "is not a date" in bad and "Algebra, week 3" in bad
    # Teachers cannot widen their view with the admin's teacher filter.
    with session_scope(world.engine) as session:
        ben = session.exec(select(User).where(User.email == world.teacher_b)).one()
    assert "Cells and tissues" not in owner.get("/sessions", params={"teacher": str(ben.id)}).text
    admin = clients["admin"].get("/sessions", params={"teacher": str(ben.id)}).text
    assert "Cells and tissues" in admin and "Algebra, week 3" not in admin


@pytest.mark.media
def test_report_pages_are_the_rendered_reports_with_archive_navigation(
    world: ArchiveWorld, clients: dict[str, TestClient]
) -> None:
    a = world.sessions["algebra"]
    overview = clients["owner"].get(f"/sessions/{a}/").text
    assert "Algebra, week 3" in overview and "← All sessions" in overview
    # Every student's report is one click away, even where the overview hides per-student rows.
    assert f'href="/sessions/{a}/{world.student_pages["algebra"]}"' in overview
    student = clients["owner"].get(f"/sessions/{a}/{world.student_pages['algebra']}")
    assert student.status_code == 200 and "Class overview" in student.text
    assert clients["owner"].get(f"/sessions/{a}/.classlens-report.json").status_code == 404
    assert clients["owner"].get(f"/sessions/{a}/students/nobody.html").status_code == 404


@pytest.mark.media
def test_exports_download_the_timelines(world: ArchiveWorld, clients: dict[str, TestClient]) -> None:
    a = world.sessions["algebra"]
    response = clients["owner"].get(f"/sessions/{a}/timelines.csv")
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    with session_scope(world.engine) as session:
        observations = session.exec(select(func.count()).where(FaceObservation.analysis_id == a)).one()
    assert observations > 0
    assert {row["analysis_id"] for row in rows} == {str(a)}
    assert sum(1 for row in rows if row["visible"] in ("1", "true", "True")) == observations
    exported = clients["admin"].get(f"/sessions/{a}/timelines.json")
    assert exported.headers["content-type"] == "application/json"
    assert "Student" in json.dumps(exported.json())


@pytest.mark.media
def test_views_and_exports_are_audited_and_admins_can_export_the_log(
    world: ArchiveWorld, clients: dict[str, TestClient]
) -> None:
    a = world.sessions["algebra"]
    clients["owner"].get(f"/sessions/{a}/")
    clients["owner"].get(f"/sessions/{a}/timelines.csv")
    with session_scope(world.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.target_id == str(a))).all()
    actions = {(e.actor_email, e.action, e.detail) for e in events}
    assert (world.teacher_a, "viewed", "index.html") in actions
    assert (world.teacher_a, "exported", "timelines.csv") in actions
    page = clients["admin"].get("/admin/audit", params={"session": str(a)}).text
    assert world.teacher_a in page and "exported" in page
    exported = clients["admin"].get("/admin/audit.csv", params={"action": "exported"})
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert rows and all(row["action"] == "exported" for row in rows)
    assert any(row["actor_email"] == world.teacher_a and row["target_id"] == str(a) for row in rows)


@pytest.mark.media
def test_csrf_is_required_on_every_form(world: ArchiveWorld, app: FastAPI, clients: dict[str, TestClient]) -> None:
    doomed = world.sessions["doomed"]
    owner = clients["owner"]
    assert owner.post(f"/sessions/{doomed}/delete", follow_redirects=False).status_code == 403
    forged = owner.post(f"/sessions/{doomed}/delete", data={"csrf_token": "forged"}, follow_redirects=False)
    assert forged.status_code == 403
    # A token from somebody else's session is no good either.
    foreign = csrf_of(clients["other"].get("/sessions").text)
    assert owner.post(f"/sessions/{doomed}/delete", data={"csrf_token": foreign}).status_code == 403
    with session_scope(world.engine) as session:
        assert session.get(Analysis, doomed) is not None
    visitor = TestClient(app)
    no_token = visitor.post("/login", data={"email": world.teacher_a, "password": PASSWORD}, follow_redirects=False)
    assert no_token.status_code == 403
    assert visitor.get("/sessions", follow_redirects=False).status_code == 303  # not signed in
    assert owner.post("/logout", follow_redirects=False).status_code == 403
    assert owner.get("/sessions").status_code == 200  # still signed in


@pytest.mark.media
def test_another_teacher_cannot_delete_and_the_owner_can(world: ArchiveWorld, app: FastAPI) -> None:
    doomed = world.sessions["doomed"]
    visitor = TestClient(app)
    visitor_token = csrf_of(visitor.get("/login").text)
    anonymous = visitor.post(f"/sessions/{doomed}/delete", data={"csrf_token": visitor_token}, follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    other = sign_in(app, world.teacher_b)
    token = csrf_of(other.get("/sessions").text)
    assert other.post(f"/sessions/{doomed}/delete", data={"csrf_token": token}).status_code == 404
    with session_scope(world.engine) as session:
        analysis = session.get(Analysis, doomed)
        assert analysis is not None and analysis.report_path
        report = Path(analysis.report_path)
    assert (report / "index.html").exists()

    owner = sign_in(app, world.teacher_a)
    confirm = owner.get(f"/sessions/{doomed}/delete")
    assert "cannot be undone" in confirm.text and "Statistics, week 1" in confirm.text
    done = owner.post(f"/sessions/{doomed}/delete", data={"csrf_token": csrf_of(confirm.text)},
                      follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/sessions?deleted={doomed}"
    assert "and all its data were deleted" in owner.get(done.headers["location"]).text
    with session_scope(world.engine) as session:
        assert session.get(Analysis, doomed) is None
        assert session.exec(select(func.count()).where(Student.analysis_id == doomed)).one() == 0
        assert session.exec(select(func.count()).where(FaceObservation.analysis_id == doomed)).one() == 0
        event = session.exec(select(AuditEvent).where(AuditEvent.action == "deleted",
                                                      AuditEvent.target_id == str(doomed))).one()
    assert event.actor_email == world.teacher_a and "Statistics" in event.detail
    assert not report.exists()
    assert owner.get(f"/sessions/{doomed}/").status_code == 404
    # The other sessions are untouched.
    assert owner.get(f"/sessions/{world.sessions['algebra']}/").status_code == 200


@pytest.mark.media
def test_wrong_password_and_rate_limit(world: ArchiveWorld) -> None:
    app = world.app(login_attempts_per_minute=3)
    client = TestClient(app)
    token = csrf_of(client.get("/login").text)

    def attempt(email: str, password: str) -> Any:
        return client.post("/login", data={"email": email, "password": password, "csrf_token": token},
                           follow_redirects=False)

    for _ in range(3):
        failed = attempt(world.teacher_a, "wrong password!")
        assert failed.status_code == 401 and "do not match" in failed.text
    limited = attempt(world.teacher_a, PASSWORD)  # even the right password waits
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Another account from the same address is not locked out by these failures.
    assert attempt(world.teacher_b, PASSWORD).status_code == 303
    with session_scope(world.engine) as session:
        failures = session.exec(select(AuditEvent).where(AuditEvent.action == "login_failed")).all()
    assert any(world.teacher_a in e.detail for e in failures)


@pytest.mark.media
def test_session_cookie_flags_tampering_and_expiry(world: ArchiveWorld, app: FastAPI,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client = TestClient(app)
    cookie = client.get("/login").headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    secure = TestClient(world.app(session_cookie_secure=True)).get("/login").headers["set-cookie"].lower()
    assert "; secure" in secure

    signed = sign_in(app, world.teacher_a)
    value = signed.cookies[SESSION_COOKIE]
    tampered = TestClient(app, cookies={SESSION_COOKIE: value[:-3] + ("AAA" if value[-3:] != "AAA" else "BBB")})
    assert tampered.get("/sessions", follow_redirects=False).status_code == 303

    codec = SessionCookies(load_secret_key(world.settings), max_age_seconds=world.settings.session_max_age_seconds,
                           secure=False)
    session_value = codec.decode(value)
    assert session_value is not None
    real = itsdangerous.TimestampSigner.get_timestamp
    monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp",
                        lambda self: real(self) - world.settings.session_max_age_seconds - 5)
    stale = codec.encode(session_value[0])
    monkeypatch.undo()
    expired = TestClient(app, cookies={SESSION_COOKIE: stale})
    assert expired.get("/sessions", follow_redirects=False).status_code == 303


@pytest.mark.media
def test_changing_the_password_ends_other_sessions(world: ArchiveWorld, app: FastAPI) -> None:
    client = sign_in(app, world.teacher_b)
    assert client.get("/sessions").status_code == 200
    with session_scope(world.engine) as session:
        ben = session.exec(select(User).where(User.email == world.teacher_b)).one()
        ben.password_hash = hash_password(PASSWORD)  # same password, new salt: a new hash
        session.add(ben)
    assert client.get("/sessions", follow_redirects=False).status_code == 303


@pytest.mark.media
def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(world: ArchiveWorld, app: FastAPI) -> None:
    client = TestClient(app)
    deep = f"/sessions/{world.sessions['algebra']}/timelines.json"
    login = client.get(deep)  # followed to the login page, which remembers the target
    assert login.url.path == "/login" and f'value="{deep}"' in login.text
    back = client.post("/login", data={"email": world.teacher_a, "password": PASSWORD, "next": deep,
                                       "csrf_token": csrf_of(login.text)})
    assert back.url.path == deep and back.json()
    client.post("/logout", data={"csrf_token": csrf_of(client.get("/sessions").text)})
    token = csrf_of(client.get("/login").text)
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        response = client.post("/login", data={"email": world.admin, "password": PASSWORD, "csrf_token": token,
                                               "next": target}, follow_redirects=False)
        assert response.headers["location"] == "/sessions", target
        token = csrf_of(client.get("/sessions").text)
        client.post("/logout", data={"csrf_token": token})
        token = csrf_of(client.get("/login").text)


@pytest.mark.media
def test_api_tokens_see_only_their_own_sessions(world: ArchiveWorld, app: FastAPI) -> None:
    with session_scope(world.engine) as session:
        ada = session.exec(select(User).where(User.email == world.teacher_a)).one()
        token = issue_api_token(session, ada)
    with session_scope(world.engine) as session:
        stored = session.exec(select(User).where(User.email == world.teacher_a)).one()
        assert stored.api_token_hash and token not in stored.api_token_hash
        assert user_for_token(session, token) is not None
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    listed = client.get("/api/sessions").json()["sessions"]
    titles = {s["title"] for s in listed}
    assert "Algebra, week 3" in titles and "Cells and tissues" not in titles
    assert client.get(f"/api/sessions/{world.sessions['algebra']}").json()["students"] >= 1
    assert client.get(f"/api/sessions/{world.sessions['biology']}").status_code == 404
    # The invite API is mounted with the same authentication (an unknown meeting, not a missing token).
    assert client.get("/api/meetings/999999").status_code == 404
    wrong = TestClient(app, headers={"Authorization": "Bearer clk_not-a-real-token"})
    assert wrong.get("/api/sessions").status_code == 401


@pytest.mark.media
def test_security_headers(clients: dict[str, TestClient]) -> None:
    response = clients["owner"].get("/sessions")
    assert response.headers["x-frame-options"] == "DENY"
    assert "script-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.media
def test_out_of_range_ids_and_dates_are_not_server_errors(world: ArchiveWorld, app: FastAPI,
                                                          clients: dict[str, TestClient]) -> None:
    owner = clients["owner"]
    for huge in (2**31, 2**63, 2**64 + 5):
        for path in (f"/sessions/{huge}/", f"/sessions/{huge}/timelines.csv", f"/sessions/{huge}/delete"):
            assert owner.get(path).status_code == 404, path
    assert owner.get("/sessions?to=9999-12-31").status_code == 200
    assert owner.get("/sessions?from=0001-01-01&to=9999-12-31").status_code == 200
    with session_scope(world.engine) as session:
        ada = session.exec(select(User).where(User.email == world.teacher_a)).one()
        token = issue_api_token(session, ada)
    api = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    assert api.get(f"/api/sessions/{2**63}").status_code == 404
    assert api.get(f"/api/meetings/{2**63}").status_code == 404
    assert api.delete(f"/api/meetings/{2**31}").status_code == 404
    for url in ("ftp://meet.example.edu/janus", "http://127.0.0.1:6379/", "http://u:p@10.0.0.5/janus"):
        assert api.post("/api/meetings", json={"janus_url": url, "room": 1}).status_code == 422, url


@pytest.mark.media
def test_a_server_error_page_carries_the_security_headers(world: ArchiveWorld) -> None:
    app = world.app()

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    app.add_api_route("/api/broken", broken)
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/broken", "/api/broken"):
        response = client.get(path)
        assert response.status_code == 500
        assert "a bug" not in response.text
        assert "script-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.media
def test_secret_key_is_generated_once_and_private(world: ArchiveWorld) -> None:
    path = world.settings.data_dir / SECRET_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret_key(world.settings) == path.read_text().strip().encode()


@pytest.mark.media
def test_users_cli_adds_users_and_tokens(world: ArchiveWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    from classlens.cli import app as cli

    url = world.settings.resolved_database_url
    runner = CliRunner()
    added = runner.invoke(cli, ["users", "add", "Cleo@School.example", "--role", "admin", "--name", "Cleo",
                                "--password-stdin", "--db", url], input="a long enough password\n")
    assert added.exit_code == 0, added.output
    assert "admin cleo@school.example" in added.output
    again = runner.invoke(cli, ["users", "add", "cleo@school.example", "--password-stdin", "--db", url],
                          input="a long enough password\n")
    assert again.exit_code == 2 and "already exists" in again.output
    piped = runner.invoke(cli, ["users", "add", "dan@school.example", "--db", url], input="a long enough password\n")
    assert piped.exit_code == 2 and "--password-stdin" in piped.output  # not a silent exit 1 at the prompt
    short = runner.invoke(cli, ["users", "add", "dan@school.example", "--password-stdin", "--db", url],
                          input="short\n")
    assert short.exit_code == 2 and "at least" in short.output
    for weak, reason in (("          ", "blank"), ("aaaaaaaaaa", "repeated"), ("password12", "too common"),
                         ("Welcome2024!", "too common"), ("1234567890", "run of keys")):
        refused = runner.invoke(cli, ["users", "add", "dan@school.example", "--role", "admin", "--password-stdin",
                                      "--db", url], input=f"{weak}\n")
        assert refused.exit_code == 2 and reason in refused.output, (weak, refused.output)
    token = runner.invoke(cli, ["users", "token", "cleo@school.example", "--db", url])
    assert token.exit_code == 0
    issued = re.search(r"clk_[A-Za-z0-9_-]+", token.output)
    assert issued
    with session_scope(world.engine) as session:
        user = user_for_token(session, issued.group(0))
        assert user is not None and user.email == "cleo@school.example" and user.role == UserRole.admin
    listing = runner.invoke(cli, ["users", "list", "--db", url])
    assert "cleo@school.example" in listing.output and "ada@school.example" in listing.output



def test_outdated_password_hashes_are_upgraded_at_sign_in(tmp_path: Path) -> None:
    engine = init_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    with session_scope(engine) as session:
        user = create_user(session, "old@school.example", PASSWORD)
        user.password_hash = PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORD)
        old_hash = user.password_hash
    with session_scope(engine) as session:
        assert authenticate(session, "OLD@school.example", "not the password") is None
        assert authenticate(session, "nobody@school.example", PASSWORD) is None
        signed = authenticate(session, "OLD@school.example", PASSWORD)
        assert signed is not None and signed.last_login_at is not None
    with session_scope(engine) as session:
        stored = session.exec(select(User).where(User.email == "old@school.example")).one()
    assert stored.password_hash != old_hash and stored.password_hash.startswith("$argon2id$")
    assert PASSWORD not in stored.password_hash
    with Session(engine) as session, pytest.raises(AccountError):
        create_user(session, "not-an-email", PASSWORD)


def test_audit_csv_defuses_spreadsheet_formulas(tmp_path: Path) -> None:
    engine = init_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    with session_scope(engine) as session:
        record_event(session, None, "login_failed", "user", "", "email =HYPERLINK(\"http://evil\")\nsecond line")
    with session_scope(engine) as session:
        events = query_events(session, AuditFilter(action="login_failed"))
    rows = list(csv.DictReader(io.StringIO(events_csv(events))))
    assert rows[0]["actor_email"] == "anonymous" and "\n" not in rows[0]["detail"]
    record_injection = events_csv([AuditEvent(actor_email="=cmd", action="viewed", at=datetime.now(UTC))])
    assert "'=cmd" in record_injection


@pytest.mark.postgres
def test_archive_queries_work_on_postgresql(tmp_path: Path) -> None:
    """Listing, filters, the API and deletion on PostgreSQL (rows written by code; the pipeline is tested on SQLite)."""
    from classlens.server import create_app
    from tests.conftest import POSTGRES_URL

    suffix = secrets.token_hex(4)  # the test database is shared: this run's rows are its own
    settings = Settings(data_dir=tmp_path / "data", database_url=POSTGRES_URL, session_cookie_secure=False)
    app = create_app(settings)
    engine = app.state.engine
    email = f"pg-{suffix}@school.example"
    with session_scope(engine) as session:
        teacher = create_user(session, email, PASSWORD)
        kept = Analysis(source="kept.mp4", title=f"Kept {suffix}", course=f"PG {suffix}", owner_id=teacher.id,
                        created_at=datetime.now(UTC) - timedelta(days=2))
        gone = Analysis(source="gone.mp4", title=f"Gone {suffix}", course=f"PG {suffix}", owner_id=teacher.id)
        session.add_all([kept, gone])
        session.flush()
        session.add(Student(analysis_id=gone.id or 0, track_id=1, label="Student 1", first_seen=0, last_seen=1,
                            samples_visible=2))
        kept_id, gone_id = kept.id, gone.id
    try:
        client = sign_in(app, email)
        today = datetime.now(UTC).date().isoformat()
        page = client.get("/sessions", params={"q": suffix.upper(), "from": today}).text
        assert f"Gone {suffix}" in page and f"Kept {suffix}" not in page
        token = csrf_of(client.get(f"/sessions/{gone_id}/delete").text)
        assert client.post(f"/sessions/{gone_id}/delete", data={"csrf_token": token}).status_code == 200
        with session_scope(engine) as session:
            assert session.get(Analysis, gone_id) is None
            assert session.exec(select(func.count()).where(Student.analysis_id == gone_id)).one() == 0
            assert session.exec(select(AuditEvent).where(AuditEvent.action == "deleted",
                                                         AuditEvent.target_id == str(gone_id))).one()
    finally:
        with session_scope(engine) as session:
            delete_analysis_data(session, kept_id or 0, keep_analysis=False)
            session.execute(delete(AuditEvent).where(col(AuditEvent.actor_email) == email))
            session.execute(delete(User).where(col(User.email) == email))
        engine.dispose()


def test_serve_command_starts_the_app(tmp_path: Path) -> None:
    """`classlens serve` on a free port answers, sends visitors to the login page, and says when nobody can log in."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLASSLENS_")}
    env["CLASSLENS_DATA_DIR"] = str(tmp_path / "data")
    server = subprocess.Popen([sys.executable, "-m", "classlens", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "classlens serve did not come up"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        assert "server" not in health.headers  # no banner naming the web server
        # Students' display names in WHIP's query string stay out of the access log.
        whip = httpx.post(f"http://127.0.0.1:{port}/api/whip?participant=Zelda%20Quill&consent_name=Yorick%20Vane",
                          content="v=0", headers={"Content-Type": "application/sdp"}, timeout=5)
        assert whip.status_code == 401
        visitor = httpx.get(f"http://127.0.0.1:{port}/sessions", timeout=5)
        assert visitor.status_code == 303 and visitor.headers["location"].startswith("/login")
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=20)
    assert "no user yet" in output
    assert "/api/whip?participant=…&consent_name=…" in output, output
    assert "Zelda" not in output and "Yorick" not in output
    assert stat.S_IMODE((tmp_path / "data" / SECRET_KEY_FILE).stat().st_mode) == 0o600
