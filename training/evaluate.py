"""``classlens evaluate``: any emotion model, through the runtime's own runner, on any emotion data set.

The model is a manifest name (the default ``fer-mini-xception``), a model exported into
the cache, an ONNX file, or a training run folder (exported on the fly to a temporary
folder). It is always loaded by :class:`workers.runners.EmotionRunner`, and photos go
through the runtime's detector and :func:`vision.geometry.align_face`, so the figures are
those of the model as the workers run it. FER2013 rows (already face crops) are framed
so that the runner's centred crop is exactly the row's 48×48 face
(:func:`training.emotion_data.as_runtime_crop`).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kernel.types import EMOTION_LABELS
from training.emotion_data import (
    FER_USAGE_SPLITS,
    EmotionSet,
    FaceHandling,
    as_runtime_crop,
    iter_photo_crops,
    list_photo_samples,
    read_fer2013_csv,
)
from training.metrics import ClassificationMetrics, classify_metrics, subgroup_metrics
from training.report import write_report
from training.run import RUN_JSON, RunInfo, Task, TrainingError, write_atomic

if TYPE_CHECKING:
    from kernel.settings import Settings

_BATCH = 128


@dataclass
class EvaluationResult:
    """Metrics of one model on one data set."""

    model: str
    """The model as given, and what it resolved to."""
    data: str
    """The data set."""
    metrics: ClassificationMetrics
    """Accuracy, macro-F1, UAR, per-class figures and the confusion matrix."""
    subgroups: dict[str, ClassificationMetrics] = field(default_factory=dict)
    """The same per subgroup, when the data set has a ``group`` column."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Samples left out, by reason (no face found, contempt, ...)."""
    report_path: Path | None = None
    """The HTML report, when an output folder was given."""

    def per_class_markdown(self) -> str:
        """A Markdown table of per-class precision, recall, F1 and support, with the totals."""
        m = self.metrics
        support = m.confusion.sum(axis=1)
        lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {p:.3f} | {r:.3f} | {f:.3f} | {int(s)} |"
                  for label, p, r, f, s in zip(m.labels, m.precision, m.recall, m.f1, support, strict=True)]
        lines.append(f"| **all** ({m.count} faces) | accuracy {m.accuracy:.3f} | UAR {m.uar:.3f} | "
                     f"macro-F1 {m.macro_f1:.3f} | {m.count} |")
        return "\n".join(lines)


def model_to_evaluate(
    model: str, task: Task, settings: Settings, scratch: Path,
    parity_inputs: Callable[[RunInfo], npt.NDArray[np.float32]] | None = None,
) -> tuple[Path, str]:
    """The file to load for a model name, ONNX file or training run folder, and a description.

    A run folder of ``task`` is exported into ``scratch`` first (the export checks parity
    with PyTorch, on ``parity_inputs(run)`` when given); a name or file goes through the
    model cache, as the workers resolve it.
    """
    from model_export.cache import resolve_model
    from pipeline.models import model_cache_for

    path = Path(model).expanduser()
    if (path / RUN_JSON).is_file():
        from training.export import export_run

        info = RunInfo.load(path)
        if info.task != task:
            raise TrainingError(f"{path} is a {info.task} run, not an {task} run")
        exported = export_run(path, f"run-{info.run_id}", cache_dir=scratch,
                              parity_inputs=parity_inputs(info) if parity_inputs is not None else None)
        return exported.path, f"run {path} ({info.model_family}, {info.run_id})"
    cache = model_cache_for(settings)
    resolved = resolve_model(cache, model)
    return resolved.path, f"{model} ({resolved.path})"


FERPLUS_EVALUATION_SPLITS: dict[str, str] = {"PublicTest": "test", "test": "test", "Training": "train",
                                              "train": "train"}
"""``--split`` of a FER+ folder → its split; without one, FER+ is evaluated on PublicTest."""


def _cropped_faces(rows: EmotionSet, wanted: str | None,
                   dropped: Counter[str]) -> Iterator[tuple[str, int, str, npt.NDArray[np.uint8]]]:
    """Rows of a set of pre-cropped faces (FER2013, FER+, CK+) framed as the runtime's crops."""
    dropped.update(rows.dropped)
    for index in range(len(rows)):
        if wanted and rows.splits and rows.splits[index] != wanted:
            continue
        face = np.clip(np.rint(rows.inputs[index, 0]), 0, 255).astype(np.uint8)
        yield rows.sources[index], int(rows.labels[index]), "", as_runtime_crop(face)


