import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, inspect, text
from sqlalchemy.engine import make_url
from sqlmodel import select

from kernel.store import (
    Analysis,
    AnalysisStatus,
    ConsentMode,
    EmailStatus,
    FaceObservation,
    TokenScope,
    User,
    add_missing_columns,
    init_store,
    session_scope,
)
from kernel.types import CropBatch, FaceAnalysisBatch
from tests.conftest import POSTGRES_URL
from workers.persistence import store_face_results


def _batch(analysis_id: int, count: int = 4) -> tuple[CropBatch, FaceAnalysisBatch]:
    rng = np.random.default_rng(1)
    batch = CropBatch(
        analysis_id=analysis_id, streams=("main",) * count, track_ids=np.arange(count, dtype=np.int64),
        timestamps=np.full(count, 3.0), crops=np.zeros((count, 112, 112, 3), np.uint8),
        boxes=rng.random((count, 4), dtype=np.float32), detection_scores=np.full(count, 0.9, np.float32),
        head_pose=np.zeros((count, 3), np.float32),
    )
    engagement = rng.random((count, 4)).astype(np.float32)
    engagement /= engagement.sum(axis=1, keepdims=True)
    emotions = rng.random((count, 7)).astype(np.float32)
    results = FaceAnalysisBatch(emotion_probabilities=emotions / emotions.sum(axis=1, keepdims=True),
                                eyes_closed=None, gaze_away=None, engagement_probabilities=engagement)
    return batch, results


def _check_idempotent(url: str) -> None:
    engine = init_store(url)
    with session_scope(engine) as session:
        analysis = Analysis(source=f"test-{uuid.uuid4()}")
        session.add(analysis)
        session.flush()
        analysis_id = analysis.id
    assert analysis_id is not None
    batch, results = _batch(analysis_id)
    store_face_results(engine, batch, results)
    store_face_results(engine, batch, results)  # a retried batch
    with session_scope(engine) as session:
        count = session.exec(select(func.count()).select_from(FaceObservation)
                             .where(FaceObservation.analysis_id == analysis_id)).one()
        rows = session.exec(select(FaceObservation).where(FaceObservation.analysis_id == analysis_id)).all()
    assert count == 4
    for row in rows:
        total = row.engagement_p0 + row.engagement_p1 + row.engagement_p2 + row.engagement_p3
        assert total == pytest.approx(1.0, abs=1e-5)
        assert 0 <= row.engagement_level <= 3
        assert row.emotion_happy is not None
    # Once the producer has given up, a late batch (a worker that was behind) adds nothing.
    with session_scope(engine) as session:
        failed = session.get(Analysis, analysis_id)
        assert failed is not None
        failed.status = AnalysisStatus.failed
    late = dataclasses.replace(batch, timestamps=np.full(len(batch), 9.0))
    assert store_face_results(engine, late, results) == 0
    with session_scope(engine) as session:
        assert session.exec(select(func.count()).select_from(FaceObservation)
                            .where(FaceObservation.analysis_id == analysis_id)).one() == 4


def test_retried_batches_are_stored_once_in_sqlite(tmp_path: Path) -> None:
    _check_idempotent(f"sqlite:///{tmp_path / 'store.sqlite3'}")


@pytest.mark.postgres
def test_retried_batches_are_stored_once_in_postgres() -> None:
    _check_idempotent(POSTGRES_URL)


def test_no_column_can_hold_pixels(tmp_path: Path) -> None:
    engine = init_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    with engine.connect() as connection:
        tables = [r[0] for r in connection.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))]
        for table in tables:
            for column in connection.execute(text(f"PRAGMA table_info('{table}')")):
                assert "BLOB" not in str(column[2]).upper(), f"{table}.{column[1]} could hold pixels"


def _check_upgrade_adds_columns(url: str) -> None:
    # A store made by an earlier release lacks the columns added since; the next start adds them.
    engine = init_store(url)
    with session_scope(engine) as session:
        session.add(Analysis(source="made before the upgrade", title="old"))
        session.add(User(email="old@school.example", password_hash="x"))
    with engine.begin() as connection:
        # (owner_id stays: SQLite cannot drop a column that carries a foreign key.)
        connection.execute(text("DROP INDEX ix_analysis_course"))
        for column in ("course", "consent_mode", "email_status", "host_email"):
            connection.execute(text(f'ALTER TABLE analysis DROP COLUMN "{column}"'))
        for column in ("disabled", "session_epoch", "api_token_scope", "api_token_expires_at"):
            connection.execute(text(f'ALTER TABLE "user" DROP COLUMN "{column}"'))
    engine.dispose()

    engine = init_store(url)
    with session_scope(engine) as session:
        (old,) = session.exec(select(Analysis).where(Analysis.title == "old")).all()
        assert old.course == "" and old.consent_mode is ConsentMode.everyone
        assert old.email_status is EmailStatus.not_sent and old.host_email is None
        user = session.exec(select(User).where(User.email == "old@school.example")).one()
        assert user.disabled is False and user.session_epoch == 0
        assert user.api_token_scope is TokenScope.full and user.api_token_expires_at is None
        session.add(Analysis(source="made after the upgrade", course="PHY1", consent_mode=ConsentMode.opt_in))
    with session_scope(engine) as session:
        (new,) = session.exec(select(Analysis).where(Analysis.course == "PHY1")).all()
        assert new.consent_mode is ConsentMode.opt_in
    assert add_missing_columns(engine) == []  # nothing left to add
    assert "ix_analysis_course" in {index["name"] for index in inspect(engine).get_indexes("analysis")}
    engine.dispose()


def test_an_older_sqlite_store_gets_the_new_columns(tmp_path: Path) -> None:
    _check_upgrade_adds_columns(f"sqlite:///{tmp_path / 'store.sqlite3'}")


@pytest.mark.postgres
def test_an_older_postgres_store_gets_the_new_columns() -> None:
    # A database of its own, so dropping columns never disturbs the shared test database.
    name = f"classlens_upgrade_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        _check_upgrade_adds_columns(str(make_url(POSTGRES_URL).set(database=name)))
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
