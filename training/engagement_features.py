"""The per-frame features behind the default engagement model, and a model fitted to DAiSEE on them.

The runtime's engagement model (:mod:`model_export.engagement_baseline`) reads one row of
:data:`~kernel.types.ENGAGEMENT_FEATURES` per face: absolute head yaw
and pitch, eyes closed, gaze away, and the seven FER2013 emotion probabilities. Here the
same rows are computed for DAiSEE clips by the same code the workers run: the runtime
crop and head pose (:mod:`training.frames`), :func:`workers.inference.analyse_crops` with
the configured emotion (and optional landmark) runner, and
:func:`workers.inference.engagement_features` to lay the columns out. Rows are cached per
clip as numbers (``.npz``), never as pixels.

:class:`OrdinalFeatureModel` is the baseline's formula made learnable: a standardised
linear score per affective state and three ordered thresholds, ``P(level ≥ k) =
sigmoid(score − θ_k)`` (a cumulative-link, i.e. ordinal logistic, model), fitted to all
four states. Exported, it maps the same ``[N, 11]`` input as the baseline to the
engagement level probabilities ``[N, 4]``, so it drops into
:class:`workers.runners.EngagementRunner` unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from kernel.errors import BadInputError
from kernel.settings import Settings
from kernel.types import ENGAGEMENT_FEATURES, FloatArray
from training.daisee import AFFECTIVE_STATES, LEVEL_COUNT
from training.frames import ClipFaceExtractor, ClipFaces
from workers.inference import InferenceModels, analyse_crops, engagement_features

logger = logging.getLogger(__name__)

#: Columns of the per-frame rows of the feature model: exactly the runtime's engagement input.
FRAME_FEATURES: tuple[str, ...] = ENGAGEMENT_FEATURES

#: Columns of the temporal model's per-frame input: the runtime features, whether a face was
#: seen, and the detector's confidence (a student leaving the picture is a cue in itself).
SEQUENCE_FEATURES: tuple[str, ...] = (*ENGAGEMENT_FEATURES, "face_found", "detection_score")

#: Bumped when the feature rows change, so cached rows of an older layout are not reused.
FEATURE_CACHE_VERSION = 1


@dataclass(frozen=True)
class ClipFeatures:
    """Per sampled frame of one clip: the runtime engagement features (numbers only)."""

    timestamps: NDArray[np.float64]
    """float64 [T]: seconds from the clip's start."""
    found: NDArray[np.bool_]
    """bool [T]: whether a face was found in that frame."""
    scores: FloatArray
    """float32 [T]: detection score of the face (0 where none)."""
    features: FloatArray
    """float32 [T, 11]: :data:`FRAME_FEATURES` (zeros where no face was found)."""

    def frame_rows(self) -> FloatArray:
        """Rows of the frames with a face: the runtime model sees only faces."""
        rows: FloatArray = self.features[self.found]
        return rows

    def sequence(self) -> FloatArray:
        """float32 [T, 13]: :data:`SEQUENCE_FEATURES` for every sampled frame, faces or not."""
        return np.concatenate([self.features, self.found[:, None].astype(np.float32), self.scores[:, None]],
                              axis=1).astype(np.float32)

    def save(self, path: Path) -> None:
        """Write the numbers (npz; a half-written file is never renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, timestamps=self.timestamps, found=self.found, scores=self.scores, features=self.features)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> ClipFeatures:
        """Read numbers written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            return cls(data["timestamps"].astype(np.float64), data["found"].astype(bool),
                       data["scores"].astype(np.float32), data["features"].astype(np.float32))


def load_feature_models(settings: Settings) -> InferenceModels:
    """The runtime's emotion and landmark runners as the workers load them (engagement: the configured one)."""
    from pipeline.models import load_inference_models

    return load_inference_models(settings)


def models_id(settings: Settings) -> str:
    """Names the models that make the feature columns, for the cache key and the run's record."""
    emotion = settings.emotion_model if settings.emotion_inference else "off"
    return f"emotion={emotion}|landmarks={settings.landmark_model or 'off'}"


