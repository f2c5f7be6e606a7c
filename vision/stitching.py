"""Stitching student ids across the boundaries of independently tracked segments.

Each segment's tracker starts fresh, so a student present across a boundary has one
track on each side. At every boundary, tracks of the earlier segment are matched with
tracks of the later one the way :class:`~vision.tracking.StudentTracker` matches a live
track with a new face: only within ``track_max_gap_seconds`` of the track's last
sample, by the same overlap-and-distance score (its last box against the other's first
box), one-to-one (Hungarian), earliest appearances first. A student hidden across a
boundary is matched as long as the gap stays within the max gap, even when a whole
(short) segment lies between. Matches are joined with a union-find over all
boundaries, and every track takes the id of the earliest track of its chain, so
segment 0 keeps the ids an unsegmented run gives.

Limits: no motion prediction and no appearance (embeddings never leave a worker), so
two students who swap places while hidden across a boundary may swap ids, as they may
with the tracker itself when no recogniser is configured; with a recogniser, a student
hidden for longer than the gap but re-identified by the tracker within a segment is
not re-identified across a boundary.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.optimize import linear_sum_assignment

from kernel.types import FloatArray
from vision.tracking import MATCH_THRESHOLD, TrackSummary, geometry_scores

#: Tolerance on the gap between two samples (timestamps are rounded to milliseconds).
_GAP_TOLERANCE_SECONDS = 1e-3


class SegmentTrackLike(Protocol):
    """What stitching reads of a :class:`~kernel.store.SegmentTrack` row."""

    segment_index: int
    stream: str
    track_id: int
    first_seen: float
    last_seen: float
    samples: int
    score_total: float
    first_x1: float
    first_y1: float
    first_x2: float
    first_y2: float
    last_x1: float
    last_y1: float
    last_x2: float
    last_y2: float


@dataclass(frozen=True)
class StitchedTracks:
    """Tracks of all segments joined into the tracks of the whole recording."""

    canonical: dict[int, int]
    """Every segment track id → the id of its stitched track (the earliest id of its chain)."""
    summaries: list[TrackSummary]
    """One summary per stitched track, in id order."""

    @property
    def renamed(self) -> dict[int, int]:
        """The segment track ids that change, → their new id."""
        return {old: new for old, new in self.canonical.items() if old != new}


class _UnionFind:
    def __init__(self, ids: Sequence[int]) -> None:
        self.parent = {i: i for i in ids}

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        first, second = self.find(a), self.find(b)
        # The smaller id is the earlier segment's: it becomes the id of the whole chain.
        if first != second:
            low, high = sorted((first, second))
            self.parent[high] = low


def _last_boxes(tracks: Sequence[SegmentTrackLike]) -> FloatArray:
    return np.array([[t.last_x1, t.last_y1, t.last_x2, t.last_y2] for t in tracks], np.float32)


def _first_boxes(tracks: Sequence[SegmentTrackLike]) -> FloatArray:
    return np.array([[t.first_x1, t.first_y1, t.first_x2, t.first_y2] for t in tracks], np.float32)


def continuations(open_tracks: Sequence[SegmentTrackLike], later: Sequence[SegmentTrackLike], *,
                  max_gap_seconds: float) -> list[tuple[int, int]]:
    """Pairs (earlier track id, later track id) where a track of a later segment continues an earlier one.

    ``open_tracks`` are earlier segments' tracks not yet continued. The later segment's
    tracks are taken in order of first appearance, as the tracker meets new faces frame
    by frame; each group is matched with the still open tracks seen within
    ``max_gap_seconds`` before it.
    """
    matches: list[tuple[int, int]] = []
    still_open = list(open_tracks)
    by_start: dict[tuple[str, float], list[SegmentTrackLike]] = defaultdict(list)
    for track in later:
        by_start[(track.stream, track.first_seen)].append(track)
    for (stream, first_seen), arrivals in sorted(by_start.items(), key=lambda item: (item[0][1], item[0][0])):
        candidates = [t for t in still_open if t.stream == stream
                      and 0 < first_seen - t.last_seen <= max_gap_seconds + _GAP_TOLERANCE_SECONDS]
        if not candidates:
            continue
        scores = geometry_scores(_last_boxes(candidates), _first_boxes(arrivals))
        rows, cols = linear_sum_assignment(-scores)
        for row, column in zip(rows, cols, strict=True):
            if scores[row, column] >= MATCH_THRESHOLD:
                matches.append((candidates[row].track_id, arrivals[column].track_id))
                still_open.remove(candidates[row])
    return matches


def stitch_segment_tracks(tracks: Sequence[SegmentTrackLike], *, max_gap_seconds: float) -> StitchedTracks:
    """Join the tracks of consecutive segments that belong to the same student; see the module doc."""
    ids = [t.track_id for t in tracks]
    if len(set(ids)) != len(ids):
        raise ValueError("segment tracks: the same track id appears twice")
    by_segment: dict[int, list[SegmentTrackLike]] = defaultdict(list)
    for track in tracks:
        by_segment[track.segment_index].append(track)
    groups = _UnionFind(ids)
    # Tracks of earlier segments that no later track continues yet. Within a segment its
    # own tracker already joined what it could, so only later segments look back here.
    open_tracks: dict[int, SegmentTrackLike] = {}
    for index in sorted(by_segment):
        later = by_segment[index]
        for earlier_id, later_id in continuations(list(open_tracks.values()), later,
                                                  max_gap_seconds=max_gap_seconds):
            groups.union(earlier_id, later_id)
            del open_tracks[earlier_id]
        open_tracks.update({t.track_id: t for t in later})
    canonical = {track_id: groups.find(track_id) for track_id in ids}
    merged: dict[int, TrackSummary] = {}
    for track in sorted(tracks, key=lambda t: t.first_seen):
        root = canonical[track.track_id]
        summary = merged.get(root)
        if summary is None:
            merged[root] = TrackSummary(root, track.stream, track.first_seen, track.last_seen, track.samples,
                                        track.score_total)
        else:
            summary.absorb(TrackSummary(root, track.stream, track.first_seen, track.last_seen, track.samples,
                                        track.score_total))
    return StitchedTracks(canonical, [merged[root] for root in sorted(merged)])
