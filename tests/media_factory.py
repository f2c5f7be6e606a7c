"""Bad and unusual inputs made by the tests themselves (nothing from outside)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np

from vision.synthetic import bundled_image, encode_video


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


# Six people, each with several real photos in ../shared/data/facial_expressions_dev (LFW crops).
SCENE_PEOPLE = ("George_W_Bush", "Colin_Powell", "Tony_Blair", "Jennifer_Capriati", "Serena_Williams",
                "Gerhard_Schroeder")
# Shots of a TV scene: (seconds, [(person, centre as a share of the width, face size in pixels)]).
# Close-ups put one person after another at the same place, as a cut does; wide shots and
# two-shots bring people back at other places and sizes.
SCENE_SHOTS: tuple[tuple[int, tuple[tuple[int, float, int], ...]], ...] = (
    (3, ((0, .2, 130), (1, .5, 130), (2, .8, 130))), (3, ((0, .5, 300),)), (3, ((1, .5, 300),)),
    (3, ((3, .3, 220), (4, .7, 220))), (2, ((5, .5, 300),)), (3, ((0, .5, 300),)),
    (3, ((3, .2, 130), (4, .5, 130), (5, .8, 130))), (2, ((2, .5, 300),)), (3, ((5, .3, 220), (1, .7, 220))),
    (3, ((3, .5, 300),)),
)
SCENE_SIZE = (1280, 720)


def scene_cast(second: int) -> list[tuple[int, float]]:
    """(person, x centre in pixels) of everyone on screen during second ``second`` of the scene."""
    start = 0
    for seconds, cast in SCENE_SHOTS:
        if start <= second < start + seconds:
            return [(person, centre * SCENE_SIZE[0]) for person, centre, _ in cast]
        start += seconds
    return []


def tv_scene_with_cuts(photos_dir: Path, *, fps: int = 5, seed: int = 0) -> io.BytesIO:
    """A 28-second scene of six real people, cut between wide shots, two-shots and close-ups.

    Each shot shows each of its people in one of their (up to three) real photos, picked at
    random and mirrored and re-lit at random, so the same person looks different from shot to
    shot, as across camera angles. The six people are the six of :data:`SCENE_PEOPLE`.
    """
    import cv2

    rng = np.random.default_rng(seed)
    photos = [[cv2.imread(str(path)) for path in sorted(photos_dir.glob(f"{name}_*.jpg"))[:3]]
              for name in SCENE_PEOPLE]
    width, height = SCENE_SIZE
    frames = []
    for seconds, cast in SCENE_SHOTS:
        canvas = np.full((height, width, 3), 90, np.uint8)
        for person, centre, size in cast:
            photo = photos[person][int(rng.integers(len(photos[person])))]
            if rng.random() < 0.5:
                photo = photo[:, ::-1]
            relit = photo.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
            face = cv2.resize(np.clip(relit, 0, 255).astype(np.uint8), (size, size))
            x, y = int(centre * width - size / 2), (height - size) // 2
            canvas[y:y + size, x:x + size] = face
        frames += [canvas] * (seconds * fps)
    return encode_video(frames, fps=fps)


# --------------------------------------------------------------------------- gallery recordings

#: Name plate styles of meeting UIs: (plate RGBA or None for bare text, text RGB), drawn over the video.
PLATE_STYLES: dict[str, tuple[tuple[int, int, int, int] | None, tuple[int, int, int]]] = {
    "zoom": ((0, 0, 0, 170), (255, 255, 255)),       # translucent black plate, white text
    "teams": ((32, 31, 31, 200), (255, 255, 255)),    # darker, nearly opaque plate
    "light": ((240, 240, 240, 230), (20, 20, 20)),    # light plate, dark text
    "meet": (None, (255, 255, 255)),                 # white text on a dark gradient along the bottom
}
GALLERY_SIZE = (1280, 720)
GALLERY_BACKGROUND = (26, 26, 26)


def grid_tiles(count: int, columns: int, *, gutter: int = 8, size: tuple[int, int] = GALLERY_SIZE,
               ) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of ``count`` 16:9 tiles in ``columns``, centred, the last row centred, as Zoom does."""
    width, height = size
    rows = -(-count // columns)
    tile_w = min((width - gutter * (columns + 1)) // columns,
                 int((height - gutter * (rows + 1)) / rows * 16 / 9))
    tile_h = tile_w * 9 // 16
    top = (height - rows * tile_h - (rows - 1) * gutter) // 2
    boxes = []
    for index in range(count):
        row, column = divmod(index, columns)
        in_row = min(columns, count - row * columns)
        left = (width - in_row * tile_w - (in_row - 1) * gutter) // 2
        boxes.append((left + column * (tile_w + gutter), top + row * (tile_h + gutter), tile_w, tile_h))
    return boxes


#: The font meeting UIs' plates are drawn in here (Debian's fonts-dejavu-core, installed with Chromium).
PLATE_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def draw_tile(canvas: np.ndarray, box: tuple[int, int, int, int], photo: np.ndarray, name: str | None,
              style: str = "zoom", font_size: int = 0, font: str = PLATE_FONT) -> None:
    """Draw a participant tile: the photo fitted on a dark tile, the name plate in the lower left."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    x, y, width, height = box
    tile = np.full((height, width, 3), (50, 48, 46), np.uint8)
    scale = 0.75 * min(width / photo.shape[1], height / photo.shape[0])  # a webcam shows the head and shoulders
    resized = cv2.resize(photo, (max(1, int(photo.shape[1] * scale)), max(1, int(photo.shape[0] * scale))))
    oy, ox = height - resized.shape[0], (width - resized.shape[1]) // 2
    tile[oy:oy + resized.shape[0], ox:ox + resized.shape[1]] = resized
    if name is not None:
        plate, ink = PLATE_STYLES[style]
        size = font_size or max(11, height // 16)
        typeface = ImageFont.truetype(font, size)
        image = Image.fromarray(tile[:, :, ::-1].copy()).convert("RGBA")
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        text_w = int(typeface.getlength(name))
        px, py = 6, height - size - 16
        if plate is not None:
            draw.rounded_rectangle((px, py, px + text_w + 14, py + size + 10), radius=4, fill=plate)
        else:
            for row in range(size * 3):  # Meet darkens the bottom of a tile under the name
                alpha = int(150 * row / (size * 3))
                draw.line((0, height - size * 3 + row, width, height - size * 3 + row), fill=(0, 0, 0, alpha))
        image = Image.alpha_composite(image, overlay)
        ImageDraw.Draw(image).text((px + 7, py + 5), name, font=typeface, fill=ink)
        tile = np.asarray(image.convert("RGB"))[:, :, ::-1]
    canvas[y:y + height, x:x + width] = tile


def gallery_recording(scenes: list[tuple[float, list[tuple[np.ndarray, str | None]], int]], *, fps: int = 2,
                      style: str = "zoom") -> io.BytesIO:
    """A gallery recording in memory: each scene is (seconds, participants as (photo, name or None), columns)."""
    frames: list[np.ndarray] = []
    for seconds, participants, columns in scenes:
        canvas = np.full((GALLERY_SIZE[1], GALLERY_SIZE[0], 3), GALLERY_BACKGROUND, np.uint8)
        for box, (photo, name) in zip(grid_tiles(len(participants), columns), participants, strict=True):
            draw_tile(canvas, box, photo, name, style)
        frames += [canvas] * round(seconds * fps)
    return encode_video(frames, fps=fps)
