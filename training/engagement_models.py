"""Engagement model families for DAiSEE, their loss, metrics and runtime wrapper.

Every family outputs scores ``[N, 4 states, 4 levels]`` (boredom, engagement, confusion,
frustration × levels 0–3, :data:`training.daisee.AFFECTIVE_STATES`); a softmax over the
last axis gives level probabilities. Built with ``output="engagement"`` (what ``run.json``
records, so :func:`training.export.export_run` exports it with no further activation), a
model instead returns the runtime's contract: the engagement level probabilities
``[N, 4]``. Training builds the same network with ``output="scores"``; the weights are
the same either way.

* ``frame`` (:class:`FrameEngagementNet`): one aligned face crop in, four heads out. The
  backbone is an emotion architecture of :mod:`training.emotion_models` with its
  classifier removed, fed exactly the input the emotion runner builds from the runtime
  crop (grey, centred 90 %, 64×64).
* ``transfer``: the same network, its backbone initialised from a trained emotion run's
  ``best.pt`` and its heads new, then fine-tuned (Nezami et al.: pre-train on facial
  expressions, fine-tune on engagement).
* ``temporal`` (:class:`TemporalEngagementNet`): a bidirectional GRU over the per-frame
  runtime features of a whole clip (:data:`training.engagement_features.SEQUENCE_FEATURES`),
  pooled over time. It needs a clip's sequence, which the workers' per-crop batches do
  not carry, so it is exported but the workers cannot run it.
* ``features``: :class:`training.engagement_features.OrdinalFeatureModel`.

Class imbalance (DAiSEE: 1 % of clips at engagement 0, 77 % at frustration 0) is handled
with class-weighted cross-entropy per state, weights ``N / (levels · count)`` from the
training labels, capped at :data:`MAX_CLASS_WEIGHT` so a class with a handful of clips
cannot dominate. For the ordinal feature model the same loss is its ordinal likelihood,
because its scores are log-probabilities of a cumulative-link model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from training.daisee import AFFECTIVE_STATES, LEVEL_COUNT
from training.engagement_features import FRAME_FEATURES, SEQUENCE_FEATURES, OrdinalFeatureModel
from training.metrics import classify_metrics
from training.run import TrainingError

#: Index of the engagement state in the model outputs.
ENGAGEMENT_INDEX = AFFECTIVE_STATES.index("engagement")

#: Upper bound of a class weight (inverse frequency), against classes of a few samples.
MAX_CLASS_WEIGHT = 10.0

#: Level names, in output order.
LEVEL_LABELS: tuple[str, ...] = ("very low", "low", "high", "very high")

#: ``output`` of a model used in training: all four states' scores [N, 4, 4].
SCORES = "scores"
#: ``output`` of an exported model: engagement level probabilities [N, 4] (the workers' contract).
ENGAGEMENT = "engagement"


def select_output(scores: torch.Tensor, output: str) -> torch.Tensor:
    """Scores [N, 4, 4] as they are, or the engagement state's level probabilities [N, 4]."""
    if output == SCORES:
        return scores
    return torch.softmax(scores, dim=2)[:, ENGAGEMENT_INDEX]


def _check_output(output: str) -> str:
    if output not in (SCORES, ENGAGEMENT):
        raise TrainingError(f"unknown engagement model output {output!r}; expected {SCORES} or {ENGAGEMENT}")
    return output


