"""Aggregation: store rows in, frozen report data out.

Every function here is pure except :func:`build_report_data`, which only reads the
store. The report templates, the charts and the exports all work from the
:class:`ReportData` it returns, so a number shown in a table, drawn in a chart and
written to the CSV is the same number.

Time is put on one grid for the whole class: the sampled timestamps of every stream,
clustered so that samples of different meeting feeds taken within half a sampling
period of each other count as the same moment. For a recording (one stream) the grid
is exactly the sampled timestamps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from kernel.errors import BadInputError
from kernel.store import (
    Analysis,
    AnalysisStatus,
    ConsentMode,
    FaceObservation,
    StreamStats,
    Student,
    frame_samples_for,
    observations_for,
    students_for,
)
from kernel.types import EMOTION_LABELS, ENGAGEMENT_LEVELS, nearest_instant
from reports.formatting import format_interval, format_share, format_timestamp, slugify

#: Head turned further than this (degrees, either side) counts as looking away.
LOOK_AWAY_YAW_DEGREES = 30.0
#: Head tilted further than this (degrees, up or down) counts as looking away.
LOOK_AWAY_PITCH_DEGREES = 25.0
#: Eyes-closed probability above which a sample counts as eyes closed.
EYES_CLOSED_THRESHOLD = 0.5
#: Gaze-away probability above which a sample counts as gaze off the screen.
GAZE_AWAY_THRESHOLD = 0.5
#: Highest engagement level (0–3) that counts as disengaged.
DISENGAGED_MAX_LEVEL = 1
#: Share of the visible students that must be disengaged for a class disengagement moment.
DISENGAGED_CLASS_SHARE = 0.4
#: Longest break (seconds of class time) bridged inside one disengagement interval.
MERGE_GAP_SECONDS = 5.0
#: How many lowest-engagement moments a student summary lists.
LOWEST_MOMENTS = 3
#: A listed lowest moment must be actually low: an expected level below this (nearer "low" than "high").
LOW_MOMENT_MAX_SCORE = 1.5
#: Minimum class time between two listed lowest moments of one student.
LOWEST_MOMENT_GAP_SECONDS = 10.0
#: Two-sided 95 % normal quantile, for the intervals around means.
Z_95 = 1.959963984540054
#: The class curve's band needs this many students visible at a moment: the spread of two or three
#: students gives a 95 % interval that covers most of the 0–3 scale and hides the curve itself.
MIN_STUDENTS_FOR_CLASS_BAND = 5
#: Visible share under which a student's numbers get a data-quality note.
LOW_VISIBILITY_SHARE = 0.5
#: Mean top-level probability under which the engagement model counts as unsure.
LOW_CONFIDENCE = 0.5
#: Most earlier sessions of a course shown in a student's trend (the most recent ones).
MAX_TREND_SESSIONS = 10
#: A meeting participant whose video was missing for at most this long (seconds) was still
#: in the room: a stalled feed or a sampling moment that fell between two grid times.
PRESENCE_BRIDGE_SECONDS = 10.0

#: What each consent mode meant for who was analysed, as the reports say it.
CONSENT_DESCRIPTIONS: Mapping[ConsentMode, str] = {
    ConsentMode.everyone: "everyone: every participant's video was analysed",
    ConsentMode.opt_out: "opt-out: every participant except those on the session's opt-out list was analysed",
    ConsentMode.opt_in: "opt-in: only the participants on the session's opt-in list were analysed",
}

_MAX_SCORE = float(len(ENGAGEMENT_LEVELS) - 1)


class AnalysisNotFoundError(BadInputError):
    """The requested analysis is not in the store."""


# ---------------------------------------------------------------------------
# Data


#: How a student's name was found, as the reports say it.
NAME_SOURCE_DESCRIPTIONS = {
    "meeting": "their display name in the meeting",
    "label": "read off the name label of their tile in the recording (OCR)",
    "none": "no name was available: students are numbered in the order they appeared",
}

#: How a recording's frames were read, as the reports say it.
LAYOUT_DESCRIPTIONS = {
    "camera": "one camera picture",
    "gallery": "a meeting's gallery: one tile per participant, named by its label",
}


@dataclass(frozen=True, slots=True)
class AnalysisInfo:
    """A detached copy of the :class:`~kernel.store.Analysis` row the report is about.

    A copy rather than the ORM row, so the report data stays valid after the session
    that read it has closed.
    """

    id: int
    """Primary key of the analysis."""
    kind: str
    """``"recording"`` or ``"meeting"``."""
    source: str
    """The recording's file name or the meeting's address."""
    title: str
    """Human-readable name; may be empty."""
    status: AnalysisStatus
    """running, done or failed."""
    failure_reason: str | None
    """Why the analysis failed, in one line, when it did."""
    created_at: datetime
    """When the analysis started."""
    finished_at: datetime | None
    """When it ended, if it has."""
    sample_fps: float
    """Frames sampled per second of class time."""
    duration_seconds: float
    """Class time covered by the source."""
    frames_sampled: int
    """Sampled frames over all streams."""
    faces_detected: int
    """Faces detected over all sampled frames."""
    emotion_inference: bool
    """Whether emotion models ran; when False no emotion appears anywhere in the report."""
    course: str = ""
    """The course the session belongs to; empty when none was given."""
    owner_id: int | None = None
    """The teacher who owns the session; None for command-line runs."""
    consent_mode: ConsentMode = ConsentMode.everyone
    """Who could be analysed in this session."""
    consent_list_size: int = 0
    """How many names the opt-out or opt-in list held (the names themselves are never shown)."""
    layout: str = "camera"
    """How a recording's frames were read: ``camera`` or ``gallery`` (students named by their tiles' labels)."""
    decoding: str = ""
    """How a recording was decoded (sequential, keyframes or seek, and why); empty for meetings."""

    @classmethod
    def from_row(cls, row: Analysis) -> AnalysisInfo:
        """Copy the fields of an ``Analysis`` row."""
        if row.id is None:
            raise ValueError("AnalysisInfo.from_row: the analysis row has no id (not yet saved)")
        try:
            names: Any = json.loads(row.consent_names_json or "[]")
        except (TypeError, ValueError):
            names = []
        return cls(
            id=row.id,
            kind=row.kind,
            source=row.source,
            title=row.title,
            status=AnalysisStatus(row.status),
            failure_reason=row.failure_reason,
            created_at=row.created_at,
            finished_at=row.finished_at,
            sample_fps=float(row.sample_fps),
            duration_seconds=float(row.duration_seconds),
            frames_sampled=int(row.frames_sampled),
            faces_detected=int(row.faces_detected),
            emotion_inference=bool(row.emotion_inference),
            course=row.course or "",
            owner_id=row.owner_id,
            consent_mode=ConsentMode(row.consent_mode),
            consent_list_size=len(names) if isinstance(names, list) else 0,
            layout=row.layout or "camera",
            decoding=row.decoding or "",
        )

    @property
    def consent_description(self) -> str:
        """The consent mode in words, with the size of its list where it has one."""
        text = CONSENT_DESCRIPTIONS[self.consent_mode]
        if self.consent_mode is not ConsentMode.everyone:
            text += f" ({self.consent_list_size} name{'s' if self.consent_list_size != 1 else ''} on the list)"
        return text

    @property
    def layout_description(self) -> str:
        """How the frames were read, in words."""
        return LAYOUT_DESCRIPTIONS.get(self.layout, self.layout)

    @property
    def display_title(self) -> str:
        """The title, or the source when the analysis has no title."""
        return self.title or self.source

    @property
    def failed(self) -> bool:
        """Whether the analysis failed."""
        return self.status is AnalysisStatus.failed

    @property
    def running(self) -> bool:
        """Whether the analysis was still running when the data was read."""
        return self.status is AnalysisStatus.running


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model that produced the numbers, as recorded in ``Analysis.models_json``."""

    role: str
    """What the model does in the pipeline: ``detector``, ``emotion``, ``engagement`` …"""
    name: str
    """The model's name."""
    sha256: str
    """Digest of the exact file that ran; empty when not recorded."""
    licence: str
    """The model's licence; empty when not recorded."""
    description: str
    """What the model is and how it was made."""
    heuristic: bool
    """True for a hand-written baseline rather than a trained model."""

    @property
    def is_engagement(self) -> bool:
        """Whether this is the model that estimates engagement levels."""
        return "engagement" in self.role.lower()


