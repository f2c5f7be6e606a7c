"""Frame sources. A recorded file is decoded with PyAV; the live meeting source comes later.

Sampling runs on the video's own clock: a frame's timestamp is its pts times the
stream's time base, minus the stream's start, so class time in the reports matches
the recording even for variable frame rate files.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import av
import av.error

from kernel.errors import BadInputError
from kernel.settings import DecodeMode, Settings
from kernel.types import VideoFrame
from vision.keyframes import SCAN_SECONDS, DecodePlan, Feed, PacketInfo, SampleSelector, Step, Take, plan_decoding

logger = logging.getLogger(__name__)

#: A file with more undecodable packets in a row than this is reported as corrupt.
MAX_CONSECUTIVE_DECODE_ERRORS = 50


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream, before decoding."""

    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    duration_seconds: float
    """Length of the video stream (0 when the container does not say)."""
    average_fps: float
    """Average frame rate (0 when unknown)."""
    codec: str
    """Decoder name, e.g. h264."""
    intra_only: bool
    """True when every frame decodes on its own, so unsampled frames need no decoding."""

    def expected_samples(self, sample_fps: float) -> int | None:
        """How many frames sampling at ``sample_fps`` will yield, when the duration is known."""
        if self.duration_seconds <= 0:
            return None
        return max(1, math.ceil(self.duration_seconds * sample_fps))


def _open(path: Path | io.BytesIO) -> Any:
    if isinstance(path, io.BytesIO):
        path.seek(0)
        try:
            memory = av.open(path, mode="r")
        except av.error.FFmpegError:
            raise BadInputError("the in-memory video cannot be read") from None
        if is_still_image(memory.format.name):
            memory.close()
            raise BadInputError("the upload is a still image, not a video")
        return memory
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if not path.is_file():
        raise BadInputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the file is empty")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.InvalidDataError, av.error.EOFError) as exc:
        del exc
        raise BadInputError(f"{path}: not a video file that can be read, or truncated / corrupt") from None
    except av.error.FFmpegError as exc:
        raise BadInputError(f"{path}: cannot open the video ({(exc.strerror or str(exc)).lower()})") from None
    if is_still_image(container.format.name):
        container.close()
        raise BadInputError(f"{path}: a still image, not a video; give a recorded lecture (mp4, mkv, webm, mov…)")
    return container


def is_still_image(format_name: str) -> bool:
    """Whether FFmpeg opened the file with one of its image demuxers (a JPEG, a PNG…), not a video container."""
    return format_name == "image2" or format_name.endswith("_pipe")


