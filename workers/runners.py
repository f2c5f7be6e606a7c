"""ONNX model runners behind one small interface.

A runner owns one onnxruntime session, loads once, warms up once with a dummy batch,
logs which execution provider really runs it, and turns a typed batch into numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kernel.errors import ModelSupplyError
from kernel.runtime import create_session
from kernel.types import EMOTION_LABELS, ByteArray, FloatArray

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


DEFAULT_CROP_FRACTION = 0.9
"""Share of the aligned crop's side a crop model sees, centred, when its input spec does not say:
FER2013 faces are framed from forehead to chin, a little tighter than the crops that travel."""


def emotion_model_input(
    crops: ByteArray, size: int, *, crop_fraction: float = DEFAULT_CROP_FRACTION, colour: str = "grey",
    value_range: str = "0-255",
) -> FloatArray:
    """BGR uint8 aligned crops [N,S,S,3] → the emotion model's float32 input [N,C,size,size].

    The centred ``crop_fraction`` of the crop is kept, converted to grey (C=1) or RGB/BGR
    (C=3), resized with area interpolation and scaled to ``value_range``. Training
    (:mod:`training.emotion_data`) calls this same function, so a trained model sees
    exactly what it will see in the workers.
    """
    side = crops.shape[1]
    margin = round(side * (1 - crop_fraction) / 2)
    channels = 1 if colour == "grey" else 3
    result = np.empty((crops.shape[0], channels, size, size), np.float32)
    for index, crop in enumerate(crops):
        framed = crop[margin:side - margin, margin:side - margin]
        if colour == "grey":
            result[index, 0] = cv2.resize(cv2.cvtColor(framed, cv2.COLOR_BGR2GRAY), (size, size),
                                          interpolation=cv2.INTER_AREA)
        else:
            converted = cv2.cvtColor(framed, cv2.COLOR_BGR2RGB) if colour == "rgb" else framed
            result[index] = cv2.resize(converted, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    if value_range == "0-1":
        result /= 255.0
    return result


class EmotionRunner(OnnxRunner):
    """FER2013-style emotion classifier over face crops (7 classes, :data:`EMOTION_LABELS`).

    A model exported by ``classlens export`` declares its input in the ONNX metadata
    ``classlens.input_spec`` (crop fraction, colour, value range) and its class order in
    ``classlens.labels``; both are honoured. Models without them (the default) get grey
    0–255 pixels of the centred 90 % of the crop.
    """

    label = "emotion model"

    #: Share of the aligned crop's side the emotion model sees, centred (:data:`DEFAULT_CROP_FRACTION`).
    crop_fraction = DEFAULT_CROP_FRACTION

    def __init__(self, model_path: Path, *, preference: str = "auto", intra_op_threads: int = 0) -> None:
        super().__init__(model_path, preference=preference, intra_op_threads=intra_op_threads)
        metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        spec = _json_metadata(model_path, metadata, "classlens.input_spec", {})
        self.crop_fraction = float(spec.get("crop_fraction", type(self).crop_fraction))
        self.colour = str(spec.get("colour", "grey"))
        self.value_range = str(spec.get("value_range", "0-255"))
        labels = _json_metadata(model_path, metadata, "classlens.labels", list(EMOTION_LABELS))
        if tuple(labels) != EMOTION_LABELS:
            raise ModelSupplyError(
                f"{model_path}: the model's classes {labels} are not the runtime's {list(EMOTION_LABELS)} in order"
            )
        channels = 1 if self.colour == "grey" else 3
        shape = self.input_shape
        if len(shape) != 4 or shape[1] != channels or not isinstance(shape[2], int):
            raise ModelSupplyError(
                f"{model_path}: expected an emotion model with input [N,{channels},S,S], got {shape}")
        self.size = int(shape[2])
        outputs = self.session.get_outputs()[0].shape
        if outputs[-1] != len(EMOTION_LABELS):
            raise ModelSupplyError(f"{model_path}: expected {len(EMOTION_LABELS)} emotion outputs, got {outputs}")
        self.run(np.zeros((1, channels, self.size, self.size), np.float32))

    def preprocess(self, crops: ByteArray) -> FloatArray:
        """BGR uint8 crops [N,S,S,3] → float32 [N,C,size,size] as the model's input spec says."""
        return emotion_model_input(crops, self.size, crop_fraction=self.crop_fraction, colour=self.colour,
                                   value_range=self.value_range)

    def predict(self, crops: ByteArray) -> FloatArray:
        """Emotion probabilities [N,7] for BGR crops."""
        if crops.shape[0] == 0:
            return np.zeros((0, len(EMOTION_LABELS)), np.float32)
        return self.run(self.preprocess(crops))


