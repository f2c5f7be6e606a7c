from pathlib import Path

import pytest

from kernel.errors import BadInputError
from tests import media_factory
from tests.conftest import MEDIA_DIR
from vision.sources import RecordedFileSource


@pytest.mark.media
def test_sampling_follows_the_video_clock() -> None:
    source = RecordedFileSource(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", sample_fps=2.0)
    info = source.probe()
    frames = list(source)
    # 472 frames at 23.976 fps: 19.7 s, sampled twice a second.
    assert info.duration_seconds == pytest.approx(19.69, abs=0.05)
    assert len(frames) == 40
    # Every sample lies within two frames (1/12 s) after its instant on the 0.5 s grid.
    frame_time = 1001 / 24000
    for index, frame in enumerate(frames):
        assert index * 0.5 - 1e-6 <= frame.timestamp <= index * 0.5 + 2 * frame_time + 1e-6
    assert frames[0].timestamp == 0.0
    assert frames[0].image.shape == (360, 640, 3)
    # Non-reference frames were not decoded at all.
    assert source.frames_decoded < 472 * 0.7


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: d, "not a file"),
        (lambda d: media_factory.write(d / "empty.mp4", b""), "the file is empty"),
        (lambda d: media_factory.write(d / "notes.mp4", b"lecture notes, not a video\n" * 50),
         "not a video file"),
        (lambda d: media_factory.audio_only(d / "audio.mp4"), "no video stream"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(BadInputError, match=message):
        source = RecordedFileSource(path, 1.0)
        source.probe()
        list(source)


def test_a_video_without_frames_yields_nothing(tmp_path: Path) -> None:
    path = media_factory.zero_frames(tmp_path / "zero.mp4")
    try:
        frames = list(RecordedFileSource(path, 1.0))
    except BadInputError:
        return  # some containers refuse to write a stream without frames at all: also a clear error
    assert frames == []


def test_in_memory_videos_are_read_without_touching_disk() -> None:
    from vision.synthetic import demo_classroom_video

    frames = list(RecordedFileSource(demo_classroom_video(seconds=3), 1.0))
    assert [f.timestamp for f in frames] == [0.0, 1.0, 2.0]


@pytest.mark.media
def test_dense_sampling_decodes_every_frame() -> None:
    """At 10 fps from a 24 fps clip, samples are too close to skip frames: every frame is decoded."""
    source = RecordedFileSource(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", sample_fps=10.0)
    frames = list(source)
    assert source.frames_decoded == 472
    assert len(frames) == 197


def test_prefetching_keeps_order_and_hands_errors_over() -> None:
    from vision.sources import prefetched

    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def broken():  # type: ignore[no-untyped-def]
        yield 1
        raise BadInputError("decoding failed halfway")

    received = []
    with pytest.raises(BadInputError, match="halfway"):
        for item in prefetched(broken()):
            received.append(item)
    assert received == [1]
    # Leaving early stops the producer instead of leaving it blocked forever.
    for item in prefetched(iter(range(10_000)), depth=2):
        if item == 3:
            break