def _labelled_crops(
    data: Path, *, faces: FaceHandling, settings: Settings, split: str | None, dropped: Counter[str],
    cache_dir: Path | None, progress: bool,
) -> Iterator[tuple[str, int, str, npt.NDArray[np.uint8]]]:
    """(sample id, class, subgroup, runtime crop) for every usable sample of the data set."""
    from kernel.types import CROP_SIZE
    from training.face_sets import is_ckplus_folder, is_ferplus_folder, read_ckplus, read_ferplus
    from workers.runners import EmotionRunner

    # Pre-cropped faces fill exactly the runner's centred crop of the 112×112 crop.
    inner = CROP_SIZE - 2 * round(CROP_SIZE * (1 - EmotionRunner.crop_fraction) / 2)
    if data.is_file() and data.suffix.lower() == ".csv":
        yield from _cropped_faces(read_fer2013_csv(data, inner), FER_USAGE_SPLITS.get(split or "", split), dropped)
        return
    if is_ferplus_folder(data):
        wanted = FERPLUS_EVALUATION_SPLITS[split or "PublicTest"]  # evaluate() checked the split
        yield from _cropped_faces(read_ferplus(data, inner, splits=(wanted,), progress=progress), wanted, dropped)
        return
    if is_ckplus_folder(data):
        yield from _cropped_faces(read_ckplus(data, inner), None, dropped)
        return
    if not data.is_dir():
        raise TrainingError(f"{data}: expected a FER2013 CSV, a folder with labels.csv, or a folder per class")
    samples, _ = list_photo_samples(data)
    for sample, label, crop in iter_photo_crops(samples, faces=faces, settings=settings, cache_dir=cache_dir,
                                                dropped=dropped, progress=progress):
        yield str(sample.path.relative_to(data) if sample.path.is_relative_to(data) else sample.path), label, \
            sample.group, crop


def write_predictions(path: Path, identifiers: list[str], truth: npt.NDArray[np.int64],
                      scores: npt.NDArray[np.float32], labels: tuple[str, ...]) -> None:
    """``predictions.csv``: per sample its id, the true class, the predicted class and every probability."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "true", "predicted", *(f"p_{label}" for label in labels)])
    for identifier, true, row in zip(identifiers, truth.tolist(), scores.tolist(), strict=True):
        writer.writerow([identifier, labels[true], labels[int(np.argmax(row))], *(f"{value:.6f}" for value in row)])
    write_atomic(path, buffer.getvalue().encode())


def headline(metrics: ClassificationMetrics) -> dict[str, float | None]:
    """The figures ``evaluation.json`` puts at its top level: accuracy, UAR, macro-F1 (and AUC)."""
    figures: dict[str, float | None] = {"accuracy": metrics.accuracy, "uar": metrics.uar,
                                        "macro_f1": metrics.macro_f1, "count": float(metrics.count)}
    if metrics.engaged_auc is not None:
        figures["auc"] = metrics.engaged_auc
    return figures


def evaluate(
    model: str,
    data: Path,
    *,
    settings: Settings | None = None,
    out_dir: Path | None = None,
    faces: FaceHandling = "detect",
    split: str | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate an emotion model on a data set; write ``evaluation.html`` / ``.json`` to ``out_dir`` if given.

    ``split`` picks FER2013 rows by Usage (``Training``, ``PublicTest``, ``PrivateTest``
    or train / val / test); photos are all evaluated.
    """
    from kernel.settings import load_settings
    from training.face_sets import is_ferplus_folder

    ferplus = is_ferplus_folder(data)
    if ferplus and (split or "PublicTest") not in FERPLUS_EVALUATION_SPLITS:
        # Checked before any model is loaded: a wrong split is the user's one-line error.
        raise TrainingError(f"--split of a FER+ folder is PublicTest or Training, not {split!r}")
    settings = settings or load_settings()
    dropped: Counter[str] = Counter()
    identifiers: list[str] = []
    truth: list[int] = []
    groups: list[str] = []
    probabilities: list[npt.NDArray[np.float32]] = []
    with tempfile.TemporaryDirectory(prefix="classlens-eval-") as scratch:
        from workers.runners import EmotionRunner

        model_path, description = model_to_evaluate(model, "emotion", settings, Path(scratch))
        runner = EmotionRunner(model_path, preference="cpu")
        pending: list[npt.NDArray[np.uint8]] = []
        for identifier, label, group, crop in _labelled_crops(data, faces=faces, settings=settings, split=split,
                                                              dropped=dropped, cache_dir=out_dir, progress=progress):
            identifiers.append(identifier)
            truth.append(label)
            groups.append(group)
            pending.append(crop)
            if len(pending) == _BATCH:
                probabilities.append(runner.predict(np.stack(pending)))
                pending.clear()
        if pending:
            probabilities.append(runner.predict(np.stack(pending)))
    if not truth:
        raise TrainingError(f"no usable sample in {data} ({dict(dropped)})")
    scores = np.concatenate(probabilities)
    metrics = classify_metrics(np.array(truth), scores, EMOTION_LABELS)
    subgroups = subgroup_metrics(np.array(truth), scores, groups, EMOTION_LABELS) if any(groups) else {}
    result = EvaluationResult(model=description, data=str(data), metrics=metrics, subgroups=subgroups,
                              dropped=dropped)
    if out_dir is not None:
        result.report_path = write_report(
            out_dir / "evaluation.html", f"Evaluation of {description}", evaluations={str(data): metrics},
            subgroups=subgroups, facts={"model": description, "data": str(data), "split": split or "all",
                                        "left out": dict(dropped) or "none"})
        split_name = split or ("PublicTest" if ferplus else "all rows")
        summary = {**headline(metrics), "task": "emotion", "model": description, "data": str(data), "split": split_name,
                   "dropped": dict(dropped), "per_class_recall": dict(zip(metrics.labels, metrics.recall.tolist(),
                                                                          strict=True)),
                   "metrics": metrics.to_dict(), "subgroups": {k: v.to_dict() for k, v in subgroups.items()}}
        write_atomic(out_dir / "evaluation.json", (json.dumps(summary, indent=2, default=float) + "\n").encode())
        write_predictions(out_dir / "predictions.csv", identifiers, np.array(truth, np.int64), scores,
                          EMOTION_LABELS)
    return result
