"""The bot's video card: what every participant sees in the bot's tile.

The card says, in plain words, that the meeting is being analysed for engagement and
how to opt out. It is drawn in memory with OpenCV once and sent as a video track at a
low frame rate (a still image costs the encoder almost nothing). Nothing is written to
disk.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import cv2
import numpy as np
from aiortc import VideoStreamTrack
from av import VideoFrame as AvVideoFrame

from kernel.types import ByteArray

CARD_HEADLINE = "ClassLens is analysing this meeting for engagement"
#: 90 kHz is the RTP video clock; aiortc's encoders expect pts in it.
_VIDEO_CLOCK_RATE = 90000
_TIME_BASE = fractions.Fraction(1, _VIDEO_CLOCK_RATE)


def _wrap(text: str, width_chars: int) -> list[str]:
    """Greedy word wrap: cv2.putText draws one line only."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if len(candidate) > width_chars and current:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def render_card(lines: list[str], size: tuple[int, int] = (640, 360)) -> ByteArray:
    """Draw the card: a dark background, the headline large, the other lines smaller (BGR uint8)."""
    width, height = size
    image = np.full((height, width, 3), (48, 32, 24), dtype=np.uint8)
    # A coloured band on top makes the tile recognisable at thumbnail size.
    cv2.rectangle(image, (0, 0), (width, height // 8), (40, 150, 240), thickness=-1)
    cv2.putText(image, "ClassLens", (16, height // 8 - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2,
                cv2.LINE_AA)
    y = height // 8 + 44
    for index, line in enumerate(lines):
        scale, thickness, wrap = (0.8, 2, 36) if index == 0 else (0.55, 1, 56)
        for part in _wrap(line, wrap):
            cv2.putText(image, part, (16, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                        cv2.LINE_AA)
            y += 36 if index == 0 else 26
        y += 10
    return image


def card_lines(display_name: str, consent_note: str) -> list[str]:
    """The text of the card: the headline, who the bot is, and how consent works in this session."""
    return [CARD_HEADLINE, f"Participant '{display_name}' is a bot run by your teacher.",
            "Only derived numbers are kept; no video is recorded.", consent_note]


class MeetingCardTrack(VideoStreamTrack):
    """A video track that repeats the card at ``fps`` frames per second."""

    kind = "video"

    def __init__(self, lines: list[str], *, fps: float = 2.0, size: tuple[int, int] = (640, 360)) -> None:
        super().__init__()
        self.image = render_card(lines, size)
        self.fps = fps
        self._paced_from: float | None = None
        self._frames = 0

    async def recv(self) -> AvVideoFrame:
        """The next card frame, paced in real time."""
        now = time.monotonic()
        if self._paced_from is None:
            self._paced_from = now
        else:
            due = self._paced_from + self._frames / self.fps
            if due > now:
                await asyncio.sleep(due - now)
        pts = round(self._frames / self.fps * _VIDEO_CLOCK_RATE)
        self._frames += 1
        frame = AvVideoFrame.from_ndarray(self.image, format="bgr24")
        frame.pts = pts
        frame.time_base = _TIME_BASE
        return frame
