"""Display names read off a gallery's tiles: where name plates sit, OCR, and a vote over several reads.

Meeting UIs label each tile with the participant's display name: Zoom, Teams and Meet in
the tile's lower-left corner over the video, Janus's demo page in a badge in the panel's
header above it, others along the top. :func:`label_regions` gives those places for a
tile; :class:`TesseractReader` reads them all in one OCR call per frame (Tesseract's
Latin-script model, so "Zoë", "Núñez" and "O'Brien" come out as typed); :func:`name_from`
keeps the words that form a name, preferring words on a plate of their own colour (a
badge or a name plate) over the text around them ("Remote Video #1"); :class:`TileNamer`
reads a tile a few times, votes, and reads again only when the tile or its label changes.

Pixels go to the OCR process through a pipe, never through a file.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from kernel.types import ByteArray
from vision.gallery import GalleryLayout, Tile, same_tiles

logger = logging.getLogger(__name__)

#: Height of the band along a tile's bottom and top edge that may hold its name plate, as a share of the tile.
PLATE_BAND_SHARE = 0.2
#: ... and at least this many pixels (a small tile's plate is a larger share of it).
MIN_PLATE_BAND_PIXELS = 44
#: The band reaches this share of the tile's width from its left edge (plates start at the left).
PLATE_BAND_WIDTH_SHARE = 0.8
#: Above a tile (a panel header), at most this many pixels.
HEADER_MAX_PIXELS = 60
#: Bands lower than this many pixels hold no readable label.
MIN_BAND_PIXELS = 10
#: A plate is scaled to this many pixels high for the OCR (Tesseract reads 20–40 px letters best), ...
OCR_PLATE_HEIGHT = 96
#: ... plus this many pixels more at each further read of one label.
OCR_HEIGHT_STEP = 16
#: ... a whole band, whose letters fill a third of it or less, to this many...
OCR_BAND_HEIGHT = 120
#: ... but never enlarged more than this (a tall band holds letters of normal size already).
OCR_MAX_SCALE = 4.0
#: White margin around each band given to the OCR.
OCR_MARGIN = 12
#: A plate's colour differs from its region's background by this much (grey levels).
PLATE_CONTRAST = 20.0
#: A plate is at least this many pixels high...
MIN_PLATE_PIXELS = 8
#: ... at most this share of its region's height...
MAX_PLATE_SHARE = 0.9
#: ... and fills this share of its bounding box once the letters' holes are closed.
MIN_PLATE_FILL = 0.7
#: Letters stand out from what is right around them by this many grey levels...
TEXT_MIN_CONTRAST = 50
#: ... within this many pixels (wider than a stroke, narrower than the video's bright and dark areas).
TEXT_KERNEL_PIXELS = 15
#: A line of text, its letters joined, fills at least this share of its box.
TEXT_MIN_FILL = 0.3
#: Words the OCR is less sure of than this (0–100) are dropped.
MIN_WORD_CONFIDENCE = 50.0
#: ... except words of three letters or more, down to this confidence...
MIN_LONG_WORD_CONFIDENCE = 15.0
#: ... and a name has at least one word read this surely, and its words average MIN_WORD_CONFIDENCE
#: (stray marks on the video read as short, unsure words).
MIN_NAME_CONFIDENCE = 85.0
#: Sizes each label is read at; the name is the one most of them give.
READS_PER_LABEL = 3
#: A label is read again when its region changed this much (mean absolute grey difference, thumbnails)...
LABEL_CHANGE = 12.0
#: ... but not more often than this (a plate over moving video changes every frame)...
REREAD_SECONDS = 10.0
#: A new reading at least this similar to a tile's name (difflib's ratio) is that name misread, not a new one.
SAME_NAME_RATIO = 0.6
#: Rank of the inside-top place in :func:`label_regions` (read for plates only).
TOP_INSIDE_RANK = 2
#: Letters and name punctuation are at least this share of what was read ("640x360" and "0 kbits/sec" are no
#: names; "D'Arcy Smith" is).
NAME_MIN_LETTER_SHARE = 0.9
#: Letters that name punctuation may hold besides letters and spaces.
NAME_PUNCTUATION = "'’-.·"


@dataclass(frozen=True)
class Word:
    """One word the OCR found in a band."""

    text: str
    """The word as read."""
    confidence: float
    """The OCR's confidence, 0–100."""
    left: int
    """Left edge in the band's pixels."""
    top: int
    """Top edge in the band's pixels."""
    width: int
    """Width in the band's pixels."""
    height: int
    """Height in the band's pixels."""
    line: int
    """Which line of the band the word is on (words of one line share it)."""


