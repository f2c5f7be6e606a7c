"""Privacy controls, on real analyses of real media.

* Retention deletes sessions older than ``retention_days`` with every row and report folder,
  from the command line and from Celery beat through a real worker, and keeps newer ones.
* ``forget`` removes one student from every table (the test scans every column of every table)
  and from the re-rendered reports, and leaves the other students alone.
* ``emotion_inference = false`` loads no emotion model and stores no emotion value anywhere.
* The pixel scan: after a full analysis, no table has a binary column, no value is long
  enough to hold an image, no value and no file holds a run of the bytes of the face
  crops the run really produced, and no file under the run's folders is an image or array.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from sqlalchemy import Engine, inspect, text, update
from sqlalchemy.sql import sqltypes
from sqlmodel import col, select
from typer.testing import CliRunner

from classlens.analysis import AnalysisOutcome, analyze_recording
from classlens.cli import app as cli_app
from classlens.privacy import forget_student, per_student_tables, run_retention
from kernel.settings import Settings, load_settings
from kernel.store import (
    Analysis,
    AuditEvent,
    FaceObservation,
    FrameSample,
    Student,
    init_store,
    session_scope,
    utcnow,
)
from kernel.types import CropBatch, FrameDetections, VideoFrame
from tests.conftest import MEDIA_DIR, POSTGRES_URL, REPO_ROOT, require
from tests.processes import stop_process_group
from vision.synthetic import demo_classroom_video

pytestmark = pytest.mark.media

#: Longest text a column may hold: far more than any label, reason or JSON of model names,
#: far less than the smallest image (a 112×112 crop is 37 632 bytes raw).
MAX_VALUE_CHARS = 4096
#: Length of the runs of crop bytes searched for.
RUN_BYTES = 64

#: Signatures of image and array files, searched at the start of every file.
IMAGE_FILE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"\x93NUMPY",
                    b"II*\x00", b"MM\x00*", b"P5\n", b"P6\n")
#: Signatures long or specific enough to search anywhere in a file without matching by chance.
EMBEDDED_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"JFIF\x00", b"Exif\x00\x00", b"GIF89a", b"GIF87a", b"WEBPVP8",
                        b"\x93NUMPY", b"data:image/")


def _analyze(source: Path | io.BytesIO, out_dir: Path, components: Any = None, **overrides: Any) -> AnalysisOutcome:
    settings = load_settings(**overrides)
    return analyze_recording(source, settings, out_dir=out_dir, components=components, title="privacy test")


def _engine() -> Engine:
    return init_store(load_settings().resolved_database_url)


def _all_rows(engine: Engine) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every row of every table of the real database (not only the tables this code knows)."""
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')).mappings():
                yield table, dict(row)


def _rows_of_analysis(engine: Engine, analysis_id: int) -> dict[str, int]:
    """Rows per table that belong to an analysis (its own row included)."""
    counts: dict[str, int] = {}
    for table, row in _all_rows(engine):
        if row.get("analysis_id") == analysis_id or (table == "analysis" and row["id"] == analysis_id):
            counts[table] = counts.get(table, 0) + 1
    return counts


# --- retention ------------------------------------------------------------------------------------------------


