"""The meeting bot: joins a Janus VideoRoom, analyses the consenting participants, leaves, finalises.

Lifecycle (``MeetingState``): ``joining`` → ``live`` ⇄ ``reconnecting`` → ``ending`` →
``ended``; or ``failed`` when the first join does not succeed (unreachable server, no
such room, wrong PIN) or the analysis cannot start. The bot

- joins as a publisher with a visible display name and publishes the card
  (:mod:`bot.card`) that says the meeting is being analysed;
- subscribes, on one multistream subscriber handle, to the video of every publisher the
  session's consent policy allows (excluded participants are never subscribed to), and
  hands each feed to the :class:`~bot.live.LiveSession` under the participant's display
  name; later joiners are added with ``update``;
- notices leaves by the room's events; a participant whose video stops while they are
  still in the room is kept: their receiver is restarted (buffer dropped, keyframe
  asked for) after ``bot_stall_seconds``, every feed is subscribed again after
  ``bot_frame_timeout_seconds``, the silence is recorded as a gap of their stream, and
  they are dropped only when the room's participant list no longer shows them after
  ``bot_absent_seconds``;
- after a transport error or a Janus restart rejoins and resubscribes, recording the
  gap on the class clock;
- ends when the host stops it, the room is destroyed, nobody has published for
  ``bot_idle_timeout_seconds``, or after ``bot_max_duration_seconds``; then finalises the
  session (every dispatched crop accounted for) and calls :func:`after_session`.

Platform-specific signalling lives in :mod:`bot.janus`; another meeting platform would
provide its own room client with the same events (publishers announced/gone, room
destroyed, connection lost) and reuse this lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from bot.janus import (
    VIDEOROOM_NO_SUCH_FEED,
    ConnectionLost,
    HandleHangup,
    JanusConnectionLostError,
    JanusError,
    JanusRequestError,
    JanusRoomClient,
    JanusRoomNotFoundError,
    JanusUnauthorizedError,
    JanusUnreachableError,
    Jsep,
    PublishedFeed,
    PublisherGone,
    PublishersAnnounced,
    RemotePublisher,
    RoomDestroyed,
    RoomEvent,
    SubscriptionRenegotiation,
    VideoRoomHandle,
    publish_tracks,
    rtc_configuration,
)
from bot.receive_buffers import enlarge_receive_buffers
from bot.rtp_recovery import restart_video_receiver
from kernel.consent import ConsentPolicy
from kernel.settings import Settings
from kernel.store import Analysis, AnalysisStatus, ConsentMode, MeetingState, session_scope

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

    from bot.live import LiveOutcome, LiveSession, LiveStats
    from pipeline.models import PipelineComponents
    from reports.render import ReportPaths
    from workers.dispatch import CropDispatcher

logger = logging.getLogger(__name__)

#: How often the lifecycle loop wakes up without events to check timeouts (seconds).
_TICK_SECONDS = 0.5
#: Longest wait between two reconnection attempts (seconds).
_MAX_RECONNECT_WAIT = 10.0


@dataclass(frozen=True)
class MeetingTarget:
    """Where the bot goes: a Janus server, a room, its PIN, and the name the bot shows."""

    janus_url: str
    room: int
    pin: str | None
    display_name: str
    pinned_address: str | None = None
    """The checked IP address to connect to (the invite API pins it); None resolves the URL's host."""
    detailed_errors: bool = True
    """Whether join errors may say how the server answered (the operator's CLI), or only that it
    could not be joined (the invite API: a teacher must not learn what the server can reach)."""

    def __repr__(self) -> str:
        # The PIN is a credential: keep it out of logs and tracebacks.
        return f"MeetingTarget(janus_url={self.janus_url!r}, room={self.room}, display_name={self.display_name!r})"


