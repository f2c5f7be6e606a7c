"""Reports: what a teacher reads after class, rendered from a real SQLite store.

The store is filled by code with a class a teacher could recognise: five students
sampled once a second for a minute, one of them gone after 0:30, one with a name that
is an XSS attempt, and a dip from 0:20 to 0:30 in which most students drop to the
lowest level. The tests render the whole report folder and check what a teacher
would notice if it broke.
"""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from kernel.store import (
    Analysis,
    AnalysisStatus,
    FaceObservation,
    FrameSample,
    StreamStats,
    Student,
    init_store,
    session_scope,
)
from kernel.types import EMOTION_LABELS
from reports.aggregate import (
    AnalysisNotFoundError,
    ClassPoint,
    TimelineSample,
    build_report_data,
    lowest_moments,
    mean_with_interval,
    merge_moments,
)
from reports.charts import heatmap_svg
from reports.export import timeline_columns
from reports.formatting import format_interval, format_timestamp, slugify
from reports.render import ReportOutputError, ReportPaths, render_documents, render_reports

XSS = "<script>alert(1)</script>"
LABELS = ("Student 1", "Student 2", XSS, "Ana-María Núñez", "Student 5")
HALF_ABSENT = "Student 2"
STEADY = "Student 5"
SECONDS = 60
DIP = range(20, 30)

MODELS = {
    "detector": {
        "name": "buffalo_l/det_10g",
        "sha256": "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91",
        "licence": "non-commercial research",
        "description": "insightface RetinaFace detector.",
        "heuristic": False,
    },
    "emotion": {
        "name": "fer2013-mobilenetv2",
        "sha256": "a" * 64,
        "licence": "MIT",
        "description": "MobileNetV2 trained on FER2013.",
        "heuristic": False,
    },
    "engagement": {
        "name": "pose-eyes-heuristic",
        "sha256": "b" * 64,
        "licence": "Apache-2.0",
        "description": "Maps head pose and eye openness to levels by fixed rules.",
        "heuristic": True,
    },
}


def _level_at(label: str, t: int) -> int:
    """The engagement level the generated class gives a student at second t."""
    if label == STEADY:
        return 3
    if t in DIP:
        return 0
    if label == "Student 1" and t == 45:
        return 1  # one lone low moment: 1 of 5 students, not a class dip
    return 2 + (t + len(label)) % 2


def _probabilities(level: int) -> list[float]:
    probs = [0.05, 0.05, 0.05, 0.05]
    probs[level] = 0.85
    return probs


def _emotions(t: int) -> list[float]:
    dominant = "sad" if t in DIP else "happy"
    return [0.7 if label == dominant else 0.05 for label in EMOTION_LABELS]