def test_retention_deletes_old_sessions_with_everything_derived_and_keeps_new_ones(
    isolated_env: Path, components: Any
) -> None:
    old = _analyze(MEDIA_DIR / "single_face.mp4", isolated_env / "old-report", components, sample_fps=2)
    new = _analyze(MEDIA_DIR / "single_face.mp4", isolated_env / "new-report", components, sample_fps=2)
    engine = _engine()
    with session_scope(engine) as session:
        session.execute(update(Analysis).where(col(Analysis.id) == old.analysis_id)
                        .values(created_at=utcnow() - timedelta(days=200)))
    old_rows = _rows_of_analysis(engine, old.analysis_id)
    assert old_rows.get("faceobservation", 0) > 0 and old_rows.get("student", 0) == 1
    new_rows = _rows_of_analysis(engine, new.analysis_id)
    runner = CliRunner()

    # Retention off keeps everything, however old.
    result = run_retention(engine, load_settings(retention_days=0))
    assert result.deleted_analysis_ids == [] and result.cutoff is None

    dry = runner.invoke(cli_app, ["retention", "run", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.split() == [str(old.analysis_id)]
    assert _rows_of_analysis(engine, old.analysis_id) == old_rows
    assert (isolated_env / "old-report" / "index.html").is_file()

    done = runner.invoke(cli_app, ["retention", "run"])
    assert done.exit_code == 0, done.output
    assert "deleted 1 session" in done.output
    assert _rows_of_analysis(engine, old.analysis_id) == {}
    assert not (isolated_env / "old-report").exists()
    # The newer session is untouched: same rows, same report.
    assert _rows_of_analysis(engine, new.analysis_id) == new_rows
    assert (isolated_env / "new-report" / "index.html").is_file()
    with session_scope(engine) as session:
        events = list(session.exec(select(AuditEvent).where(col(AuditEvent.action) == "deleted")))
    assert [(e.actor_email, e.target_kind, e.target_id) for e in events] == [
        ("system", "session", str(old.analysis_id))]

    # A second run has nothing left to do.
    again = runner.invoke(cli_app, ["retention", "run"])
    assert again.exit_code == 0 and "deleted 0 session" in again.output


def test_retention_keeps_a_report_folder_that_belongs_to_another_session(isolated_env: Path, components: Any) -> None:
    outcome = _analyze(MEDIA_DIR / "single_face.mp4", isolated_env / "report", components, sample_fps=2)
    engine = _engine()
    unrelated = isolated_env / "teacher-notes"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("not a report")
    with session_scope(engine) as session:
        session.execute(update(Analysis).where(col(Analysis.id) == outcome.analysis_id)
                        .values(created_at=utcnow() - timedelta(days=400), report_path=str(unrelated)))
    result = run_retention(engine, load_settings(retention_days=365))
    assert result.deleted_analysis_ids == [outcome.analysis_id]
    assert result.deleted_report_dirs == []
    assert (unrelated / "notes.txt").read_text() == "not a report"
    assert _rows_of_analysis(engine, outcome.analysis_id) == {}


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1.0):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        stop_process_group(process, grace_seconds=20)


@pytest.mark.redis
def test_celery_beat_runs_retention_on_a_worker(isolated_env: Path, components: Any) -> None:
    require(_redis_up(), "needs Redis on 127.0.0.1:6379")
    outcome = _analyze(MEDIA_DIR / "single_face.mp4", isolated_env / "report", components, sample_fps=2)
    engine = _engine()
    with session_scope(engine) as session:
        session.execute(update(Analysis).where(col(Analysis.id) == outcome.analysis_id)
                        .values(created_at=utcnow() - timedelta(days=31)))
    # A queue of its own: no other test's worker takes the job, and this worker takes no other job.
    queue = f"privacy-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "CLASSLENS_BROKER_URL": "redis://127.0.0.1:6379/14", "CLASSLENS_RETENTION_DAYS": "30",
           "CLASSLENS_RETENTION_INTERVAL_HOURS": "0.0005", "CLASSLENS_MAINTENANCE_QUEUE": queue}
    classlens = [sys.executable, "-m", "classlens"]
    with (_process([*classlens, "worker", "--queues", queue], env, isolated_env / "worker.log"),
          _process([*classlens, "retention", "beat"], env, isolated_env / "beat.log")):
        deadline = time.monotonic() + 90
        while _rows_of_analysis(engine, outcome.analysis_id) and time.monotonic() < deadline:
            time.sleep(0.5)
    logs = (isolated_env / "worker.log").read_text(errors="replace")[-3000:] + (
        isolated_env / "beat.log").read_text(errors="replace")[-3000:]
    assert _rows_of_analysis(engine, outcome.analysis_id) == {}, logs
    assert not (isolated_env / "report").exists()


# --- forget ---------------------------------------------------------------------------------------------------


