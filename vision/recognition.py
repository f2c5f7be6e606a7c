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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from kernel.types import ByteArray, FloatArray, as_float32
from vision.geometry import arcface_crop

FACE_API_INPUT_SIZE = 150
"""Height and width of face-api's recognition input (``model_export.face_api_recognition.INPUT_SIZE``)."""
FACE_API_EMBEDDING_SIZE = 128
"""Length of face-api's face descriptor."""


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
        from vision.detection import load_insightface_model

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
        from kernel.runtime import create_session

        self._session = create_session(model_path, preference=preference, intra_op_threads=intra_op_threads,
                                       label="face-api recogniser")
        self._input_name = self._session.get_inputs()[0].name
        self.scale = scale

    def embed(self, image: ByteArray, keypoints: FloatArray) -> FloatArray:
        """Unit-length descriptors [K, 128] of the faces given by their keypoints [K, 5, 2]."""
        if keypoints.shape[0] == 0:
            return np.zeros((0, FACE_API_EMBEDDING_SIZE), np.float32)
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


def load_embedder(path: Path, facts: Mapping[str, str], *, preference: str = "auto",
                  intra_op_threads: int = 0) -> Embedder:
    """The embedder for a recogniser file: face-api's or an ArcFace-style model.

    ``facts`` are the manifest entry's ``extra``: which family the model belongs to and how
    its similarities read (``embedding``, ``input_mean``, ``different_person_cosine``,
    ``same_person_cosine``); without them (a file given by path) it is taken to be an
    ArcFace-style model.
    """
    extra = facts
    scale = ARCFACE_SCALE
    if "different_person_cosine" in extra:
        scale = SimilarityScale(float(extra["different_person_cosine"]), float(extra["same_person_cosine"]))
    if extra.get("embedding") == "face-api":
        return FaceApiEmbedder(path, scale=scale, preference=preference, intra_op_threads=intra_op_threads)
    return ArcFaceEmbedder(path, imagenet_normalisation=extra.get("input_mean") == "imagenet",
                           preference=preference, intra_op_threads=intra_op_threads, scale=scale)


# ---------------------------------------------------------------------------------------
# face-api's crop and input, as face-api makes them at run time
# ---------------------------------------------------------------------------------------

DLIB_ALIGN_REL_X: float = 0.5
"""``relX`` of face-api's ``alignDlib``: horizontal position of the eyes/mouth centroid in the crop."""
DLIB_ALIGN_REL_Y: float = 0.43
"""``relY``: vertical position of the eyes/mouth centroid in the crop."""
DLIB_ALIGN_REL_SCALE: float = 0.45
"""``relScale``: the mean eye-to-mouth distance as a fraction of the crop's side."""


def face_api_descriptor_box(left_eye: tuple[float, float], right_eye: tuple[float, float],
                            mouth: tuple[float, float], image_width: int, image_height: int
                            ) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` of the image region face-api crops for a face's descriptor.

    ``FaceLandmarks.alignDlib`` followed by ``extractFaceTensors``' ``clipAtImageBorders`` and
    ``floor``. The points are pixel coordinates of the eye centres and the mouth centre (face-api
    averages its 68 landmarks: 36–41, 42–47 and 48–67; a five-point detector's eye points and the
    midpoint of its mouth corners approximate them). A width or height of 0 or less means face-api
    would drop the face.
    """
    points = np.asarray([left_eye, right_eye, mouth], dtype=np.float64)
    eye_to_mouth = float(np.mean(np.linalg.norm(points[2] - points[:2], axis=1)))
    size = math.floor(eye_to_mouth / DLIB_ALIGN_REL_SCALE)
    centre_x, centre_y = (float(value) for value in points.mean(axis=0))
    x = math.floor(max(0.0, centre_x - DLIB_ALIGN_REL_X * size))
    y = math.floor(max(0.0, centre_y - DLIB_ALIGN_REL_Y * size))
    # alignDlib caps the side at image size + x (a no-op, kept as written); clipAtImageBorders
    # then cuts the square at the right and bottom borders, so border faces become non-square.
    width = min(min(size, image_width + x), image_width - x)
    height = min(min(size, image_height + y), image_height - y)
    return x, y, width, height


def face_api_input(face_rgb: npt.NDArray[Any]) -> FloatArray:
    """The ``[3, 150, 150]`` network input face-api builds from an ``[H, W, 3]`` RGB face tensor.

    ``NetInput.toBatchTensor(150, true)`` for a tensor input: ``padToSquare`` with zeros, the
    shorter side extended by ``round(diff / 2)`` after (bottom/right) and the rest before, then
    (unless already 150×150) ``tf.image.resizeBilinear`` with ``alignCorners=false`` and
    ``halfPixelCenters=false``: output pixel ``i`` samples the source at ``i · in / out``,
    clamped to the last row and column. The TFJS CPU backend interpolates in double
    precision; this interpolates the same taps in float32 (``cv2.remap``), within 0.002 of
    it on 0–255 values and ten times faster (tests/test_face_api.py holds it to a
    double-precision transcription). (Browser canvases go through
    ``imageToSquare``/``drawImage`` instead, whose resampling is the browser's.)
    """
    image = np.asarray(face_rgb, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an RGB face [H, W, 3], got {image.shape}")
    height, width = int(image.shape[0]), int(image.shape[1])
    if height != width:
        difference = abs(height - width)
        after = math.floor(difference * 0.5 + 0.5)  # JavaScript's Math.round rounds halves up
        pad = (difference - after, after)
        image = as_float32(np.pad(image, ((0, 0), pad, (0, 0)) if height > width else (pad, (0, 0), (0, 0))))
    if image.shape[0] != FACE_API_INPUT_SIZE:
        taps = (image.shape[0] / FACE_API_INPUT_SIZE) * np.arange(FACE_API_INPUT_SIZE, dtype=np.float64)
        columns = np.tile(taps.astype(np.float32), (FACE_API_INPUT_SIZE, 1))
        # Replicating the border is TF's clamp of the upper tap to the last row and column.
        image = as_float32(cv2.remap(np.ascontiguousarray(image), columns, np.ascontiguousarray(columns.T),
                                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    resized: FloatArray = np.ascontiguousarray(image.transpose(2, 0, 1))
    return resized
