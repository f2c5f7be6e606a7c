"""``classlens train emotion``: read the data, split by subject, train, evaluate, report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from kernel.types import EMOTION_LABELS
from training.emotion_data import (
    DEFAULT_FER2013_WEIGHT,
    EmotionSet,
    FaceHandling,
    concatenate_sets,
    split_by_subject,
)
from training.emotion_models import MODEL_FACTORY, FaceApiEmotionNet, build_emotion_model
from training.face_sets import load_emotion_data
from training.loop import EpochCallback, RunResult, TrainConfig, fit, predict, resolve_device, seed_everything
from training.metrics import ClassificationMetrics, classify_metrics, subgroup_metrics
from training.report import write_report
from training.run import REPORT, InputSpec, RunInfo, TrainingError, write_atomic

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

SPLITS_JSON = "splits.json"
"""File in the run folder listing each split's samples (file paths or FER2013 row ids)."""


@dataclass
class EmotionRun:
    """A finished emotion training run."""

    result: RunResult
    """The training loop's result."""
    info: RunInfo
    """What ``run.json`` says."""
    test: ClassificationMetrics | None
    """Metrics of the best model on the held-out test split, when there is one."""


class EmotionTorchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style torch dataset over :class:`EmotionSet` with light training augmentation.

    Augmentation (``augment=True``): horizontal flip with probability ½, a shift of up to
    ``max_shift`` pixels each way (edge pixels repeated), and brightness/contrast jitter
    of ±10 %. It draws from torch's global generator, which the training loop seeds and
    checkpoints, so runs are reproducible and resumable.
    """

    def __init__(self, data: EmotionSet, *, augment: bool = False, max_shift: int = 4,
                 soft_targets: bool = False) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(data.inputs))
        # Training on soft targets (FER+ votes) returns a [7] distribution per sample;
        # evaluation returns the hard label, so metrics compare with the majority label.
        self.labels = torch.from_numpy(np.ascontiguousarray(data.soft_targets() if soft_targets else data.labels))
        self.augment = augment
        self.max_shift = max_shift

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.inputs[index]
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            if self.max_shift:
                dx, dy = (int(v) for v in torch.randint(-self.max_shift, self.max_shift + 1, (2,)))
                padded = torch.nn.functional.pad(image[None], (self.max_shift,) * 4, mode="replicate")[0]
                size = image.shape[-1]
                top, left = self.max_shift + dy, self.max_shift + dx
                image = padded[:, top:top + size, left:left + size]
            gain = 1.0 + (torch.rand(()) - 0.5) * 0.2
            bias = (torch.rand(()) - 0.5) * 0.2 * 255
            image = ((image - 127.5) * gain + 127.5 + bias).clamp(0.0, 255.0)
        return image, self.labels[index]


ClassWeighting = Literal["inverse", "sqrt", "none"]
CLASS_WEIGHTINGS: tuple[str, ...] = ("inverse", "sqrt", "none")
"""Choices of ``--class-weighting``."""


class PrefixFeatureDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The frozen prefix's output for every face of a set (float16, in memory), with its target.

    With ``mirrored`` each face is also added flipped left to right, so the head still
    trains on mirror images although the features are computed once.
    """

    def __init__(self, model: FaceApiEmotionNet, data: EmotionSet, *, soft_targets: bool, mirrored: bool = False,
                 batch_size: int = 128, progress: bool = False) -> None:
        from training.loop import progress_bar

        targets = torch.from_numpy(np.ascontiguousarray(data.soft_targets() if soft_targets else data.labels))
        pixels = torch.from_numpy(np.ascontiguousarray(data.inputs))
        chunks: list[torch.Tensor] = []
        views = (False, True) if mirrored else (False,)
        starts = [(flip, start) for flip in views for start in range(0, len(data), batch_size)]
        model.eval()
        with torch.no_grad():
            for flip, start in progress_bar(starts, "frozen features", enabled=progress):
                batch = pixels[start:start + batch_size]
                chunks.append(model.prefix(batch.flip(-1) if flip else batch).to(torch.float16))
        self.features = torch.cat(chunks)
        self.targets = torch.cat([targets] * len(views))

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index].float(), self.targets[index]


