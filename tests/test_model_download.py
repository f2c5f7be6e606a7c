"""Models pinned to a URL: downloaded over real HTTP from a local server, verified, kept, then offline."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from kernel.errors import ModelSupplyError
from model_export.cache import ModelCache
from model_export.manifest import ModelSource, ModelSpec, get_spec


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and counts the requests, quietly."""

    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        del format, args

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path / 'served'``; yields its base URL and folder."""
    served = tmp_path / "served"
    served.mkdir()
    _Files.requests = []
    handler = lambda *args: _Files(*args, directory=str(served))  # noqa: E731 - the server wants a factory
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def _spec_for(url: str, sha256: str) -> ModelSpec:
    """The face-api expression entry, pointed at another URL and hash."""
    spec = get_spec("face-api-expression")
    return replace(spec, source=ModelSource(kind="url", url=url, sha256=sha256, filename="pinned.tgz"))


def test_a_url_source_is_downloaded_once_verified_and_then_works_offline(
        file_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = file_server
    payload = b"weights of a pinned model\n" * 1000
    (served / "pinned.tgz").write_bytes(payload)
    spec = _spec_for(f"{base}/pinned.tgz", hashlib.sha256(payload).hexdigest())
    cache = ModelCache(tmp_path / "cache")
    assert cache.url_source_bytes(spec) == payload
    assert _Files.requests == ["/pinned.tgz"]
    kept = tmp_path / "cache" / "archives" / "pinned.tgz"
    assert kept.read_bytes() == payload
    # Offline now: the kept file is used, the server is not asked again.
    assert cache.url_source_bytes(spec, allow_download=False) == payload
    assert _Files.requests == ["/pinned.tgz"]
    assert not list((tmp_path / "cache" / "archives").glob("*.part"))


class _Recorder:
    """A download reporter that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def started(self, what: str, total_bytes: int | None) -> None:
        self.events.append(("started", (what, total_bytes)))

    def advanced(self, received_bytes: int) -> None:
        self.events.append(("advanced", received_bytes))

    def finished(self) -> None:
        self.events.append(("finished", None))


def test_a_download_tells_the_reporter_what_comes_and_how_far_it_is(
        file_server: tuple[str, Path], tmp_path: Path) -> None:
    from model_export.download_progress import set_download_reporter

    base, served = file_server
    payload = b"x" * 700_000  # several chunks
    (served / "pinned.tgz").write_bytes(payload)
    spec = _spec_for(f"{base}/pinned.tgz", hashlib.sha256(payload).hexdigest())
    recorder = _Recorder()
    set_download_reporter(recorder)
    try:
        ModelCache(tmp_path / "cache").url_source_bytes(spec)
    finally:
        set_download_reporter(None)
    assert recorder.events[0] == ("started", ("face-api-expression (pinned.tgz)", len(payload)))
    assert recorder.events[-1] == ("finished", None)
    chunks = [n for kind, n in recorder.events if kind == "advanced"]
    assert len(chunks) > 1 and sum(chunks) == len(payload)  # type: ignore[arg-type]


def test_a_download_with_the_wrong_hash_is_refused_and_nothing_is_kept(
        file_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = file_server
    (served / "pinned.tgz").write_bytes(b"a file someone replaced upstream")
    spec = _spec_for(f"{base}/pinned.tgz", "0" * 64)
    with pytest.raises(ModelSupplyError, match="not the pinned"):
        ModelCache(tmp_path / "cache").url_source_bytes(spec)
    archives = tmp_path / "cache" / "archives"
    assert not archives.exists() or not any(archives.iterdir())


def test_an_unreachable_url_says_how_to_import_the_file_offline(tmp_path: Path) -> None:
    spec = _spec_for("http://127.0.0.1:9/pinned.tgz", "0" * 64)
    with pytest.raises(ModelSupplyError, match="classlens models import DIR"):
        ModelCache(tmp_path / "cache").url_source_bytes(spec)
    with pytest.raises(ModelSupplyError, match="downloads are off"):
        ModelCache(tmp_path / "cache").url_source_bytes(spec, allow_download=False)


def test_an_imported_folder_provides_the_file_without_any_download(tmp_path: Path) -> None:
    payload = b"offline copy"
    folder = tmp_path / "usb-stick"
    folder.mkdir()
    (folder / "pinned.tgz").write_bytes(payload)
    spec = _spec_for("http://127.0.0.1:9/pinned.tgz", hashlib.sha256(payload).hexdigest())
    data = ModelCache(tmp_path / "cache").url_source_bytes(spec, search_dirs=[folder],
                                                           allow_download=False)
    assert data == payload



@pytest.mark.network
def test_the_default_recogniser_is_pulled_from_its_pinned_url_and_runs(
        file_server: tuple[str, Path], tmp_path: Path, face_api_tarball: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel.settings import Settings
    from model_export.cache import resolve_model
    from model_export.manifest import MANIFEST
    from vision.recognition import FaceApiEmbedder, load_embedder

    assert Settings().recognizer == "face-api-recognition"
    base, served = file_server
    spec = get_spec("face-api-recognition")
    (served / "face-api-1.7.15.tgz").write_bytes(face_api_tarball)
    monkeypatch.setitem(MANIFEST, spec.name, replace(spec, source=replace(spec.source,
                                                                         url=f"{base}/face-api-1.7.15.tgz")))
    cache = ModelCache(tmp_path / "cache")
    model = resolve_model(cache, spec.name)
    assert _Files.requests == ["/face-api-1.7.15.tgz"]
    assert cache.verify(spec.name) == cache.read_meta(spec.name)["sha256"]  # type: ignore[index]
    embedder = load_embedder(model.path, spec.extra, preference="cpu")
    assert isinstance(embedder, FaceApiEmbedder)
    image = np.full((480, 640, 3), 120, np.uint8)
    keypoints = np.array([[[280, 200], [360, 200], [320, 250], [290, 300], [350, 300]]], np.float32)
    embedding = embedder.embed(image, keypoints)
    assert embedding.shape == (1, 128) and abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-5
    # A second resolve is offline: the converted model is in the cache.
    resolve_model(cache, spec.name, allow_download=False)
    assert _Files.requests == ["/face-api-1.7.15.tgz"]


@pytest.mark.network
def test_models_import_takes_the_recogniser_from_a_folder_offline(tmp_path: Path, face_api_tarball: bytes) -> None:
    folder = tmp_path / "usb-stick"
    folder.mkdir()
    (folder / get_spec("face-api-recognition").source.filename).write_bytes(face_api_tarball)
    env = {**os.environ, "CLASSLENS_MODEL_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "classlens", "models", "import", str(folder)],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "face-api-recognition: imported" in result.stdout
    assert (tmp_path / "cache" / "face-api-recognition" / "model.onnx").is_file()