def make_analysis(
    engine: Engine,
    *,
    emotion_inference: bool = True,
    status: AnalysisStatus = AnalysisStatus.done,
    failure_reason: str | None = None,
    models: dict[str, dict[str, object]] | None = None,
) -> int:
    """Write one generated class to the store and return its analysis id."""
    with session_scope(engine) as session:
        analysis = Analysis(
            source="lecture-week3.mp4",
            title="Linear algebra, week 3",
            status=status,
            failure_reason=failure_reason,
            sample_fps=1.0,
            duration_seconds=float(SECONDS),
            frames_sampled=SECONDS,
            faces_detected=0,
            emotion_inference=emotion_inference,
            models_json=json.dumps(MODELS if models is None else models),
        )
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        analysis_id = analysis.id
        faces = 0
        for track, label in enumerate(LABELS, start=1):
            seen = [t for t in range(SECONDS) if not (label == HALF_ABSENT and t >= 30)]
            session.add(
                Student(
                    analysis_id=analysis_id,
                    track_id=track,
                    label=label,
                    first_seen=float(seen[0]),
                    last_seen=float(seen[-1]),
                    samples_visible=len(seen),
                )
            )
            for t in seen:
                level = _level_at(label, t)
                probs = _probabilities(level)
                emotions = _emotions(t) if emotion_inference else [None] * len(EMOTION_LABELS)
                emotion_fields: dict[str, Any] = {
                    f"emotion_{e}": v for e, v in zip(EMOTION_LABELS, emotions, strict=True)
                }
                looking_away = label == "Ana-María Núñez" and 40 <= t < 50
                session.add(
                    FaceObservation(
                        analysis_id=analysis_id,
                        track_id=track,
                        timestamp=float(t),
                        box_x1=10.0 * track,
                        box_y1=10.0,
                        box_x2=10.0 * track + 60,
                        box_y2=80.0,
                        detection_score=0.9,
                        head_yaw=40.0 if looking_away else 5.0,
                        head_pitch=-3.0,
                        head_roll=0.0,
                        eyes_closed=0.8 if label == STEADY and 50 <= t < 55 else 0.1,
                        gaze_away=None,
                        engagement_p0=probs[0],
                        engagement_p1=probs[1],
                        engagement_p2=probs[2],
                        engagement_p3=probs[3],
                        engagement_level=level,
                        engagement_score=sum(k * p for k, p in enumerate(probs)),
                        **emotion_fields,
                    )
                )
                faces += 1
        # A face the tracker never promoted to a student: must not count anywhere.
        session.add(
            FaceObservation(
                analysis_id=analysis_id,
                track_id=99,
                timestamp=5.0,
                box_x1=0.0,
                box_y1=0.0,
                box_x2=5.0,
                box_y2=5.0,
                detection_score=0.4,
                head_yaw=0.0,
                head_pitch=0.0,
                head_roll=0.0,
                engagement_p0=1.0,
                engagement_p1=0.0,
                engagement_p2=0.0,
                engagement_p3=0.0,
                engagement_level=0,
                engagement_score=0.0,
            )
        )
        for t in range(SECONDS):
            session.add(
                FrameSample(
                    analysis_id=analysis_id,
                    timestamp=float(t),
                    faces=sum(1 for lb in LABELS if not (lb == HALF_ABSENT and t >= 30)),
                )
            )
        analysis.faces_detected = faces
    return analysis_id


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return init_store(f"sqlite:///{tmp_path / 'db' / 'store.sqlite3'}")