class RecordedFileSource:
    """Yields sampled frames of a recorded video file, on the video's own clock."""

    def __init__(self, path: Path | io.BytesIO, sample_fps: float, *, stream_name: str = "main",
                 start_seconds: float = 0.0, end_seconds: float | None = None,
                 decode_mode: DecodeMode = DecodeMode.sequential, tolerance_seconds: float = 0.5) -> None:
        if sample_fps <= 0:
            raise BadInputError(f"sample rate must be positive, got {sample_fps}")
        if not math.isfinite(start_seconds) or start_seconds < 0:
            raise BadInputError(f"start_seconds: expected a time of 0 s or later, got {start_seconds}")
        if end_seconds is not None and not (math.isfinite(end_seconds) and end_seconds > start_seconds):
            raise BadInputError(f"end_seconds: expected a time after start_seconds ({start_seconds}), "
                                f"got {end_seconds}")
        self.path: Path | io.BytesIO = path if isinstance(path, io.BytesIO) else Path(path)
        self.sample_fps = sample_fps
        self.stream_name = stream_name
        self.first_sample = sample_index_at(start_seconds, sample_fps)
        """Index k of the first sampling instant k / sample_fps this source covers."""
        self.end_sample = None if end_seconds is None else sample_index_at(end_seconds, sample_fps)
        """Index of the first sampling instant after the covered range (None: to the end of the video)."""
        self.decode_errors = 0
        """Packets that failed to decode and were skipped."""
        self.frames_decoded = 0
        """Frames the decoder produced (sampled or not)."""
        self.seeked = False
        """Whether decoding started at a keyframe near ``start_seconds`` rather than at the beginning."""
        self.decode_mode = decode_mode
        """The mode asked for; :meth:`decoding_plan` says which one runs (``auto`` chooses per file)."""
        self.tolerance_seconds = max(0.0, tolerance_seconds)
        """How far a sample may lie from its instant when frames are skipped (capped at half the interval)."""
        self.largest_offset = 0.0
        """The largest distance, in seconds, between a sample and its sampling instant (keyframes, seek)."""
        self.instants_missed = 0
        """Sampling instants within the video that got no frame (keyframes only, gaps, undecodable frames)."""
        self._plan: DecodePlan | None = None

    @classmethod
    def configured(cls, path: Path | io.BytesIO, settings: Settings, *, start_seconds: float = 0.0,
                   end_seconds: float | None = None) -> RecordedFileSource:
        """The source as the settings ask: their sampling rate, decode mode and sampling tolerance."""
        return cls(path, settings.sample_fps, start_seconds=start_seconds, end_seconds=end_seconds,
                   decode_mode=settings.decode_mode, tolerance_seconds=settings.sample_tolerance_seconds)

    def probe(self) -> VideoInfo:
        """Open the file and describe its video stream; a file without one is bad input."""
        container = _open(self.path)
        try:
            return self._info(container)
        finally:
            container.close()

    def _info(self, container: Any) -> VideoInfo:
        if not container.streams.video:
            raise BadInputError(f"{self.path}: the file has no video stream")
        stream = container.streams.video[0]
        context = stream.codec_context
        if not context.width or not context.height:
            raise BadInputError(f"{self.path}: the video stream has no frame size (corrupt header?)")
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        codec = context.codec
        return VideoInfo(
            width=int(context.width),
            height=int(context.height),
            duration_seconds=max(0.0, duration),
            average_fps=rate,
            codec=str(codec.name),
            intra_only=bool(getattr(codec, "intra_only", False)),
        )

    def decoding_plan(self) -> DecodePlan:
        """How this file will be decoded: the mode asked for, or for ``auto`` the cheapest one.

        Decided from a demux-only read of the file's first :data:`~vision.keyframes.SCAN_SECONDS`
        (packets' timestamps, keyframe flags and sizes; nothing is decoded), so every time
        segment of one file decides alike.
        """
        if self._plan is None:
            container = _open(self.path)
            try:
                info = self._info(container)
                if self.decode_mode == DecodeMode.sequential or info.intra_only:
                    packets: list[PacketInfo] = []
                else:
                    packets = _scan_packets(container)
            except av.error.FFmpegError as exc:
                raise BadInputError(f"{self.path}: reading the video failed ({exc.strerror or exc})") from None
            finally:
                container.close()
            self._plan = plan_decoding(packets, self.sample_fps, self.tolerance_seconds, self.decode_mode,
                                       intra_only=info.intra_only)
        return self._plan

    def skips_non_reference_frames(self, info: VideoInfo) -> bool:
        """Whether decoding may drop non-reference frames.

        Only when samples are at least three frames apart: the sampled frame is then the
        first decoded frame at or after each sampling instant, at most a frame or two
        later on the video clock, and its timestamp is its own pts.
        """
        return not info.intra_only and info.average_fps > 0 and self.sample_fps * 3 <= info.average_fps

    def __iter__(self) -> Iterator[VideoFrame]:
        """Decode and yield one frame per sampling interval, in time order.

        With ``start_seconds``/``end_seconds`` only the sampling instants k / sample_fps in
        [start, end) are covered, each by the same frame an unsegmented run picks for it, so
        the samples of consecutive segments add up to exactly the samples of the whole video.
        """
        # Seek targets, seconds before the segment's first sampling instant: a container
        # without an index (MPEG-TS) may land after the keyframe we need; go further back.
        back_offs: list[float | None] = [0.0, 10.0, 60.0] if self.first_sample > 0 else []
        back_offs.append(None)  # the beginning of the video: slower, always exact
        plan = self.decoding_plan()
        container = _open(self.path)
        try:
            for back_off in back_offs:
                try:
                    if plan.mode == DecodeMode.sequential:
                        yield from self._decode(container, back_off=back_off)
                    else:
                        yield from self._decode_selected(container, plan, back_off=back_off)
                    return
                except _SeekMissedError:
                    container.close()
                    container = _open(self.path)
            raise AssertionError("decoding from the beginning never misses")  # pragma: no cover
        except av.error.FFmpegError as exc:
            raise BadInputError(f"{self.path}: decoding failed ({exc.strerror or exc})") from None
        finally:
            container.close()

    def _decode(self, container: Any, *, back_off: float | None) -> Iterator[VideoFrame]:
        """Decode, after seeking ``back_off`` seconds before the first frame needed (None: no seek).

        Raises :class:`_SeekMissedError` before yielding anything when the seek cannot be
        trusted to decode every needed frame exactly as a run from the beginning does.
        """
        info = self._info(container)
        stream = container.streams.video[0]
        # Frame threading lets FFmpeg use both cores for decoding.
        stream.thread_type = "AUTO"
        if self.skips_non_reference_frames(info):
            # No other frame is predicted from a non-reference frame, so the decoder can drop
            # them without harming the rest: about half the decoding work for typical H.264.
            stream.codec_context.skip_frame = "NONREF"
        time_base = float(stream.time_base) if stream.time_base else 0.0
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        interval = 1.0 / self.sample_fps
        # The sampler is a small state machine: a frame is sampled when it is the first decoded
        # frame of its grid cell. Starting it at the segment's first instant reproduces the
        # state an unsegmented run is in there, whatever came before.
        next_sample = self.first_sample * interval
        stop_at = None if self.end_sample is None else self.end_sample * interval
        consecutive_errors = 0
        # Half a frame of slack so that 30 fps content sampled at 1 fps lands on frame 0, 30, 60...
        slack = 0.5 / info.average_fps if info.average_fps else 0.0
        # The first frame that may be sampled, less one frame of margin.
        needed = next_sample - slack - (1.0 / info.average_fps if info.average_fps else 0.0)
        awaiting_keyframe = self._seek_before(container, stream, needed, back_off)
        # Intra-only codecs skip the packets before the first sample, so their first frame is later.
        awaiting_frame = self.seeked and not info.intra_only
        for packet in container.demux(stream):
            if awaiting_keyframe:
                # Some demuxers land on any packet; what precedes the first keyframe cannot decode.
                if not (packet.is_keyframe or info.intra_only) or packet.pts is None:
                    continue
                if packet.pts * time_base - start > needed:
                    raise _SeekMissedError
                awaiting_keyframe = False
            # Every frame of an intra-only codec decodes alone: skip the ones we do not sample.
            if (info.intra_only and packet.pts is not None and time_base
                    and packet.pts * time_base - start < next_sample - slack):
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                self.decode_errors += 1
                consecutive_errors += 1
                if consecutive_errors > MAX_CONSECUTIVE_DECODE_ERRORS:
                    raise BadInputError(
                        f"{self.path}: the video is corrupt ({consecutive_errors} undecodable packets in a row)"
                    ) from None
                continue
            consecutive_errors = 0
            for frame in frames:
                self.frames_decoded += 1
                if frame.pts is None:
                    continue
                timestamp = float(frame.pts * frame.time_base) - start
                if awaiting_frame:
                    awaiting_frame = False
                    if timestamp > needed:  # the decoder dropped frames after the keyframe
                        raise _SeekMissedError
                # The same test as the next segment's first sample, so a frame belongs to exactly one.
                if stop_at is not None and timestamp >= stop_at - slack:
                    return
                if timestamp < next_sample - slack:
                    continue
                image = frame.to_ndarray(format="bgr24")
                yield VideoFrame(stream=self.stream_name, timestamp=round(timestamp, 3), image=image)
                # Skip ahead on the grid (not from this frame) so sampling does not drift.
                next_sample = (math.floor((timestamp + slack) / interval) + 1) * interval
        if awaiting_keyframe or awaiting_frame:
            raise _SeekMissedError  # the seek landed past the last keyframe, or nothing decoded after it


    def _seek_before(self, container: Any, stream: Any, needed: float, back_off: float | None) -> bool:
        """Seek to the keyframe at or before ``needed - back_off`` seconds; False when there is nothing to seek to."""
        time_base = float(stream.time_base) if stream.time_base else 0.0
        target = needed - (back_off or 0.0)
        self.seeked = back_off is not None and target > 0 and bool(time_base)
        if back_off is not None and not self.seeked:
            raise _SeekMissedError  # nothing to seek to: the next attempt starts at the beginning
        if self.seeked:
            try:
                # Backward: the keyframe at or before the target, so every frame from there on
                # decodes exactly as it does when decoding from the beginning.
                container.seek(math.floor(target / time_base) + (stream.start_time or 0), backward=True,
                               any_frame=False, stream=stream)
            except av.error.FFmpegError:
                raise _SeekMissedError from None
        return self.seeked

    def _decode_selected(self, container: Any, plan: DecodePlan, *, back_off: float | None) -> Iterator[VideoFrame]:
        """Decode only the packets the :class:`~vision.keyframes.SampleSelector` asks for (keyframes, seek).

        Raises :class:`_SeekMissedError` before yielding anything when a seek landed after
        the keyframe that the first instant's frame needs.
        """
        info = self._info(container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        context = stream.codec_context
        time_base = stream.time_base
        start_pts = stream.start_time or 0
        interval = 1.0 / self.sample_fps
        selector: SampleSelector[Any] = SampleSelector(
            interval, plan.tolerance, first_instant=self.first_sample, end_instant=self.end_sample,
            keyframes_only=plan.mode == DecodeMode.keyframes)
        first_low = self.first_sample * interval - selector.tolerance
        frame_seconds = 1.0 / info.average_fps if info.average_fps else 0.0
        awaiting_keyframe = self._seek_before(container, stream, first_low - frame_seconds, back_off)
        wanted: dict[int, int] = {}
        errors = [0]
        for packet in container.demux(stream):
            if packet.pts is None or time_base is None:
                continue  # the demuxer's final empty packet
            seconds = float((packet.pts - start_pts) * time_base)
            if awaiting_keyframe and packet.is_keyframe:
                if seconds > first_low:
                    raise _SeekMissedError
                awaiting_keyframe = False
            steps = selector.push(packet, int(packet.pts), seconds, bool(packet.is_keyframe), int(packet.size))
            yield from self._carry_out(steps, context, wanted, errors, start_pts, time_base, interval)
            if selector.done:
                break
        if awaiting_keyframe:
            raise _SeekMissedError
        yield from self._carry_out(selector.finish(), context, wanted, errors, start_pts, time_base, interval)
        self.instants_missed = selector.instants_missed + len(wanted)

    def _carry_out(self, steps: list[Step[Any]], context: Any, wanted: dict[int, int], errors: list[int],
                   start_pts: int, time_base: Any, interval: float) -> Iterator[VideoFrame]:
        """Do the selector's steps: note the frames wanted, decode packets, drain and reset between groups."""
        for step in steps:
            if isinstance(step, Take):
                wanted[step.pts] = step.instant
                continue
            try:
                if isinstance(step, Feed):
                    frames = step.packet.decode()
                else:  # Restart: the frames still in the decoder come out, then it starts afresh
                    frames = context.decode(None)
                    context.flush_buffers()
            except av.error.FFmpegError:
                self.decode_errors += 1
                errors[0] += 1
                if errors[0] > MAX_CONSECUTIVE_DECODE_ERRORS:
                    raise BadInputError(
                        f"{self.path}: the video is corrupt ({errors[0]} undecodable packets in a row)") from None
                continue
            errors[0] = 0
            for frame in frames:
                self.frames_decoded += 1
                instant = wanted.pop(frame.pts, None) if frame.pts is not None else None
                if instant is None:
                    continue
                timestamp = float((frame.pts - start_pts) * time_base)
                self.largest_offset = max(self.largest_offset, abs(timestamp - instant * interval))
                yield VideoFrame(stream=self.stream_name, timestamp=round(timestamp, 3),
                                 image=frame.to_ndarray(format="bgr24"))


def _scan_packets(container: Any) -> list[PacketInfo]:
    """Timestamps, keyframe flags and sizes of the video packets of the file's first SCAN_SECONDS (no decoding)."""
    stream = container.streams.video[0]
    time_base = stream.time_base
    start_pts = stream.start_time or 0
    packets: list[PacketInfo] = []
    if time_base is None:
        return packets
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        seconds = float((packet.pts - start_pts) * time_base)
        if seconds > SCAN_SECONDS:
            break
        packets.append(PacketInfo(int(packet.pts), seconds, bool(packet.is_keyframe), int(packet.size)))
    return packets


class _SeekMissedError(Exception):
    """Seeking landed after the segment's first frame; decode from the beginning instead."""


def sample_index_at(seconds: float, sample_fps: float) -> int:
    """Index k of the first sampling instant k / sample_fps at or after ``seconds``.

    A microsecond of tolerance keeps float noise (5.0 * 3 = 15.000000000000002) from
    moving an instant that lies on the boundary into the next segment.
    """
    return max(0, math.ceil(seconds * sample_fps - 1e-6))


T = TypeVar("T")

_END = object()


def prefetched(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Iterate ``items`` on a background thread, ``depth`` items ahead of the consumer.

    Decoding (FFmpeg) and detection (onnxruntime) both release the GIL, so a decoder thread
    runs alongside detection on the other core. The queue is bounded: a slow consumer holds
    the decoder back instead of filling memory. An exception in the producer is re-raised
    to the consumer; closing the iterator early stops the producer.
    """
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            failure.append(exc)
        finally:
            while not stop.is_set():
                try:
                    buffer.put(_END, timeout=0.1)
                    break
                except queue.Full:
                    continue

    worker = threading.Thread(target=produce, name="classlens-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                break
            yield item  # type: ignore[misc]
        if failure:
            raise failure[0]
    finally:
        stop.set()
        worker.join(timeout=5)
