"""Decoding only what is sampled (vision.keyframes, RecordedFileSource's keyframes and seek modes).

Every selected frame must be the very frame a full decode gives at that time, lie within
the sampling tolerance of its instant, serve exactly one instant, and be the same whether
the video is decoded whole or in time segments.
"""

from __future__ import annotations

import io

import av
import cv2
import numpy as np
import pytest

from kernel.settings import DecodeMode
from kernel.types import VideoFrame
from vision.keyframes import Feed, PacketInfo, Restart, SampleSelector, Take, plan_decoding
from vision.sources import RecordedFileSource
from vision.synthetic import encode_video

FPS = 30


def numbered_frames(seconds: float, fps: int = FPS) -> list[np.ndarray]:
    """Frames that differ from each other everywhere: a moving gradient and the frame number."""
    frames = []
    x = np.linspace(0, 255, 320, dtype=np.float32)
    for index in range(round(seconds * fps)):
        row = ((x + index * 9) % 256).astype(np.uint8)
        image = np.dstack([np.tile(row, (240, 1))] * 3).copy()
        cv2.putText(image, str(index), (20, 140), cv2.FONT_HERSHEY_SIMPLEX, 3, (0, 0, 255), 5)
        frames.append(image)
    return frames


def full_decode(video: io.BytesIO) -> dict[float, np.ndarray]:
    """Every frame of the video, decoded from the start, by its time (ms precision, as the source rounds)."""
    video.seek(0)
    frames: dict[float, np.ndarray] = {}
    with av.open(video) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        for frame in container.decode(stream):
            frames[round(float((frame.pts - start) * stream.time_base), 3)] = frame.to_ndarray(format="bgr24")
    return frames


def assert_decoded_as_a_full_decode(frames: list[VideoFrame], video: io.BytesIO) -> None:
    """Each frame has exactly the pixels that decoding the whole video from its start gives at that time."""
    reference = full_decode(video)
    for frame in frames:
        assert np.array_equal(frame.image, reference[frame.timestamp])


@pytest.fixture(scope="module")
def two_second_keyframes() -> io.BytesIO:
    """20 s at 30 fps with a keyframe every 2 s (as many meeting recorders write)."""
    return encode_video(numbered_frames(20.0), FPS, keyframe_seconds=2.0)


def test_keyframes_a_second_apart_are_the_samples_at_one_fps() -> None:
    video = encode_video(numbered_frames(12.0), FPS, keyframe_seconds=1.0)
    source = RecordedFileSource(video, 1.0, decode_mode=DecodeMode.auto)
    plan = source.decoding_plan()
    assert plan.mode == DecodeMode.keyframes
    assert plan.keyframe_spacing == pytest.approx(1.0)
    frames = list(source)
    assert [f.timestamp for f in frames] == [float(k) for k in range(12)]
    assert source.frames_decoded == 12  # nothing but the keyframes was decoded
    assert_decoded_as_a_full_decode(frames, video)


def test_seeking_decodes_a_share_of_the_frames_and_gives_the_pixels_of_a_full_decode(
        two_second_keyframes: io.BytesIO) -> None:
    source = RecordedFileSource(two_second_keyframes, 1.0, decode_mode=DecodeMode.auto)
    plan = source.decoding_plan()
    assert plan.mode == DecodeMode.seek
    assert "keyframes every 2.0 s" in plan.reason
    frames = list(source)
    assert len(frames) == 20
    for instant, frame in enumerate(frames):
        assert abs(frame.timestamp - instant) <= 0.5 + 1e-6
    assert source.largest_offset <= 0.5 + 1e-6
    assert source.instants_missed == 0
    assert source.frames_decoded < 0.5 * 20 * FPS
    assert_decoded_as_a_full_decode(frames, two_second_keyframes)
    # Every keyframe instant is served by its keyframe itself.
    assert [f.timestamp for f in frames[::2]] == [float(k) for k in range(0, 20, 2)]


def test_sparse_keyframes_fall_back_to_decoding_every_frame() -> None:
    video = encode_video(numbered_frames(20.0, fps=10), 10, keyframe_seconds=10.0)
    source = RecordedFileSource(video, 1.0, decode_mode=DecodeMode.auto)
    plan = source.decoding_plan()
    assert plan.mode == DecodeMode.sequential
    assert "too sparse" in plan.reason
    frames = list(source)
    assert len(frames) == 20
    for instant, frame in enumerate(frames):  # the first decoded frame at or after each instant
        assert instant <= frame.timestamp <= instant + 2 / 10 + 1e-6


def test_keyframes_only_leaves_instants_without_a_keyframe_empty(two_second_keyframes: io.BytesIO) -> None:
    source = RecordedFileSource(two_second_keyframes, 1.0, decode_mode=DecodeMode.keyframes)
    assert "10 instants without a keyframe" in source.decoding_plan().reason
    frames = list(source)
    assert [f.timestamp for f in frames] == [float(k) for k in range(0, 20, 2)]
    assert source.instants_missed == 10