class LabelReader(Protocol):
    """Reads the words of several image bands in one go."""

    def read(self, bands: Sequence[ByteArray], heights: Sequence[int] | None = None) -> list[list[Word]]:
        """The words of each band (BGR), in the band's own pixel coordinates; ``heights``: how high to scale each."""
        ...


class OcrUnavailableError(RuntimeError):
    """The OCR program is missing: gallery names cannot be read on this machine."""


class TesseractReader:
    """Tesseract (Debian's ``tesseract-ocr`` with its Latin-script model), one process per call, through pipes.

    Each call costs about 0.3 s of start-up (loading the model), so every band of a frame
    goes to one call, as the pages of one TIFF.
    """

    def __init__(self, language: str = "Latin", binary: str = "tesseract") -> None:
        path = shutil.which(binary)
        if path is None:
            raise OcrUnavailableError(
                f"gallery names need the OCR program {binary!r} (Debian: apt-get install tesseract-ocr "
                "tesseract-ocr-script-latn; scripts/setup-system installs both)")
        self.binary = path
        self.language = language

    def read(self, bands: Sequence[ByteArray], heights: Sequence[int] | None = None) -> list[list[Word]]:
        """Read every band in one Tesseract run (a page each of one multi-page TIFF) and hand each its words.

        ``heights`` says how high each band is scaled for the OCR (default :data:`OCR_BAND_HEIGHT`).
        Each band is read as one line of text on a page of its own, so the OCR lays out every
        label apart from the others.
        """
        if not bands:
            return []
        prepared = [_prepare_band(band, height)
                    for band, height in zip(bands, heights or [OCR_BAND_HEIGHT] * len(bands), strict=True)]
        ok, tiff = cv2.imencodemulti(".tiff", [image for image, _ in prepared])
        if not ok:
            raise RuntimeError("could not encode the label bands for the OCR")
        completed = subprocess.run(
            [self.binary, "stdin", "stdout", "-l", self.language, "--psm", "7", "tsv"],
            input=tiff.tobytes(), capture_output=True, timeout=60, check=False,
            # One thread: OpenMP's spinning threads cost more than they save on labels this small.
            env={**os.environ, "OMP_THREAD_LIMIT": "1"})
        if completed.returncode != 0:
            raise RuntimeError(f"tesseract failed: {completed.stderr.decode(errors='replace').strip()[:200]}")
        words: list[list[Word]] = [[] for _ in bands]
        for page, word in _tsv_words(completed.stdout.decode("utf-8", errors="replace")):
            if 0 <= page < len(bands):
                scale = prepared[page][1]
                words[page].append(Word(word.text, word.confidence, round((word.left - OCR_MARGIN) / scale),
                                        round((word.top - OCR_MARGIN) / scale), round(word.width / scale),
                                        round(word.height / scale), word.line))
        return words


def _prepare_band(band: ByteArray, height: int) -> tuple[np.ndarray, float]:
    """A band as the OCR reads it best: grey, scaled to ``height`` pixels, dark text on light."""
    grey = cv2.cvtColor(band, cv2.COLOR_BGR2GRAY)
    scale = min(height / max(grey.shape[0], 1), OCR_MAX_SCALE)
    scaled = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    if float(np.median(scaled)) < 128:
        scaled = 255 - scaled  # light text on a dark plate or video
    # Stretch each band so its background is white like the separators: the OCR thresholds the
    # stacked image as a whole, and a light-grey band next to white rows would turn black.
    low, high = np.percentile(scaled, (2, 60))
    stretched = (scaled.astype(np.float32) - low) * (255.0 / max(float(high - low), 1.0))
    page = np.clip(stretched, 0, 255).astype(np.uint8)
    # A white margin: Tesseract misreads letters that touch the page's edge.
    return cv2.copyMakeBorder(page, *(OCR_MARGIN,) * 4, cv2.BORDER_CONSTANT, value=255), scale


def _tsv_words(tsv: str) -> list[tuple[int, Word]]:
    """Tesseract's TSV output as (page index from 0, word in that page's pixels)."""
    words: list[tuple[int, Word]] = []
    for row in tsv.splitlines()[1:]:
        columns = row.split("\t")
        if len(columns) < 12 or columns[0] != "5" or not columns[11].strip():
            continue
        page, block, paragraph, line = int(columns[1]) - 1, int(columns[2]), int(columns[3]), int(columns[4])
        left, top, width, height = (int(value) for value in columns[6:10])
        words.append((page, Word(columns[11].strip(), float(columns[10]), left, top, width, height,
                                 block * 10_000 + paragraph * 100 + line)))
    return words


