"""Server-side SVG charts, as strings: no JavaScript, no external assets.

Each chart is an ``<svg role="img">`` with a ``<title>`` and a ``<desc>`` that says in
words what the chart shows (the alt text), referenced by ``aria-labelledby``. Every
piece of text goes through :func:`markupsafe.escape`, because student labels can be
meeting display names typed by anyone. Coordinates are printed with fixed decimals,
so the same data always gives the same bytes.

Colours: the Okabe–Ito palette for lines and marks, and viridis stops for the heatmap;
both stay distinguishable under the common colour-vision deficiencies and in greyscale
print. Grey always means "not visible".

Long classes are drawn from bins (at most a few hundred points per line, 120 heatmap
columns), so a two-hour class does not produce megabytes of SVG; the bin width is
said in the chart description.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from kernel.types import ENGAGEMENT_LEVELS
from reports.aggregate import ClassOverview, StudentSummary, StudentTimeline, StudentTrend
from reports.formatting import (
    format_score,
    format_share,
    format_timestamp,
    score_level_name,
)

#: Line colour of engagement (Okabe–Ito blue).
ENGAGEMENT_COLOUR = "#0072b2"
#: Shading of class disengagement intervals (Okabe–Ito orange).
DIP_COLOUR = "#e69f00"
#: Opacity of a disengagement span's shade over the class curve: faint, so the band shows through.
DIP_SHADE_OPACITY = 0.12
#: Height (px) of the solid strip that marks a disengagement span along the top of the class curve.
DIP_STRIP_HEIGHT = 7
#: Colour of the share-visible line.
VISIBLE_COLOUR = "#555555"
#: Fill of not-visible time and heatmap cells.
NOT_VISIBLE_COLOUR = "#d4d4d4"
#: Fill of time a meeting participant was not in the room: paler than "not visible", since
#: absence says nothing about the student's attention.
ABSENT_COLOUR = "#f3f3f3"
#: Bars of the bar charts (Okabe–Ito bluish green).
BAR_COLOUR = "#009e73"
#: Bars of the attention cue chart (Okabe–Ito sky blue).
CUE_COLOUR = "#56b4e9"
#: Markers of a student's lowest moments (Okabe–Ito vermilion).
LOW_COLOUR = "#d55e00"
#: Viridis colour stops from 0 (very low engagement) to 1 (very high).
VIRIDIS_STOPS: tuple[str, ...] = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")

_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
_MAX_SCORE = float(len(ENGAGEMENT_LEVELS) - 1)
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 14400)


def _n(value: float) -> str:
    """A coordinate with one decimal and no negative zero (deterministic output)."""
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def _e(text: object) -> str:
    """Escape text for SVG content and attribute values."""
    return str(escape(str(text)))


def _safe_id(chart_id: str) -> str:
    """An XML id from a caller's chart id: letters, digits, hyphens."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", chart_id).strip("-")
    return cleaned if cleaned and cleaned[0].isalpha() else f"chart-{cleaned or 'x'}"


def viridis(value: float) -> str:
    """The viridis-like colour of a value 0–1 (clipped), as ``#rrggbb``."""
    v = min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0
    position = v * (len(VIRIDIS_STOPS) - 1)
    i = min(int(position), len(VIRIDIS_STOPS) - 2)
    frac = position - i
    a, b = VIRIDIS_STOPS[i], VIRIDIS_STOPS[i + 1]
    channels = []
    for k in (1, 3, 5):
        lo, hi = int(a[k : k + 2], 16), int(b[k : k + 2], 16)
        channels.append(round(lo + (hi - lo) * frac))
    return "#" + "".join(f"{c:02x}" for c in channels)


def _el(tag: str, children: str | None = None, /, **attrs: str | float) -> str:
    """One SVG element.

    Keyword names become attribute names with ``_`` read as ``-`` (``stroke_width``)
    and a trailing ``_`` dropped (``class_``); floats are printed with one decimal;
    every value is escaped. ``children`` is markup that is already safe.
    """
    rendered = "".join(
        f' {name.rstrip("_").replace("_", "-")}="{_e(_n(v) if isinstance(v, float) else v)}"'
        for name, v in attrs.items()
    )
    if children is None:
        return f"<{tag}{rendered}/>"
    return f"<{tag}{rendered}>{children}</{tag}>"


