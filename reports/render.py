"""Render an analysis's reports to a folder: class overview, one page per student, exports.

Layout of the folder::

    index.html                  class overview
    students/<n>-<slug>.html    one report per student
    timelines.csv               every student × sampled moment
    timelines.json              the same, with analysis facts
    .classlens-report.json      marker: which analysis the folder holds

Everything is rendered in memory first, written into a temporary sibling folder and
then renamed into place, so a failure never leaves a half-written report behind. A
folder holding an earlier report of the same analysis is replaced; any other non-empty
folder is left alone and the call fails.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine

from kernel.errors import ClassLensError
from kernel.store import session_scope
from kernel.types import ENGAGEMENT_LEVELS
from reports.aggregate import (
    LOW_VISIBILITY_SHARE,
    MIN_STUDENTS_FOR_CLASS_BAND,
    ReportData,
    StudentSummary,
    StudentTimeline,
    build_report_data,
)
from reports.charts import (
    attention_cues_svg,
    class_curve_svg,
    emotion_shares_svg,
    heatmap_svg,
    student_engagement_svg,
    trend_svg,
)
from reports.export import timeline_rows, timelines_csv, timelines_json
from reports.formatting import (
    format_score,
    format_share,
    format_timestamp,
    level_name,
    score_level_name,
)

#: Name of the marker file that says which analysis a report folder holds.
MARKER_NAME = ".classlens-report.json"
#: Most disengagement intervals listed in words on the overview (all are charted).
MAX_LISTED_DIPS = 10
#: Folder of the student reports inside a report folder.
STUDENTS_DIR = "students"
#: Default of ``Settings.min_students_for_class_rows``.
DEFAULT_MIN_STUDENTS_FOR_CLASS_ROWS = 5

if TYPE_CHECKING:
    from kernel.settings import Settings


@dataclass(frozen=True, slots=True)
class ReportOptions:
    """Choices of the deployment that change what the reports show (not the numbers)."""

    min_students_for_class_rows: int = DEFAULT_MIN_STUDENTS_FOR_CLASS_ROWS
    """Class-wide views hide per-student rows when fewer students than this were analysed."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ReportOptions:
        """The options a deployment configured."""
        return cls(min_students_for_class_rows=settings.min_students_for_class_rows)

    def class_rows_hidden(self, data: ReportData) -> bool:
        """Whether class-wide views of ``data`` must hide their per-student rows.

        With few students, a row of a class-wide view is as good as a named individual
        report; the aggregation threshold keeps class views about the class.
        """
        return len(data.students) < self.min_students_for_class_rows

    def class_rows_hidden_note(self, data: ReportData) -> str:
        """The sentence that says why per-student rows are hidden."""
        count = len(data.students)
        return (
            f"Per-student rows are hidden in this class-wide view because only {count} "
            f"student{'s were' if count != 1 else ' was'} analysed, fewer than the "
            f"{self.min_students_for_class_rows} this deployment requires "
            "(setting min_students_for_class_rows), so a row would single out a person. "
            "Each student's own report is still available to the session's host."
        )


class ReportOutputError(ClassLensError):
    """The report folder cannot be written (occupied by something else, or not a folder)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """Where the rendered files of one analysis are."""

    folder: Path
    """The report folder."""
    overview: Path
    """The class overview, ``folder/index.html``."""
    students: tuple[Path, ...]
    """One report per student, in :attr:`ReportData.students` order; empty when failed."""
    csv: Path
    """The CSV export, ``folder/timelines.csv``."""
    json: Path
    """The JSON export, ``folder/timelines.json``."""


def _format_utc(moment: datetime) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM UTC``.

    SQLite hands back naive datetimes; the store writes them in UTC.
    """
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _format_fps(fps: float) -> str:
    """A sampling rate in words: ``1 frame per second``, ``every 2 seconds``."""
    if not math.isfinite(fps) or fps <= 0:
        return "at an unrecorded rate"
    if fps >= 1:
        return f"{fps:g} frame{'s' if fps != 1 else ''} per second"
    return f"one frame every {1 / fps:g} seconds"