def test_forget_removes_one_student_from_every_table_and_the_reports(isolated_env: Path, components: Any) -> None:
    outcome = _analyze(demo_classroom_video(), isolated_env / "report", components)
    engine = _engine()
    with session_scope(engine) as session:
        students = list(session.exec(select(Student).where(col(Student.analysis_id) == outcome.analysis_id)))
    assert len(students) == 7
    target = next(s for s in students if s.label == "Student 5")
    others = [s for s in students if s is not target]
    frames_before = _rows_of_analysis(engine, outcome.analysis_id)["framesample"]
    assert "Student 5" in (isolated_env / "report" / "index.html").read_text()

    runner = CliRunner()
    declined = runner.invoke(cli_app, ["forget", "--session", str(outcome.analysis_id), "--student", "Student 5"],
                             input="n\n")
    assert declined.exit_code == 1
    assert any(row.get("label") == "Student 5" for _, row in _all_rows(engine))
    unknown = runner.invoke(cli_app, ["forget", "--session", str(outcome.analysis_id), "--student", "Student 99",
                                      "--yes"])
    assert unknown.exit_code == 2 and "no student 'Student 99'" in unknown.output

    done = runner.invoke(cli_app, ["forget", "--session", str(outcome.analysis_id), "--student", "Student 5",
                                   "--yes"])
    assert done.exit_code == 0, done.output

    # No trace in any column of any table: not the label, not the track's rows.
    for table, row in _all_rows(engine):
        for column, value in row.items():
            assert not (isinstance(value, str) and "Student 5" in value), (table, column, value)
        if row.get("analysis_id") == outcome.analysis_id and "track_id" in row:
            assert row["track_id"] != target.track_id, (table, row)
    # The other students keep every row; the frame counts (shared by the whole recording) stay.
    with session_scope(engine) as session:
        for student in others:
            observations = session.exec(select(FaceObservation).where(
                col(FaceObservation.analysis_id) == outcome.analysis_id,
                col(FaceObservation.track_id) == student.track_id)).all()
            assert len(observations) == student.samples_visible
        remaining = session.exec(select(Student).where(col(Student.analysis_id) == outcome.analysis_id)).all()
        assert sorted(s.label for s in remaining) == sorted(s.label for s in others)
        assert len(session.exec(select(FrameSample).where(
            col(FrameSample.analysis_id) == outcome.analysis_id)).all()) == frames_before
        event = session.exec(select(AuditEvent).where(col(AuditEvent.target_kind) == "student")).one()
    assert event.action == "deleted" and event.target_id == str(outcome.analysis_id)
    # The reports were rendered again without the student.
    report_files = [p for p in (isolated_env / "report").rglob("*") if p.is_file()]
    assert len(list((isolated_env / "report" / "students").iterdir())) == 6
    for path in report_files:
        assert "Student 5" not in path.read_text(encoding="utf-8", errors="replace"), path
    assert "Student 4" in (isolated_env / "report" / "index.html").read_text()


def test_per_student_tables_are_found_in_the_schema() -> None:
    by_track, by_stream = per_student_tables()
    assert {"faceobservation", "segmenttrack"} <= {t.name for t in by_track}
    assert "framesample" in {t.name for t in by_stream}
    # Every table that names an analysis and a stream or track is covered by one of the two lists.
    from sqlmodel import SQLModel

    covered = {t.name for t in (*by_track, *by_stream)} | {"student"}
    for table in SQLModel.metadata.sorted_tables:
        names = set(table.columns.keys())
        if "analysis_id" in names and names & {"stream", "track_id"}:
            assert table.name in covered


def test_forget_refuses_a_running_session(isolated_env: Path) -> None:
    engine = _engine()
    with session_scope(engine) as session:
        analysis = Analysis(source="live", kind="meeting")
        session.add(analysis)
        session.flush()
        analysis_id = analysis.id
    assert analysis_id is not None
    from kernel.errors import BadInputError

    with pytest.raises(BadInputError, match="still running"):
        forget_student(engine, load_settings(), analysis_id, "Ada")
    with pytest.raises(BadInputError, match="no session"):
        forget_student(engine, load_settings(), analysis_id + 100, "Ada")


# --- emotion inference off ------------------------------------------------------------------------------------