def _text(x: float, y: float, content: str, **attrs: str | float) -> str:
    """A text element whose content is escaped."""
    return _el("text", _e(content), x=x, y=y, **attrs)


def _tooltip(text: str) -> str:
    """A ``<title>`` child: the tooltip of the element that holds it."""
    return _el("title", _e(text))


def _open(chart_id: str, width: int, height: int, title: str, description: str) -> list[str]:
    """The opening of an accessible chart: root element, title and description."""
    cid = _safe_id(chart_id)
    root = _el(
        "svg",
        "",
        xmlns="http://www.w3.org/2000/svg",
        class_="chart",
        viewBox=f"0 0 {width} {height}",
        width=str(width),
        height=str(height),
        role="img",
        aria_labelledby=f"{cid}-title {cid}-desc",
        font_family=_FONT,
        font_size="12",
    )
    return [
        root.removesuffix("</svg>"),
        _el("title", _e(title), id=f"{cid}-title"),
        _el("desc", _e(description), id=f"{cid}-desc"),
    ]


@dataclass(frozen=True, slots=True)
class _Plot:
    """Maps class time and engagement scores to pixel coordinates of a plot area."""

    left: float
    top: float
    width: float
    height: float
    end_seconds: float

    def x(self, seconds: float) -> float:
        """Pixel x of a class time."""
        return self.left + self.width * min(1.0, max(0.0, seconds / self.end_seconds))

    def y(self, score: float) -> float:
        """Pixel y of an engagement score 0–3."""
        return self.top + self.height * (1.0 - min(1.0, max(0.0, score / _MAX_SCORE)))

    def y_share(self, share: float) -> float:
        """Pixel y of a share 0–1 (right axis)."""
        return self.top + self.height * (1.0 - min(1.0, max(0.0, share)))

    @property
    def bottom(self) -> float:
        """Pixel y of the plot's bottom edge."""
        return self.top + self.height

    @property
    def right(self) -> float:
        """Pixel x of the plot's right edge."""
        return self.left + self.width


def _tick_step(end_seconds: float, max_ticks: int = 8) -> int:
    """The smallest round tick step that gives at most ``max_ticks`` time ticks."""
    for step in _TICK_STEPS:
        if end_seconds / step <= max_ticks:
            return step
    return _TICK_STEPS[-1]


def _time_axis(plot: _Plot, parts: list[str]) -> None:
    """Time ticks and labels (m:ss) under a plot."""
    step = _tick_step(plot.end_seconds)
    parts.append(
        _el("line", x1=plot.left, y1=plot.bottom, x2=plot.right, y2=plot.bottom, stroke="#333")
    )
    t = 0
    while t <= plot.end_seconds + 1e-6:
        x = plot.x(t)
        parts.append(_el("line", x1=x, y1=plot.bottom, x2=x, y2=plot.bottom + 4, stroke="#333"))
        # A label centred on the last tick would run past the chart's right edge.
        anchor = "end" if plot.right - x < 24 else "middle"
        parts.append(
            _text(x, plot.bottom + 17, format_timestamp(t), text_anchor=anchor, fill="#333")
        )
        t += step
    parts.append(
        _text(
            plot.right,
            plot.bottom + 32,
            "class time (m:ss)",
            text_anchor="end",
            fill="#555",
            font_size="11",
        )
    )


def _level_axis(plot: _Plot, parts: list[str]) -> None:
    """Horizontal grid lines at the four levels, labelled with the level names."""
    for level, name in enumerate(ENGAGEMENT_LEVELS):
        y = plot.y(level)
        parts.append(_el("line", x1=plot.left, y1=y, x2=plot.right, y2=y, stroke="#e3e3e3"))
        parts.append(
            _text(plot.left - 8, y + 4, f"{name} ({level})", text_anchor="end", fill="#333")
        )


