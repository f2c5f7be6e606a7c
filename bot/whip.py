"""WHIP-style ingest: a meeting's own front end (or any WHIP client) pushes participants' video to the bot.

Endpoints (mounted by ``classlens serve``; the web app injects its authentication):

- ``POST /api/whip`` with ``Content-Type: application/sdp`` and an SDP offer. Query
  parameters: ``participant`` (repeated: the display name of each video track, in the
  order of the offer's video m-lines; ``mid=Name`` names a track by its mid instead),
  ``session`` (id of a running live session of the caller to join; without it a new
  session is created), and for a new session ``title``, ``course``, ``consent``
  (``everyone``, ``opt_out``, ``opt_in``), ``consent_name`` (repeated) and ``layout``
  (``camera``, the default: each track is one participant's camera; ``gallery`` or ``auto``:
  each track is a shared meeting window, OBS's WHIP output of a Zoom or Teams window for
  example, split into its participants' tiles and named by their labels). Answers ``201``
  with the SDP answer, ``Location: /api/whip/<resource>`` and ``X-ClassLens-Session: <id>``.
- ``DELETE /api/whip/<resource>`` hangs up; when the last connection of a session hangs
  up, the session is finalised (and its reports rendered).
- ``POST /api/whip/sessions/<id>/end`` hangs up every connection and finalises at once.
- ``GET /api/whip/sessions/<id>`` shows the live counters.

Errors: ``415`` for another content type, ``413`` for an offer over 64 KiB, ``400`` for
a malformed offer or missing participant names, ``422`` when the offer has no video in a
supported codec (VP8, H264) or more than 32 m-lines, ``404`` for an unknown session or
resource (or one that has ended), ``429`` when the server or the user already holds as
many connections as allowed (``whip_max_connections``,
``whip_max_connections_per_user``; offers still being negotiated count), ``422`` also when
the session would pass ``whip_max_participants_per_session``, ``503`` when
the models cannot be loaded. Every check runs before anything is created, so a refused
offer leaves nothing behind. A peer that has not connected
``whip_connect_timeout_seconds`` after its answer is hung up, and a session that never
received a frame of video is removed when it ends: only sessions that saw media reach
the archive. Participants the session's consent list excludes are never subscribed to:
their m-line is answered ``inactive``, so no video of theirs is even sent.
"""

import asyncio
import collections
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from kernel.settings import Settings, VideoLayout
from kernel.store import AnalysisStatus, ConsentMode, User, UserRole, init_store

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection
    from fastapi import APIRouter
    from sqlalchemy import Engine

    from bot.live import LiveOutcome, LiveSession, SharedComponents
    from pipeline.models import PipelineComponents

logger = logging.getLogger(__name__)

#: Video codecs the bot decodes (aiortc's decoders).
SUPPORTED_VIDEO_CODECS = ("VP8", "H264")
#: Where the router is mounted.
WHIP_PATH = "/api/whip"

MAX_OFFER_BYTES = 64 * 1024
"""Largest SDP offer taken: a browser's offer for a few tracks is a few KiB."""
MAX_MEDIA_SECTIONS = 32
"""Most m-lines an offer may have; parsing and negotiating thousands stalls the event loop every
live class shares, so such an offer is refused before anything is parsed or created."""
MAX_NAME_CHARS = 200
"""Longest ``participant`` or ``consent_name`` value taken (meeting platforms cap names far below it)."""

SessionFinishedHook = Callable[["LiveOutcome"], Awaitable[None]]


