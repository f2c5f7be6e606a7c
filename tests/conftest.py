"""Shared fixtures and the rules for tests that need services or ../shared.

Tests marked ``media`` need ../shared (media and local models), ``postgres`` a
PostgreSQL server, ``network`` the package index (to pull pinned model archives on a
machine whose model cache is empty). When ``CI`` is set every one of them must run:
a missing service fails the run instead of skipping it. Elsewhere they skip with a
reason that says what to provide.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kernel.store import Analysis, FaceObservation, FrameSample, Student

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CLASSLENS_TEST_SHARED_DIR", REPO_ROOT.parent / "shared"))
MEDIA_DIR = SHARED_DIR / "media"
LOCAL_MODELS_DIR = SHARED_DIR / "models"
DATA_DIR = SHARED_DIR / "data"
IN_CI = bool(os.environ.get("CI"))
JANUS_BINARY = Path("/usr/bin/janus")
CHROMIUM_BINARY = shutil.which("chromium")
#: Tesseract's Latin-script model, which reads accented display names (Debian: tesseract-ocr-script-latn).
TESSERACT_LATIN = Path("/usr/share/tesseract-ocr/5/tessdata/Latin.traineddata")
POSTGRES_URL = os.environ.get(
    "CLASSLENS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require(condition: bool, reason: str) -> None:
    """Skip (or, in CI, fail) the calling test when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI requires this prerequisite: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _check_prerequisites(request: pytest.FixtureRequest) -> None:
    """Skip (or fail in CI) tests whose marker names something this machine lacks."""
    if request.node.get_closest_marker("media"):
        require(MEDIA_DIR.is_dir() and LOCAL_MODELS_DIR.is_dir(),
                f"needs ../shared/media and ../shared/models beside the repository (looked in {SHARED_DIR})")
    if request.node.get_closest_marker("postgres"):
        require(_port_open("127.0.0.1", 5432), "needs PostgreSQL on 127.0.0.1:5432 (database 'test', trust auth)")
    if request.node.get_closest_marker("redis"):
        require(_port_open("127.0.0.1", 6379), "needs Redis on 127.0.0.1:6379 (apt install redis-server)")
    if request.node.get_closest_marker("janus"):
        require(JANUS_BINARY.exists(), "needs Debian's janus package (run scripts/setup-system)")
    if request.node.get_closest_marker("browser"):
        require(CHROMIUM_BINARY is not None, "needs Debian's chromium package (run scripts/setup-system)")
    if request.node.get_closest_marker("ocr"):
        require(shutil.which("tesseract") is not None and TESSERACT_LATIN.is_file(),
                "needs Debian's tesseract-ocr and tesseract-ocr-script-latn (run scripts/setup-system)")
    if request.node.get_closest_marker("torch"):
        require(importlib.util.find_spec("torch") is not None,
                "needs PyTorch: pip install torch==2.13.0 && pip install -e '.[train]'")


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The model cache shared by the whole test run (pulled archives and converted models).

    It is the user's cache unless CLASSLENS_MODEL_CACHE_DIR points elsewhere, so a
    second run works offline.
    """
    configured = os.environ.get("CLASSLENS_MODEL_CACHE_DIR")
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "classlens" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def insightface_images() -> Path:
    """Folder of test images bundled with the insightface package (t1.jpg has six faces)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images"


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache_dir: Path) -> Iterator[Path]:
    """Point data dir and database at a temporary folder, keep the shared model cache."""
    for key in list(os.environ):
        keep = key == "CLASSLENS_MODEL_CACHE_DIR" or key.startswith("CLASSLENS_TEST_")
        if key.startswith("CLASSLENS_") and not keep:
            monkeypatch.delenv(key)
    monkeypatch.setenv("CLASSLENS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLASSLENS_MODEL_CACHE_DIR", str(model_cache_dir))
    if LOCAL_MODELS_DIR.is_dir():
        monkeypatch.setenv("CLASSLENS_LOCAL_MODELS_DIR", str(LOCAL_MODELS_DIR))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


# The defaults, and the models tests name directly (the previous defaults, still in the manifest).
DEFAULT_MODELS = ("retinaface-mnet025", "face-api-recognition", "classlens-emotion-v1", "classlens-engagement-v1",
                  "fer-mini-xception", "engagement-baseline-v1")


@pytest.fixture(scope="session")
def default_models(model_cache_dir: Path) -> Path:
    """The default models in the cache, pulled from the package index on first use."""
    from kernel.errors import ModelSupplyError
    from model_export.cache import ModelCache

    local = LOCAL_MODELS_DIR if LOCAL_MODELS_DIR.is_dir() else None
    cache = ModelCache(model_cache_dir, local_models_dir=local)
    for name in DEFAULT_MODELS:
        try:
            cache.ensure(name)
        except ModelSupplyError as exc:
            require(False, f"needs the package index to pull {name} once ({exc})")
    return model_cache_dir


@pytest.fixture(scope="session")
def components(default_models: Path) -> object:
    """The default pipeline components, loaded once for the whole run (they do not depend on the database)."""
    from kernel.settings import Settings
    from pipeline.models import PipelineComponents

    return PipelineComponents.load(Settings(model_cache_dir=default_models, execution_provider="cpu"))


@pytest.fixture(scope="session")
def face_api_tarball(model_cache_dir: Path) -> bytes:
    """The pinned face-api npm tarball, downloaded once into the shared model cache's archives."""
    from kernel.errors import ModelSupplyError
    from model_export.cache import ModelCache
    from model_export.manifest import get_spec

    try:
        return ModelCache(model_cache_dir).url_source_bytes(get_spec("face-api-recognition"))
    except ModelSupplyError as exc:
        require(False, f"needs the npm registry to download face-api once ({exc})")
        raise


def stored_analysis(analysis_id: int) -> tuple[Analysis, list[Student], list[FaceObservation], list[FrameSample]]:
    """An analysis as the default store (the isolated environment's) holds it: row, students, faces, samples."""
    from sqlmodel import select

    from kernel.settings import load_settings
    from kernel.store import Analysis, FaceObservation, FrameSample, Student, init_store, session_scope

    engine = init_store(load_settings().resolved_database_url)
    with session_scope(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None
        students = list(session.exec(select(Student).where(Student.analysis_id == analysis_id)))
        observations = list(session.exec(select(FaceObservation).where(FaceObservation.analysis_id == analysis_id)))
        samples = list(session.exec(select(FrameSample).where(FrameSample.analysis_id == analysis_id)))
    return analysis, students, observations, samples