@dataclass(frozen=True, slots=True)
class StudentInfo:
    """A student of the analysis and where their report lives."""

    id: int
    """Primary key of the ``Student`` row."""
    number: int
    """1-based position in the order students first appeared; used in the file name."""
    label: str
    """Display name: ``Student 3`` or the meeting display name (untrusted text)."""
    stream: str
    """The stream the student's face came from."""
    track_id: int
    """The tracker's id for the face within its stream."""
    slug: str
    """File-name-safe form of the label."""
    name_source: str = "none"
    """How the label was found: ``meeting`` (display name), ``label`` (read off a gallery tile) or ``none``."""

    @property
    def name_description(self) -> str:
        """How the student's name was found, in words."""
        return NAME_SOURCE_DESCRIPTIONS.get(self.name_source, NAME_SOURCE_DESCRIPTIONS["none"])

    @property
    def file_name(self) -> str:
        """The student report's file name: ``<number>-<slug>.html``."""
        return f"{self.number}-{self.slug}.html"


@dataclass(frozen=True, slots=True)
class TimelineSample:
    """One student at one sampled moment: visible or not, and what the models said."""

    timestamp: float
    """Class time in seconds (the grid time of the moment)."""
    visible: bool
    """Whether the student's face was detected at this moment; all else is None when not."""
    in_room: bool = True
    """Whether the student's video was sampled at this moment. False before a meeting
    participant joined, after they left, and while their video did not arrive: such a
    moment is absence, not "not visible", and counts in no share. Always True for a
    recording, which has no room to leave."""
    engagement_score: float | None = None
    """Expected engagement level, 0–3."""
    engagement_level: int | None = None
    """Most probable engagement level, 0–3."""
    level_probabilities: tuple[float, float, float, float] | None = None
    """Probabilities of the four engagement levels."""
    confidence: float | None = None
    """The highest level probability: how sure the model was of ``engagement_level``."""
    score_sd: float | None = None
    """Standard deviation of the level under the model's probabilities (per-sample band)."""
    emotion_probabilities: tuple[float, ...] | None = None
    """Probabilities in :data:`~kernel.types.EMOTION_LABELS` order, or None when off."""
    head_yaw: float | None = None
    """Degrees, positive when the face turns to the image's right."""
    head_pitch: float | None = None
    """Degrees, positive when the face tilts up."""
    eyes_closed: float | None = None
    """Probability that the eyes are closed, when a landmark model ran."""
    gaze_away: float | None = None
    """Probability that the gaze is off the screen, when a landmark model ran."""

    @property
    def looking_away(self) -> bool | None:
        """Head turned or tilted beyond the thresholds; None when not visible or unknown."""
        if not self.visible or self.head_yaw is None or self.head_pitch is None:
            return None
        return (
            abs(self.head_yaw) > LOOK_AWAY_YAW_DEGREES
            or abs(self.head_pitch) > LOOK_AWAY_PITCH_DEGREES
        )

    @property
    def eyes_closed_flag(self) -> bool | None:
        """Eyes-closed probability above the threshold; None when unknown."""
        if not self.visible or self.eyes_closed is None:
            return None
        return self.eyes_closed > EYES_CLOSED_THRESHOLD

    @property
    def gaze_away_flag(self) -> bool | None:
        """Gaze-away probability above the threshold; None when unknown."""
        if not self.visible or self.gaze_away is None:
            return None
        return self.gaze_away > GAZE_AWAY_THRESHOLD

    @property
    def dominant_emotion(self) -> str | None:
        """The most probable emotion at this moment, or None."""
        if self.emotion_probabilities is None:
            return None
        probs = self.emotion_probabilities
        # First maximum wins a tie, like numpy's argmax.
        return EMOTION_LABELS[max(range(len(probs)), key=probs.__getitem__)]


@dataclass(frozen=True, slots=True)
class StudentTimeline:
    """Every sampled moment of the class for one student, visible or not, in time order."""

    student: StudentInfo
    """Whose timeline it is."""
    samples: tuple[TimelineSample, ...]
    """One sample per grid time of the class."""

    @property
    def label(self) -> str:
        """The student's display name."""
        return self.student.label

    @property
    def student_id(self) -> int:
        """The student's row id."""
        return self.student.id