def label_regions(layout: GalleryLayout, tile: Tile) -> list[tuple[int, int, int, int]]:
    """Where the tile's name may be, most likely first: ``(y0, x0, y1, x1)`` boxes of the frame.

    Always three: inside along the bottom-left (Zoom, Teams, Meet), above the tile up to the
    tile above it (a panel header, as on Janus's demo page; empty when there is no room),
    inside along the top-left (:data:`TOP_INSIDE_RANK`).
    """
    height, width = layout.frame_size
    band = min(tile.height // 2, max(MIN_PLATE_BAND_PIXELS, round(tile.height * PLATE_BAND_SHARE)))
    right = tile.x0 + round(tile.width * PLATE_BAND_WIDTH_SHARE)
    regions = [(tile.y1 - band, tile.x0, tile.y1, right)]
    above_limit = max([other.y1 for other in layout.tiles
                       if other.y1 <= tile.y0 and other.x0 < tile.x1 and other.x1 > tile.x0], default=0)
    header_top = max(above_limit, tile.y0 - HEADER_MAX_PIXELS, 0)
    room = tile.y0 - header_top >= MIN_BAND_PIXELS
    regions.append((header_top if room else tile.y0, tile.x0, tile.y0, min(tile.x1, width)))
    regions.append((tile.y0, tile.x0, tile.y0 + band, right))
    return [(y0, x0, min(y1, height), x1) for y0, x0, y1, x1 in regions]


def clean_name(text: str) -> str | None:
    """A display name from OCR text: NFC, letters, spaces and name punctuation; None when it is no name."""
    text = unicodedata.normalize("NFC", text)
    kept = "".join(ch for ch in text if ch.isalpha() or ch.isspace() or ch in NAME_PUNCTUATION)
    words = kept.split()
    # Lone letters at either end are a plate's rounded edge, a tile's border or a mark on the video
    # read as a letter ("l Ana Lee", "Chloé Fontaine ù"); an initial keeps its dot ("Ana B.").
    while words and len(words[0]) == 1:
        words.pop(0)
    while words and len(words[-1]) == 1:
        words.pop()
    name = " ".join(words).strip(NAME_PUNCTUATION + " ")
    letters = sum(ch.isalpha() for ch in name)
    visible = sum(not ch.isspace() for ch in text)
    # "640x360", "0 kbits/sec" and stray marks are not names: most of what was read must be letters.
    allowed = sum(ch.isalpha() or ch in NAME_PUNCTUATION for ch in text if not ch.isspace())
    if letters < 2 or allowed < NAME_MIN_LETTER_SHARE * visible:
        return None
    return name


def name_from(words: list[Word]) -> tuple[str, float] | None:
    """The name a plate or line of text shows, with the OCR's mean confidence; None when it shows none.

    Of several lines, the one with the most letters is the name.
    """
    # A word read with low confidence is often a right one with a stray mark at its edge ("Dubois)").
    words = [word for word in words if word.confidence >= MIN_WORD_CONFIDENCE
             or (word.confidence >= MIN_LONG_WORD_CONFIDENCE and sum(ch.isalpha() for ch in word.text) >= 3)]
    if not words:
        return None
    lines: dict[int, list[Word]] = {}
    for word in words:
        lines.setdefault(word.line, []).append(word)
    best: tuple[str, float] | None = None
    for line_words in lines.values():
        line_words.sort(key=lambda word: word.left)
        name = clean_name(" ".join(word.text for word in line_words))
        if name is None:
            continue
        confidences = [word.confidence for word in line_words]
        confidence = float(np.mean(confidences))
        if max(confidences) < MIN_NAME_CONFIDENCE or confidence < MIN_WORD_CONFIDENCE:
            continue
        if best is None or sum(ch.isalpha() for ch in name) > sum(ch.isalpha() for ch in best[0]):
            best = (name, confidence)
    return best


@dataclass
class _LabelState:
    """What is known of one tile's label."""

    thumbnail: np.ndarray
    name: str | None = None
    votes: int = 0
    reads: int = 0
    read_at: float = 0.0


@dataclass(frozen=True)
class TileName:
    """A tile's display name, and how sure the vote is."""

    name: str
    """The name, NFC-normalised."""
    votes: int
    """Reads (sizes) of the last reading that gave this name."""
    reads: int
    """Times the tile's label was read so far (once, and again when it changed)."""


class TileNamer:
    """Names tiles by their labels: read once at several sizes and voted, read again only when the label changes."""

    def __init__(self, reader: LabelReader, *, reads_per_label: int = READS_PER_LABEL) -> None:
        self.reader = reader
        self.reads_per_label = reads_per_label
        self._states: dict[Tile, _LabelState] = {}

    def names(self, image: ByteArray, layout: GalleryLayout, tiles: Sequence[Tile],
              timestamp: float) -> dict[Tile, TileName]:
        """The names of ``tiles`` of this frame (tiles whose label cannot be read are left out)."""
        # A tile whose edges moved a little is the same tile: its label's state moves with it.
        previous = same_tiles(layout.tiles, self._states)
        self._states = {tile: self._states[old] for tile, old in previous.items()}
        to_read: list[Tile] = []
        for tile in tiles:
            thumbnail = _label_thumbnail(image, layout, tile)
            state = self._states.get(tile)
            if state is None:
                state = self._states[tile] = _LabelState(thumbnail)
            changed = (state.thumbnail.shape != thumbnail.shape
                       or float(np.abs(state.thumbnail - thumbnail).mean()) > LABEL_CHANGE)
            # A named tile keeps its name until the layout changes (a new tile) or its owner says another
            # person sits there (:meth:`forget`): a plate over moving video changes every frame, and reading
            # it again would cost time and could only misread. A tile without a name is tried again.
            if state.reads == 0 or (state.name is None and changed and timestamp - state.read_at >= REREAD_SECONDS):
                to_read.append(tile)
            state.thumbnail = thumbnail
        if to_read:
            self._read(image, layout, to_read, timestamp)
        named: dict[Tile, TileName] = {}
        for tile in tiles:
            state = self._states[tile]
            if state.name is not None:
                named[tile] = TileName(state.name, state.votes, state.reads)
        return named

    def forget(self, tile: Tile) -> None:
        """Read this tile's label again when it next holds a face (another person sits there now)."""
        self._states.pop(tile, None)

    def _read(self, image: ByteArray, layout: GalleryLayout, tiles: list[Tile], timestamp: float) -> None:
        bands: list[ByteArray] = []
        heights: list[int] = []
        owners: list[tuple[Tile, tuple[int, int]]] = []
        # Every place a label may be is read at several sizes, in one OCR run for the whole frame; the
        # sizes give a still label several different reads, so one misread letter is outvoted.
        sizes = [OCR_PLATE_HEIGHT + OCR_HEIGHT_STEP * step for step in range(self.reads_per_label)]
        for tile in tiles:
            for rank, (y0, x0, y1, x1) in enumerate(label_regions(layout, tile)):
                region = image[y0:y1, x0:x1]
                # Plates (badges, name plates: read on their own, with their own polarity), then lines of
                # text for names written on the video itself (Meet) or on a plate too close to the video's
                # colour to stand out; a plate is the surer place for a name, so it ranks first.
                # Inside along the top, only plates: lines of text there are mostly the video's own edges.
                lines = find_text_lines(region) if rank < TOP_INSIDE_RANK else []
                for kind, boxes in enumerate((find_plates(region), lines)):
                    for y_0, x_0, y_1, x_1 in boxes:
                        for size in sizes:
                            bands.append(region[y_0:y_1, x_0:x_1])
                            heights.append(size)
                            owners.append((tile, (rank, kind)))
        words = self.reader.read(bands, heights)
        # Per tile, the names read in its likeliest place that gave any: the most frequent, then the surest.
        found: dict[Tile, tuple[tuple[int, int], Counter[str], dict[str, float]]] = {}
        for (tile, place), band_words in zip(owners, words, strict=True):
            result = name_from(band_words)
            if result is None or (tile in found and found[tile][0] < place):
                continue
            if tile not in found or found[tile][0] > place:
                found[tile] = (place, Counter(), {})
            _, counts, confidence = found[tile]
            counts[result[0]] += 1
            confidence[result[0]] = max(confidence.get(result[0], 0.0), result[1])
        for tile in tiles:
            state = self._states[tile]
            state.reads += 1
            state.read_at = timestamp
            if tile not in found:
                continue  # nothing readable now: a name read before stays
            _, counts, confidence = found[tile]
            name = max(counts, key=lambda name: (counts[name], confidence[name]))
            # The same label read a little differently is the same participant: keep the name they have.
            if state.name is None or difflib.SequenceMatcher(None, state.name, name).ratio() < SAME_NAME_RATIO:
                state.name, state.votes = name, counts[name]


def find_plates(region: ByteArray) -> list[tuple[int, int, int, int]]:
    """Filled rectangles of their own colour in a label region (badges, name plates): ``(y0, x0, y1, x1)``."""
    if region.shape[0] < MIN_BAND_PIXELS or region.shape[1] < MIN_BAND_PIXELS:
        return []
    grey = cv2.cvtColor(region, cv2.COLOR_BGR2GRAY).astype(np.float32)
    background = float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))
    mask = (np.abs(grey - background) >= PLATE_CONTRAST).astype(np.uint8)
    # Close the holes the letters leave in the plate's colour.
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    plates = []
    for x, y, width, height, area in stats[1:count]:
        inside = grey[y:y + height, x:x + width]
        # A plate is mostly its own colour; a word's letters, closed into a blob, are mostly background.
        if (MIN_PLATE_PIXELS <= height <= MAX_PLATE_SHARE * region.shape[0] and width >= 1.5 * height
                and area >= MIN_PLATE_FILL * width * height
                and abs(float(np.median(inside)) - background) >= PLATE_CONTRAST):
            # Inset, so the plate's rounded edges are not read as letters ("l Ana Lee").
            inset_x, inset_y = max(2, int(height) // 4), 1  # little off the top and bottom: descenders
            plates.append((int(y) + inset_y, int(x) + inset_x, int(y + height) - inset_y, int(x + width) - inset_x))
    return sorted(plates, key=lambda box: (box[1], box[0]))


def find_text_lines(region: ByteArray) -> list[tuple[int, int, int, int]]:
    """Boxes of lines of text in a label region, with a margin: ``(y0, x0, y1, x1)``, left to right.

    Letters are thin strokes brighter (or darker) than what is right around them. A top-hat
    (black-hat) transform keeps exactly such structures, narrower than its kernel, and drops
    the large bright (dark) areas of the video behind; closing what is left along the line
    joins a name's letters and words into one wide, low box.
    """
    if region.shape[0] < MIN_BAND_PIXELS or region.shape[1] < MIN_BAND_PIXELS:
        return []
    grey = cv2.cvtColor(region, cv2.COLOR_BGR2GRAY)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (TEXT_KERNEL_PIXELS, TEXT_KERNEL_PIXELS))
    lines = []
    for transform in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT):
        strokes = (cv2.morphologyEx(grey, transform, kernel) >= TEXT_MIN_CONTRAST).astype(np.uint8)
        joined = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, np.ones((3, 11), np.uint8))
        count, _, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
        pieces = sorted((int(x), int(y), int(x + width), int(y + height))
                        for x, y, width, height, area in stats[1:count]
                        if MIN_PLATE_PIXELS <= height <= MAX_PLATE_SHARE * region.shape[0]
                        and area >= TEXT_MIN_FILL * width * height)
        for x0, y0, x1, y1 in _join_pieces(pieces):
            height = y1 - y0
            if x1 - x0 >= 2 * height:
                # A margin above and below for the letters' accents and descenders; little to the sides,
                # where the video (or the plate's edge) next to the name would read as more letters.
                margin, side = max(3, height // 2), 3
                lines.append((max(y0 - margin, 0), max(x0 - side, 0),
                              min(y1 + margin, region.shape[0]), min(x1 + side, region.shape[1])))
    return sorted(lines, key=lambda box: (box[1], box[0]))


def _join_pieces(pieces: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Join ``(x0, y0, x1, y1)`` pieces of one line of text: side by side, level, and close.

    A bright or dark patch of the video behind a name breaks its strokes in two; the halves
    sit on one level with a gap shorter than a letter or two.
    """
    joined: list[tuple[int, int, int, int]] = []
    for x0, y0, x1, y1 in pieces:  # sorted by x0
        if joined:
            jx0, jy0, jx1, jy1 = joined[-1]
            height = max(y1 - y0, jy1 - jy0)
            overlap = min(y1, jy1) - max(y0, jy0)
            if overlap >= 0.5 * min(y1 - y0, jy1 - jy0) and x0 - jx1 <= 1.5 * height:
                joined[-1] = (jx0, min(y0, jy0), max(x1, jx1), max(y1, jy1))
                continue
        joined.append((x0, y0, x1, y1))
    return joined


def _label_thumbnail(image: ByteArray, layout: GalleryLayout, tile: Tile) -> np.ndarray:
    """A small grey picture of a tile's label regions, to notice a label that changed."""
    parts = []
    for y0, x0, y1, x1 in label_regions(layout, tile):
        region = image[y0:y1, x0:x1]
        if region.size == 0:
            parts.append(np.zeros((4, 32), np.float32))
            continue
        grey = cv2.cvtColor(region, cv2.COLOR_BGR2GRAY)
        parts.append(cv2.resize(grey, (32, 4), interpolation=cv2.INTER_AREA).astype(np.float32))
    return np.vstack(parts)
