"""Faces of DAiSEE clips, found exactly as the runtime pipeline finds them.

A model must see at training time what it will see in production, so a clip goes
through the runtime's own stages: :class:`~vision.sources.RecordedFileSource` samples it
at 1 or 2 fps on the video's clock, :class:`~vision.detection.FaceDetector` (the configured
detector, loaded by :func:`workers.segments.load_capture_models`) finds the faces, and
:func:`pipeline.capture.crop_batch_for` aligns the crop and estimates head pose. As in
the seeds, the largest face of a frame is the student.

Only numbers are cached (never pixels): per sampled frame the timestamp, whether a face
was found, its box, five keypoints, detection score and head pose, in one ``.npz`` per
clip under the cache folder. The cache key covers the clip's path, size and mtime, the
detector and its settings, and the sampling rate, so a changed clip or detector is
detected again. At training time the clip is decoded again and its crops are aligned
in memory from the cached keypoints (:meth:`ClipFaceExtractor.crops`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from kernel.errors import BadInputError
from kernel.settings import Settings
from kernel.types import CropBatch, FloatArray, FrameDetections, VideoFrame
from pipeline.capture import crop_batch_for
from vision.detection import FaceDetector
from vision.sources import RecordedFileSource

logger = logging.getLogger(__name__)

#: Bumped when what is cached (or how it is computed) changes, so old entries are not reused.
CACHE_FORMAT_VERSION = 1

#: Two timestamps closer than this (seconds) are the same sampled frame; the source rounds to 1 ms.
_SAME_FRAME_SECONDS = 0.002


@dataclass(frozen=True)
class ClipFaces:
    """The largest face in every sampled frame of one clip: numbers only, no pixels."""

    frame_size: tuple[int, int]
    """``(height, width)`` of the clip's frames."""
    timestamps: NDArray[np.float64]
    """float64 [T]: seconds from the clip's start of every sampled frame."""
    found: NDArray[np.bool_]
    """bool [T]: whether a face was detected in that frame."""
    boxes: FloatArray
    """float32 [T, 4]: the largest face's box (zeros where none was found)."""
    keypoints: FloatArray
    """float32 [T, 5, 2]: its five keypoints."""
    scores: FloatArray
    """float32 [T]: its detection score (0 where none was found)."""
    head_pose: FloatArray
    """float32 [T, 3]: yaw, pitch, roll in degrees, as the runtime estimates them."""

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def face_share(self) -> float:
        """Share of sampled frames with a face (DAiSEE's students sometimes leave the picture)."""
        return float(self.found.mean()) if len(self) else 0.0

    def detections_at(self, index: int, stream: str) -> FrameDetections:
        """The face of one sampled frame as runtime detections (empty where none was found)."""
        if not self.found[index]:
            return FrameDetections.empty(stream, float(self.timestamps[index]), self.frame_size)
        return FrameDetections(
            stream=stream, timestamp=float(self.timestamps[index]), frame_size=self.frame_size,
            boxes=self.boxes[index:index + 1].copy(), scores=self.scores[index:index + 1].copy(),
            keypoints=self.keypoints[index:index + 1].copy(), track_ids=np.zeros(1, np.int64),
        )

    def save(self, path: Path) -> None:
        """Write the numbers atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, frame_size=np.asarray(self.frame_size, np.int64), timestamps=self.timestamps,
                         found=self.found, boxes=self.boxes, keypoints=self.keypoints, scores=self.scores,
                         head_pose=self.head_pose)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ClipFaces:
        """Read numbers written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            height, width = (int(v) for v in data["frame_size"])
            return cls((height, width), data["timestamps"].astype(np.float64), data["found"].astype(bool),
                       data["boxes"].astype(np.float32), data["keypoints"].astype(np.float32),
                       data["scores"].astype(np.float32), data["head_pose"].astype(np.float32))


def largest_face(detections: FrameDetections) -> FrameDetections:
    """Keep only the largest face of a frame (the student in front of the webcam)."""
    if len(detections) <= 1:
        return detections
    areas = (detections.boxes[:, 2] - detections.boxes[:, 0]) * (detections.boxes[:, 3] - detections.boxes[:, 1])
    mask = np.zeros(len(detections), bool)
    mask[int(np.argmax(areas))] = True
    return detections.select(mask)