def face_api_tarball(settings: Settings | None) -> bytes:
    """The pinned face-api package (its weights start ``--model face-api``), from the model cache."""
    from kernel.settings import load_settings
    from model_export.manifest import get_spec
    from pipeline.models import model_cache_for

    settings = settings or load_settings()
    cache = model_cache_for(settings)
    return cache.url_source_bytes(get_spec("face-api-expression"))


def class_weights(labels: np.ndarray, classes: int, weighting: ClassWeighting = "inverse") -> np.ndarray:
    """Per-class loss weights, 0 for absent classes, averaging 1 over the samples.

    ``inverse`` (``N / (classes_present · count)``) gives every present class the same total
    weight, so FER2013's rare disgust (about 1.5 % of the rows) is not ignored; ``sqrt`` is
    its square root, renormalised: it keeps rare classes alive without trading away as much
    accuracy on the common ones; ``none`` weighs every sample alike.
    """
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(classes, np.float64)
    weights[present] = labels.size / (present.sum() * counts[present])
    if weighting == "sqrt":
        weights = np.sqrt(weights)
    elif weighting == "none":
        weights = present.astype(np.float64)
    elif weighting != "inverse":
        raise TrainingError(f"unknown class weighting {weighting!r}; choose one of {', '.join(CLASS_WEIGHTINGS)}")
    weights[present] *= labels.size / float((weights[labels]).sum())
    return weights.astype(np.float32)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy against hard labels ``[N]`` or soft targets ``[N, C]``."""
    if target.ndim == 1:
        return torch.nn.functional.cross_entropy(logits, target, weight=weights)
    per_class = -torch.log_softmax(logits, dim=1) * target * weights
    return per_class.sum(dim=1).mean()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits in numpy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponent = np.exp(shifted)
    return exponent / exponent.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def train_emotion(
    data_path: Path | Sequence[Path],
    out_dir: Path,
    *,
    family: str = "mini-xception",
    config: TrainConfig | None = None,
    input_size: int = 64,
    faces: FaceHandling = "detect",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    model_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
    progress: bool = True,
    data: EmotionSet | None = None,
    on_epoch_end: EpochCallback | None = None,
    class_weighting: ClassWeighting = "inverse",
    fer2013_weight: float = DEFAULT_FER2013_WEIGHT,
) -> EmotionRun:
    """Train an emotion model on one or more supported data sets; write the run folder and its report.

    Several data sets (e.g. FER+ and CK+) are combined, each keeping its own split or split
    by subject. Sets with soft targets (FER+ votes) train on them; the others on one-hot
    labels. ``data`` skips reading ``data_path`` (already loaded); ``on_epoch_end`` is passed
    to :func:`training.loop.fit` (progress reporting, or stopping a run in tests).
    """
    config = config or TrainConfig()
    resolve_device(config.device)  # fail before the slow data loading when --device cuda has no GPU
    options = dict(model_options or {})
    paths = [data_path] if isinstance(data_path, Path) else list(data_path)
    if data is None:
        data = concatenate_sets(
            [load_emotion_data(path, input_size, faces=faces, settings=settings, cache_dir=out_dir / "cache",
                               progress=progress, fer2013_weight=fer2013_weight) for path in paths],
            val_fraction=val_fraction, test_fraction=test_fraction, seed=config.seed)
    soft = data.targets is not None
    if data.dropped:
        logger.info("left out: %s", ", ".join(f"{count} {reason}" for reason, count in data.dropped.items()))
    splits = split_by_subject(data, val_fraction=val_fraction, test_fraction=test_fraction, seed=config.seed)
    train, val, test = (data.subset(splits[name]) for name in ("train", "val", "test"))
    if len(train) == 0:
        raise TrainingError("the training split is empty; lower --val-fraction / --test-fraction")
    info = RunInfo(
        task="emotion", model_family=family, model_factory=MODEL_FACTORY,
        model_kwargs={"family": family, "num_classes": len(EMOTION_LABELS), **options},
        labels=list(EMOTION_LABELS), input_spec=InputSpec(kind="image", channels=1, size=input_size),
        data_fingerprint=data.fingerprint(), seed=config.seed,
        config={**config.to_dict(), "data": [str(path.resolve()) for path in paths], "faces": faces,
                "input_size": input_size, "class_weighting": class_weighting, "soft_targets": soft,
                "fer2013_weight": fer2013_weight,
                "val_fraction": val_fraction, "test_fraction": test_fraction,
                "split_sizes": {"train": len(train), "val": len(val), "test": len(test)},
                "dropped": dict(data.dropped), "output_activation": "softmax"},
        data_description=data.description,
    )
    previous = out_dir / "run.json"
    if previous.is_file() and config.resume:
        # A resumed run keeps its id and start time, so exports of it stay traceable.
        earlier = RunInfo.load(out_dir)
        if earlier.data_fingerprint != info.data_fingerprint:
            raise TrainingError(f"{out_dir} was trained on other data; use --restart or another --out")
        info.run_id, info.created_at = earlier.run_id, earlier.created_at
    out_dir.mkdir(parents=True, exist_ok=True)
    info.save(out_dir)
    # Which sample went where (paths or FER2013 row ids, never pixels): lets anyone evaluate
    # on exactly the held-out subjects later (`classlens evaluate` on a labels.csv of them).
    write_atomic(out_dir / SPLITS_JSON, (json.dumps(
        {name: [data.sources[i] for i in splits[name].tolist()] for name in ("train", "val", "test")},
        indent=1) + "\n").encode())

    seed_everything(config.seed)
    model = build_emotion_model(family, len(EMOTION_LABELS), **options)
    weights = torch.from_numpy(class_weights(train.labels, len(EMOTION_LABELS), class_weighting))
    train_set: Dataset[tuple[torch.Tensor, torch.Tensor]] = EmotionTorchDataset(train, augment=True, soft_targets=soft)
    val_set: Dataset[tuple[torch.Tensor, torch.Tensor]] | None = EmotionTorchDataset(val) if len(val) else None
    if isinstance(model, FaceApiEmotionNet):
        model.load_pretrained(face_api_tarball(settings))
        # The frozen blocks' output is computed once per face (and its mirror image, the one
        # augmentation that survives precomputing), in memory only; the head trains on it.
        train_set = PrefixFeatureDataset(model, train, soft_targets=soft, mirrored=True, progress=progress)
        val_set = PrefixFeatureDataset(model, val, soft_targets=False) if len(val) else None
        model.from_features = True

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(output, target, weights.to(output.device))

    def metrics_fn(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return classify_metrics(targets, outputs, EMOTION_LABELS).summary()

    try:
        result = fit(model, train_set, val_set,
                     loss_fn, config, out_dir, metrics_fn=metrics_fn, progress=progress,
                     on_epoch_end=on_epoch_end)
    finally:
        if isinstance(model, FaceApiEmotionNet):
            model.from_features = False
    evaluations: dict[str, ClassificationMetrics] = {}
    subgroups: dict[str, ClassificationMetrics] = {}
    test_metrics = None
    for name, split in (("validation (best epoch)", val), ("test", test)):
        if len(split) == 0:
            continue
        outputs, targets = predict(model, EmotionTorchDataset(split))
        metrics = classify_metrics(targets, softmax(outputs), EMOTION_LABELS)
        evaluations[name] = metrics
        if name == "test":
            test_metrics = metrics
            if split.groups:
                subgroups = subgroup_metrics(targets, softmax(outputs), split.groups, EMOTION_LABELS)
    info.metrics = {"best_epoch": result.best_epoch, **{f"val_{k}": v for k, v in result.best_metrics.items()
                                                         if k.startswith("val_")}}
    if test_metrics is not None:
        info.metrics.update({f"test_{k}": v for k, v in test_metrics.summary().items()})
    info.save(out_dir)
    write_report(out_dir / REPORT, f"Emotion run {info.run_id}: {family}", history=result.history,
                 evaluations=evaluations, subgroups=subgroups,
                 facts={"data": data.description, "data fingerprint": info.data_fingerprint,
                        "split sizes (train/val/test)": f"{len(train)}/{len(val)}/{len(test)}",
                        "left out": dict(data.dropped) or "none", "device": result.device,
                        "seed": config.seed, "best epoch": result.best_epoch})
    return EmotionRun(result=result, info=info, test=test_metrics)
