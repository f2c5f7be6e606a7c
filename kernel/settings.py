"""Settings for every ClassLens process, read once at start.

Values come from keyword arguments, then ``CLASSLENS_*`` environment variables, then
a ``.env`` file, then the defaults below. Unknown keys are rejected so that a typo in
a deployment's environment fails loudly instead of being ignored.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kernel.errors import ConfigurationError


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "classlens"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "classlens" / "models"


class VideoLayout(StrEnum):
    """How a recording's frames are laid out."""

    auto = "auto"
    """Find out per frame: a gallery where tiles are found, a camera picture elsewhere."""
    gallery = "gallery"
    """A meeting's gallery or speaker view: always look for tiles and their names."""
    camera = "camera"
    """One camera picture: never split."""


class DecodeMode(StrEnum):
    """How a recording is decoded to get its sampled frames (``docs/benchmarks.md`` measures each)."""

    auto = "auto"
    """Choose per file from its keyframe spacing and the sampling rate: the cheapest of the three below."""
    sequential = "sequential"
    """Decode every frame (non-reference frames skipped when samples are far apart): exact, always possible."""
    keyframes = "keyframes"
    """Decode keyframes only: a sampling instant with no keyframe within the tolerance gets no frame."""
    seek = "seek"
    """Restart the decoder at the keyframe before each sample and decode up to a frame within the tolerance."""