@dataclass(frozen=True)
class MeetingStatus:
    """A snapshot of the bot, for the status line and the invite API."""

    state: MeetingState
    detail: str
    """What it is doing, or why it ended or failed (one line)."""
    participants: tuple[str, ...]
    """Display names of the participants being analysed now."""
    excluded: int
    """Publishers the consent policy kept out."""
    students_live: int
    """Students (tracks seen in at least two samples) so far."""
    frames_sampled: int
    """Frames analysed so far over every participant."""
    gaps: int
    """Reconnections so far (each recorded as a gap)."""
    crops_submitted: int
    """Face crops handed to inference so far."""
    crops_stored: int
    """Face crops whose results are in the store."""


@dataclass(frozen=True)
class MeetingOutcome:
    """How the bot's time in the meeting ended."""

    analysis_id: int
    state: MeetingState
    """``ended`` or ``failed``."""
    detail: str
    """Why it ended or failed."""
    live: LiveOutcome | None
    """The live session's outcome (None when it never started)."""
    report_dir: str | None
    """Folder of the rendered reports, when there are some."""


def after_session(settings: Settings, engine: Engine, analysis_id: int) -> ReportPaths:
    """The report step after a finalised session: render the reports, then email the host.

    Blocking; call it in a thread from async code. The report folder is recorded on the
    analysis before any mail is tried, and a mail failure is recorded on the session
    (``classlens report ID --email`` sends it again), so a report is never lost to mail.
    """
    from reports.delivery import deliver_after_session

    result = deliver_after_session(settings, engine, analysis_id)
    if result.email_detail and result.recipient:
        logger.warning("session %d: the email to the host was not sent: %s", analysis_id, result.email_detail)
    return result.report


def consent_note(policy: ConsentPolicy) -> str:
    """The consent line of the card, in words participants understand."""
    if policy.mode is ConsentMode.opt_in:
        return "Only participants who opted in are analysed."
    if policy.mode is ConsentMode.opt_out:
        return "Participants who opted out are never analysed; ask your teacher to be added to the list."
    return "Ask your teacher if you do not want to be analysed."


@dataclass
class _FeedWatch:
    """How one analysed feed is doing: when it was subscribed, and when the bot last tried to revive it."""

    participant_id: str
    """The participant id handed to the live session."""
    receiver: Any
    """The aiortc receiver its video arrives on."""
    subscribed_at: float
    """time.monotonic() of the (re)subscription: silence before the first frame counts from here."""
    last_restart: float = 0.0
    """time.monotonic() of the latest receiver restart."""
    last_roll_call: float = 0.0
    """time.monotonic() the room's participant list was last asked about this feed."""


class _Connection:
    """Everything one join of the room holds: the Janus session, our published card, the subscription."""

    def __init__(self, client: JanusRoomClient) -> None:
        self.client = client
        self.card: PublishedFeed | None = None
        self.subscriber: VideoRoomHandle | None = None
        self.subscriber_peer: RTCPeerConnection | None = None
        self.private_id = 0
        self.renegotiation = asyncio.Lock()

    async def close(self) -> None:
        """Leave the room and close every peer connection; never raises."""
        for closer in (self._close_subscriber, self._close_card, self.client.aclose):
            with contextlib.suppress(Exception):
                await closer()

    async def _close_subscriber(self) -> None:
        if self.subscriber is not None and self.client.lost is None:
            await self.subscriber.leave()
        if self.subscriber_peer is not None:
            await self.subscriber_peer.close()

    async def _close_card(self) -> None:
        if self.card is not None:
            if self.client.lost is None:
                await self.card.handle.leave()
            await self.card.peer.close()


