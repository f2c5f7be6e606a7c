"""A gallery frame split into its participants: faces in a named tile become that participant's stream.

A meeting recording (or a shared meeting window) shows every participant in a tile with
their display name on it. :class:`GallerySplitter` finds the tiles (:mod:`vision.gallery`),
reads the names of the tiles that hold faces (:mod:`vision.labels`), and hands the
capture pipeline one part per named tile: the tile's pixels, its faces in the tile's own
coordinates, and the name as the stream. A student is then identified by name plus
face, as in a live meeting: whoever moves to another tile, or comes back after switching
the camera off, keeps their stream and so their student; two people with one name are
two streams ("Ana Lee", "Ana Lee [2]") and so two students.

Faces outside any tile, or in a tile whose label cannot be read, stay in the frame's own
stream, tracked as a camera picture is, and become "Student N". A frame that does not
look like a gallery (``auto``) is a camera picture as a whole: a classroom camera is
never split into tiles.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from kernel.consent import ConsentPolicy
from kernel.errors import ConfigurationError
from kernel.settings import Settings, VideoLayout
from kernel.types import ByteArray, FloatArray, FrameDetections, VideoFrame
from vision.gallery import GalleryLayout, Tile, find_tiles, tile_of
from vision.labels import OcrUnavailableError, TesseractReader, TileNamer
from vision.recognition import Embedder
from vision.tracking import TrackSummary

logger = logging.getLogger(__name__)

#: The stream of a recording's own frames (:class:`vision.sources.RecordedFileSource`'s default).
RECORDING_STREAM = "main"


@dataclass(frozen=True)
class FramePart:
    """One stream's share of a frame: its pixels and its faces in those pixels' coordinates."""

    frame: VideoFrame
    """The part's pixels (a tile is a view of the frame, not a copy), under the part's stream."""
    detections: FrameDetections
    """The part's faces, in the part's coordinates, under the part's stream."""


@dataclass
class GalleryStats:
    """What the splitter saw over a whole video."""

    frames: int = 0
    """Frames split."""
    gallery_frames: int = 0
    """Frames that looked like a gallery."""
    named_faces: int = 0
    """Faces put in a named tile's stream."""
    opted_out_faces: int = 0
    """Faces dropped because their tile's name is not to be analysed."""
    names: Counter[str] = field(default_factory=Counter)
    """Streams that came from a tile's label, with the faces each got."""


def _shift(detections: FrameDetections, tile: Tile, stream: str) -> FrameDetections:
    """Faces moved into a tile's own coordinates, under ``stream``."""
    offset = np.array([tile.x0, tile.y0], np.float32)
    return FrameDetections(stream=stream, timestamp=detections.timestamp, frame_size=tile.size,
                           boxes=detections.boxes - np.tile(offset, 2), scores=detections.scores,
                           keypoints=detections.keypoints - offset)


