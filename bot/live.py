"""Live analysis of a meeting: every participant's video track, sampled, detected, tracked and dispatched.

A :class:`LiveSession` is the live counterpart of ``classlens.analysis.analyze_recording``.
It owns one analysis (``Analysis.kind == "meeting"``) and runs, for every participant:

```
track.recv() ─► sampler ─► bounded queue ─► threads: ndarray ─► FaceDetector ─► StudentTracker ─► crops ─► dispatcher
 (every frame,   (class     (drops the oldest  (shared by all participants; insightface and onnxruntime
  on the loop)    clock)     waiting frame)      release the GIL)
```

The class clock is seconds since :meth:`LiveSession.start` (monotonic), so every
participant's samples share one timeline. A participant's stream is its display name
(``"Ada [2]"`` when two people in the meeting share a name), which is the student's
identity in the session; extra faces on a shared camera are further students under that
stream, labelled ``"Ada (2)"`` and so on. Two tracks that only took turns for one face on a
participant's camera (the recogniser unsure of a face behind a hand) are one student
(:func:`pipeline.finalise.join_alternating_students`).

Nothing here blocks the event loop: the reader tasks only await frames and queue the
ones that are due; conversion, detection, tracking, cropping and dispatch run on the
thread pool; database writes run in threads too. Frames are never written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from sqlalchemy import Engine

from kernel.consent import ConsentPolicy
from kernel.settings import Settings, VideoLayout
from kernel.store import (
    NAME_FROM_LABEL,
    NAME_FROM_MEETING,
    Analysis,
    AnalysisStatus,
    FrameSample,
    StreamGap,
    StreamStats,
    insert_ignoring_duplicates,
    session_scope,
    utcnow,
)
from kernel.types import ByteArray, VideoFrame
from pipeline.capture import CapturePipeline
from pipeline.finalise import finalise_students, join_alternating_students, mark_failed
from pipeline.gallery import GallerySplitter, gallery_splitter_for
from pipeline.liveness import ProducerHeartbeat
from pipeline.models import PipelineComponents
from workers.dispatch import CropDispatcher, InProcessDispatcher

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)

#: Track ids of participant n start at n × this, so ids are unique within the analysis.
TRACK_ID_STRIDE = 1_000_000
#: Sample rows are written to the store in chunks of this many, from the worker threads.
SAMPLE_ROWS_PER_WRITE = 256
#: The falling-behind warning is repeated at most this often (seconds of class time).
BEHIND_WARNING_INTERVAL = 30.0
#: Latencies kept for the percentiles (the most recent ones).
LATENCY_WINDOW = 20_000



class SharedComponents:
    """The pipeline's models, loaded once per process on first use (in a thread) and shared by live sessions.

    The models are read-only, so every meeting and every WHIP session of one serve
    process can use one copy instead of loading their own.
    """

    def __init__(self, settings: Settings, components: PipelineComponents | None = None) -> None:
        self._settings = settings
        self._components = components
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, settings: Settings, components: PipelineComponents | SharedComponents | None) -> SharedComponents:
        """``components`` as shared components: already shared ones as they are, loaded (or no) models wrapped."""
        return components if isinstance(components, SharedComponents) else cls(settings, components)

    async def get(self) -> PipelineComponents:
        """The models, loading them on the first call."""
        async with self._lock:
            if self._components is None:
                self._components = await asyncio.to_thread(PipelineComponents.load, self._settings)
            return self._components

def create_live_analysis(
    engine: Engine,
    settings: Settings,
    *,
    source: str,
    title: str,
    owner_id: int | None,
    course: str,
    host_email: str | None,
    consent: ConsentPolicy,
) -> int:
    """Create the ``Analysis`` row of a meeting (status running) and return its id."""
    with session_scope(engine) as session:
        analysis = Analysis(kind="meeting", source=source, title=title, sample_fps=settings.sample_fps,
                            emotion_inference=settings.emotion_inference, owner_id=owner_id, course=course,
                            host_email=host_email, consent_mode=consent.mode, consent_names_json=consent.names_json())
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        return analysis.id


@dataclass
class ParticipantStats:
    """Counters of one participant's feed (one stream)."""

    stream: str
    """The stream key: the display name, disambiguated when two participants share it."""
    display_name: str
    """The participant's display name in the meeting."""
    frames_received: int = 0
    """Frames that arrived from the track (every one is read, so aiortc's buffers never grow)."""
    frames_sampled: int = 0
    """Frames detected, tracked and dispatched."""
    frames_dropped: int = 0
    """Frames due by the sampling rate that were dropped because the bot fell behind."""
    faces_detected: int = 0
    """Faces found over all sampled frames."""
    students_live: int = 0
    """Tracks of this stream that already count as students."""
    first_frame_at: float | None = None
    """Class time of the first frame received."""
    last_frame_at: float | None = None
    """Class time of the latest frame received."""
    active: bool = True
    """Whether the participant's track is being read now."""
    left_reason: str | None = None
    """Why the feed ended, once it did."""