@pytest.fixture
def rendered(engine: Engine, tmp_path: Path) -> ReportPaths:
    """The report folder of the generated class (saved under tmp_path only)."""
    analysis_id = make_analysis(engine)
    return render_reports(engine, analysis_id, tmp_path / "report")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _svgs(html: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", html, flags=re.DOTALL)


# ---------------------------------------------------------------------------
# What the teacher sees


def test_layout_of_the_report_folder(rendered: ReportPaths) -> None:
    assert rendered.overview == rendered.folder / "index.html"
    assert rendered.csv == rendered.folder / "timelines.csv"
    assert rendered.json == rendered.folder / "timelines.json"
    assert [p.name for p in rendered.students] == [
        "1-student-1.html",
        "2-student-2.html",
        "3-script-alert-1-script.html",
        "4-ana-maria-nunez.html",
        "5-student-5.html",
    ]
    for path in (rendered.overview, rendered.csv, rendered.json, *rendered.students):
        assert path.is_file() and path.stat().st_size > 0
    # Nothing left over from the atomic write.
    assert sorted(p.name for p in rendered.folder.parent.iterdir()) == ["db", "report"]


def test_overview_lists_every_student_and_links_to_existing_reports(rendered: ReportPaths) -> None:
    html = _read(rendered.overview)
    links = re.findall(r'href="(students/[^"]+)"', html)
    assert len(links) == len(LABELS)
    for link in links:
        assert (rendered.folder / link).is_file(), link
    for label in ("Student 1", "Student 2", "Ana-María Núñez", "Student 5"):
        assert label in html
    assert "Linear algebra, week 3" in html and "lecture-week3.mp4" in html
    # Every student page links back to the overview.
    for page in rendered.students:
        assert 'href="../index.html"' in _read(page)


def test_the_dip_is_one_disengagement_interval_shown_as_m_ss(
    engine: Engine, tmp_path: Path
) -> None:
    analysis_id = make_analysis(engine)
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    intervals = data.overview.disengagement_intervals
    assert len(intervals) == 1, intervals
    assert intervals[0].start == pytest.approx(20.0)
    assert intervals[0].end == pytest.approx(30.0)
    assert intervals[0].peak_share == pytest.approx(0.8)
    html = _read(render_reports(engine, analysis_id, tmp_path / "out").overview)
    assert "0:20–0:30" in html
    assert "up to 80% of the visible students" in html


def test_a_script_tag_in_a_name_prints_as_text(rendered: ReportPaths) -> None:
    for page in (rendered.overview, *rendered.students):
        assert "<script" not in _read(page), page.name
    for page in (rendered.overview, rendered.students[2]):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _read(page), page.name
    # The data files keep the real name: they are data, not markup.
    assert XSS in _read(rendered.csv)
    document = json.loads(_read(rendered.json))
    label_column = document["columns"].index("student_label")
    assert document["rows"][2 * SECONDS][label_column] == XSS


def test_half_absent_student_is_visible_half_of_the_time(engine: Engine, tmp_path: Path) -> None:
    analysis_id = make_analysis(engine)
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    by_label = {s.label: s for s in data.summaries}
    half = by_label[HALF_ABSENT]
    assert half.visible_share == pytest.approx(0.5)
    assert half.seconds_visible == pytest.approx(30.0)
    assert half.cues.not_visible_share == pytest.approx(0.5)
    assert by_label[STEADY].visible_share == pytest.approx(1.0)
    paths = render_reports(engine, analysis_id, tmp_path / "out")
    row = re.search(
        r"<tr>\s*<td class=\"name\"><a href=\"students/2-student-2.html\">.*?</tr>",
        _read(paths.overview),
        flags=re.DOTALL,
    )
    assert row is not None
    assert "50%" in row.group(0) and "0:30" in row.group(0)
    student_page = _read(paths.students[1])
    assert "30 of 60 sampled moments" in student_page


def _meeting_observation(analysis_id: int, stream: str, timestamp: float) -> FaceObservation:
    """One high-engagement face of a meeting participant (track 1 of their stream)."""
    probs = _probabilities(2)
    return FaceObservation(
        analysis_id=analysis_id, stream=stream, track_id=1, timestamp=timestamp, box_x1=0.0,
        box_y1=0.0, box_x2=60.0, box_y2=80.0, detection_score=0.9, head_yaw=0.0, head_pitch=0.0,
        head_roll=0.0, engagement_p0=probs[0], engagement_p1=probs[1], engagement_p2=probs[2],
        engagement_p3=probs[3], engagement_level=2, engagement_score=sum(k * p for k, p in enumerate(probs)),
    )


def make_meeting(engine: Engine) -> int:
    """A 60 s meeting: Ada is there throughout (one sample missing at 0:20); Ben, sampled 0.3 s
    later than Ada each second, joins at 0:10, is out of view 0:30–0:35 and leaves at 0:40."""
    with session_scope(engine) as session:
        analysis = Analysis(source="janus://meet/1234", kind="meeting", title="Meeting", status=AnalysisStatus.done,
                            sample_fps=1.0, duration_seconds=60.0, frames_sampled=0, emotion_inference=False,
                            models_json=json.dumps(MODELS))
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        analysis_id = analysis.id
        ada = [float(t) for t in range(60) if t != 20]
        ben = [t + 0.3 for t in range(10, 40)]
        for stream, stamps, hidden in (("Ada", ada, set()), ("Ben", ben, {t + 0.3 for t in range(30, 35)})):
            seen = [t for t in stamps if t not in hidden]
            session.add(Student(analysis_id=analysis_id, stream=stream, track_id=1, label=stream,
                                first_seen=seen[0], last_seen=seen[-1], samples_visible=len(seen)))
            session.add_all(FrameSample(analysis_id=analysis_id, stream=stream, timestamp=t,
                                        faces=int(t not in hidden)) for t in stamps)
            session.add_all(_meeting_observation(analysis_id, stream, t) for t in seen)
        session.add(StreamStats(analysis_id=analysis_id, stream="Ada", display_name="Ada",
                                left_reason="the session ended"))
        session.add(StreamStats(analysis_id=analysis_id, stream="Ben", display_name="Ben",
                                left_reason="left the meeting (leaving)"))
    return analysis_id


def test_a_meeting_counts_time_in_the_room_and_shows_absence_as_absence(engine: Engine, tmp_path: Path) -> None:
    analysis_id = make_meeting(engine)
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    ada, ben = data.summaries
    # Ben was in the room 0:10–0:40: 30 moments, 25 of them visible; before and after is absence.
    assert (ben.samples_total, ben.samples_visible) == (30, 25)
    assert ben.visible_share == pytest.approx(25 / 30) and ben.cues.not_visible_share == pytest.approx(5 / 30)
    assert ben.seconds_in_room == pytest.approx(30.0) and ben.seconds_visible == pytest.approx(25.0)
    assert [(span.start, span.end) for span in ben.presence] == [(10.0, 40.0)]
    assert ben.left_reason == "left the meeting (leaving)"
    # One missing sample is not a leave, and not a moment of "not visible".
    assert [(span.start, span.end) for span in ada.presence] == [(0.0, 60.0)]
    assert (ada.samples_total, ada.visible_share) == (59, 1.0)
    # The class chart never dips for a sample that was not taken: share of those in the room.
    shares = [point.share_visible for point in data.overview.points]
    assert min(share for share in shares if share is not None) == pytest.approx(0.5)  # Ada alone, Ben hidden
    assert data.overview.mean_share_visible > 0.9
    paths = render_reports(engine, analysis_id, tmp_path / "out")
    ben_page = _read(paths.students[1])
    assert "In the room 0:10–0:40" in ben_page and "left the meeting (leaving)" in ben_page
    assert "0:25 of 0:30 in the room" in ben_page
    # The class heatmap (hidden in this two-student class's overview) tells absence from "not visible".
    assert "not in the room" in heatmap_svg(data.overview)


def test_summary_numbers_carry_uncertainty_and_cues(engine: Engine) -> None:
    analysis_id = make_analysis(engine)
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    by_label = {s.label: s for s in data.summaries}
    steady = by_label[STEADY]
    assert steady.mean_engagement == pytest.approx(2.7)
    assert steady.engagement_se == pytest.approx(0.0)
    dipper = by_label["Student 1"]
    assert dipper.mean_engagement is not None and dipper.engagement_se is not None
    assert dipper.engagement_se > 0
    assert dipper.engagement_low is not None and dipper.engagement_high is not None
    assert dipper.engagement_low < dipper.mean_engagement < dipper.engagement_high
    # Samples a second apart are alike: they count as fewer independent ones.
    assert dipper.effective_samples is not None and dipper.effective_samples < 60
    # Lowest moments: in the dip first, at least 10 s apart, with the lone low at 0:45; nothing that is not low.
    times = [m.timestamp for m in dipper.lowest_moments]
    assert times == [20.0, 45.0]
    assert by_label["Ana-María Núñez"].cues.looking_away_share == pytest.approx(10 / 60)
    assert by_label[STEADY].cues.eyes_closed_share == pytest.approx(5 / 60)
    assert by_label[STEADY].cues.gaze_away_share is None
    assert dipper.dominant_emotion == "happy"
    assert dict(dipper.emotion_shares or ())["sad"] == pytest.approx(10 / 60)
    # The face that never became a student is left out, and said so.
    assert data.ignored_observations == 1
    assert any("left out" in note for note in data.quality_notes)


def test_csv_has_a_row_per_student_and_moment_and_parses_back(rendered: ReportPaths) -> None:
    rows = list(csv.DictReader(io.StringIO(_read(rendered.csv))))
    assert len(rows) == len(LABELS) * SECONDS
    with rendered.csv.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == timeline_columns(emotion_enabled=True)
    half = [r for r in rows if r["student_label"] == HALF_ABSENT]
    assert len(half) == SECONDS
    assert [r["visible"] for r in half] == ["1"] * 30 + ["0"] * 30
    assert all(r["engagement_score"] == "" for r in half[30:])
    assert [float(r["timestamp"]) for r in half] == [float(t) for t in range(SECONDS)]
    assert float(half[25]["engagement_score"]) == pytest.approx(0.3)
    assert half[25]["time"] == "0:25" and half[25]["dominant_emotion"] == "sad"


def test_json_parses_and_matches_the_csv(rendered: ReportPaths) -> None:
    document = json.loads(_read(rendered.json))
    assert document["analysis"]["status"] == "done"
    assert document["analysis"]["emotion_inference"] is True
    assert document["columns"] == list(timeline_columns(emotion_enabled=True))
    assert len(document["rows"]) == len(LABELS) * SECONDS
    rows = [dict(zip(document["columns"], row, strict=True)) for row in document["rows"]]
    assert rows[0]["visible"] is True and isinstance(rows[0]["engagement_score"], float)
    absent = [r for r in rows if r["student_label"] == HALF_ABSENT and not r["visible"]]
    assert len(absent) == 30 and all(r["engagement_score"] is None for r in absent)
    csv_rows = list(csv.DictReader(io.StringIO(_read(rendered.csv))))
    for from_json, from_csv in zip(rows, csv_rows, strict=True):
        assert from_json["student_label"] == from_csv["student_label"]
        assert from_json["timestamp"] == float(from_csv["timestamp"])
        assert (from_json["engagement_score"] is None) == (from_csv["engagement_score"] == "")


def test_with_emotion_inference_off_no_emotion_appears(engine: Engine, tmp_path: Path) -> None:
    analysis_id = make_analysis(engine, emotion_inference=False)
    paths = render_reports(engine, analysis_id, tmp_path / "out")
    overview = _read(paths.overview)
    assert "Emotion inference was off" in overview
    assert "Dominant emotion" not in overview
    for page in (paths.overview, *paths.students):
        html = _read(page)
        assert 'id="emotions"' not in html
        assert "Emotion shares" not in html
        for label in EMOTION_LABELS:
            assert f">{label}<" not in html
    header = _read(paths.csv).splitlines()[0]
    assert "emotion" not in header
    assert all(not c.startswith("emotion_") for c in json.loads(_read(paths.json))["columns"])


def test_with_emotion_inference_on_the_student_report_shows_emotion_shares(
    rendered: ReportPaths,
) -> None:
    html = _read(rendered.students[0])
    assert 'id="emotions"' in html and "Emotion shares" in html
    assert "Dominant emotion" in _read(rendered.overview)


def test_the_heuristic_baseline_is_named_as_such(rendered: ReportPaths) -> None:
    overview = _read(rendered.overview)
    assert "heuristic baseline" in overview
    assert "not trained on any engagement data set" in overview
    assert "Maps head pose and eye openness to levels by fixed rules." in overview
    # The model's description is in the Models table once, not repeated word for word in the notes.
    assert overview.count("Maps head pose and eye openness to levels by fixed rules.") == 1
    assert "pose-eyes-heuristic" in overview
    assert "buffalo_l/det_10g" in overview  # every model is listed
    assert "estimates from faces" in overview
    assert "heuristic baseline" in _read(rendered.students[0])


def test_a_trained_engagement_model_gets_no_heuristic_note(engine: Engine, tmp_path: Path) -> None:
    models = {**MODELS, "engagement": {**MODELS["engagement"], "heuristic": False}}
    analysis_id = make_analysis(engine, models=models)
    html = _read(render_reports(engine, analysis_id, tmp_path / "out").overview)
    assert "not trained on any engagement data set" not in html
    # Instead, the report says which model estimated engagement, and quotes what it is.
    assert "How engagement was estimated" in html and MODELS["engagement"]["name"] in html


def test_many_short_dips_are_charted_but_only_the_longest_are_listed(
    engine: Engine, tmp_path: Path
) -> None:
    # Three students, five minutes; every 20 s all drop for 3 s (4 s at 0:40 and 2:20).
    long_dips = {40, 140}
    with session_scope(engine) as session:
        analysis = Analysis(source="quiz.webm", sample_fps=1.0, duration_seconds=300.0)
        session.add(analysis)
        session.flush()
        assert analysis.id is not None
        analysis_id = analysis.id
        for track in range(3):
            session.add(
                Student(
                    analysis_id=analysis_id,
                    track_id=track,
                    label=f"Student {track + 1}",
                    first_seen=0.0,
                    last_seen=299.0,
                    samples_visible=300,
                )
            )
            for t in range(300):
                start = t - t % 20
                low = t % 20 < (4 if start in long_dips else 3)
                probs = _probabilities(0 if low else 3)
                session.add(
                    FaceObservation(
                        analysis_id=analysis_id,
                        track_id=track,
                        timestamp=float(t),
                        box_x1=0.0,
                        box_y1=0.0,
                        box_x2=50.0,
                        box_y2=50.0,
                        detection_score=0.9,
                        head_yaw=0.0,
                        head_pitch=0.0,
                        head_roll=0.0,
                        engagement_p0=probs[0],
                        engagement_p1=probs[1],
                        engagement_p2=probs[2],
                        engagement_p3=probs[3],
                        engagement_level=0 if low else 3,
                        engagement_score=sum(k * p for k, p in enumerate(probs)),
                    )
                )
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    assert len(data.overview.disengagement_intervals) == 15
    html = _read(render_reports(engine, analysis_id, tmp_path / "out").overview)
    listed = re.findall(r"<li><strong>(\d+:\d\d–\d+:\d\d)</strong>", html)
    assert len(listed) == 10
    assert listed[:3] == ["0:00–0:03", "0:20–0:23", "0:40–0:44"]  # in class order
    assert "2:20–2:24" in listed
    assert "5 shorter ones are shaded in the chart" in html
    curve = _svgs(html)[0]
    assert curve.count("<title>Disengaged: ") == 15


def test_a_failed_analysis_renders_its_reason(engine: Engine, tmp_path: Path) -> None:
    reason = "decoder error: lecture-week3.mp4 is truncated at 0:41 <bad>"
    analysis_id = make_analysis(engine, status=AnalysisStatus.failed, failure_reason=reason)
    paths = render_reports(engine, analysis_id, tmp_path / "out")
    html = _read(paths.overview)
    assert "This analysis failed" in html
    assert "decoder error: lecture-week3.mp4 is truncated at 0:41 &lt;bad&gt;" in html
    assert "Class engagement over time" not in html
    assert paths.students == ()
    assert not (paths.folder / "students").exists()
    assert _read(paths.csv).count("\n") == 1  # header only: partial numbers are not exported
    document = json.loads(_read(paths.json))
    assert document["analysis"]["status"] == "failed"
    assert document["analysis"]["failure_reason"] == reason
    assert document["rows"] == []


def test_every_chart_is_accessible_well_formed_svg(rendered: ReportPaths) -> None:
    ns = "{http://www.w3.org/2000/svg}"
    count = 0
    for page in (rendered.overview, *rendered.students):
        svgs = _svgs(_read(page))
        assert svgs, page.name
        for svg in svgs:
            root = ET.fromstring(svg)
            count += 1
            assert root.get("role") == "img"
            title = root.find(f"{ns}title")
            desc = root.find(f"{ns}desc")
            assert title is not None and (title.text or "").strip()
            assert desc is not None and len((desc.text or "").strip()) > 40
            assert root.get("aria-labelledby") == f"{title.get('id')} {desc.get('id')}"
    assert count == 2 + 3 * len(LABELS)
    heatmap = next(s for s in _svgs(_read(rendered.overview)) if "heatmap" in s.lower())
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in heatmap


def test_pages_are_self_contained_and_printable(rendered: ReportPaths) -> None:
    for page in (rendered.overview, *rendered.students):
        html = _read(page)
        assert "@media print" in html
        assert not re.search(r'(src|href)="(https?:)?//', html), page.name
        assert "<script" not in html and "<link" not in html


# ---------------------------------------------------------------------------
# Writing the folder


def test_rendering_is_deterministic(engine: Engine) -> None:
    analysis_id = make_analysis(engine)
    with session_scope(engine) as session:
        first = render_documents(build_report_data(session, analysis_id))
    with session_scope(engine) as session:
        second = render_documents(build_report_data(session, analysis_id))
    assert first == second


def test_rerendering_replaces_the_same_analysis_and_refuses_others(
    engine: Engine, tmp_path: Path
) -> None:
    first = make_analysis(engine)
    second = make_analysis(engine, emotion_inference=False)
    out = tmp_path / "out"
    render_reports(engine, first, out)
    (out / "students" / "stale.html").write_text("old", encoding="utf-8")
    render_reports(engine, first, out)
    assert not (out / "students" / "stale.html").exists()
    before = _read(out / "index.html")
    with pytest.raises(ReportOutputError, match="analysis"):
        render_reports(engine, second, out)
    assert _read(out / "index.html") == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ReportOutputError, match="other files"):
        render_reports(engine, first, foreign)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert render_reports(engine, second, empty).overview.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_while_writing_leaves_nothing_half_written(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysis_id = make_analysis(engine)
    out = tmp_path / "out"
    render_reports(engine, analysis_id, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    original = Path.write_text

    def failing_write_text(self: Path, *args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # the third file of each render
            raise OSError("disk full")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OSError, match="disk full"):
        render_reports(engine, analysis_id, out)
    with pytest.raises(OSError, match="disk full"):
        render_reports(engine, analysis_id, tmp_path / "new")
    monkeypatch.undo()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "out"]


def test_an_unknown_analysis_is_a_clear_error(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(AnalysisNotFoundError, match="analysis 42"):
        render_reports(engine, 42, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Small pure pieces


def test_timestamps_read_like_a_video_player() -> None:
    assert format_timestamp(0) == "0:00"
    assert format_timestamp(29.9) == "0:29"
    assert format_timestamp(29.9999999999) == "0:30"
    assert format_timestamp(75) == "1:15"
    assert format_timestamp(3600) == "1:00:00"
    assert format_timestamp(3725) == "1:02:05"
    assert format_timestamp(-3) == "0:00"
    assert format_timestamp(float("nan")) == "–"
    assert format_interval(20, 30) == "0:20–0:30"


def test_slugs_are_safe_file_names() -> None:
    assert slugify(XSS) == "script-alert-1-script"
    assert slugify("Ana-María Núñez") == "ana-maria-nunez"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("李雷") == "student"


def _point(t: float, disengaged: bool) -> ClassPoint:
    return ClassPoint(
        timestamp=t,
        mean_engagement=1.0,
        band_low=None,
        band_high=None,
        students_visible=5,
        students_in_room=5,
        share_visible=1.0,
        share_disengaged=0.6 if disengaged else 0.0,
        disengaged=disengaged,
    )


def test_disengaged_moments_merge_across_short_breaks() -> None:
    flags = [t in {3, 4, 5, 7, 8, 14, 40} for t in range(50)]
    points = [_point(float(t), f) for t, f in enumerate(flags)]
    intervals = merge_moments(points, 1.0)
    assert [(iv.start, iv.end) for iv in intervals] == [(3.0, 15.0), (40.0, 41.0)]
    assert [iv.label for iv in intervals] == ["0:03–0:15", "0:40–0:41"]
    strict = merge_moments(points, 1.0, max_gap_seconds=0.0)
    assert [(iv.start, iv.end) for iv in strict] == [(3.0, 9.0), (14.0, 15.0), (40.0, 41.0)]


def test_lowest_moments_are_separate_episodes() -> None:
    samples = [
        TimelineSample(
            timestamp=float(t), visible=True, engagement_score=s, engagement_level=0, confidence=0.9
        )
        for t, s in enumerate([0.1, 0.2, 0.3] + [2.0] * 20 + [0.5] + [2.0] * 20 + [0.9])
    ]
    samples.append(TimelineSample(timestamp=99.0, visible=False))
    assert [m.timestamp for m in lowest_moments(samples)] == [0.0, 23.0, 44.0]
    # A student who was never low has no lowest moments, not their three least-high ones.
    high = [TimelineSample(timestamp=float(t), visible=True, engagement_score=2.0 + 0.01 * t, engagement_level=2,
                           confidence=0.9) for t in range(40)]
    assert lowest_moments(high) == ()


def test_mean_interval_widens_for_autocorrelated_samples() -> None:
    alternating = [0.0, 3.0] * 20
    blocky = [0.0] * 20 + [3.0] * 20
    _, se_alt, *_rest, n_alt = mean_with_interval(alternating)
    _, se_block, *_rest2, n_block = mean_with_interval(blocky)
    assert n_alt == 40
    assert n_block < 5
    assert se_alt is not None and se_block is not None and se_block > 2 * se_alt
    assert mean_with_interval([1.5])[1:] == (None, None, None, 1.0)


def test_names_that_look_like_formulas_stay_text_in_the_csv(engine: Engine, tmp_path: Path) -> None:
    from sqlalchemy import update

    analysis_id = make_analysis(engine)
    hostile = {STEADY: '=HYPERLINK("http://evil.example","click")', HALF_ABSENT: "\t=1+1"}
    with session_scope(engine) as session:
        for label, name in hostile.items():
            session.execute(update(Student).where(Student.analysis_id == analysis_id,  # type: ignore[arg-type]
                                                  Student.label == label).values(label=name))  # type: ignore[arg-type]
    paths = render_reports(engine, analysis_id, tmp_path / "report")
    rows = list(csv.DictReader(io.StringIO(_read(paths.csv))))
    labels = {row["student_label"] for row in rows}
    assert {"'" + name for name in hostile.values()} <= labels
    assert not any(label.startswith(("=", "+", "-", "@", "\t", "\r")) for label in labels)
    # Numbers are not text: a negative head angle is still written as a number.
    assert any(row["head_pitch"] == "-3.0" for row in rows)


def test_the_overview_opens_with_one_sentence_of_what_happened(rendered: ReportPaths) -> None:
    overview = _read(rendered.overview)
    sentence = overview.split('id="headline">')[1].split("</p>")[0]
    assert sentence.startswith("Engagement was ") and "on average" in sentence and "students." in sentence
    # When attention dropped most, and for how many (this class has a dip), explained beside the chart.
    dropped = r"Attention dropped most at \d+:\d\d–\d+:\d\d, when up to \d+% of the visible students"
    assert re.search(dropped, sentence), sentence
    assert 'id="dips-explained"' in overview
