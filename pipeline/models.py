"""The configured models of the capture and inference sides, resolved and loaded once per process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernel.errors import ConfigurationError
from kernel.settings import ENGAGEMENT_MODEL_READING_EXPRESSIONS, ENGAGEMENT_MODEL_WITHOUT_EMOTION, Settings
from model_export.cache import ModelCache, resolve_model
from vision.detection import FaceDetector
from vision.recognition import Embedder, load_embedder
from workers.inference import InferenceModels
from workers.runners import EmotionRunner, EngagementRunner
from workers.shared_trunk import SharedTrunkRunner

#: Capture-model settings: a process keeps one loaded detector (and recognizer) per distinct value.
CAPTURE_SETTINGS: tuple[str, ...] = (
    "detector", "recognizer", "detector_input_size", "detection_threshold", "min_face_pixels",
    "execution_provider", "intra_op_threads", "model_cache_dir", "local_models_dir", "package_index_url",
)


def model_cache_for(settings: Settings) -> ModelCache:
    """The model cache configured by the settings."""
    return ModelCache(settings.model_cache_dir, local_models_dir=settings.local_models_dir,
                      index_url=settings.package_index_url)


def _runner_options(settings: Settings) -> dict[str, Any]:
    """Execution provider and threads, as every onnxruntime model of the pipeline takes them."""
    return {"preference": settings.execution_provider, "intra_op_threads": settings.intra_op_threads}


@dataclass
class CaptureModels:
    """The capture side's models: the detector and the optional recogniser."""

    detector: FaceDetector
    """Face detector."""
    embedder: Embedder | None
    """Optional face-embedding model for re-identification within a session."""
    provenance: dict[str, dict[str, object]]
    """Role → provenance of the models above, recorded with the analysis."""


def capture_key(settings: Settings) -> tuple[object, ...]:
    """What distinguishes one loaded set of capture models from another."""
    return tuple(getattr(settings, name) for name in CAPTURE_SETTINGS)


def load_capture_models(settings: Settings) -> CaptureModels:
    """Resolve (pulling into the cache if needed) and load the detector and the optional recognizer."""
    cache = model_cache_for(settings)
    options = _runner_options(settings)
    detector_model = resolve_model(cache, settings.detector)
    detector = FaceDetector(detector_model.path, input_size=settings.detector_input_size,
                            threshold=settings.detection_threshold, min_face_pixels=settings.min_face_pixels,
                            **options)
    provenance: dict[str, dict[str, object]] = {"detector": detector_model.provenance()}
    embedder = None
    if settings.recognizer:
        embedder, provenance["recognizer"] = load_recognizer(settings, cache)
    return CaptureModels(detector, embedder, provenance)


def load_recognizer(settings: Settings, cache: ModelCache | None = None) -> tuple[Embedder, dict[str, object]]:
    """Resolve (pulling into the cache if needed) and load the configured recogniser, with its provenance."""
    if not settings.recognizer:
        raise ConfigurationError("no recogniser is configured (the setting recognizer is empty)")
    model = resolve_model(cache or model_cache_for(settings), settings.recognizer)
    facts = model.spec.extra if model.spec is not None else {}
    return load_embedder(model.path, facts, **_runner_options(settings)), model.provenance()


def load_inference_models(settings: Settings) -> InferenceModels:
    """Resolve (pulling into the cache if needed) and load the emotion, landmark and engagement models."""
    cache = model_cache_for(settings)
    options = _runner_options(settings)
    provenance: dict[str, dict[str, object]] = {}
    emotion = None
    if settings.emotion_inference:
        emotion_model = resolve_model(cache, settings.emotion_model)
        emotion = EmotionRunner(emotion_model.path, **options)
        provenance["emotion"] = emotion_model.provenance()
    landmarks = None
    if settings.landmark_model:
        from workers.landmarks import LandmarkRunner

        landmark_model = resolve_model(cache, settings.landmark_model)
        landmarks = LandmarkRunner(landmark_model.path)
        provenance["landmarks"] = landmark_model.provenance()
    engagement_model = resolve_model(cache, settings.engagement_model)
    engagement = EngagementRunner(engagement_model.path, **options)
    provenance["engagement"] = engagement_model.provenance()
    fallback, fallback_provenance = None, None
    if settings.engagement_model == ENGAGEMENT_MODEL_READING_EXPRESSIONS:
        # Producers may switch emotion off for their batches; such batches must not be scored
        # by a model that reads expressions either (InferenceModels.for_settings).
        fallback_model = resolve_model(cache, ENGAGEMENT_MODEL_WITHOUT_EMOTION)
        fallback = EngagementRunner(fallback_model.path, **options)
        fallback_provenance = fallback_model.provenance()
    # The default engagement model shares its first layers with the default emotion model: one
    # graph computes them once for both (workers/shared_trunk.py).
    shared = SharedTrunkRunner.fused(emotion, engagement, **options) if emotion is not None else None
    return InferenceModels(engagement=engagement, emotion=emotion, landmarks=landmarks, provenance=provenance,
                           engagement_without_emotion=fallback, provenance_without_emotion=fallback_provenance,
                           emotion_and_engagement=shared)


@dataclass
class PipelineComponents:
    """The loaded models of the capture and inference sides, loaded once per process."""

    detector: FaceDetector
    """Face detector."""
    embedder: Embedder | None
    """Optional face-embedding model for re-identification within a session."""
    models: InferenceModels
    """Emotion and engagement runners."""

    @classmethod
    def load(cls, settings: Settings) -> PipelineComponents:
        """Resolve, pull if needed, and load every configured model."""
        capture = load_capture_models(settings)
        models = load_inference_models(settings)
        models.provenance = {**capture.provenance, **models.provenance}
        return cls(capture.detector, capture.embedder, models)
