"""Engagement from labelled face images: DAiSEE frames and any ``labels.csv`` folder of images.

``classlens train engagement --images DIR --init EMOTION_RUN`` trains a frame model that the
workers run on every face crop, and ``classlens evaluate MODEL --data DIR`` measures any
engagement model (trained or the heuristic baseline) on such a folder, as the workers run it.

**What the model sees is what the workers feed it.** Every image goes through the runtime's
detector (its largest face), :func:`vision.geometry.align_face` to the 112×112 crop and
:func:`vision.geometry.head_pose`; the five keypoints are cached as numbers in the run's
``cache/`` folder, the crops are rebuilt in memory on every run. A feature model (the
baseline) gets the runtime's feature rows (:func:`workers.inference.engagement_features`:
head angles, emotion probabilities of the configured emotion model; eye cues are unknown
without a landmark model), an image model gets the crop as its input spec says.

**Splits.** A ``split`` column of ``Train``/``Validation``/``Test`` is honoured. Training uses
Train; the best epoch is selected on a seeded slice of Train (``--selection-fraction``).
DAiSEE's frames carry no subject ids, and a slice of random frames shares its students with
the training part, so it rewards the epochs that learn those students best. With
``--selection-by faces`` the slice is made of whole pseudo-subjects instead: the default
recogniser's descriptors of Train's faces, joined wherever two faces are at least
:data:`SAME_FACE_COSINE` alike (:func:`face_groups`). Validation is the held-out test split,
subject-disjoint from Train by DAiSEE's own construction, and is used for nothing but the
final figures.

**The model.** The trained emotion network (``--init``: a ``face-api`` emotion run, or such a
model in ONNX, e.g. the shipped ``classlens-emotion-v1``; :func:`load_emotion_init`) with a
new four-level classifier: its frozen blocks are computed once per face, its last block and
the classifier are fine-tuned with class weights (levels 0 and 1 are about 6 % of DAiSEE).
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from kernel.types import ENGAGEMENT_LEVELS
from training.run import TrainingError, data_fingerprint, write_atomic

if TYPE_CHECKING:
    import torch

    from kernel.settings import Settings
    from training.emotion_data import EmotionSet
    from training.emotion_models import FaceApiEmotionNet
    from training.emotion_train import ClassWeighting
    from training.loop import TrainConfig
    from training.metrics import ClassificationMetrics
    from training.run import InputSpec, RunInfo
    from vision.recognition import Embedder

logger = logging.getLogger(__name__)

SPLIT_NAMES: dict[str, str] = {"train": "train", "validation": "test", "val": "test", "test": "heldout"}
"""A ``split`` cell (lower case) → the split it plays here: DAiSEE's Validation is our test."""

SELECTION_BY = ("frames", "faces")
"""How the selection slice is drawn from Train: random frames, or whole pseudo-subjects."""

SAME_FACE_COSINE = 0.97
"""Default cosine of face-api descriptors at or above which two Train faces are joined into one
pseudo-subject. Measured on DAiSEE Train (2026-12-06): at 0.97 its 5,358 faces fall into 185
groups, the largest 189 faces and most of the big ones 120–126 (one student's clips); at 0.96
one group takes a third of all faces, at 0.95 nearly all of them."""

LEVEL_COLUMNS = ("engagement", "label", "level")
"""Accepted names of the engagement level column (0–3)."""
IMAGE_COLUMNS = ("path", "image")
"""Accepted names of the image column (relative to the folder, or to ``images/``)."""