@dataclass(frozen=True, slots=True)
class Moment:
    """A point of class time with the student's engagement then."""

    timestamp: float
    """Class time in seconds."""
    engagement_score: float
    """Expected engagement level, 0–3."""
    engagement_level: int
    """Most probable level, 0–3."""
    confidence: float
    """The model's probability of that level."""

    @property
    def time_label(self) -> str:
        """The moment as ``m:ss``."""
        return format_timestamp(self.timestamp)


@dataclass(frozen=True, slots=True)
class AttentionCues:
    """How often attention cues were seen.

    Looking away, eyes closed and gaze away are shares of the samples where the face
    was visible (and the cue known); not visible is a share of all sampled time.
    """

    looking_away_share: float | None
    """Share of visible samples with |yaw| > 30° or |pitch| > 25°; None when never visible."""
    eyes_closed_share: float | None
    """Share of visible samples with eyes-closed probability > 0.5; None when never known."""
    gaze_away_share: float | None
    """Share of visible samples with gaze-away probability > 0.5; None when never known."""
    not_visible_share: float
    """Share of the sampled time in the room in which the face was not detected."""


@dataclass(frozen=True, slots=True)
class PresenceSpan:
    """A stretch of class time in which a student was in the room (their video arrived)."""

    start: float
    """Class time of the first sampled moment of the stretch, seconds."""
    end: float
    """One sampling period after its last sampled moment, seconds."""

    @property
    def label(self) -> str:
        """The stretch as ``m:ss–m:ss``."""
        return format_interval(self.start, self.end)


@dataclass(frozen=True, slots=True)
class StudentSummary:
    """One student's class in numbers, with the uncertainty and data quality behind them."""

    student: StudentInfo
    """Whose summary it is."""
    samples_total: int
    """Sampled moments of the class while the student was in the room."""
    samples_visible: int
    """Sampled moments in which the face was detected."""
    visible_share: float
    """``samples_visible / samples_total`` (0 when nothing was sampled)."""
    seconds_visible: float
    """Class time the face was visible: visible samples times the sampling period."""
    seconds_in_room: float
    """Class time the student was in the room: in-room samples times the sampling period."""
    presence: tuple[PresenceSpan, ...]
    """When the student was in the room (joined → left), in time order."""
    left_reason: str | None
    """Why a meeting participant's video ended (left, the session ended, …); None for recordings."""
    mean_engagement: float | None
    """Mean expected engagement level over visible samples; None when never visible."""
    engagement_se: float | None
    """Standard error of that mean, corrected for samples close in time being alike."""
    engagement_low: float | None
    """Lower end of the 95 % interval of the mean (clipped to 0–3)."""
    engagement_high: float | None
    """Upper end of the 95 % interval of the mean (clipped to 0–3)."""
    effective_samples: float | None
    """How many independent samples the visible ones are worth (lag-1 autocorrelation)."""
    mean_confidence: float | None
    """Mean top-level probability of the engagement model: how sure it was on average."""
    level_shares: tuple[float, float, float, float] | None
    """Share of visible samples at each most-probable level 0–3."""
    dominant_emotion: str | None
    """The emotion most often most probable; None when emotion inference was off."""
    emotion_shares: tuple[tuple[str, float], ...] | None
    """(emotion, share of visible samples where it was the argmax) in label order, or None."""
    cues: AttentionCues
    """Attention cue shares."""
    lowest_moments: tuple[Moment, ...]
    """Up to three lowest-engagement moments, lowest first, at least 10 s apart."""

    @property
    def label(self) -> str:
        """The student's display name."""
        return self.student.label

    @property
    def uncertainty(self) -> float | None:
        """Half-width of the 95 % interval (``mean ± this``), when there is one."""
        if self.engagement_se is None:
            return None
        return Z_95 * self.engagement_se


@dataclass(frozen=True, slots=True)
class ClassPoint:
    """The class at one sampled moment."""

    timestamp: float
    """Class time in seconds."""
    mean_engagement: float | None
    """Mean expected engagement over the students visible then; None when nobody was."""
    band_low: float | None
    """Lower end of the 95 % interval of that mean over students (None under two visible)."""
    band_high: float | None
    """Upper end of that interval."""
    students_visible: int
    """How many students' faces were detected."""
    students_in_room: int
    """How many students were in the room (their video was sampled at this moment)."""
    share_visible: float | None
    """``students_visible`` over ``students_in_room``; None when nobody was in the room."""
    share_disengaged: float | None
    """Share of the visible students at level ≤ 1; None when nobody was visible."""
    disengaged: bool
    """Whether this moment counts as a class disengagement moment."""


@dataclass(frozen=True, slots=True)
class Interval:
    """A span of class time in which the class was disengaged."""

    start: float
    """First disengaged moment, seconds."""
    end: float
    """One sampling period after the last disengaged moment, seconds."""
    peak_share: float
    """Highest share of visible students at level ≤ 1 within the span."""

    @property
    def label(self) -> str:
        """The span as ``m:ss–m:ss``."""
        return format_interval(self.start, self.end)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class HeatmapRow:
    """One student's engagement over the class grid, None where not visible."""

    student: StudentInfo
    """Whose row it is."""
    values: tuple[float | None, ...]
    """Expected engagement level per grid time, or None."""
    in_room: tuple[bool, ...]
    """Per grid time, whether the student was in the room (False: absent, not "not visible")."""


@dataclass(frozen=True, slots=True)
class ClassOverview:
    """The class as a whole over time."""

    timestamps: tuple[float, ...]
    """The class time grid, seconds."""
    points: tuple[ClassPoint, ...]
    """One point per grid time."""
    disengagement_intervals: tuple[Interval, ...]
    """Spans where at least 40 % of the visible students were at level ≤ 1."""
    heatmap: tuple[HeatmapRow, ...]
    """Students × time matrix of expected engagement, None where not visible."""
    sample_period: float
    """Seconds between two sampled moments."""
    end_seconds: float
    """End of class time shown on time axes."""
    mean_engagement: float | None
    """Mean over time of the class mean engagement (moments with someone visible)."""
    mean_share_visible: float
    """Mean over time of the share of the students in the room who were visible."""


