"""An asyncio client for the Janus WebRTC server's HTTP API and its VideoRoom plugin.

One :class:`JanusRoomClient` owns one Janus session: it creates it, sends keepalives,
and runs the long-poll loop that receives every event of the session. Asynchronous
plugin requests (join, configure, start, update) are answered with an ``ack`` on the
POST and their real answer arrives through the long poll, matched by transaction.
Everything else the room says (publishers arriving or leaving, the room being
destroyed, an unsolicited renegotiation) becomes a typed :class:`RoomEvent` on the
client's event queue. When the server goes away (transport error, Janus restart: the
session is unknown), the queue receives :class:`ConnectionLost` and every pending
request fails with :class:`JanusConnectionLostError`, so the owner can rejoin.

Errors a user can act on are typed: :class:`JanusUnreachableError`,
:class:`JanusRoomNotFoundError` (VideoRoom error 426), :class:`JanusUnauthorizedError`
(433: wrong PIN), :class:`JanusRoomFullError` (432).

This module does signalling only; :func:`publish_tracks` is the one helper that also
drives an aiortc peer connection, because publishing is the same for the bot's card and
for test participants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from kernel.errors import ClassLensError

if TYPE_CHECKING:
    from aiortc import MediaStreamTrack, RTCPeerConnection

logger = logging.getLogger(__name__)

VIDEOROOM_PLUGIN = "janus.plugin.videoroom"

#: VideoRoom error codes we turn into typed errors (janus_videoroom.c).
VIDEOROOM_NO_SUCH_ROOM = 426
VIDEOROOM_PUBLISHERS_FULL = 432
VIDEOROOM_UNAUTHORIZED = 433
#: VideoRoom's "missing element" error: a join without the ``pin`` of a room that has one.
VIDEOROOM_MISSING_ELEMENT = 429
VIDEOROOM_NO_SUCH_FEED = 428
#: Janus core error codes (janus.h) that mean the session or handle is gone, e.g. after a restart.
JANUS_SESSION_NOT_FOUND = 458
JANUS_HANDLE_NOT_FOUND = 459


def _pinned_request(url: str, pinned_address: str | None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Base URL, headers and httpx extensions for requests to ``url`` sent to ``pinned_address``."""
    if pinned_address is None:
        return url, {}, {}
    parts = urlsplit(url)
    host = f"[{pinned_address}]" if ":" in pinned_address else pinned_address
    netloc = f"{host}:{parts.port}" if parts.port else host
    extensions: dict[str, Any] = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc.rsplit("@", 1)[-1]}, extensions


class JanusError(ClassLensError):
    """Janus refused a request or could not be reached; the message says which and why."""

    exit_code = 2

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class JanusUnreachableError(JanusError):
    """Nothing answers at the Janus URL (connection refused, DNS, timeout, not a Janus API)."""


class JanusConnectionLostError(JanusError):
    """The Janus session ended under us: transport error, Janus restarted, session timed out."""


class JanusRoomNotFoundError(JanusError):
    """The VideoRoom room does not exist (error 426), or was destroyed."""


class JanusUnauthorizedError(JanusError):
    """The room refused us: wrong or missing PIN (VideoRoom error 433)."""


class JanusRoomFullError(JanusError):
    """The room has as many publishers as it allows (VideoRoom error 432)."""


class JanusRequestError(JanusError):
    """Any other error answer of Janus or the plugin; ``code`` holds Janus' error code."""


@dataclass(frozen=True)
class RemotePublisher:
    """A participant publishing in the room: their feed id, display name and video streams."""

    feed_id: int
    """Janus' id of the participant's publisher feed."""
    display: str
    """The participant's display name (empty when they set none)."""
    video_mids: tuple[str, ...]
    """Mids of the feed's active video streams (the ones a subscriber can ask for)."""


@dataclass(frozen=True)
class SubscribedStream:
    """One m-line of a multistream subscription: which feed's stream arrives on which mid."""

    mid: str
    """The mid in the subscriber's SDP."""
    feed_id: int | None
    """The publisher feed this m-line carries; None for an m-line left inactive after an unsubscribe."""
    feed_mid: str | None
    """The stream's mid within the publisher's own SDP."""
    feed_display: str
    """The publisher's display name."""
    kind: str
    """'video', 'audio' or 'data'."""
    active: bool
    """False for a slot Janus keeps after the feed went away."""


