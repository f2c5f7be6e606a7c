"""Authentication for the web app: session cookies, CSRF tokens, login rate limits, API tokens.

The browser session is one signed cookie (itsdangerous, HMAC-SHA1 over a key from
:func:`load_secret_key`) holding the user id, the session's CSRF token and a
fingerprint of the user's password hash, so changing a password ends every other
session. The cookie is HttpOnly, SameSite=Lax and Secure unless the app is served over
plain http on this machine only (:func:`cookie_secure`). A session ends after
``session_max_age_seconds`` without a request; the cookie is re-signed every few
minutes while it is used.

Every visitor, signed in or not, gets a CSRF token in the cookie, so that the login
form is protected too. Every POST must echo it (form field ``csrf_token`` or header
``X-CSRF-Token``) or it is refused with 403.

The API (invite, WHIP) authenticates with ``Authorization: Bearer <token>`` instead:
no cookie, so no CSRF is involved.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request, Response
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import Engine

from kernel.accounts import user_for_token
from kernel.errors import ConfigurationError
from kernel.settings import Settings
from kernel.store import User, UserRole, session_scope

logger = logging.getLogger(__name__)

#: Name of the session cookie.
SESSION_COOKIE = "classlens_session"
#: Form field that carries the CSRF token.
CSRF_FIELD = "csrf_token"
#: Header that may carry the CSRF token instead (for scripts posting forms).
CSRF_HEADER = "x-csrf-token"
#: A used session's cookie is re-signed (extending its life) when it is older than this.
COOKIE_REFRESH_SECONDS = 300.0
#: Paths under this prefix are the token-authenticated API (invite, WHIP): no cookie, no CSRF.
API_PREFIX = "/api/"
#: Name of the generated key file inside ``data_dir``.
SECRET_KEY_FILE = "secret_key"


def load_secret_key(settings: Settings) -> bytes:
    """The cookie-signing key: ``secret_key`` if set, else one generated once into ``data_dir/secret_key`` (0600)."""
    if settings.secret_key is not None:
        value = settings.secret_key.get_secret_value()
        if len(value) < 32:
            raise ConfigurationError("secret_key: use at least 32 random characters (e.g. `openssl rand -hex 32`)")
        return value.encode("utf-8")
    path = settings.data_dir / SECRET_KEY_FILE
    if not path.exists():
        if settings.database_url and not settings.database_url.startswith("sqlite"):
            logger.warning("secret_key is unset: generated %s; servers sharing this database need the same key", path)
        _create_private_file(path, secrets.token_hex(32))
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 32:
        raise ConfigurationError(f"{path} holds no usable key; delete it to generate a new one")
    return key.encode("utf-8")


def _create_private_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two servers starting at once must not each write (and then use) a different key.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cookie_secure(settings: Settings) -> bool:
    """Whether the session cookie is marked Secure (sent over HTTPS only).

    ``session_cookie_secure`` decides when set. Otherwise the cookie is Secure unless
    nothing says HTTPS: ``public_url`` is unset or http://, and the server listens on
    a loopback address only, where plain http cannot be sniffed on the network.
    """
    if settings.session_cookie_secure is not None:
        return settings.session_cookie_secure
    if settings.public_url and urlsplit(settings.public_url).scheme == "https":
        return True
    return not _is_loopback(settings.serve_host)


def password_fingerprint(user: User) -> str:
    """A short digest of the user's password hash; a session whose fingerprint differs is over."""
    return hashlib.sha256(user.password_hash.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class WebSession:
    """What the session cookie holds."""

    csrf: str
    """The CSRF token every form of this session carries."""
    user_id: int | None = None
    """The signed-in user, or None for a visitor."""
    fingerprint: str = ""
    """:func:`password_fingerprint` of the user at login."""

    @classmethod
    def anonymous(cls) -> WebSession:
        """A fresh visitor session with a new CSRF token."""
        return cls(csrf=secrets.token_urlsafe(32))


class SessionCookies:
    """Reads the session cookie into ``request.state.web_session`` and writes it back when it changed.

    Used as an HTTP middleware: ``app.middleware("http")(SessionCookies(...))``.
    """

    def __init__(self, secret_key: bytes, *, max_age_seconds: int, secure: bool) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt="classlens-session")
        self.max_age_seconds = max_age_seconds
        self.secure = secure

    def encode(self, web_session: WebSession) -> str:
        """The signed cookie value for ``web_session``."""
        return self._serializer.dumps([web_session.csrf, web_session.user_id, web_session.fingerprint])

    def decode(self, value: str) -> tuple[WebSession, float] | None:
        """The session in a cookie value and its age in seconds, or None when forged, malformed or expired."""
        try:
            payload, signed_at = self._serializer.loads(value, max_age=self.max_age_seconds, return_timestamp=True)
        except (BadSignature, SignatureExpired):
            return None
        if not (isinstance(payload, list) and len(payload) == 3):
            return None
        csrf, user_id, fingerprint = payload
        if not isinstance(csrf, str) or not isinstance(fingerprint, str):
            return None
        if user_id is not None and not isinstance(user_id, int):
            return None
        age = time.time() - signed_at.timestamp()
        return WebSession(csrf=csrf, user_id=user_id, fingerprint=fingerprint), age

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Attach the session to the request, run it, and set the cookie when the session is new, changed or aging."""
        if request.url.path.startswith(API_PREFIX):
            return await call_next(request)  # token-authenticated: API clients get no cookie
        decoded = self.decode(request.cookies.get(SESSION_COOKIE, ""))
        original = decoded[0] if decoded else None
        request.state.web_session = original or WebSession.anonymous()
        response = await call_next(request)
        current: WebSession = request.state.web_session
        aging = decoded is not None and decoded[1] > COOKIE_REFRESH_SECONDS
        if current != original or aging:
            response.set_cookie(
                SESSION_COOKIE, self.encode(current), max_age=self.max_age_seconds, path="/",
                secure=self.secure, httponly=True, samesite="lax",
            )
        return response


def current_web_session(request: Request) -> WebSession:
    """The session :class:`SessionCookies` attached to the request."""
    web_session: WebSession = request.state.web_session
    return web_session


def sign_in(request: Request, user: User) -> None:
    """Start a signed-in session; the CSRF token is replaced so a token seen before login is worthless."""
    assert user.id is not None
    request.state.web_session = WebSession(
        csrf=secrets.token_urlsafe(32), user_id=user.id, fingerprint=password_fingerprint(user)
    )


def sign_out(request: Request) -> None:
    """End the session (the browser keeps a fresh visitor session)."""
    request.state.web_session = WebSession.anonymous()


def engine_of(request: Request) -> Engine:
    """The store engine the app was created with."""
    engine: Engine = request.app.state.engine
    return engine


class LoginRequiredError(Exception):
    """Raised by :func:`page_user` for a visitor; the app answers with a redirect to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def login_redirect_target(next_path: str) -> str:
    """The login page's URL, remembering where to go afterwards."""
    return "/login?next=" + quote(next_path, safe="/")


