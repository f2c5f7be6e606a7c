"""Gallery views: the grid of participant tiles in a meeting recording or a shared meeting window.

Zoom, Teams, Meet, Jitsi, BigBlueButton and Janus's own demo page all draw a meeting the
same way: video tiles on a plain background, separated by gutters of that background. A
gutter is a line of pixels of (almost) one colour that runs the whole width or height of
the region it divides, which a camera picture almost never has. :func:`find_tiles` cuts
the frame recursively along such lines (an "XY cut"): the frame into bands, each band into
columns, each column into bands again, until nothing divides; what is left and large
enough is a tile. That finds grids of any size, a last row centred under the others, a
speaker view with its filmstrip, the thin border of an active-speaker highlight (it is
one more uniform line) and a window resized mid-recording, with no template per platform.

A camera picture has no gutters, so it stays one tile; :attr:`GalleryLayout.is_gallery`
also wants two tiles of one size, as every gallery has, before a layout counts as one.
Where the faces go is decided by :func:`tile_of`: the tile that holds the face box's centre.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from kernel.types import ByteArray, FloatArray

#: A row or column of a region is a gutter when its grey levels vary less than this (standard deviation).
GUTTER_MAX_STD = 3.0
#: Flat lines whose mean grey level changes by more than this belong to different runs (background, then wall).
GUTTER_COLOUR_STEP = 3.0
#: A gutter ends at a tile's edge: pixels across the edge differ by at least this much on average.
GUTTER_MIN_EDGE = 8.0
#: A gutter's grey level is within this of the page's colour (the frame's outline).
GUTTER_BACKGROUND_TOLERANCE = 16.0
#: Lines past a gutter's end within which its edge may lie (compression blurs edges).
EDGE_BLUR_LINES = 2
#: A tile is at least this share of the frame's width and of its height (and MIN_TILE_PIXELS): smaller leaves
#: are text, buttons and name plates.
MIN_TILE_SHARE = 0.06
#: ... and at least this many pixels on each side.
MIN_TILE_PIXELS = 48
#: A tile is not a flat area: its grey levels vary more than this (an empty slot of the page is flat).
MIN_TILE_STD = 6.0
#: Two tiles are "of one size" when width and height differ by at most this share.
SAME_SIZE_TOLERANCE = 0.12
#: The follower finds the tiles again when the page outside them changed by this much (mean absolute grey levels).
FOLLOW_PAGE_CHANGE = 3.0
#: A tile overlapping one of the previous frame by this much (IoU) is the same tile.
SAME_TILE_OVERLAP = 0.7
#: The XY cut stops after this many levels (a grid needs 3; the rest is headroom for nested panels).
MAX_CUT_DEPTH = 6


@dataclass(frozen=True, order=True)
class Tile:
    """One participant tile: a rectangle of the frame in pixels, ``x1``/``y1`` exclusive."""

    y0: int
    """Top edge."""
    x0: int
    """Left edge."""
    y1: int
    """Bottom edge (exclusive)."""
    x1: int
    """Right edge (exclusive)."""

    @property
    def width(self) -> int:
        """Width in pixels."""
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        """Height in pixels."""
        return self.y1 - self.y0

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``, as frame sizes are given."""
        return self.height, self.width

    def view(self, image: ByteArray) -> ByteArray:
        """The tile's pixels of ``image`` (a view, not a copy)."""
        return image[self.y0:self.y1, self.x0:self.x1]

    def same_size_as(self, other: Tile) -> bool:
        """Whether both tiles have one size, within :data:`SAME_SIZE_TOLERANCE`."""
        return (abs(self.width - other.width) <= SAME_SIZE_TOLERANCE * max(self.width, other.width)
                and abs(self.height - other.height) <= SAME_SIZE_TOLERANCE * max(self.height, other.height))


