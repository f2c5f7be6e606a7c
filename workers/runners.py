"""ONNX model runners behind one small interface.

A runner owns one onnxruntime session, loads once, warms up once with a dummy batch,
logs which execution provider really runs it, and turns a typed batch into numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from classlens.errors import ModelSupplyError
from classlens.runtime import create_session
from classlens.types import EMOTION_LABELS, ByteArray, FloatArray

logger = logging.getLogger(__name__)


class OnnxRunner:
    """One onnxruntime session with a single float32 input and output."""

    label = "model"

    def __init__(self, model_path: Path, *, preference: str = "auto", intra_op_threads: int = 0) -> None:
        try:
            self.session: Any = create_session(
                model_path, preference=preference, intra_op_threads=intra_op_threads,
                label=f"{self.label} {model_path.parent.name}/{model_path.name}",
            )
        except ModelSupplyError:
            raise
        except Exception as exc:
            if "cuda" in str(exc).lower() or preference == "cuda":
                raise
            raise ModelSupplyError(f"{model_path}: onnxruntime cannot load this model ({exc})") from None
        self.model_path = model_path
        self.input_name: str = self.session.get_inputs()[0].name
        self.input_shape: list[Any] = list(self.session.get_inputs()[0].shape)
        self.output_name: str = self.session.get_outputs()[0].name
        self.providers: list[str] = list(self.session.get_providers())

    def run(self, inputs: FloatArray) -> FloatArray:
        """Run the model on a float32 batch."""
        outputs = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(inputs, np.float32)})
        return np.asarray(outputs[0], dtype=np.float32)


class EmotionRunner(OnnxRunner):
    """FER2013-style emotion classifier over grey face crops (7 classes, :data:`EMOTION_LABELS`)."""

    label = "emotion model"

    #: Share of the aligned crop's side the emotion model sees, centred: FER2013 faces are
    #: framed from forehead to chin, a little tighter than the crops that travel.
    crop_fraction = 0.9

    def __init__(self, model_path: Path, *, preference: str = "auto", intra_op_threads: int = 0) -> None:
        super().__init__(model_path, preference=preference, intra_op_threads=intra_op_threads)
        shape = self.input_shape
        if len(shape) != 4 or shape[1] != 1 or not isinstance(shape[2], int):
            raise ModelSupplyError(f"{model_path}: expected an emotion model with input [N,1,S,S], got {shape}")
        self.size = int(shape[2])
        outputs = self.session.get_outputs()[0].shape
        if outputs[-1] != len(EMOTION_LABELS):
            raise ModelSupplyError(f"{model_path}: expected {len(EMOTION_LABELS)} emotion outputs, got {outputs}")
        self.run(np.zeros((1, 1, self.size, self.size), np.float32))

    def preprocess(self, crops: ByteArray) -> FloatArray:
        """BGR uint8 crops [N,S,S,3] → grey float32 [N,1,size,size] in 0–255."""
        side = crops.shape[1]
        margin = round(side * (1 - self.crop_fraction) / 2)
        result = np.empty((crops.shape[0], 1, self.size, self.size), np.float32)
        for index, crop in enumerate(crops):
            grey = cv2.cvtColor(crop[margin:side - margin, margin:side - margin], cv2.COLOR_BGR2GRAY)
            result[index, 0] = cv2.resize(grey, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return result

    def predict(self, crops: ByteArray) -> FloatArray:
        """Emotion probabilities [N,7] for BGR crops."""
        if crops.shape[0] == 0:
            return np.zeros((0, len(EMOTION_LABELS)), np.float32)
        return self.run(self.preprocess(crops))


class EngagementRunner(OnnxRunner):
    """Engagement level 0–3 from per-face attention cues and emotion probabilities."""

    label = "engagement model"

    def __init__(self, model_path: Path, *, preference: str = "auto", intra_op_threads: int = 0) -> None:
        super().__init__(model_path, preference=preference, intra_op_threads=intra_op_threads)
        from model_export.engagement_baseline import ENGAGEMENT_FEATURES

        self.feature_names = ENGAGEMENT_FEATURES
        if len(self.input_shape) != 2 or self.input_shape[1] != len(self.feature_names):
            raise ModelSupplyError(
                f"{model_path}: expected an engagement model with input [N,{len(self.feature_names)}], "
                f"got {self.input_shape}"
            )
        self.run(np.zeros((1, len(self.feature_names)), np.float32))

    def predict(self, features: FloatArray) -> FloatArray:
        """Level probabilities [N,4]."""
        if features.shape[0] == 0:
            return np.zeros((0, 4), np.float32)
        return self.run(features)
