"""Authentication for the web app: session cookies, CSRF tokens, login rate limits, API tokens.

The browser session is one signed cookie (itsdangerous, HMAC-SHA1 over a key from
:func:`load_secret_key`) holding the user id, the session's CSRF token, a fingerprint
of the user's password hash, the user's session epoch and the time of sign-in. Every
request checks them against the stored user: signing out, a password change and
disabling the user bump the epoch (``User.session_epoch``), so every cookie issued
before, copies included, stops working at once. The cookie is HttpOnly, SameSite=Lax
and Secure unless the app is served over plain http on this machine only
(:func:`cookie_secure`). A session ends after ``session_max_age_seconds`` without a
request (the cookie is re-signed every few minutes while it is used) and in any case
``session_absolute_lifetime_seconds`` after sign-in.

Every visitor, signed in or not, gets a CSRF token in the cookie, so that the login
form is protected too. Every POST must echo it (form field ``csrf_token`` or header
``X-CSRF-Token``) or it is refused with 403.

The API (invite, WHIP) authenticates with ``Authorization: Bearer <token>`` instead:
no cookie, so no CSRF is involved. A token may expire and may be limited to WHIP
(:class:`~kernel.store.TokenScope`).

Login attempts are counted before the password is checked (:class:`LoginRateLimiter`
in memory, :class:`RedisLoginRateLimiter` across server processes), and at most a few
argon2 verifications run at once (:class:`PasswordCheckGate`), so neither concurrency
nor a flood of logins gets around the limit or exhausts memory.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request, Response
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import Engine

from kernel.accounts import end_browser_sessions, user_for_token
from kernel.audit import record_event
from kernel.errors import ConfigurationError
from kernel.settings import Settings
from kernel.store import TokenScope, User, UserRole, session_scope

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
    epoch: int = 0
    """The user's ``session_epoch`` at login; the session is over once the stored one moves on."""
    signed_in_at: float = 0.0
    """When the user signed in (Unix time); the session ends a fixed lifetime after it."""

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
        return self._serializer.dumps([web_session.csrf, web_session.user_id, web_session.fingerprint,
                                       web_session.epoch, web_session.signed_in_at])

    def decode(self, value: str) -> tuple[WebSession, float] | None:
        """The session in a cookie value and its age in seconds, or None when forged, malformed or expired."""
        try:
            payload, signed_at = self._serializer.loads(value, max_age=self.max_age_seconds, return_timestamp=True)
        except (BadSignature, SignatureExpired):
            return None
        if not (isinstance(payload, list) and len(payload) == 5):
            return None  # also a cookie of an older release: the user signs in again
        csrf, user_id, fingerprint, epoch, signed_in_at = payload
        if not isinstance(csrf, str) or not isinstance(fingerprint, str):
            return None
        if user_id is not None and not isinstance(user_id, int):
            return None
        if not isinstance(epoch, int) or not isinstance(signed_in_at, (int, float)):
            return None
        age = time.time() - signed_at.timestamp()
        return WebSession(csrf=csrf, user_id=user_id, fingerprint=fingerprint, epoch=epoch,
                          signed_in_at=float(signed_in_at)), age

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
        csrf=secrets.token_urlsafe(32), user_id=user.id, fingerprint=password_fingerprint(user),
        epoch=user.session_epoch, signed_in_at=time.time(),
    )


def sign_out(request: Request) -> None:
    """End the session and every other browser session of its user (copies of the cookie included).

    The user's session epoch is bumped in the store, so a cookie copied before sign-out
    is refused everywhere; the browser keeps a fresh visitor session.
    """
    web_session = current_web_session(request)
    if web_session.user_id is not None:
        with session_scope(engine_of(request)) as session:
            user = session.get(User, web_session.user_id)
            if user is not None and session_is_current(web_session, user, _absolute_lifetime(request)):
                end_browser_sessions(user)
                session.add(user)
    forget_session(request)


def forget_session(request: Request) -> None:
    """Replace the request's session by a fresh visitor session (the store is not touched)."""
    request.state.web_session = WebSession.anonymous()


def session_is_current(web_session: WebSession, user: User, absolute_lifetime_seconds: float) -> bool:
    """Whether a signed-in session still stands for ``user``.

    Not when the user is disabled, changed the password, signed out anywhere since
    (epoch), or signed in longer ago than the absolute lifetime.
    """
    return (
        not user.disabled
        and hmac.compare_digest(password_fingerprint(user), web_session.fingerprint)
        and web_session.epoch == user.session_epoch
        and 0 <= time.time() - web_session.signed_in_at < absolute_lifetime_seconds
    )


