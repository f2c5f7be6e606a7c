"""Face detection through insightface's model-zoo detector classes.

Every configuration detects with insightface: the default RetinaFace export (which
insightface's ``SCRFD`` class loads), SCRFD files such as ``det_500m.onnx``, or the
detector of an insightface model pack folder. insightface's results are converted at
this boundary into :class:`~kernel.types.FrameDetections`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from kernel.errors import ModelSupplyError
from kernel.runtime import log_providers, select_providers, session_options
from kernel.types import FrameDetections, VideoFrame

logger = logging.getLogger(__name__)


#: Words for insightface's task names in error messages.
_TASK_WORDS = {"detection": "face detector", "recognition": "face-embedding model"}


def load_insightface_model(path: Path, taskname: str, *, preference: str = "auto", intra_op_threads: int = 0) -> Any:
    """Load an insightface model-zoo model for ``taskname`` from an ONNX file or a model-pack folder.

    insightface routes a file to its class (``SCRFD``, ``ArcFaceONNX``…) by the model's
    inputs and outputs; in a folder, the first file routed to ``taskname`` is used.
    """
    files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    if not files:
        raise ModelSupplyError(f"{path}: no .onnx files in this model folder")
    for candidate in files:
        model = _load_zoo_model(candidate, preference, intra_op_threads)
        if model is not None and getattr(model, "taskname", None) == taskname:
            return model
    what = _TASK_WORDS.get(taskname, taskname)
    where = "this folder" if path.is_dir() else "this file"
    raise ModelSupplyError(f"{path}: insightface does not see a {what} in {where}")


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
        model = load_insightface_model(model_path, "detection", preference=preference,
                                       intra_op_threads=intra_op_threads)
        if not getattr(model, "use_kps", False):
            raise ModelSupplyError(
                f"{model_path}: the detector has no keypoint outputs; ClassLens needs five keypoints"
            )
        model.prepare(-1 if preference == "cpu" else 0, input_size=(input_size, input_size), det_thresh=threshold)
        self._model = model
        self.input_size = input_size
        # Models with a fixed input (scrfd_2.5g: 640×640) cannot follow the frame's aspect ratio.
        self._fixed_input = getattr(model, "static_input_size", None) is not None
        self.model_path = model_path
        self.threshold = threshold
        self.min_face_pixels = min_face_pixels
        self.providers = log_providers(model.session, f"face detector {model_path.name}")
        self._warm_up(input_size)

    def _warm_up(self, input_size: int) -> None:
        """Run once so the first real frame does not pay for session initialisation."""
        self._model.detect(np.zeros((input_size, input_size, 3), np.uint8))

    def input_size_for(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """Detector input (width, height) for a frame, keeping its aspect ratio.

        The long side is ``input_size``, the short side scaled and rounded up to a multiple of 32.
        A 16:9 frame letterboxed into a square would spend 44 % of the detector's work on padding.
        """
        height, width = frame_size
        long_side = self.input_size
        if width >= height:
            short = min(long_side, max(32, -(-round(long_side * height / max(width, 1)) // 32) * 32))
            return long_side, short
        short = min(long_side, max(32, -(-round(long_side * width / max(height, 1)) // 32) * 32))
        return short, long_side

    def detect(self, frame: VideoFrame) -> FrameDetections:
        """Every face in the frame, largest-first order not guaranteed."""
        if self._fixed_input:
            boxes_scores, keypoints = self._model.detect(frame.image)
        else:
            boxes_scores, keypoints = self._model.detect(frame.image, input_size=self.input_size_for(frame.size))
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
