"""Typed domain objects that flow between pipeline stages.

Every stage takes one of these and returns one of these; no untyped dicts cross a
stage boundary. Each is a small frozen dataclass of numpy arrays whose shapes and
dtypes are checked on creation, with errors that say what was expected and what
arrived. Timestamps are seconds on the class clock (the recording's own timeline,
or seconds since the meeting started).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]
IntArray = NDArray[np.int64]
ByteArray = NDArray[np.uint8]

#: FER2013's seven emotion classes, in the order the emotion models output them.
EMOTION_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: DAiSEE-style engagement levels 0–3.
ENGAGEMENT_LEVELS: tuple[str, ...] = ("very low", "low", "high", "very high")

#: The engagement models' feature columns, in order (the heuristic baseline reads them all;
#: trained image models read the crop instead).
ENGAGEMENT_FEATURES: tuple[str, ...] = (
    "head_yaw_abs_deg",
    "head_pitch_abs_deg",
    "eyes_closed",
    "gaze_away",
    "angry",
    "disgust",
    "fear",
    "happy",
    "sad",
    "surprise",
    "neutral",
)
"""Input columns, in order. Head angles are absolute degrees; ``eyes_closed`` and
``gaze_away`` are probabilities in [0, 1] (0 when unknown); the seven FER2013 emotion
probabilities are all 0 when emotion inference is switched off."""

#: Side length of the aligned face crops that travel to the workers.
CROP_SIZE = 112

#: Track id of a detection the tracker has not (yet) assigned to a student.
UNASSIGNED = -1


def nearest_instant(seconds: float, interval: float) -> int:
    """Index k of the sampling instant k · ``interval`` nearest to ``seconds``.

    A time exactly halfway between two instants belongs to the later one, as the sampling
    windows [t − interval/2, t + interval/2) of :mod:`vision.keyframes` have it (a
    nanosecond of slack absorbs float noise).
    """
    return math.floor(seconds / interval + 0.5 + 1e-9)


def shorter_sides(boxes: FloatArray) -> FloatArray:
    """Each box's shorter side [N] for boxes [N,4] (x1, y1, x2, y2): how large a face is."""
    return as_float32(np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))


def as_float32(values: Any) -> FloatArray:
    """View or convert array-like values as a float32 array (typed, for numpy's loose stubs)."""
    return np.asarray(values, dtype=np.float32)


