"""The invite API: a teacher sends the bot into a meeting, follows it, and sends it away.

``POST /api/meetings`` creates the session (an ``Analysis`` of kind ``meeting``) and a
``Meeting`` row, starts a :class:`~bot.meeting.MeetingBot` as an asyncio task of the
serve process, and waits until the join succeeded or failed so that a bad URL, a room
that does not exist or a wrong PIN is a clear error right away. ``GET
/api/meetings/{id}`` shows the state (joining, live with N students, ended, failed with
the reason); ``DELETE /api/meetings/{id}`` makes the bot leave and finalise.

The room PIN is a credential of the meeting: it is passed to the running bot in memory
and never stored or returned. A bot cannot outlive the serve process anyway (its media
connections live in it), so a stored PIN would buy nothing: after a restart, meetings
that were running are marked failed and the teacher invites the bot again.

The web app provides authentication: :func:`meetings_router` takes the dependency
that resolves the current :class:`~kernel.store.User`, and the registry is found at
``app.state.meeting_registry``.
"""

# No ``from __future__ import annotations``: FastAPI must see the route signatures' real
# types, and the dependency aliases are local to the router factory.
import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import Engine
from sqlmodel import col, select

from bot.live import SharedComponents
from bot.meeting import MeetingBot, MeetingOutcome, MeetingStatus, MeetingTarget
from kernel.consent import ConsentPolicy
from kernel.errors import BadInputError
from kernel.settings import Settings
from kernel.store import (
    Analysis,
    AnalysisStatus,
    ConsentMode,
    Meeting,
    MeetingState,
    User,
    UserRole,
    is_row_id,
    session_scope,
    utcnow,
)
from pipeline.models import PipelineComponents

logger = logging.getLogger(__name__)

#: States in which a bot is (or should be) running.
ACTIVE_STATES = (MeetingState.joining, MeetingState.live, MeetingState.reconnecting, MeetingState.ending)


#: Longest participant display name taken on a consent list (meeting platforms cap names well below it).
MAX_DISPLAY_NAME_CHARS = 200


class InviteRefusedError(BadInputError):
    """The invite asks for something this user may not have (another person's email as host)."""


def allowed_host_email(requested: str | None, owner: User, allowed: list[str]) -> str:
    """Where the after-class email goes: the owner's own address, or one ``invite_allowed_host_emails`` allows.

    An entry of ``allowed`` is a whole address or an ``@domain`` suffix; case is ignored.
    Anything else raises :class:`InviteRefusedError`, so that the invite API cannot be used
    to mail class reports to an outside address.
    """
    if requested is None or not requested.strip():
        return owner.email
    address = requested.strip().lower()
    if address == owner.email.lower():
        return address
    for entry in (item.strip().lower() for item in allowed):
        if entry and (address == entry or (entry.startswith("@") and address.endswith(entry))):
            return address
    raise InviteRefusedError("host_email may only be your own address or one the admin allowed "
                             "(setting invite_allowed_host_emails)")