class MeetingBot:
    """One bot in one meeting, filling one live session. Run it with :meth:`run`; stop it with :meth:`stop`."""

    def __init__(self, settings: Settings, engine: Engine, analysis_id: int, target: MeetingTarget, *,
                 components: PipelineComponents | None = None, dispatcher: CropDispatcher | None = None,
                 on_status: Callable[[MeetingStatus], None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.analysis_id = analysis_id
        self.target = target
        self._components = components
        self._dispatcher = dispatcher
        self._on_status = on_status
        self._state = MeetingState.joining
        self._detail = "connecting to the meeting server"
        self._stop_reason: str | None = None
        self._stop_event = asyncio.Event()
        self._live: LiveSession | None = None
        self._consent = ConsentPolicy.everyone()
        self._connection: _Connection | None = None
        # feed id → publisher, for every publisher in the room (analysed or not).
        self._publishers: dict[int, RemotePublisher] = {}
        # feed id → participant id handed to the live session (analysed feeds only).
        self._analysed: dict[int, str] = {}
        # feed id → its watch (analysed feeds only).
        self._watch: dict[int, _FeedWatch] = {}
        # Feeds between being dropped and subscribed again by a resubscription: still participants.
        self._resubscribing: set[int] = set()
        # feed id → class time its video went silent (kept through resubscriptions, for the gap).
        self._silent_since: dict[int, float] = {}
        # feed id → display name of feeds that stopped being analysed, to correct their leave reason.
        self._departed: dict[int, str] = {}
        self._last_resubscribe = 0.0
        self._excluded: set[int] = set()
        self.outcome: MeetingOutcome | None = None
        """How the bot's time in the meeting ended, once it has (also when :meth:`run` was cancelled)."""
        self._gaps = 0
        self._joined_at = 0.0
        self._last_publishing = 0.0

    # --- status ------------------------------------------------------------------------------

    @property
    def status(self) -> MeetingStatus:
        """What the bot is doing now."""
        stats = self._live.stats if self._live is not None else None
        names = tuple(sorted(self._publishers[feed].display for feed in {*self._analysed, *self._resubscribing}
                             if feed in self._publishers))
        return MeetingStatus(
            state=self._state, detail=self._detail, participants=names, excluded=len(self._excluded),
            students_live=stats.students_live if stats else 0, frames_sampled=stats.frames_sampled if stats else 0,
            gaps=self._gaps, crops_submitted=stats.crops_submitted if stats else 0,
            crops_stored=stats.crops_stored if stats else 0)

    @property
    def live_stats(self) -> LiveStats | None:
        """The live session's counters (per participant, latencies), None before the analysis started."""
        return self._live.stats if self._live is not None else None

    def _set_state(self, state: MeetingState, detail: str) -> None:
        self._state, self._detail = state, detail
        logger.info("meeting %d: %s (%s)", self.analysis_id, state.value, detail)
        self._report()

    def _report(self) -> None:
        if self._on_status is not None:
            try:
                self._on_status(self.status)
            except Exception:
                logger.exception("meeting %d: the status callback failed", self.analysis_id)

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop_event.is_set()

    def stop(self, reason: str = "stopped by the host") -> None:
        """Ask the bot to leave the meeting and finalise the session (returns at once)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop_event.set()

    # --- the lifecycle -----------------------------------------------------------------------

    async def run(self) -> MeetingOutcome:
        """Join, analyse until an end condition, leave and finalise. Never raises for meeting problems.

        Cancelling the task that runs this leaves the meeting and finalises the session
        too (then re-raises the cancellation).
        """
        from bot.live import LiveSession

        self._set_state(MeetingState.joining, "starting the analysis")
        self._consent = await asyncio.to_thread(self._load_consent)
        self._live = LiveSession(self.settings, self.engine, self.analysis_id, components=self._components,
                                 dispatcher=self._dispatcher)
        try:
            await self._live.start()
        except Exception as exc:
            return await self._fail(f"the analysis could not start: {_one_line(exc)}", live_started=False)
        self._set_state(MeetingState.joining, f"joining room {self.target.room} at {self.target.janus_url}")
        try:
            self._connection = await self._join()
        except JanusError as exc:
            if not self.target.detailed_errors:
                logger.warning("meeting %d: joining %s failed: %s", self.analysis_id, self.target.janus_url, exc)
            return await self._fail(describe_join_error(exc, detailed=self.target.detailed_errors))
        except asyncio.CancelledError:
            await self._fail("cancelled while joining")
            raise
        self._joined_at = self._last_publishing = time.monotonic()
        self._set_state(MeetingState.live, self._live_detail())
        try:
            reason = await self._live_loop()
        except asyncio.CancelledError:
            await self._finish("the bot was shut down")
            raise
        except Exception as exc:
            logger.exception("meeting %d: the bot failed", self.analysis_id)
            await self._finish(f"the bot failed: {_one_line(exc)}")
            raise
        return await self._finish(reason)

    def _load_consent(self) -> ConsentPolicy:
        with session_scope(self.engine) as session:
            analysis = session.get(Analysis, self.analysis_id)
            if analysis is None:
                return ConsentPolicy.everyone()
            return ConsentPolicy.from_store(analysis.consent_mode, analysis.consent_names_json)

    def _live_detail(self) -> str:
        stats = self._live.stats if self._live is not None else None
        students = stats.students_live if stats else 0
        return f"live with {students} student{'s' if students != 1 else ''} in {len(self._analysed)} feed" \
               f"{'s' if len(self._analysed) != 1 else ''}"

    async def _fail(self, reason: str, *, live_started: bool = True) -> MeetingOutcome:
        """The first join did not succeed: record why, on the session too."""
        if self._connection is not None:
            await self._connection.close()
        # LiveSession.start records its own failure; after a successful start, fail() records ours.
        if self._live is not None and live_started:
            await self._live.fail(reason)
        self._set_state(MeetingState.failed, reason)
        self.outcome = MeetingOutcome(self.analysis_id, MeetingState.failed, reason, None, None)
        return self.outcome

    async def _finish(self, reason: str) -> MeetingOutcome:
        """Leave, finalise the live session, run the report step.

        Cancelled on the way (a second Ctrl-C), it still leaves the session finalised:
        failed with the reason, unless the live session got to write its results first.
        """
        try:
            return await self._leave_and_finalise(reason)
        except asyncio.CancelledError:
            if self.outcome is None:
                assert self._live is not None
                live_outcome = self._live.outcome
                if live_outcome is not None and live_outcome.status is AnalysisStatus.done:
                    # The numbers are stored; only the report step was cut short (`classlens report` redoes it).
                    ended = f"{reason}; interrupted before the reports were written"
                    self._set_state(MeetingState.ended, ended)
                    self.outcome = MeetingOutcome(self.analysis_id, MeetingState.ended, ended, live_outcome, None)
                else:
                    failure = f"interrupted while finalising the session ({reason})"
                    await self._live.fail(failure)
                    self._set_state(MeetingState.failed, failure)
                    self.outcome = MeetingOutcome(self.analysis_id, MeetingState.failed, failure, live_outcome,
                                                  None)
            raise

    async def _leave_and_finalise(self, reason: str) -> MeetingOutcome:
        self._set_state(MeetingState.ending, reason)
        # Before the connection closes: its tracks would end first and record the wrong reason.
        for feed in list(self._analysed):
            self._stop_analysing(feed, "the session ended")
        if self._connection is not None:
            connection, self._connection = self._connection, None
            # Bounded: a meeting server that stopped answering must not keep the reports waiting.
            try:
                await asyncio.wait_for(connection.close(), 2 * self.settings.bot_request_timeout_seconds)
            except TimeoutError:
                logger.warning("meeting %d: leaving the room timed out; closing anyway", self.analysis_id)
        assert self._live is not None
        outcome = await self._live.aclose()
        report_dir: str | None = None
        if outcome.status is AnalysisStatus.done:
            try:
                paths = await asyncio.to_thread(after_session, self.settings, self.engine, self.analysis_id)
                report_dir = str(paths.folder)
            except Exception as exc:
                # The session's numbers are safe in the store; the reports can be rendered again later.
                logger.exception("meeting %d: the report step failed", self.analysis_id)
                reason = f"{reason}; the report step failed: {_one_line(exc)}"
            self._analysed.clear()
            self._set_state(MeetingState.ended, reason)
            self.outcome = MeetingOutcome(self.analysis_id, MeetingState.ended, reason, outcome, report_dir)
            return self.outcome
        failure = outcome.failure_reason or "the session could not be finalised"
        self._set_state(MeetingState.failed, failure)
        self.outcome = MeetingOutcome(self.analysis_id, MeetingState.failed, failure, outcome, None)
        return self.outcome

    async def _live_loop(self) -> str:
        """Handle room events and timeouts until an end condition; returns why the bot leaves."""
        settings = self.settings
        last_report = 0.0
        while True:
            if self._stop_event.is_set():
                return self._stop_reason or "stopped by the host"
            now = time.monotonic()
            if now - self._joined_at >= settings.bot_max_duration_seconds:
                return f"reached the maximum duration of {settings.bot_max_duration_seconds:g} s"
            if self._publishers:
                self._last_publishing = now
            elif now - self._last_publishing >= settings.bot_idle_timeout_seconds:
                return f"nobody published video for {settings.bot_idle_timeout_seconds:g} s"
            assert self._connection is not None
            event = await self._next_event(self._connection)
            if event is not None:
                ended = await self._handle(event)
                if ended is not None:
                    return ended
            ended = await self._check_silent_feeds()
            if ended is not None:
                return ended
            if now - last_report >= 1.0:
                last_report = now
                if self._state is MeetingState.live:
                    self._detail = self._live_detail()
                self._report()

    async def _next_event(self, connection: _Connection) -> RoomEvent | None:
        """The next room event, or None after a tick; a stop request wakes it early."""
        stop = asyncio.ensure_future(self._stop_event.wait())
        event = asyncio.ensure_future(connection.client.next_event(_TICK_SECONDS))
        try:
            done, _ = await asyncio.wait({stop, event}, return_when=asyncio.FIRST_COMPLETED)
            return event.result() if event in done else None
        finally:
            for future in (stop, event):
                if not future.done():
                    future.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await future

    async def _handle(self, event: RoomEvent) -> str | None:
        """React to one room event; returns a reason to leave, or None."""
        connection = self._connection
        assert connection is not None
        if isinstance(event, RoomDestroyed):
            return "the meeting room was destroyed"
        if isinstance(event, ConnectionLost):
            return await self._reconnect(event.reason)
        if isinstance(event, HandleHangup):
            own = {connection.subscriber.handle_id if connection.subscriber else None,
                   connection.card.handle.handle_id if connection.card else None}
            if event.handle_id in own:
                return await self._reconnect(f"the media connection was closed ({event.reason})")
            return None
        try:
            if isinstance(event, PublishersAnnounced):
                await self._subscribe_to(connection, event.publishers)
            elif isinstance(event, PublisherGone):
                await self._publisher_gone(connection, event.feed_id, event.reason)
            elif isinstance(event, SubscriptionRenegotiation):
                await self._answer(connection, event.jsep)
        except JanusConnectionLostError as exc:
            return await self._reconnect(str(exc))
        except JanusRoomNotFoundError:
            return "the meeting room was destroyed"
        return None

    # --- joining and subscribing ---------------------------------------------------------------

    async def _join(self) -> _Connection:
        """Connect, join as a visible publisher with the card, subscribe to everyone allowed."""
        from bot.card import MeetingCardTrack, card_lines

        settings = self.settings
        client = JanusRoomClient(self.target.janus_url, request_timeout=settings.bot_request_timeout_seconds,
                                 keepalive_seconds=settings.bot_keepalive_seconds,
                                 pinned_address=self.target.pinned_address)
        connection = _Connection(client)
        try:
            await client.connect()
            card = MeetingCardTrack(card_lines(self.target.display_name, consent_note(self._consent)))
            connection.card = await publish_tracks(client, self.target.room, self.target.display_name, [card],
                                                   pin=self.target.pin)
            connection.private_id = connection.card.joined.private_id
            await self._subscribe_to(connection, connection.card.joined.publishers)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _subscribe_to(self, connection: _Connection, publishers: tuple[RemotePublisher, ...]) -> None:
        """Subscribe to the video of the publishers the consent policy allows; note the others."""
        wanted: list[tuple[int, str]] = []
        for publisher in publishers:
            self._publishers[publisher.feed_id] = publisher
            if publisher.feed_id in self._analysed:
                continue
            if not self._consent.allows(publisher.display):
                if publisher.feed_id not in self._excluded:
                    self._excluded.add(publisher.feed_id)
                    logger.info("meeting %d: not subscribing to %r (consent: %s)", self.analysis_id,
                                publisher.display, self._consent.mode.value)
                continue
            wanted.extend((publisher.feed_id, mid) for mid in publisher.video_mids[:1])
        if not wanted:
            return
        async with connection.renegotiation:
            if connection.subscriber is None:
                subscriber = await connection.client.attach()
                offer = await subscriber.subscribe(self.target.room, wanted, private_id=connection.private_id,
                                                   pin=self.target.pin)
                connection.subscriber = subscriber
                connection.subscriber_peer = _new_peer()
            else:
                renegotiated = await connection.subscriber.update(subscribe=wanted)
                if renegotiated is None:
                    return
                offer = renegotiated
            await self._answer_locked(connection, offer)

    async def _answer(self, connection: _Connection, offer: Jsep) -> None:
        async with connection.renegotiation:
            await self._answer_locked(connection, offer)

    async def _answer_locked(self, connection: _Connection, offer: Jsep) -> None:
        """Answer Janus' offer on the subscriber peer, then hand new feeds to the live session."""
        from aiortc import RTCSessionDescription

        peer, subscriber = connection.subscriber_peer, connection.subscriber
        assert peer is not None and subscriber is not None
        await peer.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type=offer.type))
        await peer.setLocalDescription(await peer.createAnswer())
        enlarge_receive_buffers(peer, self.settings.bot_receive_buffer_bytes)
        local = peer.localDescription
        await subscriber.start(Jsep(type=local.type, sdp=local.sdp))
        self._reconcile_tracks(peer, subscriber)

    def _reconcile_tracks(self, peer: RTCPeerConnection, subscriber: VideoRoomHandle) -> None:
        """Map the subscriber's m-lines to feeds; start analysing feeds that are new on an m-line.

        Janus recycles m-lines of feeds that left, and aiortc then keeps the receiver's
        track object, so the mapping is rebuilt from Janus' stream list after every
        negotiation instead of relying on aiortc's ``track`` event.
        """
        assert self._live is not None
        carried: set[int] = set()
        for transceiver in peer.getTransceivers():
            stream = subscriber.feed_for_mid(str(transceiver.mid))
            if stream is None or not stream.active or stream.feed_id is None or stream.kind != "video":
                continue
            feed = stream.feed_id
            carried.add(feed)
            if feed in self._analysed:
                continue
            publisher = self._publishers.get(feed)
            display = publisher.display if publisher else stream.feed_display
            participant_id = f"feed-{feed}"
            if self._live.add_participant(participant_id, display, transceiver.receiver.track):
                self._analysed[feed] = participant_id
                self._watch[feed] = _FeedWatch(participant_id, transceiver.receiver, time.monotonic())
                self._departed.pop(feed, None)
                logger.info("meeting %d: analysing %r (feed %d)", self.analysis_id, display, feed)
            else:
                self._excluded.add(feed)
        for feed in [f for f in self._analysed if f not in carried]:
            # Janus drops the streams of a feed that unpublished; its "unpublished" event may come later.
            self._stop_analysing(feed, "left the meeting (their video ended)")

    def _stop_analysing(self, feed: int, reason: str) -> None:
        participant_id = self._analysed.pop(feed, None)
        self._watch.pop(feed, None)
        if participant_id is not None and self._live is not None:
            self._live.remove_participant(participant_id, reason)
            publisher = self._publishers.get(feed)
            if publisher is not None:
                self._departed[feed] = publisher.display

    async def _publisher_gone(self, connection: _Connection, feed: int, reason: str) -> None:
        """A publisher unpublished or left: stop analysing it and drop it from the subscription."""
        self._publishers.pop(feed, None)
        self._excluded.discard(feed)
        self._silent_since.pop(feed, None)
        departed = self._departed.pop(feed, None)
        if feed not in self._analysed:
            if departed is not None and self._live is not None:
                # Its streams were dropped first (Janus renegotiated before announcing the leave).
                self._live.set_left_reason(departed, f"left the meeting ({reason})")
            return
        self._stop_analysing(feed, f"left the meeting ({reason})")
        self._departed.pop(feed, None)
        # Janus drops the streams of a feed that left on its own and renegotiates if needed;
        # an explicit unsubscribe of a feed it already dropped answers "no such feed", which is fine.
        if connection.subscriber is not None:
            with contextlib.suppress(JanusError):
                async with connection.renegotiation:
                    offer = await connection.subscriber.update(unsubscribe=[feed])
                    if offer is not None:
                        await self._answer_locked(connection, offer)

    async def _check_silent_feeds(self) -> str | None:
        """Revive feeds whose video stopped while their publisher is still in the room; returns a reason to leave.

        Restart the receiver after ``bot_stall_seconds``; subscribe to everything again
        after ``bot_frame_timeout_seconds``; drop the feed only when, after
        ``bot_absent_seconds``, the room's participant list no longer shows it. When video
        comes back, the silence is recorded as a gap of that participant's stream.
        """
        live, connection = self._live, self._connection
        if live is None or connection is None:
            return None
        settings = self.settings
        now = time.monotonic()
        resubscribe = False
        for feed, watch in list(self._watch.items()):
            since_frame = live.seconds_since_last_frame(watch.participant_id)
            if since_frame is not None and since_frame < settings.bot_stall_seconds:
                started = self._silent_since.pop(feed, None)
                if started is not None:
                    end = live.class_time() - since_frame
                    live.record_gap(started, end, "no video: the feed stalled and was restarted",
                                    participant_id=watch.participant_id)
                    logger.info("meeting %d: feed %d is back after %.1f s without video", self.analysis_id, feed,
                                end - started)
                continue
            silent = since_frame if since_frame is not None else now - watch.subscribed_at
            if silent < settings.bot_stall_seconds:
                continue  # just subscribed: the first frame is on its way
            if feed not in self._silent_since:
                self._silent_since[feed] = live.class_time() - silent
                logger.warning("meeting %d: no video from feed %d for %.0f s; restarting its receiver",
                               self.analysis_id, feed, silent)
            if now - watch.last_restart >= settings.bot_stall_seconds:
                watch.last_restart = now
                await restart_video_receiver(watch.receiver)
            if silent >= settings.bot_frame_timeout_seconds:
                resubscribe = True
            absent = live.class_time() - self._silent_since[feed]
            roll_call_due = now - watch.last_roll_call >= settings.bot_frame_timeout_seconds
            if absent >= settings.bot_absent_seconds and roll_call_due:
                watch.last_roll_call = now
                if not await self._still_publishing(connection, feed):
                    await self._publisher_gone(connection, feed, "no longer in the room's participant list")
        if resubscribe and now - self._last_resubscribe >= settings.bot_frame_timeout_seconds:
            self._last_resubscribe = now
            try:
                await self._resubscribe(connection)
            except JanusConnectionLostError as exc:
                return await self._reconnect(str(exc))
            except JanusRoomNotFoundError:
                return "the meeting room was destroyed"
        return None

    async def _still_publishing(self, connection: _Connection, feed: int) -> bool:
        """Whether the room's participant list shows ``feed`` publishing; True when the list cannot be had."""
        if connection.card is None:
            return True
        try:
            return feed in await connection.card.handle.publisher_ids(self.target.room)
        except JanusError as exc:
            logger.warning("meeting %d: cannot list the room's participants: %s", self.analysis_id, exc)
            return True

    async def _resubscribe(self, connection: _Connection) -> None:
        """Drop the subscriber handle and its peer connection, then subscribe to every allowed publisher again.

        The participants' streams continue under their display names; only the transport
        is new, so whatever state a receiver was stuck in is gone.
        """
        logger.warning("meeting %d: subscribing to every feed again", self.analysis_id)
        try:
            async with connection.renegotiation:
                subscriber, peer = connection.subscriber, connection.subscriber_peer
                connection.subscriber = connection.subscriber_peer = None
                self._resubscribing = set(self._analysed)
                for feed in list(self._analysed):
                    self._stop_analysing(feed, "resubscribing after its video stalled")
                    self._departed.pop(feed, None)
                if subscriber is not None:
                    await subscriber.leave()
                if peer is not None:
                    with contextlib.suppress(Exception):
                        await peer.close()
            try:
                await self._subscribe_to(connection, tuple(self._publishers.values()))
            except JanusRequestError as exc:
                if exc.code != VIDEOROOM_NO_SUCH_FEED:
                    raise
                # Someone left between the last roll call and this subscription: ask the room who is
                # still there, let the others go, and subscribe to those who stayed.
                await self._drop_publishers_not_in_room(connection)
                await self._subscribe_to(connection, tuple(self._publishers.values()))
        finally:
            self._resubscribing.clear()

    async def _drop_publishers_not_in_room(self, connection: _Connection) -> None:
        """Forget the publishers the room's participant list no longer shows (they left)."""
        if connection.card is None:
            return
        present = await connection.card.handle.publisher_ids(self.target.room)
        for feed, publisher in list(self._publishers.items()):
            if feed not in present:
                self._departed[feed] = publisher.display  # its stream's leave reason becomes "left the meeting"
                await self._publisher_gone(connection, feed, "no longer in the room's participant list")

    # --- reconnection ------------------------------------------------------------------------

    async def _reconnect(self, reason: str) -> str | None:
        """Rejoin after the connection was lost; records the gap. Returns a reason to leave when it gives up."""
        assert self._live is not None
        gap_start = self._live.class_time()
        self._set_state(MeetingState.reconnecting, f"connection lost ({reason}); rejoining")
        for feed in list(self._analysed):
            self._stop_analysing(feed, "the connection to the meeting server was lost")
        self._publishers.clear()
        self._excluded.clear()
        self._departed.clear()
        self._silent_since.clear()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        attempts = self.settings.bot_reconnect_attempts
        last_error = reason
        for attempt in range(1, attempts + 1):
            wait = min(_MAX_RECONNECT_WAIT, 2.0 ** (attempt - 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), wait)
            if self._stop_event.is_set():
                self._live.record_gap(gap_start, self._live.class_time(), f"reconnecting: {reason}")
                self._gaps += 1
                return self._stop_reason or "stopped by the host"
            try:
                self._connection = await self._join()
            except (JanusError, OSError) as exc:
                last_error = str(exc)
                logger.warning("meeting %d: rejoin attempt %d of %d failed: %s", self.analysis_id, attempt,
                               attempts, last_error)
                continue
            gap_end = self._live.class_time()
            self._live.record_gap(gap_start, gap_end, f"reconnected after: {reason}")
            self._gaps += 1
            self._last_publishing = time.monotonic()
            logger.warning("meeting %d: rejoined after %.1f s without the meeting", self.analysis_id,
                           gap_end - gap_start)
            self._set_state(MeetingState.live, self._live_detail())
            return None
        self._live.record_gap(gap_start, self._live.class_time(), f"connection lost: {reason}")
        self._gaps += 1
        return f"lost the connection to the meeting server and could not rejoin ({last_error})"


def _new_peer() -> RTCPeerConnection:
    from aiortc import RTCPeerConnection

    return RTCPeerConnection(rtc_configuration())


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0]


def describe_join_error(exc: JanusError, *, detailed: bool = True) -> str:
    """A user-facing hint for an error of the first join (used by the CLI and the API).

    Not ``detailed`` (the invite API), a server that could not be reached, or that did not
    answer like Janus, gets one message whatever happened: telling a closed port from an
    HTTP error would make the API a scanner of the server's network.
    """
    if not detailed and isinstance(exc, JanusUnreachableError | JanusConnectionLostError):
        return ("could not join: no Janus API answered at this URL. Check the URL (it ends in /janus) "
                "and that the server is running.")
    if isinstance(exc, JanusUnreachableError):
        return f"{exc}. Check the URL (it ends in /janus) and that the server is running."
    if isinstance(exc, JanusRoomNotFoundError):
        return f"{exc}. Check the room number."
    if isinstance(exc, JanusUnauthorizedError):
        return f"{exc}. Check the PIN."
    return str(exc)