@dataclass(frozen=True, slots=True)
class _Bin:
    """Consecutive grid moments drawn as one point."""

    start: float
    end: float
    value: float | None
    low: float | None
    high: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the known values, or None."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _bins(
    timestamps: Sequence[float],
    values: Sequence[float | None],
    period: float,
    max_bins: int,
    lows: Sequence[float | None] | None = None,
    highs: Sequence[float | None] | None = None,
) -> tuple[list[_Bin], int]:
    """Group consecutive moments into at most ``max_bins`` bins of equal sample count.

    Returns the bins and how many samples each holds. A bin's value is the mean of its
    known values; a bin with none is None (drawn as a gap).
    """
    n = len(timestamps)
    size = max(1, math.ceil(n / max_bins)) if n else 1
    bins = []
    for first in range(0, n, size):
        last = min(n, first + size) - 1
        end = timestamps[last + 1] if last + 1 < n else timestamps[last] + period
        bins.append(
            _Bin(
                start=timestamps[first],
                end=min(end, timestamps[last] + period),
                value=_mean(values[first : last + 1]),
                low=_mean(lows[first : last + 1]) if lows is not None else None,
                high=_mean(highs[first : last + 1]) if highs is not None else None,
            )
        )
    return bins, size


def _segments(bins: Sequence[_Bin]) -> list[list[_Bin]]:
    """Runs of bins with a value; a bin without one, or a jump in time, breaks the run."""
    runs: list[list[_Bin]] = []
    current: list[_Bin] = []
    for b in bins:
        jump = bool(current) and b.start - current[-1].end > 1e-6 + 0.5 * (b.end - b.start)
        if b.value is None or jump:
            if current:
                runs.append(current)
            current = []
        if b.value is not None:
            current.append(b)
    if current:
        runs.append(current)
    return runs


def _in_room_bins(
    timestamps: Sequence[float], in_room: Sequence[bool], period: float, max_bins: int
) -> list[bool]:
    """Per bin of :func:`_bins` with the same arguments: whether the student was in the room at all."""
    bins, _ = _bins(timestamps, [1.0 if present else None for present in in_room], period, max_bins)
    return [b.value is not None for b in bins]


def _points(pairs: Sequence[tuple[float, float]]) -> str:
    """An SVG ``points`` list."""
    return " ".join(f"{_n(x)},{_n(y)}" for x, y in pairs)


def _line_and_band(plot: _Plot, bins: Sequence[_Bin], parts: list[str], colour: str) -> None:
    """Draw a confidence band (where known) and a line through the bin centres."""
    for run in _segments(bins):
        centres = [plot.x(0.5 * (b.start + b.end)) for b in run]
        banded = [
            (x, plot.y(b.low), plot.y(b.high))
            for x, b in zip(centres, run, strict=True)
            if b.low is not None and b.high is not None
        ]
        if len(banded) == 1:
            # A single point has no area: draw its band as a short vertical bar.
            x, low, high = banded[0]
            parts.append(
                _el(
                    "line",
                    x1=x,
                    y1=high,
                    x2=x,
                    y2=low,
                    stroke=colour,
                    stroke_opacity="0.3",
                    stroke_width="4",
                )
            )
        elif banded:
            outline = [(x, high) for x, _, high in banded] + [
                (x, low) for x, low, _ in banded[::-1]
            ]
            parts.append(_el("polygon", points=_points(outline), fill=colour, fill_opacity="0.18"))
        line = [(x, plot.y(b.value or 0.0)) for x, b in zip(centres, run, strict=True)]
        if len(line) == 1:
            parts.append(_el("circle", cx=line[0][0], cy=line[0][1], r="2.5", fill=colour))
        else:
            parts.append(
                _el(
                    "polyline",
                    points=_points(line),
                    fill="none",
                    stroke=colour,
                    stroke_width="2",
                    stroke_linejoin="round",
                )
            )


