import itertools
from pathlib import Path

import pytest

from bot.sources import RecordedFileSource
from classlens.errors import BadInputError
from tests import media_factory
from tests.conftest import MEDIA_DIR


@pytest.mark.media
def test_sampling_follows_the_video_clock() -> None:
    source = RecordedFileSource(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", sample_fps=2.0)
    info = source.probe()
    frames = list(source)
    # 472 frames at 23.976 fps: 19.7 s, sampled twice a second.
    assert info.duration_seconds == pytest.approx(19.69, abs=0.05)
    assert len(frames) == 40
    gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(frames)]
    assert all(0.45 < gap < 0.55 for gap in gaps)
    assert frames[0].timestamp == 0.0
    assert frames[0].image.shape == (360, 640, 3)
    assert source.frames_decoded == 472


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
    from bot.synthetic import demo_classroom_video

    frames = list(RecordedFileSource(demo_classroom_video(seconds=3), 1.0))
    assert [f.timestamp for f in frames] == [0.0, 1.0, 2.0]
