"""Conversions from a model's raw source file to the ONNX bytes the workers run.

Each conversion is a pure function ``bytes -> bytes``; heavy imports stay inside them
so that listing models does not load converters.
"""

from __future__ import annotations

from collections.abc import Callable

from kernel.errors import ModelSupplyError


def _unchanged(raw: bytes) -> bytes:
    return raw


def _retinaface_to_scrfd(raw: bytes) -> bytes:
    from model_export.retinaface import convert_retinaface_to_scrfd, extract_retinaface_onnx

    return convert_retinaface_to_scrfd(extract_retinaface_onnx(raw))


def _keras_hdf5_to_onnx(raw: bytes) -> bytes:
    from model_export.keras_hdf5 import convert_keras_hdf5_to_onnx

    return convert_keras_hdf5_to_onnx(raw)


def _face_api_expression(raw: bytes) -> bytes:
    from model_export.face_api import convert_face_api_for_runtime

    return convert_face_api_for_runtime(raw)


def _face_api_recognition(raw: bytes) -> bytes:
    from model_export.face_api_recognition import convert_face_api_recognition

    return convert_face_api_recognition(raw)


def _build_engagement_baseline(raw: bytes) -> bytes:
    del raw  # built from code, there is no source file
    from model_export.engagement_baseline import build_engagement_baseline

    return build_engagement_baseline()


def _face_landmarker_task(raw: bytes) -> bytes:
    from model_export.archives import sha256_of_bytes
    from model_export.face_landmarker import FACE_LANDMARKER_SHA256, extract_face_landmarker

    if sha256_of_bytes(raw) != FACE_LANDMARKER_SHA256:
        raise ModelSupplyError("face_landmarker.task does not have the pinned sha256")
    return extract_face_landmarker(raw)


CONVERSIONS: dict[str, Callable[[bytes], bytes]] = {
    "face_api_expression": _face_api_expression,
    "face_api_recognition": _face_api_recognition,
    "face_landmarker_task": _face_landmarker_task,
    "none": _unchanged,
    "retinaface_to_scrfd": _retinaface_to_scrfd,
    "keras_hdf5_to_onnx": _keras_hdf5_to_onnx,
    "build_engagement_baseline": _build_engagement_baseline,
}


def convert(conversion: str, raw: bytes) -> bytes:
    """Run the named conversion."""
    try:
        function = CONVERSIONS[conversion]
    except KeyError:
        raise ModelSupplyError(f"unknown conversion {conversion!r}") from None
    return function(raw)