def _check(name: str, array: np.ndarray[Any, Any], shape: tuple[int | None, ...], dtype: type) -> None:
    """Raise ValueError naming the field when an array's rank, shape or dtype is off."""
    if array.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {array.dtype.name}")
    if array.ndim != len(shape) or any(
        want is not None and want != got for want, got in zip(shape, array.shape, strict=False)
    ):
        wanted = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {wanted}, got {list(array.shape)}")


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One decoded frame of one stream: BGR pixels and its time on the class clock."""

    stream: str
    """Which stream the frame came from: ``"main"`` for a recording, the feed id in a meeting."""
    timestamp: float
    """Seconds on the class clock (from the stream's pts)."""
    image: ByteArray
    """BGR pixels, uint8 [H, W, 3]."""

    def __post_init__(self) -> None:
        _check("VideoFrame.image", self.image, (None, None, 3), np.uint8)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the frame in pixels."""
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True, slots=True)
class FrameDetections:
    """Every face found in one frame: boxes, scores, five keypoints and track ids."""

    stream: str
    """The stream the frame came from."""
    timestamp: float
    """Seconds on the class clock."""
    frame_size: tuple[int, int]
    """``(height, width)`` of the frame the coordinates refer to."""
    boxes: FloatArray
    """float32 [K, 4]: x1, y1, x2, y2 in frame pixels."""
    scores: FloatArray
    """float32 [K]: detector confidence."""
    keypoints: FloatArray
    """float32 [K, 5, 2]: left eye, right eye, nose, left and right mouth corner (x, y)."""
    track_ids: IntArray = field(default_factory=lambda: np.empty(0, np.int64))
    """int64 [K]: the student track of each face, :data:`UNASSIGNED` before tracking."""

    def __post_init__(self) -> None:
        count = self.boxes.shape[0] if self.boxes.ndim == 2 else -1
        _check("FrameDetections.boxes", self.boxes, (None, 4), np.float32)
        _check("FrameDetections.scores", self.scores, (count,), np.float32)
        _check("FrameDetections.keypoints", self.keypoints, (count, 5, 2), np.float32)
        if self.track_ids.size == 0 and count > 0:
            object.__setattr__(self, "track_ids", np.full(count, UNASSIGNED, np.int64))
        _check("FrameDetections.track_ids", self.track_ids, (count,), np.int64)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, stream: str, timestamp: float, frame_size: tuple[int, int]) -> FrameDetections:
        """A frame with no faces."""
        return cls(
            stream=stream,
            timestamp=timestamp,
            frame_size=frame_size,
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros(0, np.float32),
            keypoints=np.zeros((0, 5, 2), np.float32),
            track_ids=np.zeros(0, np.int64),
        )

    def select(self, mask: NDArray[np.bool_]) -> FrameDetections:
        """Keep the faces where ``mask`` is true."""
        return FrameDetections(
            stream=self.stream,
            timestamp=self.timestamp,
            frame_size=self.frame_size,
            boxes=self.boxes[mask],
            scores=self.scores[mask],
            keypoints=self.keypoints[mask],
            track_ids=self.track_ids[mask],
        )

    def with_track_ids(self, track_ids: IntArray) -> FrameDetections:
        """The same detections with track ids assigned."""
        return FrameDetections(
            stream=self.stream,
            timestamp=self.timestamp,
            frame_size=self.frame_size,
            boxes=self.boxes,
            scores=self.scores,
            keypoints=self.keypoints,
            track_ids=np.ascontiguousarray(track_ids, dtype=np.int64),
        )


@dataclass(frozen=True, slots=True)
class CropBatch:
    """Aligned uint8 face crops and the ids that say whose face each is and when.

    This is what crosses a process boundary: :meth:`to_bytes` packs it with msgpack as
    raw bytes plus shapes, never pickles and never whole frames.
    """

    analysis_id: int
    """The analysis (recording or meeting session) the crops belong to."""
    streams: tuple[str, ...]
    """Stream of each crop."""
    track_ids: IntArray
    """int64 [N]: the student track of each crop."""
    timestamps: NDArray[np.float64]
    """float64 [N]: seconds on the class clock."""
    crops: ByteArray
    """uint8 [N, S, S, 3]: BGR crops aligned with insightface's five-point template."""
    boxes: FloatArray
    """float32 [N, 4]: the face box in the frame (for face size and data-quality notes)."""
    detection_scores: FloatArray
    """float32 [N]: detector confidence."""
    head_pose: FloatArray
    """float32 [N, 3]: yaw, pitch, roll in degrees, estimated from the frame keypoints."""

    def __post_init__(self) -> None:
        count = self.crops.shape[0] if self.crops.ndim == 4 else -1
        _check("CropBatch.crops", self.crops, (None, None, None, 3), np.uint8)
        if self.crops.shape[1] != self.crops.shape[2]:
            raise ValueError(f"CropBatch.crops: expected square crops, got {list(self.crops.shape)}")
        if len(self.streams) != count:
            raise ValueError(f"CropBatch.streams: expected {count} entries, got {len(self.streams)}")
        _check("CropBatch.track_ids", self.track_ids, (count,), np.int64)
        _check("CropBatch.timestamps", self.timestamps, (count,), np.float64)
        _check("CropBatch.boxes", self.boxes, (count, 4), np.float32)
        _check("CropBatch.detection_scores", self.detection_scores, (count,), np.float32)
        _check("CropBatch.head_pose", self.head_pose, (count, 3), np.float32)

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @classmethod
    def concatenate(cls, batches: list[CropBatch]) -> CropBatch:
        """Join batches of one analysis into one."""
        if not batches:
            raise ValueError("CropBatch.concatenate: no batches given")
        analysis_ids = {b.analysis_id for b in batches}
        if len(analysis_ids) != 1:
            raise ValueError(f"CropBatch.concatenate: batches of several analyses {sorted(analysis_ids)}")
        return cls(
            analysis_id=batches[0].analysis_id,
            streams=tuple(s for b in batches for s in b.streams),
            track_ids=np.concatenate([b.track_ids for b in batches]),
            timestamps=np.concatenate([b.timestamps for b in batches]),
            crops=np.concatenate([b.crops for b in batches]),
            boxes=np.concatenate([b.boxes for b in batches]),
            detection_scores=np.concatenate([b.detection_scores for b in batches]),
            head_pose=np.concatenate([b.head_pose for b in batches]),
        )

    def slice(self, start: int, stop: int) -> CropBatch:
        """Crops ``start:stop`` of the batch, with their ids."""
        return CropBatch(
            analysis_id=self.analysis_id,
            streams=self.streams[start:stop],
            track_ids=self.track_ids[start:stop],
            timestamps=self.timestamps[start:stop],
            crops=self.crops[start:stop],
            boxes=self.boxes[start:stop],
            detection_scores=self.detection_scores[start:stop],
            head_pose=self.head_pose[start:stop],
        )

    def to_bytes(self) -> bytes:
        """Pack as msgpack: raw array bytes with dtype and shape, nothing executable."""
        def pack(array: np.ndarray[Any, Any]) -> dict[str, Any]:
            return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}

        payload = {
            "v": 1,
            "analysis_id": self.analysis_id,
            "streams": list(self.streams),
            "track_ids": pack(self.track_ids),
            "timestamps": pack(self.timestamps),
            "crops": pack(self.crops),
            "boxes": pack(self.boxes),
            "detection_scores": pack(self.detection_scores),
            "head_pose": pack(self.head_pose),
        }
        return bytes(msgpack.packb(payload, use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> CropBatch:
        """Unpack :meth:`to_bytes` output; a corrupt payload raises ValueError saying what is wrong."""
        try:
            payload = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"CropBatch payload is not valid msgpack: {exc}") from None
        if not isinstance(payload, dict) or payload.get("v") != 1:
            raise ValueError("CropBatch payload: expected a version-1 map")

        def unpack(key: str, dtype: type) -> np.ndarray[Any, Any]:
            entry = payload.get(key)
            if not isinstance(entry, dict):
                raise ValueError(f"CropBatch payload: missing array {key!r}")
            if np.dtype(entry["dtype"]) != np.dtype(dtype):
                raise ValueError(f"CropBatch payload: {key} has dtype {entry['dtype']}, expected {np.dtype(dtype).str}")
            shape = tuple(int(s) for s in entry["shape"])
            expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if len(entry["data"]) != expected:
                raise ValueError(
                    f"CropBatch payload: {key} has {len(entry['data'])} bytes, shape {list(shape)} needs {expected}"
                )
            return np.frombuffer(entry["data"], dtype=dtype).reshape(shape).copy()

        return cls(
            analysis_id=int(payload["analysis_id"]),
            streams=tuple(str(s) for s in payload["streams"]),
            track_ids=unpack("track_ids", np.int64),
            timestamps=unpack("timestamps", np.float64),
            crops=unpack("crops", np.uint8),
            boxes=unpack("boxes", np.float32),
            detection_scores=unpack("detection_scores", np.float32),
            head_pose=unpack("head_pose", np.float32),
        )


@dataclass(frozen=True, slots=True)
class FaceAnalysisBatch:
    """What the workers derive from a :class:`CropBatch`: numbers only, never pixels."""

    emotion_probabilities: FloatArray | None
    """float32 [N, 7] in :data:`EMOTION_LABELS` order, or None when emotion inference is off."""
    eyes_closed: FloatArray | None
    """float32 [N] probability that the eyes are closed, or None when no landmark model runs."""
    gaze_away: FloatArray | None
    """float32 [N] probability that the gaze is off the screen, or None when no landmark model runs."""
    engagement_probabilities: FloatArray
    """float32 [N, 4] over :data:`ENGAGEMENT_LEVELS`."""

    def __post_init__(self) -> None:
        count = self.engagement_probabilities.shape[0] if self.engagement_probabilities.ndim == 2 else -1
        _check("FaceAnalysisBatch.engagement_probabilities", self.engagement_probabilities, (count, 4), np.float32)
        if self.emotion_probabilities is not None:
            _check("FaceAnalysisBatch.emotion_probabilities", self.emotion_probabilities,
                   (count, len(EMOTION_LABELS)), np.float32)
        for name in ("eyes_closed", "gaze_away"):
            value = getattr(self, name)
            if value is not None:
                _check(f"FaceAnalysisBatch.{name}", value, (count,), np.float32)

    def __len__(self) -> int:
        return int(self.engagement_probabilities.shape[0])
