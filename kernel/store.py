"""The store: sqlmodel schema and the few operations every app needs.

Only derived numbers are stored: boxes, scores, probabilities, cues. No frame and
no face crop ever reaches the database. Observations have a unique key per
(analysis, stream, track, timestamp) and are inserted with ON CONFLICT DO NOTHING,
so a retried or duplicated batch never double-counts.

SQLite (the embedded default) and PostgreSQL are both supported.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, UniqueConstraint, delete, event, func, inspect, literal, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.types import SchemaType
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from kernel.errors import ConfigurationError


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(UTC)


class AnalysisStatus(enum.StrEnum):
    """Lifecycle of an analysis."""

    running = "running"
    done = "done"
    failed = "failed"


class ConsentMode(enum.StrEnum):
    """Who in a session may be analysed."""

    everyone = "everyone"
    """Every participant."""
    opt_out = "opt_out"
    """Everyone except the names on the session's list."""
    opt_in = "opt_in"
    """Only the names on the session's list."""


class EmailStatus(enum.StrEnum):
    """Delivery state of the after-class email to the host."""

    not_sent = "not_sent"
    pending = "pending"
    sent = "sent"
    failed = "failed"


class UserRole(enum.StrEnum):
    """What a user of the archive may see: teachers their own sessions, admins everyone's."""

    teacher = "teacher"
    admin = "admin"


class TokenScope(enum.StrEnum):
    """What an API token may do."""

    full = "full"
    """Everything the user may do through the API: invite the bot, WHIP, read sessions."""
    whip = "whip"
    """Only push video through WHIP (``/api/whip``): the token a meeting front end holds."""


class User(SQLModel, table=True):
    """A teacher or admin of the archive web app."""

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(index=True, unique=True, description="Login name; stored lower-case.")
    display_name: str = Field(default="", description="Shown in the web app and on reports.")
    password_hash: str = Field(description="Argon2id hash of the password; never the password.")
    role: UserRole = Field(default=UserRole.teacher)
    api_token_hash: str | None = Field(default=None, description="SHA-256 of the user's API token, if one was issued.")
    api_token_expires_at: datetime | None = Field(
        default=None, description="When the API token stops working; None: it works until replaced or revoked.")
    api_token_scope: TokenScope = Field(default=TokenScope.full, description="What the API token may do.")
    disabled: bool = Field(default=False, description="A disabled user cannot sign in and their token is refused.")
    session_epoch: int = Field(
        default=0, description="Bumped at sign-out, password change and disable: browser sessions of an "
        "older epoch are over.")
    created_at: datetime = Field(default_factory=utcnow)
    last_login_at: datetime | None = None


class AuditEvent(SQLModel, table=True):
    """Who did what to which session: viewed, exported, deleted, invited the bot, logged in."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor_id: int | None = Field(default=None, index=True, description="User id; kept when the user is deleted.")
    actor_email: str = Field(default="", description="The actor's email at the time ('system' for scheduled jobs).")
    action: str = Field(index=True, description="'viewed', 'exported', 'deleted', 'invited', 'login', ...")
    target_kind: str = Field(default="", description="'session', 'student', 'user', 'meeting' or ''.")
    target_id: str = Field(default="", description="Id of the target, as text.")
    detail: str = Field(default="", description="One line of context (never pixels, never a password).")


class Analysis(SQLModel, table=True):
    """One analysed session: a recorded video or a live meeting."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(default="recording", description="'recording' or 'meeting'.")
    source: str = Field(description="The recording's file name, or the meeting's address.")
    title: str = Field(default="", description="Human-readable name shown in reports.")
    status: AnalysisStatus = Field(default=AnalysisStatus.running, index=True)
    failure_reason: str | None = Field(default=None, description="Why the analysis failed, in one line.")
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = Field(
        default=None, description="When the analysis' producer last showed it was alive (running analyses only).")
    sample_fps: float = Field(default=1.0, description="Frames sampled per second of class time.")
    layout: str = Field(default="camera", description=(
        "How a recording's frames were read: 'camera' (one picture) or 'gallery' (a meeting's tiles, each "
        "participant named by the tile's label)."))
    duration_seconds: float = Field(default=0.0, description="Class time covered by the source.")
    decoding: str = Field(default="", description=(
        "How a recording was decoded to get its samples, in one line: sequential, keyframes or seek, and why "
        "(the keyframe spacing measured); empty for meetings."))
    frames_sampled: int = Field(default=0)
    faces_detected: int = Field(default=0)
    emotion_inference: bool = Field(default=True, description="Whether emotion models ran at all.")
    models_json: str = Field(default="{}", description="JSON: role -> model name, sha256 and provenance.")
    report_path: str | None = Field(default=None, description="Folder of the rendered reports.")
    owner_id: int | None = Field(default=None, foreign_key="user.id", index=True,
                                 description="The teacher who owns the session; None for command-line runs.")
    course: str = Field(default="", index=True, description="Course the session belongs to (trends compare within it).")
    host_email: str | None = Field(default=None, description="Where the after-class email goes.")
    consent_mode: ConsentMode = Field(default=ConsentMode.everyone, description="Who could be analysed.")
    consent_names_json: str = Field(default="[]", description="JSON list of display names on the opt-out/opt-in list.")
    email_status: EmailStatus = Field(default=EmailStatus.not_sent)
    email_detail: str | None = Field(default=None, description="The mail server's last answer when delivery failed.")
    emailed_at: datetime | None = None