@dataclass(frozen=True, slots=True)
class TrendPoint:
    """One student's engagement in one session of the course."""

    analysis_id: int
    """The session."""
    title: str
    """The session's title (or source)."""
    created_at: datetime
    """When the session took place."""
    mean_engagement: float | None
    """Mean expected engagement level over the student's visible samples; None when never visible."""
    engagement_low: float | None
    """Lower end of the 95 % interval of that mean."""
    engagement_high: float | None
    """Upper end of the 95 % interval of that mean."""
    samples_visible: int
    """Samples the mean rests on."""
    current: bool
    """Whether this is the session the report is about."""


@dataclass(frozen=True, slots=True)
class StudentTrend:
    """A student's engagement across the sessions of one course, oldest first, this one last."""

    student: StudentInfo
    """Whose trend it is."""
    points: tuple[TrendPoint, ...]
    """Earlier sessions in which a participant with the same display name took part, then this one."""

    @property
    def earlier_sessions(self) -> int:
        """How many earlier sessions the trend holds."""
        return sum(1 for point in self.points if not point.current)


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything the reports, the charts and the exports show about one analysis."""

    analysis: AnalysisInfo
    """The analysis the report is about."""
    models: tuple[ModelInfo, ...]
    """The models that produced the numbers, by role."""
    students: tuple[StudentInfo, ...]
    """Students in the order they first appeared."""
    timelines: tuple[StudentTimeline, ...]
    """One timeline per student, same order."""
    summaries: tuple[StudentSummary, ...]
    """One summary per student, same order."""
    overview: ClassOverview
    """The class over time."""
    quality_notes: tuple[str, ...]
    """Plain-text notes on data quality a reader should know before trusting the numbers."""
    ignored_observations: int
    """Face observations of tracks that are not students, left out of every number."""
    trends: Mapping[int, StudentTrend] = dataclasses.field(default_factory=dict)
    """Student id -> trend across earlier sessions of the course; empty when trends do not apply."""
    trend_unavailable_reason: str | None = None
    """Why no student is matched across sessions (recordings, no course), or None when they are."""

    @property
    def emotion_enabled(self) -> bool:
        """Whether emotion inference ran (when False the report shows no emotion at all)."""
        return self.analysis.emotion_inference

    @property
    def engagement_model(self) -> ModelInfo | None:
        """The model that estimated engagement, when recorded."""
        for model in self.models:
            if model.is_engagement:
                return model
        return None

    @property
    def engagement_is_heuristic(self) -> bool:
        """Whether engagement came from a heuristic baseline rather than a trained model."""
        model = self.engagement_model
        return model is not None and model.heuristic


# ---------------------------------------------------------------------------
# Pure helpers


def _finite(value: float | None) -> float | None:
    """The value as a float, or None when missing or not finite (NaN never reaches a report)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_models(models_json: str) -> tuple[tuple[ModelInfo, ...], bool]:
    """Parse ``Analysis.models_json``: a JSON map role -> model description.

    Each value is a map with ``name``, ``sha256``, ``licence``, ``description`` and
    ``heuristic``; a plain string is taken as the name. Returns the models sorted by
    role and whether the JSON was readable (an unreadable value gives no models and a
    data-quality note rather than a failed report).
    """
    try:
        raw: Any = json.loads(models_json or "{}")
    except (TypeError, ValueError):
        return (), False
    if not isinstance(raw, dict):
        return (), False
    models: list[ModelInfo] = []
    for role, entry in raw.items():
        fields: Mapping[str, Any] = entry if isinstance(entry, dict) else {"name": entry}
        models.append(
            ModelInfo(
                role=str(role),
                name=str(fields.get("name") or ""),
                sha256=str(fields.get("sha256") or ""),
                licence=str(fields.get("licence") or fields.get("license") or ""),
                description=str(fields.get("description") or ""),
                heuristic=fields.get("heuristic") is True,
            )
        )
    return tuple(sorted(models, key=lambda model: model.role)), True


def sample_period_for(sample_fps: float, timestamps: Sequence[float] = ()) -> float:
    """Seconds between sampled moments: ``1 / sample_fps``.

    When the recorded rate is unusable (0, negative, NaN), the median spacing of the
    timestamps is used instead, and 1 s when there are fewer than two.
    """
    if math.isfinite(sample_fps) and sample_fps > 0:
        return 1.0 / sample_fps
    ordered = sorted(set(timestamps))
    if len(ordered) >= 2:
        spacing = float(np.median(np.diff(ordered)))
        if spacing > 0:
            return spacing
    return 1.0


def build_time_grid(
    timestamps: Iterable[float], sample_period: float, *, on_instants: bool = False
) -> tuple[tuple[float, ...], dict[float, int]]:
    """Cluster sampled timestamps into one class time grid.

    Returns the grid (the first timestamp of each cluster) and a map from every input
    timestamp to its grid index. By default a cluster holds the timestamps less than
    half a sampling period after its first one: meeting feeds are sampled at slightly
    different times, but one stream's own samples, a full period apart, never share one.

    With ``on_instants`` (recordings) a cluster is a sampling instant k · period: a
    sample belongs to the instant nearest to it. Decoding that skips frames takes a
    keyframe up to half a period from its instant, so two consecutive samples may lie
    much less than a period apart and must still stay in their own cells.
    """
    grid: list[float] = []
    index: dict[float, int] = {}
    tolerance = 0.5 * sample_period
    last_instant: int | None = None
    for stamp in sorted({float(t) for t in timestamps if math.isfinite(t)}):
        if on_instants:
            instant = nearest_instant(stamp, sample_period)
            if instant != last_instant:
                grid.append(stamp)
                last_instant = instant
        elif not grid or stamp - grid[-1] >= tolerance - 1e-9:
            grid.append(stamp)
        index[stamp] = len(grid) - 1
    return tuple(grid), index


def student_infos(students: Sequence[Student]) -> tuple[StudentInfo, ...]:
    """Number the students 1, 2, … in the given order and give each a file-name slug."""
    infos: list[StudentInfo] = []
    for number, row in enumerate(students, start=1):
        if row.id is None:
            raise ValueError(f"student_infos: student {row.label!r} has no id (not yet saved)")
        infos.append(
            StudentInfo(
                id=row.id,
                number=number,
                label=row.label,
                stream=row.stream,
                track_id=row.track_id,
                slug=slugify(row.label),
                name_source=row.name_source or "none",
            )
        )
    return tuple(infos)