class ClipFeatureExtractor:
    """Computes (and caches) the runtime engagement features of every sampled frame of a clip."""

    def __init__(self, faces: ClipFaceExtractor, models: InferenceModels, *, models_id: str,
                 cache_dir: Path | None) -> None:
        self.faces = faces
        self.models = models
        self.models_id = models_id
        self.cache_dir = cache_dir

    def features(self, clip: Path, clip_faces: ClipFaces | None = None) -> ClipFeatures:
        """The clip's feature rows, from the cache when clip, detector and models are unchanged.

        Raises:
            BadInputError: the clip cannot be decoded.
        """
        key = hashlib.sha256(json.dumps([self.faces.cache_key(clip), self.models_id, FEATURE_CACHE_VERSION])
                             .encode()).hexdigest()[:32]
        cached = self.cache_dir / f"features-{key}.npz" if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                return ClipFeatures.load(cached)
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("%s: unreadable feature cache entry, computing again (%s)", cached, exc)
        clip_faces = clip_faces if clip_faces is not None else self.faces.faces(clip)
        rows = np.zeros((len(clip_faces), len(FRAME_FEATURES)), np.float32)
        if clip_faces.found.any():
            batch = self.faces.crops(clip, clip_faces)
            # The workers' own function: emotion (and eye/gaze) runners on the runtime crops.
            analysis = analyse_crops(batch, self.models)
            rows[clip_faces.found] = engagement_features(batch.head_pose, analysis.emotion_probabilities,
                                                         analysis.eyes_closed, analysis.gaze_away)
        result = ClipFeatures(clip_faces.timestamps, clip_faces.found, clip_faces.scores, rows)
        if cached is not None:
            result.save(cached)
        return result


class OrdinalFeatureModel(nn.Module):
    """Ordinal logistic regression per affective state over the runtime's 11 engagement features.

    ``forward`` returns the engagement level probabilities ``[N, 4]`` (the workers'
    contract); :meth:`level_probabilities` gives those of all four states.
    """

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, feature_count: int = len(FRAME_FEATURES), state_count: int = len(AFFECTIVE_STATES),
                 level_count: int = LEVEL_COUNT) -> None:
        super().__init__()
        self.state_count = state_count
        self.level_count = level_count
        # Standardisation is part of the model (folded into the ONNX graph), fitted by set_scaling.
        self.register_buffer("feature_mean", torch.zeros(feature_count))
        self.register_buffer("feature_scale", torch.ones(feature_count))
        self.weights = nn.Parameter(torch.zeros(state_count, feature_count))
        # Thresholds as a first value plus positive gaps keep them ordered during training.
        self.first_threshold = nn.Parameter(torch.full((state_count, 1), -1.0))
        self.threshold_gaps = nn.Parameter(torch.zeros(state_count, level_count - 2))

    def set_scaling(self, rows: FloatArray) -> None:
        """Standardise with the training rows' mean and spread (constant columns keep scale 1)."""
        if rows.ndim != 2 or rows.shape[1] != self.weights.shape[1] or rows.shape[0] == 0:
            raise BadInputError(f"expected training rows [N>0, {self.weights.shape[1]}], got {rows.shape}")
        spread = rows.std(axis=0)
        self.feature_mean.copy_(torch.from_numpy(rows.mean(axis=0).astype(np.float32)))
        self.feature_scale.copy_(torch.from_numpy(np.where(spread > 1e-6, spread, 1.0).astype(np.float32)))

    def thresholds(self) -> torch.Tensor:
        """Ordered thresholds θ_1 < θ_2 < θ_3 per state, [states, levels − 1]."""
        gaps = nn.functional.softplus(self.threshold_gaps) + 1e-3
        return torch.cat([self.first_threshold, self.first_threshold + torch.cumsum(gaps, dim=1)], dim=1)

    def level_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Level probabilities of every state, [N, states, levels]."""
        standardised = (features - self.feature_mean) / self.feature_scale
        score = standardised @ self.weights.T  # [N, states]
        at_least = torch.sigmoid(score.unsqueeze(2) - self.thresholds().unsqueeze(0))  # P(level ≥ k), k = 1..3
        ones = torch.ones_like(at_least[:, :, :1])
        zeros = torch.zeros_like(at_least[:, :, :1])
        # [1, P1, P2, P3] − [P1, P2, P3, 0]: telescoping, each row sums to 1.
        probabilities = torch.cat([ones, at_least], dim=2) - torch.cat([at_least, zeros], dim=2)
        return probabilities.clamp_min(0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Engagement level probabilities [N, 4] (the runtime contract)."""
        return self.level_probabilities(features)[:, AFFECTIVE_STATES.index("engagement")]


def ordinal_feature_model(feature_count: int = len(FRAME_FEATURES)) -> OrdinalFeatureModel:
    """Factory recorded in ``run.json`` (``training.engagement_features:ordinal_feature_model``)."""
    return OrdinalFeatureModel(feature_count)