@dataclass(frozen=True)
class GalleryLayout:
    """The tiles found in one frame, in reading order (top to bottom, then left to right)."""

    frame_size: tuple[int, int]
    """``(height, width)`` of the frame."""
    tiles: tuple[Tile, ...]
    """Every tile, in reading order."""

    @property
    def is_gallery(self) -> bool:
        """Whether this looks like a meeting's gallery: at least two tiles, two of them of one size."""
        tiles = self.tiles
        return any(a.same_size_as(b) for i, a in enumerate(tiles) for b in tiles[i + 1:])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of every run of True in a 1-d boolean array."""
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(edges[i]), int(edges[i + 1])) for i in range(0, len(edges), 2)]


def _gutter_lines(grey: np.ndarray, axis: int, background: float) -> np.ndarray:
    """Which lines along ``axis`` (0: rows, 1: columns) of a region are gutter: one flat colour, ending at an edge.

    A flat line is not enough: a plain wall in a webcam picture is flat too once the video
    is compressed (standard deviation 2.0–2.4 along a tile, where an encoded gutter reaches
    1.8). What a wall lacks is the straight edge a gutter ends at. So runs of flat lines
    are split where their colour changes, and a run is a gutter only when, at one end at least
    that meets content, the pixels across the end differ by :data:`GUTTER_MIN_EDGE` on average.
    A gutter also has the page's colour (``background``, within :data:`GUTTER_BACKGROUND_TOLERANCE`):
    a tile's own flat bars around a letterboxed camera belong to the tile, and its name plate sits on them.
    """
    lines = grey if axis == 0 else grey.T
    flat = lines.std(axis=1) <= GUTTER_MAX_STD
    means = lines.mean(axis=1)
    # Mean absolute change from each line to the next, pixel by pixel: high across a tile's edge.
    step = np.abs(np.diff(lines, axis=0)).mean(axis=1)
    gutter = np.zeros(len(lines), bool)
    for start, stop in _runs(flat):
        # A colour change inside a flat run separates two runs (page background, then a flat wall).
        cuts = [start, *(start + 1 + np.flatnonzero(np.abs(np.diff(means[start:stop])) > GUTTER_COLOUR_STEP)), stop]
        for run_start, run_stop in itertools.pairwise(cuts):
            ends_ok = abs(float(means[run_start:run_stop].mean()) - background) <= GUTTER_BACKGROUND_TOLERANCE
            # Compression blurs an edge over a line or two: look for it that far into the content. One edge
            # is enough: a dark picture may fade into a dark gutter on one side.
            edges = []
            if run_start > 0 and not flat[run_start - 1]:
                edges.append(bool(step[max(run_start - 1 - EDGE_BLUR_LINES, 0):run_start].max() >= GUTTER_MIN_EDGE))
            if run_stop < len(lines) and not flat[run_stop]:
                edges.append(bool(step[run_stop - 1:run_stop + EDGE_BLUR_LINES].max() >= GUTTER_MIN_EDGE))
            ends_ok &= not edges or any(edges)
            gutter[run_start:run_stop] = ends_ok
    return gutter


def _content_spans(grey: np.ndarray, axis: int, background: float) -> list[tuple[int, int]]:
    """Spans along ``axis`` (0: rows, 1: columns) between the gutters of a region; its margins dropped."""
    return _runs(~_gutter_lines(grey, axis, background))


def _cut(grey: np.ndarray, y0: int, x0: int, axis: int, depth: int, background: float, leaves: list[Tile]) -> None:
    """Split the region at (y0, x0) along ``axis``, then each part along the other axis, down to the leaves."""
    spans = _content_spans(grey, axis, background)
    if not spans:
        return  # all gutter
    if len(spans) == 1:
        start, stop = spans[0]
        trimmed = grey[start:stop] if axis == 0 else grey[:, start:stop]
        other = _content_spans(trimmed, 1 - axis, background)
        if len(other) <= 1 or depth >= MAX_CUT_DEPTH:
            # Nothing divides this region any more: a leaf, its outer margins trimmed on both axes.
            rows = (start, stop) if axis == 0 else (other[0] if other else (0, grey.shape[0]))
            cols = (other[0] if other else (0, grey.shape[1])) if axis == 0 else (start, stop)
            leaves.append(Tile(y0 + rows[0], x0 + cols[0], y0 + rows[1], x0 + cols[1]))
            return
    for start, stop in spans:
        if axis == 0:
            _cut(grey[start:stop], y0 + start, x0, 1, depth + 1, background, leaves)
        else:
            _cut(grey[:, start:stop], y0, x0 + start, 0, depth + 1, background, leaves)


def find_tiles(image: ByteArray) -> GalleryLayout:
    """The tiles of one frame (BGR): regions between full-length gutters, large and busy enough to be video."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    height, width = grey.shape
    leaves: list[Tile] = []
    # The page's colour: what the frame's outline mostly shows (the margins around the grid).
    background = float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))
    _cut(grey, 0, 0, 0, 0, background, leaves)
    min_w = max(MIN_TILE_PIXELS, MIN_TILE_SHARE * width)
    min_h = max(MIN_TILE_PIXELS, MIN_TILE_SHARE * height)
    tiles = [leaf for leaf in leaves
             if leaf.width >= min_w and leaf.height >= min_h
             and float(grey[leaf.y0:leaf.y1, leaf.x0:leaf.x1].std()) > MIN_TILE_STD]
    return GalleryLayout((height, width), tuple(sorted(tiles)))


