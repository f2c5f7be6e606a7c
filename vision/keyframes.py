"""Decode only what is sampled: which packets of a recording to decode for its sampling instants.

At 1 fps nearly every decoded frame of a 30 fps recording is thrown away. Meeting and
lecture recordings put a keyframe every 1–10 s, and a keyframe decodes on its own, so
a sampling instant can often be served by a keyframe, or by the few frames after the
keyframe before it, without decoding the rest.

:class:`SampleSelector` makes that decision from packet metadata alone (timestamps,
keyframe flags, decode order), so the same code decides while decoding
(:class:`vision.sources.RecordedFileSource`) and while estimating the cost of each mode
from a demux-only scan (:func:`plan_decoding`). Its rule, for sampling instant
``t = k / fps`` and tolerance ``τ``:

* the candidates are the frames with a timestamp in ``[t − τ, t + τ)`` that can be
  decoded from one keyframe on (a keyframe costs nothing more; any other frame costs
  every packet from its keyframe up to it, in decode order);
* the cheapest candidate wins, the one closest to ``t`` among equals.

The choice for an instant depends only on the file, never on what was decoded before,
so time segments decoded by different workers add up to exactly the frames of one run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from kernel.settings import DecodeMode

#: A frame may follow, in decode order, at most this many packets after a frame with a later
#: timestamp (H.264/HEVC reorder at most 16 frames). Once this many packets follow the first
#: packet at or after an instant's window, every frame of the window has been seen.
REORDER_DEPTH = 16

#: How much of the start of a file :func:`plan_decoding` reads (demux only) to measure keyframes.
SCAN_SECONDS = 120.0

#: ``auto`` seeks only when that decodes at most this share of the bytes. Sequential decoding
#: skips non-reference frames (small ones) and seeking pays a decoder drain per keyframe, so the
#: time saved is less than the bytes saved: measured (docs/benchmarks.md) a 53 % share took 50 %
#: of sequential decoding's time, an 89 % share 77 %.
SKIP_WORTHWHILE_SHARE = 0.75

P = TypeVar("P")


@dataclass(frozen=True)
class Take:
    """Instant ``instant`` is served by the frame whose timestamp is ``pts`` (stream time base)."""

    instant: int
    pts: int


@dataclass(frozen=True)
class Feed(Generic[P]):
    """Decode this packet (the next one of the current keyframe's group, in decode order)."""

    packet: P


@dataclass(frozen=True)
class Restart:
    """The current group is done: drain the decoder and reset it before the next keyframe."""


Step = Take | Feed[P] | Restart


@dataclass
class _Entry(Generic[P]):
    packet: P  # dropped once fed: the selector does not keep decoded packets alive
    pts: int
    seconds: float
    size: int


@dataclass
class SampleSelector(Generic[P]):
    """Decides, packet by packet, which packets to decode and which decoded frames are samples.

    Push every packet of the video stream in decode order (:meth:`push`), then call
    :meth:`finish`; both return the steps to carry out in order. Instants are
    ``first_instant, first_instant + 1, …`` up to ``end_instant`` (exclusive; None: the end
    of the video), at ``interval`` seconds; times are seconds from the stream's start.
    """

    interval: float
    """Seconds between sampling instants (1 / sample_fps)."""
    tolerance: float
    """How far a sample may lie from its instant (capped at half the interval)."""
    first_instant: int = 0
    """Index of the first instant to serve."""
    end_instant: int | None = None
    """Index of the first instant not to serve (None: to the end of the video)."""
    keyframes_only: bool = False
    """Serve instants from keyframes only; an instant without one in its window gets no frame."""
    bytes_fed: int = 0
    """Size of the packets handed to the decoder so far, in bytes."""
    instants_missed: int = 0
    """Instants within the video that no decodable frame could serve."""
    _group: list[_Entry[P]] = field(default_factory=list)
    _fed_in_group: int = 0
    _next: int = 0
    _first_after_window: int | None = None  # index in the group of the first packet at or after the window's end

    def __post_init__(self) -> None:
        self.tolerance = min(self.tolerance, self.interval / 2)
        self._next = self.first_instant

    @property
    def done(self) -> bool:
        """Whether every instant up to ``end_instant`` has been decided."""
        return self.end_instant is not None and self._next >= self.end_instant

    def _window(self, instant: int) -> tuple[float, float, float]:
        at = instant * self.interval
        return at - self.tolerance, at + self.tolerance, at

    def push(self, packet: P, pts: int, seconds: float, keyframe: bool, size: int = 0) -> list[Step[P]]:
        """One packet of the stream, in decode order; ``seconds`` is its timestamp on the class clock."""
        steps: list[Step[P]] = []
        if keyframe:
            taken_here = self._decide(next_keyframe=(pts, seconds), complete=True, steps=steps)
            if self._fed_in_group:
                steps.append(Restart())
            self._group = [_Entry(packet, pts, seconds, size)]
            self._fed_in_group = 0
            self._first_after_window = None
            if taken_here:
                self._feed_up_to(0, steps)
            self._note_window_end(0)
            return steps
        if not self._group or self.done:
            return steps  # before the first keyframe nothing decodes; after the last instant nothing is needed
        self._group.append(_Entry(packet, pts, seconds, size))
        self._note_window_end(len(self._group) - 1)
        self._decide(next_keyframe=None, complete=False, steps=steps)
        return steps

    def finish(self) -> list[Step[P]]:
        """The end of the stream: serve what the last group can, then drain the decoder."""
        steps: list[Step[P]] = []
        self._decide(next_keyframe=None, complete=True, steps=steps)
        if self._fed_in_group:
            steps.append(Restart())
        self._group = []
        self._fed_in_group = 0
        return steps

    def _note_window_end(self, index: int) -> None:
        if self._first_after_window is None and self._group[index].seconds >= self._window(self._next)[1]:
            self._first_after_window = index

    def _window_seen(self) -> bool:
        first = self._first_after_window
        return first is not None and len(self._group) - 1 - first >= REORDER_DEPTH

    def _decide(self, *, next_keyframe: tuple[int, float] | None, complete: bool, steps: list[Step[P]]) -> bool:
        """Decide the instants that can be decided now; True when the next keyframe serves one.

        ``next_keyframe`` (pts, seconds) is given when a keyframe has just arrived: the group
        before it is then complete.
        """
        next_keyframe_taken = False
        while not self.done:
            low, high, at = self._window(self._next)
            if next_keyframe is not None:
                if next_keyframe[1] < low:
                    return next_keyframe_taken  # the window lies in the next group
                best = self._cheapest(low, high)
                # The next keyframe is a candidate, as cheap as this group's own keyframe.
                if next_keyframe[1] < high and (best is None or best[0] > 0 or (
                        abs(next_keyframe[1] - at) < abs(self._group[best[0]].seconds - at))):
                    steps.append(Take(self._next, next_keyframe[0]))
                    next_keyframe_taken = True
                    self._advance()
                    continue
            elif complete:
                if not self._group or at > max(entry.seconds for entry in self._group):
                    self.end_instant = self._next  # the video ends before this instant, as sequential decoding sees it
                    return next_keyframe_taken
                best = self._cheapest(low, high)
            elif self._window_seen():
                best = self._cheapest(low, high)
            else:
                return next_keyframe_taken
            if best is not None:
                index, pts = best
                steps.append(Take(self._next, pts))
                self._feed_up_to(index, steps)
            else:
                self.instants_missed += 1
            self._advance()
        return next_keyframe_taken

    def _advance(self) -> None:
        self._next += 1
        self._first_after_window = None
        for index in range(len(self._group)):
            self._note_window_end(index)
            if self._first_after_window is not None:
                break

    def _cheapest(self, low: float, high: float) -> tuple[int, int] | None:
        """(index in the group, pts) of the first frame in decode order with a timestamp in ``[low, high)``.

        The first in decode order is the cheapest: it needs the fewest packets from the
        keyframe on. The cost never counts what an earlier instant happened to decode, so the
        choice does not depend on where decoding started.
        """
        if not self._group:
            return None
        keyframe_seconds = self._group[0].seconds
        for index, entry in enumerate(self._group[:1] if self.keyframes_only else self._group):
            # Frames shown before their keyframe (an open group's leading frames) need the previous group.
            if low <= entry.seconds < high and entry.seconds >= keyframe_seconds:
                return index, entry.pts
        return None

    def _feed_up_to(self, index: int, steps: list[Step[P]]) -> None:
        while self._fed_in_group <= index:
            entry = self._group[self._fed_in_group]
            steps.append(Feed(entry.packet))
            self.bytes_fed += entry.size
            entry.packet = cast(P, None)
            self._fed_in_group += 1


@dataclass(frozen=True)
class PacketInfo:
    """What a demux-only scan records of one packet."""

    pts: int
    """Timestamp in the stream's time base."""
    seconds: float
    """Timestamp in seconds from the stream's start."""
    keyframe: bool
    """Whether the packet holds a keyframe."""
    size: int
    """Compressed size in bytes (a proxy for its decoding cost)."""


@dataclass(frozen=True)
class DecodePlan:
    """How a recording will be decoded, and why."""

    mode: DecodeMode
    """The mode that runs: sequential, keyframes or seek (never auto)."""
    keyframe_spacing: float | None
    """Median seconds between keyframes in the scanned start of the file (None: fewer than two keyframes)."""
    largest_keyframe_gap: float | None
    """The longest gap between keyframes in the scan."""
    decoded_share: float
    """Share of the scanned bytes the mode decodes, estimated on the scan (1.0 for sequential)."""
    tolerance: float
    """Seconds a sample may lie from its instant."""
    reason: str
    """One line for the report: what was chosen and why."""


def simulate(packets: Iterable[PacketInfo], interval: float, tolerance: float, *,
             keyframes_only: bool) -> SampleSelector[None]:
    """Run the selector over scanned packets without decoding; its counters say what decoding would cost."""
    selector: SampleSelector[None] = SampleSelector(interval, tolerance, keyframes_only=keyframes_only)
    for packet in packets:
        selector.push(None, packet.pts, packet.seconds, packet.keyframe, packet.size)
    selector.finish()
    return selector


def plan_decoding(packets: list[PacketInfo], sample_fps: float, tolerance: float, requested: DecodeMode,
                  *, intra_only: bool = False) -> DecodePlan:
    """Choose how to decode from a demux-only scan of the file's start (see :data:`SCAN_SECONDS`).

    ``auto`` takes keyframes only when every scanned instant has a keyframe within the
    tolerance, seeking from keyframes when it decodes at most :data:`SKIP_WORTHWHILE_SHARE`
    of the bytes, and sequential decoding otherwise. A requested mode is honoured; the
    reason then says what it costs.
    """
    interval = 1.0 / sample_fps
    tolerance = min(tolerance, interval / 2)
    keyframes = [p.seconds for p in packets if p.keyframe]
    gaps = sorted(b - a for a, b in itertools.pairwise(keyframes))
    spacing = gaps[len(gaps) // 2] if gaps else None
    largest = gaps[-1] if gaps else None
    total = sum(p.size for p in packets) or 1
    spacing_text = (f"keyframes every {spacing:.1f} s (longest gap {largest:.1f} s)" if spacing is not None
                    else "fewer than two keyframes in the first "
                         f"{min(SCAN_SECONDS, packets[-1].seconds if packets else 0):.0f} s")

    def plan(mode: DecodeMode, share: float, why: str) -> DecodePlan:
        return DecodePlan(mode, spacing, largest, share, tolerance, why)

    if intra_only:
        return plan(DecodeMode.sequential, 1.0, "every frame is a keyframe: only sampled frames are decoded")
    if requested == DecodeMode.sequential:
        return plan(DecodeMode.sequential, 1.0, "decoding every frame (as configured)")
    if tolerance <= 0:
        return plan(DecodeMode.sequential, 1.0, f"{spacing_text}; decoding every frame (no sampling tolerance)")
    keyframes_run = simulate(packets, interval, tolerance, keyframes_only=True)
    seek_run = simulate(packets, interval, tolerance, keyframes_only=False)
    if requested == DecodeMode.keyframes:
        missed = keyframes_run.instants_missed
        missed_text = f", {missed} instants without a keyframe" if missed else ""
        return plan(DecodeMode.keyframes, keyframes_run.bytes_fed / total,
                    f"{spacing_text}; decoding keyframes only (as configured{missed_text})")
    seek_share = seek_run.bytes_fed / total
    if requested == DecodeMode.seek:
        return plan(DecodeMode.seek, seek_share, f"{spacing_text}; decoding from the keyframe before each sample "
                    f"(as configured, ~{seek_share:.0%} of the bytes)")
    if keyframes_run.instants_missed == 0 and seek_run.bytes_fed == keyframes_run.bytes_fed and spacing is not None:
        return plan(DecodeMode.keyframes, seek_share,
                    f"{spacing_text}; every sample is a keyframe within ±{tolerance:.2f} s")
    if spacing is not None and seek_share <= SKIP_WORTHWHILE_SHARE:
        return plan(DecodeMode.seek, seek_share, f"{spacing_text}; decoding from the keyframe before each sample "
                    f"(~{seek_share:.0%} of the bytes)")
    return plan(DecodeMode.sequential, 1.0, f"{spacing_text}: too sparse to skip frames at {sample_fps:g} fps; "
                f"decoding every frame")