#: How a student's label was found (``Student.name_source``): a meeting participant's display name...
NAME_FROM_MEETING = "meeting"
#: ... read off the participant's tile in a gallery recording...
NAME_FROM_LABEL = "label"
#: ... or none: the student is numbered.
NAME_FROM_NONE = "none"


class Student(SQLModel, table=True):
    """A person tracked within one analysis; identity never extends beyond the session."""

    __table_args__ = (UniqueConstraint("analysis_id", "stream", "track_id"),)

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    stream: str = Field(default="main")
    track_id: int
    label: str = Field(description="Display name in reports: 'Student 3', or the meeting display name.")
    name_source: str = Field(default="none", description=(
        "How the label was found: 'meeting' (the participant's display name in a meeting), 'label' (read off "
        "the participant's tile in a gallery recording) or 'none' (numbered)."))
    first_seen: float = Field(description="Class time of the first sample the face was seen in.")
    last_seen: float
    samples_visible: int = Field(description="Sampled frames in which the face was detected.")


class FrameSample(SQLModel, table=True):
    """One sampled frame of one stream: how many faces it held (for visibility and coverage)."""

    __table_args__ = (UniqueConstraint("analysis_id", "stream", "timestamp"),)

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    stream: str = Field(default="main")
    timestamp: float
    faces: int


class FaceObservation(SQLModel, table=True):
    """Derived numbers for one face at one timestamp."""

    __table_args__ = (UniqueConstraint("analysis_id", "stream", "track_id", "timestamp"),)

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    stream: str = Field(default="main")
    track_id: int
    timestamp: float
    box_x1: float
    box_y1: float
    box_x2: float
    box_y2: float
    detection_score: float
    head_yaw: float = Field(description="Degrees, positive when the face turns to the image's right.")
    head_pitch: float = Field(description="Degrees, positive when the face tilts up.")
    head_roll: float
    eyes_closed: float | None = None
    gaze_away: float | None = None
    emotion_angry: float | None = None
    emotion_disgust: float | None = None
    emotion_fear: float | None = None
    emotion_happy: float | None = None
    emotion_sad: float | None = None
    emotion_surprise: float | None = None
    emotion_neutral: float | None = None
    engagement_p0: float
    engagement_p1: float
    engagement_p2: float
    engagement_p3: float
    engagement_level: int = Field(description="Most probable level, 0 (very low) to 3 (very high).")
    engagement_score: float = Field(description="Expected level: sum of level × probability, 0–3.")


