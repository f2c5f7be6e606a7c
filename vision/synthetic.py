"""Synthetic classroom videos built in memory from images shipped inside installed packages.

``classlens demo`` and the tests use these: no download, no file written. The video is a
slow pan over insightface's bundled group photo (six faces) with a seventh face (its
bundled portrait) joining after a few seconds, and one student briefly hidden, so the
tracker has motion, an arrival and an occlusion to handle.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from kernel.errors import BadInputError
from kernel.types import ByteArray


def bundled_image(name: str) -> ByteArray:
    """Read an image bundled with the insightface package (``t1.jpg``, ``Tom_Hanks_54745.png``).

    The package is located, not imported: importing insightface takes 1.5 s, most of the demo's start.
    """
    spec = importlib.util.find_spec("insightface")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise BadInputError("insightface is not installed; reinstall ClassLens")
    path = Path(folders[0]) / "data" / "images" / name
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BadInputError(f"insightface's bundled image {name} is missing; reinstall insightface")
    return np.ascontiguousarray(image, dtype=np.uint8)


def encode_video(frames: list[ByteArray], fps: int, *, codec: str = "libx264", container_format: str = "mp4",
                 keyframe_seconds: float | None = None) -> io.BytesIO:
    """Encode BGR frames into an in-memory video (MP4 unless ``container_format`` says otherwise).

    ``keyframe_seconds`` sets the keyframe interval, as meeting recorders do (1–10 s);
    by default the encoder's own (libx264: 250 frames).
    """
    if not frames:
        raise ValueError("encode_video: no frames")
    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, mode="w", format=container_format) as container:
        stream: Any = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        options = {"preset": "veryfast", "crf": "20"} if codec == "libx264" else {}
        if keyframe_seconds is not None:
            interval = max(1, round(fps * keyframe_seconds))
            options["g"] = str(interval)
            if codec == "libx264":  # exactly every interval: no extra keyframes at scene cuts
                options["x264-params"] = f"keyint={interval}:min-keyint={interval}:scenecut=0"
        stream.options = options
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buffer.seek(0)
    return buffer


def classroom_frames(seconds: float = 12.0, fps: int = 10, size: tuple[int, int] = (1280, 720)) -> list[ByteArray]:
    """Frames of the demo classroom: pan over the group photo, a late arrival, an occlusion."""
    group = bundled_image("t1.jpg")
    portrait = bundled_image("Tom_Hanks_54745.png")
    width, height = size
    frames = []
    count = int(seconds * fps)
    scale = width / group.shape[1] * 1.08
    scaled = cv2.resize(group, (int(group.shape[1] * scale), int(group.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    inset = cv2.resize(portrait, (220, int(portrait.shape[0] * 220 / portrait.shape[1])), interpolation=cv2.INTER_AREA)
    for index in range(count):
        t = index / fps
        # A slow horizontal and vertical pan, so boxes move between samples.
        progress = t / max(seconds, 1e-6)
        x = int((scaled.shape[1] - width) * progress)
        y = int((scaled.shape[0] - height) * (0.3 + 0.2 * np.sin(progress * np.pi)))
        frame: ByteArray = np.ascontiguousarray(scaled[y:y + height, x:x + width], dtype=np.uint8)
        if t >= 3.0:
            # A seventh student joins in the lower left corner.
            frame[height - inset.shape[0] - 20:height - 20, 20:20 + inset.shape[1]] = inset
        if 6.0 <= t < 8.0:
            # Someone walks in front of the camera: the left part of the picture is hidden.
            frame[:, : width // 5] = (90, 90, 90)
        frames.append(frame)
    return frames


#: Frame rate of the demo video: analysis samples 1 frame per second by default, so a few frames per
#: second show the same class; 2 instead of 10 cuts drawing and encoding from about 1.7 s to 0.35 s.
DEMO_FPS = 2


def demo_classroom_video(seconds: float = 12.0) -> io.BytesIO:
    """The demo video as an in-memory MP4."""
    return encode_video(classroom_frames(seconds, fps=DEMO_FPS), fps=DEMO_FPS)


def still_image_video(image: ByteArray, seconds: float, fps: int = 5) -> io.BytesIO:
    """An in-memory video that shows one still image (even-sized) for ``seconds``."""
    height, width = image.shape[:2]
    image = np.ascontiguousarray(image[: height - height % 2, : width - width % 2])
    return encode_video([image] * max(1, int(seconds * fps)), fps=fps)
