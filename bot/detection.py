"""Face detection through insightface's model-zoo detector classes.

Every configuration detects with insightface: the default RetinaFace export (which
insightface's ``SCRFD`` class loads), SCRFD files such as ``det_500m.onnx``, or the
detector of an insightface model pack folder. insightface's results are converted at
this boundary into :class:`~classlens.types.FrameDetections`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from classlens.errors import ModelSupplyError
from classlens.runtime import log_providers, select_providers, session_options
from classlens.types import FrameDetections, VideoFrame

logger = logging.getLogger(__name__)


def find_pack_model(folder: Path, taskname: str, *, preference: str = "cpu", intra_op_threads: int = 0) -> Any:
    """Load the model of an insightface model-pack folder that serves ``taskname``."""
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise ModelSupplyError(f"{folder}: no .onnx files in this model folder")
    for path in files:
        model = _load_zoo_model(path, preference, intra_op_threads)
        if model is not None and getattr(model, "taskname", None) == taskname:
            return model
    raise ModelSupplyError(f"{folder}: none of {[p.name for p in files]} is a {taskname} model")


def _load_zoo_model(path: Path, preference: str, intra_op_threads: int) -> Any:
    from insightface.model_zoo import model_zoo

    try:
        return model_zoo.get_model(
            str(path), providers=select_providers(preference), sess_options=session_options(intra_op_threads)
        )
    except Exception as exc:  # insightface raises assertion and runtime errors alike
        raise ModelSupplyError(f"{path}: insightface cannot load this model ({exc})") from None


class FaceDetector:
    """Detects every face in a frame with an insightface detector and returns typed detections."""

    def __init__(
        self,
        model_path: Path,
        *,
        input_size: int = 640,
        threshold: float = 0.5,
        min_face_pixels: int = 20,
        preference: str = "auto",
        intra_op_threads: int = 0,
    ) -> None:
        if model_path.is_dir():
            model = find_pack_model(model_path, "detection", preference=preference,
                                    intra_op_threads=intra_op_threads)
        else:
            model = _load_zoo_model(model_path, preference, intra_op_threads)
        if model is None or getattr(model, "taskname", None) != "detection":
            raise ModelSupplyError(f"{model_path}: insightface does not see a face detector in this file")
        if not getattr(model, "use_kps", False):
            raise ModelSupplyError(
                f"{model_path}: the detector has no keypoint outputs; ClassLens needs five keypoints"
            )
        model.prepare(-1 if preference == "cpu" else 0, input_size=(input_size, input_size), det_thresh=threshold)
        self._model = model
        self.model_path = model_path
        self.threshold = threshold
        self.min_face_pixels = min_face_pixels
        self.providers = log_providers(model.session, f"face detector {model_path.name}")
        self._warm_up(input_size)

    def _warm_up(self, input_size: int) -> None:
        """Run once so the first real frame does not pay for session initialisation."""
        self._model.detect(np.zeros((input_size, input_size, 3), np.uint8))

    def detect(self, frame: VideoFrame) -> FrameDetections:
        """Every face in the frame, largest-first order not guaranteed."""
        boxes_scores, keypoints = self._model.detect(frame.image)
        if boxes_scores.shape[0] == 0 or keypoints is None:
            return FrameDetections.empty(frame.stream, frame.timestamp, frame.size)
        boxes = np.ascontiguousarray(boxes_scores[:, :4], dtype=np.float32)
        height, width = frame.size
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        detections = FrameDetections(
            stream=frame.stream,
            timestamp=frame.timestamp,
            frame_size=frame.size,
            boxes=boxes,
            scores=np.ascontiguousarray(boxes_scores[:, 4], dtype=np.float32),
            keypoints=np.ascontiguousarray(keypoints, dtype=np.float32).reshape(-1, 5, 2),
        )
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return detections.select(sides >= self.min_face_pixels)