def tile_overlap(a: Tile, b: Tile) -> float:
    """Intersection over union of two tiles."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a.width * a.height + b.width * b.height - inter)


def same_tiles(tiles: Sequence[Tile], previous: Iterable[Tile]) -> dict[Tile, Tile]:
    """For each tile, the previous frame's tile it is (overlapping by :data:`SAME_TILE_OVERLAP`), if any.

    A tile's found edges may move by a few pixels from frame to frame (a letterboxed camera whose
    picture reaches the bar or not, compression at the edge); it is still the same tile.
    """
    candidates = list(previous)
    matched: dict[Tile, Tile] = {}
    for tile in tiles:
        if tile in candidates:
            matched[tile] = tile
            continue
        best = max(candidates, key=lambda old: tile_overlap(tile, old), default=None)
        if best is not None and tile_overlap(tile, best) >= SAME_TILE_OVERLAP:
            matched[tile] = best
    return matched


def tile_of(layout: GalleryLayout, boxes: FloatArray) -> np.ndarray:
    """Index into ``layout.tiles`` of the tile holding each box's centre; -1 for a box outside every tile."""
    owners = np.full(len(boxes), -1, np.int64)
    if not len(boxes):
        return owners
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for index, tile in enumerate(layout.tiles):
        inside = ((centres[:, 0] >= tile.x0) & (centres[:, 0] < tile.x1)
                  & (centres[:, 1] >= tile.y0) & (centres[:, 1] < tile.y1))
        owners[inside & (owners < 0)] = index
    return owners


#: How long a frame without tiles stands for the frames after it (see :meth:`LayoutFollower.layout_of`): finding
#: tiles costs 6–14 ms a frame, a third of the per-frame work of a camera recording (docs/benchmarks.md).
CAMERA_RECHECK_SECONDS = 5.0


class LayoutFollower:
    """The tiles of each frame of one video, found again only when the page around the tiles changed.

    Finding the tiles costs about 10 ms per 720p frame. Between layout changes only the
    tiles' contents move: the page around them (gutters, headers, empty slots) stays as it
    was. So the follower compares the pixels outside the last layout's tiles with the frame
    that layout was found in, and looks for tiles again only when they changed (someone
    joined, left or moved and the gutters with them, the window was resized, the view switched).
    """

    def __init__(self, camera_recheck_seconds: float = CAMERA_RECHECK_SECONDS) -> None:
        self.camera_recheck_seconds = camera_recheck_seconds
        """How long a frame found to be one camera picture stands for the next frames (no page to compare)."""
        self._layout: GalleryLayout | None = None
        self._page: np.ndarray | None = None
        self._outside: np.ndarray | None = None
        self._found_at: float | None = None

    def layout_of(self, image: ByteArray, timestamp: float | None = None) -> GalleryLayout:
        """The frame's tiles: the previous frame's when the page around them is unchanged.

        A camera picture has no page around its content: every frame differs everywhere.
        So, on frames with a ``timestamp``, a frame found not to be a gallery stands for the
        next ``camera_recheck_seconds`` of video of the same size; a recording that switches
        to a gallery view is split from then on, at most that much later.
        """
        if (self._layout is not None and not self._layout.is_gallery and timestamp is not None
                and self._found_at is not None and self._layout.frame_size == image.shape[:2]
                and 0 <= timestamp - self._found_at < self.camera_recheck_seconds):
            return self._layout
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).ravel()
        if (self._layout is not None and self._page is not None and self._outside is not None
                and self._layout.frame_size == image.shape[:2] and len(self._outside)):
            page = grey.take(self._outside).astype(np.int16)
            if float(np.abs(page - self._page).mean()) <= FOLLOW_PAGE_CHANGE:
                return self._layout
        self._found_at = timestamp
        layout = find_tiles(image)
        outside = np.ones(image.shape[:2], bool)
        for tile in layout.tiles:
            # A pixel of margin: compression lets a tile's edge bleed into the gutter.
            outside[max(tile.y0 - 1, 0):tile.y1 + 1, max(tile.x0 - 1, 0):tile.x1 + 1] = False
        self._outside = np.flatnonzero(outside)
        self._page = grey.take(self._outside).astype(np.int16)
        self._layout = layout
        return layout