def _json_metadata(model_path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    """A JSON value from the ONNX metadata, or ``default`` when the model has none."""
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except ValueError:
        raise ModelSupplyError(f"{model_path}: metadata {key} is not valid JSON") from None


class EngagementRunner(OnnxRunner):
    """Engagement level 0–3 from per-face attention cues and emotion probabilities, or from the crop.

    The default takes the feature rows of :data:`ENGAGEMENT_FEATURES`. A model trained on
    DAiSEE by ``classlens train engagement`` declares its input in ``classlens.input_spec``:
    ``features`` (the same rows; its ``features`` list must match), or ``image`` (a frame
    model: the crop is prepared as the spec says, like the emotion runner does). A
    ``sequence`` model needs a whole clip per prediction, which crop batches do not carry,
    so it is refused with a message that says so.
    """

    label = "engagement model"

    def __init__(self, model_path: Path, *, preference: str = "auto", intra_op_threads: int = 0) -> None:
        super().__init__(model_path, preference=preference, intra_op_threads=intra_op_threads)
        from kernel.types import ENGAGEMENT_FEATURES

        self.feature_names = ENGAGEMENT_FEATURES
        metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        spec = _json_metadata(model_path, metadata, "classlens.input_spec", {})
        self.input_kind = str(spec.get("kind", "features"))
        if self.input_kind == "sequence":
            raise ModelSupplyError(
                f"{model_path}: a temporal (sequence) engagement model needs a clip of frames per prediction; "
                "the workers score one crop at a time and cannot run it (use a frame or features model)")
        if self.input_kind == "image":
            self.crop_fraction = float(spec.get("crop_fraction", DEFAULT_CROP_FRACTION))
            self.colour = str(spec.get("colour", "grey"))
            self.value_range = str(spec.get("value_range", "0-255"))
            channels = 1 if self.colour == "grey" else 3
            shape = self.input_shape
            if len(shape) != 4 or shape[1] != channels or not isinstance(shape[2], int):
                raise ModelSupplyError(f"{model_path}: expected an image engagement model with input "
                                       f"[N,{channels},S,S], got {self.input_shape}")
            self.size = int(self.input_shape[2])
            self.run(np.zeros((1, channels, self.size, self.size), np.float32))
            return
        if tuple(spec.get("features", ENGAGEMENT_FEATURES)) != ENGAGEMENT_FEATURES:
            raise ModelSupplyError(f"{model_path}: the model's features {spec.get('features')} are not the "
                                   f"runtime's {list(ENGAGEMENT_FEATURES)} in order")
        if len(self.input_shape) != 2 or self.input_shape[1] != len(self.feature_names):
            raise ModelSupplyError(
                f"{model_path}: expected an engagement model with input [N,{len(self.feature_names)}], "
                f"got {self.input_shape}"
            )
        self.run(np.zeros((1, len(self.feature_names)), np.float32))

    def predict(self, features: FloatArray, crops: ByteArray | None = None) -> FloatArray:
        """Level probabilities [N,4] from the feature rows, or from the crops for an image model."""
        if features.shape[0] == 0:
            return np.zeros((0, 4), np.float32)
        if self.input_kind == "image":
            if crops is None:
                raise ModelSupplyError(f"{self.model_path}: this engagement model reads face crops; none were given")
            return self.run(emotion_model_input(crops, self.size, crop_fraction=self.crop_fraction,
                                                colour=self.colour, value_range=self.value_range))
        return self.run(features)
