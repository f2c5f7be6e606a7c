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
from kernel.types import FrameDetections, VideoFrame, nearest_instant, shorter_sides

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

    @property
    def scalable(self) -> bool:
        """Whether the detector takes inputs of any size (a model with a fixed input does not)."""
        return not self._fixed_input

    def input_size_for(self, frame_size: tuple[int, int], long_side: int | None = None) -> tuple[int, int]:
        """Detector input (width, height) for a frame, keeping its aspect ratio.

        The long side is ``long_side`` (default ``input_size``), the short side scaled and
        rounded up to a multiple of 32. A 16:9 frame letterboxed into a square would spend
        44 % of the detector's work on padding.
        """
        height, width = frame_size
        long_side = long_side or self.input_size
        if width >= height:
            short = min(long_side, max(32, -(-round(long_side * height / max(width, 1)) // 32) * 32))
            return long_side, short
        short = min(long_side, max(32, -(-round(long_side * width / max(height, 1)) // 32) * 32))
        return short, long_side

    def detect(self, frame: VideoFrame, long_side: int | None = None) -> FrameDetections:
        """Every face in the frame, largest-first order not guaranteed.

        ``long_side`` searches a smaller input than ``input_size`` (a multiple of 32; see
        :class:`ScaledSearch`); a detector with a fixed input ignores it.
        """
        if self._fixed_input:
            boxes_scores, keypoints = self._model.detect(frame.image)
        else:
            size = self.input_size_for(frame.size, long_side)
            boxes_scores, keypoints = self._model.detect(frame.image, input_size=size)
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
        return detections.select(shorter_sides(boxes) >= self.min_face_pixels)


#: Input pixels (shorter box side) at which the detector still finds a known face and places
#: its keypoints about as well as at the full input. Measured on the webcam clips of
#: ``../shared/media`` (73 frames): faces of 44–58 input pixels were all found again, with
#: keypoints 3.5–3.7 % of the face side (median) from the full input's, against 2.7 % for two
#: full-size inputs; 64 leaves a margin for faces that turn or blur.
KNOWN_FACE_INPUT_PIXELS = 64.0

#: The smallest long side a reduced search uses; below it the detector's largest anchors
#: (256 px at stride 32) no longer fit a close-up.
SMALLEST_SEARCH_SIDE = 160


class ScaledSearch:
    """One stream's face search: the full detector input on a schedule, a smaller one between.

    Most of the detector's time on a webcam picture goes to looking for faces far smaller than
    the one that is there. The first frame of every ``full_pass_seconds`` of class time (and
    every frame while it knows no face) is searched at the detector's full input, which finds
    every face it can find. In between, frames are searched at the smallest input that still
    shows the faces found so far at :data:`KNOWN_FACE_INPUT_PIXELS`; a frame in which that
    search finds fewer faces than were known is searched again at the full input, so no known
    face is lost to the smaller input.
    A new face too small for the reduced input is found at the next full pass, at most
    ``full_pass_seconds`` later. Gallery frames, whose faces are small, stay at the full input.

    The full searches fall on a fixed grid of sampling instants, not on the time since the last
    one, so a worker's segment that starts on the grid searches exactly as one run through the
    whole recording does (segments of 300 s with searches every 5 s). A sample taken up to half
    an interval early counts at its instant, as everywhere else.
    """

    def __init__(self, detector: FaceDetector, *, full_pass_seconds: float, sample_interval: float = 1.0) -> None:
        self.detector = detector
        self.full_pass_seconds = full_pass_seconds
        """Longest time between two searches at the full input; 0 searches every frame in full."""
        self.sample_interval = sample_interval
        """Seconds between two sampling instants of the stream."""
        self.full_passes = 0
        """Frames searched at the full input (repeats included)."""
        self.reduced_passes = 0
        """Frames searched at a reduced input."""
        self._full_window: int | None = None
        self._known_faces = 0
        self._smallest_face = 0.0

    def detect(self, frame: VideoFrame) -> FrameDetections:
        """Every face of the frame that the schedule's search finds (frames in time order)."""
        side = self._reduced_side(frame)
        if side is not None:
            self.reduced_passes += 1
            found = self.detector.detect(frame, long_side=side)
            if len(found) >= self._known_faces:
                self._remember(found)
                return found
        self.full_passes += 1
        found = self.detector.detect(frame)
        self._full_window = self._window(frame.timestamp)
        self._remember(found)
        return found

    def _reduced_side(self, frame: VideoFrame) -> int | None:
        """The long side of a reduced search for this frame, or None when it needs the full input."""
        if (self.full_pass_seconds <= 0 or not self.detector.scalable or not self._known_faces
                or self._window(frame.timestamp) != self._full_window):
            return None
        long_frame_side = max(frame.size)
        needed = KNOWN_FACE_INPUT_PIXELS * long_frame_side / self._smallest_face
        side = max(SMALLEST_SEARCH_SIDE, -(-int(np.ceil(needed)) // 32) * 32)
        return side if side < self.detector.input_size else None

    def _window(self, timestamp: float) -> int:
        """Which stretch of ``full_pass_seconds`` the timestamp's sampling instant falls in (0 without a schedule)."""
        if self.full_pass_seconds <= 0:
            return 0
        instant = nearest_instant(timestamp, self.sample_interval) * self.sample_interval
        return int(np.floor(instant / self.full_pass_seconds + 1e-9))

    def _remember(self, found: FrameDetections) -> None:
        self._known_faces = len(found)
        if len(found):
            self._smallest_face = float(shorter_sides(found.boxes).min())
