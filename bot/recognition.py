"""Face embeddings that let the tracker keep a student's id through cuts, layout changes and absences.

Two families of recogniser are supported, each with its own crop and its own idea of how
similar two faces of one person are:

* :class:`ArcFaceEmbedder`: ArcFace-style ONNX models (MobileFaceNet, insightface packs)
  through insightface's ``ArcFaceONNX`` class, on the standard five-point aligned crop.
* :class:`FaceApiEmbedder`: face-api's recognition network (dlib's ResNet, converted by
  :mod:`model_export.face_api_recognition`), on face-api's own axis-aligned crop and input.
  It is the default recogniser: its weights come from a pinned npm archive.

Cosine similarities mean different things for different models (face-api's descriptors are
never centred, so two strangers still score about 0.86), so every embedder carries a
:class:`SimilarityScale` measured for its model (docs/models.md, "Recogniser"). Embeddings
live in memory for one session only: nothing is stored and nothing is compared across sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from bot.geometry import arcface_crop
from classlens.types import ByteArray, FloatArray, as_float32

if TYPE_CHECKING:
    from model_export.cache import ResolvedModel


@dataclass(frozen=True)
class SimilarityScale:
    """Where one recogniser's cosine similarities say "different people" and "same person"."""

    different: float
    """Cosine at or below which two faces are taken for different people: appearance then vetoes a
    match that position alone would make (a cut that puts another person where someone sat)."""
    same: float
    """Cosine at or above which two faces are taken for the same person with full confidence."""

    def appearance(self, cosine: FloatArray) -> FloatArray:
        """Appearance score 0–0.9 of each cosine: 0 at ``different``, 0.9 from ``same`` up.

        The cap below 1 leaves room for position to tell apart two equally likely faces.
        """
        span = max(self.same - self.different, 1e-6)
        return as_float32(np.clip((cosine - self.different) / span, 0.0, 1.0) * 0.9)


#: MobileFaceNet's scale: the same person in one video scores 0.84–0.94 on clear frames and
#: about 0.3 at worst (a face half hidden by hands); different people stay below 0.3 at the
#: 99th percentile of the group photos.
ARCFACE_SCALE = SimilarityScale(different=0.3, same=0.55)


class Embedder(Protocol):
    """What the tracker needs of a recogniser."""

    scale: SimilarityScale
    """How this model's cosine similarities read."""

    def embed(self, image: ByteArray, keypoints: FloatArray) -> FloatArray:
        """Unit-length embeddings [K, D] of the faces given by their five keypoints [K, 5, 2]."""
        ...


class ArcFaceEmbedder:
    """Face embeddings through insightface's ``ArcFaceONNX`` class (five-point aligned crop)."""

    def __init__(self, model_path: Path, *, imagenet_normalisation: bool, preference: str = "auto",
                 intra_op_threads: int = 0, scale: SimilarityScale = ARCFACE_SCALE) -> None:
        from bot.detection import load_insightface_model

        model = load_insightface_model(model_path, "recognition", preference=preference,
                                       intra_op_threads=intra_op_threads)
        if imagenet_normalisation:
            # insightface assumes (x-127.5)/127.5; MobileFaceNet was trained with ImageNet statistics.
            model.input_mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1) * 255.0
            model.input_std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1) * 255.0
        self._model = model
        self._size = int(model.input_size[0])
        self._fixed_batch = model.input_shape[0] == 1
        self.scale = scale

    def embed(self, image: ByteArray, keypoints: FloatArray) -> FloatArray:
        """Unit-length embeddings [K, D] of the faces given by their keypoints [K, 5, 2]."""
        if keypoints.shape[0] == 0:
            return np.zeros((0, 1), np.float32)
        crops = np.stack([arcface_crop(image, k, self._size) for k in keypoints])
        rgb = crops[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
        if self._fixed_batch:
            # Models exported with batch size 1 (MobileFaceNet) take one face at a time.
            features: FloatArray = as_float32(np.concatenate([self._model.forward(rgb[i:i + 1])
                                                              for i in range(rgb.shape[0])]))
        else:
            features = as_float32(self._model.forward(rgb))
        return unit_rows(features)


class FaceApiEmbedder:
    """face-api's 128-d face descriptors, on face-api's own crop, as unit vectors."""

    def __init__(self, model_path: Path, *, scale: SimilarityScale, preference: str = "auto",
                 intra_op_threads: int = 0) -> None:
        from classlens.runtime import create_session
        from model_export.face_api_recognition import INPUT_NAME

        self._session = create_session(model_path, preference=preference, intra_op_threads=intra_op_threads,
                                       label="face-api recogniser")
        self._input_name = INPUT_NAME
        self.scale = scale

    def embed(self, image: ByteArray, keypoints: FloatArray) -> FloatArray:
        """Unit-length descriptors [K, 128] of the faces given by their keypoints [K, 5, 2]."""
        from model_export.face_api_recognition import EMBEDDING_SIZE, face_api_descriptor_box, face_api_input

        if keypoints.shape[0] == 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        height, width = image.shape[:2]
        inputs = []
        for points in keypoints.astype(np.float64):
            # A five-point detector's mouth corners stand in for face-api's 20 mouth landmarks.
            mouth = (points[3] + points[4]) / 2.0
            x, y, box_width, box_height = face_api_descriptor_box(
                (float(points[0][0]), float(points[0][1])), (float(points[1][0]), float(points[1][1])),
                (float(mouth[0]), float(mouth[1])), width, height)
            face = image[y:y + max(box_height, 1), x:x + max(box_width, 1)]
            if face.size == 0:  # a face cut off by the frame border: embed what the keypoints span
                face = image[:1, :1]
            inputs.append(face_api_input(cv2.cvtColor(np.ascontiguousarray(face), cv2.COLOR_BGR2RGB)))
        descriptors = self._session.run(None, {self._input_name: np.stack(inputs)})[0]
        return unit_rows(as_float32(descriptors))


def unit_rows(features: FloatArray) -> FloatArray:
    """Every row scaled to unit length (a zero row stays zero)."""
    norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-6)
    return as_float32(features / norms)


def load_embedder(model: ResolvedModel, *, preference: str = "auto", intra_op_threads: int = 0) -> Embedder:
    """The embedder for a resolved recogniser: face-api's or an ArcFace-style model.

    The manifest entry says which family a named model belongs to and how its similarities
    read (``extra``: ``embedding``, ``input_mean``, ``different_person_cosine``,
    ``same_person_cosine``); a file given by path is taken to be an ArcFace-style model.
    """
    extra = model.spec.extra if model.spec is not None else {}
    scale = ARCFACE_SCALE
    if "different_person_cosine" in extra:
        scale = SimilarityScale(float(extra["different_person_cosine"]), float(extra["same_person_cosine"]))
    if extra.get("embedding") == "face-api":
        return FaceApiEmbedder(model.path, scale=scale, preference=preference, intra_op_threads=intra_op_threads)
    return ArcFaceEmbedder(model.path, imagenet_normalisation=extra.get("input_mean") == "imagenet",
                           preference=preference, intra_op_threads=intra_op_threads, scale=scale)