class Settings(BaseSettings):
    """Configuration of ClassLens; every field can be set as ``CLASSLENS_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="CLASSLENS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the default SQLite database and the report archive.",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the store, e.g. postgresql+psycopg://user@host/db. "
            "Default: a SQLite file classlens.sqlite3 in data_dir."
        ),
    )
    reports_dir: Path | None = Field(
        default=None,
        description="Where HTML reports and exports are written. Default: data_dir/reports.",
    )
    model_cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Cache of pulled, verified and converted models; everything runs offline from it.",
    )
    local_models_dir: Path | None = Field(
        default=None,
        description=(
            "Folder holding model files that no package ships (e.g. det_500m.onnx, "
            "MobileFaceNet.onnx); models whose source is 'local' are read from it."
        ),
    )
    package_index_url: str | None = Field(
        default=None,
        description="Package index that `models pull` downloads pinned archives from (pip's default if unset).",
    )
    detector: str = Field(
        default="retinaface-mnet025",
        description=(
            "Face detector: a model name from the manifest, a path to a detector ONNX file, "
            "or a folder holding an insightface model pack."
        ),
    )
    recognizer: str | None = Field(
        default="face-api-recognition",
        description=(
            "Face-embedding model (manifest name, ONNX path or model-pack folder) that keeps a student's "
            "id through cuts, layout changes and absences. The default is face-api's recogniser, pulled "
            "from its pinned npm archive; 'none' turns re-identification off (position and motion only). "
            "Embeddings stay in memory for one session and are never compared across sessions."
        ),
    )
    emotion_model: str = Field(
        default="classlens-emotion-v1",
        description=(
            "Emotion model: a manifest name or a path to an ONNX file with the 7 emotion outputs. The default "
            "is ClassLens's own, trained on FER+ and CK+ and shipped in the package (docs/models.md)."
        ),
    )
    engagement_model: str = Field(
        default="classlens-engagement-v1",
        description=(
            "Engagement model (manifest name or ONNX path). The default is ClassLens's own, trained on DAiSEE "
            "frames and shipped in the package; 'engagement-baseline-v1' is the heuristic baseline."
        ),
    )
    landmark_model: str | None = Field(
        default=None,
        description=(
            "Optional landmark model for the eyes-closed and gaze-away cues: 'mediapipe-face-landmarker' "
            "(needs the landmarks extra, see docs/models.md). Unset: those cues are reported as unknown."
        ),
    )
    emotion_inference: bool = Field(
        default=True,
        description=(
            "Run emotion recognition. Set false where the law forbids emotion recognition "
            "in education (EU AI Act Art. 5(1)(f)): no emotion is computed or stored."
        ),
    )
    sample_fps: float = Field(
        default=1.0, gt=0.0, le=30.0, description="Frames sampled per second of class time."
    )
    decode_mode: DecodeMode = Field(
        default=DecodeMode.auto,
        description=(
            "How recordings are decoded: 'auto' (per file, from its keyframe spacing), 'sequential' (every frame), "
            "'keyframes' (keyframes only) or 'seek' (from the keyframe before each sample). The report says which ran."
        ),
    )
    sample_tolerance_seconds: float = Field(
        default=0.5, ge=0.0, le=5.0,
        description=(
            "How far a sampled frame may lie from its sampling instant k / sample_fps when decoding skips frames "
            "(keyframes, seek); at most half the sampling interval, so every instant keeps its own frame."
        ),
    )
    analysis_jobs: int = Field(
        default=0, ge=0, le=64,
        description=(
            "Recordings `classlens analyze` runs at once when given several (`--jobs`); 0: one per core. "
            "onnxruntime's threads are shared out among them."
        ),
    )
    video_layout: VideoLayout = Field(
        default=VideoLayout.auto,
        description=(
            "How recordings are read: 'auto' (a meeting's gallery where tiles are found, one camera picture "
            "elsewhere), 'gallery' (always look for tiles and read each participant's name off its label) or "
            "'camera' (never split a frame into tiles)."
        ),
    )
    recording_opt_out: list[str] = Field(
        default_factory=list,
        description=(
            "Display names never to analyse in gallery recordings (`--opt-out`): faces in a tile labelled with one "
            "of them are dropped, as a meeting's opt-out list drops the participant."
        ),
    )
    ocr_language: str = Field(
        default="Latin",
        description="Tesseract language model that reads display names off gallery tiles ('Latin' reads accents).",
    )
    detector_input_size: int = Field(
        default=640,
        ge=128,
        le=2048,
        description=(
            "Long side (pixels) of the detector's full input, a multiple of 32: frames are resized to it, keeping "
            "their aspect ratio, and the short side is rounded up to a multiple of 32."
        ),
    )
    full_search_seconds: float = Field(
        default=5.0,
        ge=0.0,
        description=(
            "Longest time (seconds) between two searches of a stream's frame at the detector's full input. In "
            "between, frames are searched at the smallest input that still shows the faces already found at 64 "
            "pixels (again in full when a known face is missing), so a new face too small for it waits until the "
            "next full search. 0 searches every frame at the full input."
        ),
    )
    detection_threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="Minimum detector score for a face."
    )
    min_face_pixels: int = Field(
        default=20,
        ge=8,
        description="Faces whose shorter box side is smaller than this (in frame pixels) are ignored.",
    )
    track_max_gap_seconds: float = Field(
        default=30.0,
        gt=0.0,
        description="How long a student's track survives without a matching face (looking away, hidden).",
    )
    min_student_seconds: float = Field(
        default=2.0,
        ge=0.0,
        description="A track seen for less class time than this (and in fewer than 2 samples) is not a student.",
    )
    min_student_score: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Mean detector confidence a track needs to count as a student (filters face-like objects).",
    )
    batch_size: int = Field(
        default=32, ge=1, le=1024, description="Face crops per inference batch."
    )
    execution_provider: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="onnxruntime execution provider: 'cuda' requires it, 'auto' prefers it when present.",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="onnxruntime threads per session; 0 lets onnxruntime choose (all cores).",
    )

    broker_url: str | None = Field(
        default=None,
        description=(
            "Celery broker URL (e.g. redis://127.0.0.1:6379/0). Unset: inference runs in-process. "
            "Set: crop batches go to Celery workers (`classlens worker`)."
        ),
    )
    inference_queue: str = Field(
        default="cpu",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Celery queue that producers send crop batches to: 'gpu' for GPU workers, 'cpu' otherwise.",
    )
    task_time_limit_seconds: int = Field(
        default=300, ge=10, description="Hard time limit of one worker task; a task past it is killed and retried."
    )
    task_max_retries: int = Field(
        default=5, ge=0, le=50, description="Retries of a task that failed with a transient error (database, broker)."
    )
    broker_visibility_timeout_seconds: int | None = Field(
        default=None,
        ge=5,
        description=(
            "Seconds before Redis hands a message whose worker vanished (crash, kill -9) to another worker. "
            "Default: 2 × task_time_limit_seconds + 60; shorter redelivers sooner but may run slow tasks twice."
        ),
    )
    dispatch_timeout_seconds: int = Field(
        default=900,
        ge=10,
        description=(
            "How long a producer waits without any progress from the workers before it marks the analysis failed."
        ),
    )
    worker_report_ttl_seconds: float = Field(
        default=10.0,
        ge=3.0,
        description=(
            "Each worker process rewrites its report in Redis every 2 s with this time-to-live: a worker that died "
            "is forgotten this long after, and the work it held is sent again."
        ),
    )
    workers_unavailable_seconds: float = Field(
        default=30.0,
        gt=0.0,
        description=(
            "A producer fails after this long with no live worker on its queue, or with every live one reporting "
            "a problem (unreachable database, another store), and names the cause."
        ),
    )
    analysis_owner_email: str = Field(
        default="",
        description=(
            "Email of the ClassLens user who owns command-line runs (`analyze`, `bot join`; `--owner`), so that they "
            "see them in the archive. Empty: no owner, only admins see the run."
        ),
    )
    analysis_course: str = Field(
        default="",
        description="Course of command-line runs unless `--course` says otherwise (trends compare within a course).",
    )
    producer_heartbeat_seconds: float = Field(
        default=10.0,
        gt=0.0,
        description="How often the process running an analysis stamps it as alive (Analysis.heartbeat_at).",
    )
    abandoned_after_seconds: float = Field(
        default=120.0,
        gt=0.0,
        description=(
            "A running analysis whose producer has not stamped it for this long was abandoned (its process died): "
            "it is marked failed and its partial rows are removed, when `analyze` or a worker starts and on the "
            "maintenance schedule."
        ),
    )
    segment_seconds: float = Field(
        default=300.0,
        ge=1.0,
        description=(
            "With a broker, a recorded file longer than this is split into segments of this much class time "
            "that workers decode, detect, track and analyse in parallel; student ids are stitched across the "
            "boundaries. The workers must read the file at the same path (shared filesystem)."
        ),
    )

    # Meeting bot (bot/meeting.py, `classlens bot join`, the invite API)
    janus_allowed_urls: list[str] = Field(
        default_factory=list,
        description=(
            "Janus API URLs the invite API may send the bot to (a JSON list). Empty: any public http(s) "
            "address; loopback, private, link-local and other non-public addresses are refused after DNS "
            "resolution, and the bot connects to the address that was checked. `classlens bot join` is not limited."
        ),
    )
    invite_allowed_host_emails: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses (or '@domain' suffixes) other than the inviting teacher's own that the invite API "
            "accepts as host_email, where after-class email goes (a JSON list). Empty: only the teacher's own."
        ),
    )
    whip_max_connections: int = Field(
        default=32, ge=1,
        description="WHIP connections this server takes at once, offers still being negotiated included; more get 429.",
    )
    whip_max_connections_per_user: int = Field(
        default=8, ge=1,
        description="WHIP connections one user (one token) may hold at once, in flight included; more get 429.",
    )
    whip_max_participants_per_session: int = Field(
        default=100, ge=1,
        description="Video tracks (participants) one WHIP session takes over all its connections; an offer that "
        "would pass it gets 422.",
    )
    whip_connect_timeout_seconds: float = Field(
        default=20.0, gt=0,
        description="A WHIP peer that has not connected this long after its answer is hung up; a session that "
        "never received media leaves nothing in the archive.",
    )
    bot_display_name: str = Field(
        default="ClassLens (analysing engagement)",
        min_length=1,
        max_length=100,
        description="Display name the bot joins meetings with; it tells participants what the bot does.",
    )
    bot_idle_timeout_seconds: float = Field(
        default=300.0,
        gt=0.0,
        description="The bot leaves and finalises the session when no participant has published video for this long.",
    )
    bot_max_duration_seconds: float = Field(
        default=4 * 3600.0,
        gt=0.0,
        description="The bot leaves and finalises the session after this much time in the meeting, whatever happens.",
    )
    bot_receive_buffer_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description=(
            "Kernel receive buffer the bot asks for on its media socket (the kernel caps it at net.core.rmem_max); "
            "a larger one absorbs the moments when the bot reads late instead of losing packets. 0: the OS default."
        ),
    )
    bot_stall_seconds: float = Field(
        default=3.0,
        gt=0.0,
        description=(
            "A subscribed participant whose video sent no frame for this long is restarted: the bot drops what "
            "its receiver buffered and asks the sender for a keyframe (after the bot itself stalled, lost packets "
            "are never repaired)."
        ),
    )
    bot_frame_timeout_seconds: float = Field(
        default=15.0,
        gt=0.0,
        description=(
            "When a participant still sends no frame this long after a restart, the bot subscribes to every feed "
            "again (at most once per this interval). A silent participant who is still in the room is kept."
        ),
    )
    bot_absent_seconds: float = Field(
        default=120.0,
        gt=0.0,
        description=(
            "A participant without video for this long is dropped if the room's participant list no longer shows "
            "them publishing (Janus normally says at once when someone leaves)."
        ),
    )
    bot_keepalive_seconds: float = Field(
        default=25.0,
        gt=0.0,
        lt=60.0,
        description="Interval of the bot's keepalives to Janus; Janus drops a silent session after 60 s by default.",
    )
    bot_reconnect_attempts: int = Field(
        default=10,
        ge=0,
        le=1000,
        description=(
            "How often the bot tries to rejoin after a transport error or a Janus restart before it gives up "
            "and finalises the session with what it has (waits grow from 1 s to 10 s between attempts)."
        ),
    )
    bot_request_timeout_seconds: float = Field(
        default=10.0,
        gt=0.0,
        description="How long the bot waits for one answer of the meeting server before it counts as failed.",
    )

    # Live analysis
    live_queue_frames: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "Sampled frames of one meeting participant that may wait for detection; when the queue is full "
            "the oldest waiting frame is dropped (and counted) so that memory stays bounded under load."
        ),
    )
    live_worker_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Threads that convert, detect, track and crop sampled meeting frames (shared by all participants).",
    )
    live_behind_seconds: float = Field(
        default=5.0,
        gt=0.0,
        description=(
            "A participant's sampled frame that waits longer than this before detection logs a "
            "falling-behind warning."
        ),
    )

    # Reports and the email after class (reports/, `classlens report`)
    min_students_for_class_rows: int = Field(
        default=5,
        ge=1,
        description=(
            "Class-wide views (the class overview's student table and heatmap, the email's per-student summary) "
            "hide per-student rows when fewer students than this were analysed."
        ),
    )
    smtp_host: str | None = Field(
        default=None, description="SMTP server for the after-class email. Unset: no email is sent."
    )
    smtp_port: int = Field(
        default=587, ge=1, le=65535, description="SMTP port: usually 587 with starttls, 465 with tls, 25 with none."
    )
    smtp_security: Literal["none", "starttls", "tls"] = Field(
        default="starttls",
        description=(
            "How the SMTP connection is protected: 'starttls' upgrades a plain connection, "
            "'tls' is TLS from the start, 'none' is plain text."
        ),
    )
    smtp_user: str | None = Field(
        default=None, description="SMTP login name; unset: no login (e.g. a relay on the local network)."
    )
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password, used with smtp_user.")
    smtp_from: str = Field(
        default="ClassLens <classlens@localhost>", description="Sender address (From) of the after-class email."
    )
    smtp_timeout_seconds: float = Field(
        default=30.0, gt=0.0, description="Timeout of each SMTP connection attempt and command."
    )
    email_retry_attempts: int = Field(
        default=4, ge=1, le=20,
        description="Delivery attempts for a transient failure (connection error, 4xx answer); 5xx is not retried.",
    )
    email_retry_base_seconds: float = Field(
        default=30.0, ge=0.0,
        description="Wait before the second attempt; each later wait doubles (exponential backoff).",
    )

    # Web app (`classlens serve`: the report archive, the invite API and WHIP)
    secret_key: SecretStr | None = Field(
        default=None,
        description=(
            "Key that signs the archive's session cookies. Unset: one is generated once and kept in "
            "data_dir/secret_key (mode 0600); deployments with several servers set the same value on each."
        ),
    )
    session_cookie_secure: bool | None = Field(
        default=None,
        description=(
            "Send the session cookie only over HTTPS. Unset: on, unless public_url is http:// or unset "
            "and serve_host is a loopback address (plain http on this machine only)."
        ),
    )
    session_max_age_seconds: int = Field(
        default=8 * 3600, ge=60, description="How long a login lasts without activity before the user signs in again."
    )
    session_absolute_lifetime_seconds: int = Field(
        default=12 * 3600, ge=60,
        description="How long a login lasts at most, however active; then the user signs in again.",
    )
    login_attempts_per_minute: int = Field(
        default=5, ge=1,
        description=(
            "Login attempts allowed per address and email within a minute (each is counted before its password "
            "is checked; a successful one is given back); more get HTTP 429. With a redis:// broker_url the "
            "counts live in Redis and hold across server processes; otherwise each process counts on its own."
        ),
    )
    password_checks_at_once: int | None = Field(
        default=None, ge=1,
        description="Password verifications (argon2, 64 MiB each) run at once; more logins wait briefly, then get "
        "HTTP 503. Unset: one per CPU core.",
    )
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+\S*$",
        description="Base URL users reach the archive at (https://classlens.example.edu), used in emailed links.",
    )
    serve_host: str = Field(default="127.0.0.1", description="Interface `classlens serve` listens on.")
    serve_port: int = Field(default=8000, ge=1, le=65535, description="TCP port `classlens serve` listens on.")

    # Privacy: retention of sessions (`classlens retention run`, and Celery beat on a schedule)
    retention_days: int = Field(
        default=180,
        ge=0,
        description=(
            "Sessions created more than this many days ago are deleted with everything derived from them "
            "(rows and report folders) by `classlens retention run` and the scheduled job; 0 keeps them forever."
        ),
    )
    retention_interval_hours: float = Field(
        default=24.0,
        gt=0.0,
        le=24.0 * 30,
        description="How often the scheduler (`classlens retention beat`) runs retention, in hours.",
    )
    maintenance_queue: str = Field(
        default="cpu",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Celery queue the scheduled retention job is sent to; a worker must consume it (cpu workers do).",
    )

    @field_validator("recognizer", mode="before")
    @classmethod
    def _no_recognizer(cls, value: object) -> object:
        """'none' or an empty value (CLASSLENS_RECOGNIZER=none, --recognizer none) turns it off."""
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> Settings:
        visibility = self.broker_visibility_timeout_seconds or 2 * self.task_time_limit_seconds + 60
        if self.broker_url and self.dispatch_timeout_seconds <= visibility + 10:
            raise ValueError(
                f"dispatch_timeout_seconds ({self.dispatch_timeout_seconds}) must exceed the broker visibility "
                f"timeout ({visibility}) by more than 10 s, or producers give up before a lost batch is redelivered"
            )
        if self.abandoned_after_seconds < 3 * self.producer_heartbeat_seconds:
            raise ValueError(
                f"abandoned_after_seconds ({self.abandoned_after_seconds:g}) must be at least three producer "
                f"heartbeats ({3 * self.producer_heartbeat_seconds:g} s), or a busy producer's analysis is failed"
            )
        if self.detector_input_size % 32:
            raise ValueError(
                f"detector_input_size must be a multiple of 32, got {self.detector_input_size}"
            )
        return self

    # Training and export: `classlens models use ROLE NAME` writes model_selection.json in the
    # model cache; it replaces the built-in default of emotion_model / engagement_model, while
    # a value given as an argument, in the environment or in .env still wins.
    @model_validator(mode="after")
    def _apply_model_selection(self) -> Settings:
        selection = read_model_selection(self.model_cache_dir)
        for role, field_name in MODEL_SELECTION_FIELDS.items():
            if role in selection and field_name not in self.model_fields_set:
                object.__setattr__(self, field_name, selection[role])
        return self

    # The trained engagement model reads the face crop with a network grown from an emotion
    # model, so it reads expressions too. With emotion inference off, the default becomes the
    # baseline that uses head pose and eye cues only; an explicit choice still wins.
    @model_validator(mode="after")
    def _engagement_without_emotion(self) -> Settings:
        if (not self.emotion_inference and "engagement_model" not in self.model_fields_set
                and self.engagement_model == ENGAGEMENT_MODEL_READING_EXPRESSIONS):
            object.__setattr__(self, "engagement_model", ENGAGEMENT_MODEL_WITHOUT_EMOTION)
        return self

    @property
    def resolved_database_url(self) -> str:
        """The store URL, with the SQLite default under ``data_dir`` filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'classlens.sqlite3'}"

    @property
    def resolved_reports_dir(self) -> Path:
        """Where reports go when no ``--out`` is given."""
        return self.reports_dir or self.data_dir / "reports"


