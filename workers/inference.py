"""The pure function at the heart of every worker: face crops in, derived numbers out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from kernel.types import EMOTION_LABELS, CropBatch, FaceAnalysisBatch, FloatArray
from workers.landmarks import LandmarkRunner
from workers.runners import EmotionRunner, EngagementRunner
from workers.shared_trunk import SharedTrunkRunner


@dataclass
class InferenceModels:
    """The models a worker runs; emotion is None when emotion inference is switched off."""

    engagement: EngagementRunner
    """Engagement model (required)."""
    emotion: EmotionRunner | None = None
    """Emotion model, or None when the deployment switched emotion inference off."""
    landmarks: LandmarkRunner | None = None
    """Eye and gaze cues (MediaPipe Face Landmarker), or None when not configured."""
    provenance: dict[str, dict[str, object]] = field(default_factory=dict)
    """Role → name, sha256, licence, description: recorded on the analysis for the reports."""
    engagement_without_emotion: EngagementRunner | None = None
    """The engagement model for sessions with emotion inference off, when ``engagement`` reads
    expressions from the crop (a network grown from an emotion model); None when it does not."""
    provenance_without_emotion: dict[str, object] | None = None
    """Provenance of :attr:`engagement_without_emotion`."""
    emotion_and_engagement: SharedTrunkRunner | None = None
    """``emotion`` and ``engagement`` as one graph when they share their first layers (the
    defaults do); None when they do not, or when emotion inference is off."""

    def for_settings(self, emotion_inference: bool) -> InferenceModels:
        """These models as a session with this emotion switch may use them.

        Models loaded for another configuration never bring emotion inference back into a
        session that switched it off: the switch is absolute (docs/privacy.md). That covers
        an engagement model that reads expressions: such a session gets the one that does not.
        """
        if emotion_inference or (self.emotion is None and self.engagement_without_emotion is None):
            return self
        provenance = {role: info for role, info in self.provenance.items() if role != "emotion"}
        engagement = self.engagement
        if self.engagement_without_emotion is not None:
            engagement = self.engagement_without_emotion
            if self.provenance_without_emotion is not None:
                provenance["engagement"] = self.provenance_without_emotion
        return replace(self, emotion=None, engagement=engagement, provenance=provenance,
                       engagement_without_emotion=None, provenance_without_emotion=None, emotion_and_engagement=None)

    def shared_runner(self) -> SharedTrunkRunner | None:
        """The fused runner, when it runs exactly this set's emotion and engagement models."""
        fused = self.emotion_and_engagement
        if fused is not None and fused.emotion is self.emotion and fused.engagement is self.engagement:
            return fused
        return None


def engagement_features(
    head_pose: FloatArray,
    emotions: FloatArray | None,
    eyes_closed: FloatArray | None,
    gaze_away: FloatArray | None,
) -> FloatArray:
    """Build the engagement model's input rows in ``ENGAGEMENT_FEATURES`` order.

    Unknown cues are 0 (no evidence); without emotion inference the emotion columns are 0.
    """
    count = head_pose.shape[0]
    features = np.zeros((count, 4 + len(EMOTION_LABELS)), np.float32)
    features[:, 0] = np.abs(head_pose[:, 0])
    features[:, 1] = np.abs(head_pose[:, 1])
    # NaN marks a face the landmark model did not find: no evidence, like an unknown cue.
    if eyes_closed is not None:
        features[:, 2] = np.nan_to_num(eyes_closed, nan=0.0)
    if gaze_away is not None:
        features[:, 3] = np.nan_to_num(gaze_away, nan=0.0)
    if emotions is not None:
        features[:, 4:] = emotions
    return features


def analyse_crops(batch: CropBatch, models: InferenceModels) -> FaceAnalysisBatch:
    """Run every configured model on a batch of aligned crops."""
    shared = models.shared_runner()
    emotions: FloatArray | None
    engagement: FloatArray | None = None
    if shared is not None:
        emotions, engagement = shared.predict(batch.crops)
    else:
        emotions = models.emotion.predict(batch.crops) if models.emotion is not None else None
    # Eye and gaze cues need a landmark model; without one they are unknown.
    eyes_closed: FloatArray | None = None
    gaze_away: FloatArray | None = None
    if models.landmarks is not None:
        eyes_closed, gaze_away = models.landmarks.predict(batch.crops, batch.boxes)
    if engagement is None:
        features = engagement_features(batch.head_pose, emotions, eyes_closed, gaze_away)
        engagement = models.engagement.predict(features, batch.crops)
    return FaceAnalysisBatch(
        emotion_probabilities=emotions,
        eyes_closed=eyes_closed,
        gaze_away=gaze_away,
        engagement_probabilities=engagement,
    )
