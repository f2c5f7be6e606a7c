"""``classlens train emotion``: read the data, split by subject, train, evaluate, report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from classlens.types import EMOTION_LABELS
from training.emotion_data import EmotionSet, FaceHandling, load_emotion_data, split_by_subject
from training.emotion_models import MODEL_FACTORY, build_emotion_model
from training.loop import EpochCallback, RunResult, TrainConfig, fit, predict, resolve_device, seed_everything
from training.metrics import ClassificationMetrics, classify_metrics, subgroup_metrics
from training.report import write_report
from training.run import REPORT, InputSpec, RunInfo, TrainingError, write_atomic

if TYPE_CHECKING:
    from classlens.settings import Settings

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

    def __init__(self, data: EmotionSet, *, augment: bool = False, max_shift: int = 4) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(data.inputs))
        self.labels = torch.from_numpy(np.ascontiguousarray(data.labels))
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


def class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """Inverse-frequency weights ``N / (classes_present · count)``, 0 for absent classes.

    With them the weighted cross-entropy gives every present class the same total weight,
    so FER2013's rare disgust (about 1.5 % of the rows) is not ignored.
    """
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(classes, np.float64)
    weights[present] = labels.size / (present.sum() * counts[present])
    return weights.astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits in numpy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponent = np.exp(shifted)
    return exponent / exponent.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def train_emotion(
    data_path: Path,
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
) -> EmotionRun:
    """Train an emotion model on a supported data set; write the run folder and its report.

    ``data`` skips reading ``data_path`` (already loaded); ``on_epoch_end`` is passed to
    :func:`training.loop.fit` (progress reporting, or stopping a run in tests).
    """
    config = config or TrainConfig()
    resolve_device(config.device)  # fail before the slow data loading when --device cuda has no GPU
    options = dict(model_options or {})
    data = data if data is not None else load_emotion_data(
        data_path, input_size, faces=faces, settings=settings, cache_dir=out_dir / "cache", progress=progress)
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
        config={**config.to_dict(), "data": str(data_path.resolve()), "faces": faces, "input_size": input_size,
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
    weights = torch.from_numpy(class_weights(train.labels, len(EMOTION_LABELS)))

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(output, target, weight=weights.to(output.device))

    def metrics_fn(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return classify_metrics(targets, outputs, EMOTION_LABELS).summary()

    result = fit(model, EmotionTorchDataset(train, augment=True), EmotionTorchDataset(val) if len(val) else None,
                 loss_fn, config, out_dir, metrics_fn=metrics_fn, progress=progress,
                 on_epoch_end=on_epoch_end)
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