def _legend(parts: list[str], x: float, y: float, items: Sequence[tuple[str, str]]) -> None:
    """A one-line legend of (swatch, label) items.

    A swatch is ``line:#colour``, ``dash:#colour`` or ``rect:#colour@opacity``.
    """
    cursor = x
    for swatch, label in items:
        kind, _, spec = swatch.partition(":")
        colour, _, opacity = spec.partition("@")
        if kind in ("line", "dash"):
            dash = {"stroke_dasharray": "4 3"} if kind == "dash" else {}
            parts.append(
                _el(
                    "line",
                    x1=cursor,
                    y1=y - 4,
                    x2=cursor + 18,
                    y2=y - 4,
                    stroke=colour,
                    stroke_width="2",
                    **dash,
                )
            )
        else:
            parts.append(
                _el(
                    "rect",
                    x=cursor,
                    y=y - 10,
                    width="18",
                    height="10",
                    fill=colour,
                    fill_opacity=opacity or "1",
                )
            )
        parts.append(_text(cursor + 23, y, label, fill="#333"))
        # Approximate text width: good enough for a legend, and deterministic.
        cursor += 23 + 6.6 * len(label) + 18


def _plot_background(plot: _Plot) -> str:
    """The white plot area."""
    return _el("rect", x=plot.left, y=plot.top, width=plot.width, height=plot.height, fill="#fff")


def student_engagement_svg(
    timeline: StudentTimeline,
    summary: StudentSummary,
    *,
    end_seconds: float,
    sample_period: float,
    chart_id: str = "engagement",
    width: int = 880,
    height: int = 280,
    max_points: int = 400,
) -> Markup:
    """One student's engagement over class time, with the model's uncertainty as a band.

    The line is the expected level (0–3); the band is ±1 standard deviation of the
    level under the model's probabilities; grey columns mark time in the room when the
    face was not visible, pale ones time out of the room; numbered circles mark the
    lowest moments.
    """
    samples = timeline.samples
    lows: list[float | None] = []
    highs: list[float | None] = []
    for s in samples:
        if s.engagement_score is None or s.score_sd is None:
            lows.append(None)
            highs.append(None)
        else:
            lows.append(max(0.0, s.engagement_score - s.score_sd))
            highs.append(min(_MAX_SCORE, s.engagement_score + s.score_sd))
    bins, per_bin = _bins(
        [s.timestamp for s in samples],
        [s.engagement_score if s.visible else None for s in samples],
        sample_period,
        max_points,
        lows,
        highs,
    )
    label = timeline.label
    moments = ", ".join(
        f"{m.time_label} ({format_score(m.engagement_score)})" for m in summary.lowest_moments
    )
    interval = ""
    if summary.engagement_low is not None:
        interval = (
            f" (95% interval {format_score(summary.engagement_low)}"
            f"–{format_score(summary.engagement_high)})"
        )
    description = (
        f"Engagement of {label} over class time on a scale from very low (0) to very high (3). "
        f"Mean {format_score(summary.mean_engagement)}{interval}. "
        f"Visible {format_share(summary.visible_share)} of the sampled time."
        + (f" Lowest moments: {moments}." if moments else "")
        + (f" Each point averages {per_bin} samples." if per_bin > 1 else "")
    )
    parts = _open(chart_id, width, height, f"Engagement over time: {label}", description)
    plot = _Plot(left=110, top=34, width=width - 130, height=height - 80, end_seconds=end_seconds)
    parts.append(_plot_background(plot))
    in_room = _in_room_bins(
        [s.timestamp for s in samples], [s.in_room for s in samples], sample_period, max_points
    )
    for b, present in zip(bins, in_room, strict=True):
        if b.value is None:
            x0, x1 = plot.x(b.start), plot.x(b.end)
            parts.append(
                _el(
                    "rect",
                    x=x0,
                    y=plot.top,
                    width=max(0.0, x1 - x0),
                    height=plot.height,
                    fill=NOT_VISIBLE_COLOUR if present else ABSENT_COLOUR,
                    fill_opacity="0.6" if present else "1",
                )
            )
    _level_axis(plot, parts)
    if summary.mean_engagement is not None:
        y = plot.y(summary.mean_engagement)
        parts.append(
            _el(
                "line",
                x1=plot.left,
                y1=y,
                x2=plot.right,
                y2=y,
                stroke=ENGAGEMENT_COLOUR,
                stroke_dasharray="2 4",
            )
        )
    _line_and_band(plot, bins, parts, ENGAGEMENT_COLOUR)
    for rank, moment in enumerate(summary.lowest_moments, start=1):
        cx = plot.x(moment.timestamp + 0.5 * sample_period)
        cy = plot.y(moment.engagement_score)
        marker = _el(
            "circle", cx=cx, cy=cy, r="7", fill="#fff", stroke=LOW_COLOUR, stroke_width="2"
        )
        number = _text(
            cx,
            cy + 4,
            str(rank),
            text_anchor="middle",
            font_size="10",
            font_weight="bold",
            fill=LOW_COLOUR,
        )
        parts.append(
            _el("g", marker + number + _tooltip(f"Lowest moment {rank}: {moment.time_label}"))
        )
    _time_axis(plot, parts)
    _legend(
        parts,
        plot.left,
        18,
        [
            (f"line:{ENGAGEMENT_COLOUR}", "engagement (expected level)"),
            (f"rect:{ENGAGEMENT_COLOUR}@0.18", "model uncertainty (±1 sd)"),
            (f"rect:{NOT_VISIBLE_COLOUR}@0.6", "not visible"),
            *([(f"rect:{ABSENT_COLOUR}@1", "not in the room")] if not all(in_room) else []),
        ],
    )
    parts.append("</svg>")
    return Markup("\n".join(parts))