@dataclass
class EngagementImages:
    """Aligned face crops of labelled images with their engagement level, in memory."""

    crops: npt.NDArray[np.uint8]
    """BGR crops ``[N, 112, 112, 3]`` aligned as the runtime aligns them."""
    head_pose: npt.NDArray[np.float32]
    """Yaw, pitch, roll ``[N, 3]`` in degrees from the five keypoints."""
    levels: npt.NDArray[np.int64]
    """Engagement level 0–3 ``[N]``."""
    splits: list[str]
    """train, test or heldout per sample (see :data:`SPLIT_NAMES`); train when the table has none."""
    sources: list[str]
    """Each image's path relative to its folder."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Images left out, by reason."""
    description: str = ""
    """One line: which folder this is."""

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    def subset(self, indices: npt.NDArray[np.int64]) -> EngagementImages:
        """The samples at ``indices``."""
        pick = indices.tolist()
        return EngagementImages(crops=self.crops[indices], head_pose=self.head_pose[indices],
                                levels=self.levels[indices], splits=[self.splits[i] for i in pick],
                                sources=[self.sources[i] for i in pick], description=self.description,
                                rows_fingerprint=self.rows_fingerprint,
                                descriptors=None if self.descriptors is None else self.descriptors[indices])

    rows_fingerprint: str = ""
    """sha256 over the labelled rows read (path, level, split), before any face detection."""
    descriptors: npt.NDArray[np.float32] | None = None
    """Unit face descriptors ``[N, D]`` of the recogniser, when they were asked for (in memory only)."""

    def indices(self, split: str) -> npt.NDArray[np.int64]:
        """Indices of one split."""
        return np.array([i for i, name in enumerate(self.splits) if name == split], np.int64)


def is_engagement_folder(path: Path) -> bool:
    """Whether ``path`` is a folder whose ``labels.csv`` has an engagement column."""
    from training.face_sets import labels_header

    return "engagement" in {name.lower() for name in labels_header(path)}


