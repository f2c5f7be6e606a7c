"""Bad and unusual inputs made by the tests themselves (nothing from outside)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np

from bot.synthetic import bundled_image, encode_video


def write(path: Path, data: bytes | io.BytesIO) -> Path:
    path.write_bytes(data.getvalue() if isinstance(data, io.BytesIO) else data)
    return path


def audio_only(path: Path) -> Path:
    """An MP4 with one audio stream and no video."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)) * 0.3).astype(np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return write(path, buffer)


def zero_frames(path: Path) -> Path:
    """An MP4 with a video stream that holds no frames."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = 320, 240
        stream.pix_fmt = "yuv420p"
        for packet in stream.encode():
            container.mux(packet)
    return write(path, buffer)


def group_photo_video(path: Path, seconds: float = 3.0, size: tuple[int, int] | None = None, fps: int = 5) -> Path:
    """insightface's six-face group photo as a still video, optionally rescaled (e.g. to 4K)."""
    import cv2

    image = bundled_image("t1.jpg")
    if size is not None:
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    image = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
    return write(path, encode_video([np.ascontiguousarray(image)] * int(seconds * fps), fps=fps))


def truncated_copy(source: Path, path: Path, keep: float) -> Path:
    """The first ``keep`` share of a file's bytes."""
    data = source.read_bytes()
    return write(path, data[: int(len(data) * keep)])


def with_garbage(source: Path, path: Path, start: float, length: int) -> Path:
    """A copy with ``length`` bytes of noise written at ``start`` (a share of the file)."""
    data = bytearray(source.read_bytes())
    offset = int(len(data) * start)
    data[offset:offset + length] = np.random.default_rng(3).integers(0, 255, length, dtype=np.uint8).tobytes()
    return write(path, bytes(data))