def class_curve_svg(
    overview: ClassOverview,
    *,
    chart_id: str = "class-curve",
    width: int = 880,
    height: int = 300,
    max_points: int = 400,
) -> Markup:
    """The class mean engagement over time; disengagement shaded; share visible dashed.

    The band is the 95 % interval of the class mean over the students visible at each
    moment; the dashed line is the share of students visible (right axis, 0–100 %).
    """
    points = overview.points
    times = [p.timestamp for p in points]
    bins, per_bin = _bins(
        times,
        [p.mean_engagement for p in points],
        overview.sample_period,
        max_points,
        [p.band_low for p in points],
        [p.band_high for p in points],
    )
    visible_bins, _ = _bins(
        times, [p.share_visible for p in points], overview.sample_period, max_points
    )
    intervals = overview.disengagement_intervals
    if intervals:
        dips = "; ".join(
            f"{iv.label} (up to {format_share(iv.peak_share)} of visible students)"
            for iv in intervals
        )
        dip_text = f"{len(intervals)} disengagement moment(s), shaded: {dips}."
    else:
        dip_text = "No moment where at least 40% of the visible students were at a low level."
    description = (
        "Mean engagement of the class over time on a scale from very low (0) to very high (3); "
        f"overall {format_score(overview.mean_engagement)} "
        f"({score_level_name(overview.mean_engagement)}). {dip_text} "
        f"On average {format_share(overview.mean_share_visible)} of the students were visible."
        + (f" Each point averages {per_bin} samples." if per_bin > 1 else "")
    )
    parts = _open(chart_id, width, height, "Class engagement over time", description)
    plot = _Plot(
        left=110, top=34, width=width - 170, height=height - 80, end_seconds=overview.end_seconds
    )
    parts.append(_plot_background(plot))
    for iv in intervals:
        x0, x1 = plot.x(iv.start), plot.x(iv.end)
        # A faint shade keeps the mean and its band readable through the span; a solid strip along
        # the top of the plot marks where it is at a glance.
        parts.append(_el("rect", x=x0, y=plot.top, width=max(1.0, x1 - x0), height=plot.height,
                         fill=DIP_COLOUR, fill_opacity=str(DIP_SHADE_OPACITY)))
        parts.append(_el("rect", _tooltip(f"Disengaged: {iv.label}"), x=x0, y=plot.top,
                         width=max(1.0, x1 - x0), height=DIP_STRIP_HEIGHT, fill=DIP_COLOUR))
    _level_axis(plot, parts)
    for share in (0.0, 0.5, 1.0):
        y = plot.y_share(share) + 4
        parts.append(_text(plot.right + 8, y, format_share(share), fill=VISIBLE_COLOUR))
    parts.append(
        _text(plot.right + 8, plot.top - 16, "visible", fill=VISIBLE_COLOUR, font_size="11")
    )
    for run in _segments(visible_bins):
        line = [(plot.x(0.5 * (b.start + b.end)), plot.y_share(b.value or 0.0)) for b in run]
        parts.append(
            _el(
                "polyline",
                points=_points(line),
                fill="none",
                stroke=VISIBLE_COLOUR,
                stroke_width="1.5",
                stroke_dasharray="4 3",
            )
        )
    _line_and_band(plot, bins, parts, ENGAGEMENT_COLOUR)
    _time_axis(plot, parts)
    _legend(
        parts,
        plot.left,
        18,
        [
            (f"line:{ENGAGEMENT_COLOUR}", "class mean"),
            (f"rect:{ENGAGEMENT_COLOUR}@0.18", "95% interval"),
            (f"rect:{DIP_COLOUR}@1", "disengagement"),
            (f"dash:{VISIBLE_COLOUR}", "share of students visible"),
        ],
    )
    parts.append("</svg>")
    return Markup("\n".join(parts))