class SegmentState(enum.StrEnum):
    """Lifecycle of one time segment of a recording analysed by a worker."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class FailedBatch(SQLModel, table=True):
    """One crop batch that a worker gave up on, and why."""

    # No foreign key to ``analysis``: a poison payload may name an analysis that does not
    # exist (or none at all), and the record must still be written.
    id: int | None = Field(default=None, primary_key=True, description="Row id.")
    analysis_id: int | None = Field(
        default=None, index=True,
        description="The analysis the payload named, or None when it could not be read.",
    )
    reason: str = Field(description="Why the batch failed, in one line (the error a person needs to see).")
    crops: int | None = Field(
        default=None, description="How many crops the payload said it held, or None when unknown.",
    )
    created_at: datetime = Field(default_factory=utcnow, description="When the worker gave up (UTC).")
    batch_id: str | None = Field(default=None, description="The producer's id of the batch, when the payload had one.")


class StoredBatch(SQLModel, table=True):
    """A crop batch whose results are in the store: the producer's receipt, written with the results."""

    __table_args__ = (UniqueConstraint("analysis_id", "batch_id"),)

    id: int | None = Field(default=None, primary_key=True, description="Row id (producers read receipts in order).")
    analysis_id: int = Field(foreign_key="analysis.id", index=True, description="The batch's analysis.")
    batch_id: str = Field(description="The producer's id of the batch.")
    crops: int = Field(description="Crops in the batch.")


class StoreIdentity(SQLModel, table=True):
    """The store's own random id: a worker refuses work meant for another store."""

    id: int = Field(default=1, primary_key=True, description="Always 1: one identity per store.")
    store_id: str = Field(description="Random hex id, made when the store was first opened.")
    created_at: datetime = Field(default_factory=utcnow, description="When the id was made (UTC).")


class SegmentStatus(SQLModel, table=True):
    """One time segment of a recording that a worker decodes, detects, tracks and infers on its own."""

    __table_args__ = (UniqueConstraint("analysis_id", "segment_index"),)

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    segment_index: int = Field(description="Position of the segment in the recording, from 0.")
    start_seconds: float = Field(description="Class time the segment starts at (inclusive).")
    end_seconds: float | None = Field(default=None, description="Class time it ends at (exclusive); None: the end.")
    status: SegmentState = Field(default=SegmentState.queued)
    reason: str | None = Field(default=None, description="Why the segment failed, in one line.")
    frames: int = Field(default=0, description="Frames sampled so far (all of them once done).")
    faces: int = Field(default=0, description="Faces detected so far.")
    models_json: str = Field(default="{}", description="JSON: role -> provenance of the models the worker ran.")
    updated_at: datetime = Field(default_factory=utcnow)


class SegmentTrack(SQLModel, table=True):
    """What one segment's tracker knew about one of its tracks: the numbers that stitch ids across segments.

    Track ids are the segment's own (``segment_index * 1_000_000 + n``), as first stored;
    once the analysis is done, observations and students carry the stitched ids instead.
    """

    __table_args__ = (UniqueConstraint("analysis_id", "segment_index", "track_id"),)

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    segment_index: int
    stream: str = Field(default="main")
    track_id: int
    first_seen: float = Field(description="Class time of the track's first sample in the segment.")
    last_seen: float
    samples: int = Field(description="Sampled frames in which the track's face was found.")
    score_total: float = Field(description="Sum of the detector's confidence over those samples.")
    first_x1: float = Field(description="Box (pixels) at first_seen.")
    first_y1: float
    first_x2: float
    first_y2: float
    last_x1: float = Field(description="Box (pixels) at last_seen.")
    last_y1: float
    last_x2: float
    last_y2: float


# --- Live analysis: per-participant stream statistics and gaps (bot/live.py) ---


class StreamStats(SQLModel, table=True):
    """How one meeting participant's feed was received and sampled: counts only, never pixels."""

    __table_args__ = (UniqueConstraint("analysis_id", "stream"),)

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    stream: str = Field(description="The participant's stream key (display name, disambiguated).")
    display_name: str = Field(description="The participant's display name in the meeting.")
    frames_received: int = Field(default=0, description="Frames that arrived from the participant's track.")
    frames_sampled: int = Field(default=0, description="Frames analysed (due by the sampling rate and not dropped).")
    frames_dropped: int = Field(default=0, description="Sampled frames dropped because the bot fell behind.")
    first_frame_at: float | None = Field(default=None, description="Class time of the first frame received.")
    last_frame_at: float | None = Field(default=None, description="Class time of the last frame received.")
    left_reason: str | None = Field(default=None, description="Why the participant's feed ended, in one line.")