def _sample_from_observation(
    obs: FaceObservation, timestamp: float, emotion_inference: bool
) -> TimelineSample:
    """Turn one observation into a visible timeline sample."""
    # Plain floats, not numpy: this runs once per observation (hundreds of thousands
    # in a long class), and numpy's per-call overhead dominates on four numbers.
    raw = (obs.engagement_p0, obs.engagement_p1, obs.engagement_p2, obs.engagement_p3)
    probs = [max(0.0, _finite(p) or 0.0) for p in raw]
    total = sum(probs)
    score_sd: float | None = None
    if total > 0:
        probs = [p / total for p in probs]
        expected = sum(k * p for k, p in enumerate(probs))
        score_sd = math.sqrt(max(0.0, sum(p * (k - expected) ** 2 for k, p in enumerate(probs))))
    else:
        expected = float(obs.engagement_level)
    # The stored expected level is authoritative; recompute only when it is unusable.
    score = _finite(obs.engagement_score)
    if score is None:
        score = expected
    level = int(obs.engagement_level)
    if not 0 <= level < len(ENGAGEMENT_LEVELS):
        level = max(range(len(probs)), key=probs.__getitem__)
    emotions: tuple[float, ...] | None = None
    if emotion_inference:
        values = [_finite(getattr(obs, f"emotion_{label}")) for label in EMOTION_LABELS]
        known = [v for v in values if v is not None]
        if len(known) == len(EMOTION_LABELS):
            emotions = tuple(known)
    return TimelineSample(
        timestamp=timestamp,
        visible=True,
        engagement_score=min(_MAX_SCORE, max(0.0, score)),
        engagement_level=level,
        level_probabilities=(probs[0], probs[1], probs[2], probs[3]),
        confidence=max(probs),
        score_sd=score_sd,
        emotion_probabilities=emotions,
        head_yaw=_finite(obs.head_yaw),
        head_pitch=_finite(obs.head_pitch),
        eyes_closed=_finite(obs.eyes_closed),
        gaze_away=_finite(obs.gaze_away),
    )


def build_timelines(
    students: Sequence[StudentInfo],
    observations: Iterable[FaceObservation],
    grid: Sequence[float],
    grid_index: Mapping[float, int],
    *,
    emotion_inference: bool,
    sampled: Mapping[str, frozenset[int]] | None = None,
) -> tuple[tuple[StudentTimeline, ...], int]:
    """One timeline per student over the whole grid, and the count of ignored observations.

    Observations whose (stream, track) is not a student are ignored (and counted). If
    one student has two observations in one grid cluster, the one the detector was
    surest of is kept. ``sampled`` maps each meeting stream to the grid positions at
    which its video was sampled: a student is in the room only there (and wherever
    their face was seen). Without it (a recording) everyone is in the room throughout.
    """
    by_key = {(s.stream, s.track_id): s for s in students}
    chosen: dict[int, dict[int, FaceObservation]] = {s.id: {} for s in students}
    ignored = 0
    for obs in observations:
        student = by_key.get((obs.stream, obs.track_id))
        position = grid_index.get(float(obs.timestamp))
        if student is None or position is None:
            ignored += 1
            continue
        cells = chosen[student.id]
        current = cells.get(position)
        if current is None or obs.detection_score > current.detection_score:
            cells[position] = obs
    timelines = []
    for student in students:
        cells = chosen[student.id]
        stream_cells = sampled.get(student.stream, frozenset()) if sampled is not None else None
        samples = tuple(
            _sample_from_observation(cells[i], t, emotion_inference)
            if i in cells
            else TimelineSample(
                timestamp=t, visible=False, in_room=stream_cells is None or i in stream_cells
            )
            for i, t in enumerate(grid)
        )
        timelines.append(StudentTimeline(student=student, samples=samples))
    return tuple(timelines), ignored


def mean_with_interval(
    values: Sequence[float],
) -> tuple[float, float | None, float | None, float | None, float]:
    """Mean of a time series with a 95 % interval that respects autocorrelation.

    Returns ``(mean, standard_error, low, high, effective_n)``. Engagement one second
    apart is nearly the same reading twice, so the plain ``sd / sqrt(n)`` would claim
    far more certainty than the data holds; the effective sample size of an AR(1)
    series, ``n (1 - r1) / (1 + r1)`` with r1 the lag-1 autocorrelation, corrects for
    that. The interval is clipped to the 0–3 scale. Under two values there is no
    standard error and no interval.
    """
    if not values:
        raise ValueError("mean_with_interval: no values")
    data = np.asarray(values, dtype=np.float64)
    n = int(data.size)
    mean = float(data.mean())
    if n < 2:
        return mean, None, None, None, float(n)
    centred = data - mean
    variance = float(centred @ centred)
    r1 = float(centred[:-1] @ centred[1:]) / variance if variance > 0 else 0.0
    # A negative r1 would inflate n beyond the data; treat it as independent samples.
    effective = n * (1.0 - r1) / (1.0 + r1) if r1 > 0 else float(n)
    effective = min(float(n), max(1.0, effective))
    se = float(data.std(ddof=1)) / math.sqrt(effective)
    low = max(0.0, mean - Z_95 * se)
    high = min(_MAX_SCORE, mean + Z_95 * se)
    return mean, se, low, high, effective


