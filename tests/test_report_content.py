"""Report content from real analyses of ../shared/media: trends, consent, privacy threshold, escaping, emotion off.

Each test analyses short real clips with the default models (a second or less each)
into its own SQLite store. To test what only meetings have (display names, courses),
a finished analysis is turned into the meeting the live bot would have stored: same
numbers, a display name as the label, a course.
"""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from classlens.analysis import analyze_recording
from kernel.settings import Settings
from kernel.store import Analysis, ConsentMode, FaceObservation, Student, init_store, session_scope
from pipeline.models import PipelineComponents
from reports.aggregate import build_report_data, mean_with_interval
from reports.render import ReportOptions, render_documents
from tests.conftest import MEDIA_DIR
from vision.synthetic import still_image_video

pytestmark = pytest.mark.media

XSS = "<script>alert(1)</script>"


def _settings(tmp_path: Path, models: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        model_cache_dir=models,
        execution_provider="cpu",
        sample_fps=2.0,
        **overrides,
    )


def _analyse(source: Any, settings: Settings, components: Any, out: Path) -> int:
    outcome = analyze_recording(source, settings, out_dir=out, components=components, title=out.name)
    return outcome.analysis_id


def _as_meeting(engine: Engine, analysis_id: int, *, course: str, label: str, when: datetime,
                consent: ConsentMode = ConsentMode.everyone, names: str = "[]") -> None:
    """What the meeting bot stores for a one-participant class: the participant's display name as label."""
    with session_scope(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None
        analysis.kind = "meeting"
        analysis.course = course
        analysis.created_at = when
        analysis.consent_mode = consent
        analysis.consent_names_json = names
        students = list(session.exec(select(Student).where(Student.analysis_id == analysis_id)))
        assert len(students) == 1
        students[0].label = label


def _student_page(documents: dict[str, str]) -> str:
    pages = [text for name, text in documents.items() if name.startswith("students/")]
    assert len(pages) == 1
    return pages[0]


def test_a_recording_says_consent_and_never_matches_students_across_sessions(
    tmp_path: Path, default_models: Path, components: Any
) -> None:
    settings = _settings(tmp_path, default_models)
    engine = init_store(settings.resolved_database_url)
    first = _analyse(MEDIA_DIR / "single_face.mp4", settings, components, tmp_path / "r1")
    second = _analyse(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", settings, components, tmp_path / "r2")
    with session_scope(engine) as session:
        for analysis_id in (first, second):
            row = session.get(Analysis, analysis_id)
            assert row is not None
            row.course = "Physics 101"
    with session_scope(engine) as session:
        data = build_report_data(session, second)
    # Both recordings have a "Student 1" in the same course: a number, not a person.
    assert [s.label for s in data.students] == ["Student 1"]
    assert data.trends == {}
    documents = render_documents(data, ReportOptions())
    page = _student_page(documents)
    assert "not an identity" in page and 'id="no-trend"' in page
    overview = documents["index.html"]
    assert "Consent mode" in overview and "every participant&#39;s video was analysed" in overview
    assert "Physics 101" in overview


def test_a_meeting_participant_gets_a_trend_across_earlier_sessions_of_the_course(
    tmp_path: Path, default_models: Path, components: Any
) -> None:
    settings = _settings(tmp_path, default_models)
    engine = init_store(settings.resolved_database_url)
    earlier = _analyse(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", settings, components, tmp_path / "m1")
    other_course = _analyse(MEDIA_DIR / "single_face.mp4", settings, components, tmp_path / "m2")
    current = _analyse(MEDIA_DIR / "single_face.mp4", settings, components, tmp_path / "m3")
    _as_meeting(engine, earlier, course="Physics 101", label="Ada Lovelace", when=datetime(2025, 3, 3, 9, tzinfo=UTC))
    _as_meeting(engine, other_course, course="Chemistry", label="Ada Lovelace",
                when=datetime(2025, 3, 4, 9, tzinfo=UTC))
    _as_meeting(engine, current, course="Physics 101", label="Ada Lovelace", when=datetime(2025, 3, 10, 9, tzinfo=UTC),
                consent=ConsentMode.opt_out, names='["Grace Hopper", "Alan Turing"]')
    with session_scope(engine) as session:
        data = build_report_data(session, current)
        scores = [o.engagement_score for o in session.exec(
            select(FaceObservation).where(FaceObservation.analysis_id == earlier)
            .order_by(col(FaceObservation.timestamp)))]
    (trend,) = data.trends.values()
    assert [p.analysis_id for p in trend.points] == [earlier, current]  # the other course is left out
    assert trend.points[-1].current and not trend.points[0].current
    expected_mean, _se, low, high, _n = mean_with_interval(scores)
    assert trend.points[0].mean_engagement == pytest.approx(expected_mean)
    assert trend.points[0].engagement_low == pytest.approx(low)
    assert trend.points[0].engagement_high == pytest.approx(high)
    assert trend.points[0].samples_visible == len(scores)
    assert trend.points[1].mean_engagement == pytest.approx(data.summaries[0].mean_engagement)
    documents = render_documents(data, ReportOptions())
    page = _student_page(documents)
    section = page[page.index('<section id="trend">'):page.index('<section id="visibility">')]
    assert "(this session)" in section and "2025-03-03" in section
    (svg,) = re.findall(r"<svg\b.*?</svg>", section, flags=re.DOTALL)
    root = ET.fromstring(svg)  # well-formed, with its alt text
    assert root.get("role") == "img" and "Ada Lovelace" in svg and "this session" in svg
    assert "Chemistry" not in section
    assert "never by the face" in section
    # The consent mode is named with the size of its list, never the names on it.
    assert "opt-out" in documents["index.html"] and "2 names on the list" in documents["index.html"]
    assert "Grace Hopper" not in documents["index.html"] and "Grace Hopper" not in page

    # A renamed participant is someone else as far as the report knows.
    with session_scope(engine) as session:
        renamed = session.exec(select(Student).where(Student.analysis_id == current)).one()
        renamed.label = "A. Lovelace"
    with session_scope(engine) as session:
        assert build_report_data(session, current).trends == {}


def test_a_script_tag_as_display_name_is_shown_as_text(
    tmp_path: Path, default_models: Path, components: Any
) -> None:
    settings = _settings(tmp_path, default_models)
    engine = init_store(settings.resolved_database_url)
    analysis_id = _analyse(MEDIA_DIR / "single_face.mp4", settings, components, tmp_path / "x")
    _as_meeting(engine, analysis_id, course="", label=XSS, when=datetime(2025, 3, 3, tzinfo=UTC))
    with session_scope(engine) as session:
        data = build_report_data(session, analysis_id)
    documents = render_documents(data, ReportOptions(min_students_for_class_rows=1))
    for name in ("index.html", next(n for n in documents if n.startswith("students/"))):
        html = documents[name]
        assert XSS not in html, name
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, name
        assert not re.search(r"<script\b", html), name


def test_class_views_hide_student_rows_below_the_threshold(
    tmp_path: Path, default_models: Path, components: Any
) -> None:
    settings = _settings(tmp_path, default_models)
    engine = init_store(settings.resolved_database_url)
    loaded = cv2.imread(str(MEDIA_DIR / "multi_face.jpg"))
    assert loaded is not None
    photo = np.asarray(loaded, dtype=np.uint8)
    five = _analyse(still_image_video(photo, seconds=3), settings, components, tmp_path / "five")
    one = _analyse(MEDIA_DIR / "single_face.mp4", settings, components, tmp_path / "one")
    with session_scope(engine) as session:
        class_of_five = build_report_data(session, five)
        class_of_one = build_report_data(session, one)
    assert len(class_of_five.students) == 5 and len(class_of_one.students) == 1

    shown = render_documents(class_of_five, ReportOptions(min_students_for_class_rows=5))["index.html"]
    assert 'id="heatmap"' in shown and 'href="students/1-student-1.html"' in shown
    assert 'id="rows-hidden"' not in shown

    for data, threshold in ((class_of_five, 6), (class_of_one, 5)):
        documents = render_documents(data, ReportOptions(min_students_for_class_rows=threshold))
        overview = documents["index.html"]
        assert 'id="rows-hidden"' in overview
        count = len(data.students)
        assert f"only {count} student" in overview and f"fewer than the {threshold}" in overview
        students_section = overview.split('id="students"')[1].split("</section>")[0]
        assert 'id="heatmap"' not in overview and "<tbody>" not in students_section
        # The individual reports still exist for the host, who reaches each one from the overview.
        pages = [name for name in documents if name.startswith("students/")]
        assert len(pages) == count
        links = overview.split('id="student-links"')[1].split("</p>")[0]
        assert all(f'href="{page}"' in links for page in pages)


def test_with_emotion_off_nothing_about_emotion_is_computed_stored_or_shown(
    tmp_path: Path, default_models: Path
) -> None:
    settings = _settings(tmp_path, default_models, emotion_inference=False)
    engine = init_store(settings.resolved_database_url)
    # The shared components run the emotion model; these are loaded the way a deployment with emotion off loads them.
    without_emotion = PipelineComponents.load(settings)
    analysis_id = _analyse(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", settings, without_emotion, tmp_path / "off")
    with session_scope(engine) as session:
        observations = list(session.exec(select(FaceObservation).where(FaceObservation.analysis_id == analysis_id)))
        data = build_report_data(session, analysis_id)
    assert observations and all(o.emotion_happy is None and o.emotion_neutral is None for o in observations)
    documents = render_documents(data, ReportOptions(min_students_for_class_rows=1))
    page = _student_page(documents)
    overview = documents["index.html"]
    assert 'id="emotions"' not in page and "Emotion shares" not in page
    assert "Dominant emotion" not in overview
    assert "Emotion inference was off" in overview
    # Attention cues and engagement remain.
    assert 'id="attention"' in page and "Looking away" in overview
    assert data.summaries[0].mean_engagement is not None
    header = next(csv.reader(io.StringIO(documents["timelines.csv"])))
    assert "engagement_score" in header and not [c for c in header if "emotion" in c]