def heatmap_svg(
    overview: ClassOverview,
    *,
    chart_id: str = "heatmap",
    width: int = 880,
    row_height: int = 20,
    max_columns: int = 120,
) -> Markup:
    """Students × time heatmap of engagement: viridis very low → very high, grey = not visible.

    A strip above the rows marks the class disengagement intervals, so a reader can see
    which students made up a dip.
    """
    rows = overview.heatmap
    times = overview.timestamps
    label_width = 180
    grid_top = 28  # room for the class-dip strip above the first row
    plot = _Plot(
        left=label_width,
        top=grid_top,
        width=width - label_width - 20,
        height=max(1, len(rows)) * row_height,
        end_seconds=overview.end_seconds,
    )
    height = int(plot.bottom + 90)
    per_bin = max(1, math.ceil(len(times) / max_columns)) if times else 1
    if overview.disengagement_intervals:
        dips = ", ".join(iv.label for iv in overview.disengagement_intervals)
        dip_text = f"Orange marks above the rows show class disengagement moments: {dips}."
    else:
        dip_text = "There were no class disengagement moments."
    description = (
        f"Heatmap of engagement for {len(rows)} students (rows) over class time (columns), "
        "dark purple for very low (0) through green to yellow for very high (3); "
        "grey where the student's face was not visible, and pale where they were not in the room. "
        + (
            f"Each column covers about {per_bin * overview.sample_period:g} seconds. "
            if per_bin > 1
            else ""
        )
        + dip_text
    )
    parts = _open(chart_id, width, height, "Engagement of each student over time", description)
    parts.append(
        _text(
            label_width - 8,
            grid_top - 4,
            "class dip",
            text_anchor="end",
            fill="#555",
            font_size="11",
        )
    )
    for iv in overview.disengagement_intervals:
        x0, x1 = plot.x(iv.start), plot.x(iv.end)
        parts.append(
            _el(
                "rect",
                _tooltip(f"Disengaged: {iv.label}"),
                x=x0,
                y=grid_top - 12,
                width=max(1.0, x1 - x0),
                height="8",
                fill=DIP_COLOUR,
            )
        )
    for r, row in enumerate(rows):
        y = grid_top + r * row_height
        label = row.student.label
        shown = label if len(label) <= 24 else label[:23] + "…"
        cells = [
            _tooltip(label),
            _text(label_width - 8, y + row_height / 2 + 4, shown, text_anchor="end", fill="#222"),
        ]
        bins, _ = _bins(times, list(row.values), overview.sample_period, max_columns)
        in_room = _in_room_bins(times, row.in_room, overview.sample_period, max_columns)
        # Neighbouring columns of one colour become one rectangle: far fewer elements.
        runs: list[tuple[str, float, float]] = []
        for b, present in zip(bins, in_room, strict=True):
            if b.value is not None:
                colour = viridis(b.value / _MAX_SCORE)
            else:
                colour = NOT_VISIBLE_COLOUR if present else ABSENT_COLOUR
            if runs and runs[-1][0] == colour and abs(b.start - runs[-1][2]) < 1e-6:
                runs[-1] = (colour, runs[-1][1], b.end)
            else:
                runs.append((colour, b.start, b.end))
        for colour, start, end in runs:
            x0, x1 = plot.x(start), plot.x(end)
            # One pixel less than the row height leaves a white line between students.
            cells.append(
                _el(
                    "rect",
                    x=x0,
                    y=float(y),
                    width=max(0.5, x1 - x0),
                    height=str(row_height - 1),
                    fill=colour,
                )
            )
        parts.append(_el("g", "".join(cells)))
    _time_axis(plot, parts)
    _heatmap_legend(parts, chart_id, label_width, plot.bottom + 50)
    parts.append("</svg>")
    return Markup("\n".join(parts))