def lowest_moments(
    samples: Sequence[TimelineSample],
    count: int = LOWEST_MOMENTS,
    min_gap: float = LOWEST_MOMENT_GAP_SECONDS,
) -> tuple[Moment, ...]:
    """The ``count`` lowest-engagement visible samples that are actually low, lowest first.

    Only samples below :data:`LOW_MOMENT_MAX_SCORE` count: a student who was never low has no
    "lowest moments" to check, rather than their three least-high ones. Moments closer than
    ``min_gap`` seconds to one already picked are skipped, so the three moments are three
    different episodes rather than three seconds of one dip. Ties go to the earlier moment.
    """
    visible = [s for s in samples if s.visible and s.engagement_score is not None
               and s.engagement_score < LOW_MOMENT_MAX_SCORE]
    visible.sort(key=lambda s: (s.engagement_score, s.timestamp))
    picked: list[Moment] = []
    for sample in visible:
        if len(picked) >= count:
            break
        if any(abs(sample.timestamp - m.timestamp) < min_gap for m in picked):
            continue
        assert sample.engagement_score is not None  # filtered above; narrows for mypy
        picked.append(
            Moment(
                timestamp=sample.timestamp,
                engagement_score=sample.engagement_score,
                engagement_level=sample.engagement_level
                if sample.engagement_level is not None
                else 0,
                confidence=sample.confidence if sample.confidence is not None else 0.0,
            )
        )
    return tuple(picked)


def _share(flags: Sequence[bool | None]) -> float | None:
    """Share of True among the known flags; None when none is known."""
    known = [f for f in flags if f is not None]
    if not known:
        return None
    return sum(1 for f in known if f) / len(known)


def presence_spans(
    samples: Sequence[TimelineSample],
    sample_period: float,
    bridge_seconds: float = PRESENCE_BRIDGE_SECONDS,
) -> tuple[PresenceSpan, ...]:
    """The stretches of class time a student was in the room, from their in-room samples.

    Missing video of at most ``bridge_seconds`` (or two sampling periods, if longer) is
    bridged: a stalled feed, or a meeting stream's sample that fell on a neighbouring
    grid time, is not a leave.
    """
    bridge = max(bridge_seconds, 2.0 * sample_period) + 1e-6
    spans: list[PresenceSpan] = []
    start: float | None = None
    end = 0.0
    for sample in samples:
        if not sample.in_room:
            continue
        if start is not None and sample.timestamp - end <= bridge:
            end = sample.timestamp + sample_period
            continue
        if start is not None:
            spans.append(PresenceSpan(start=start, end=end))
        start, end = sample.timestamp, sample.timestamp + sample_period
    if start is not None:
        spans.append(PresenceSpan(start=start, end=end))
    return tuple(spans)


def summarize_student(
    timeline: StudentTimeline, sample_period: float, *, left_reason: str | None = None
) -> StudentSummary:
    """Summarise one student's timeline: engagement with uncertainty, visibility, cues, emotions.

    Every share is of the time the student was in the room; ``left_reason`` is why a
    meeting participant's video ended (None for a recording).
    """
    samples = timeline.samples
    in_room = [s for s in samples if s.in_room]
    visible = [s for s in in_room if s.visible]
    total = len(in_room)
    scores = [s.engagement_score for s in visible if s.engagement_score is not None]
    mean: float | None = None
    se = low = high = effective = None
    if scores:
        mean, se, low, high, effective = mean_with_interval(scores)
    confidences = [s.confidence for s in visible if s.confidence is not None]
    level_shares: tuple[float, float, float, float] | None = None
    levels = [s.engagement_level for s in visible if s.engagement_level is not None]
    if levels:
        counts = [levels.count(k) / len(levels) for k in range(len(ENGAGEMENT_LEVELS))]
        level_shares = (counts[0], counts[1], counts[2], counts[3])
    emotion_shares: tuple[tuple[str, float], ...] | None = None
    dominant: str | None = None
    argmaxes = [s.dominant_emotion for s in visible if s.emotion_probabilities is not None]
    if argmaxes:
        emotion_shares = tuple(
            (label, argmaxes.count(label) / len(argmaxes)) for label in EMOTION_LABELS
        )
        # Ties go to the label listed first, so the dominant emotion is deterministic.
        dominant = max(emotion_shares, key=lambda pair: pair[1])[0]
    cues = AttentionCues(
        looking_away_share=_share([s.looking_away for s in visible]),
        eyes_closed_share=_share([s.eyes_closed_flag for s in visible]),
        gaze_away_share=_share([s.gaze_away_flag for s in visible]),
        not_visible_share=(total - len(visible)) / total if total else 1.0,
    )
    return StudentSummary(
        student=timeline.student,
        samples_total=total,
        samples_visible=len(visible),
        visible_share=len(visible) / total if total else 0.0,
        seconds_visible=len(visible) * sample_period,
        seconds_in_room=total * sample_period,
        presence=presence_spans(samples, sample_period),
        left_reason=left_reason,
        mean_engagement=mean,
        engagement_se=se,
        engagement_low=low,
        engagement_high=high,
        effective_samples=effective,
        mean_confidence=float(np.mean(confidences)) if confidences else None,
        level_shares=level_shares,
        dominant_emotion=dominant,
        emotion_shares=emotion_shares,
        cues=cues,
        lowest_moments=lowest_moments(samples),
    )


def merge_moments(
    points: Sequence[ClassPoint],
    sample_period: float,
    max_gap_seconds: float = MERGE_GAP_SECONDS,
) -> tuple[Interval, ...]:
    """Merge disengaged class moments into intervals.

    Consecutive disengaged moments form one interval. A break of at most
    ``max_gap_seconds`` (and at least one sample) is bridged: a few ordinary samples in
    the middle of a dip do not end it, and a teacher reads one stretch rather than a
    scatter of fragments. An interval ends one sampling period after its last
    disengaged moment, so a dip sampled at 20 s … 29 s reads 0:20–0:30.
    """
    intervals: list[Interval] = []
    start: float | None = None
    end = 0.0
    peak = 0.0
    bridge = max(max_gap_seconds, sample_period) + 1e-6
    for point in points:
        if not point.disengaged:
            continue
        share = point.share_disengaged or 0.0
        if start is not None and point.timestamp - end <= bridge:
            end = point.timestamp + sample_period
            peak = max(peak, share)
            continue
        if start is not None:
            intervals.append(Interval(start=start, end=end, peak_share=peak))
        start, end, peak = point.timestamp, point.timestamp + sample_period, share
    if start is not None:
        intervals.append(Interval(start=start, end=end, peak_share=peak))
    return tuple(intervals)