@dataclass
class LiveStats:
    """A snapshot of a live session's counters."""

    participants: dict[str, ParticipantStats]
    """Per participant id (copies)."""
    excluded: int
    """Participants the consent policy kept out (never subscribed to or analysed)."""
    students_live: int
    """Tracks that already count as students (seen long and clearly enough), over every stream."""
    crops_submitted: int
    """Face crops handed to the dispatcher."""
    crops_stored: int
    """Face crops whose results are in the store."""
    latencies: list[float] = field(default_factory=list)
    """Seconds from a sampled frame's arrival to its faces' results being stored (the most recent, oldest first)."""

    @property
    def frames_dropped(self) -> int:
        """Frames dropped over every participant."""
        return sum(p.frames_dropped for p in self.participants.values())

    @property
    def frames_received(self) -> int:
        """Frames that arrived over every participant (0: the session never received media)."""
        return sum(p.frames_received for p in self.participants.values())

    @property
    def frames_sampled(self) -> int:
        """Frames analysed over every participant."""
        return sum(p.frames_sampled for p in self.participants.values())

    def latency_percentile(self, percent: float) -> float | None:
        """The given percentile (0–100) of frame-arrival → stored latency, None before any result."""
        if not self.latencies:
            return None
        return float(np.percentile(np.asarray(self.latencies), percent))


@dataclass
class LiveOutcome:
    """How a live session ended."""

    analysis_id: int
    """Id of the analysis in the store."""
    status: AnalysisStatus
    """``done`` or ``failed``."""
    students: int
    """Students found (tracks seen long enough)."""
    frames_sampled: int
    """Frames analysed over every participant."""
    frames_dropped: int
    """Frames dropped over every participant."""
    faces_detected: int
    """Faces detected over every sampled frame."""
    crops_stored: int
    """Face crops whose results are in the store."""
    failure_reason: str | None = None
    """Why the session failed, in one line."""


@runtime_checkable
class _Flushable(Protocol):
    def flush(self) -> None: ...


@dataclass
class _Pending:
    """A sampled frame waiting for detection."""

    frame: av.VideoFrame
    class_time: float
    arrived: float  # time.monotonic() at arrival, for latency
    # Class time since which this feed's slot has waited for the analyser: a frame that
    # replaces a dropped one inherits it, so the lag counts the backlog, not the newest frame's age.
    waiting_since: float


class _Stream:
    """What a session keeps per stream across a participant's reconnects: capture pipeline and counters."""

    def __init__(self, key: str, display_name: str, index: int, settings: Settings,
                 components: PipelineComponents, analysis_id: int, gallery: GallerySplitter | None = None) -> None:
        self.key = key
        self.display_name = display_name
        self.pipeline = CapturePipeline.configured(components.detector, components.embedder, settings,
                                                   analysis_id=analysis_id, first_track_id=index * TRACK_ID_STRIDE + 1,
                                                   gallery=gallery)
        self.stats = ParticipantStats(stream=key, display_name=display_name)
        self.next_slot = 0
        self.processor: asyncio.Task[None] | None = None
        """The latest task analysing this stream's frames (a reconnect's task waits for its predecessor)."""


