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

import difflib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from kernel.consent import ConsentPolicy
from kernel.errors import ConfigurationError
from kernel.settings import Settings, VideoLayout
from kernel.store import NAME_FROM_LABEL
from kernel.types import ByteArray, FloatArray, FrameDetections, IntArray, VideoFrame
from vision.gallery import GalleryLayout, LayoutFollower, Tile, same_tiles, tile_of
from vision.labels import SAME_NAME_RATIO, OcrUnavailableError, TesseractReader, TileNamer
from vision.recognition import Embedder
from vision.tracking import TrackSummary

logger = logging.getLogger(__name__)

#: A named tile whose face is clearly someone else's for this many sampled frames in a row is read again.
STRANGER_FRAMES = 3

#: The stream of a recording's own frames (:class:`vision.sources.RecordedFileSource`'s default).
RECORDING_STREAM = "main"


@dataclass(frozen=True)
class FramePart:
    """One stream's share of a frame: its pixels and its faces in those pixels' coordinates."""

    frame: VideoFrame
    """The part's pixels (a tile is a view of the frame, not a copy), under the part's stream."""
    detections: FrameDetections
    """The part's faces, in the part's coordinates, under the part's stream."""
    indices: IntArray
    """Which of the frame's faces these are (positions in the frame's detections)."""

    @classmethod
    def whole(cls, frame: VideoFrame, detections: FrameDetections) -> FramePart:
        """The whole frame as one part (a camera picture)."""
        return cls(frame, detections, np.arange(len(detections), dtype=np.int64))


@dataclass
class GalleryStats:
    """What the splitter saw over a whole video."""

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
        self._follower = LayoutFollower()
        self._keys: dict[Tile, str] = {}
        self._known: dict[str, list[str]] = {}
        self._faces: dict[str, FloatArray] = {}
        self._strangers: dict[Tile, int] = {}
        self._embeddings: FloatArray | None = None

    def split(self, frame: VideoFrame, detections: FrameDetections,
              embeddings: FloatArray | Callable[[], FloatArray] | None = None) -> list[FramePart]:
        """The frame's parts: the frame's own stream first (faces in no named tile), then one per named tile.

        ``embeddings`` are the recogniser's embeddings of the frame's faces, or a function that
        computes them, when the caller has a recogniser: they tell participants with one name
        apart, and notice another person in a named tile. The function is called only for a
        gallery frame, so a camera picture's faces are embedded only where tracking needs it.
        """
        self._embeddings = None
        if self.layout is VideoLayout.camera:
            return [FramePart.whole(frame, detections)]
        layout = self._follower.layout_of(frame.image, frame.timestamp)
        if self.layout is VideoLayout.auto and not layout.is_gallery:
            self._keys = {}
            return [FramePart.whole(frame, detections)]
        self._embeddings = embeddings() if callable(embeddings) else embeddings
        owners = tile_of(layout, detections.boxes)
        occupied = [layout.tiles[index] for index in sorted(set(owners.tolist()) - {-1})]
        names = self.namer.names(frame.image, layout, occupied, frame.timestamp) if occupied else {}
        read = {tile: self._canonical(named.name, frame.image, detections, owners, layout.tiles.index(tile))
                for tile, named in names.items()}
        keys = self._stream_keys(layout, read, frame.image, detections, owners)
        self._notice_new_people(layout, keys, frame.image, detections, owners)
        keep_in_frame = np.ones(len(detections), bool)
        parts: list[FramePart] = []
        for index, tile in enumerate(layout.tiles):
            key = keys.get(tile)
            if key is None:
                continue
            mine = owners == index
            keep_in_frame &= ~mine
            if not self.consent.allows(read[tile]):
                continue
            self.stats.names[key] += int(mine.sum())
            parts.append(FramePart(VideoFrame(key, frame.timestamp, tile.view(frame.image)),
                                   _shift(detections.select(mine), tile, key), np.flatnonzero(mine)))
        return [FramePart(frame, detections.select(keep_in_frame), np.flatnonzero(keep_in_frame)), *parts]

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
        for tile, old in same_tiles(layout.tiles, self._keys).items():
            previous = self._keys[old]
            if tile in names and _name_of_key(previous) == names[tile]:
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
                face = faces.get(tile)
                if face is None and self.embedder is not None:
                    # Remember every named participant's face once, for telling misreads from new people.
                    face = (self._embedding(image, detections, owners, layout.tiles.index(tile))
                            if keys[tile] not in self._faces else None)
                if face is not None:
                    self._faces[keys[tile]] = face
        self._keys = keys
        return keys

    def _canonical(self, name: str, image: ByteArray, detections: FrameDetections, owners: np.ndarray,
                   tile_index: int) -> str:
        """A name as first read: a new reading close to a name already seen is that name, misread.

        OCR may read a label a little differently after a tile moved ("Jürgen weit" for "Jürgen
        Weiß"); that must not make a new participant. The reading is taken for a name seen before
        when the two are alike (:data:`SAME_NAME_RATIO`) and, with a recogniser, the tile's face is
        not clearly another person than the one last seen under that name.
        """
        if name in self._known:
            return name
        similar = max(self._known, key=lambda known: difflib.SequenceMatcher(None, known, name).ratio(), default=None)
        if similar is None or difflib.SequenceMatcher(None, similar, name).ratio() < SAME_NAME_RATIO:
            return name
        if self.embedder is not None:
            face = self._embedding(image, detections, owners, tile_index)
            seen = self._faces.get(similar)
            if face is not None and seen is not None and float(face @ seen) <= self.embedder.scale.different:
                return name  # alike names, different people
        return similar

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

    def _notice_new_people(self, layout: GalleryLayout, keys: dict[Tile, str], image: ByteArray,
                           detections: FrameDetections, owners: np.ndarray) -> None:
        """Have a named tile's label read again once its face has been someone else's for a few frames.

        A meeting UI may give a leaver's place to another participant without moving a tile.
        Only with the frame's embeddings at hand (they are computed for tracking anyway).
        """
        if self.embedder is None or self._embeddings is None:
            return
        for tile, key in keys.items():
            seen = self._faces.get(key)
            face = self._embedding(image, detections, owners, layout.tiles.index(tile))
            if seen is None or face is None:
                continue
            if float(face @ seen) <= self.embedder.scale.different:
                self._strangers[tile] = self._strangers.get(tile, 0) + 1
                if self._strangers[tile] >= STRANGER_FRAMES:
                    self.namer.forget(tile)
                    self._strangers.pop(tile)
            else:
                self._strangers.pop(tile, None)

    def _embedding(self, image: ByteArray, detections: FrameDetections, owners: np.ndarray,
                   tile_index: int) -> FloatArray | None:
        """The recogniser's embedding of the largest face in a tile; None without one."""
        assert self.embedder is not None
        mine = np.flatnonzero(owners == tile_index)
        if not len(mine):
            return None
        boxes = detections.boxes[mine]
        largest = int(mine[int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))])
        embedding: FloatArray = (self._embeddings[largest] if self._embeddings is not None
                                 else self.embedder.embed(image, detections.keypoints[largest:largest + 1])[0])
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


def recording_name_source(stream: str) -> str | None:
    """How a recording's stream got its name: read off a tile's label, or none (the frame's own stream)."""
    return NAME_FROM_LABEL if is_tile_stream(stream) else None


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