def build_overview(
    timelines: Sequence[StudentTimeline],
    grid: Sequence[float],
    sample_period: float,
    duration_seconds: float,
) -> ClassOverview:
    """The class over time: mean engagement, visibility, disengagement intervals, heatmap.

    A moment counts as disengaged when at least 40 % of the students visible then are
    at level ≤ 1. With two or more students in the class, at least two must be visible:
    one face among absent ones is that student's dip, shown in their own report, not
    the class's. The share visible is of the students in the room at that moment.
    """
    n_students = len(timelines)
    min_visible = 2 if n_students >= 2 else 1
    points: list[ClassPoint] = []
    for i, t in enumerate(grid):
        present = [tl.samples[i] for tl in timelines if tl.samples[i].in_room]
        seen = [s for s in present if s.visible]
        scores = [s.engagement_score for s in seen if s.engagement_score is not None]
        mean = band_low = band_high = share_disengaged = None
        if scores:
            mean = float(np.mean(scores))
            if len(scores) >= MIN_STUDENTS_FOR_CLASS_BAND:
                se = float(np.std(scores, ddof=1)) / math.sqrt(len(scores))
                band_low = max(0.0, mean - Z_95 * se)
                band_high = min(_MAX_SCORE, mean + Z_95 * se)
        levels = [s.engagement_level for s in seen if s.engagement_level is not None]
        if levels:
            share_disengaged = sum(1 for lv in levels if lv <= DISENGAGED_MAX_LEVEL) / len(levels)
        disengaged = (
            share_disengaged is not None
            and len(levels) >= min_visible
            and share_disengaged >= DISENGAGED_CLASS_SHARE - 1e-9
        )
        points.append(
            ClassPoint(
                timestamp=t,
                mean_engagement=mean,
                band_low=band_low,
                band_high=band_high,
                students_visible=len(seen),
                students_in_room=len(present),
                share_visible=len(seen) / len(present) if present else None,
                share_disengaged=share_disengaged,
                disengaged=disengaged,
            )
        )
    heatmap = tuple(
        HeatmapRow(
            student=tl.student,
            values=tuple(s.engagement_score if s.visible else None for s in tl.samples),
            in_room=tuple(s.in_room for s in tl.samples),
        )
        for tl in timelines
    )
    means = [p.mean_engagement for p in points if p.mean_engagement is not None]
    shares = [p.share_visible for p in points if p.share_visible is not None]
    end = max(duration_seconds, (grid[-1] + sample_period) if grid else 0.0)
    return ClassOverview(
        timestamps=tuple(grid),
        points=tuple(points),
        disengagement_intervals=merge_moments(points, sample_period),
        heatmap=heatmap,
        sample_period=sample_period,
        end_seconds=end if end > 0 else sample_period,
        mean_engagement=float(np.mean(means)) if means else None,
        mean_share_visible=float(np.mean(shares)) if shares else 0.0,
    )


def quality_notes(
    analysis: AnalysisInfo,
    summaries: Sequence[StudentSummary],
    overview: ClassOverview,
    *,
    ignored_observations: int,
    models_readable: bool,
) -> tuple[str, ...]:
    """Plain-text notes a reader should see before trusting the numbers."""
    notes: list[str] = []
    if analysis.running:
        notes.append(
            "The analysis was still running when this report was made; the numbers are partial."
        )
    if not overview.timestamps:
        notes.append("No frames were sampled, so there is nothing to measure.")
    elif not summaries:
        notes.append("No face was tracked in the sampled frames, so no student could be measured.")
    low = [s for s in summaries if s.visible_share < LOW_VISIBILITY_SHARE]
    if low:
        names = "; ".join(f"{s.label} ({format_share(s.visible_share)})" for s in low)
        notes.append(
            f"Visible less than {format_share(LOW_VISIBILITY_SHARE)} of the sampled time: {names}. "
            "Their numbers rest on few samples and may not represent the whole class."
        )
    unsure = [
        s for s in summaries if s.mean_confidence is not None and s.mean_confidence < LOW_CONFIDENCE
    ]
    if unsure:
        names = "; ".join(s.label for s in unsure)
        notes.append(
            f"The engagement model was unsure for: {names} (its most probable level had on average "
            f"less than {format_share(LOW_CONFIDENCE)} probability)."
        )
    if ignored_observations:
        notes.append(
            f"{ignored_observations} face observation(s) belonged to faces not counted as students "
            "(seen too briefly, or excluded) and were left out of every number."
        )
    if not models_readable:
        notes.append("The record of which models ran could not be read.")
    if analysis.decoding and overview.timestamps:
        offset = largest_sample_offset(overview.timestamps, analysis.sample_fps)
        notes.append(
            f"Decoding: {analysis.decoding}. A sample lies up to {offset:.2f} s from its sampling instant; "
            "the times in the CSV are the frames' own."
        )
    return tuple(notes)


def largest_sample_offset(timestamps: Iterable[float], sample_fps: float) -> float:
    """The largest distance between a sample's own time and the sampling instant k / sample_fps nearest to it."""
    if not (math.isfinite(sample_fps) and sample_fps > 0):
        return 0.0
    period = 1.0 / sample_fps
    return max((abs(t - nearest_instant(t, period) * period) for t in timestamps), default=0.0)


# ---------------------------------------------------------------------------
# Trends across the sessions of a course


def trend_unavailable_reason(analysis: AnalysisInfo) -> str | None:
    """Why students of this session are not followed across sessions, or None when they are.

    Only a meeting display name is an identity a teacher chose to show; "Student 3" of a
    recording is just the third face to appear, and a face is never recognised across
    sessions, so recordings are never matched.
    """
    if analysis.kind != "meeting":
        return (
            "Students of a recording are numbered in the order their faces appeared (\"Student 3\"); "
            "that number is not an identity, and no face is recognised across sessions, so this report "
            "does not compare a student with earlier sessions."
        )
    if not analysis.course:
        return "This session belongs to no course, so there are no earlier sessions to compare with."
    return None


def _earlier_sessions(session: Session, analysis: AnalysisInfo) -> list[Analysis]:
    """The most recent finished meetings of the same course and owner before this one, oldest first."""
    statement = (
        select(Analysis)
        .where(
            col(Analysis.course) == analysis.course,
            col(Analysis.kind) == "meeting",
            col(Analysis.status) == AnalysisStatus.done,
            col(Analysis.created_at) < analysis.created_at,
            col(Analysis.id) != analysis.id,
        )
        .order_by(col(Analysis.created_at).desc(), col(Analysis.id).desc())
        .limit(MAX_TREND_SESSIONS)
    )
    # The course name is the teacher's own label: another teacher's "Physics" is another course.
    if analysis.owner_id is None:
        statement = statement.where(col(Analysis.owner_id).is_(None))
    else:
        statement = statement.where(col(Analysis.owner_id) == analysis.owner_id)
    return list(reversed(list(session.exec(statement))))


