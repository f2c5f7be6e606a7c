"""CSV and JSON exports of every student's timeline.

One row per student × sampled moment, including the moments the student was not
visible or, in a meeting, not in the room (``in_room`` false; their numbers are empty),
so a row count always equals students × moments
and a spreadsheet can line students up by time. Columns come in a fixed order; the
emotion columns are present only when emotion inference ran, so a deployment that
switched emotions off never exports an (empty) emotion field.

A failed analysis exports no rows: its partial numbers would look like a finished
class. The JSON says why (status and reason); the CSV keeps its header.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from kernel.spreadsheets import spreadsheet_safe
from kernel.types import EMOTION_LABELS
from reports.aggregate import ReportData, StudentTimeline, TimelineSample
from reports.formatting import format_timestamp, level_name

#: Columns before the emotion columns.
BASE_COLUMNS: tuple[str, ...] = (
    "analysis_id",
    "student_number",
    "student_id",
    "student_label",
    "stream",
    "track_id",
    "timestamp",
    "time",
    "in_room",
    "visible",
    "engagement_score",
    "engagement_level",
    "engagement_level_name",
    "engagement_p0",
    "engagement_p1",
    "engagement_p2",
    "engagement_p3",
    "confidence",
)
#: Emotion columns, present only when emotion inference ran.
EMOTION_COLUMNS: tuple[str, ...] = (
    *(f"emotion_{label}" for label in EMOTION_LABELS),
    "dominant_emotion",
)
#: Columns after the emotion columns.
CUE_COLUMNS: tuple[str, ...] = (
    "head_yaw",
    "head_pitch",
    "eyes_closed",
    "gaze_away",
    "looking_away",
)

#: One exported value: None where unknown (empty in the CSV, null in the JSON).
Cell = str | int | float | bool | None
#: One exported row: column -> value, in column order.
Row = dict[str, Cell]


def timeline_columns(emotion_enabled: bool) -> tuple[str, ...]:
    """The export's columns, in order."""
    return BASE_COLUMNS + (EMOTION_COLUMNS if emotion_enabled else ()) + CUE_COLUMNS


def _r(value: float | None, digits: int = 4) -> float | None:
    """Round for a compact, stable export (the models are not more precise than this)."""
    return None if value is None else round(value, digits)


def _row(data: ReportData, timeline: StudentTimeline, sample: TimelineSample) -> Row:
    """One export row as a map column -> value (None for unknown)."""
    student = timeline.student
    probs = sample.level_probabilities
    row: Row = {
        "analysis_id": data.analysis.id,
        "student_number": student.number,
        "student_id": student.id,
        "student_label": student.label,
        "stream": student.stream,
        "track_id": student.track_id,
        "timestamp": round(sample.timestamp, 3),
        "time": format_timestamp(sample.timestamp),
        "in_room": sample.in_room,
        "visible": sample.visible,
        "engagement_score": _r(sample.engagement_score),
        "engagement_level": sample.engagement_level,
        "engagement_level_name": level_name(sample.engagement_level) if sample.visible else None,
        "engagement_p0": _r(probs[0]) if probs else None,
        "engagement_p1": _r(probs[1]) if probs else None,
        "engagement_p2": _r(probs[2]) if probs else None,
        "engagement_p3": _r(probs[3]) if probs else None,
        "confidence": _r(sample.confidence),
    }
    if data.emotion_enabled:
        emotions = sample.emotion_probabilities
        for i, label in enumerate(EMOTION_LABELS):
            row[f"emotion_{label}"] = _r(emotions[i]) if emotions else None
        row["dominant_emotion"] = sample.dominant_emotion
    row.update(
        {
            "head_yaw": _r(sample.head_yaw, 2),
            "head_pitch": _r(sample.head_pitch, 2),
            "eyes_closed": _r(sample.eyes_closed),
            "gaze_away": _r(sample.gaze_away),
            "looking_away": sample.looking_away,
        }
    )
    return row


def timeline_rows(data: ReportData) -> list[Row]:
    """Every student × sampled moment, students in report order, time ascending."""
    if data.analysis.failed:
        return []
    return [_row(data, tl, sample) for tl in data.timelines for sample in tl.samples]


def _csv_cell(value: Cell) -> str:
    """CSV text of a value: empty for unknown, 1/0 for flags, text made safe for spreadsheets.

    Text cells (student labels, stream names: chosen by participants in a meeting) never
    start a formula (:func:`kernel.spreadsheets.spreadsheet_safe`); numbers are written as
    they are, so a negative head angle stays a number.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return spreadsheet_safe(value)
    return str(value)


def timelines_csv(data: ReportData, rows: Sequence[Row] | None = None) -> str:
    """The timelines as CSV text: header row first, Unix line endings.

    ``rows`` are :func:`timeline_rows` of ``data`` when the caller already has them.
    """
    columns = timeline_columns(data.emotion_enabled)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in timeline_rows(data) if rows is None else rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    return buffer.getvalue()


def timelines_json(data: ReportData, rows: Sequence[Row] | None = None) -> str:
    """The timelines as a JSON document: analysis facts, the column list, then the rows.

    Each row is an array of values in column order, one row per line: a class of two
    hours and thirty students has hundreds of thousands of rows, and repeating every
    key in every row would triple the file. ``rows`` are :func:`timeline_rows` of
    ``data`` when the caller already has them.
    """
    analysis = data.analysis
    columns = timeline_columns(data.emotion_enabled)
    head: dict[str, Any] = {
        "format": "classlens-timelines",
        "version": 1,
        "analysis": {
            "id": analysis.id,
            "title": analysis.display_title,
            "source": analysis.source,
            "kind": analysis.kind,
            "status": analysis.status.value,
            "failure_reason": analysis.failure_reason,
            "created_at": analysis.created_at.isoformat(),
            "sample_fps": analysis.sample_fps,
            "duration_seconds": analysis.duration_seconds,
            "emotion_inference": analysis.emotion_inference,
        },
        "models": [
            {"role": m.role, "name": m.name, "sha256": m.sha256, "heuristic": m.heuristic}
            for m in data.models
        ],
        "columns": list(columns),
    }
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers;
    # aggregation already turns non-finite numbers into None.
    text = json.dumps(head, ensure_ascii=False, indent=1, allow_nan=False)
    lines = [
        json.dumps([row[c] for c in columns], ensure_ascii=False, allow_nan=False)
        for row in (timeline_rows(data) if rows is None else rows)
    ]
    body = ",\n".join(lines)
    return text.removesuffix("\n}") + f',\n "rows": [\n{body}\n ]\n}}\n'