class MultiStateHead(nn.Module):
    """A linear layer giving four levels for each of the four affective states."""

    def __init__(self, in_features: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, len(AFFECTIVE_STATES) * LEVEL_COUNT)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scores [N, states, levels]."""
        scores: torch.Tensor = self.linear(self.dropout(features))
        return scores.view(-1, len(AFFECTIVE_STATES), LEVEL_COUNT)


def emotion_backbone(model: nn.Module) -> nn.Module:
    """The feature extractor of an emotion model of :mod:`training.emotion_models`: pixels → [N, D].

    mini-Xception loses its last convolution (one channel per emotion) and gets a global
    average pool instead; the residual CNN keeps its pooled ``features``. The modules are
    shared with ``model``, so copying weights between the two is a ``state_dict`` copy.
    """
    from training.emotion_models import MiniXception, ResidualCNN

    if isinstance(model, ResidualCNN):
        return model.features
    if isinstance(model, MiniXception):
        # network = [..., Conv2d(channels, classes), AdaptiveAvgPool2d, Flatten]
        return nn.Sequential(*list(model.network.children())[:-3], nn.AdaptiveAvgPool2d(1), nn.Flatten())
    raise TrainingError(f"no known backbone in an emotion model of type {type(model).__name__}")


class FrameEngagementNet(nn.Module):
    """Frame-level engagement: an emotion CNN backbone and four state heads."""

    def __init__(self, backbone: str = "mini-xception", input_size: int = 64, dropout: float = 0.3,
                 output: str = ENGAGEMENT) -> None:
        from training.emotion_models import build_emotion_model

        super().__init__()
        self.output = _check_output(output)
        self.backbone_family = backbone
        self.backbone = emotion_backbone(build_emotion_model(backbone))
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            feature_dim = int(self.backbone(torch.zeros(1, 1, input_size, input_size)).flatten(1).shape[1])
            self.backbone.train(was_training)
        self.head = MultiStateHead(feature_dim, dropout)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Grey crops [N, 1, S, S] in 0–255 → scores [N, 4, 4] (or engagement probabilities [N, 4])."""
        scores: torch.Tensor = self.head(self.backbone(image).flatten(1))
        return select_output(scores, self.output)

    def load_backbone(self, emotion_run: Path) -> int:
        """Copy the backbone weights of an emotion run's ``best.pt``; return how many tensors were copied.

        Raises:
            TrainingError: the run is not an emotion run, has no ``best.pt``, or is another architecture.
        """
        from training.run import load_trained_model

        emotion_model, info = load_trained_model(emotion_run)
        if info.task != "emotion":
            raise TrainingError(f"--init {emotion_run}: expected an emotion run, this one is {info.task}")
        if info.model_family != self.backbone_family:
            raise TrainingError(f"--init {emotion_run}: the emotion run is {info.model_family}, this engagement "
                                f"model's backbone is {self.backbone_family}; use --backbone {info.model_family}")
        state = emotion_backbone(emotion_model).state_dict()
        own = self.backbone.state_dict()
        mismatched = [name for name, value in state.items() if name not in own or own[name].shape != value.shape]
        if mismatched or len(state) != len(own):
            raise TrainingError(f"--init {emotion_run}: its weights do not fit this backbone "
                                f"({len(mismatched)} tensors differ, e.g. {mismatched[:3]})")
        self.backbone.load_state_dict(state)
        return len(state)


def frame_engagement_net(backbone: str = "mini-xception", input_size: int = 64, dropout: float = 0.3,
                         output: str = ENGAGEMENT) -> FrameEngagementNet:
    """Factory recorded in ``run.json`` for the frame and transfer families."""
    return FrameEngagementNet(backbone, input_size, dropout, output)


class TemporalEngagementNet(nn.Module):
    """A bidirectional GRU over a clip's per-frame features, mean- and max-pooled over time."""

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, feature_count: int = len(SEQUENCE_FEATURES), hidden: int = 64, dropout: float = 0.2,
                 output: str = ENGAGEMENT) -> None:
        super().__init__()
        self.output = _check_output(output)
        # Standardisation is part of the model (and of its ONNX export); set from training data.
        self.register_buffer("feature_mean", torch.zeros(feature_count))
        self.register_buffer("feature_scale", torch.ones(feature_count))
        self.gru = nn.GRU(feature_count, hidden, batch_first=True, bidirectional=True)
        self.head = MultiStateHead(4 * hidden, dropout)

    def set_scaling(self, rows: NDArray[np.float32]) -> None:
        """Standardise with the training frames' mean and spread."""
        spread = rows.std(axis=0)
        self.feature_mean.copy_(torch.from_numpy(rows.mean(axis=0).astype(np.float32)))
        self.feature_scale.copy_(torch.from_numpy(np.where(spread > 1e-6, spread, 1.0).astype(np.float32)))

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        """Per-frame features [N, T, F] → scores [N, 4, 4] (or engagement probabilities [N, 4])."""
        # An explicit zero state sized from the input keeps the ONNX export valid for any batch size.
        initial = sequence.new_zeros(2, sequence.shape[0], self.gru.hidden_size)
        outputs, _ = self.gru((sequence - self.feature_mean) / self.feature_scale, initial)
        pooled = torch.cat([outputs.mean(dim=1), outputs.amax(dim=1)], dim=1)
        scores: torch.Tensor = self.head(pooled)
        return select_output(scores, self.output)


