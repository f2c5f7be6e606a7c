"""Student tracking: a stable per-session id for every face across sampled frames.

Faces are matched to tracks by box overlap and motion (a constant-velocity
prediction), and, when a face-embedding model is configured, by appearance, so that a
student who looks away or is hidden for a while keeps the same id. Embeddings live in
memory for one session only: no face recognition across sessions.

A stream may change resolution mid-session: WebRTC senders scale their video down and up
again as their bandwidth estimate moves (Chromium does after a few seconds of loss). Track
boxes are then rescaled to the new frame size, so the same face at half the pixels is still
the same student.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from kernel.types import ByteArray, FloatArray, FrameDetections, as_float32, nearest_instant
from vision.recognition import ARCFACE_SCALE, Embedder

logger = logging.getLogger(__name__)

#: Minimum match score (0–1) for a face to continue a track.
MATCH_THRESHOLD = 0.3
#: Motion is extrapolated at most this long; beyond it a hidden face is expected where it was last seen.
MAX_PREDICTION_SECONDS = 2.0
#: Weight of appearance against geometry when both are known.
APPEARANCE_WEIGHT = 0.7

# Embedding only where needed. The recogniser is the largest cost per face (docs/benchmarks.md), and
# most faces simply stay where they were: a face whose position leaves no doubt, that looks as its
# track looked one sample before, and whose track was embedded recently enough takes its track's
# embedding instead of a new one. A cut to another person in the same place changes the look, so it
# is embedded (the scene-with-cuts test holds this).
#: Geometry score (0–1) that makes a face its track's continuation by position alone...
CLEAR_GEOMETRY = 0.7
#: ...when no other face or track comes within this score of the pair.
AMBIGUOUS_GEOMETRY = MATCH_THRESHOLD
#: Normalised correlation of the face's small grey picture with the track's last one that counts as the same look.
#: Measured (2026-12-05, 24×24 grey pictures of detector boxes): one person one second apart in
#: ``WolfgangLanger_Pexels.mp4`` (crying, hands over the face) 10th percentile 0.65, median 0.87;
#: other webcam clips ≥ 0.90; 44,000 pairs of different people among 300 photos of
#: ``facial_expressions_dev`` 99th percentile 0.60, 99.9th 0.71.
SAME_LOOK = 0.75
#: A track is embedded again at least this often while its face is visible.
EMBEDDING_REFRESH_SECONDS = 5.0
#: Side of the grey picture a face's look is compared on.
LOOK_SIDE = 24


def box_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """Pairwise IoU of boxes a [M,4] and b [N,4] (x1, y1, x2, y2) → [M,N]."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return as_float32(inter / np.maximum(union, 1e-6))