class OfferError(ValueError):
    """An SDP offer the bot cannot take; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class VideoOffer:
    """The video m-lines of an offer, in order: their mids and offered codecs."""

    mids: list[str]
    """The mid of each video m-line."""
    codecs: list[list[str]]
    """Codec names offered on each video m-line."""


def check_offer(sdp: str) -> VideoOffer:
    """Validate an SDP offer before anything is negotiated; raises :class:`OfferError` (400 or 422)."""
    from aiortc.sdp import SessionDescription

    text = sdp.strip()
    if not text.startswith("v=0"):
        raise OfferError(400, "malformed SDP offer: it must start with 'v=0'")
    if "\nm=" not in text.replace("\r\n", "\n"):
        raise OfferError(400, "malformed SDP offer: it has no media section (m= line)")
    try:
        description = SessionDescription.parse(text.replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n")
    except Exception as exc:  # the parser raises ValueError, KeyError, IndexError… on bad input
        raise OfferError(400, f"malformed SDP offer: {_one_line(exc)}") from None
    video = [m for m in description.media if m.kind == "video"]
    if not video:
        raise OfferError(422, "the SDP offer has no video track")
    codecs = [[codec.name for codec in m.rtp.codecs] for m in video]
    supported = {name.upper() for names in codecs for name in names} & set(SUPPORTED_VIDEO_CODECS)
    if not supported:
        offered = sorted({name for names in codecs for name in names if name.lower() not in ("rtx", "red", "ulpfec")})
        raise OfferError(422, f"the SDP offer has no video in a supported codec ({', '.join(SUPPORTED_VIDEO_CODECS)}); "
                              f"offered: {', '.join(offered) or 'none'}")
    return VideoOffer(mids=[m.rtp.muxId or str(index) for index, m in enumerate(video)], codecs=codecs)


def media_section_count(sdp: str) -> int:
    """How many m-lines an SDP text has, counted without parsing it."""
    text = sdp.replace("\r\n", "\n")
    return text.count("\nm=") + (1 if text.startswith("m=") else 0)


async def _read_capped(request: Any, limit: int) -> bytes:
    """The request body, or HTTP 413 as soon as it is known to exceed ``limit`` bytes."""
    from fastapi import HTTPException

    too_large = HTTPException(413, f"the SDP offer is larger than {limit // 1024} KiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def participant_names(offer: VideoOffer, given: list[str]) -> dict[str, str]:
    """Map each video mid to a display name from the ``participant`` parameters (by order, or ``mid=Name``)."""
    by_mid: dict[str, str] = {}
    in_order: list[str] = []
    for entry in given:
        mid, separator, name = entry.partition("=")
        if separator and mid in offer.mids:
            by_mid[mid] = name.strip()
        else:
            in_order.append(entry.strip())
    unnamed = [mid for mid in offer.mids if mid not in by_mid]
    if len(in_order) < len(unnamed) or any(not n for n in [*by_mid.values(), *in_order]):
        raise OfferError(400, f"give a participant display name for each of the {len(offer.mids)} video track(s) "
                              "(query parameter 'participant', repeated, in m-line order, or 'mid=Name')")
    by_mid.update(zip(unnamed, in_order, strict=False))
    return by_mid


@dataclass
class _Connection:
    """One WHIP resource: a peer connection and the participants it carries."""

    resource_id: str
    analysis_id: int
    peer: "RTCPeerConnection"
    user_id: int | None
    participant_ids: list[str] = field(default_factory=list)


@dataclass
class _LiveEntry:
    """A live session fed through WHIP and the connections that feed it."""

    session: "LiveSession"
    owner_id: int | None
    connections: set[str] = field(default_factory=set)


class WhipIngest:
    """The state behind the WHIP endpoints: live sessions, peer connections and the shared models."""

    def __init__(self, settings: Settings, *, components: "PipelineComponents | SharedComponents | None" = None,
                 engine: "Engine | None" = None, ice_servers: list[str] | None = None,
                 on_session_finished: SessionFinishedHook | None = None) -> None:
        from bot.live import SharedComponents

        self.settings = settings
        self.engine = engine or init_store(settings.resolved_database_url)
        self._components = SharedComponents.of(settings, components)
        # No STUN by default: aiortc would otherwise ask Google's server, unreachable in many deployments.
        self._ice_servers = ice_servers or []
        self._on_finished = on_session_finished or self.render_reports
        self._sessions: dict[int, _LiveEntry] = {}
        self._connections: dict[str, _Connection] = {}
        self._lock = asyncio.Lock()
        # Offers being negotiated, per user: they count against the caps like established connections.
        self._in_flight: collections.Counter[int | None] = collections.Counter()
        self._watchdogs: set[asyncio.Task[None]] = set()

    def _claim_slot(self, user: User) -> None:
        """Count one more connection for ``user``, or refuse with 429 when a cap is reached.

        Runs without awaiting between the check and the count, so concurrent offers on the
        event loop cannot all pass a check made before any of them was counted.
        """
        from fastapi import HTTPException

        held = len(self._connections) + sum(self._in_flight.values())
        if held >= self.settings.whip_max_connections:
            raise HTTPException(429, f"this server already takes {self.settings.whip_max_connections} WHIP "
                                     "connections; try again when one has ended", headers={"Retry-After": "10"})
        mine = sum(1 for c in self._connections.values() if c.user_id == user.id) + self._in_flight[user.id]
        if mine >= self.settings.whip_max_connections_per_user:
            raise HTTPException(429, f"you already hold {self.settings.whip_max_connections_per_user} WHIP "
                                     "connections; hang one up first", headers={"Retry-After": "10"})
        self._in_flight[user.id] += 1

    def _release_slot(self, user: User) -> None:
        self._in_flight[user.id] -= 1
        if self._in_flight[user.id] <= 0:
            del self._in_flight[user.id]

    async def components(self) -> "PipelineComponents":
        """The pipeline's models, loaded once (in a thread) on first use."""
        return await self._components.get()

    def router(self, current_user: Callable[..., Any]) -> "APIRouter":
        """The FastAPI router; ``current_user`` is the web app's dependency that resolves the caller's ``User``."""
        from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

        @contextlib.asynccontextmanager
        async def lifespan(_app: Any) -> AsyncIterator[None]:
            # Merged into the app's own lifespan by include_router: shutting the server down finalises sessions.
            yield
            await self.aclose()

        router = APIRouter(prefix=WHIP_PATH, tags=["whip"], lifespan=lifespan)
        CurrentUser = Annotated[User, Depends(current_user)]  # noqa: N806 - a type alias

        @router.post("", status_code=201, response_class=Response)
        async def publish(
            request: Request, user: CurrentUser,
            participant: Annotated[list[str] | None, Query()] = None,
            session: int | None = None, title: str = "", course: str = "",
            consent: ConsentMode = ConsentMode.everyone,
            consent_name: Annotated[list[str] | None, Query()] = None,
            layout: VideoLayout = VideoLayout.camera,
        ) -> Response:
            """Take an SDP offer; answer 201 with the SDP answer and the resource's Location."""
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/sdp":
                raise HTTPException(415, f"expected Content-Type: application/sdp, got {content_type or 'none'}")
            names = [*(participant or []), *(consent_name or [])]
            if any(len(name) > MAX_NAME_CHARS for name in names) or len(title) > 200 or len(course) > 200:
                raise HTTPException(422, f"display names take at most {MAX_NAME_CHARS} characters, "
                                         "title and course 200")
            self._claim_slot(user)
            try:
                offer = (await _read_capped(request, MAX_OFFER_BYTES)).decode("utf-8", errors="replace")
                sections = media_section_count(offer)
                if sections > MAX_MEDIA_SECTIONS:
                    raise HTTPException(422, f"the SDP offer has {sections} media sections; at most "
                                             f"{MAX_MEDIA_SECTIONS} are taken (one per camera)")
                connection = await self.publish(offer, user, participant or [], session_id=session, title=title,
                                                course=course, consent=consent, consent_names=consent_name or [],
                                                layout=layout)
            except OfferError as exc:
                raise HTTPException(exc.status, str(exc)) from None
            finally:
                self._release_slot(user)  # an established connection is counted in self._connections
            assert connection.peer.localDescription is not None
            return Response(connection.peer.localDescription.sdp, status_code=201, media_type="application/sdp",
                            headers={"Location": f"{WHIP_PATH}/{connection.resource_id}",
                                     "X-ClassLens-Session": str(connection.analysis_id)})

        @router.delete("/{resource_id}")
        async def hang_up(resource_id: str, user: CurrentUser) -> dict[str, Any]:
            """Close one connection; the last one to go finalises the session."""
            self._connection_of(resource_id, user)
            outcome = await self.hang_up(resource_id, "the participant hung up")
            return {"resource": resource_id, "session_finished": outcome is not None,
                    "status": outcome.status.value if outcome else "running"}

        @router.post("/sessions/{analysis_id}/end")
        async def end(analysis_id: int, user: CurrentUser) -> dict[str, Any]:
            """Hang up every connection of a session and finalise it."""
            self._entry_of(analysis_id, user)
            outcome = await self.end_session(analysis_id)
            return {"session": analysis_id, "status": outcome.status.value, "students": outcome.students,
                    "frames_sampled": outcome.frames_sampled, "frames_dropped": outcome.frames_dropped,
                    "failure_reason": outcome.failure_reason}

        @router.get("/sessions/{analysis_id}")
        async def show(analysis_id: int, user: CurrentUser) -> dict[str, Any]:
            """The session's live counters per participant."""
            stats = self._entry_of(analysis_id, user).session.stats
            return {"session": analysis_id, "students_live": stats.students_live, "excluded": stats.excluded,
                    "crops_stored": stats.crops_stored,
                    "participants": {key: {"display_name": p.display_name, "frames_received": p.frames_received,
                                           "frames_sampled": p.frames_sampled, "frames_dropped": p.frames_dropped}
                                     for key, p in stats.participants.items()}}

        del publish, hang_up, end, show  # registered on the router
        return router

    def _entry_of(self, analysis_id: int, user: User) -> _LiveEntry:
        from fastapi import HTTPException

        entry = self._sessions.get(analysis_id)
        if entry is None or not _may_use(user, entry.owner_id):
            raise HTTPException(404, f"no live session {analysis_id} of yours is running here")
        return entry

    def _connection_of(self, resource_id: str, user: User) -> _Connection:
        from fastapi import HTTPException

        connection = self._connections.get(resource_id)
        entry = self._sessions.get(connection.analysis_id) if connection else None
        if connection is None or entry is None or not _may_use(user, entry.owner_id):
            raise HTTPException(404, f"no WHIP resource {resource_id}")
        return connection

    async def publish(self, offer: str, user: User, names: list[str], *, session_id: int | None = None,
                      title: str = "", course: str = "", consent: ConsentMode = ConsentMode.everyone,
                      consent_names: list[str] | None = None, layout: VideoLayout = VideoLayout.camera,
                      ) -> _Connection:
        """Negotiate one WHIP connection and add its video tracks as participants of a new or running session.

        ``layout`` says what a new session's videos show: each a participant's camera
        (``camera``), or a shared meeting window (``gallery``, ``auto``) whose tiles become
        students named by their labels, as in a gallery recording. A running session keeps its own.
        """
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        from bot.live import LiveSession, create_live_analysis
        from kernel.consent import ConsentPolicy

        existing: _LiveEntry | None = None
        if session_id is not None:
            existing = self._sessions.get(session_id)
            if existing is None or not _may_use(user, existing.owner_id):
                raise OfferError(404, f"no live session {session_id} of yours is running here")
        # Checked before anything is created: a bad offer leaves no session behind.
        video = check_offer(offer)
        mapping = participant_names(video, names)
        joined = sum(len(c.participant_ids) for c in self._connections.values() if c.analysis_id == session_id)
        cap = self.settings.whip_max_participants_per_session
        if joined + len(video.mids) > cap:
            raise OfferError(422, f"a session takes at most {cap} participants; this offer would bring it to "
                                  f"{joined + len(video.mids)}")
        if existing is not None:
            entry = existing
        else:
            policy = ConsentPolicy(consent, tuple(consent_names or ()))
            analysis_id = await asyncio.to_thread(
                create_live_analysis, self.engine, self.settings, source="whip", title=title or "WHIP session",
                owner_id=user.id, course=course, host_email=user.email or None, consent=policy)
            try:
                live = LiveSession(self.settings, self.engine, analysis_id, components=await self.components(),
                                   layout=layout)
                await live.start()
            except Exception as exc:
                reason = f"the bot cannot analyse now: {_one_line(exc)}"
                logger.error("session %d: %s", analysis_id, reason)
                await asyncio.to_thread(_discard_session, self.engine, analysis_id)  # it never received media
                raise OfferError(503, reason) from None
            entry = _LiveEntry(live, user.id)
            self._sessions[analysis_id] = entry
        configuration = RTCConfiguration(iceServers=[RTCIceServer(url) for url in self._ice_servers])
        peer = RTCPeerConnection(configuration)
        connection = _Connection(secrets.token_urlsafe(12), entry.session.analysis_id, peer, user.id)
        try:
            await peer.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            for transceiver in peer.getTransceivers():
                name = mapping.get(transceiver.mid or "") if transceiver.kind == "video" else None
                participant_id = f"{connection.resource_id}:{transceiver.mid}"
                if name is not None and entry.session.add_participant(participant_id, name,
                                                                      transceiver.receiver.track):
                    connection.participant_ids.append(participant_id)
                else:
                    # Audio, and participants consent excludes: never subscribed to.
                    transceiver.direction = "inactive"
            await peer.setLocalDescription(await peer.createAnswer())
        except Exception as exc:
            for participant_id in connection.participant_ids:
                entry.session.remove_participant(participant_id, "negotiation failed")
            await peer.close()
            if not entry.connections:
                await self._finish(entry, failure=f"negotiation failed: {_one_line(exc)}")
            raise OfferError(400, f"malformed SDP offer: {_one_line(exc)}") from None
        entry.connections.add(connection.resource_id)
        self._connections[connection.resource_id] = connection

        @peer.on("connectionstatechange")
        async def on_state() -> None:
            # A client that vanishes without DELETE: ICE consent fails, or the remote closes DTLS.
            if peer.connectionState in ("failed", "closed"):
                await self.hang_up(connection.resource_id, f"the connection {peer.connectionState}")

        watchdog = asyncio.create_task(self._hang_up_unless_connected(connection),
                                       name=f"whip-{connection.resource_id}-connect")
        self._watchdogs.add(watchdog)
        watchdog.add_done_callback(self._watchdogs.discard)
        logger.info("session %d: WHIP resource %s with %d participant(s)", connection.analysis_id,
                    connection.resource_id, len(connection.participant_ids))
        return connection

    async def _hang_up_unless_connected(self, connection: _Connection) -> None:
        """Hang up a peer that has not connected ``whip_connect_timeout_seconds`` after its answer."""
        await asyncio.sleep(self.settings.whip_connect_timeout_seconds)
        if connection.resource_id in self._connections and connection.peer.connectionState != "connected":
            logger.info("session %d: WHIP resource %s never connected; hung up", connection.analysis_id,
                        connection.resource_id)
            await self.hang_up(connection.resource_id, "the peer never connected")

    async def hang_up(self, resource_id: str, reason: str) -> "LiveOutcome | None":
        """Close a connection; returns the session's outcome when it was the last one."""
        async with self._lock:
            connection = self._connections.pop(resource_id, None)
            if connection is None:
                return None
            entry = self._sessions.get(connection.analysis_id)
            if entry is not None:
                for participant_id in connection.participant_ids:
                    entry.session.remove_participant(participant_id, reason)
                entry.connections.discard(resource_id)
        await connection.peer.close()
        if entry is not None and not entry.connections:
            return await self._finish(entry)
        return None

    async def end_session(self, analysis_id: int) -> "LiveOutcome":
        """Hang up every connection of a session and finalise it."""
        entry = self._sessions[analysis_id]
        for resource_id in list(entry.connections):
            async with self._lock:
                connection = self._connections.pop(resource_id, None)
                entry.connections.discard(resource_id)
            if connection is not None:
                for participant_id in connection.participant_ids:
                    entry.session.remove_participant(participant_id, "the session was ended")
                await connection.peer.close()
        return await self._finish(entry)

    async def _finish(self, entry: _LiveEntry, *, failure: str | None = None) -> "LiveOutcome":
        self._sessions.pop(entry.session.analysis_id, None)
        if failure is not None:
            await entry.session.fail(failure)
        outcome = await entry.session.aclose()
        if entry.session.stats.frames_received == 0:
            # Offers that never brought a frame of video (peers that never connected, failed
            # negotiations) leave nothing in the archive.
            logger.info("session %d received no media; removed", outcome.analysis_id)
            await asyncio.to_thread(_discard_session, self.engine, outcome.analysis_id)
            return outcome
        if outcome.status is AnalysisStatus.done:
            try:
                await self._on_finished(outcome)
            except Exception:
                logger.exception("session %d: the after-class step failed", outcome.analysis_id)
        return outcome

    async def render_reports(self, outcome: "LiveOutcome") -> None:
        """The default after-class step: render the session's reports, then email the host."""
        from bot.meeting import after_session

        await asyncio.to_thread(after_session, self.settings, self.engine, outcome.analysis_id)

    async def aclose(self) -> None:
        """Hang up everything and finalise every running session (server shutdown)."""
        for watchdog in list(self._watchdogs):
            watchdog.cancel()
        for analysis_id in list(self._sessions):
            await self.end_session(analysis_id)


def whip_router(current_user: Callable[..., Any], *, settings: Settings | None = None,
                components: "PipelineComponents | SharedComponents | None" = None,
                engine: "Engine | None" = None) -> "APIRouter":
    """The WHIP ingest router for the web app, with its own :class:`WhipIngest`.

    Settings default to the environment's; the web app passes its own engine and the
    models it shares with the meeting bots, so one process opens one store and loads one copy.
    """
    from kernel.settings import load_settings

    return WhipIngest(settings or load_settings(), components=components, engine=engine).router(current_user)


def _may_use(user: User, owner_id: int | None) -> bool:
    return user.role == UserRole.admin or owner_id == user.id


def _discard_session(engine: "Engine", analysis_id: int) -> None:
    from kernel.store import delete_analysis_data, session_scope

    with session_scope(engine) as session:
        delete_analysis_data(session, analysis_id, keep_analysis=False)


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0]