def test_emotion_inference_off_loads_no_emotion_model_and_stores_no_emotion(
    isolated_env: Path, default_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoEmotionModel:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("an emotion model was loaded although emotion inference is off")

    import pipeline.models
    import workers.runners

    monkeypatch.setattr(pipeline.models, "EmotionRunner", NoEmotionModel)
    monkeypatch.setattr(workers.runners, "EmotionRunner", NoEmotionModel)
    monkeypatch.setenv("CLASSLENS_EMOTION_INFERENCE", "false")
    outcome = _analyze(MEDIA_DIR / "single_face.mp4", isolated_env / "report", sample_fps=4,
                       execution_provider="cpu")
    assert outcome.students == 1
    engine = _engine()
    emotion_values = 0
    observations = 0
    for table, row in _all_rows(engine):
        if table == "faceobservation":
            observations += 1
            assert row["engagement_level"] is not None
        for column, value in row.items():
            if column.startswith("emotion_") and column != "emotion_inference":
                emotion_values += value is not None
            assert not (isinstance(value, str) and Settings().emotion_model in value), (table, column)
    assert observations > 0 and emotion_values == 0
    with session_scope(engine) as session:
        analysis = session.get(Analysis, outcome.analysis_id)
        assert analysis is not None and analysis.emotion_inference is False
    report = isolated_env / "report"
    assert "emotion" not in (report / "timelines.csv").read_text().splitlines()[0]
    for page in (report / "students").iterdir():
        html = page.read_text()
        assert 'id="emotions"' not in html and 'id="emotion-off"' in html



def test_emotion_off_holds_even_with_models_loaded_for_emotion(
    isolated_env: Path, components: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process that loaded its models with emotion on (a long-lived server, a test) must not
    # compute or store emotion for a session whose settings switch it off.
    assert components.models.emotion is not None
    monkeypatch.setenv("CLASSLENS_EMOTION_INFERENCE", "false")
    outcome = _analyze(MEDIA_DIR / "single_face.mp4", isolated_env / "report", components=components, sample_fps=2)
    engine = _engine()
    emotion_values = [value for table, row in _all_rows(engine) if table == "faceobservation"
                      for column, value in row.items() if column.startswith("emotion_")]
    assert emotion_values and all(value is None for value in emotion_values)
    with session_scope(engine) as session:
        analysis = session.get(Analysis, outcome.analysis_id)
        assert analysis is not None and "emotion" not in json.loads(analysis.models_json)

# --- the pixel scan -------------------------------------------------------------------------------------------


def _crop_runs(crops: list[np.ndarray[Any, Any]]) -> list[bytes]:
    """64-byte runs of real crop bytes, varied enough that they cannot occur by chance."""
    runs: list[bytes] = []
    for crop in crops:
        raw = crop.tobytes()
        for offset in range(0, len(raw) - RUN_BYTES, 2048):
            run = raw[offset:offset + RUN_BYTES]
            if len(set(run)) >= 16:
                runs.append(run)
    return runs


def _pixel_findings_in_file(path: Path, runs: list[bytes]) -> list[str]:
    data = path.read_bytes()
    findings = [f"{path}: starts like an image or array ({magic!r})"
                for magic in IMAGE_FILE_MAGIC if data.startswith(magic)]
    findings += [f"{path}: holds {magic!r}" for magic in EMBEDDED_IMAGE_MAGIC if magic in data]
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        findings.append(f"{path}: is a WebP image")
    findings += [f"{path}: holds a run of crop bytes" for run in runs if run in data][:1]
    return findings


def _pixel_findings_in_files(folders: list[Path], runs: list[bytes]) -> list[str]:
    findings: list[str] = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                findings += _pixel_findings_in_file(path, runs)
    return findings


def _pixel_findings_in_database(engine: Engine, runs: list[bytes]) -> list[str]:
    findings: list[str] = []
    inspector = inspect(engine)
    for table in inspector.get_table_names():
        for column in inspector.get_columns(table):
            kind = column["type"]
            if isinstance(kind, sqltypes._Binary) or any(
                    name in str(kind).upper() for name in ("BLOB", "BYTEA", "BINARY")):
                findings.append(f"{table}.{column['name']} is a binary column ({kind})")
    for table, row in _all_rows(engine):
        for column, value in row.items():
            if isinstance(value, bytes | bytearray | memoryview):
                findings.append(f"{table}.{column} holds bytes")
            elif isinstance(value, str):
                if len(value) > MAX_VALUE_CHARS:
                    findings.append(f"{table}.{column} holds {len(value)} characters")
                encodings = [value.encode("utf-8", "surrogateescape")]
                with contextlib.suppress(UnicodeEncodeError):
                    encodings.append(value.encode("latin-1"))
                if any(run in encoded for encoded in encodings for run in runs):
                    findings.append(f"{table}.{column} holds a run of crop bytes")
    return findings


def _scanned_temporary_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send every temporary file of the run into a folder under ``root``, which the scan covers."""
    run_tmp = root / "tmp"
    run_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(run_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(run_tmp))
    return run_tmp


def _capture_crops(monkeypatch: pytest.MonkeyPatch, limit: int) -> list[np.ndarray[Any, Any]]:
    """Keep copies of the first real crops that the capture pipeline makes during the run."""
    import pipeline.capture

    captured: list[np.ndarray[Any, Any]] = []
    real_crop_batch_for = pipeline.capture.crop_batch_for

    def capturing_crop_batch_for(analysis_id: int, frame: VideoFrame, detections: FrameDetections) -> CropBatch:
        batch = real_crop_batch_for(analysis_id, frame, detections)
        captured.extend(crop.copy() for crop in batch.crops[: max(0, limit - len(captured))])
        return batch

    monkeypatch.setattr(pipeline.capture, "crop_batch_for", capturing_crop_batch_for)
    return captured


def test_pixel_scan_finds_no_frame_or_crop_on_disk_or_in_the_database(
    isolated_env: Path, components: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_tmp = _scanned_temporary_folder(isolated_env, monkeypatch)
    captured = _capture_crops(monkeypatch, limit=60)
    outcome = _analyze(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", isolated_env / "data" / "reports" / "lecture",
                       components, sample_fps=1)
    assert outcome.faces_detected > 0 and len(captured) >= 10
    runs = _crop_runs(captured)
    assert len(runs) >= 100
    engine = _engine()
    settings = load_settings()
    folders = [isolated_env]  # data dir (database, reports), the run's temporary folder, the working folder
    assert settings.data_dir.is_relative_to(isolated_env) and run_tmp.is_relative_to(isolated_env)

    assert _pixel_findings_in_database(engine, runs) == []
    assert _pixel_findings_in_files(folders, runs) == []

    # The scan itself sees pixels where there are some: an encoded crop, raw crop bytes, a
    # crop stored in a text column.
    canary = isolated_env.parent / f"{isolated_env.name}-canary"
    canary.mkdir()
    ok, png = cv2.imencode(".png", captured[0])
    assert ok
    (canary / "face.png").write_bytes(png.tobytes())
    (canary / "face.bin").write_bytes(b"header" + captured[1].tobytes())
    assert len(_pixel_findings_in_files([canary], runs)) >= 2
    with session_scope(engine) as session:
        session.add(AuditEvent(action="canary", detail=captured[2].tobytes().decode("latin-1")))
    assert _pixel_findings_in_database(engine, runs)


@pytest.mark.postgres
def test_no_table_has_a_binary_column_on_postgresql() -> None:
    engine = init_store(POSTGRES_URL)
    try:
        inspector = inspect(engine)
        for table in inspector.get_table_names():
            for column in inspector.get_columns(table):
                assert "BYTEA" not in str(column["type"]).upper(), (table, column["name"])
    finally:
        engine.dispose()


def test_settings_validate_retention() -> None:
    with pytest.raises(Exception, match="retention_days"):
        Settings(retention_days=-1)
    assert Settings(retention_days=0).retention_days == 0


# --- a live session: pixel scan and forgetting a meeting participant ------------------------------------------


async def test_live_session_keeps_no_pixels_and_forget_removes_a_participant_everywhere(
    isolated_env: Path, components: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from bot.live import LiveSession, ReplayVideoTrack, create_live_analysis, decode_video_frames
    from kernel.consent import ConsentPolicy

    _scanned_temporary_folder(isolated_env, monkeypatch)
    captured = _capture_crops(monkeypatch, limit=60)
    settings = load_settings(sample_fps=2.0, min_student_seconds=1.0, execution_provider="cpu", batch_size=8)
    engine = init_store(settings.resolved_database_url)
    analysis_id = create_live_analysis(engine, settings, source="janus://room/1234", title="Physics", owner_id=None,
                                       course="PHY1", host_email="t@example.org",
                                       consent=ConsentPolicy.opt_in(["Ada Lovelace", "Bob Builder"]))
    session = LiveSession(settings, engine, analysis_id, components=components)
    await session.start()
    ada = ReplayVideoTrack(decode_video_frames(MEDIA_DIR / "single_face.mp4", limit=48), 15, seconds=3.0)
    bob = ReplayVideoTrack(decode_video_frames(MEDIA_DIR / "WolfgangLanger_Pexels.mp4", limit=48), 15, seconds=3.0)
    assert session.add_participant("p1", "Ada Lovelace", ada)
    assert session.add_participant("p2", "Bob Builder", bob)
    await asyncio.sleep(3.5)
    outcome = await session.aclose()
    assert outcome.students == 2 and len(captured) >= 6

    runs = _crop_runs(captured)
    assert runs
    assert _pixel_findings_in_database(engine, runs) == []
    assert _pixel_findings_in_files([isolated_env], runs) == []

    # Forgetting a participant removes their stream from every per-stream table too (stream statistics,
    # sampled frames), and their name from the consent list; the other participant keeps everything.
    bob_rows = {table: count for table, count in _rows_of_stream(engine, analysis_id, "Bob Builder").items()}
    assert bob_rows.get("streamstats") == 1 and bob_rows.get("framesample", 0) > 0
    forget_student(engine, settings, analysis_id, "Ada Lovelace")
    for table, row in _all_rows(engine):
        for column, value in row.items():
            assert not (isinstance(value, str) and "ada lovelace" in value.casefold()), (table, column, value)
    assert _rows_of_stream(engine, analysis_id, "Bob Builder") == bob_rows


def _rows_of_stream(engine: Engine, analysis_id: int, stream: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table, row in _all_rows(engine):
        if row.get("analysis_id") == analysis_id and row.get("stream") == stream:
            counts[table] = counts.get(table, 0) + 1
    return counts
