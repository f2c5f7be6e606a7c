"""Geometry of a face from its five keypoints: aligned crops and head pose.

Crops are aligned with insightface's five-point similarity transform (its ArcFace
template), scaled so that the crop keeps some forehead and chin around the face:
emotion models trained on FER2013 saw loosely framed faces, not tight ArcFace crops.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from insightface.utils import face_align

from classlens.types import CROP_SIZE, ByteArray, FloatArray

#: How much of the crop the ArcFace template's face occupies: below 1 adds a margin.
CROP_TEMPLATE_SCALE = 0.78

#: Frontal layout of the five keypoints (insightface's ArcFace template), the zero of head pose:
#: where the nose sits across the eye line and between the eye and mouth lines.
_TEMPLATE_NOSE_ACROSS = 0.0
_TEMPLATE_NOSE_DOWN = (71.7366 - 51.5989) / (92.2848 - 51.5989)

#: Nose tip depth over inter-ocular distance, and over eye-to-mouth height, of an adult
#: face (about 32 mm, 62 mm and 72 mm): how far the nose moves in the image per degree.
_NOSE_DEPTH_PER_EYE_SPAN = 32.0 / 62.0
_NOSE_DEPTH_PER_FACE_HEIGHT = 32.0 / 72.0


def _crop_template(size: int) -> FloatArray:
    template = face_align.arcface_dst.astype(np.float32) * (size / 112.0)
    centre = np.float32(size / 2.0)
    return ((template - centre) * CROP_TEMPLATE_SCALE + centre).astype(np.float32)


_TEMPLATE = _crop_template(CROP_SIZE)


def align_face(image: ByteArray, keypoints: FloatArray, size: int = CROP_SIZE) -> ByteArray:
    """Warp one face to an upright ``size``×``size`` crop from its five keypoints."""
    template = _TEMPLATE if size == CROP_SIZE else _crop_template(size)
    matrix, _ = cv2.estimateAffinePartial2D(keypoints.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        # Degenerate keypoints (all on one point): fall back to a plain resize of the box around them.
        x1, y1 = keypoints.min(axis=0)
        x2, y2 = keypoints.max(axis=0)
        scale = size / max(float(x2 - x1), float(y2 - y1), 1.0) * 0.5
        matrix = np.array([[scale, 0, size / 2 - scale * (x1 + x2) / 2],
                           [0, scale, size / 2 - scale * (y1 + y2) / 2]], np.float64)
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    return np.ascontiguousarray(crop, dtype=np.uint8)


def arcface_crop(image: ByteArray, keypoints: FloatArray, size: int = 112) -> ByteArray:
    """The standard ArcFace-aligned crop that face-embedding models expect."""
    return np.ascontiguousarray(face_align.norm_crop(image, landmark=keypoints, image_size=size), dtype=np.uint8)


def head_pose(keypoints: FloatArray, frame_size: tuple[int, int]) -> tuple[float, float, float]:
    """Estimate (yaw, pitch, roll) in degrees from five keypoints.

    Roll is the angle of the eye line. After undoing it, yaw follows from how far the
    nose tip sits beside the midpoint of the eyes, and pitch from how far it sits between
    the eye line and the mouth line, both relative to the frontal template and scaled by
    an adult face's nose depth. Yaw is positive when the face turns towards the image's
    right, pitch positive when it tilts up. This is a few degrees accurate near frontal
    and saturates past about 60°, where the keypoints themselves become unreliable; it is
    meant to tell "facing the screen" from "turned away", not for measurement.
    """
    del frame_size  # the estimate is scale-free; kept for a future perspective-aware model
    points = keypoints.astype(np.float64)
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    eye_vector = right_eye - left_eye
    roll = math.degrees(math.atan2(eye_vector[1], eye_vector[0]))
    angle = -math.radians(roll)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    eye_mid = (left_eye + right_eye) / 2.0
    mouth_mid = (mouth_left + mouth_right) / 2.0
    nose_r = rotation @ (nose - eye_mid)
    mouth_r = rotation @ (mouth_mid - eye_mid)
    eye_span = max(float(np.hypot(*eye_vector)), 1e-6)
    face_height = max(float(mouth_r[1]), 1e-6)
    across = float(nose_r[0]) / eye_span - _TEMPLATE_NOSE_ACROSS
    down = float(nose_r[1]) / face_height
    # The eye span itself shrinks with cos(yaw), hence atan rather than asin.
    yaw = math.degrees(math.atan(across / _NOSE_DEPTH_PER_EYE_SPAN))
    sine = (_TEMPLATE_NOSE_DOWN - down) / _NOSE_DEPTH_PER_FACE_HEIGHT
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, sine))))
    return yaw, pitch, roll


def head_poses(keypoints: FloatArray, frame_size: tuple[int, int]) -> FloatArray:
    """Head pose of every face, float32 [K, 3]."""
    result = np.zeros((keypoints.shape[0], 3), np.float32)
    for index in range(keypoints.shape[0]):
        result[index] = head_pose(keypoints[index], frame_size)
    return result