def _column(columns: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((columns[name] for name in names if name in columns), None)


def read_labelled_rows(folder: Path, splits: tuple[str, ...] | None,
                       dropped: Counter[str]) -> list[tuple[str, int, str]]:
    """(image name, level, split) of every usable row of a folder's ``labels.csv``; the rest counted in ``dropped``."""
    table = folder / "labels.csv"
    if not table.is_file():
        raise TrainingError(f"{folder} has no labels.csv")
    with table.open(newline="") as stream:
        reader = csv.DictReader(stream)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        image_column, level_column = _column(columns, IMAGE_COLUMNS), _column(columns, LEVEL_COLUMNS)
        if image_column is None or level_column is None:
            raise TrainingError(f"{table}: needs an image column ({' or '.join(IMAGE_COLUMNS)}) and an engagement "
                                f"column ({' or '.join(LEVEL_COLUMNS)}), has {reader.fieldnames}")
        split_column = columns.get("split")
        rows = list(reader)
    wanted = []
    for row in rows:
        cell = (row.get(split_column, "") if split_column else "").strip()
        split = SPLIT_NAMES.get(cell.lower() or "train")
        if split is None:
            dropped[f"unknown split {cell!r}"] += 1
            continue
        if splits is not None and split not in splits:
            continue
        try:
            level = int(row[level_column].strip())
        except ValueError:
            level = -1
        if not 0 <= level < len(ENGAGEMENT_LEVELS):
            dropped[f"engagement label {row[level_column].strip()!r} outside 0-3"] += 1
            continue
        wanted.append((row[image_column].strip(), level, split))
    if not wanted:
        raise TrainingError(f"{table}: no usable row ({dict(dropped) or 'the split is empty'})")
    return wanted


def labelled_rows_fingerprint(folders: list[Path], splits: tuple[str, ...] | None = ("train", "test")) -> str:
    """The data fingerprint of engagement image folders: their usable labelled rows, before detection."""
    return data_fingerprint(item for folder in folders
                            for item in _fingerprint_items(folder, read_labelled_rows(folder, splits, Counter())))


def _fingerprint_items(folder: Path, rows: list[tuple[str, int, str]]) -> list[tuple[str, str]]:
    """What the data fingerprint hashes for labelled rows: the folder-relative image, its level and split."""
    return [(f"{folder.name}/{name}", f"{level}:{split}") for name, level, split in rows]


def read_engagement_images(
    folder: Path, *, settings: Settings, cache_dir: Path | None = None, splits: tuple[str, ...] | None = None,
    progress: bool = False, embedder: Embedder | None = None,
) -> EngagementImages:
    """Detect, align and pose every labelled image of a folder (see the module docstring).

    ``splits`` keeps only those splits (``train``, ``test``); unreadable images, images
    without a face and labels outside 0–3 are left out and counted. With ``embedder`` each
    face's descriptor is kept too (:attr:`EngagementImages.descriptors`).
    """
    dropped: Counter[str] = Counter()
    wanted = read_labelled_rows(folder, splits, dropped)
    return _read_rows(folder, wanted, settings=settings, cache_dir=cache_dir, progress=progress, dropped=dropped,
                      embedder=embedder)


def _read_rows(folder: Path, wanted: list[tuple[str, int, str]], *, settings: Settings, cache_dir: Path | None,
               progress: bool, dropped: Counter[str] | None = None,
               embedder: Embedder | None = None) -> EngagementImages:
    """Detect, align and pose the given rows of a folder."""
    from training.emotion_data import KeypointCache, largest_face_keypoints, load_runtime_detector
    from training.loop import progress_bar
    from vision.geometry import align_face, head_pose

    dropped = dropped if dropped is not None else Counter()
    detector, detector_name = load_runtime_detector(settings)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", detector_name)
    cache = KeypointCache(cache_dir / f"keypoints-{safe_name}.json" if cache_dir else None)
    crops, poses, levels, kept_splits, sources = [], [], [], [], []
    descriptors: list[npt.NDArray[np.float32]] = []
    try:
        for name, level, split in progress_bar(wanted, "faces", enabled=progress):
            path = folder / name
            if not path.is_file() and (folder / "images" / name).is_file():
                path = folder / "images" / name
            raw = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if raw is None:
                dropped["unreadable image"] += 1
                continue
            image = np.asarray(raw, np.uint8)
            known, points = cache.get(path)
            if not known:
                found = largest_face_keypoints(detector, image)
                points = found.tolist() if found is not None else None
                cache.put(path, points)
            if points is None:
                dropped["no face found"] += 1
                continue
            keypoints = np.asarray(points, np.float32)
            crops.append(align_face(image, keypoints))
            poses.append(head_pose(keypoints, (image.shape[1], image.shape[0])))
            if embedder is not None:
                descriptors.append(embedder.embed(image, keypoints[None])[0])
            levels.append(level)
            kept_splits.append(split)
            sources.append(name)
    finally:
        cache.save()
    if not levels:
        raise TrainingError(f"no usable face in {folder} ({dict(dropped)})")
    return EngagementImages(
        crops=np.stack(crops), head_pose=np.asarray(poses, np.float32), levels=np.array(levels, np.int64),
        splits=kept_splits, sources=sources, dropped=dropped, description=f"engagement images {folder}",
        rows_fingerprint=data_fingerprint(_fingerprint_items(folder, wanted)),
        descriptors=np.stack(descriptors) if embedder is not None else None,
    )


# --- evaluation ------------------------------------------------------------------------


@dataclass
class EngagementEvaluation:
    """Metrics of one engagement model on one labelled image folder."""

    model: str
    """The model as given, and what it resolved to."""
    data: str
    """The folder and split."""
    metrics: ClassificationMetrics
    """Accuracy, UAR, macro-F1, engaged-vs-not AUC, per level, confusion matrix."""
    probabilities: npt.NDArray[np.float32]
    """Level probabilities ``[N, 4]``."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Images left out, by reason."""


def engagement_probabilities(model_path: Path, data: EngagementImages, settings: Settings) -> npt.NDArray[np.float32]:
    """Level probabilities the workers would give each face: features or crops, as the model asks."""
    from workers.inference import engagement_features
    from workers.runners import EmotionRunner, EngagementRunner

    runner = EngagementRunner(model_path, preference="cpu")
    emotions = None
    if runner.input_kind != "image" and settings.emotion_inference:
        from model_export.cache import resolve_model
        from pipeline.models import model_cache_for

        cache = model_cache_for(settings)
        emotion = EmotionRunner(resolve_model(cache, settings.emotion_model).path, preference="cpu")
        emotions = np.concatenate([emotion.predict(data.crops[start:start + 128])
                                   for start in range(0, len(data), 128)])
    features = engagement_features(data.head_pose, emotions, None, None)
    return np.concatenate([runner.predict(features[start:start + 128], data.crops[start:start + 128])
                           for start in range(0, len(data), 128)])


def evaluate_engagement_images(
    model: str, folder: Path, *, settings: Settings, split: str | None = None, out_dir: Path | None = None,
    progress: bool = False,
) -> EngagementEvaluation:
    """Evaluate an engagement model (name, ONNX file or run folder) on a labelled image folder.

    ``split`` is a ``split`` cell (``Validation``, ``Train``); without it every row counts.
    With ``out_dir``, writes ``evaluation.json`` (``accuracy``, ``uar``, ``macro_f1``, ``auc``
    at the top), ``predictions.csv`` and ``evaluation.html``.
    """
    import json
    import tempfile

    from training.evaluate import headline, model_to_evaluate, write_predictions
    from training.metrics import classify_metrics
    from training.report import write_report

    wanted = None
    if split is not None:
        mapped = SPLIT_NAMES.get(split.strip().lower())
        if mapped is None:
            raise TrainingError(f"--split is Train, Validation or Test, not {split!r}")
        wanted = (mapped,)
    data = read_engagement_images(folder, settings=settings, cache_dir=out_dir, splits=wanted, progress=progress)
    with tempfile.TemporaryDirectory(prefix="classlens-eval-") as scratch:
        model_path, description = model_to_evaluate(model, "engagement", settings, Path(scratch),
                                                    parity_inputs=lambda info: parity_inputs_of(info, data))
        probabilities = engagement_probabilities(model_path, data, settings)
    metrics = classify_metrics(data.levels, probabilities, ENGAGEMENT_LEVELS, ordinal_levels=True)
    result = EngagementEvaluation(model=description, data=f"{folder} ({split or 'all rows'})", metrics=metrics,
                                  probabilities=probabilities, dropped=data.dropped)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_report(out_dir / "evaluation.html", f"Evaluation of {description}",
                     evaluations={result.data: metrics},
                     facts={"model": description, "data": result.data, "left out": dict(data.dropped) or "none"})
        summary = {**headline(metrics), "task": "engagement", "model": description, "data": str(folder),
                   "split": split or "all rows", "dropped": dict(data.dropped),
                   "per_class_recall": dict(zip(metrics.labels, metrics.recall.tolist(), strict=True)),
                   "metrics": metrics.to_dict()}
        write_atomic(out_dir / "evaluation.json", (json.dumps(summary, indent=2, default=float) + "\n").encode())
        write_predictions(out_dir / "predictions.csv", data.sources, data.levels, probabilities, ENGAGEMENT_LEVELS)
    return result


def parity_inputs_of(info: RunInfo, data: EngagementImages, count: int = 16) -> npt.NDArray[np.float32]:
    """Real model inputs for an export's parity check, made in memory from the data's crops."""
    step = max(1, len(data) // count)
    return _model_inputs(data.subset(np.arange(0, len(data), step, dtype=np.int64)[:count]), info.input_spec)


# --- training --------------------------------------------------------------------------


@dataclass
class EngagementImageRun:
    """A finished engagement run on images."""

    info: RunInfo
    """``run.json``."""
    test: ClassificationMetrics | None
    """The trained model on the held-out test split."""
    baseline: ClassificationMetrics | None
    """The configured default engagement model (the heuristic baseline) on the same split."""


def train_engagement_images(
    folders: list[Path], out_dir: Path, *, init: Path, settings: Settings, config: TrainConfig, frozen_blocks: int = 3,
    selection_fraction: float = 0.15, class_weighting: ClassWeighting = "inverse", progress: bool = True,
    selection_by: str = "frames", same_face_cosine: float = SAME_FACE_COSINE,
) -> EngagementImageRun:
    """Train a frame engagement model from an emotion run on labelled image folders; evaluate it and the baseline.

    ``selection_by`` draws the selection slice from random Train frames (``frames``) or from
    whole pseudo-subjects (``faces``, grouped at ``same_face_cosine``; see the module docstring).
    """
    import torch

    from pipeline.models import load_recognizer
    from training.emotion_models import MODEL_FACTORY, FaceApiEmotionNet
    from training.emotion_train import PrefixFeatureDataset, class_weights, softmax
    from training.loop import fit, predict, resolve_device, seed_everything
    from training.metrics import classify_metrics
    from training.report import write_report
    from training.run import REPORT, InputSpec, RunInfo

    resolve_device(config.device)
    if selection_by not in SELECTION_BY:
        raise TrainingError(f"--selection-by is one of {', '.join(SELECTION_BY)}, not {selection_by!r}")
    emotion, emotion_spec, init_run_id = load_emotion_init(init, settings)
    size = emotion_spec.size
    # Grouping faces takes the configured recogniser (an error says so when none is set).
    embedder = load_recognizer(settings)[0] if selection_by == "faces" else None
    sets = [read_engagement_images(folder, settings=settings, cache_dir=out_dir / "cache", splits=("train", "test"),
                                   progress=progress, embedder=embedder) for folder in folders]
    data = _concatenate(sets)
    train_all, test = data.indices("train"), data.indices("test")
    rng = np.random.default_rng(config.seed)
    if data.descriptors is not None:
        groups = face_groups(data.descriptors[train_all], same_face_cosine)
        selection, train = group_disjoint_split(train_all, groups, selection_fraction, rng)
        logger.info("selection by faces: %d pseudo-subjects in Train, %d of them select", len(np.unique(groups)),
                    len(np.unique(groups[np.isin(train_all, selection)])))
    else:
        shuffled = rng.permutation(train_all)
        cut = round(len(shuffled) * selection_fraction)
        selection, train = np.sort(shuffled[:cut]), np.sort(shuffled[cut:])
    if len(train) == 0:
        raise TrainingError("the training split is empty")
    spec = InputSpec(kind="image", channels=1, size=size, colour="grey", value_range="0-255",
                     crop_fraction=emotion_spec.crop_fraction)
    info = RunInfo(
        task="engagement", model_family="face-api", model_factory=MODEL_FACTORY,
        model_kwargs={"family": "face-api", "num_classes": len(ENGAGEMENT_LEVELS), "frozen_blocks": frozen_blocks},
        labels=list(ENGAGEMENT_LEVELS), input_spec=spec, seed=config.seed,
        data_fingerprint=labelled_rows_fingerprint(folders),
        config={**config.to_dict(), "images": [str(folder.resolve()) for folder in folders],
                "init": str(init.resolve()) if init.exists() else str(init),
                "init_run_id": init_run_id, "selection_fraction": selection_fraction,
                "selection_by": selection_by,
                **({"same_face_cosine": same_face_cosine} if selection_by == "faces" else {}),
                "class_weighting": class_weighting,
                "split_sizes": {"train": len(train), "selection": len(selection), "test": len(test)},
                "dropped": dict(data.dropped), "output_activation": "softmax"},
        data_description=data.description,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    info.save(out_dir)

    seed_everything(config.seed)
    model = FaceApiEmotionNet(len(ENGAGEMENT_LEVELS), frozen_blocks=frozen_blocks)
    state = {key: value for key, value in emotion.state_dict().items() if not key.startswith("network.fc.")}
    model.load_state_dict(state, strict=False)
    for block in model.network.dense[:frozen_blocks]:
        block.requires_grad_(False)
    inputs = _model_inputs(data, spec)
    sets_for = {name: _as_emotion_set(inputs, data, indices) for name, indices in
                (("train", train), ("selection", selection), ("test", test))}
    train_set = PrefixFeatureDataset(model, sets_for["train"], soft_targets=False, mirrored=True, progress=progress)
    selection_set = PrefixFeatureDataset(model, sets_for["selection"], soft_targets=False) if len(selection) else None
    weights = torch.from_numpy(class_weights(data.levels[train], len(ENGAGEMENT_LEVELS), class_weighting))

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(output, target, weight=weights.to(output.device))

    def metrics_fn(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return classify_metrics(targets, softmax(outputs), ENGAGEMENT_LEVELS, ordinal_levels=True).summary()

    model.from_features = True
    try:
        result = fit(model, train_set, selection_set, loss_fn, config, out_dir, metrics_fn=metrics_fn,
                     progress=progress)
        test_metrics = None
        if len(test):
            outputs, targets = predict(model, PrefixFeatureDataset(model, sets_for["test"], soft_targets=False))
            test_metrics = classify_metrics(targets, softmax(outputs), ENGAGEMENT_LEVELS, ordinal_levels=True)
    finally:
        model.from_features = False
    baseline = None
    if len(test):
        from model_export.cache import resolve_model
        from pipeline.models import model_cache_for

        cache = model_cache_for(settings)
        baseline_path = resolve_model(cache, settings.engagement_model).path
        baseline_probabilities = engagement_probabilities(baseline_path, data.subset(test), settings)
        baseline = classify_metrics(data.levels[test], baseline_probabilities, ENGAGEMENT_LEVELS, ordinal_levels=True)
    info.metrics = {"best_epoch": result.best_epoch,
                    **{f"selection_{k[4:]}": v for k, v in result.best_metrics.items() if k.startswith("val_")}}
    if test_metrics is not None:
        info.metrics.update({f"test_{k}": v for k, v in test_metrics.summary().items()})
    if baseline is not None:
        info.metrics.update({f"baseline_test_{k}": v for k, v in baseline.summary().items()})
    info.save(out_dir)
    evaluations = {name: metrics for name, metrics in (("test (trained model)", test_metrics),
                                                       (f"test ({settings.engagement_model})", baseline))
                   if metrics is not None}
    write_report(out_dir / REPORT, f"Engagement run {info.run_id}: face-api frame model", history=result.history,
                 evaluations=evaluations,
                 facts={"data": data.description, "data fingerprint": info.data_fingerprint,
                        "split sizes (train/selection/test)": f"{len(train)}/{len(selection)}/{len(test)}",
                        "left out": dict(data.dropped) or "none", "initialised from": str(init),
                        "best epoch": result.best_epoch})
    return EngagementImageRun(info=info, test=test_metrics, baseline=baseline)


def load_emotion_init(init: Path, settings: Settings) -> tuple[FaceApiEmotionNet, InputSpec, str]:
    """``--init``: a face-api emotion run folder, or a face-api emotion model in ONNX (a file or a model name).

    A model (``classlens-emotion-v1``, or a run exported by ``classlens export``) is read back
    into the trainable network, and refused unless the network's probabilities match
    onnxruntime's on a few random faces within :data:`INIT_PARITY_TOLERANCE`. Returns the
    network, its input spec and the id of the emotion run it came from.
    """
    from training.emotion_models import FaceApiEmotionNet
    from training.run import RUN_JSON, load_trained_model

    if (init / RUN_JSON).is_file():
        model, info = load_trained_model(init)
        if not isinstance(model, FaceApiEmotionNet) or info.task != "emotion" or info.input_spec.kind != "image":
            raise TrainingError(f"--init {init} must be a face-api emotion run "
                                "(classlens train emotion --model face-api)")
        return model, info.input_spec, info.run_id
    from kernel.errors import ModelSupplyError
    from model_export.cache import resolve_model
    from pipeline.models import model_cache_for

    try:
        path = init if init.is_file() else resolve_model(model_cache_for(settings), str(init)).path
        return _face_api_emotion_from_onnx(path)
    except ModelSupplyError as error:
        raise TrainingError(f"--init {init}: {error}") from None


INIT_PARITY_TOLERANCE = 1e-4
"""Largest difference of class probabilities allowed between an ONNX ``--init`` and its network."""


def _face_api_emotion_from_onnx(path: Path) -> tuple[FaceApiEmotionNet, InputSpec, str]:
    """A face-api emotion model in ONNX as the trainable network, checked for parity (see :func:`load_emotion_init`)."""
    import hashlib
    import json

    import onnx
    import onnxruntime
    import torch

    from kernel.errors import ModelSupplyError
    from model_export.face_api import expression_weights_from_onnx
    from training.emotion_models import FaceApiEmotionNet
    from training.run import InputSpec

    try:
        graph = onnx.load(str(path))
    except Exception as error:  # protobuf's decode errors have no common base worth naming
        raise ModelSupplyError(f"{path} is not an ONNX model ({error})") from None
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    if metadata.get("classlens.task") != "emotion" or metadata.get("classlens.model_family") != "face-api":
        raise ModelSupplyError(f"{path} is not a face-api emotion model exported by ClassLens (its metadata says "
                               f"task {metadata.get('classlens.task')!r}, family "
                               f"{metadata.get('classlens.model_family')!r})")
    spec = InputSpec.from_dict(json.loads(metadata.get("classlens.input_spec", "{}")))
    if spec.kind != "image" or spec.channels != 1:
        raise ModelSupplyError(f"{path}: expected a grey image model, its input spec is {spec}")
    model = FaceApiEmotionNet()
    model.network.load_face_api_weights(expression_weights_from_onnx(graph))
    model.eval()
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 1, spec.size, spec.size)).astype(np.float32)
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    with torch.no_grad():
        actual = torch.softmax(model(torch.from_numpy(pixels)), dim=1).numpy()
    difference = float(np.abs(actual - expected).max())
    if difference > INIT_PARITY_TOLERANCE:
        raise ModelSupplyError(f"{path}: the rebuilt network differs from the ONNX model by {difference:.2g}")
    return model, spec, metadata.get("classlens.run_id") or hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def face_groups(descriptors: npt.NDArray[np.float32], same_face_cosine: float) -> npt.NDArray[np.int64]:
    """Pseudo-subject of each face, labels 0..G-1 in order of first appearance.

    Faces are joined (transitively) wherever their descriptors' cosine reaches ``same_face_cosine``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = descriptors.shape[0]
    rows, columns = [], []
    # Row blocks keep the similarity matrix small for large sets; only the alike pairs are kept.
    for start in range(0, count, 1024):
        block_rows, block_columns = np.nonzero(descriptors[start:start + 1024] @ descriptors.T >= same_face_cosine)
        rows.append(block_rows + start)
        columns.append(block_columns)
    row_index, column_index = np.concatenate(rows), np.concatenate(columns)
    alike = coo_matrix((np.ones(len(row_index), np.int8), (row_index, column_index)), shape=(count, count))
    # connected_components numbers components from the lowest index up: first appearance.
    _, labels = connected_components(alike, directed=False)
    return np.asarray(labels, np.int64)


def group_disjoint_split(indices: npt.NDArray[np.int64], groups: npt.NDArray[np.int64], fraction: float,
                         rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(selection, train) of ``indices``, with no group on both sides.

    Whole groups, in a seeded random order, go to the selection until it holds ``fraction`` of the faces.
    """
    chosen: list[int] = []
    wanted = round(len(indices) * fraction)
    sizes = np.bincount(groups)
    taken = 0
    for group in rng.permutation(len(sizes)).tolist():
        if taken >= wanted:
            break
        chosen.append(group)
        taken += int(sizes[group])
    in_selection = np.isin(groups, chosen)
    return np.sort(indices[in_selection]), np.sort(indices[~in_selection])


def _concatenate(sets: list[EngagementImages]) -> EngagementImages:
    if len(sets) == 1:
        return sets[0]
    dropped: Counter[str] = Counter()
    for data in sets:
        dropped.update({f"{data.description}: {reason}": count for reason, count in data.dropped.items()})
    return EngagementImages(
        crops=np.concatenate([d.crops for d in sets]), head_pose=np.concatenate([d.head_pose for d in sets]),
        levels=np.concatenate([d.levels for d in sets]), splits=[s for d in sets for s in d.splits],
        sources=[f"{d.description}:{s}" for d in sets for s in d.sources], dropped=dropped,
        description=" + ".join(d.description for d in sets),
        descriptors=(np.concatenate([d.descriptors for d in sets if d.descriptors is not None])
                     if all(d.descriptors is not None for d in sets) else None))


def _model_inputs(data: EngagementImages, spec: InputSpec) -> npt.NDArray[np.float32]:
    from workers.runners import emotion_model_input

    return np.concatenate([
        emotion_model_input(data.crops[start:start + 256], spec.size, crop_fraction=spec.crop_fraction,
                            colour=spec.colour, value_range=spec.value_range)
        for start in range(0, len(data), 256)])


def _as_emotion_set(inputs: npt.NDArray[np.float32], data: EngagementImages,
                    indices: npt.NDArray[np.int64]) -> EmotionSet:
    """The engagement samples in the shape the shared prefix-feature code reads."""
    from training.emotion_data import EmotionSet

    return EmotionSet(inputs=inputs[indices], labels=data.levels[indices],
                      subjects=[data.sources[i] for i in indices.tolist()],
                      sources=[data.sources[i] for i in indices.tolist()])


def run_parity_inputs(run_dir: Path, settings: Settings, count: int = 16) -> npt.NDArray[np.float32]:
    """Real inputs for exporting an ``--images`` engagement run: crops rebuilt in memory from its data.

    The first ``count`` usable images of the run's first folder are detected and aligned
    again (keypoints come from the run's cache), so no pixels are ever stored with a run.
    """
    from training.run import CACHE_DIR, RunInfo

    info = RunInfo.load(run_dir)
    folders = [Path(str(folder)) for folder in info.config.get("images", [])]
    if not folders:
        raise TrainingError(f"{run_dir} is not an engagement run on images")
    dropped: Counter[str] = Counter()
    rows = read_labelled_rows(folders[0], None, dropped)[: count * 2]
    sample = _read_rows(folders[0], rows, settings=settings, cache_dir=run_dir / CACHE_DIR, progress=False)
    return parity_inputs_of(info, sample.subset(np.arange(min(count, len(sample)), dtype=np.int64)), count)
