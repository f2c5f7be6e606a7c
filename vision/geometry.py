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

from kernel.types import CROP_SIZE, ByteArray, FloatArray, as_float32

#: How much of the crop the ArcFace template's face occupies: below 1 adds a margin.
CROP_TEMPLATE_SCALE = 0.78

#: Frontal layout of the five keypoints (insightface's ArcFace template), the zero of head pose:
#: the nose tip sits on the eyes' midline, 0.5715 eye-spans below the eye line.
_TEMPLATE_NOSE_DROP = (71.7366 - 51.5989) / (73.5318 - 38.2946)

#: Depth of the nose tip in front of the eyes, in eye spans (about 32 mm over 62 mm for an adult).
_NOSE_DEPTH = 32.0 / 62.0


def _crop_template(size: int, scale: float = CROP_TEMPLATE_SCALE) -> FloatArray:
    template = face_align.arcface_dst.astype(np.float32) * (size / 112.0)
    centre = np.float32(size / 2.0)
    return as_float32((template - centre) * scale + centre)


_TEMPLATE = _crop_template(CROP_SIZE)


def _warp(image: ByteArray, keypoints: FloatArray, template: FloatArray, size: int) -> ByteArray:
    """Similarity-warp the face whose keypoints are given onto the template."""
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


def align_face(image: ByteArray, keypoints: FloatArray, size: int = CROP_SIZE) -> ByteArray:
    """Warp one face to an upright ``size``×``size`` crop with a margin around the face."""
    template = _TEMPLATE if size == CROP_SIZE else _crop_template(size)
    return _warp(image, keypoints, template, size)


def arcface_crop(image: ByteArray, keypoints: FloatArray, size: int = 112) -> ByteArray:
    """The standard ArcFace-aligned crop (insightface's template, no margin) that embedding models expect."""
    return _warp(image, keypoints, _crop_template(size, 1.0), size)


def head_pose(keypoints: FloatArray, frame_size: tuple[int, int]) -> tuple[float, float, float]:
    """Estimate (yaw, pitch, roll) in degrees from five keypoints.

    Roll is the angle of the eye line. After undoing it, yaw follows from how far the
    nose tip sits beside the midpoint of the eyes, and pitch from how far it sits below
    the eye line, both measured in eye spans against the frontal template and a typical
    nose depth. The mouth corners are not used: a smile moves them, not the head. Yaw is
    positive when the face turns towards the image's right, pitch positive when it tilts
    up. This is a few degrees accurate near frontal and saturates past about 60°, where
    the keypoints themselves become unreliable; it tells "facing the screen" from
    "turned away", it is not a measurement.
    """
    del frame_size  # the estimate is scale-free; kept for a future perspective-aware model
    points = keypoints.astype(np.float64)
    left_eye, right_eye, nose = points[0], points[1], points[2]
    eye_vector = right_eye - left_eye
    roll = math.degrees(math.atan2(eye_vector[1], eye_vector[0]))
    angle = -math.radians(roll)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    nose_r = rotation @ (nose - (left_eye + right_eye) / 2.0)
    eye_span = max(float(np.hypot(*eye_vector)), 1e-6)
    # The eye span shrinks with cos(yaw); the nose moves sideways with sin(yaw): tan(yaw) = offset / depth.
    yaw_radians = math.atan(float(nose_r[0]) / eye_span / _NOSE_DEPTH)
    true_span = eye_span / max(math.cos(yaw_radians), 0.3)
    drop = float(nose_r[1]) / true_span
    # drop(p) = A·cos p − D·sin p = R·cos(p + φ): solve for the pitch p.
    radius = math.hypot(_TEMPLATE_NOSE_DROP, _NOSE_DEPTH)
    phase = math.atan2(_NOSE_DEPTH, _TEMPLATE_NOSE_DROP)
    pitch_radians = math.acos(max(-1.0, min(1.0, drop / radius))) - phase
    return math.degrees(yaw_radians), math.degrees(pitch_radians), roll


def head_poses(keypoints: FloatArray, frame_size: tuple[int, int]) -> FloatArray:
    """Head pose of every face, float32 [K, 3]."""
    result = np.zeros((keypoints.shape[0], 3), np.float32)
    for index in range(keypoints.shape[0]):
        result[index] = head_pose(keypoints[index], frame_size)
    return result