def temporal_engagement_net(feature_count: int = len(SEQUENCE_FEATURES), hidden: int = 64,
                            dropout: float = 0.2, output: str = ENGAGEMENT) -> TemporalEngagementNet:
    """Factory recorded in ``run.json`` for the temporal family."""
    return TemporalEngagementNet(feature_count, hidden, dropout, output)


class OrdinalScores(nn.Module):
    """The ordinal feature model with the common output: log level probabilities [N, 4, 4]."""

    def __init__(self, feature_count: int = len(FRAME_FEATURES), output: str = ENGAGEMENT) -> None:
        super().__init__()
        self.output = _check_output(output)
        self.ordinal = OrdinalFeatureModel(feature_count)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features [N, 11] → log-probabilities [N, 4, 4] (or engagement probabilities [N, 4])."""
        if self.output == ENGAGEMENT:
            # The cumulative-link probabilities themselves: no log and softmax round trip in the graph.
            probabilities: torch.Tensor = self.ordinal(features)
            return probabilities
        return torch.log(self.ordinal.level_probabilities(features).clamp_min(1e-6))


def ordinal_scores(feature_count: int = len(FRAME_FEATURES), output: str = ENGAGEMENT) -> OrdinalScores:
    """Factory recorded in ``run.json`` for the features family."""
    return OrdinalScores(feature_count, output)


def class_weights(labels: NDArray[np.int64]) -> torch.Tensor:
    """Inverse-frequency weights per state and level, [states, levels], capped at :data:`MAX_CLASS_WEIGHT`."""
    if labels.ndim != 2 or labels.shape[1] != len(AFFECTIVE_STATES) or labels.shape[0] == 0:
        raise TrainingError(f"expected training labels [N>0, {len(AFFECTIVE_STATES)}], got {labels.shape}")
    weights = np.zeros((len(AFFECTIVE_STATES), LEVEL_COUNT), np.float32)
    for state in range(len(AFFECTIVE_STATES)):
        counts = np.bincount(labels[:, state], minlength=LEVEL_COUNT).astype(np.float32)
        # +1 keeps an absent level finite; it gets no gradient in training anyway.
        weights[state] = np.minimum(labels.shape[0] / (LEVEL_COUNT * (counts + 1.0)), MAX_CLASS_WEIGHT)
    return torch.from_numpy(weights)


class WeightedStateLoss:
    """Class-weighted cross-entropy, averaged over the four states (a callable for :func:`training.loop.fit`)."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights

    def __call__(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of scores [N, 4, 4] against levels [N, 4]."""
        weights = self.weights.to(scores.device)
        losses = [nn.functional.cross_entropy(scores[:, state], targets[:, state].long(), weight=weights[state])
                  for state in range(len(AFFECTIVE_STATES))]
        return torch.stack(losses).mean()


def _softmax(scores: NDArray[Any]) -> NDArray[np.float64]:
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    result: NDArray[np.float64] = exponentials / exponentials.sum(axis=-1, keepdims=True)
    return result


def state_metrics(scores: NDArray[Any], targets: NDArray[Any]) -> dict[str, float]:
    """Figures for the epoch log: engagement's (unprefixed, used for model selection) and every state's."""
    if len(scores) == 0:
        return {}
    probabilities = _softmax(scores)
    figures: dict[str, float] = {}
    for index, state in enumerate(AFFECTIVE_STATES):
        metrics = classify_metrics(targets[:, index], probabilities[:, index], LEVEL_LABELS, ordinal_levels=True)
        summary = metrics.summary()
        summary.pop("count", None)
        figures.update({f"{state}_{key}": value for key, value in summary.items()})
        if index == ENGAGEMENT_INDEX:
            figures.update(summary)
    return figures


def clip_probabilities(frame_scores: NDArray[Any],
                       clip_of_frame: Sequence[str]) -> tuple[list[str], NDArray[np.float64]]:
    """Average the frame-level probabilities of each clip: (clip ids, probabilities [clips, 4, 4])."""
    probabilities = _softmax(frame_scores)
    clips = sorted(set(clip_of_frame))
    index = {clip: position for position, clip in enumerate(clips)}
    sums = np.zeros((len(clips), *probabilities.shape[1:]), np.float64)
    counts = np.zeros(len(clips), np.float64)
    for row, clip in enumerate(clip_of_frame):
        sums[index[clip]] += probabilities[row]
        counts[index[clip]] += 1
    return clips, sums / counts[:, None, None]