def _unique_labels(labels: Iterable[str]) -> set[str]:
    """Labels held by exactly one student: two participants called "Alex" are never merged."""
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return {label for label, count in seen.items() if count == 1}


def build_trends(
    session: Session, analysis: AnalysisInfo, summaries: Sequence[StudentSummary]
) -> dict[int, StudentTrend]:
    """Each student's mean engagement in the earlier meetings of this course, matched by display name.

    A student is matched only by an exact display name that is unique within both
    sessions; students seen in no earlier session get no trend. Returns an empty map
    when :func:`trend_unavailable_reason` gives a reason.
    """
    if trend_unavailable_reason(analysis) is not None:
        return {}
    labels = _unique_labels(s.label for s in summaries)
    earlier = _earlier_sessions(session, analysis)
    if not labels or not earlier:
        return {}
    sessions_by_id = {row.id: row for row in earlier if row.id is not None}
    matched_students = list(
        session.exec(
            select(Student).where(
                col(Student.analysis_id).in_(list(sessions_by_id)), col(Student.label).in_(labels)
            )
        )
    )
    per_session: dict[int, list[Student]] = {}
    for student_row in matched_students:
        per_session.setdefault(student_row.analysis_id, []).append(student_row)
    # (analysis id, stream, track) of every matched earlier student, and whose label it carries.
    matched: dict[tuple[int, str, int], str] = {}
    for analysis_id, students in per_session.items():
        unique = _unique_labels(s.label for s in students)
        for student in students:
            if student.label in unique:
                matched[(analysis_id, student.stream, student.track_id)] = student.label
    scores: dict[tuple[int, str], list[float]] = {}
    if matched:
        observations = session.exec(
            select(
                FaceObservation.analysis_id,
                FaceObservation.stream,
                FaceObservation.track_id,
                FaceObservation.engagement_score,
            )
            .where(col(FaceObservation.analysis_id).in_(list(per_session)))
            .order_by(col(FaceObservation.analysis_id), col(FaceObservation.timestamp))
        )
        for analysis_id, stream, track_id, score in observations:
            label = matched.get((analysis_id, stream, track_id))
            value = _finite(score)
            if label is not None and value is not None:
                scores.setdefault((analysis_id, label), []).append(min(_MAX_SCORE, max(0.0, value)))
    trends: dict[int, StudentTrend] = {}
    for summary in summaries:
        if summary.label not in labels:
            continue
        points: list[TrendPoint] = []
        for past in earlier:
            values = scores.get((past.id or 0, summary.label))
            if not values:
                continue
            mean, _se, low, high, _n = mean_with_interval(values)
            points.append(
                TrendPoint(
                    analysis_id=past.id or 0,
                    title=past.title or past.source,
                    created_at=past.created_at,
                    mean_engagement=mean,
                    engagement_low=low,
                    engagement_high=high,
                    samples_visible=len(values),
                    current=False,
                )
            )
        if not points:
            continue
        points.append(
            TrendPoint(
                analysis_id=analysis.id,
                title=analysis.display_title,
                created_at=analysis.created_at,
                mean_engagement=summary.mean_engagement,
                engagement_low=summary.engagement_low,
                engagement_high=summary.engagement_high,
                samples_visible=summary.samples_visible,
                current=True,
            )
        )
        trends[summary.student.id] = StudentTrend(student=summary.student, points=tuple(points))
    return trends


# ---------------------------------------------------------------------------
# Entry point


def build_report_data(session: Session, analysis_id: int) -> ReportData:
    """Read one analysis from the store and compute everything its reports show.

    Raises :class:`AnalysisNotFoundError` when the analysis does not exist. A failed
    analysis still gets report data (with whatever rows exist), so its report can say
    that it failed and why.
    """
    row = session.get(Analysis, analysis_id)
    if row is None:
        raise AnalysisNotFoundError(f"analysis {analysis_id} is not in the store")
    analysis = AnalysisInfo.from_row(row)
    models, models_readable = parse_models(row.models_json)
    students = student_infos(students_for(session, analysis_id))
    observations = observations_for(session, analysis_id)
    frames = frame_samples_for(session, analysis_id)
    # Observations are taken from sampled frames, but add their timestamps to the grid
    # anyway so a missing FrameSample row can never drop a measured face.
    stamps = [f.timestamp for f in frames] + [o.timestamp for o in observations]
    period = sample_period_for(analysis.sample_fps, stamps)
    grid, index = build_time_grid(stamps, period, on_instants=analysis.kind == "recording")
    streams = session.exec(select(StreamStats).where(StreamStats.analysis_id == analysis_id)).all()
    sampled: dict[str, frozenset[int]] | None = None
    if streams:
        # A meeting: a student is in the room where their stream's video was sampled.
        cells: dict[str, set[int]] = {}
        for frame in frames:
            position = index.get(float(frame.timestamp))
            if position is not None:
                cells.setdefault(frame.stream, set()).add(position)
        sampled = {stream: frozenset(positions) for stream, positions in cells.items()}
    left_reasons = {row.stream: row.left_reason for row in streams}
    timelines, ignored = build_timelines(
        students,
        observations,
        grid,
        index,
        emotion_inference=analysis.emotion_inference,
        sampled=sampled,
    )
    summaries = tuple(
        summarize_student(tl, period, left_reason=left_reasons.get(tl.student.stream))
        for tl in timelines
    )
    overview = build_overview(timelines, grid, period, analysis.duration_seconds)
    return ReportData(
        analysis=analysis,
        models=models,
        students=students,
        timelines=timelines,
        summaries=summaries,
        overview=overview,
        quality_notes=quality_notes(
            analysis,
            summaries,
            overview,
            ignored_observations=ignored,
            models_readable=models_readable,
        ),
        ignored_observations=ignored,
        trends=build_trends(session, analysis, summaries),
        trend_unavailable_reason=trend_unavailable_reason(analysis),
    )