class StreamGap(SQLModel, table=True):
    """A stretch of class time in which a feed (or, with stream None, the whole session) was not analysed."""

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int = Field(foreign_key="analysis.id", index=True)
    stream: str | None = Field(default=None, description="The participant's stream; None: every stream.")
    start_time: float = Field(description="Class time the gap started.")
    end_time: float = Field(description="Class time the gap ended.")
    reason: str = Field(description="Why, in one line (reconnect, fell behind, ...).")


# --- Meeting bot: one row per invitation of the bot into a meeting (bot/api.py, bot/meeting.py) ---


class MeetingState(enum.StrEnum):
    """Where the bot is in a meeting's lifecycle."""

    joining = "joining"
    """Connecting to the meeting server, joining the room, subscribing."""
    live = "live"
    """In the room, analysing the participants."""
    reconnecting = "reconnecting"
    """The connection to the meeting server was lost; rejoining (the gap is recorded)."""
    ending = "ending"
    """Left the room; finalising the session and rendering the reports."""
    ended = "ended"
    """Finished; the session is finalised and its reports are written."""
    failed = "failed"
    """Could not join or run; ``state_detail`` says why."""


class Meeting(SQLModel, table=True):
    """The bot's presence in one meeting. The room PIN is never stored (it lives only in the running bot)."""

    id: int | None = Field(default=None, primary_key=True)
    analysis_id: int | None = Field(default=None, foreign_key="analysis.id", index=True,
                                    description="The session (Analysis, kind 'meeting') the bot fills.")
    owner_id: int | None = Field(default=None, foreign_key="user.id", index=True,
                                 description="The teacher who invited the bot.")
    janus_url: str = Field(description="URL of the Janus HTTP API the meeting runs on.")
    room: int = Field(description="The VideoRoom room number.")
    display_name: str = Field(description="The bot's display name in the meeting.")
    state: MeetingState = Field(default=MeetingState.joining, index=True)
    state_detail: str = Field(default="", description="One line: why it ended or failed, or what it is doing.")
    students_live: int = Field(default=0, description="Students the bot is analysing right now (last update).")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None


MAX_ROW_ID = 2**31 - 1
"""Largest id the store's integer keys hold (PostgreSQL's INTEGER); a larger id names no row."""


def is_row_id(value: int) -> bool:
    """Whether a number from outside (a URL, a payload) can be the id of a stored row."""
    return 1 <= value <= MAX_ROW_ID


def make_engine(url: str) -> Engine:
    """Create an engine for a SQLAlchemy URL, creating the SQLite file's folder when needed."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(f"database_url: not a SQLAlchemy URL: {url!r}") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except (ImportError, NoSuchModuleError) as exc:
        raise ConfigurationError(
            f"database_url: cannot open a {parsed.get_backend_name()} database: its driver is not installed "
            f"({exc}); ClassLens stores in SQLite or PostgreSQL"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the report step read while workers write; foreign keys keep deletes honest.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    return engine


def init_store(url: str) -> Engine:
    """Open the store and create missing tables; a database that cannot be reached is a one-line error."""
    engine = make_engine(url)

    try:
        SQLModel.metadata.create_all(engine)
        add_missing_columns(engine)
        store_id_of(engine)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigurationError(f"cannot open the database {engine.url!r}: {reason}") from None
    return engine



def last_sign_of_life() -> Any:
    """SQL for when an analysis' producer last showed it was alive: its heartbeat, else its creation."""
    return func.coalesce(col(Analysis.heartbeat_at), col(Analysis.created_at))


def store_id_of(engine: Engine) -> str:
    """The store's id (:class:`StoreIdentity`), made on first use; safe when several processes race to make it."""
    with Session(engine) as session:
        identity = session.get(StoreIdentity, 1)
        if identity is not None:
            return identity.store_id
        insert_ignoring_duplicates(session, [StoreIdentity(id=1, store_id=uuid.uuid4().hex)])
        session.commit()
        identity = session.get(StoreIdentity, 1)
        assert identity is not None
        return identity.store_id


