"""PNG versions of the class charts, for email: common mail clients drop inline SVG.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global state and
safe in worker threads) and saved into memory: the bytes go straight into the MIME
message, never to disk. The colours are the SVG charts' colours (Okabe–Ito lines,
viridis heatmap, grey for "not visible"), so a chart looks the same in the email and in
the archive. Each chart comes with its alt text.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter

from kernel.types import ENGAGEMENT_LEVELS
from reports.aggregate import ClassOverview
from reports.charts import (
    ABSENT_COLOUR,
    DIP_COLOUR,
    DIP_SHADE_OPACITY,
    ENGAGEMENT_COLOUR,
    NOT_VISIBLE_COLOUR,
    VIRIDIS_STOPS,
    VISIBLE_COLOUR,
)
from reports.formatting import format_score, format_share, format_timestamp, score_level_name

#: Pixels per inch of the PNGs: sharp on high-density screens, small enough for email.
PNG_DPI = 110
#: Most heatmap columns; longer classes are averaged into bins, as in the SVG heatmap.
MAX_HEATMAP_COLUMNS = 120
#: Most characters of a student label printed beside a heatmap row.
MAX_LABEL_CHARS = 24

_MAX_SCORE = float(len(ENGAGEMENT_LEVELS) - 1)


@dataclass(frozen=True, slots=True)
class PngChart:
    """One chart as PNG bytes, with the alt text that says what it shows."""

    name: str
    """Short identifier, used for the file name and the content id in email."""
    png: bytes
    """The encoded image."""
    alt: str
    """What the chart shows, in words, for readers who cannot see it."""


def _to_png(figure: Figure) -> bytes:
    """Encode a figure as PNG in memory (no file is ever written)."""
    FigureCanvasAgg(figure)  # attaches the Agg canvas, which renders without a display
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _time_formatter() -> FuncFormatter:
    """Axis labels as class time ``m:ss``."""
    return FuncFormatter(lambda seconds, _pos: format_timestamp(float(seconds)))


def _level_axis(axes: Axes) -> None:
    """Y axis 0–3 labelled with the level names."""
    axes.set_ylim(0.0, _MAX_SCORE)
    axes.yaxis.set_major_locator(FixedLocator(list(range(len(ENGAGEMENT_LEVELS)))))
    axes.set_yticklabels([f"{name} ({level})" for level, name in enumerate(ENGAGEMENT_LEVELS)])
    axes.grid(axis="y", color="#e3e3e3", linewidth=0.8)


def class_curve_alt(overview: ClassOverview) -> str:
    """Alt text of the class curve."""
    intervals = overview.disengagement_intervals
    if intervals:
        dips = "; ".join(
            f"{iv.label} (up to {format_share(iv.peak_share)} of visible students)" for iv in intervals[:10]
        )
        more = f" and {len(intervals) - 10} more" if len(intervals) > 10 else ""
        dip_text = f"{len(intervals)} disengagement moment(s), shaded orange: {dips}{more}."
    else:
        dip_text = "No moment where at least 40% of the visible students were at a low level."
    return (
        "Class engagement over time on a scale from very low (0) to very high (3); overall "
        f"{format_score(overview.mean_engagement)} ({score_level_name(overview.mean_engagement)}). "
        f"{dip_text} On average {format_share(overview.mean_share_visible)} of the students were visible."
    )


def class_curve_png(overview: ClassOverview) -> PngChart:
    """The class mean engagement over time with its 95 % band, disengagement shaded, share visible dashed."""
    figure = Figure(figsize=(8.0, 3.0), dpi=PNG_DPI, layout="constrained")
    axes = figure.add_subplot()
    times = np.array([p.timestamp for p in overview.points], dtype=np.float64)
    nan = float("nan")
    mean = np.array([nan if p.mean_engagement is None else p.mean_engagement for p in overview.points])
    low = np.array([nan if p.band_low is None else p.band_low for p in overview.points])
    high = np.array([nan if p.band_high is None else p.band_high for p in overview.points])
    visible = np.array([nan if p.share_visible is None else p.share_visible for p in overview.points])
    for iv in overview.disengagement_intervals:
        # As in the SVG: a faint shade under the curve, a solid strip along the top.
        axes.axvspan(iv.start, iv.end, color=DIP_COLOUR, alpha=DIP_SHADE_OPACITY, linewidth=0)
        axes.axvspan(iv.start, iv.end, ymin=0.975, ymax=1.0, color=DIP_COLOUR, alpha=1.0, linewidth=0)
    if times.size:
        # Plot at the middle of each sampling period, like the SVG chart.
        middle = times + overview.sample_period / 2
        axes.fill_between(middle, low, high, color=ENGAGEMENT_COLOUR, alpha=0.18, linewidth=0)
        axes.plot(middle, mean, color=ENGAGEMENT_COLOUR, linewidth=2.0, label="class mean")
        share_axes = axes.twinx()
        share_axes.plot(middle, visible, color=VISIBLE_COLOUR, linewidth=1.2, linestyle="--")
        share_axes.set_ylim(0.0, 1.0)
        share_axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_share(float(v))))
        share_axes.set_ylabel("students visible", color=VISIBLE_COLOUR)
    _level_axis(axes)
    axes.set_xlim(0.0, overview.end_seconds)
    axes.xaxis.set_major_formatter(_time_formatter())
    axes.set_xlabel("class time (m:ss)")
    axes.set_title("Class engagement over time (orange: disengagement moments)", fontsize=10, loc="left")
    return PngChart(name="class-curve", png=_to_png(figure), alt=class_curve_alt(overview))


def _plain_label(label: str) -> str:
    """A student label shortened and with ``$`` escaped, so matplotlib never reads it as mathtext."""
    shown = label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"
    return shown.replace("$", r"\$")


def _heatmap_matrix(overview: ClassOverview) -> tuple[np.ndarray, np.ndarray, float]:
    """The heatmap's columns: mean engagement, absence, and the column width in seconds.

    Returns students × columns of mean engagement (NaN where not visible), the same
    shape of flags for a student out of the room for the whole column, and its width.
    """
    columns = len(overview.timestamps)
    per_bin = max(1, math.ceil(columns / MAX_HEATMAP_COLUMNS)) if columns else 1
    bins = max(1, math.ceil(columns / per_bin))
    matrix = np.full((max(1, len(overview.heatmap)), bins), np.nan)
    absent = np.zeros(matrix.shape, dtype=bool)
    for r, row in enumerate(overview.heatmap):
        values = np.array([np.nan if v is None else v for v in row.values], dtype=np.float64)
        present = np.array(row.in_room, dtype=bool)
        for b in range(bins):
            chunk = values[b * per_bin : (b + 1) * per_bin]
            known = chunk[~np.isnan(chunk)]
            if known.size:
                matrix[r, b] = float(known.mean())
            absent[r, b] = not present[b * per_bin : (b + 1) * per_bin].any()
    return matrix, absent, per_bin * overview.sample_period


def heatmap_alt(overview: ClassOverview) -> str:
    """Alt text of the heatmap."""
    return (
        f"Heatmap of engagement for {len(overview.heatmap)} students (rows) over class time (columns), "
        "dark purple for very low (0) through green to yellow for very high (3); grey where the "
        "student's face was not visible, and pale where they were not in the room."
    )


def heatmap_png(overview: ClassOverview) -> PngChart:
    """Students × time heatmap of engagement: viridis very low → very high, grey = not visible."""
    rows = len(overview.heatmap)
    figure = Figure(figsize=(8.0, 1.4 + 0.28 * max(1, rows)), dpi=PNG_DPI, layout="constrained")
    axes = figure.add_subplot()
    matrix, absent, column_seconds = _heatmap_matrix(overview)
    colours = LinearSegmentedColormap.from_list("classlens-viridis", list(VIRIDIS_STOPS)).with_extremes(
        bad=NOT_VISIBLE_COLOUR
    )
    image = axes.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        interpolation="nearest",
        cmap=colours,
        vmin=0.0,
        vmax=_MAX_SCORE,
        extent=(0.0, matrix.shape[1] * column_seconds, matrix.shape[0] - 0.5, -0.5),
    )
    if absent.any():
        # Out of the room is drawn over "not visible": absence says nothing of attention.
        axes.imshow(
            np.ma.masked_where(~absent, np.ones(absent.shape)),
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap([ABSENT_COLOUR]),
            extent=(0.0, matrix.shape[1] * column_seconds, matrix.shape[0] - 0.5, -0.5),
        )
    labels = [_plain_label(row.student.label) for row in overview.heatmap]
    axes.set_yticks(list(range(rows)))
    axes.set_yticklabels(labels)
    axes.xaxis.set_major_formatter(_time_formatter())
    axes.set_xlabel("class time (m:ss)")
    bar = figure.colorbar(image, ax=axes, ticks=list(range(len(ENGAGEMENT_LEVELS))), pad=0.01)
    bar.ax.set_yticklabels(list(ENGAGEMENT_LEVELS))
    title = "Engagement of each student over time (grey: not visible"
    title += ", pale: not in the room)" if absent.any() else ")"
    axes.set_title(title, fontsize=10, loc="left")
    return PngChart(name="heatmap", png=_to_png(figure), alt=heatmap_alt(overview))
