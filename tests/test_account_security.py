"""A hostile user against accounts and the API: sign-out and revocation end sessions, login
limits hold under concurrency, request bodies and fields are bounded, invites cannot mail
reports to strangers.

The app is the real ``classlens serve`` app on a SQLite store with three users and two
sessions (rows only: these tests are about who gets in, not about reports). The
concurrency tests send real concurrent requests to it on uvicorn; the shared limits run
against the machine's Redis.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select
from typer.testing import CliRunner

import kernel.accounts
from classlens.webauth import (
    SESSION_COOKIE,
    LoginRateLimiter,
    PasswordCheckGate,
    PasswordChecksBusyError,
    RedisLoginRateLimiter,
    SessionCookies,
    WebSession,
    load_secret_key,
    password_fingerprint,
)
from kernel.accounts import create_user, issue_api_token, revoke_api_token
from kernel.settings import Settings
from kernel.store import Analysis, AuditEvent, TokenScope, User, UserRole, init_store, session_scope, utcnow
from tests.processes import serve_in_thread

PASSWORD = "correct horse battery staple"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class AccountWorld:
    """A store with two teachers and an admin, one session each for the teachers."""

    settings: Settings
    engine: Engine
    ada_session: int
    ben_session: int
    ada: str = "ada@school.example"
    ben: str = "ben@school.example"
    admin: str = "root@school.example"

    def app(self, **overrides: Any) -> FastAPI:
        """The web app with these settings (and ``overrides``)."""
        from classlens.server import create_app

        return create_app(self.settings.model_copy(update=overrides))

    def user(self, email: str) -> User:
        """The stored user with this email."""
        with session_scope(self.engine) as session:
            return session.exec(select(User).where(User.email == email)).one()


@pytest.fixture
def world(tmp_path: Path) -> AccountWorld:
    settings = Settings(data_dir=tmp_path / "data", session_cookie_secure=False, execution_provider="cpu")
    engine = init_store(settings.resolved_database_url)
    with session_scope(engine) as session:
        ada = create_user(session, "ada@school.example", PASSWORD)
        ben = create_user(session, "ben@school.example", PASSWORD)
        create_user(session, "root@school.example", PASSWORD, role=UserRole.admin)
        sessions = [Analysis(source=f"{name}.mp4", title=name, owner_id=owner.id)
                    for name, owner in (("algebra", ada), ("biology", ben))]
        session.add_all(sessions)
        session.flush()
        ids = [int(analysis.id or 0) for analysis in sessions]
    return AccountWorld(settings=settings, engine=engine, ada_session=ids[0], ben_session=ids[1])


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def sign_in(client: TestClient | httpx.Client, email: str, password: str = PASSWORD) -> Any:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"email": email, "password": password, "csrf_token": token},
                       follow_redirects=False)


def signed_in(app: FastAPI, email: str) -> TestClient:
    client = TestClient(app)
    assert sign_in(client, email).status_code == 303
    return client


def is_signed_in(client: TestClient) -> bool:
    return client.get("/sessions", follow_redirects=False).status_code == 200


# -- finding 3: sign-out, password change and disable end sessions; an absolute lifetime


def test_a_cookie_copied_before_sign_out_no_longer_works(world: AccountWorld) -> None:
    app = world.app()
    laptop = signed_in(app, world.ada)
    copied = TestClient(app, cookies={SESSION_COOKIE: laptop.cookies[SESSION_COOKIE]})
    phone = signed_in(app, world.ada)
    assert is_signed_in(copied) and is_signed_in(phone)
    laptop.post("/logout", data={"csrf_token": csrf_of(laptop.get("/sessions").text)})
    assert not is_signed_in(laptop)
    assert not is_signed_in(copied)  # the stolen copy dies with the session it copied
    assert not is_signed_in(phone)  # signing out signs the user out everywhere
    other = signed_in(app, world.ben)
    assert is_signed_in(other)  # other users are untouched


def test_password_change_and_disable_end_sessions_and_block_sign_in(world: AccountWorld) -> None:
    from classlens.cli import app as cli

    app = world.app()
    url = world.settings.resolved_database_url
    runner = CliRunner()
    session = signed_in(app, world.ada)
    changed = runner.invoke(cli, ["users", "password", world.ada, "--password-stdin", "--db", url],
                            input="a brand new long passphrase\n")
    assert changed.exit_code == 0, changed.output
    assert not is_signed_in(session)
    assert sign_in(TestClient(app), world.ada).status_code == 401  # the old password is gone
    session = signed_in_with(app, world.ada, "a brand new long passphrase")

    with session_scope(world.engine) as store:
        token = issue_api_token(store, store.exec(select(User).where(User.email == world.ada)).one())
    api = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    assert api.get("/api/sessions").status_code == 200
    disabled = runner.invoke(cli, ["users", "disable", world.ada, "--db", url])
    assert disabled.exit_code == 0, disabled.output
    assert not is_signed_in(session)
    refused = sign_in(TestClient(app), world.ada, "a brand new long passphrase")
    assert refused.status_code == 401 and "do not match" in refused.text  # the same answer as a wrong password
    assert api.get("/api/sessions").status_code == 401
    listing = runner.invoke(cli, ["users", "list", "--db", url])
    assert re.search(r"ada@school\.example.*disabled", listing.output), listing.output

    assert runner.invoke(cli, ["users", "enable", world.ada, "--db", url]).exit_code == 0
    assert api.get("/api/sessions").status_code == 200
    assert is_signed_in(signed_in_with(app, world.ada, "a brand new long passphrase"))
    with session_scope(world.engine) as store:
        actions = [event.action for event in store.exec(select(AuditEvent).where(AuditEvent.actor_email == "cli"))]
    assert actions == ["password_changed", "user_disabled", "user_enabled"]


def signed_in_with(app: FastAPI, email: str, password: str) -> TestClient:
    client = TestClient(app)
    assert sign_in(client, email, password).status_code == 303
    return client


def test_a_session_ends_after_its_absolute_lifetime_however_active(world: AccountWorld) -> None:
    lifetime = 3600
    app = world.app(session_absolute_lifetime_seconds=lifetime)
    ada = world.user(world.ada)
    codec = SessionCookies(load_secret_key(world.settings), max_age_seconds=world.settings.session_max_age_seconds,
                           secure=False)

    def cookie_signed_in(seconds_ago: float) -> TestClient:
        value = codec.encode(WebSession(csrf="x" * 43, user_id=ada.id, fingerprint=password_fingerprint(ada),
                                        epoch=ada.session_epoch, signed_in_at=time.time() - seconds_ago))
        return TestClient(app, cookies={SESSION_COOKIE: value})

    assert is_signed_in(cookie_signed_in(lifetime - 60))
    stale = cookie_signed_in(lifetime + 1)
    assert not is_signed_in(stale)  # freshly re-signed by use, but signed in too long ago


# -- finding 4: the login limit holds under concurrency, and password checks are bounded


def test_concurrent_wrong_passwords_cannot_pass_the_limit(world: AccountWorld,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    verifying = 0
    most_at_once = 0
    verified = 0
    lock = threading.Lock()
    real_verify = kernel.accounts.verify_password

    def counted_verify(password_hash: str, password: str) -> bool:
        nonlocal verifying, most_at_once, verified
        with lock:
            verifying += 1
            verified += 1
            most_at_once = max(most_at_once, verifying)
        try:
            time.sleep(0.2)  # hold the slot long enough for the others to pile up behind it
            return real_verify(password_hash, password)
        finally:
            with lock:
                verifying -= 1

    monkeypatch.setattr(kernel.accounts, "verify_password", counted_verify)
    app = world.app(login_attempts_per_minute=5, password_checks_at_once=2)
    with serve_in_thread(app) as base_url:
        clients = [httpx.Client(base_url=base_url) for _ in range(8)]
        tokens = [csrf_of(client.get("/login").text) for client in clients]
        barrier = threading.Barrier(len(clients))

        def attempt(index: int) -> int:
            barrier.wait()
            response = clients[index].post("/login", data={"email": world.ada, "password": "wrong password!",
                                                           "csrf_token": tokens[index]})
            return response.status_code

        with ThreadPoolExecutor(len(clients)) as pool:
            statuses = sorted(pool.map(attempt, range(len(clients))))
        for client in clients:
            client.close()
    assert statuses == [401] * 5 + [429] * 3
    assert verified == 5
    assert most_at_once <= 2


def test_password_check_gate_refuses_when_every_slot_stays_taken() -> None:
    gate = PasswordCheckGate(1, wait_seconds=0.1)
    with gate.slot(), pytest.raises(PasswordChecksBusyError), gate.slot():
        pass
    with gate.slot():  # freed again
        pass


def test_memory_limiter_counts_before_checking_and_gives_back_successes() -> None:
    now = [1000.0]
    limiter = LoginRateLimiter(2, window_seconds=60, clock=lambda: now[0])
    first = limiter.reserve("10.0.0.1", "Ada@School.example")
    now[0] += 30
    assert first.granted and limiter.reserve("10.0.0.1", "ada@school.example").granted
    refused = limiter.reserve("10.0.0.1", "ada@school.example")
    assert not refused.granted and refused.retry_after == pytest.approx(30)
    assert limiter.reserve("10.0.0.2", "ada@school.example").granted  # another address
    now[0] += 30.5  # the first attempt left the window
    success = limiter.reserve("10.0.0.1", "ada@school.example")
    assert success.granted
    limiter.give_back(success)  # a successful login clears the per-email count
    assert limiter.reserve("10.0.0.1", "ada@school.example").granted
    for index in range(2 * LoginRateLimiter.PER_ADDRESS_FACTOR):  # spraying many emails from one address
        limiter.reserve("10.0.0.3", f"user{index}@school.example")
    assert not limiter.reserve("10.0.0.3", "fresh@school.example").granted


@pytest.mark.redis
def test_redis_limits_hold_across_server_processes() -> None:
    # Two limiters on one Redis stand for two `serve` processes behind one proxy.
    address = f"198.51.100.{secrets.randbelow(250)}-{secrets.token_hex(4)}"
    first, second = RedisLoginRateLimiter(REDIS_URL, 5), RedisLoginRateLimiter(REDIS_URL, 5)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: (first if i % 2 else second).reserve(address, "ada@school.example"),
                                range(16)))
    assert sum(result.granted for result in results) == 5
    refused = next(result for result in results if not result.granted)
    assert 0 < refused.retry_after <= 60
    other = f"{address}-other"
    success = first.reserve(other, "ben@school.example")
    second.give_back(success)
    assert all(first.reserve(other, "ben@school.example").granted for _ in range(5))


def test_an_unreachable_redis_still_limits_in_memory() -> None:
    limiter = RedisLoginRateLimiter("redis://127.0.0.1:1/0", 2)  # nothing listens on port 1
    results = [limiter.reserve("10.0.0.9", "ada@school.example").granted for _ in range(3)]
    assert results == [True, True, False]


# -- finding 8: tokens expire, have a scope, can be revoked; admins see every user's state


def test_token_expiry_scope_and_revocation(world: AccountWorld) -> None:
    from classlens.cli import app as cli

    app = world.app()
    url = world.settings.resolved_database_url
    runner = CliRunner()
    whip_only = runner.invoke(cli, ["users", "token", world.ada, "--scope", "whip", "--expires-days", "1",
                                    "--db", url])
    assert whip_only.exit_code == 0, whip_only.output
    issued = re.search(r"clk_[A-Za-z0-9_-]+", whip_only.output)
    assert issued and "whip scope, until" in whip_only.output
    whip = TestClient(app, headers={"Authorization": f"Bearer {issued.group(0)}"})
    assert whip.get("/api/sessions").status_code == 401  # not the archive API
    assert whip.post("/api/meetings", json={"janus_url": "https://meet.example/janus", "room": 1}).status_code == 401
    assert whip.get("/api/whip/sessions/1").status_code == 404  # WHIP: authenticated, the session is not live

    with session_scope(world.engine) as session:
        ada = session.exec(select(User).where(User.email == world.ada)).one()
        expired = issue_api_token(session, ada, expires_at=utcnow() - timedelta(seconds=1))
    assert TestClient(app, headers={"Authorization": f"Bearer {expired}"}).get("/api/sessions").status_code == 401
    with session_scope(world.engine) as session:
        ada = session.exec(select(User).where(User.email == world.ada)).one()
        full = issue_api_token(session, ada)
    api = TestClient(app, headers={"Authorization": f"Bearer {full}"})
    assert api.get("/api/sessions").status_code == 200
    revoked = runner.invoke(cli, ["users", "token", world.ada, "--revoke", "--db", url])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert api.get("/api/sessions").status_code == 401
    with session_scope(world.engine) as session:
        assert not revoke_api_token(session, world_user(session, world.ada))  # nothing left to revoke


def world_user(session: Any, email: str) -> User:
    return session.exec(select(User).where(User.email == email)).one()


def test_admin_users_page_shows_state_token_and_last_sign_in(world: AccountWorld) -> None:
    app = world.app()
    with session_scope(world.engine) as session:
        ben = world_user(session, world.ben)
        ben.disabled = True
        issue_api_token(session, world_user(session, world.ada), scope=TokenScope.whip)
    admin = signed_in(app, world.admin)
    page = admin.get("/admin/users").text
    rows = {email: page[page.index(f"<td>{email}</td>"):page.index("</tr>", page.index(f"<td>{email}</td>"))]
            for email in (world.ada, world.ben, world.admin)}
    assert "disabled" in rows[world.ben] and "disabled" not in rows[world.ada]
    assert ">whip<" in rows[world.ada] and ">none<" in rows[world.ben]
    assert "never" in rows[world.ada] and "UTC" in rows[world.admin]  # the admin just signed in


def test_removing_a_user_keeps_their_sessions_for_admins(world: AccountWorld) -> None:
    from classlens.cli import app as cli

    removed = CliRunner().invoke(cli, ["users", "remove", world.ben, "--yes", "--db",
                                       world.settings.resolved_database_url])
    assert removed.exit_code == 0 and "1 session(s)" in removed.output, removed.output
    with session_scope(world.engine) as session:
        assert session.exec(select(User).where(User.email == world.ben)).first() is None
        kept = session.get(Analysis, world.ben_session)
        assert kept is not None and kept.owner_id is None
    assert sign_in(TestClient(world.app()), world.ben).status_code == 401


# -- also: refused access is audited; no password typed as an email is stored


def test_refused_access_is_audited(world: AccountWorld) -> None:
    app = world.app()
    ben = signed_in(app, world.ben)
    assert ben.get(f"/sessions/{world.ada_session}/").status_code == 404
    assert ben.get("/admin/users").status_code == 404
    with session_scope(world.engine) as session:
        refused = session.exec(select(AuditEvent).where(AuditEvent.action == "refused")).all()
    assert {(event.actor_email, event.target_kind, event.target_id) for event in refused} == {
        (world.ben, "session", str(world.ada_session)), (world.ben, "page", "")}


def test_a_password_typed_into_the_email_field_is_never_stored(world: AccountWorld) -> None:
    secret = "my-Secret-passphrase-42"
    assert sign_in(TestClient(world.app()), secret, "anything at all").status_code == 401
    assert sign_in(TestClient(world.app()), world.ada, secret).status_code == 401
    with session_scope(world.engine) as session:
        stored = " ".join(f"{event.detail} {event.target_id} {event.actor_email}"
                          for event in session.exec(select(AuditEvent)))
    assert secret.lower() not in stored.lower()
    assert world.ada in stored  # a real account's failed login still names it



# -- finding 6: request bodies and string fields are bounded


@pytest.fixture
def ada_api(world: AccountWorld) -> TestClient:
    with session_scope(world.engine) as session:
        token = issue_api_token(session, world_user(session, world.ada))
    return TestClient(world.app(), headers={"Authorization": f"Bearer {token}"})


def test_oversized_bodies_are_refused_however_they_are_sent(world: AccountWorld, ada_api: TestClient) -> None:
    invite = {"janus_url": "https://meet.example/janus", "room": 1}
    declared = ada_api.post("/api/meetings", content=b"{" + b" " * (300 * 1024) + b"}",
                            headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.text == "Content Too Large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        yield b'{"janus_url": "https://meet.example/janus", "room": 1, "title": "'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}'

    streamed = ada_api.post("/api/meetings", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    huge_name = ada_api.post("/api/meetings", json={**invite, "consent_mode": "opt_out",
                                                    "consent_names": ["x" * (20 * 1024 * 1024)]})
    assert huge_name.status_code == 413
    long_name = ada_api.post("/api/meetings", json={**invite, "consent_mode": "opt_out",
                                                    "consent_names": ["x" * 201]})
    assert long_name.status_code == 422
    long_url = ada_api.post("/api/meetings", json={**invite, "janus_url": "https://meet.example/" + "a" * 3000})
    assert long_url.status_code == 422
    login = TestClient(world.app()).post("/login", content=b"email=" + b"a" * (300 * 1024),
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert login.status_code == 413
    with session_scope(world.engine) as session:
        assert session.exec(select(Analysis).where(Analysis.kind == "meeting")).first() is None


# -- also: host_email, HSTS


def test_an_invite_cannot_send_reports_to_a_stranger(world: AccountWorld, ada_api: TestClient) -> None:
    from bot.api import InviteRefusedError, allowed_host_email

    refused = ada_api.post("/api/meetings", json={"janus_url": "https://meet.example/janus", "room": 1,
                                                  "host_email": "collector@elsewhere.example"})
    assert refused.status_code == 422 and "invite_allowed_host_emails" in refused.json()["detail"]["message"]
    with session_scope(world.engine) as session:
        assert session.exec(select(Analysis).where(Analysis.kind == "meeting")).first() is None
    ada = world.user(world.ada)
    assert allowed_host_email(None, ada, []) == world.ada
    assert allowed_host_email(" ADA@school.example ", ada, []) == world.ada
    assert allowed_host_email("office@school.example", ada, ["@school.example"]) == "office@school.example"
    assert allowed_host_email("head@other.example", ada, ["Head@Other.example"]) == "head@other.example"
    with pytest.raises(InviteRefusedError):
        allowed_host_email("evil@notschool.example", ada, ["@school.example"])


def test_hsts_only_when_the_archive_is_served_over_https(world: AccountWorld) -> None:
    secure = TestClient(world.app(public_url="https://classlens.school.example")).get("/login")
    assert secure.headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in TestClient(world.app()).get("/login").headers