class GallerySplitter:
    """Splits each frame's faces among the participants whose tiles hold them."""

    def __init__(self, namer: TileNamer, layout: VideoLayout = VideoLayout.auto,
                 consent: ConsentPolicy | None = None, embedder: Embedder | None = None) -> None:
        self.namer = namer
        self.layout = layout
        self.consent = consent or ConsentPolicy.everyone()
        self.embedder = embedder
        """Tells apart participants who share a display name when their tiles move; None: reading order."""
        self.stats = GalleryStats()
        self._keys: dict[Tile, str] = {}
        self._known: dict[str, list[str]] = {}
        self._faces: dict[str, FloatArray] = {}

    def split(self, frame: VideoFrame, detections: FrameDetections) -> list[FramePart]:
        """The frame's parts: the frame's own stream first (faces in no named tile), then one per named tile."""
        self.stats.frames += 1
        if self.layout is VideoLayout.camera:
            return [FramePart(frame, detections)]
        layout = find_tiles(frame.image)
        if self.layout is VideoLayout.auto and not layout.is_gallery:
            self._keys = {}
            return [FramePart(frame, detections)]
        self.stats.gallery_frames += 1
        owners = tile_of(layout, detections.boxes)
        occupied = [layout.tiles[index] for index in sorted(set(owners.tolist()) - {-1})]
        names = self.namer.names(frame.image, layout, occupied, frame.timestamp) if occupied else {}
        keys = self._stream_keys(layout, {tile: named.name for tile, named in names.items()}, frame.image,
                                 detections, owners)
        keep_in_frame = np.ones(len(detections), bool)
        parts: list[FramePart] = []
        for index, tile in enumerate(layout.tiles):
            key = keys.get(tile)
            if key is None:
                continue
            mine = owners == index
            keep_in_frame &= ~mine
            if not self.consent.allows(names[tile].name):
                self.stats.opted_out_faces += int(mine.sum())
                continue
            self.stats.named_faces += int(mine.sum())
            self.stats.names[key] += int(mine.sum())
            parts.append(FramePart(VideoFrame(key, frame.timestamp, tile.view(frame.image)),
                                   _shift(detections.select(mine), tile, key)))
        return [FramePart(frame, detections.select(keep_in_frame)), *parts]

    def _stream_keys(self, layout: GalleryLayout, names: dict[Tile, str], image: ByteArray,
                     detections: FrameDetections, owners: np.ndarray) -> dict[Tile, str]:
        """A stream per named tile: the name, or ``"Name [2]"``… when several tiles show one name.

        A tile that kept its place keeps the key it had. Tiles that moved, when their name is
        shared, are matched to their keys by face (the recogniser's embedding of each tile's
        largest face against the one last seen under each key), so two people with one name
        keep their own students through a layout change; without a recogniser they are
        matched in reading order.
        """
        keys: dict[Tile, str] = {}
        for tile in layout.tiles:
            previous = self._keys.get(tile)
            if tile in names and previous is not None and _name_of_key(previous) == names[tile]:
                keys[tile] = previous
        waiting: dict[str, list[Tile]] = {}
        for tile in layout.tiles:
            if tile in names and tile not in keys:
                waiting.setdefault(names[tile], []).append(tile)
        for name, tiles in waiting.items():
            taken = set(keys.values())
            known = [key for key in self._known.get(name, []) if key not in taken]
            shown = len(tiles) + sum(_name_of_key(key) == name for key in taken)
            shared = shown > 1 or len(self._known.get(name, [])) > 1
            faces = ({tile: self._embedding(image, detections, owners, layout.tiles.index(tile)) for tile in tiles}
                     if shared and self.embedder is not None else {})
            for tile, key in self._match(tiles, known, faces):
                keys[tile] = key
                taken.add(key)
            for tile in tiles:
                if tile not in keys:
                    number, key = 1, name
                    while key in taken or key in self._known.get(name, []):
                        number += 1
                        key = f"{name} [{number}]"
                    keys[tile] = key
                    taken.add(key)
                    self._known.setdefault(name, []).append(key)
            for tile in tiles:
                if faces.get(tile) is not None:
                    self._faces[keys[tile]] = faces[tile]  # type: ignore[assignment]
        self._keys = keys
        return keys

    def _match(self, tiles: list[Tile], known: list[str],
               faces: dict[Tile, FloatArray | None]) -> list[tuple[Tile, str]]:
        """Pairs of a waiting tile and a known key of its name, by face where both have one, else in order."""
        if not known:
            return []
        with_faces = [tile for tile in tiles if faces.get(tile) is not None]
        keyed = [key for key in known if key in self._faces]
        if with_faces and keyed and self.embedder is not None:
            similarity = np.stack([faces[tile] for tile in with_faces]) @ np.stack([self._faces[k] for k in keyed]).T  # type: ignore[misc]
            rows, cols = linear_sum_assignment(-similarity)
            return [(with_faces[r], keyed[c]) for r, c in zip(rows, cols, strict=True)
                    if similarity[r, c] > self.embedder.scale.different]
        return list(zip(tiles, known, strict=False))

    def _embedding(self, image: ByteArray, detections: FrameDetections, owners: np.ndarray,
                   tile_index: int) -> FloatArray | None:
        """The recogniser's embedding of the largest face in a tile; None without one."""
        assert self.embedder is not None
        mine = np.flatnonzero(owners == tile_index)
        if not len(mine):
            return None
        boxes = detections.boxes[mine]
        largest = int(mine[int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))])
        embedding: FloatArray = self.embedder.embed(image, detections.keypoints[largest:largest + 1])[0]
        return embedding


def gallery_splitter_for(settings: Settings, consent: ConsentPolicy | None = None,
                         embedder: Embedder | None = None) -> GallerySplitter | None:
    """The splitter the settings ask for (``video_layout``); None for camera pictures only.

    Without the OCR program, ``gallery`` is a configuration error and ``auto`` reads every
    frame as a camera picture, with one warning.
    """
    if settings.video_layout is VideoLayout.camera:
        return None
    try:
        reader = TesseractReader(settings.ocr_language)
    except OcrUnavailableError as exc:
        if settings.video_layout is VideoLayout.gallery:
            raise ConfigurationError(str(exc)) from exc
        logger.warning("%s; reading every frame as one camera picture", exc)
        return None
    return GallerySplitter(TileNamer(reader), settings.video_layout, consent, embedder)


def is_tile_stream(stream: str) -> bool:
    """Whether a recording's stream is a named tile's (every stream but the frame's own is)."""
    return stream != RECORDING_STREAM


def recorded_layout(summaries: list[TrackSummary]) -> str:
    """The layout a recording's analysis records: ``gallery`` when any face was named by its tile, else ``camera``."""
    return "gallery" if any(is_tile_stream(summary.stream) for summary in summaries) else "camera"


def _name_of_key(key: str) -> str:
    """The display name a stream key was made from (``"Ana Lee [2]"`` → ``"Ana Lee"``)."""
    if key.endswith("]") and " [" in key:
        stem, _, number = key[:-1].rpartition(" [")
        if number.isdigit():
            return stem
    return key
