"""Models pinned to a URL: downloaded over real HTTP from a local server, verified, kept, then offline."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest

from classlens.errors import ModelSupplyError
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