def _heatmap_legend(parts: list[str], chart_id: str, x: float, y: float) -> None:
    """Gradient legend labelled with the level names, and the grey not-visible swatch."""
    gradient_id = f"{_safe_id(chart_id)}-scale"
    stops = "".join(
        _el("stop", offset=f"{i / (len(VIRIDIS_STOPS) - 1):.2f}", stop_color=colour)
        for i, colour in enumerate(VIRIDIS_STOPS)
    )
    gradient = _el("linearGradient", stops, id=gradient_id, x1="0", x2="1", y1="0", y2="0")
    parts.append(_el("defs", gradient))
    bar_width = 300.0
    parts.append(_el("rect", x=x, y=y, width=bar_width, height="12", fill=f"url(#{gradient_id})"))
    last = len(ENGAGEMENT_LEVELS) - 1
    for level, name in enumerate(ENGAGEMENT_LEVELS):
        anchor = "start" if level == 0 else "end" if level == last else "middle"
        lx = x + bar_width * level / _MAX_SCORE
        parts.append(_text(lx, y + 26, name, text_anchor=anchor, fill="#333", font_size="11"))
    gx = x + bar_width + 30
    parts.append(_el("rect", x=gx, y=y, width="18", height="12", fill=NOT_VISIBLE_COLOUR))
    parts.append(_text(gx + 24, y + 10, "not visible", fill="#333", font_size="11"))
    parts.append(
        _el("rect", x=gx + 110, y=y, width="18", height="12", fill=ABSENT_COLOUR, stroke="#ccc")
    )
    parts.append(_text(gx + 134, y + 10, "not in the room", fill="#333", font_size="11"))


def bar_chart_svg(
    items: Sequence[tuple[str, float | None]],
    *,
    chart_id: str,
    title: str,
    description: str,
    width: int = 560,
    bar_height: int = 22,
    colour: str = BAR_COLOUR,
) -> Markup:
    """Horizontal bars of shares 0–1, one per (label, share); a None share reads "not known".

    The values are also written next to each bar, so the chart reads without colour,
    and listed in the description, so a screen reader gets them too.
    """
    label_width = 150
    bar_space = float(width - label_width - 70)
    height = 10 + len(items) * (bar_height + 6) + 4
    values = ", ".join(
        f"{label} {format_share(value) if value is not None else 'not known'}"
        for label, value in items
    )
    parts = _open(chart_id, width, height, title, f"{description} {values}.")
    for i, (label, value) in enumerate(items):
        y = float(10 + i * (bar_height + 6))
        middle = y + bar_height / 2 + 4
        parts.append(_text(label_width - 8, middle, label, text_anchor="end", fill="#222"))
        parts.append(
            _el(
                "rect",
                x=str(label_width),
                y=y,
                width=bar_space,
                height=str(bar_height),
                fill="#f1f1f1",
            )
        )
        if value is None:
            parts.append(_text(label_width + 6, middle, "not known", fill="#666"))
            continue
        bar = bar_space * min(1.0, max(0.0, value))
        parts.append(
            _el("rect", x=str(label_width), y=y, width=bar, height=str(bar_height), fill=colour)
        )
        parts.append(_text(label_width + bar_space + 8, middle, format_share(value), fill="#222"))
    parts.append("</svg>")
    return Markup("\n".join(parts))


def emotion_shares_svg(summary: StudentSummary, *, chart_id: str = "emotions") -> Markup | None:
    """Bars of how often each emotion was the most probable one; None without emotions.

    Emotions keep the models' fixed order (not sorted by size), so two students'
    charts can be compared at a glance.
    """
    if summary.emotion_shares is None:
        return None
    return bar_chart_svg(
        list(summary.emotion_shares),
        chart_id=chart_id,
        title=f"Emotion shares: {summary.label}",
        description=(
            f"Share of the visible samples of {summary.label} in which each emotion was "
            "the most probable one, as estimated from the face:"
        ),
    )