def test_a_requested_sequential_mode_is_todays_exact_path(two_second_keyframes: io.BytesIO) -> None:
    source = RecordedFileSource(two_second_keyframes, 1.0, decode_mode=DecodeMode.sequential)
    assert source.decoding_plan().mode == DecodeMode.sequential
    frames = list(source)
    assert len(frames) == 20
    for instant, frame in enumerate(frames):
        assert instant <= frame.timestamp <= instant + 2 / FPS + 1e-6


@pytest.mark.parametrize("container_format", ["mp4", "mpegts"])
@pytest.mark.parametrize("mode", [DecodeMode.seek, DecodeMode.keyframes])
def test_segments_add_up_to_exactly_the_frames_of_one_run(container_format: str, mode: DecodeMode) -> None:
    video = encode_video(numbered_frames(16.0, fps=25), 25, container_format=container_format,
                         keyframe_seconds=1.6)
    whole = [(f.timestamp, f.image) for f in RecordedFileSource(video, 2.0, decode_mode=mode)]
    assert len(whole) == (32 if mode == DecodeMode.seek else 10)  # 16 s at 2 fps; keyframes: one per 1.6 s
    pieces = []
    for start, end in [(0.0, 5.5), (5.5, 11.0), (11.0, None)]:
        source = RecordedFileSource(video, 2.0, decode_mode=mode, start_seconds=start, end_seconds=end)
        pieces.extend((f.timestamp, f.image) for f in source)
        if start > 0 and container_format == "mp4":
            assert source.seeked  # MPEG-TS has no index: a seek may land late, and decoding starts earlier
    assert [t for t, _ in pieces] == [t for t, _ in whole]
    for (_, mine), (_, theirs) in zip(pieces, whole, strict=True):
        assert np.array_equal(mine, theirs)


# --------------------------------------------------------------------------- the selector alone


def _run(selector: SampleSelector[int], packets: list[tuple[int, bool]], time_base: float) -> list[object]:
    steps: list[object] = []
    for number, (pts, keyframe) in enumerate(packets):
        steps.extend(selector.push(number, pts, pts * time_base, keyframe, 100))
    steps.extend(selector.finish())
    return steps


def test_with_reordered_frames_the_first_frame_of_the_window_in_decode_order_is_taken() -> None:
    # One group of 12 frames at 10 fps, in decode order with B-frames: I0 P3 B1 B2 P6 B4 B5 P9 B7 B8 P11 B10,
    # then the next keyframe at frame 12. Sampling 2 fps with ±0.25 s: instants 0, 0.5, 1.0.
    order = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8, 11, 10, 12]
    packets = [(pts, pts in (0, 12)) for pts in order]
    steps = _run(SampleSelector(0.5, 0.25), packets, 0.1)
    takes = [(s.instant, s.pts) for s in steps if isinstance(s, Take)]
    # 0: the keyframe; 0.5: window [0.25, 0.75) -> P3 comes first in decode order; 1.0: the next keyframe
    # at 1.2 lies within [0.75, 1.25) and costs nothing, and is taken over P9 (decode position 7).
    assert takes[:3] == [(0, 0), (1, 3), (2, 12)]
    fed_before_restart = [s.packet for s in steps[:steps.index(Restart())] if isinstance(s, Feed)]
    assert fed_before_restart == [0, 1]  # I0 and P3: nothing else of the first group was decoded


def test_frames_shown_before_their_keyframe_are_never_taken() -> None:
    # An open group: keyframe at 10 followed by leading frames 8 and 9 that need the previous group.
    packets = [(0, True), (1, False), (2, False), (10, True), (8, False), (9, False), (11, False)]
    selector: SampleSelector[int] = SampleSelector(1.0, 0.5, keyframes_only=False)
    takes = [s for s in _run(selector, packets, 0.1) if isinstance(s, Take)]
    # Instant 1 s (window [0.5, 1.5)): 0.8 and 0.9 follow keyframe 1.0 in decode order but show before it.
    assert [(t.instant, t.pts) for t in takes] == [(0, 0), (1, 10)]


def test_the_plan_estimates_the_share_of_bytes_each_mode_decodes() -> None:
    # 60 s at 30 fps, a keyframe (10 kB) every 2 s and 1 kB otherwise.
    packets = [PacketInfo(i, i / 30, i % 60 == 0, 10_000 if i % 60 == 0 else 1_000) for i in range(1800)]
    plan = plan_decoding(packets, 1.0, 0.5, DecodeMode.auto)
    assert plan.mode == DecodeMode.seek
    assert plan.keyframe_spacing == pytest.approx(2.0)
    # Per 2 s: the keyframe, and the keyframe plus 15 frames for the instant between keyframes.
    assert plan.decoded_share == pytest.approx((10_000 + 15 * 1_000) / (10_000 + 59 * 1_000), abs=0.02)
    assert plan_decoding(packets, 0.5, 1.0, DecodeMode.auto).mode == DecodeMode.keyframes
    assert plan_decoding(packets, 5.0, 0.5, DecodeMode.auto).mode == DecodeMode.sequential