@dataclass(frozen=True)
class JoinedRoom:
    """What joining a room as a publisher returns."""

    room: int
    feed_id: int
    """Our own feed id in the room."""
    private_id: int
    """Ties a subscriber handle to this publisher (lets Janus skip our own feed, keeps us one participant)."""
    publishers: tuple[RemotePublisher, ...]
    """Everyone who was already publishing when we joined."""


@dataclass(frozen=True)
class Jsep:
    """An SDP offer or answer exchanged with Janus."""

    type: str
    sdp: str

    def as_json(self) -> dict[str, str]:
        """The JSON form Janus expects."""
        return {"type": self.type, "sdp": self.sdp}


@dataclass(frozen=True)
class PublishersAnnounced:
    """New publishers in the room (someone joined, or started publishing)."""

    handle_id: int
    publishers: tuple[RemotePublisher, ...]


@dataclass(frozen=True)
class PublisherGone:
    """A publisher stopped publishing or left the room."""

    handle_id: int
    feed_id: int
    reason: str
    """'unpublished', 'leaving' or 'kicked'."""


@dataclass(frozen=True)
class RoomDestroyed:
    """The room was destroyed: the meeting is over."""

    handle_id: int
    room: int


@dataclass(frozen=True)
class SubscriptionRenegotiation:
    """Janus sent the subscriber a new offer on its own (a subscribed feed went away)."""

    handle_id: int
    jsep: Jsep
    streams: tuple[SubscribedStream, ...]


@dataclass(frozen=True)
class HandleHangup:
    """The PeerConnection of a handle was closed by Janus (ICE or DTLS failure, or teardown)."""

    handle_id: int
    reason: str


@dataclass(frozen=True)
class ConnectionLost:
    """The session is gone; the owner must reconnect and rejoin."""

    reason: str


RoomEvent = (PublishersAnnounced | PublisherGone | RoomDestroyed | SubscriptionRenegotiation | HandleHangup
             | ConnectionLost)


def _publishers(entries: Any) -> tuple[RemotePublisher, ...]:
    """Parse the ``publishers`` list of a VideoRoom event, keeping only publishers that send video."""
    found: list[RemotePublisher] = []
    for entry in entries or ():
        streams = entry.get("streams") or ()
        mids = tuple(str(s["mid"]) for s in streams if s.get("type") == "video" and not s.get("disabled"))
        if entry.get("dummy"):
            continue
        found.append(RemotePublisher(feed_id=int(entry["id"]), display=str(entry.get("display") or ""),
                                     video_mids=mids))
    return tuple(found)


def _streams(entries: Any) -> tuple[SubscribedStream, ...]:
    """Parse the ``streams`` list of a subscriber's ``attached``/``updated`` event."""
    parsed: list[SubscribedStream] = []
    for entry in entries or ():
        feed = entry.get("feed_id")
        parsed.append(SubscribedStream(
            mid=str(entry.get("mid")), feed_id=int(feed) if feed is not None else None,
            feed_mid=str(entry["feed_mid"]) if entry.get("feed_mid") is not None else None,
            feed_display=str(entry.get("feed_display") or ""), kind=str(entry.get("type") or ""),
            active=bool(entry.get("active", True)) and feed is not None,
        ))
    return tuple(parsed)


def _jsep(payload: Any) -> Jsep | None:
    if not payload:
        return None
    return Jsep(type=str(payload["type"]), sdp=str(payload["sdp"]))


def _plugin_error(data: dict[str, Any], what: str) -> JanusError:
    """The typed error for a VideoRoom ``error_code``."""
    code = int(data.get("error_code", 0))
    reason = str(data.get("error") or "unknown error")
    if code == VIDEOROOM_NO_SUCH_ROOM:
        return JanusRoomNotFoundError(f"{what}: the room does not exist ({reason})", code)
    if code == VIDEOROOM_UNAUTHORIZED or (code == VIDEOROOM_MISSING_ELEMENT and "pin" in reason.lower()):
        return JanusUnauthorizedError(f"{what}: wrong or missing PIN ({reason})", code)
    if code == VIDEOROOM_PUBLISHERS_FULL:
        return JanusRoomFullError(f"{what}: the room is full ({reason})", code)
    return JanusRequestError(f"{what}: Janus VideoRoom error {code}: {reason}", code)