def attention_cues_svg(summary: StudentSummary, *, chart_id: str = "cues") -> Markup:
    """Bars of the attention cue shares of one student."""
    cues = summary.cues
    return bar_chart_svg(
        [
            ("looking away", cues.looking_away_share),
            ("eyes closed", cues.eyes_closed_share),
            ("gaze off screen", cues.gaze_away_share),
            ("not visible", cues.not_visible_share),
        ],
        chart_id=chart_id,
        title=f"Attention cues: {summary.label}",
        description=(
            f"Attention cues of {summary.label}. Looking away, eyes closed and gaze off screen "
            "are shares of the time the face was visible; not visible is a share of all "
            "sampled time in the room:"
        ),
        colour=CUE_COLOUR,
    )


def trend_svg(trend: StudentTrend, *, chart_id: str = "trend", width: int = 640) -> Markup:
    """A student's mean engagement per session of the course, with 95 % intervals, oldest first.

    Sessions are evenly spaced (they are events, not a time scale); the current session
    is drawn as a ring so it stands out without relying on colour.
    """
    points = trend.points
    height = 250
    plot = _Plot(left=110, top=20, width=width - 140, height=height - 80, end_seconds=1.0)
    described = "; ".join(
        f"{point.created_at:%Y-%m-%d}{' (this session)' if point.current else ''} "
        f"{format_score(point.mean_engagement, 2)}"
        + (
            f" (95% interval {format_score(point.engagement_low, 2)}–"
            f"{format_score(point.engagement_high, 2)})"
            if point.engagement_low is not None and point.engagement_high is not None
            else ""
        )
        for point in points
    )
    description = (
        f"Mean engagement of {trend.student.label} in each session of the course, on a scale "
        f"from very low (0) to very high (3): {described}."
    )
    parts = _open(chart_id, width, height, f"Engagement across sessions: {trend.student.label}", description)
    parts.append(_plot_background(plot))
    _level_axis(plot, parts)
    slot = plot.width / max(1, len(points))
    line: list[tuple[float, float]] = []
    # Markers go after the connecting line, so the line never covers a dot.
    markers: list[str] = []
    for i, point in enumerate(points):
        x = plot.left + slot * (i + 0.5)
        parts.append(
            _text(x, plot.bottom + 17, f"{point.created_at:%Y-%m-%d}", text_anchor="middle", fill="#333")
        )
        if point.current:
            parts.append(
                _text(x, plot.bottom + 31, "this session", text_anchor="middle", fill="#555", font_size="11")
            )
        if point.mean_engagement is None:
            parts.append(_text(x, plot.y(1.5), "not visible", text_anchor="middle", fill="#666"))
            continue
        y = plot.y(point.mean_engagement)
        line.append((x, y))
        if point.engagement_low is not None and point.engagement_high is not None:
            markers.append(
                _el(
                    "line",
                    x1=x,
                    y1=plot.y(point.engagement_low),
                    x2=x,
                    y2=plot.y(point.engagement_high),
                    stroke=ENGAGEMENT_COLOUR,
                    stroke_width="2",
                )
            )
        tip = _tooltip(
            f"{point.title}, {point.created_at:%Y-%m-%d}: {format_score(point.mean_engagement, 2)}"
        )
        if point.current:
            markers.append(
                _el("circle", tip, cx=x, cy=y, r="7", fill="#fff", stroke=LOW_COLOUR, stroke_width="3")
            )
        else:
            markers.append(_el("circle", tip, cx=x, cy=y, r="5", fill=ENGAGEMENT_COLOUR))
    if len(line) >= 2:
        parts.append(
            _el(
                "polyline",
                points=_points(line),
                fill="none",
                stroke=ENGAGEMENT_COLOUR,
                stroke_width="1.2",
                stroke_dasharray="3 3",
            ),
        )
    parts.extend(markers)
    parts.append("</svg>")
    return Markup("\n".join(parts))