#: The default engagement model, which reads expressions from the face crop.
ENGAGEMENT_MODEL_READING_EXPRESSIONS = "classlens-engagement-v1"
#: The engagement model used by default when emotion inference is off: head pose and eye cues only.
ENGAGEMENT_MODEL_WITHOUT_EMOTION = "engagement-baseline-v1"

#: File in the model cache that `classlens models use` writes: {"emotion": NAME, "engagement": NAME}.
MODEL_SELECTION_FILE = "model_selection.json"
#: Roles `classlens models use` can select, and the setting each one fills.
MODEL_SELECTION_FIELDS = {"emotion": "emotion_model", "engagement": "engagement_model"}


def read_model_selection(model_cache_dir: Path) -> dict[str, str]:
    """The models chosen with `classlens models use`, by role; empty when none (or unreadable)."""
    path = model_cache_dir.expanduser() / MODEL_SELECTION_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if k in MODEL_SELECTION_FIELDS and isinstance(v, str) and v}


#: Environment variables with the prefix that are not settings (used by the test suite only).
_NON_SETTING_PREFIX = "CLASSLENS_TEST_"


def unknown_environment_keys() -> list[str]:
    """``CLASSLENS_*`` environment variables that name no setting (typos)."""
    fields = {name.upper() for name in Settings.model_fields}
    return sorted(
        key for key in os.environ
        if key.startswith("CLASSLENS_") and not key.startswith(_NON_SETTING_PREFIX)
        and key.removeprefix("CLASSLENS_") not in fields
    )


def load_settings(**overrides: object) -> Settings:
    """Build :class:`Settings`, turning validation errors into one readable line per bad key."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    unknown = unknown_environment_keys()
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) in the environment: {', '.join(unknown)}; see docs/configuration.md"
        )
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
