"""The capture pipeline: sampled frames in, tracked faces and crop batches out.

Every way ClassLens meets video (a recorded file, one time segment of it on a worker, a
participant's live stream, the training and benchmark harnesses) runs its frames through
:class:`CapturePipeline`: detect every face, track it to a student id, cut the aligned
crops and head pose that inference needs. The pipeline owns its tracker, so each stream
of a session has one pipeline; track ids start at ``first_track_id`` so that several
pipelines of one analysis (segments, live streams) never share an id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernel.settings import Settings
from kernel.store import FrameSample
from kernel.types import CROP_SIZE, CropBatch, FloatArray, FrameDetections, VideoFrame
from pipeline.gallery import FramePart, GallerySplitter
from vision.detection import FaceDetector, ScaledSearch
from vision.geometry import align_face, head_poses
from vision.recognition import Embedder
from vision.tracking import StudentTracker, TrackSummary, is_student


def crop_batch_for(analysis_id: int, frame: VideoFrame, detections: FrameDetections) -> CropBatch:
    """Aligned crops, head pose and ids of every tracked face of one frame."""
    count = len(detections)
    crops = np.empty((count, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for index in range(count):
        crops[index] = align_face(frame.image, detections.keypoints[index])
    return CropBatch(
        analysis_id=analysis_id,
        streams=(frame.stream,) * count,
        track_ids=detections.track_ids,
        timestamps=np.full(count, frame.timestamp, np.float64),
        crops=crops,
        boxes=detections.boxes,
        detection_scores=detections.scores,
        head_pose=head_poses(detections.keypoints, detections.frame_size),
    )


@dataclass(frozen=True)
class CapturedFrame:
    """What the pipeline made of one sampled frame: one share per stream the frame fed.

    A camera frame feeds its own stream; a gallery frame also feeds one stream per named
    tile (:mod:`pipeline.gallery`), each with its faces in the tile's coordinates.
    """

    detections: tuple[FrameDetections, ...]
    """Every face found, with its student track id, per stream (the frame's own stream first)."""
    batch: CropBatch | None
    """All the faces' crops for inference; None when the frame held no face."""
    samples: tuple[FrameSample, ...]
    """Rows for the store, one per stream: when it was sampled and how many faces it held."""

    @property
    def faces(self) -> int:
        """Faces found in the whole frame."""
        return sum(len(part) for part in self.detections)


@dataclass(frozen=True)
class StudentRule:
    """When a track counts as a student (:func:`vision.tracking.is_student`)."""

    min_seconds: float = 0.0
    """Covered class time a track needs."""
    sample_interval: float = 1.0
    """Seconds of class time one sample stands for."""
    min_score: float = 0.0
    """Mean detector confidence a track needs."""

    @classmethod
    def from_settings(cls, settings: Settings) -> StudentRule:
        """The rule the final step applies (``min_student_seconds``, ``min_student_score``)."""
        return cls(settings.min_student_seconds, 1.0 / settings.sample_fps, settings.min_student_score)

    def admits(self, summary: TrackSummary) -> bool:
        """Whether the track counts as a student."""
        return is_student(summary, min_seconds=self.min_seconds, sample_interval=self.sample_interval,
                          min_score=self.min_score)


class CapturePipeline:
    """Detect → track → crop for the frames of one stream, in order; owns the stream's tracker."""

    def __init__(self, detector: FaceDetector, embedder: Embedder | None, *, analysis_id: int,
                 max_gap_seconds: float, first_track_id: int = 1, student_rule: StudentRule | None = None,
                 gallery: GallerySplitter | None = None, full_search_seconds: float = 0.0) -> None:
        self.detector = detector
        self.student_rule = student_rule or StudentRule()
        """What makes a track a student, so that progress counts students as the report will."""
        self.search = ScaledSearch(detector, full_pass_seconds=full_search_seconds,
                                   sample_interval=self.student_rule.sample_interval)
        """The stream's face search: the detector's full input on a schedule, reduced between."""
        self.embedder = embedder
        self.gallery = gallery
        """Splits gallery frames among the participants' tiles; None for camera pictures only."""
        self.analysis_id = analysis_id
        self._tracker = StudentTracker(max_gap_seconds=max_gap_seconds, embedder=embedder, first_id=first_track_id)

    @classmethod
    def configured(cls, detector: FaceDetector, embedder: Embedder | None, settings: Settings, *,
                   analysis_id: int, first_track_id: int = 1, gallery: GallerySplitter | None = None,
                   ) -> CapturePipeline:
        """A pipeline with the loaded capture models, tracking as the settings say."""
        return cls(detector, embedder, analysis_id=analysis_id, max_gap_seconds=settings.track_max_gap_seconds,
                   first_track_id=first_track_id, student_rule=StudentRule.from_settings(settings), gallery=gallery,
                   full_search_seconds=settings.full_search_seconds)

    def capture(self, frame: VideoFrame) -> CapturedFrame:
        """Detect, track and crop one frame (frames of a stream must come in time order)."""
        found = self.search.detect(frame)
        embedded: list[FloatArray] = []
        if self.gallery is None:
            parts = [FramePart.whole(frame, found)]
        else:
            embedder = self.embedder

            def embed_frame() -> FloatArray:
                # One recogniser call for the whole frame's faces, rather than one per tile; the
                # splitter uses them too (tiles with one name, another person in a tile).
                assert embedder is not None
                embedded.append(embedder.embed(frame.image, found.keypoints))
                return embedded[0]

            # Only a gallery frame needs every face embedded; a camera picture's tracker embeds
            # only the faces whose match position leaves in doubt.
            parts = self.gallery.split(frame, found, embed_frame if embedder is not None and len(found) else None)
        embeddings = embedded[0] if embedded else None
        detections, batches, samples = [], [], []
        for part in parts:
            tracked = self._tracker.update(part.detections, part.frame.image,
                                           None if embeddings is None else embeddings[part.indices])
            detections.append(tracked)
            if len(tracked):
                batches.append(crop_batch_for(self.analysis_id, part.frame, tracked))
            samples.append(FrameSample(analysis_id=self.analysis_id, stream=part.frame.stream,
                                       timestamp=frame.timestamp, faces=len(tracked)))
        batch = (batches[0] if len(batches) == 1 else CropBatch.concatenate(batches)) if batches else None
        return CapturedFrame(tuple(detections), batch, tuple(samples))

    def summaries(self) -> list[TrackSummary]:
        """Every track seen so far, in order of creation."""
        return self._tracker.summaries()

    def students_so_far(self) -> int:
        """Tracks that already count as students by the report's rule (seen long and clearly enough)."""
        return sum(1 for summary in self._tracker.summaries() if self.student_rule.admits(summary))