def _absolute_lifetime(request: Request) -> float:
    settings: Settings = request.app.state.settings
    return float(settings.session_absolute_lifetime_seconds)


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
        if user is not None and session_is_current(web_session, user, _absolute_lifetime(request)):
            return user
        # The user was deleted, disabled, changed the password or signed out, or the lifetime is over.
        forget_session(request)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginRequiredError(target if request.method == "GET" else "/sessions")


def admin_page_user(request: Request, user: Annotated[User, Depends(page_user)]) -> User:
    """FastAPI dependency: the signed-in admin; teachers get 404, as for anything not theirs (and it is audited)."""
    if user.role != UserRole.admin:
        with session_scope(engine_of(request)) as session:
            record_event(session, user, "refused", "page", "", request.url.path[:200])
        raise HTTPException(status_code=404, detail="Not Found")
    return user


def api_user_for(scope: TokenScope) -> Callable[[Request], User]:
    """A FastAPI dependency for the API: the user of a valid ``Authorization: Bearer <token>`` that allows ``scope``.

    A missing, unknown, expired or revoked token, a disabled user's, and a token whose
    scope does not cover ``scope`` all get the same 401 JSON.
    """
    def dependency(request: Request) -> User:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        user: User | None = None
        if scheme.lower() == "bearer" and token.strip():
            with session_scope(engine_of(request)) as session:
                user = user_for_token(session, token.strip(), scope)
        if user is None:
            raise HTTPException(
                status_code=401, detail=f"a valid API token for {scope.value} access is required "
                "(Authorization: Bearer <token>; create one with `classlens users token EMAIL`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return user

    dependency.__name__ = f"api_user_{scope.value}"
    return dependency


api_user = api_user_for(TokenScope.full)
"""FastAPI dependency: the user of a full-scope API token (invite API, session API)."""

whip_api_user = api_user_for(TokenScope.whip)
"""FastAPI dependency: the user of a full-scope or WHIP-only API token (the WHIP endpoint)."""


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


@dataclass(frozen=True, slots=True)
class LoginReservation:
    """The answer to :meth:`LoginRateLimiter.reserve`: an attempt counted, or how long to wait."""

    address: str
    """The client's address."""
    email: str
    """The email tried, as typed."""
    retry_after: float = 0.0
    """Seconds until this address may try this email again; 0 when the attempt was counted and may go on."""
    key: str = ""
    """Identifies the counted attempt, so that a successful login can give it back."""

    @property
    def granted(self) -> bool:
        """Whether the attempt was counted and the password may be checked."""
        return self.retry_after <= 0


def _limit_keys(address: str, email: str) -> tuple[str, str]:
    # Per (address, email), against guessing one account; per address, against spraying one password.
    return f"{address}|{email.strip().lower()}", f"{address}|*"


class LoginRateLimiter:
    """Login attempts per (address, email) and per address in a sliding window, kept in this process's memory.

    :meth:`reserve` counts an attempt before its password is checked, under one lock, so
    concurrent requests cannot all pass a check made before any of them was counted. A
    successful login gives its attempt back (:meth:`give_back`). Behind several server
    processes each counts alone; :class:`RedisLoginRateLimiter` shares the counts.
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
        self._attempts: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _limits(self, address: str, email: str) -> list[tuple[str, int]]:
        per_email, per_address = _limit_keys(address, email)
        return [(per_email, self.attempts_per_window),
                (per_address, self.attempts_per_window * self.PER_ADDRESS_FACTOR)]

    def reserve(self, address: str, email: str) -> LoginReservation:
        """Count one attempt if the limits allow it; otherwise say how long to wait (nothing is counted)."""
        now = self._clock()
        with self._lock:
            wait = 0.0
            limits = self._limits(address, email)
            for key, limit in limits:
                times = self._attempts.get(key)
                if times is None:
                    continue
                while times and times[0] <= now - self.window_seconds:
                    times.popleft()
                if len(times) >= limit:
                    wait = max(wait, times[0] + self.window_seconds - now)
            if wait > 0:
                return LoginReservation(address, email, retry_after=wait)
            for key, _limit in limits:
                self._attempts.setdefault(key, collections.deque()).append(now)
                self._attempts.move_to_end(key)
            while len(self._attempts) > self.MAX_BUCKETS:
                self._attempts.popitem(last=False)
        return LoginReservation(address, email, key=repr(now))

    def give_back(self, reservation: LoginReservation) -> None:
        """Undo a counted attempt that succeeded: the per-email count is cleared, the per-address one loses it."""
        if not reservation.granted:
            return
        per_email, per_address = _limit_keys(reservation.address, reservation.email)
        with self._lock:
            self._attempts.pop(per_email, None)
            times = self._attempts.get(per_address)
            if times:
                with contextlib.suppress(ValueError):
                    times.remove(float(reservation.key))


#: Atomically: drop attempts older than the window, refuse (returning the wait in ms) when a
#: limit is reached, else record the attempt under both keys. KEYS: per-email, per-address.
#: ARGV: window (ms), per-email limit, per-address limit, attempt id. Redis's own clock is
#: used, so that servers whose clocks differ still agree on the window.
_RESERVE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= tonumber(ARGV[1 + i]) then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now, 1)
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
end
return 0
"""


class RedisLoginRateLimiter:
    """The same limits as :class:`LoginRateLimiter`, counted in Redis so that they hold across server processes.

    Each reservation is one Lua script, atomic in Redis. When Redis cannot be reached the
    attempt is counted in this process's memory instead (and that is logged): logins
    keep working, limited per process, until Redis is back.
    """

    #: Prefix of the keys this limiter writes.
    KEY_PREFIX = "classlens:login:"

    def __init__(self, redis_url: str, attempts_per_window: int, window_seconds: float = 60.0) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._reserve = self._client.register_script(_RESERVE_SCRIPT)
        self.attempts_per_window = attempts_per_window
        self.window_seconds = window_seconds
        self._fallback = LoginRateLimiter(attempts_per_window, window_seconds, clock=time.time)

    def _keys(self, address: str, email: str) -> list[str]:
        # Hashed: the keys hold no email or address in clear, whatever was typed.
        return [self.KEY_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
                for key in _limit_keys(address, email)]

    def reserve(self, address: str, email: str) -> LoginReservation:
        """Count one attempt in Redis if the limits allow it; otherwise say how long to wait."""
        import redis

        attempt = f"{time.time():.6f}:{secrets.token_hex(8)}"
        limits = (self.attempts_per_window, self.attempts_per_window * LoginRateLimiter.PER_ADDRESS_FACTOR)
        try:
            wait_ms = int(self._reserve(keys=self._keys(address, email),
                                        args=[int(self.window_seconds * 1000), *limits, attempt]))
        except redis.RedisError as exc:
            logger.warning("login limits: Redis unreachable (%s); counting in this process", exc)
            return self._fallback.reserve(address, email)
        if wait_ms > 0:
            return LoginReservation(address, email, retry_after=wait_ms / 1000)
        return LoginReservation(address, email, key=attempt)

    def give_back(self, reservation: LoginReservation) -> None:
        """Undo a counted attempt that succeeded (in Redis, or in memory when it was counted there)."""
        import redis

        if not reservation.granted:
            return
        if ":" not in reservation.key:  # counted by the in-memory fallback
            self._fallback.give_back(reservation)
            return
        per_email, per_address = self._keys(reservation.address, reservation.email)
        try:
            self._client.delete(per_email)
            self._client.zrem(per_address, reservation.key)
        except redis.RedisError as exc:
            logger.warning("login limits: Redis unreachable (%s); a successful login stays counted", exc)


LoginLimiter = LoginRateLimiter | RedisLoginRateLimiter
"""Either login limiter; :func:`login_limiter` picks one from the settings."""


def login_limiter(settings: Settings) -> LoginLimiter:
    """Redis-backed limits when the broker is Redis (shared by every server process), else in-memory ones."""
    url = settings.broker_url or ""
    if url.startswith(("redis://", "rediss://")):
        return RedisLoginRateLimiter(url, settings.login_attempts_per_minute)
    return LoginRateLimiter(settings.login_attempts_per_minute)


class PasswordChecksBusyError(Exception):
    """Raised by :meth:`PasswordCheckGate.slot` when every slot stayed taken for the whole wait."""


class PasswordCheckGate:
    """Bounds how many password verifications run at once (each argon2 check takes 64 MiB and a core).

    Without it, a burst of logins runs one verification per server thread, which can
    take gigabytes of memory at once. A login waits up to ``wait_seconds`` for a slot;
    after that it is answered 503 with Retry-After, and its attempt is not counted.
    """

    def __init__(self, slots: int, wait_seconds: float = 3.0) -> None:
        self.slots = slots
        self.wait_seconds = wait_seconds
        self._semaphore = threading.BoundedSemaphore(slots)

    @classmethod
    def from_settings(cls, settings: Settings) -> PasswordCheckGate:
        """One slot per core unless ``password_checks_at_once`` says otherwise."""
        return cls(settings.password_checks_at_once or os.cpu_count() or 1)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for a verification; raises :class:`PasswordChecksBusyError` when none freed up in time."""
        if not self._semaphore.acquire(timeout=self.wait_seconds):
            raise PasswordChecksBusyError
        try:
            yield
        finally:
            self._semaphore.release()


def client_address(request: Request) -> str:
    """The client's IP address (uvicorn's ``--proxy-headers`` puts the real one here behind a proxy)."""
    return request.client.host if request.client else "unknown"