@functools.cache
def template_environment() -> Environment:
    """The Jinja2 environment of the report templates, autoescaping HTML.

    Autoescape is on for every template except the stylesheet: student labels can be
    meeting display names typed by anyone, and must always print as text.
    """
    environment = Environment(
        loader=PackageLoader("reports", "templates"),
        autoescape=select_autoescape(
            enabled_extensions=("html", "htm", "xml", "svg"),
            disabled_extensions=("css",),
            default_for_string=True,
            default=True,
        ),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(
        {
            "ts": format_timestamp,
            "pct": format_share,
            "score": format_score,
            "level": score_level_name,
            "levelname": level_name,
            "utc": _format_utc,
            "fps": _format_fps,
        }
    )
    return environment


def _moment_context(data: ReportData, timestamp: float) -> str:
    """What the class was doing at a student's low moment: its mean, and any class dip then."""
    overview = data.overview
    for interval in overview.disengagement_intervals:
        if interval.start - 1e-6 <= timestamp < interval.end:
            return f"class disengagement moment {interval.label}"
    for point in overview.points:
        if abs(point.timestamp - timestamp) < 1e-6 and point.mean_engagement is not None:
            mean = point.mean_engagement
            return f"class mean {format_score(mean)} ({score_level_name(mean)})"
    return "–"


def _student_page(data: ReportData, timeline: StudentTimeline, summary: StudentSummary) -> str:
    """Render one student's report."""
    number = timeline.student.number
    trend = data.trends.get(timeline.student.id)
    visible = [s.timestamp for s in timeline.samples if s.visible]
    charts: dict[str, Markup | None] = {
        "engagement": student_engagement_svg(
            timeline,
            summary,
            end_seconds=data.overview.end_seconds,
            sample_period=data.overview.sample_period,
            chart_id=f"engagement-{number}",
        ),
        "cues": attention_cues_svg(summary, chart_id=f"cues-{number}"),
        "emotions": emotion_shares_svg(summary, chart_id=f"emotions-{number}")
        if data.emotion_enabled
        else None,
        "trend": trend_svg(trend, chart_id=f"trend-{number}") if trend is not None else None,
    }
    return (
        template_environment()
        .get_template("student.html")
        .render(
            data=data,
            summary=summary,
            timeline=timeline,
            charts=charts,
            overview_href="../index.html",
            method_href="../index.html#method",
            low_visibility=LOW_VISIBILITY_SHARE,
            level_names=ENGAGEMENT_LEVELS,
            moment_context=[_moment_context(data, m.timestamp) for m in summary.lowest_moments],
            first_seen=visible[0] if visible else None,
            last_seen=visible[-1] if visible else None,
            trend=trend,
        )
    )


def headline(data: ReportData) -> str:
    """The report's first sentence: how engaged the class was, and when attention dropped most, for how many."""
    overview = data.overview
    count = len(data.students)
    students = f"{count} student{'' if count == 1 else 's'}"
    mean = overview.mean_engagement
    if mean is None:
        return f"No engagement could be estimated for the {students} of this class: no face was visible long enough."
    sentence = (f"Engagement was {score_level_name(mean)} on average ({format_score(mean, 2)} on the 0–3 scale) "
                f"across {students}.")
    dips = overview.disengagement_intervals
    if not dips:
        return sentence + " At no moment were 40% or more of the visible students at a low or very low level."
    worst = max(dips, key=lambda iv: (iv.peak_share, iv.duration, -iv.start))
    more = f" ({len(dips)} such moments in all)" if len(dips) > 1 else ""
    return (sentence + f" Attention dropped most at {worst.label}, when up to {format_share(worst.peak_share)} of "
            f"the visible students were at a low or very low level{more}.")


def _overview_page(data: ReportData, options: ReportOptions) -> str:
    """Render the class overview (or, for a failed analysis, the failure page)."""
    rows_hidden = options.class_rows_hidden(data)
    charts: dict[str, Markup | None] = {}
    if not data.analysis.failed:
        charts = {
            "class_curve": class_curve_svg(data.overview),
            "heatmap": None if rows_hidden else heatmap_svg(data.overview),
        }
    intervals = data.overview.disengagement_intervals
    # A long list buries the moments that matter: list the longest, in class order.
    longest = sorted(intervals, key=lambda iv: (-iv.duration, iv.start))[:MAX_LISTED_DIPS]
    listed = sorted(longest, key=lambda iv: iv.start)
    student_links = [{"summary": summary, "href": f"{STUDENTS_DIR}/{summary.student.file_name}"}
                     for summary in data.summaries]
    student_rows = [] if rows_hidden else student_links
    return (
        template_environment()
        .get_template("class_overview.html")
        .render(
            data=data,
            charts=charts,
            student_rows=student_rows,
            low_visibility=LOW_VISIBILITY_SHARE,
            min_band_students=MIN_STUDENTS_FOR_CLASS_BAND,
            dip_seconds=sum(iv.duration for iv in intervals),
            dips_listed=listed,
            dips_not_listed=len(intervals) - len(listed),
            method_href="#method",
            rows_hidden=rows_hidden,
            rows_hidden_note=options.class_rows_hidden_note(data) if rows_hidden else "",
            student_links=student_links,
            headline=headline(data) if not data.analysis.failed else "",
        )
    )


def render_documents(data: ReportData, options: ReportOptions | None = None) -> dict[str, str]:
    """Every file of the report folder as text, keyed by its POSIX path inside the folder.

    Pure: nothing is written. A failed analysis gets the overview (saying it failed and
    why), header-only exports and no student pages. Student pages are written even when
    the overview hides per-student rows: they are individual reports for the host.
    """
    documents: dict[str, str] = {"index.html": _overview_page(data, options or ReportOptions())}
    if not data.analysis.failed:
        for timeline, summary in zip(data.timelines, data.summaries, strict=True):
            documents[f"{STUDENTS_DIR}/{timeline.student.file_name}"] = _student_page(
                data, timeline, summary
            )
    rows = timeline_rows(data)
    documents["timelines.csv"] = timelines_csv(data, rows)
    documents["timelines.json"] = timelines_json(data, rows)
    marker: dict[str, Any] = {
        "format": "classlens-report",
        "version": 1,
        "analysis_id": data.analysis.id,
    }
    documents[MARKER_NAME] = json.dumps(marker, indent=1) + "\n"
    return documents


def _previous_analysis_id(folder: Path) -> int | None:
    """The analysis id in a report folder's marker, or None when there is no readable marker."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("format") == "classlens-report":
        value = marker.get("analysis_id")
        if isinstance(value, int):
            return value
    return None


def check_report_folder(out_dir: Path, analysis_id: int) -> None:
    """Refuse a folder that cannot be written, or that holds anything but nothing or this analysis's old report.

    Called before any analysis work, so a bad ``--out`` costs a second, not a whole video.
    """
    out_dir = out_dir.absolute()
    if not out_dir.exists() and not out_dir.is_symlink():
        _check_writable(out_dir)
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ReportOutputError(
            f"report folder {out_dir} exists and is not a folder; choose another path"
        )
    if not any(out_dir.iterdir()):
        return
    previous = _previous_analysis_id(out_dir)
    if previous != analysis_id:
        holds = f"the report of analysis {previous}" if previous is not None else "other files"
        raise ReportOutputError(
            f"report folder {out_dir} holds {holds}; "
            "choose an empty folder or that analysis's own folder"
        )


def _check_writable(out_dir: Path) -> None:
    """The report is written beside ``out_dir`` first, then renamed: try exactly that, with an empty folder."""
    existing = out_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ReportOutputError(f"cannot write the report folder {out_dir}: {existing} is a file, not a folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=out_dir.parent)).rmdir()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ReportOutputError(f"cannot write the report folder {out_dir}: {reason}; choose another path") from None


def write_documents(documents: dict[str, str], out_dir: Path, analysis_id: int) -> None:
    """Write rendered files into ``out_dir`` atomically (temporary sibling folder, then rename).

    An existing ``out_dir`` must be empty or hold an earlier report of ``analysis_id``;
    it is then replaced. On any error the temporary folder is removed and ``out_dir``
    is as it was.
    """
    out_dir = out_dir.absolute()
    check_report_folder(out_dir, analysis_id)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, not the system temp folder: rename is only atomic within one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for relative, text in sorted(documents.items()):
            path = staging.joinpath(*relative.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
        # mkdtemp makes the folder private (0700); a report folder is meant to be shared or served.
        staging.chmod(0o755)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, moving an existing ``out_dir`` aside first.

    POSIX has no portable atomic exchange of two folders, so the old report is renamed
    away, the new one renamed in, and the old one deleted; if the second rename fails
    the old report is put back.
    """
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(staging, out_dir)
        return
    backup = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out_dir, backup)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def report_paths(data: ReportData, out_dir: Path) -> ReportPaths:
    """The paths :func:`render_reports` writes for ``data`` into ``out_dir``."""
    folder = out_dir.absolute()
    students: tuple[Path, ...] = ()
    if not data.analysis.failed:
        students = tuple(folder / STUDENTS_DIR / s.file_name for s in data.students)
    return ReportPaths(
        folder=folder,
        overview=folder / "index.html",
        students=students,
        csv=folder / "timelines.csv",
        json=folder / "timelines.json",
    )


def render_reports(
    engine: Engine, analysis_id: int, out_dir: Path, options: ReportOptions | None = None
) -> ReportPaths:
    """Read an analysis from the store and write its complete report folder to ``out_dir``.

    Raises :class:`~reports.aggregate.AnalysisNotFoundError` for an unknown analysis and
    :class:`ReportOutputError` when ``out_dir`` holds something other than an earlier
    report of the same analysis. Does not write to the store (the caller records
    ``Analysis.report_path`` if it wants to).
    """
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    documents = render_documents(data, options)
    write_documents(documents, out_dir, analysis_id)
    return report_paths(data, out_dir)