def _core_error(payload: dict[str, Any], what: str) -> JanusError:
    error = payload.get("error") or {}
    code = int(error.get("code", 0))
    reason = str(error.get("reason") or "unknown error")
    if code in (JANUS_SESSION_NOT_FOUND, JANUS_HANDLE_NOT_FOUND):
        return JanusConnectionLostError(f"{what}: Janus no longer knows this session ({reason})", code)
    return JanusRequestError(f"{what}: Janus error {code}: {reason}", code)


class JanusRoomClient:
    """One Janus session over the HTTP API, with keepalives and a long-poll event loop.

    Use ``async with JanusRoomClient(url) as client`` (or :meth:`connect` and
    :meth:`aclose`), attach VideoRoom handles with :meth:`attach`, and read room events
    with :meth:`next_event`.
    """

    def __init__(self, url: str, *, request_timeout: float = 10.0, keepalive_seconds: float = 25.0,
                 transport: httpx.AsyncBaseTransport | None = None, pinned_address: str | None = None) -> None:
        self.url = url.rstrip("/")
        # With a pinned address, requests go to that IP (the one the invite API checked), with
        # the URL's host name in the Host header and, for https, in TLS's SNI and certificate check.
        self._request_url, self._headers, self._extensions = _pinned_request(self.url, pinned_address)
        self.request_timeout = request_timeout
        self.keepalive_seconds = keepalive_seconds
        # The long poll holds a request open up to 30 s on Janus' side; give it room beyond that.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), transport=transport)
        self.session_id: int | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[RoomEvent] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: str | None = None
        self._closed = False

    async def __aenter__(self) -> JanusRoomClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def lost(self) -> str | None:
        """Why the session was lost, or None while it is alive."""
        return self._lost

    async def _post(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        transaction = secrets.token_hex(8)
        body = {**body, "transaction": transaction}
        try:
            reply = await self._http.post(f"{self._request_url}{path}", json=body, headers=self._headers,
                                          extensions=self._extensions)
        except httpx.HTTPError as exc:
            error: type[JanusError] = JanusConnectionLostError if self.session_id else JanusUnreachableError
            raise error(f"{what}: cannot reach Janus at {self.url} ({type(exc).__name__}: {exc})") from None
        if reply.status_code != 200:
            raise JanusUnreachableError(f"{what}: {self.url} answered HTTP {reply.status_code}; is it a Janus API URL?")
        try:
            payload = reply.json()
        except ValueError:
            raise JanusUnreachableError(f"{what}: {self.url} did not answer JSON; is it a Janus API URL?") from None
        if not isinstance(payload, dict) or "janus" not in payload:
            raise JanusUnreachableError(f"{what}: {self.url} did not answer like Janus")
        if payload["janus"] == "error":
            raise _core_error(payload, what)
        return payload

    async def connect(self) -> None:
        """Create the Janus session and start the event loop and keepalives."""
        payload = await self._post("", {"janus": "create"}, "connecting to Janus")
        self.session_id = int(payload["data"]["id"])
        self._lost = None
        self._tasks = [asyncio.create_task(self._poll_events(), name="janus-events"),
                       asyncio.create_task(self._keepalive(), name="janus-keepalive")]
        logger.info("Janus session %s created at %s", self.session_id, self.url)

    async def attach(self) -> VideoRoomHandle:
        """Attach a new VideoRoom plugin handle to the session."""
        payload = await self._session_post({"janus": "attach", "plugin": VIDEOROOM_PLUGIN}, "attaching the VideoRoom")
        return VideoRoomHandle(self, int(payload["data"]["id"]))

    async def next_event(self, timeout: float | None = None) -> RoomEvent | None:
        """The next room event, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None

    async def aclose(self) -> None:
        """Destroy the session (best effort) and stop the background tasks."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.session_id is not None and self._lost is None:
            with contextlib.suppress(JanusError):
                await self._post(f"/{self.session_id}", {"janus": "destroy"}, "destroying the session")
        self._fail_pending(JanusConnectionLostError("the Janus client was closed"))
        await self._http.aclose()

    def _fail_pending(self, error: JanusError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    async def _session_post(self, body: dict[str, Any], what: str, handle_id: int | None = None) -> dict[str, Any]:
        if self.session_id is None:
            raise JanusConnectionLostError(f"{what}: not connected to Janus")
        if self._lost is not None:
            raise JanusConnectionLostError(f"{what}: the Janus session was lost ({self._lost})")
        path = f"/{self.session_id}" + (f"/{handle_id}" if handle_id is not None else "")
        return await self._post(path, body, what)

    async def _handle_message(self, handle_id: int, body: dict[str, Any], jsep: Jsep | None, what: str,
                              *, asynchronous: bool) -> tuple[dict[str, Any], Jsep | None]:
        """Send a plugin message; for asynchronous requests wait for the event with our transaction."""
        request: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            request["jsep"] = jsep.as_json()
        if self.session_id is None or self._lost is not None:
            raise JanusConnectionLostError(f"{what}: the Janus session was lost ({self._lost})")
        transaction = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Registered before the POST: the event can arrive on the long poll before the POST returns.
        self._pending[transaction] = future
        try:
            try:
                reply = await self._http.post(f"{self._request_url}/{self.session_id}/{handle_id}",
                                              headers=self._headers, extensions=self._extensions,
                                              json={**request, "transaction": transaction})
                payload = reply.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise JanusConnectionLostError(f"{what}: cannot reach Janus ({type(exc).__name__}: {exc})") from None
            if payload.get("janus") == "error":
                raise _core_error(payload, what)
            if payload.get("janus") == "success":
                event = payload
            elif asynchronous or payload.get("janus") == "ack":
                event = await asyncio.wait_for(future, self.request_timeout)
            else:
                event = payload
        except TimeoutError:
            raise JanusRequestError(f"{what}: Janus did not answer within {self.request_timeout:g} s") from None
        finally:
            self._pending.pop(transaction, None)
        if event.get("janus") == "error":
            raise _core_error(event, what)
        data = (event.get("plugindata") or {}).get("data") or {}
        if data.get("videoroom") == "event" and "error_code" in data:
            raise _plugin_error(data, what)
        return data, _jsep(event.get("jsep"))

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_seconds)
            try:
                await self._session_post({"janus": "keepalive"}, "keepalive")
            except JanusError as exc:
                self._mark_lost(str(exc))
                return

    def _mark_lost(self, reason: str) -> None:
        if self._lost is not None or self._closed:
            return
        self._lost = reason
        logger.warning("Janus session %s lost: %s", self.session_id, reason)
        self._fail_pending(JanusConnectionLostError(f"the Janus session was lost ({reason})"))
        self._events.put_nowait(ConnectionLost(reason))

    async def _poll_events(self) -> None:
        """Long-poll the session for events until it is lost or the client closes."""
        # Janus holds a long poll for up to 30 s; read timeout above that.
        timeout = httpx.Timeout(self.request_timeout, read=45.0)
        failures = 0
        while not self._closed:
            try:
                reply = await self._http.get(f"{self._request_url}/{self.session_id}", params={"maxev": 10},
                                             timeout=timeout, headers=self._headers, extensions=self._extensions)
                payload = reply.json()
            except (httpx.HTTPError, ValueError) as exc:
                # One retry: a single dropped long poll is not a lost session, two in a row are.
                failures += 1
                if failures >= 2:
                    self._mark_lost(f"event poll failed: {type(exc).__name__}: {exc}".rstrip(": "))
                    return
                await asyncio.sleep(0.5)
                continue
            failures = 0
            events = payload if isinstance(payload, list) else [payload]
            for event in events:
                if event.get("janus") == "error":
                    error = _core_error(event, "event poll")
                    if isinstance(error, JanusConnectionLostError):
                        self._mark_lost(str(error))
                        return
                    logger.warning("Janus error on the event poll: %s", error)
                    continue
                self._dispatch(event)

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("janus")
        transaction = event.get("transaction")
        if transaction in self._pending and kind in ("event", "success"):
            future = self._pending[transaction]
            if not future.done():
                future.set_result(event)
            return
        handle_id = int(event.get("sender") or 0)
        if kind == "hangup":
            self._events.put_nowait(HandleHangup(handle_id, str(event.get("reason") or "hangup")))
            return
        if kind == "timeout":
            self._mark_lost("Janus timed the session out")
            return
        if kind != "event":
            return  # webrtcup, media, slowlink, keepalive, detached: nothing to act on
        data = (event.get("plugindata") or {}).get("data") or {}
        for room_event in self._room_events(handle_id, data, _jsep(event.get("jsep"))):
            self._events.put_nowait(room_event)

    @staticmethod
    def _room_events(handle_id: int, data: dict[str, Any], jsep: Jsep | None) -> list[RoomEvent]:
        """Translate one unsolicited VideoRoom event into typed room events."""
        found: list[RoomEvent] = []
        kind = data.get("videoroom")
        if kind == "destroyed":
            found.append(RoomDestroyed(handle_id, int(data.get("room") or 0)))
            return found
        if kind == "updated" and jsep is not None:
            found.append(SubscriptionRenegotiation(handle_id, jsep, _streams(data.get("streams"))))
            return found
        if data.get("publishers"):
            found.append(PublishersAnnounced(handle_id, _publishers(data["publishers"])))
        for key in ("unpublished", "leaving", "kicked"):
            feed = data.get(key)
            # "ok" means we ourselves left or unpublished.
            if feed is not None and feed != "ok":
                found.append(PublisherGone(handle_id, int(feed), key))
        return found


@dataclass
class VideoRoomHandle:
    """One VideoRoom plugin handle: a publisher, a subscriber, or a room manager."""

    client: JanusRoomClient
    handle_id: int
    subscribed: tuple[SubscribedStream, ...] = field(default=())
    """The subscriber's current streams, as Janus last described them."""

    async def request(self, body: dict[str, Any], what: str) -> dict[str, Any]:
        """A synchronous VideoRoom request (create, destroy, exists, listparticipants)."""
        data, _ = await self.client._handle_message(self.handle_id, body, None, what, asynchronous=False)
        if "error_code" in data:
            raise _plugin_error(data, what)
        return data

    async def create_room(self, room: int, *, pin: str | None = None, description: str = "",
                          publishers: int = 16, secret: str | None = None) -> None:
        """Create a room (VP8 video, no recording); used by tests and demos, not by the bot."""
        body: dict[str, Any] = {"request": "create", "room": room, "description": description or f"room {room}",
                                "publishers": publishers, "videocodec": "vp8", "audiocodec": "opus",
                                "notify_joining": True, "permanent": False}
        if pin:
            body["pin"] = pin
        if secret:
            body["secret"] = secret
        await self.request(body, f"creating room {room}")

    async def destroy_room(self, room: int, *, secret: str | None = None) -> None:
        """Destroy a room: every participant receives ``destroyed``."""
        body: dict[str, Any] = {"request": "destroy", "room": room, "permanent": False}
        if secret:
            body["secret"] = secret
        await self.request(body, f"destroying room {room}")

    async def publisher_ids(self, room: int) -> set[int]:
        """Feed ids of the room's participants that are publishing now (``listparticipants``)."""
        data = await self.request({"request": "listparticipants", "room": room}, f"listing room {room}")
        return {int(entry["id"]) for entry in data.get("participants") or () if entry.get("publisher")}

    async def room_exists(self, room: int) -> bool:
        """Whether the room exists."""
        data = await self.request({"request": "exists", "room": room}, f"checking room {room}")
        return bool(data.get("exists"))

    async def join_as_publisher(self, room: int, display: str, *, pin: str | None = None) -> JoinedRoom:
        """Join a room as a participant (not yet sending media)."""
        body: dict[str, Any] = {"request": "join", "ptype": "publisher", "room": room, "display": display}
        if pin:
            body["pin"] = pin
        data, _ = await self.client._handle_message(self.handle_id, body, None, f"joining room {room}",
                                                    asynchronous=True)
        if data.get("videoroom") != "joined":
            raise JanusRequestError(f"joining room {room}: unexpected answer {data.get('videoroom')!r}")
        return JoinedRoom(room=room, feed_id=int(data["id"]), private_id=int(data.get("private_id") or 0),
                          publishers=_publishers(data.get("publishers")))

    async def publish(self, offer: Jsep, *, display: str | None = None) -> Jsep:
        """Send our media offer (``configure``); returns Janus' answer."""
        body: dict[str, Any] = {"request": "configure"}
        if display is not None:
            body["display"] = display
        _, answer = await self.client._handle_message(self.handle_id, body, offer, "publishing", asynchronous=True)
        if answer is None:
            raise JanusRequestError("publishing: Janus sent no SDP answer")
        return answer

    async def subscribe(self, room: int, feeds: Sequence[tuple[int, str]], *, private_id: int | None = None,
                        pin: str | None = None) -> Jsep:
        """Join as a multistream subscriber to ``(feed_id, mid)`` streams; returns Janus' offer."""
        body: dict[str, Any] = {"request": "join", "ptype": "subscriber", "room": room, "use_msid": False,
                                "streams": [{"feed": feed, "mid": mid} for feed, mid in feeds]}
        if private_id:
            body["private_id"] = private_id
        if pin:
            body["pin"] = pin
        data, offer = await self.client._handle_message(self.handle_id, body, None, f"subscribing in room {room}",
                                                        asynchronous=True)
        if offer is None:
            raise JanusRequestError(f"subscribing in room {room}: Janus sent no SDP offer")
        self.subscribed = _streams(data.get("streams"))
        return offer

    async def start(self, answer: Jsep) -> None:
        """Send the subscriber's SDP answer so that media starts flowing."""
        await self.client._handle_message(self.handle_id, {"request": "start"}, answer, "starting the subscription",
                                          asynchronous=True)

    async def update(self, *, subscribe: Sequence[tuple[int, str]] = (),
                     unsubscribe: Sequence[int] = ()) -> Jsep | None:
        """Add or drop feeds of a multistream subscription; returns the new offer (None when nothing changed)."""
        body: dict[str, Any] = {"request": "update"}
        if subscribe:
            body["subscribe"] = [{"feed": feed, "mid": mid} for feed, mid in subscribe]
        if unsubscribe:
            body["unsubscribe"] = [{"feed": feed} for feed in unsubscribe]
        data, offer = await self.client._handle_message(self.handle_id, body, None, "updating the subscription",
                                                        asynchronous=True)
        if data.get("streams") is not None:
            self.subscribed = _streams(data.get("streams"))
        return offer

    async def leave(self) -> None:
        """Leave the room (best effort: the session may already be gone)."""
        with contextlib.suppress(JanusError):
            await self.client._handle_message(self.handle_id, {"request": "leave"}, None, "leaving",
                                              asynchronous=True)

    def feed_for_mid(self, mid: str) -> SubscribedStream | None:
        """The subscribed stream that arrives on ``mid``."""
        for stream in self.subscribed:
            if stream.mid == mid:
                return stream
        return None


def rtc_configuration() -> Any:
    """The aiortc configuration: no STUN servers (no public network); host candidates suffice for an SFU."""
    from aiortc import RTCConfiguration

    return RTCConfiguration(iceServers=[])


@dataclass
class PublishedFeed:
    """A participant publishing media in a room: its handle, peer connection and room state at join."""

    handle: VideoRoomHandle
    peer: RTCPeerConnection
    joined: JoinedRoom

    async def close(self) -> None:
        """Leave the room and close the peer connection."""
        await self.handle.leave()
        await self.peer.close()


async def publish_tracks(client: JanusRoomClient, room: int, display: str, tracks: Sequence[MediaStreamTrack],
                         *, pin: str | None = None) -> PublishedFeed:
    """Join ``room`` as ``display`` and publish ``tracks`` over a new aiortc peer connection."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    handle = await client.attach()
    joined = await handle.join_as_publisher(room, display, pin=pin)
    peer = RTCPeerConnection(rtc_configuration())
    try:
        for track in tracks:
            peer.addTransceiver(track, direction="sendonly")
        # aiortc has no trickle ICE: setLocalDescription returns once gathering is complete.
        await peer.setLocalDescription(await peer.createOffer())
        local = peer.localDescription
        answer = await handle.publish(Jsep(type=local.type, sdp=local.sdp))
        await peer.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type=answer.type))
    except BaseException:
        await peer.close()
        await handle.leave()
        raise
    return PublishedFeed(handle=handle, peer=peer, joined=joined)