class _Participant:
    """One connected participant: its track, its queue and its two tasks."""

    def __init__(self, participant_id: str, stream: _Stream, track: MediaStreamTrack) -> None:
        self.participant_id = participant_id
        self.stream = stream
        self.track = track
        self.queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None
        self.processor: asyncio.Task[None] | None = None
        self.last_frame: float | None = None
        """time.monotonic() of this connection's latest frame; the stream's own time outlives a reconnect."""


class _LatencyTracker:
    """Frame-arrival → stored latency for a dispatcher that stores crops in the order they were submitted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: deque[tuple[int, float]] = deque()
        self._submitted = 0
        self._stored = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def submitted(self, count: int, arrived: float) -> None:
        with self._lock:
            self._submitted += count
            self._expected.append((self._submitted, arrived))

    def stored(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._stored += count
            while self._expected and self._expected[0][0] <= self._stored:
                self.latencies.append(now - self._expected.popleft()[1])


class LiveSession:
    """Analyses every consenting participant's video while a class runs; explicit ``start`` and ``aclose``."""

    def __init__(self, settings: Settings, engine: Engine, analysis_id: int, *,
                 components: PipelineComponents | None = None, dispatcher: CropDispatcher | None = None,
                 layout: VideoLayout = VideoLayout.camera) -> None:
        self.settings = settings
        self.engine = engine
        self.analysis_id = analysis_id
        self.layout = layout
        """How each incoming video is read: ``camera`` (a participant's camera, the default) or a shared
        meeting window (``gallery``/``auto``) split into its participants' tiles, named by their labels."""
        self._components = components
        self._dispatcher = dispatcher
        self._latency = _LatencyTracker()
        self._consent = ConsentPolicy.everyone()
        self._started_at: float | None = None
        self._pool = ThreadPoolExecutor(max_workers=settings.live_worker_threads,
                                        thread_name_prefix="classlens-live")
        self._streams: dict[str, _Stream] = {}
        self._participants: dict[str, _Participant] = {}
        self._finished_tasks: list[asyncio.Task[None]] = []
        self._excluded = 0
        self._gaps: list[dict[str, Any]] = []
        self._samples: list[FrameSample] = []
        self._samples_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._heartbeat: ProducerHeartbeat | None = None
        self._error: BaseException | None = None
        self._outcome: LiveOutcome | None = None
        self._closing = asyncio.Lock()
        self._stopping = False
        self._last_behind_warning = -BEHIND_WARNING_INTERVAL

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models (unless given) and the session's consent policy, start the clock and the dispatcher."""
        if self._started_at is not None:
            return
        try:
            await asyncio.to_thread(self._prepare)
        except BaseException as exc:
            await self.fail(_one_line(exc))
            raise
        self._started_at = time.monotonic()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically(),
                                                               name=f"live-{self.analysis_id}-flush")

    def _prepare(self) -> None:
        """Blocking part of :meth:`start`, run in a thread."""
        with session_scope(self.engine) as session:
            analysis = session.get(Analysis, self.analysis_id)
            if analysis is None:
                raise ValueError(f"no analysis {self.analysis_id} in the store")
            if analysis.status is not AnalysisStatus.running:
                raise ValueError(f"analysis {self.analysis_id} is {analysis.status.value}, not running")
            self._consent = ConsentPolicy.from_store(analysis.consent_mode, analysis.consent_names_json)
        components = self._components or PipelineComponents.load(self.settings)
        # Models shared with other sessions never bring emotion inference back into one that switched it off.
        components = replace(components, models=components.models.for_settings(self.settings.emotion_inference))
        self._components = components
        with session_scope(self.engine) as session:
            analysis = session.get(Analysis, self.analysis_id)
            assert analysis is not None
            analysis.models_json = json.dumps(components.models.provenance, sort_keys=True)
        if self._dispatcher is None:
            self._dispatcher = self._make_dispatcher(components)
        self._heartbeat = ProducerHeartbeat(self.engine, self.analysis_id,
                                            self.settings.producer_heartbeat_seconds).start()

    def _make_dispatcher(self, components: PipelineComponents) -> CropDispatcher:
        settings = self.settings
        if settings.broker_url:
            from workers.celery_app import make_celery_app
            from workers.celery_dispatch import CeleryDispatcher

            # Results are not ordered with Celery, so latencies are approximate there.
            return CeleryDispatcher(
                make_celery_app(settings), self.engine, self.analysis_id, queue=settings.inference_queue,
                batch_size=settings.batch_size, timeout_seconds=settings.dispatch_timeout_seconds,
                on_stored=self._latency.stored, max_batch_delay_seconds=1.0 / settings.sample_fps,
                emotion_inference=settings.emotion_inference,
                workers_unavailable_seconds=settings.workers_unavailable_seconds)
        return InProcessDispatcher(components.models, self.engine, batch_size=settings.batch_size,
                                   on_stored=self._latency.stored)

    def class_time(self) -> float:
        """Seconds on the class clock (since :meth:`start`)."""
        if self._started_at is None:
            raise RuntimeError("the live session has not started")
        return time.monotonic() - self._started_at

    # --- participants -----------------------------------------------------------------------

    def add_participant(self, participant_id: str, display_name: str, track: MediaStreamTrack) -> bool:
        """Start analysing a participant's video track; False (and the track is never read) when consent excludes them.

        A participant id that is already connected is replaced (a reconnect); a display
        name seen before in this session continues that stream and its students.
        """
        if self._started_at is None or self._components is None:
            raise RuntimeError("start() the live session before adding participants")
        if self._outcome is not None:
            raise RuntimeError(f"the live session {self.analysis_id} has ended")
        if track.kind != "video":
            raise ValueError(f"participant {participant_id}: expected a video track, got {track.kind}")
        if not self._consent.allows(display_name):
            self._excluded += 1
            logger.info("session %d: participant %s is not analysed (consent: %s)",
                        self.analysis_id, participant_id, self._consent.mode.value)
            return False
        if participant_id in self._participants:
            self.remove_participant(participant_id, "replaced by a new connection")
        stream = self._stream_for(display_name.strip() or participant_id)
        stream.stats.active, stream.stats.left_reason = True, None
        participant = _Participant(participant_id, stream, track)
        loop = asyncio.get_running_loop()
        participant.reader = loop.create_task(self._read(participant), name=f"live-read-{participant_id}")
        participant.processor = loop.create_task(self._process_queue(participant, stream.processor),
                                                 name=f"live-process-{participant_id}")
        stream.processor = participant.processor
        self._participants[participant_id] = participant
        return True

    def _stream_for(self, display_name: str) -> _Stream:
        """The stream of a display name: the same one after a reconnect, a new key when the name is in use."""
        active = {p.stream.key for p in self._participants.values()}
        key, number = display_name, 1
        while key in active:
            number += 1
            key = f"{display_name} [{number}]"
        if key not in self._streams:
            assert self._components is not None
            gallery = (gallery_splitter_for(self.settings.model_copy(update={"video_layout": self.layout}),
                                            self._consent, self._components.embedder)
                       if self.layout is not VideoLayout.camera else None)
            self._streams[key] = _Stream(key, display_name, len(self._streams) + 1, self.settings,
                                         self._components, self.analysis_id, gallery)
        return self._streams[key]

    def remove_participant(self, participant_id: str, reason: str) -> None:
        """Stop reading a participant's track; frames already queued are still analysed."""
        participant = self._participants.pop(participant_id, None)
        if participant is None:
            return
        stats = participant.stream.stats
        stats.active, stats.left_reason = False, reason.splitlines()[0] if reason else "left"
        if participant.reader is not None:
            participant.reader.cancel()
        # Closed here too: a reader cancelled before it ever ran never reaches its ``finally``,
        # and its processor would wait on the queue for good (a second None is harmless).
        participant.queue.put_nowait(None)
        for task in (participant.reader, participant.processor):
            if task is not None:
                self._finished_tasks.append(task)

    def set_left_reason(self, display_name: str, reason: str) -> None:
        """Correct why a participant who is no longer connected left (a later, better-informed event)."""
        stream = self._streams.get(display_name.strip())
        if stream is not None and not stream.stats.active:
            stream.stats.left_reason = reason.splitlines()[0]

    def record_gap(self, start_time: float, end_time: float, reason: str, *, participant_id: str | None = None) -> None:
        """Record class time (seconds) in which nobody, or one participant, could be analysed.

        Without ``participant_id`` the gap is the whole session's (the bot reconnecting);
        with it, only that participant's stream (their video stalled and was recovered).
        """
        participant = self._participants.get(participant_id) if participant_id is not None else None
        stream = participant.stream.key if participant is not None else None
        self._gaps.append({"analysis_id": self.analysis_id, "stream": stream, "start_time": float(start_time),
                           "end_time": float(end_time), "reason": reason.splitlines()[0] if reason else "gap"})

    def seconds_since_last_frame(self, participant_id: str) -> float | None:
        """Seconds since this connection of the participant delivered a frame; None before its first, or unknown.

        Counted per connection, not per stream: after a rejoin the stream's last frame is
        from before the drop, and would make a rejoiner look silent at once.
        """
        participant = self._participants.get(participant_id)
        if participant is None or participant.last_frame is None:
            return None
        return time.monotonic() - participant.last_frame

    @property
    def stats(self) -> LiveStats:
        """A snapshot of the per-participant counters, the students seen so far and the latencies."""
        participants: dict[str, ParticipantStats] = {}
        for participant_id, participant in self._participants.items():
            participants[participant_id] = ParticipantStats(**vars(participant.stream.stats))
        for stream in self._streams.values():
            if not stream.stats.active:
                participants.setdefault(f"(left) {stream.key}", ParticipantStats(**vars(stream.stats)))
        dispatch = self._dispatcher.stats if self._dispatcher is not None else None
        return LiveStats(
            participants=participants,
            excluded=self._excluded,
            students_live=sum(s.stats.students_live for s in self._streams.values()),
            crops_submitted=dispatch.crops_submitted if dispatch else 0,
            crops_stored=dispatch.crops_stored if dispatch else 0,
            latencies=list(self._latency.latencies),
        )

    # --- the per-participant pipeline ---------------------------------------------------------

    async def _read(self, participant: _Participant) -> None:
        """Read every frame (aiortc buffers grow otherwise); queue the ones due, dropping the oldest when full."""
        stream, stats = participant.stream, participant.stream.stats
        fps, capacity = self.settings.sample_fps, self.settings.live_queue_frames
        try:
            while True:
                frame = await participant.track.recv()
                if not isinstance(frame, av.VideoFrame):
                    continue  # a video track yields video frames; anything else cannot be analysed
                now = self.class_time()
                participant.last_frame = time.monotonic()
                stats.frames_received += 1
                if stats.first_frame_at is None:
                    stats.first_frame_at = now
                stats.last_frame_at = now
                # One sample per slot of the class clock's grid: every participant samples the same instants.
                slot = int(now * fps)
                if slot < stream.next_slot:
                    continue
                stream.next_slot = slot + 1
                waiting_since = now
                if participant.queue.qsize() >= capacity:
                    dropped = participant.queue.get_nowait()
                    if dropped is not None:
                        waiting_since = dropped.waiting_since
                    stats.frames_dropped += 1
                participant.queue.put_nowait(_Pending(frame, now, time.monotonic(), waiting_since))
        except MediaStreamError:
            if self._participants.get(participant.participant_id) is participant:
                del self._participants[participant.participant_id]
                stats.active, stats.left_reason = False, "the track ended"
                self._finished_tasks += [t for t in (participant.reader, participant.processor) if t is not None]
        finally:
            participant.queue.put_nowait(None)

    async def _process_queue(self, participant: _Participant, previous: asyncio.Task[None] | None) -> None:
        """Run each queued frame through the pool, one at a time per stream (the tracker needs order)."""
        if previous is not None:
            # After a reconnect, the old connection's queued frames are analysed first, never concurrently.
            await asyncio.gather(previous, return_exceptions=True)
        loop = asyncio.get_running_loop()
        while True:
            pending = await participant.queue.get()
            if pending is None:
                return
            try:
                await loop.run_in_executor(self._pool, self._analyse_frame, participant.stream, pending)
            except Exception as exc:
                # A background failure surfaces to the owner: aclose() marks the session failed.
                logger.exception("session %d: analysing %s failed", self.analysis_id, participant.participant_id)
                if self._error is None:
                    self._error = exc
                return

    def _analyse_frame(self, stream: _Stream, pending: _Pending) -> None:
        """Convert, detect, track, crop and dispatch one sampled frame (on a pool thread)."""
        assert self._components is not None and self._dispatcher is not None
        if self._stopping:
            return
        lag = self.class_time() - pending.waiting_since
        if lag > self.settings.live_behind_seconds and pending.class_time - self._last_behind_warning >= \
                BEHIND_WARNING_INTERVAL:
            # One warning per interval for the whole session: when the bot falls behind, every feed does.
            self._last_behind_warning = pending.class_time
            dropped = sum(s.stats.frames_dropped for s in list(self._streams.values()))
            logger.warning("session %d: analysis is %.1f s behind real time (%s; %d frames dropped so far over "
                           "%d participants)", self.analysis_id, lag, stream.key, dropped, len(self._participants))
        image = frame_to_bgr(pending.frame)
        frame = VideoFrame(stream=stream.key, timestamp=pending.class_time, image=image)
        captured = stream.pipeline.capture(frame)
        batch = captured.batch
        if batch is not None:
            with self._submit_lock:
                self._latency.submitted(len(batch), pending.arrived)
                self._dispatcher.submit(batch)
        stats = stream.stats
        stats.frames_sampled += 1
        stats.faces_detected += captured.faces
        stats.students_live = stream.pipeline.students_so_far()
        for sample in captured.samples:
            self._add_sample(sample)

    def _add_sample(self, row: FrameSample) -> None:
        with self._samples_lock:
            self._samples.append(row)
            if len(self._samples) < SAMPLE_ROWS_PER_WRITE:
                return
            rows, self._samples = self._samples, []
        self._write_samples(rows)

    def _write_samples(self, rows: list[FrameSample]) -> None:
        with session_scope(self.engine) as session:
            insert_ignoring_duplicates(session, rows)

    async def _flush_periodically(self) -> None:
        """Push partial inference batches once per sampling interval, so results arrive in seconds."""
        interval = min(1.0 / self.settings.sample_fps, 0.25)
        while True:
            await asyncio.sleep(interval)
            if isinstance(self._dispatcher, _Flushable):
                await asyncio.to_thread(self._flush_dispatcher, self._dispatcher)

    def _flush_dispatcher(self, dispatcher: _Flushable) -> None:
        with self._submit_lock:
            dispatcher.flush()

    # --- the end ----------------------------------------------------------------------------

    @property
    def outcome(self) -> LiveOutcome | None:
        """How the session ended, once :meth:`aclose` or :meth:`fail` has recorded it."""
        return self._outcome

    async def aclose(self) -> LiveOutcome:
        """End the session: stop reading, analyse what is queued, wait until every crop is stored, finalise.

        Writes the students (labelled by display name), the stream statistics and gaps,
        and marks the analysis done. Idempotent: a second call returns the same outcome.
        A failure on the way (or earlier, on a background task) marks the session failed.
        """
        async with self._closing:
            if self._outcome is not None:
                return self._outcome
            duration = self._class_duration()
            for participant_id in list(self._participants):
                self.remove_participant(participant_id, "the session ended")
            await self._stop_tasks()
            try:
                if self._error is not None:
                    raise self._error
                if self._started_at is None:
                    raise RuntimeError("the live session never started")
                self._outcome = await asyncio.to_thread(self._finalise, duration)
            except BaseException as exc:
                reason = _one_line(exc)
                logger.error("session %d failed: %s", self.analysis_id, reason)
                self._outcome = await self._record_failure(reason)
                if not isinstance(exc, Exception):
                    raise
            finally:
                self._shutdown()
            return self._outcome

    def _class_duration(self) -> float:
        """How long the class was in session, in seconds of class time.

        Until now while someone is still sending video, else until the last frame anyone
        sent: a bot waiting in an empty room, or reconnecting at the end, is not class time.
        """
        if self._started_at is None:
            return 0.0
        now = self.class_time()
        if any(p.last_frame is not None and time.monotonic() - p.last_frame < 5.0
               for p in self._participants.values()):
            return now
        last = [s.stats.last_frame_at for s in self._streams.values() if s.stats.last_frame_at is not None]
        return max(last) if last else now

    async def _stop_tasks(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await asyncio.gather(*self._finished_tasks, return_exceptions=True)

    def _finalise(self, duration: float) -> LiveOutcome:
        """Blocking end of the session (in a thread): drain, then write everything in one transaction."""
        assert self._dispatcher is not None
        self._dispatcher.drain()
        with self._samples_lock:
            rows, self._samples = self._samples, []
        streams = list(self._streams.values())
        summaries = [summary for stream in streams for summary in stream.pipeline.summaries()]
        own_cameras = {s.key for s in streams if s.pipeline.gallery is None}
        with session_scope(self.engine) as session:
            insert_ignoring_duplicates(session, rows)
            summaries = join_alternating_students(session, self.analysis_id, summaries, own_cameras, self.settings)
            students = finalise_students(session, self.analysis_id, summaries, self.settings,
                                          name_source_of=self._name_source_of(streams))
            insert_ignoring_duplicates(session, [
                StreamStats(analysis_id=self.analysis_id, stream=s.key, display_name=s.display_name,
                            frames_received=s.stats.frames_received, frames_sampled=s.stats.frames_sampled,
                            frames_dropped=s.stats.frames_dropped, first_frame_at=s.stats.first_frame_at,
                            last_frame_at=s.stats.last_frame_at, left_reason=s.stats.left_reason)
                for s in streams])
            for gap in self._gaps:
                session.add(StreamGap(**gap))
            analysis = session.get(Analysis, self.analysis_id)
            assert analysis is not None
            analysis.frames_sampled = sum(s.stats.frames_sampled for s in streams)
            analysis.faces_detected = sum(s.stats.faces_detected for s in streams)
            analysis.duration_seconds = duration
            if any(s.pipeline.gallery is not None and s.pipeline.gallery.stats.names for s in streams):
                analysis.layout = "gallery"
            analysis.status = AnalysisStatus.done
            analysis.finished_at = utcnow()
        dropped = sum(s.stats.frames_dropped for s in streams)
        if dropped:
            logger.warning("session %d: %d sampled frames were dropped because the bot fell behind",
                           self.analysis_id, dropped)
        return LiveOutcome(self.analysis_id, AnalysisStatus.done, students, analysis.frames_sampled, dropped,
                           analysis.faces_detected, self._dispatcher.stats.crops_stored)

    @staticmethod
    def _name_source_of(streams: list[_Stream]) -> Callable[[str], str | None]:
        """How each stream of the session got its name.

        A participant's own video is named by their display name in the meeting; a shared
        meeting window's tiles by their labels; faces of a window outside any named tile are
        numbered.
        """
        windows = {s.key for s in streams if s.pipeline.gallery is not None}
        tiles = {key for s in streams if s.pipeline.gallery is not None for key in s.pipeline.gallery.stats.names}

        def source(stream: str) -> str | None:
            if stream in tiles:
                return NAME_FROM_LABEL
            return None if stream in windows else NAME_FROM_MEETING
        return source

    async def fail(self, reason: str) -> None:
        """Stop at once and record the session as failed with ``reason``; queued work is dropped."""
        async with self._closing:
            if self._outcome is not None:
                return
            self._stopping = True
            for participant_id in list(self._participants):
                self.remove_participant(participant_id, reason)
            for task in self._finished_tasks:
                task.cancel()
            await self._stop_tasks()
            # No pool thread may write after the failure is recorded: wait for the one in flight.
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
            self._shutdown()
            self._outcome = await self._record_failure(reason.splitlines()[0] if reason else "failed")

    async def _record_failure(self, reason: str) -> LiveOutcome:
        await asyncio.to_thread(mark_failed, self.engine, self.analysis_id, reason)
        streams = list(self._streams.values())
        return LiveOutcome(self.analysis_id, AnalysisStatus.failed, 0, sum(s.stats.frames_sampled for s in streams),
                           sum(s.stats.frames_dropped for s in streams), 0, 0, failure_reason=reason)

    def _shutdown(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._dispatcher is not None:
            self._dispatcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


_thread_state = threading.local()


def frame_to_bgr(frame: av.VideoFrame) -> ByteArray:
    """A decoded frame as BGR pixels, converted with this thread's own single-threaded swscale context.

    ``VideoFrame.to_ndarray`` caches its converter on the frame; two pool threads converting
    the same frame object (a camera replayed to several participants) would then share
    one swscale context, which deadlocks. The pool already converts frames in parallel.
    """
    from av.video.reformatter import VideoReformatter

    reformatter = getattr(_thread_state, "reformatter", None)
    if reformatter is None:
        reformatter = _thread_state.reformatter = VideoReformatter()
    converted = reformatter.reformat(frame, format="bgr24", threads=1)
    return np.ascontiguousarray(converted.to_ndarray(), dtype=np.uint8)


#: Time base of the frames a :class:`ReplayVideoTrack` emits (the RTP video clock).
REPLAY_TIME_BASE = Fraction(1, 90_000)


def decode_video_frames(path: Path, *, limit: int | None = None) -> list[av.VideoFrame]:
    """Decode a video file into memory as YUV frames, the way a WebRTC decoder hands them over."""
    frames: list[av.VideoFrame] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(format="yuv420p"))
            if limit is not None and len(frames) >= limit:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return frames


class ReplayVideoTrack(MediaStreamTrack):
    """A local participant's camera: replays decoded frames in real time at ``fps``, looping.

    Used to feed a :class:`LiveSession` without a network (tests, ``benchmarks/bot.py``)
    and as the sending side of WebRTC test clients. The track ends after ``seconds``.
    """

    kind = "video"

    def __init__(self, frames: Sequence[av.VideoFrame], fps: float, *, seconds: float | None = None) -> None:
        super().__init__()
        if not frames:
            raise ValueError("ReplayVideoTrack: no frames to replay")
        self._frames = frames
        self._fps = fps
        self._seconds = seconds
        self._index = 0
        self._started: float | None = None
        self.frames_sent = 0
        """Frames handed out by :meth:`recv` so far."""

    async def recv(self) -> av.VideoFrame:
        """The next frame, at its time; raises ``MediaStreamError`` once the track ended."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._seconds is not None and self._index / self._fps >= self._seconds:
            self.stop()
            raise MediaStreamError
        if self._started is None:
            self._started = time.monotonic()
        wait = self._started + self._index / self._fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = self._frames[self._index % len(self._frames)]
        frame.pts = round(self._index / self._fps / REPLAY_TIME_BASE)
        frame.time_base = REPLAY_TIME_BASE
        self._index += 1
        self.frames_sent += 1
        return frame


def _one_line(exc: BaseException) -> str:
    reason = "interrupted" if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError) else (
        str(exc) or type(exc).__name__)
    return reason.splitlines()[0]