class MeetingInvite(BaseModel):
    """What a host sends to invite the bot."""

    model_config = {"extra": "forbid"}

    janus_url: str = Field(max_length=2048,
                           description="URL of the Janus HTTP API, e.g. https://meet.example.edu/janus.")
    room: int = Field(ge=1, description="The VideoRoom room number.")
    pin: str | None = Field(default=None, max_length=200, description="The room's PIN, if it has one; never stored.")
    display_name: str | None = Field(default=None, min_length=1, max_length=100,
                                     description="The bot's display name (default: the bot_display_name setting).")
    title: str = Field(default="", max_length=200, description="Name of the class shown in reports.")
    course: str = Field(default="", max_length=200, description="Course the session belongs to.")
    host_email: str | None = Field(default=None, max_length=320,
                                   description="Where the after-class email goes (default: the teacher's email; "
                                   "another address only if invite_allowed_host_emails allows it).")
    consent_mode: ConsentMode = Field(default=ConsentMode.everyone, description="Who may be analysed.")
    consent_names: list[Annotated[str, Field(max_length=MAX_DISPLAY_NAME_CHARS)]] = Field(
        default_factory=list, max_length=1000, description="Display names on the opt-out or opt-in list.")

    @field_validator("janus_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("janus_url must be an http:// or https:// URL of the Janus API")
        return value


class MeetingView(BaseModel):
    """A meeting as the API shows it (never the PIN)."""

    id: int
    analysis_id: int | None
    janus_url: str
    room: int
    display_name: str
    state: MeetingState
    state_detail: str
    students_live: int
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None

    @classmethod
    def of(cls, meeting: Meeting) -> "MeetingView":
        """The view of a stored meeting."""
        assert meeting.id is not None
        return cls(id=meeting.id, analysis_id=meeting.analysis_id, janus_url=meeting.janus_url, room=meeting.room,
                   display_name=meeting.display_name, state=meeting.state, state_detail=meeting.state_detail,
                   students_live=meeting.students_live, created_at=meeting.created_at,
                   updated_at=meeting.updated_at, ended_at=meeting.ended_at)


class _RunningMeeting:
    """A bot task and the writer that keeps its ``Meeting`` row up to date."""

    def __init__(self, meeting_id: int) -> None:
        self.meeting_id = meeting_id
        self.bot: MeetingBot | None = None
        self.task: asyncio.Task[MeetingOutcome] | None = None
        self.latest: MeetingStatus | None = None
        self.changed = asyncio.Event()
        self.left_joining = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None

    def update(self, state: MeetingStatus) -> None:
        """The bot's status callback: keep the latest, wake the writer."""
        self.latest = state
        self.changed.set()


class MeetingRegistry:
    """Runs meeting bots as asyncio tasks inside the serve process and records their state."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 components: PipelineComponents | SharedComponents | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self._components = SharedComponents.of(settings, components)
        self._running: dict[int, _RunningMeeting] = {}

    async def recover(self) -> int:
        """Mark meetings left active by a previous process as failed (their bots died with it); returns how many."""
        return await asyncio.to_thread(self._recover)

    def _recover(self) -> int:
        reason = "the server restarted while the bot was in the meeting; invite it again"
        with session_scope(self.engine) as session:
            stale = list(session.exec(select(Meeting).where(col(Meeting.state).in_(ACTIVE_STATES))))
            for meeting in stale:
                if meeting.id in self._running:
                    continue
                meeting.state, meeting.state_detail = MeetingState.failed, reason
                meeting.updated_at = meeting.ended_at = utcnow()
                analysis = session.get(Analysis, meeting.analysis_id) if meeting.analysis_id else None
                if analysis is not None and analysis.status is AnalysisStatus.running:
                    analysis.status, analysis.failure_reason = AnalysisStatus.failed, reason
                    analysis.finished_at = utcnow()
            return len(stale)

    async def invite(self, owner: User, invite: MeetingInvite, *, wait_seconds: float | None = None) -> Meeting:
        """Create the session and the meeting, start the bot, and wait until it joined or failed."""
        from bot.janus_address import check_janus_url
        from bot.live import create_live_analysis

        # Refused before anything is created: no session, no meeting row, no connection.
        host_email = allowed_host_email(invite.host_email, owner, self.settings.invite_allowed_host_emails)
        checked = await asyncio.to_thread(check_janus_url, invite.janus_url, self.settings.janus_allowed_urls)
        display_name = invite.display_name or self.settings.bot_display_name
        consent = ConsentPolicy(invite.consent_mode, tuple(invite.consent_names))
        source = f"{invite.janus_url} room {invite.room}"

        def _create() -> Meeting:
            analysis_id = create_live_analysis(
                self.engine, self.settings, source=source, title=invite.title or f"meeting in room {invite.room}",
                owner_id=owner.id, course=invite.course, host_email=host_email,
                consent=consent)
            with session_scope(self.engine) as session:
                meeting = Meeting(analysis_id=analysis_id, owner_id=owner.id, janus_url=invite.janus_url,
                                  room=invite.room, display_name=display_name, state=MeetingState.joining,
                                  state_detail="starting")
                session.add(meeting)
                session.flush()
                from kernel.audit import record_event

                record_event(session, owner, "invited", "meeting", str(meeting.id),
                             f"bot invited to {source} (session {analysis_id})")
                return meeting

        meeting = await asyncio.to_thread(_create)
        assert meeting.id is not None and meeting.analysis_id is not None
        components = await self._components.get()
        target = MeetingTarget(janus_url=checked.url, room=invite.room, pin=invite.pin,
                               display_name=display_name, pinned_address=checked.pinned_address,
                               detailed_errors=False)
        running = _RunningMeeting(meeting.id)
        running.bot = MeetingBot(self.settings, self.engine, meeting.analysis_id, target, components=components,
                                 on_status=running.update)
        self._running[meeting.id] = running
        running.writer = asyncio.create_task(self._write_states(running), name=f"meeting-{meeting.id}-state")
        running.task = asyncio.create_task(running.bot.run(), name=f"meeting-{meeting.id}")
        running.task.add_done_callback(lambda _: running.changed.set())
        # A join resolves within a few request timeouts; the caller gets the outcome instead of "joining".
        timeout = wait_seconds if wait_seconds is not None else 4 * self.settings.bot_request_timeout_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(running.left_joining.wait(), timeout)
        await self._flush(running)
        return await self.get(meeting.id)

    async def _write_states(self, running: _RunningMeeting) -> None:
        """Write the bot's latest status to its row whenever it changes (in a thread: no blocking the loop)."""
        while True:
            await running.changed.wait()
            running.changed.clear()
            await self._flush(running)
            if running.task is not None and running.task.done():
                await self._flush(running)
                self._running.pop(running.meeting_id, None)
                return

    async def _flush(self, running: _RunningMeeting) -> None:
        state = running.latest
        if state is None:
            return
        if state.state is not MeetingState.joining:
            running.left_joining.set()
        await asyncio.to_thread(self._write_state, running.meeting_id, state)

    def _write_state(self, meeting_id: int, state: MeetingStatus) -> None:
        with session_scope(self.engine) as session:
            meeting = session.get(Meeting, meeting_id)
            if meeting is None:
                return
            meeting.state, meeting.state_detail = state.state, state.detail
            meeting.students_live = state.students_live
            meeting.updated_at = utcnow()
            if state.state in (MeetingState.ended, MeetingState.failed) and meeting.ended_at is None:
                meeting.ended_at = meeting.updated_at

    async def get(self, meeting_id: int) -> Meeting:
        """The stored meeting; KeyError when there is none."""
        def _read() -> Meeting | None:
            with session_scope(self.engine) as session:
                return session.get(Meeting, meeting_id)

        meeting = await asyncio.to_thread(_read) if is_row_id(meeting_id) else None
        if meeting is None:
            raise KeyError(meeting_id)
        return meeting

    async def leave(self, meeting_id: int, actor: User, *, wait: bool = True) -> Meeting:
        """Make the bot leave and finalise the session (waits for the end unless ``wait`` is False)."""
        running = self._running.get(meeting_id)
        if running is not None and running.bot is not None:
            running.bot.stop(f"stopped by {actor.email}")
            if wait and running.task is not None:
                await asyncio.gather(running.task, return_exceptions=True)
                if running.writer is not None:
                    await asyncio.gather(running.writer, return_exceptions=True)
        return await self.get(meeting_id)

    async def aclose(self) -> None:
        """Stop every bot and wait until each session is finalised (the serve process is shutting down)."""
        for running in list(self._running.values()):
            if running.bot is not None:
                running.bot.stop("the server is shutting down")
        tasks = [t for r in list(self._running.values()) for t in (r.task, r.writer) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


def registry_of(request: Request) -> MeetingRegistry:
    """The registry the web app installed at ``app.state.meeting_registry``."""
    registry = getattr(request.app.state, "meeting_registry", None)
    if not isinstance(registry, MeetingRegistry):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the meeting bot is not enabled on this server")
    return registry


def _visible(meeting: Meeting, user: User) -> bool:
    return user.role is UserRole.admin or (meeting.owner_id is not None and meeting.owner_id == user.id)


def meetings_router(current_user: Callable[..., User]) -> APIRouter:
    """The ``/api/meetings`` routes, authenticated by the web app's ``current_user`` dependency."""
    router = APIRouter(prefix="/api/meetings", tags=["meetings"])
    UserDep = Annotated[User, Depends(current_user)]  # noqa: N806  (a type alias local to the factory)
    RegistryDep = Annotated[MeetingRegistry, Depends(registry_of)]  # noqa: N806

    async def _owned(registry: MeetingRegistry, meeting_id: int, user: User) -> Meeting:
        try:
            meeting = await registry.get(meeting_id)
        except KeyError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no meeting {meeting_id}") from None
        if not _visible(meeting, user):
            # Same answer as a missing meeting: ids of other teachers' meetings are not disclosed.
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no meeting {meeting_id}")
        return meeting

    @router.post("", status_code=status.HTTP_201_CREATED, response_model=MeetingView)
    async def invite_bot(invite: MeetingInvite, user: UserDep, registry: RegistryDep) -> MeetingView:
        """Send the bot into a meeting. A join that fails answers 422 with the reason (the meeting is kept)."""
        from bot.janus_address import JanusUrlRefusedError

        try:
            meeting = await registry.invite(user, invite)
        except (JanusUrlRefusedError, InviteRefusedError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"message": str(exc)}) from None
        view = MeetingView.of(meeting)
        if meeting.state is MeetingState.failed:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                {"message": meeting.state_detail, "meeting": view.model_dump(mode="json")})
        return view

    @router.get("/{meeting_id}", response_model=MeetingView)
    async def meeting_state(meeting_id: int, user: UserDep, registry: RegistryDep) -> MeetingView:
        """The bot's state in a meeting: joining, live with N students, ended, or failed with the reason."""
        return MeetingView.of(await _owned(registry, meeting_id, user))

    @router.delete("/{meeting_id}", response_model=MeetingView)
    async def stop_bot(meeting_id: int, user: UserDep, registry: RegistryDep) -> MeetingView:
        """Make the bot leave; answers once the session is finalised and its reports are written."""
        await _owned(registry, meeting_id, user)
        return MeetingView.of(await registry.leave(meeting_id, user))

    return router
