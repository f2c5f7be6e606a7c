"""The ClassLens web app (`classlens serve`): the report archive, the invite API and the WHIP endpoint.

:func:`create_app` opens the store, sets up signed session cookies, CSRF checks and
login rate limits (:mod:`classlens.webauth`), and mounts the archive
(:mod:`reports.archive`). The meeting bot's routers take the API's auth dependency
(:func:`classlens.webauth.api_user`) and are each included with one line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from classlens.webauth import (
    API_PREFIX,
    LoginRequiredError,
    PasswordCheckGate,
    SessionCookies,
    api_user,
    cookie_secure,
    load_secret_key,
    login_limiter,
    login_redirect_target,
    whip_api_user,
)
from kernel.settings import Settings
from kernel.store import init_store
from reports.archive import archive_router, error_page

logger = logging.getLogger(__name__)

#: Headers on every response: no framing, no MIME sniffing, no scripts (the pages have none),
#: and nothing personal left in shared caches or browser history caches.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
}

#: Largest request body taken anywhere (JSON, forms); WHIP's SDP offers have a tighter cap of their own.
MAX_BODY_BYTES = 256 * 1024

#: ``Strict-Transport-Security`` sent when ``public_url`` is https: one year, so browsers never try plain http.
HSTS_VALUE = "max-age=31536000"

_MESSAGES = {
    404: "There is nothing here, or it is not yours to see. Go back to your sessions.",
    403: "This form has expired or did not come from ClassLens. Reload the page and try again.",
    405: "This address does not take that kind of request.",
}


def _is_api(request: Request) -> bool:
    # API clients (the invite API, WHIP) read JSON errors; people read pages.
    return request.url.path.startswith(API_PREFIX)


def security_headers(settings: Settings) -> dict[str, str]:
    """The headers every answer carries: :data:`SECURITY_HEADERS`, plus HSTS when the archive is served over https."""
    headers = dict(SECURITY_HEADERS)
    if (settings.public_url or "").startswith("https://"):
        headers["Strict-Transport-Security"] = HSTS_VALUE
    return headers


class RedactStudentNames(logging.Filter):
    """Access-log filter: the values of WHIP's ``participant`` and ``consent_name`` parameters become ``…``.

    They are students' display names, which have no place in a web server's log.
    """

    _NAMES = re.compile(r"((?:^|[?&])(?:participant|consent_name)=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the request line of uvicorn's access record; never drops a record."""
        if isinstance(record.args, tuple) and len(record.args) >= 3:
            path = record.args[2]
            if isinstance(path, str):
                record.args = (*record.args[:2], self._NAMES.sub(r"\1…", path), *record.args[3:])
        return True


def redact_access_log() -> None:
    """Install :class:`RedactStudentNames` on uvicorn's access logger (once per process)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, RedactStudentNames) for existing in access.filters):
        access.addFilter(RedactStudentNames())


def create_app(settings: Settings, *, archive: bool = True, meetings: bool = True) -> FastAPI:
    """Build the web app: open (and create) the store, then mount the archive and the bot's API.

    ``archive`` mounts the report archive (pages, exports, admin); ``meetings`` mounts the
    invite API and the WHIP endpoint and runs the meeting bots in this process. The
    embedded default serves both; a deployment can give the bots a process of their own
    (``classlens bot serve``) so that media and detection load stays off the archive.
    """
    if not (archive or meetings):
        raise ValueError("create_app needs the archive, the meetings API, or both")
    # Imported here: the bot's modules pull in its media stack only when the app is built, not for `--help`.
    from bot.api import MeetingRegistry, meetings_router
    from bot.live import SharedComponents
    from bot.whip import whip_router

    engine = init_store(settings.resolved_database_url)
    # One copy of the models for the meetings and the WHIP sessions, loaded on the first one.
    components = SharedComponents(settings)
    registry = MeetingRegistry(settings, engine, components=components)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Meetings a previous process left "live" lost their bot with it: they are marked failed first.
        recovered = await registry.recover() if meetings else 0
        if recovered:
            logger.warning("%d meeting(s) of a previous server process were marked failed", recovered)
        try:
            yield
        finally:
            await registry.aclose()  # bots leave their meetings and their sessions are finalised

    # No public schema or docs pages: the API is described in docs/archive.md and bot/api.py, bot/whip.py.
    app = FastAPI(title="ClassLens", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.meeting_registry = registry

    headers = security_headers(settings)

    async def add_security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        return response

    # Middleware runs outermost-last-added: cookies are read before any route and written after it.
    app.middleware("http")(SessionCookies(
        load_secret_key(settings), max_age_seconds=settings.session_max_age_seconds, secure=cookie_secure(settings)))
    app.middleware("http")(add_security_headers)
    # Outermost: a declared Content-Length over the cap is refused at once, a chunked body once
    # it passes the cap while being read; so no request makes the server hold more than the cap.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY_BYTES)
    redact_access_log()

    @app.exception_handler(LoginRequiredError)
    async def _to_login(request: Request, exc: LoginRequiredError) -> RedirectResponse:
        return RedirectResponse(login_redirect_target(exc.next_path), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return error_page(request, exc.status_code, _MESSAGES.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
        if _is_api(request):
            # jsonable_encoder: a validator's error carries the exception object in its context.
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
        # A page address with a non-numeric id is simply an address that does not exist.
        return error_page(request, 404, _MESSAGES[404])

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        # Starlette answers unhandled errors outside every middleware: set the headers here too.
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = "Something went wrong on the server; the error is in its log. Try again later."
        response: Response = (JSONResponse({"detail": message}, status_code=500) if _is_api(request)
                              else error_page(request, 500, message))
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        return response

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if archive:
        app.include_router(archive_router(login_limiter(settings), PasswordCheckGate.from_settings(settings)))
    if meetings:
        # The meeting bot's endpoints, authenticated by API token.
        app.include_router(meetings_router(api_user))
        app.include_router(whip_router(whip_api_user, settings=settings, components=components, engine=engine))
    return app