def face_looks(image: ByteArray, boxes: FloatArray) -> FloatArray:
    """Each face's small grey picture [N, LOOK_SIDE²], zero-mean and unit-length, for a normalised correlation."""
    height, width = image.shape[:2]
    looks = np.zeros((len(boxes), LOOK_SIDE * LOOK_SIDE), np.float32)
    for index, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        face = image[max(y1, 0):min(y2, height), max(x1, 0):min(x2, width)]
        if face.size == 0:
            continue
        # Every pixel of a close-up would cost more than the comparison is worth: take every
        # step-th pixel, keeping at least twice the picture's resolution for the area resize.
        step = max(1, min(face.shape[:2]) // (2 * LOOK_SIDE))
        face = face[::step, ::step]
        grey = cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (LOOK_SIDE, LOOK_SIDE),
                          interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        grey -= grey.mean()
        looks[index] = grey / max(float(np.linalg.norm(grey)), 1e-6)
    return looks


def geometry_scores(expected: FloatArray, boxes: FloatArray) -> FloatArray:
    """Score 0–1 of every (expected box [M,4], found box [N,4]) pair from overlap and distance → [M,N].

    The tracker compares a track's predicted box with a frame's faces; segment stitching
    compares a track's last box with another track's first box in the same way.
    """
    overlap = box_iou(expected, boxes)
    centre_e = (expected[:, :2] + expected[:, 2:]) / 2
    centre_b = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = np.maximum(expected[:, 2:] - expected[:, :2], 1.0).max(axis=1)
    distance = np.linalg.norm(centre_e[:, None, :] - centre_b[None, :, :], axis=2) / size[:, None]
    # A face within one and a half face sizes of where it was expected is plausibly the same face.
    nearness = np.clip(1.0 - distance / 1.5, 0.0, 1.0)
    return as_float32(0.5 * overlap + 0.5 * nearness)


@dataclass
class TrackSummary:
    """What the tracker knows about one track when the session ends."""

    track_id: int
    """The track's id, unique within the analysis."""
    stream: str
    """The stream it was seen in."""
    first_seen: float
    """Class time of the first sample with this face."""
    last_seen: float
    """Class time of the last sample with this face."""
    samples: int
    """Sampled frames in which the face was matched to this track."""
    score_total: float = 0.0
    """Sum of the detector's confidence over those samples."""

    @property
    def mean_score(self) -> float:
        """Mean detector confidence of the track's faces."""
        return self.score_total / self.samples if self.samples else 0.0

    def absorb(self, other: TrackSummary) -> None:
        """Take in another track of the same student: its span, samples and confidence."""
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.samples += other.samples
        self.score_total += other.score_total


@dataclass
class _Track:
    track_id: int
    box: FloatArray
    last_seen: float
    first_seen: float
    velocity: FloatArray = field(default_factory=lambda: np.zeros(2, np.float32))
    samples: int = 1
    embedding: FloatArray | None = None
    embedded_at: float | None = None  # class time of the last embedding computed for this track's face
    look: FloatArray | None = None  # the face's small grey picture when last seen (face_looks)

    def predicted_box(self, timestamp: float) -> FloatArray:
        elapsed = min(max(timestamp - self.last_seen, 0.0), MAX_PREDICTION_SECONDS)
        shift = self.velocity * elapsed
        return self.box + np.array([shift[0], shift[1], shift[0], shift[1]], np.float32)


class StudentTracker:
    """Assigns stable track ids to the faces of one or more streams of one session."""

    def __init__(self, *, max_gap_seconds: float, embedder: Embedder | None = None, first_id: int = 1) -> None:
        self.max_gap_seconds = max_gap_seconds
        self.embedder = embedder
        self._next_id = first_id
        self._live: dict[str, list[_Track]] = {}
        self._frame_sizes: dict[str, tuple[int, int]] = {}
        self._summaries: dict[int, TrackSummary] = {}

    def update(self, detections: FrameDetections, image: ByteArray | None = None,
               embeddings: FloatArray | None = None) -> FrameDetections:
        """Match a frame's faces to tracks; returns the detections with track ids set.

        ``embeddings`` are the faces' recogniser embeddings when the caller has them already
        (a gallery frame's faces are embedded together, then tracked tile by tile); otherwise
        they are computed from ``image``.
        """
        stream, now = detections.stream, detections.timestamp
        tracks = [t for t in self._live.get(stream, []) if now - t.last_seen <= self.max_gap_seconds]
        previous_size = self._frame_sizes.get(stream)
        if previous_size is not None and previous_size != detections.frame_size:
            rescale_tracks(tracks, previous_size, detections.frame_size)
        self._frame_sizes[stream] = detections.frame_size
        looks: FloatArray | None = None
        fresh = np.ones(len(detections), bool)  # whether each face's embedding was computed for this frame
        if embeddings is None and self.embedder is not None and image is not None and len(detections):
            looks = face_looks(image, detections.boxes)
            embeddings, fresh = self._embed_where_needed(tracks, detections, image, looks, now)
        ids = np.full(len(detections), -1, np.int64)
        if tracks and len(detections):
            scores = self._match_scores(tracks, detections, embeddings, now)
            rows, cols = linear_sum_assignment(-scores)
            for row, col in zip(rows, cols, strict=True):
                if scores[row, col] >= MATCH_THRESHOLD:
                    self._continue(tracks[row], detections, embeddings if fresh[col] else None, int(col), now)
                    if looks is not None:
                        tracks[row].look = looks[col]
                    ids[col] = tracks[row].track_id
        for index in np.flatnonzero(ids < 0):
            track = _Track(
                track_id=self._next_id,
                box=detections.boxes[index].copy(),
                last_seen=now,
                first_seen=now,
                embedding=None if embeddings is None else embeddings[index].copy(),
                embedded_at=None if embeddings is None or not fresh[index] else now,
                look=None if looks is None else looks[index],
            )
            self._next_id += 1
            tracks.append(track)
            ids[index] = track.track_id
            self._summaries[track.track_id] = TrackSummary(track.track_id, stream, now, now, 0)
        for track_id, score in zip(ids, detections.scores, strict=True):
            summary = self._summaries[int(track_id)]
            summary.last_seen = now
            summary.samples += 1
            summary.score_total += float(score)
        self._live[stream] = tracks
        return detections.with_track_ids(ids)

    def _embed_where_needed(self, tracks: list[_Track], detections: FrameDetections, image: ByteArray,
                            looks: FloatArray, now: float) -> tuple[FloatArray, np.ndarray]:
        """Every face's embedding: its track's where the track plainly continues, a new one elsewhere.

        Returns the embeddings and which of them were computed now.
        """
        assert self.embedder is not None
        reused: dict[int, _Track] = {}
        if tracks:
            geometry = geometry_scores(np.stack([t.predicted_box(now) for t in tracks]), detections.boxes)
            for face in range(len(detections)):
                row = int(np.argmax(geometry[:, face]))
                track = tracks[row]
                if (geometry[row, face] < CLEAR_GEOMETRY or track.embedding is None or track.look is None
                        or track.embedded_at is None or now - track.embedded_at >= EMBEDDING_REFRESH_SECONDS):
                    continue
                others = np.delete(geometry[:, face], row).max(initial=0.0), np.delete(geometry[row], face).max(
                    initial=0.0)
                if max(others) >= AMBIGUOUS_GEOMETRY or float(track.look @ looks[face]) < SAME_LOOK:
                    continue
                reused[face] = track
        needed = [face for face in range(len(detections)) if face not in reused]
        computed = self.embedder.embed(image, detections.keypoints[needed]) if needed else None
        width = computed.shape[1] if computed is not None else next(iter(reused.values())).embedding.shape[0]  # type: ignore[union-attr]
        embeddings = np.empty((len(detections), width), np.float32)
        if computed is not None:
            embeddings[needed] = computed
        for face, track in reused.items():
            assert track.embedding is not None
            embeddings[face] = track.embedding
        fresh = np.ones(len(detections), bool)
        fresh[list(reused)] = False
        return as_float32(embeddings), fresh

    def _match_scores(self, tracks: list[_Track], detections: FrameDetections,
                      embeddings: FloatArray | None, now: float) -> FloatArray:
        """Score 0–1 of every (track, face) pair from overlap, distance and appearance."""
        predicted = np.stack([t.predicted_box(now) for t in tracks])
        geometry = geometry_scores(predicted, detections.boxes)
        if embeddings is None:
            return geometry
        known = np.array([t.embedding is not None for t in tracks])
        if not known.any():
            return geometry
        stored = np.stack([t.embedding if t.embedding is not None else np.zeros(embeddings.shape[1], np.float32)
                           for t in tracks])
        cosine = stored @ embeddings.T
        scale = self.embedder.scale if self.embedder is not None else ARCFACE_SCALE
        appearance = scale.appearance(cosine)
        combined = APPEARANCE_WEIGHT * appearance + (1 - APPEARANCE_WEIGHT) * geometry
        # Appearance vetoes a geometric match with a clearly different person.
        combined = np.where(cosine <= scale.different, np.minimum(combined, 0.2), combined)
        return as_float32(np.where(known[:, None], combined, geometry))

    @staticmethod
    def _continue(track: _Track, detections: FrameDetections, embeddings: FloatArray | None,
                  index: int, now: float) -> None:
        box = detections.boxes[index]
        elapsed = now - track.last_seen
        if 0 < elapsed <= MAX_PREDICTION_SECONDS:
            old_centre = (track.box[:2] + track.box[2:]) / 2
            new_centre = (box[:2] + box[2:]) / 2
            # Smooth velocity: one noisy detection must not fling the prediction away.
            track.velocity = (0.5 * track.velocity + 0.5 * (new_centre - old_centre) / elapsed).astype(np.float32)
        else:
            track.velocity = np.zeros(2, np.float32)
        track.box = box.copy()
        track.last_seen = now
        track.samples += 1
        if embeddings is not None:
            new = embeddings[index]
            mixed = new if track.embedding is None else 0.8 * track.embedding + 0.2 * new
            track.embedding = (mixed / max(float(np.linalg.norm(mixed)), 1e-6)).astype(np.float32)
            track.embedded_at = now

    def summaries(self) -> list[TrackSummary]:
        """Every track seen so far, in order of creation."""
        return [self._summaries[k] for k in sorted(self._summaries)]


def rescale_tracks(tracks: list[_Track], old_size: tuple[int, int], new_size: tuple[int, int]) -> None:
    """Move tracks' boxes and velocities from frames of ``old_size`` to ``new_size`` (both ``(height, width)``)."""
    scale_y = new_size[0] / max(old_size[0], 1)
    scale_x = new_size[1] / max(old_size[1], 1)
    logger.debug("stream resized from %s to %s: rescaling %d tracks", old_size, new_size, len(tracks))
    box_scale = np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
    for track in tracks:
        track.box = (track.box * box_scale).astype(np.float32)
        track.velocity = (track.velocity * box_scale[:2]).astype(np.float32)


def alternating_tracks(appearances: Iterable[tuple[int, float]]) -> dict[int, int]:
    """Tracks that took turns for one face: each joined track's id → the earliest id of its group.

    ``appearances`` are (track id, class time) of the faces of one stream. When a face looks
    different for a while (a hand over it, tears, a turned head), the recogniser may take it
    for someone else: the tracker then keeps a second track, and the two take turns for the
    same face, sample by sample. Tracks are joined when they never appear in the same frame
    and the earlier one appears again after the later one began: they alternate, where one
    person following another does not. Each track, in order of first appearance, joins the
    earliest such group none of whose tracks shares a frame with it. Meant for one
    participant's own camera; across the cuts of a recorded scene, different people take
    turns too.
    """
    times: dict[int, set[float]] = {}
    for track_id, timestamp in appearances:
        times.setdefault(int(track_id), set()).add(round(float(timestamp), 3))
    groups: list[list[int]] = []
    joined: dict[int, int] = {}
    for track_id in sorted(times, key=lambda key: (min(times[key]), key)):
        began = min(times[track_id])
        for group in groups:
            shares_a_frame = any(times[track_id] & times[member] for member in group)
            if not shares_a_frame and max(max(times[member]) for member in group) > began:
                group.append(track_id)
                joined[track_id] = group[0]
                break
        else:
            groups.append([track_id])
    return joined


def is_student(summary: TrackSummary, *, min_seconds: float, sample_interval: float, min_score: float = 0.0) -> bool:
    """Whether a track was seen long enough, and clearly enough, to count as a student.

    Each sample stands for one sampling interval of class time; a track needs at least
    two samples, ``min_seconds`` of covered time and a mean detector confidence of
    ``min_score`` (face-like objects in the background flicker at low confidence).
    """
    # Counted in sampling instants: a sample taken from a keyframe may lie up to half an
    # interval from its instant (vision.keyframes), which must not shorten the covered time.
    if sample_interval > 0:
        first, last = (nearest_instant(t, sample_interval) for t in (summary.first_seen, summary.last_seen))
        covered = (last - first + 1) * sample_interval
    else:
        covered = summary.last_seen - summary.first_seen
    return summary.samples >= 2 and covered >= min_seconds and summary.mean_score >= min_score