def safe_next_path(value: str | None) -> str:
    """A post-login destination that stays on this site (no scheme, no host, no ``//``)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/sessions"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/sessions"
    return value


def page_user(request: Request) -> User:
    """FastAPI dependency: the signed-in user of a page request, or a redirect to the login page."""
    web_session = current_web_session(request)
    if web_session.user_id is not None:
        with session_scope(engine_of(request)) as session:
            user = session.get(User, web_session.user_id)
        if user is not None and hmac.compare_digest(password_fingerprint(user), web_session.fingerprint):
            return user
        # The user was deleted or changed the password: this session is over.
        sign_out(request)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginRequiredError(target if request.method == "GET" else "/sessions")


def admin_page_user(user: Annotated[User, Depends(page_user)]) -> User:
    """FastAPI dependency: the signed-in admin; teachers get 404, as for anything not theirs."""
    if user.role != UserRole.admin:
        raise HTTPException(status_code=404, detail="Not Found")
    return user


def api_user(request: Request) -> User:
    """FastAPI dependency for the API: the user of ``Authorization: Bearer <token>``, or 401 JSON."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user: User | None = None
    if scheme.lower() == "bearer" and token.strip():
        with session_scope(engine_of(request)) as session:
            user = user_for_token(session, token.strip())
    if user is None:
        raise HTTPException(
            status_code=401, detail="a valid API token is required (Authorization: Bearer <token>; "
            "create one with `classlens users token EMAIL`)", headers={"WWW-Authenticate": "Bearer"},
        )
    return user


async def require_csrf(request: Request) -> None:
    """FastAPI dependency for every POST: the form's (or header's) CSRF token must match the session's, else 403."""
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get(CSRF_FIELD)
            sent = value if isinstance(value, str) else ""
    expected = current_web_session(request).csrf
    if not sent or not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(status_code=403, detail="the form has expired or did not come from this site; "
                            "reload the page and try again")


class LoginRateLimiter:
    """Failed logins per (address, email) and per address in a sliding window, kept in memory.

    In-memory means per server process: behind several processes the effective limit
    is multiplied by their number, which still stops online guessing.
    """

    #: An address may fail this many times the per-email limit, over all emails (spraying one password).
    PER_ADDRESS_FACTOR = 4
    #: Buckets kept at most; the oldest are dropped beyond it so a flood cannot exhaust memory.
    MAX_BUCKETS = 50_000

    def __init__(self, attempts_per_window: int, window_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts_per_window = attempts_per_window
        self.window_seconds = window_seconds
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _limits(self, address: str, email: str) -> list[tuple[str, int]]:
        per_email = (f"{address}|{email.strip().lower()}", self.attempts_per_window)
        per_address = (f"{address}|*", self.attempts_per_window * self.PER_ADDRESS_FACTOR)
        return [per_email, per_address]

    def retry_after(self, address: str, email: str) -> float:
        """Seconds until this address may try this email again; 0 when it may now."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key, limit in self._limits(address, email):
                times = self._failures.get(key)
                if times is None:
                    continue
                while times and times[0] <= now - self.window_seconds:
                    times.popleft()
                if len(times) >= limit:
                    wait = max(wait, times[0] + self.window_seconds - now)
        return wait

    def record_failure(self, address: str, email: str) -> None:
        """Count one failed login."""
        now = self._clock()
        with self._lock:
            for key, _limit in self._limits(address, email):
                times = self._failures.setdefault(key, collections.deque())
                times.append(now)
                self._failures.move_to_end(key)
            while len(self._failures) > self.MAX_BUCKETS:
                self._failures.popitem(last=False)

    def reset(self, address: str, email: str) -> None:
        """Forget the failures of this address and email (after a successful login)."""
        with self._lock:
            self._failures.pop(self._limits(address, email)[0][0], None)


def client_address(request: Request) -> str:
    """The client's IP address (uvicorn's ``--proxy-headers`` puts the real one here behind a proxy)."""
    return request.client.host if request.client else "unknown"

