"""``classlens train engagement``: engagement models on DAiSEE, end to end.

1. Read the DAiSEE tree (:func:`training.daisee.read_daisee`) and print what was skipped.
2. Find the student's face in every clip at 1 or 2 fps with the runtime detector and
   alignment (:mod:`training.frames`; numbers cached under ``<out>/cache``, never pixels).
3. Build the family's samples in memory: grey 64×64 crops made by the workers' own
   :func:`workers.runners.emotion_model_input` (frame, transfer), rows of the runtime's
   engagement features (features) or a clip's sequence of them (temporal).
4. Train with the shared loop (:func:`training.loop.fit`: progress bars, per-epoch
   metrics, checkpoints, resume, seeds, ``--device cuda`` with mixed precision),
   selecting the epoch on the validation split's engagement macro-F1.
5. With ``--folds K`` first run subject-disjoint K-fold cross-validation over Train and
   Validation, each fold in ``<out>/folds/<k>``, and record the mean and spread.
6. Evaluate the best epoch on the Test split, per frame and per clip (frame
   probabilities averaged over the clip): accuracy, macro-F1, UAR, engaged-vs-not AUC
   and a confusion matrix per affective state, per subgroup when a subgroup file is
   given; write ``run.json`` and ``report.html``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from kernel.errors import BadInputError
from kernel.settings import Settings
from training.daisee import AFFECTIVE_STATES, DaiseeClip, DaiseeDataset, DatasetProblem, read_daisee, subject_folds
from training.engagement_features import (
    FRAME_FEATURES,
    SEQUENCE_FEATURES,
    ClipFeatureExtractor,
    load_feature_models,
    models_id,
)
from training.engagement_models import (
    ENGAGEMENT,
    ENGAGEMENT_INDEX,
    LEVEL_LABELS,
    SCORES,
    FrameEngagementNet,
    OrdinalScores,
    TemporalEngagementNet,
    WeightedStateLoss,
    class_weights,
    clip_probabilities,
    state_metrics,
)
from training.frames import ClipFaceExtractor, ClipFaces
from training.loop import RunResult, TrainConfig, fit, predict, seed_everything
from training.metrics import ClassificationMetrics, classify_metrics, subgroup_metrics
from training.report import write_report
from training.run import (
    CACHE_DIR,
    REPORT,
    InputSpec,
    RunInfo,
    TrainingError,
    build_model,
    data_fingerprint,
    write_atomic,
)

logger = logging.getLogger(__name__)

EngagementFamily = Literal["frame", "temporal", "transfer", "features"]

#: The families ``--model`` accepts.
ENGAGEMENT_FAMILIES: tuple[str, ...] = ("frame", "temporal", "transfer", "features")

#: Sampling rates the seeds use: 1 fps for frame models, 2 fps for sequence models.
SAMPLE_RATES: tuple[float, ...] = (1.0, 2.0)

#: Side of the grey crop the frame families see (the emotion runtime's input size).
FRAME_INPUT_SIZE = 64

#: Centred share of the aligned crop the frame families see (the emotion runtime's default).
FRAME_CROP_FRACTION = 0.9

#: Real inputs kept for the export's parity check (numbers of the feature families only).
PARITY_SAMPLES = 32
PARITY_INPUTS = "parity_inputs.npy"

_FACTORIES: dict[str, str] = {
    "frame": "training.engagement_models:frame_engagement_net",
    "transfer": "training.engagement_models:frame_engagement_net",
    "temporal": "training.engagement_models:temporal_engagement_net",
    "features": "training.engagement_models:ordinal_scores",
}


@dataclass
class EngagementTrainOptions:
    """What ``classlens train engagement`` was asked to do."""

    daisee: Path
    """The DAiSEE folder (``DataSet/`` and ``Labels/`` inside)."""
    out: Path
    """The run folder."""
    model: EngagementFamily = "frame"
    """Model family: frame, temporal, transfer or features."""
    init: Path | None = None
    """An emotion run whose backbone initialises the transfer family (required for it)."""
    backbone: str = "mini-xception"
    """Emotion architecture used as the frame families' backbone."""
    fps: float = 1.0
    """Frames sampled per second of clip: 1 or 2."""
    folds: int = 0
    """Subject-disjoint cross-validation folds over Train + Validation before the final run (0: none)."""
    subgroups: Path | None = None
    """Optional CSV ``subject,group`` for per-subgroup metrics (bias analysis)."""
    config: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, seed, device and checkpointing (the shared loop's)."""


@dataclass
class EngagementSamples:
    """Training samples of one family, in memory: inputs, the four levels, and where each came from."""

    inputs: NDArray[Any]
    """uint8 [M, 1, 64, 64] crops, float32 [M, 11] feature rows or float32 [M, T, 13] sequences."""
    labels: NDArray[np.int64]
    """int64 [M, 4]: levels of boredom, engagement, confusion, frustration."""
    clip_ids: list[str]
    """The clip of every sample."""
    subjects: list[str]
    """The subject of every sample."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class SampleDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset over :class:`EngagementSamples` for :func:`training.loop.fit`."""

    def __init__(self, samples: EngagementSamples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.from_numpy(np.asarray(self.samples.inputs[index], dtype=np.float32))
        return inputs, torch.from_numpy(self.samples.labels[index])


@dataclass
class EngagementRunResult:
    """What a finished engagement run produced."""

    out_dir: Path
    """The run folder."""
    info: RunInfo
    """Its ``run.json``."""
    test_metrics: dict[str, ClassificationMetrics]
    """Test-split metrics per affective state ("clip" level, and "frame" level for the frame families)."""
    problems: list[DatasetProblem]
    """Everything skipped in the data set."""
    cross_validation: dict[str, float] = field(default_factory=dict)
    """Mean and standard deviation of the folds' engagement figures (empty without ``--folds``)."""


class SampleBuilder:
    """Turns clips into a family's samples, skipping (and recording) clips that fail to decode."""

    def __init__(self, family: str, dataset: DaiseeDataset, faces: ClipFaceExtractor,
                 features: ClipFeatureExtractor | None, *, progress: bool = True) -> None:
        self.family = family
        self.dataset = dataset
        self.faces = faces
        self.features = features
        self.progress = progress
        self._faces: dict[Path, ClipFaces] = {}

    def clip_faces(self, clips: Sequence[DaiseeClip]) -> list[DaiseeClip]:
        """Detect (or load from the cache) every clip's faces; return the clips that decoded."""
        from rich.progress import track

        usable = []
        for clip in track(clips, description=f"faces at {self.faces.sample_fps:g} fps", disable=not self.progress):
            if clip.path in self._faces:
                usable.append(clip)
                continue
            try:
                self._faces[clip.path] = self.faces.faces(clip.path)
                usable.append(clip)
            except BadInputError as exc:
                self.dataset.add_problem(DatasetProblem("corrupt_clip", clip.split, clip.clip_id, str(exc)))
        return usable

    def faces_of(self, clip: DaiseeClip) -> ClipFaces:
        """The faces of a clip that :meth:`clip_faces` returned."""
        return self._faces[clip.path]

    def samples(self, clips: Sequence[DaiseeClip], *, sequence_length: int | None = None) -> EngagementSamples:
        """The family's samples of these clips (frames without a face give no frame sample)."""
        inputs: list[NDArray[Any]] = []
        labels: list[tuple[int, ...]] = []
        clip_ids: list[str] = []
        subjects: list[str] = []
        for clip in self.clip_faces(clips):
            faces = self._faces[clip.path]
            try:
                rows = self._clip_inputs(clip, faces, sequence_length)
            except BadInputError as exc:
                self.dataset.add_problem(DatasetProblem("corrupt_clip", clip.split, clip.clip_id, str(exc)))
                continue
            inputs.extend(rows)
            labels.extend([clip.labels] * len(rows))
            clip_ids.extend([clip.clip_id] * len(rows))
            subjects.extend([clip.subject] * len(rows))
        shape = self.input_shape(sequence_length)
        dtype = np.uint8 if self.family in ("frame", "transfer") else np.float32
        stacked = np.stack(inputs).astype(dtype) if inputs else np.zeros((0, *shape), dtype)
        return EngagementSamples(stacked, np.asarray(labels, np.int64).reshape(-1, len(AFFECTIVE_STATES)),
                                 clip_ids, subjects)

    def input_shape(self, sequence_length: int | None) -> tuple[int, ...]:
        """Shape of one sample's input."""
        if self.family in ("frame", "transfer"):
            return (1, FRAME_INPUT_SIZE, FRAME_INPUT_SIZE)
        if self.family == "features":
            return (len(FRAME_FEATURES),)
        return (sequence_length or 1, len(SEQUENCE_FEATURES))

    def sequence_length(self, clips: Sequence[DaiseeClip]) -> int:
        """Longest clip in sampled frames (shorter ones are padded with no-face frames)."""
        lengths = [len(self._faces[clip.path]) for clip in self.clip_faces(clips)]
        return max(lengths, default=1)

    def _clip_inputs(self, clip: DaiseeClip, faces: ClipFaces, sequence_length: int | None) -> list[NDArray[Any]]:
        if self.family in ("frame", "transfer"):
            from workers.runners import emotion_model_input

            if not faces.found.any():
                return []
            # The crops are re-made in memory from the cached keypoints and never stored.
            crops = self.faces.crops(clip.path, faces).crops
            images = emotion_model_input(crops, FRAME_INPUT_SIZE, crop_fraction=FRAME_CROP_FRACTION)
            return list(np.clip(np.rint(images), 0, 255).astype(np.uint8))
        if self.features is None:
            raise TrainingError(f"the {self.family} family needs the feature extractor")
        clip_features = self.features.features(clip.path, faces)
        if self.family == "features":
            return list(clip_features.frame_rows())
        sequence = clip_features.sequence()
        length = sequence_length or len(sequence)
        padded = np.zeros((length, len(SEQUENCE_FEATURES)), np.float32)
        padded[: min(length, len(sequence))] = sequence[:length]
        return [padded]


def input_spec_for(family: str) -> InputSpec:
    """The exported model's input, as the workers must build it."""
    if family in ("frame", "transfer"):
        return InputSpec(kind="image", channels=1, size=FRAME_INPUT_SIZE, colour="grey", value_range="0-255",
                         crop_fraction=FRAME_CROP_FRACTION)
    if family == "features":
        return InputSpec(kind="features", features=list(FRAME_FEATURES))
    return InputSpec(kind="sequence", features=list(SEQUENCE_FEATURES))


def model_kwargs_for(options: EngagementTrainOptions) -> dict[str, Any]:
    """Factory arguments recorded in ``run.json``."""
    if options.model in ("frame", "transfer"):
        return {"backbone": options.backbone, "input_size": FRAME_INPUT_SIZE, "output": ENGAGEMENT}
    if options.model == "features":
        return {"feature_count": len(FRAME_FEATURES), "output": ENGAGEMENT}
    return {"feature_count": len(SEQUENCE_FEATURES), "output": ENGAGEMENT}


def _prepare_model(options: EngagementTrainOptions, info: RunInfo, train: EngagementSamples) -> torch.nn.Module:
    # The initial weights come from torch's global generator: seed it first, so the same seed
    # gives the same run whatever ran before in this process.
    seed_everything(options.config.seed)
    # Trained on all four states' scores; run.json (and so the export) asks for engagement only.
    model = build_model(replace(info, model_kwargs={**info.model_kwargs, "output": SCORES}))
    if isinstance(model, FrameEngagementNet) and options.model == "transfer":
        if options.init is None:
            raise TrainingError("--model transfer needs --init RUN: an emotion run to start from")
        copied = model.load_backbone(options.init)
        logger.info("transfer: %d backbone tensors copied from %s", copied, options.init)
    if isinstance(model, OrdinalScores):
        model.ordinal.set_scaling(train.inputs.astype(np.float32))
    if isinstance(model, TemporalEngagementNet):
        model.set_scaling(train.inputs.reshape(-1, train.inputs.shape[-1]).astype(np.float32))
    return model


def _load_subgroups(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "subject" not in fields or "group" not in fields:
            raise BadInputError(f"{path}: expected columns subject,group; found {reader.fieldnames}")
        return {row[fields["subject"]].strip(): row[fields["group"]].strip() for row in reader}


def evaluate_samples(model: torch.nn.Module, samples: EngagementSamples, *, frame_level: bool,
                     subgroups: dict[str, str] | None = None, batch_size: int = 256
                     ) -> tuple[dict[str, ClassificationMetrics], dict[str, ClassificationMetrics]]:
    """Metrics per affective state (per clip, and per frame for frame-level families) and per subgroup.

    Returns ``(metrics by "<level> <state>", engagement metrics by subgroup)``.
    """
    if len(samples) == 0:
        return {}, {}
    scores, targets = predict(model, SampleDataset(samples), batch_size=batch_size)
    results: dict[str, ClassificationMetrics] = {}
    clips, clip_probs = clip_probabilities(scores, samples.clip_ids)
    clip_labels = {clip: samples.labels[samples.clip_ids.index(clip)] for clip in clips}
    clip_targets = np.stack([clip_labels[clip] for clip in clips])
    for index, state in enumerate(AFFECTIVE_STATES):
        results[f"clip {state}"] = classify_metrics(clip_targets[:, index], clip_probs[:, index], LEVEL_LABELS,
                                                    ordinal_levels=True)
        if frame_level:
            frame_probs = torch.softmax(torch.from_numpy(scores[:, index]), dim=1).numpy()
            results[f"frame {state}"] = classify_metrics(targets[:, index], frame_probs, LEVEL_LABELS,
                                                         ordinal_levels=True)
    by_group: dict[str, ClassificationMetrics] = {}
    if subgroups:
        subject_of = {clip: samples.subjects[samples.clip_ids.index(clip)] for clip in clips}
        groups = [subgroups.get(subject_of[clip], "unknown") for clip in clips]
        by_group = subgroup_metrics(clip_targets[:, ENGAGEMENT_INDEX], clip_probs[:, ENGAGEMENT_INDEX], groups,
                                    LEVEL_LABELS, ordinal_levels=True)
    return results, by_group


def _fit_one(options: EngagementTrainOptions, info: RunInfo, out_dir: Path, train: EngagementSamples,
             validation: EngagementSamples | None, progress: bool) -> tuple[torch.nn.Module, RunResult]:
    if len(train) == 0:
        raise TrainingError("no training samples: no clip of the training split has a face the detector finds")
    model = _prepare_model(options, info, train)
    info.save(out_dir)
    result = fit(model, SampleDataset(train),
                 SampleDataset(validation) if validation is not None and len(validation) else None,
                 WeightedStateLoss(class_weights(train.labels)), options.config, out_dir, metrics_fn=state_metrics,
                 progress=progress)
    return model, result


def _cross_validate(options: EngagementTrainOptions, builder: SampleBuilder, info: RunInfo, clips: list[DaiseeClip],
                    sequence_length: int | None, progress: bool) -> dict[str, float]:
    per_fold: dict[str, list[float]] = {}
    for fold, (train_clips, held_out) in enumerate(subject_folds(clips, options.folds, seed=options.config.seed)):
        fold_dir = options.out / "folds" / str(fold + 1)
        train = builder.samples(train_clips, sequence_length=sequence_length)
        test = builder.samples(held_out, sequence_length=sequence_length)
        model, _ = _fit_one(options, replace(info, run_id=f"{info.run_id}-fold{fold + 1}"), fold_dir, train, None,
                            progress)
        metrics, _ = evaluate_samples(model, test, frame_level=False)
        for key, value in metrics["clip engagement"].summary().items():
            per_fold.setdefault(key, []).append(value)
    summary: dict[str, float] = {}
    for key, values in per_fold.items():
        finite = [value for value in values if not math.isnan(value)]
        summary[f"{key}_mean"] = float(np.mean(finite)) if finite else float("nan")
        summary[f"{key}_std"] = float(np.std(finite)) if finite else float("nan")
    return summary


def train_engagement(options: EngagementTrainOptions, settings: Settings, *, progress: bool = True,
                     echo: Callable[[str], None] = print) -> EngagementRunResult:
    """Train (or resume) one engagement run on DAiSEE; see the module docstring for the steps.

    Raises:
        TrainingError: bad options, or nothing to train on.
        BadInputError: the DAiSEE folder is unusable (including a subject in two splits).
    """
    if options.model not in ENGAGEMENT_FAMILIES:
        raise TrainingError(f"unknown engagement model {options.model!r}; "
                            f"choose one of {', '.join(ENGAGEMENT_FAMILIES)}")
    if options.fps not in SAMPLE_RATES:
        raise TrainingError(f"--fps must be 1 or 2 (the seeds' sampling rates), got {options.fps:g}")
    if options.model == "transfer" and options.init is None:
        raise TrainingError("--model transfer needs --init RUN: an emotion run to start from")
    if options.model != "transfer" and options.init is not None:
        raise TrainingError(
            f"--init is for --model transfer; the {options.model} model's emotion columns come from the configured "
            "emotion model: export the emotion run and set CLASSLENS_EMOTION_MODEL (or `classlens models use emotion`)")
    dataset = read_daisee(options.daisee)
    echo(dataset.summary())
    cache_dir = options.out / CACHE_DIR
    faces = ClipFaceExtractor.from_settings(settings, sample_fps=options.fps, cache_dir=cache_dir)
    features = None
    if options.model in ("features", "temporal"):
        features = ClipFeatureExtractor(faces, load_feature_models(settings), models_id=models_id(settings),
                                        cache_dir=cache_dir)
    builder = SampleBuilder(options.model, dataset, faces, features, progress=progress)
    train_clips, validation_clips, test_clips = (dataset.split(name) for name in ("Train", "Validation", "Test"))
    if not train_clips:
        raise TrainingError(f"{options.daisee}: the Train split has no usable clip")
    sequence_length = builder.sequence_length(train_clips) if options.model == "temporal" else None
    info = RunInfo(
        task="engagement", model_family=options.model, model_factory=_FACTORIES[options.model],
        model_kwargs=model_kwargs_for(options), labels=list(LEVEL_LABELS), input_spec=input_spec_for(options.model),
        data_fingerprint=data_fingerprint((str(clip.path.relative_to(options.daisee)), clip.labels)
                                          for clip in dataset.clips),
        seed=options.config.seed, heads=list(AFFECTIVE_STATES),
        config={**options.config.to_dict(), "daisee": str(options.daisee), "fps": options.fps,
                "folds": options.folds, "init": str(options.init) if options.init else None,
                "sequence_length": sequence_length, "feature_models": models_id(settings),
                "detector": faces.detector_id, "loss": "class-weighted cross-entropy per state",
                # The model built from run.json already returns probabilities (see engagement_models).
                "output_activation": "none"},
        data_description=f"DAiSEE at {options.daisee}, {len(dataset.clips)} clips of "
                         f"{len(dataset.subjects())} subjects, faces at {options.fps:g} fps",
    )
    if options.out.joinpath("run.json").is_file():
        # Resuming: keep the run's id and creation time, so the export names one run.
        previous = RunInfo.load(options.out)
        info.run_id, info.created_at = previous.run_id, previous.created_at
    cross_validation: dict[str, float] = {}
    if options.folds:
        cross_validation = _cross_validate(options, builder, info, train_clips + validation_clips, sequence_length,
                                           progress)
        echo("cross-validation (engagement, per clip): " + ", ".join(
            f"{key} {value:.3f}" for key, value in cross_validation.items() if key.endswith("_mean")))
    train = builder.samples(train_clips, sequence_length=sequence_length)
    validation = builder.samples(validation_clips, sequence_length=sequence_length)
    test = builder.samples(test_clips, sequence_length=sequence_length)
    model, result = _fit_one(options, info, options.out, train, validation, progress)
    if options.model in ("features", "temporal"):
        # Real inputs for the export's parity check: feature numbers (never pixels), so they may be kept.
        _save_parity_inputs(options.out, [test, validation, train])
    frame_level = options.model in ("frame", "transfer", "features")
    test_metrics, by_group = evaluate_samples(model, test, frame_level=frame_level,
                                              subgroups=_load_subgroups(options.subgroups))
    history = result.history
    info.metrics = {
        "test": {name: metrics.to_dict() for name, metrics in test_metrics.items()},
        "best_epoch": result.best_epoch,
        "best_validation": result.best_metrics,
        "device": result.device,
        "cross_validation": cross_validation,
        "subgroups": {name: metrics.to_dict() for name, metrics in by_group.items()},
        "samples": {"train": len(train), "validation": len(validation), "test": len(test)},
        "skipped": [str(problem) for problem in dataset.problems],
    }
    info.save(options.out)
    write_report(options.out / REPORT, f"Engagement run {info.run_id}: {options.model} on DAiSEE",
                 history=history, evaluations=test_metrics, subgroups=by_group,
                 facts={"family": options.model, "data": info.data_description, "seed": info.seed,
                        "skipped clips": len(dataset.problems), **{f"cv {k}": f"{v:.3f}" for k, v in
                                                                   cross_validation.items()}})
    if dataset.problems:
        echo(f"{len(dataset.problems)} item(s) skipped; see run.json 'skipped'")
    return EngagementRunResult(options.out, info, test_metrics, dataset.problems, cross_validation)



def _save_parity_inputs(out_dir: Path, candidates: Sequence[EngagementSamples]) -> None:
    import io

    chosen = next(samples for samples in candidates if len(samples) or samples is candidates[-1])
    buffer = io.BytesIO()
    np.save(buffer, chosen.inputs[:PARITY_SAMPLES].astype(np.float32))
    write_atomic(out_dir / PARITY_INPUTS, buffer.getvalue())


def engagement_parity_inputs(run_dir: Path, settings: Settings, *, count: int = PARITY_SAMPLES) -> NDArray[np.float32]:
    """Real inputs of an engagement run for the export's parity check.

    Feature and sequence runs saved theirs (numbers) in ``parity_inputs.npy``; for the frame
    families the crops are made again in memory from the run's DAiSEE clips and cached
    keypoints (Test split first), since pixels are never written to disk.

    Raises:
        TrainingError: the run's data set is gone or holds no face.
    """
    saved = run_dir / PARITY_INPUTS
    if saved.is_file():
        inputs: NDArray[np.float32] = np.load(saved).astype(np.float32)[:count]
        return inputs
    info = RunInfo.load(run_dir)
    if info.input_spec.kind != "image" or "daisee" not in info.config:
        raise TrainingError(f"{run_dir}: not an engagement run with parity inputs or DAiSEE clips to make them from")
    dataset = read_daisee(Path(info.config["daisee"]), check_clips=False)
    faces = ClipFaceExtractor.from_settings(settings, sample_fps=float(info.config["fps"]),
                                            cache_dir=run_dir / CACHE_DIR)
    builder = SampleBuilder(info.model_family, dataset, faces, None, progress=False)
    collected: list[NDArray[Any]] = []
    for split in ("Test", "Validation", "Train"):
        for clip in dataset.split(split):
            collected.extend(builder.samples([clip]).inputs)
            if len(collected) >= count:
                return np.stack(collected[:count]).astype(np.float32)
    if not collected:
        raise TrainingError(f"{run_dir}: no face in the run's DAiSEE clips to check parity on")
    return np.stack(collected).astype(np.float32)


@dataclass
class EngagementEvaluation:
    """An engagement model, as the workers run it, evaluated on a DAiSEE split."""

    model: str
    """The model evaluated (name or path)."""
    data: str
    """The split and folder."""
    metrics: dict[str, ClassificationMetrics]
    """Engagement metrics per clip (frame probabilities averaged) and per frame."""
    problems: list[DatasetProblem]
    """Clips skipped."""
    report_path: Path | None = None
    """``evaluation.html`` when an output folder was given."""


def evaluate_engagement(model: str, daisee: Path, settings: Settings, *, split: str = "Test", fps: float = 1.0,
                        out_dir: Path | None = None, progress: bool = False) -> EngagementEvaluation:
    """Evaluate any engagement model the workers can load (the default baseline included) on DAiSEE.

    Every sampled face goes through the workers' own path: runtime crop and head pose,
    :func:`workers.inference.analyse_crops` with the configured emotion (and landmark)
    models and ``model`` as the engagement model. The clip's level is the mean of its
    frames' probabilities; clips without a face are skipped.

    Raises:
        ModelSupplyError: the workers cannot load ``model`` (e.g. a temporal model).
    """
    from pipeline.models import load_inference_models
    from workers.inference import analyse_crops

    models = load_inference_models(settings.model_copy(update={"engagement_model": model}))
    dataset = read_daisee(daisee)
    cache_dir = out_dir / CACHE_DIR if out_dir is not None else None
    faces = ClipFaceExtractor.from_settings(settings, sample_fps=fps, cache_dir=cache_dir)
    builder = SampleBuilder("frame", dataset, faces, None, progress=progress)
    frame_probabilities: list[NDArray[np.float32]] = []
    frame_levels: list[int] = []
    clip_ids: list[str] = []
    for clip in builder.clip_faces(dataset.split(split)):
        clip_faces = builder.faces_of(clip)
        if not clip_faces.found.any():
            continue
        try:
            batch = faces.crops(clip.path, clip_faces)
        except BadInputError as exc:
            dataset.add_problem(DatasetProblem("corrupt_clip", clip.split, clip.clip_id, str(exc)))
            continue
        probabilities = analyse_crops(batch, models).engagement_probabilities
        frame_probabilities.extend(probabilities)
        frame_levels.extend([clip.label("engagement")] * len(probabilities))
        clip_ids.extend([clip.clip_id] * len(probabilities))
    if not frame_probabilities:
        raise TrainingError(f"{daisee}: no face in the {split} split to evaluate on")
    stacked = np.stack(frame_probabilities).astype(np.float64)
    levels = np.asarray(frame_levels, np.int64)
    clips = sorted(set(clip_ids))
    clip_probs = np.stack([stacked[[i for i, c in enumerate(clip_ids) if c == clip]].mean(axis=0) for clip in clips])
    clip_levels = np.asarray([levels[clip_ids.index(clip)] for clip in clips], np.int64)
    metrics = {
        "clip engagement": classify_metrics(clip_levels, clip_probs, LEVEL_LABELS, ordinal_levels=True),
        "frame engagement": classify_metrics(levels, stacked, LEVEL_LABELS, ordinal_levels=True),
    }
    description = f"DAiSEE {split} split of {daisee}, faces at {fps:g} fps"
    report = None
    if out_dir is not None:
        import json

        write_atomic(out_dir / "evaluation.json", json.dumps(
            {"model": model, "data": description, "metrics": {k: v.to_dict() for k, v in metrics.items()},
             "skipped": [str(problem) for problem in dataset.problems]}, indent=2, default=float).encode())
        report = write_report(out_dir / "evaluation.html", f"Evaluation of {model} on DAiSEE",
                              evaluations=metrics, facts={"model": model, "data": description,
                                                          "skipped clips": len(dataset.problems)})
    return EngagementEvaluation(model, description, metrics, dataset.problems, report)