def add_missing_columns(engine: Engine) -> list[str]:
    """Add columns a newer release declares to tables an older release created; returns ``table.column`` names.

    ``create_all`` creates missing tables but never alters existing ones, so a store made
    by an earlier version would fail on its first query. New columns are added as
    nullable, with the field's scalar default for existing rows and their indexes, so the
    upgrade is one start of any ClassLens process (docs/deploy.md). Foreign keys are not
    added to existing tables (SQLite cannot); columns are never dropped or changed.
    """
    inspector = inspect(engine)
    existing_tables = set(inspector.get_table_names())
    added: list[str] = []
    with engine.begin() as connection:
        for table in SQLModel.metadata.sorted_tables:
            if table.name not in existing_tables:
                continue
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if isinstance(column.type, SchemaType):
                    # A native enum (PostgreSQL) needs its type before a column can use it.
                    column.type.create(connection, checkfirst=True)
                column_type = column.type.compile(dialect=engine.dialect)
                clause = f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {column_type}'
                default = column.default
                if default is not None and default.is_scalar:
                    value = default.arg  # type: ignore[attr-defined]
                    value = value.name if isinstance(value, enum.Enum) else value  # Enum columns store names
                    rendered = literal(value).compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
                    clause += f" DEFAULT {rendered}"
                connection.execute(text(clause))
                added.append(f"{table.name}.{column.name}")
                for index in table.indexes:
                    if column.name in index.columns:
                        index.create(connection, checkfirst=True)
    return added

@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; rows stay readable after commit."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def insert_ignoring_duplicates(session: Session, rows: Sequence[SQLModel]) -> None:
    """Insert rows of one table, skipping any that collide with a unique key (idempotent writes).

    The rows are instances of the table's model; an unset primary key is left to the database.
    """
    if not rows:
        return
    model = type(rows[0])
    if any(type(row) is not model for row in rows):
        raise TypeError(f"insert_ignoring_duplicates: rows of several tables ({model.__name__} and others)")
    table = model.__table__  # type: ignore[attr-defined]
    values = [{column.name: getattr(row, column.name) for column in table.columns
               if not (column.primary_key and getattr(row, column.name) is None)} for row in rows]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement: Any = postgresql.insert(table).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(table).values(values).on_conflict_do_nothing()
    else:
        raise ConfigurationError(f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL")
    session.execute(statement)


def delete_analysis_data(session: Session, analysis_id: int, *, keep_analysis: bool = True) -> None:
    """Delete everything derived for an analysis (and the analysis row unless ``keep_analysis``)."""
    tables: tuple[Any, ...] = (FaceObservation, FrameSample, Student, SegmentTrack, SegmentStatus)
    tables += (StreamStats, StreamGap, StoredBatch)  # live sessions; receipts
    for model in tables:
        session.execute(delete(model).where(model.analysis_id == analysis_id))
    if not keep_analysis:
        session.execute(delete(Meeting).where(col(Meeting.analysis_id) == analysis_id))

        session.execute(delete(FailedBatch).where(col(FailedBatch.analysis_id) == analysis_id))
        session.execute(delete(Analysis).where(Analysis.id == analysis_id))  # type: ignore[arg-type]


def observations_for(session: Session, analysis_id: int) -> list[FaceObservation]:
    """Every observation of an analysis, ordered by stream, track and time."""
    statement = (
        select(FaceObservation)
        .where(FaceObservation.analysis_id == analysis_id)
        .order_by(FaceObservation.stream, FaceObservation.track_id, FaceObservation.timestamp)  # type: ignore[arg-type]
    )
    return list(session.exec(statement))


def students_for(session: Session, analysis_id: int) -> list[Student]:
    """The students of an analysis, in the order they first appeared."""
    statement = select(Student).where(Student.analysis_id == analysis_id).order_by(Student.first_seen, Student.id)  # type: ignore[arg-type]
    return list(session.exec(statement))


def frame_samples_for(session: Session, analysis_id: int) -> list[FrameSample]:
    """The sampled frames of an analysis in time order."""
    statement = select(FrameSample).where(FrameSample.analysis_id == analysis_id).order_by(FrameSample.timestamp)  # type: ignore[arg-type]
    return list(session.exec(statement))


def all_rows(rows: Iterable[SQLModel]) -> list[dict[str, Any]]:
    """Plain dicts of ORM rows, for exports."""
    return [row.model_dump() for row in rows]