class ClipFaceExtractor:
    """Samples clips, finds the student's face with the runtime detector, caches the numbers."""

    def __init__(self, detector: FaceDetector, *, detector_id: str, sample_fps: float,
                 cache_dir: Path | None) -> None:
        if sample_fps <= 0:
            raise BadInputError(f"sample rate must be positive, got {sample_fps}")
        self.detector = detector
        self.detector_id = detector_id
        """Names the detector and its settings in the cache key."""
        self.sample_fps = sample_fps
        self.cache_dir = cache_dir
        self.cache_hits = 0
        """Clips whose faces came from the cache."""
        self.detected = 0
        """Clips that were decoded and run through the detector."""

    @classmethod
    def from_settings(cls, settings: Settings, *, sample_fps: float, cache_dir: Path | None) -> ClipFaceExtractor:
        """The extractor of the configured runtime detector (same model, input size, threshold, minimum face)."""
        from pipeline.models import load_capture_models

        capture = load_capture_models(settings.model_copy(update={"recognizer": None}))
        detector_id = (f"{settings.detector}|input={settings.detector_input_size}|"
                       f"threshold={settings.detection_threshold}|min_face={settings.min_face_pixels}")
        return cls(capture.detector, detector_id=detector_id, sample_fps=sample_fps, cache_dir=cache_dir)

    def cache_key(self, clip: Path) -> str:
        """Hash of clip path, size, mtime, detector and sampling rate."""
        status = clip.stat()
        identity = {"path": str(clip.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
                    "detector": self.detector_id, "fps": self.sample_fps, "version": CACHE_FORMAT_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def faces(self, clip: Path) -> ClipFaces:
        """The largest face of every sampled frame, from the cache when the clip is unchanged.

        Raises:
            BadInputError: the clip cannot be decoded (a corrupt clip; the caller skips and reports it).
        """
        cached = self.cache_dir / f"{self.cache_key(clip)}.npz" if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                faces = ClipFaces.load(cached)
                self.cache_hits += 1
                return faces
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("%s: unreadable face cache entry, detecting again (%s)", cached, exc)
        faces = self._detect(clip)
        self.detected += 1
        if cached is not None:
            faces.save(cached)
        return faces

    def _detect(self, clip: Path) -> ClipFaces:
        source = RecordedFileSource(clip, self.sample_fps, stream_name=clip.stem)
        timestamps: list[float] = []
        found: list[bool] = []
        boxes: list[FloatArray] = []
        keypoints: list[FloatArray] = []
        scores: list[float] = []
        poses: list[FloatArray] = []
        frame_size: tuple[int, int] | None = None
        for frame in source:
            frame_size = frame.size
            detections = largest_face(self.detector.detect(frame))
            timestamps.append(frame.timestamp)
            if len(detections):
                # crop_batch_for computes the runtime's head pose; its crop is dropped right away.
                batch = crop_batch_for(0, frame, detections)
                found.append(True)
                boxes.append(detections.boxes[0])
                keypoints.append(detections.keypoints[0])
                scores.append(float(detections.scores[0]))
                poses.append(batch.head_pose[0])
            else:
                found.append(False)
                boxes.append(np.zeros(4, np.float32))
                keypoints.append(np.zeros((5, 2), np.float32))
                scores.append(0.0)
                poses.append(np.zeros(3, np.float32))
        if frame_size is None:
            raise BadInputError(f"{clip}: the clip has no frames that can be decoded")
        return ClipFaces(frame_size, np.asarray(timestamps, np.float64), np.asarray(found, bool),
                         np.asarray(boxes, np.float32).reshape(-1, 4),
                         np.asarray(keypoints, np.float32).reshape(-1, 5, 2),
                         np.asarray(scores, np.float32), np.asarray(poses, np.float32).reshape(-1, 3))

    def crops(self, clip: Path, faces: ClipFaces) -> CropBatch:
        """Decode the clip again and align the cached faces in memory: the runtime's crops, never on disk.

        Frames without a face give no crop; the batch's timestamps say which frames the crops are from.

        Raises:
            BadInputError: the clip cannot be decoded, or it no longer has the cached frames.
        """
        wanted = {round(float(t), 3): index for index, t in enumerate(faces.timestamps) if faces.found[index]}
        batches: list[CropBatch] = []
        for frame in RecordedFileSource(clip, self.sample_fps, stream_name=clip.stem):
            index = _matching_index(frame, wanted)
            if index is None:
                continue
            batches.append(crop_batch_for(0, frame, faces.detections_at(index, clip.stem)))
        if len(batches) != len(wanted):
            raise BadInputError(f"{clip}: decoded {len(batches)} of the {len(wanted)} cached face frames; "
                                "the clip changed since its faces were cached")
        if not batches:
            return _empty_batch(clip.stem)
        return CropBatch.concatenate(batches)


def _matching_index(frame: VideoFrame, wanted: dict[float, int]) -> int | None:
    index = wanted.get(round(frame.timestamp, 3))
    if index is not None:
        return index
    for timestamp, candidate in wanted.items():
        if abs(timestamp - frame.timestamp) < _SAME_FRAME_SECONDS:
            return candidate
    return None


def _empty_batch(stream: str) -> CropBatch:
    from kernel.types import CROP_SIZE

    del stream  # an empty batch has no streams
    return CropBatch(analysis_id=0, streams=(), track_ids=np.zeros(0, np.int64), timestamps=np.zeros(0, np.float64),
                     crops=np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8), boxes=np.zeros((0, 4), np.float32),
                     detection_scores=np.zeros(0, np.float32), head_pose=np.zeros((0, 3), np.float32))
