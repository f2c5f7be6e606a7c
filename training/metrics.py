"""Classification metrics in plain numpy: accuracy, macro-F1, UAR, confusion matrix, AUC, subgroups.

Every function takes integer class indices (``y_true``) and either predicted indices or
class probabilities; classes are ``0 .. len(labels) - 1``. No scikit-learn: the formulas
are short and keeping them here makes their conventions explicit:

* recall / precision / F1 of a class with no true (or no predicted) sample is 0, and
  macro-F1 averages over every class *present in the truth* so that a class missing
  from a small evaluation set does not drag the mean down with an undefined value;
* UAR (unweighted average recall) is the mean recall over the classes present in the
  truth, the usual figure for imbalanced sets (DAiSEE, FER2013's disgust);
* AUC is the Mann–Whitney probability that a random positive scores above a random
  negative, ties counting one half; it is ``nan`` when one side is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

ENGAGED_LEVELS: tuple[int, ...] = (2, 3)
"""DAiSEE levels counted as "engaged" for the binary AUC (high, very high)."""


def _as_indices(values: npt.ArrayLike) -> IntArray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-d array of class indices, got shape {array.shape}")
    return array.astype(np.int64)


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> IntArray:
    """Counts ``[true, predicted]`` of shape ``[n_classes, n_classes]``."""
    truth, predicted = _as_indices(y_true), _as_indices(y_pred)
    if truth.shape != predicted.shape:
        raise ValueError(f"y_true has {truth.shape[0]} samples, y_pred {predicted.shape[0]}")
    if truth.size and (min(truth.min(), predicted.min()) < 0 or max(truth.max(), predicted.max()) >= n_classes):
        raise ValueError(f"class indices must lie in 0..{n_classes - 1}")
    matrix = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Share of samples predicted right; ``nan`` for an empty set."""
    truth, predicted = _as_indices(y_true), _as_indices(y_pred)
    return float(np.mean(truth == predicted)) if truth.size else float("nan")


def per_class_scores(matrix: IntArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Precision, recall and F1 per class from a confusion matrix (0 where undefined)."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return precision, recall, f1


def macro_f1(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> float:
    """Mean F1 over the classes present in the truth."""
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    present = matrix.sum(axis=1) > 0
    return float(per_class_scores(matrix)[2][present].mean()) if present.any() else float("nan")


def unweighted_average_recall(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> float:
    """Mean recall over the classes present in the truth (UAR, balanced accuracy)."""
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    present = matrix.sum(axis=1) > 0
    return float(per_class_scores(matrix)[1][present].mean()) if present.any() else float("nan")


def binary_auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``, ties counting 1/2."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    is_positive = np.asarray(positive, dtype=bool).ravel()
    positives, negatives = int(is_positive.sum()), int((~is_positive).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    # Average ranks (1-based) handle ties exactly: the Mann–Whitney U statistic.
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, np.float64)
    sorted_values = values[order]
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[is_positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def engaged_auc(level_probabilities: npt.ArrayLike, true_levels: npt.ArrayLike) -> float:
    """AUC of "engaged" (levels 2–3) against "not engaged" (0–1) for 4-level probabilities."""
    probabilities = np.asarray(level_probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != 4:
        raise ValueError(f"expected level probabilities [N, 4], got {probabilities.shape}")
    levels = _as_indices(true_levels)
    return binary_auc(probabilities[:, list(ENGAGED_LEVELS)].sum(axis=1), np.isin(levels, ENGAGED_LEVELS))


@dataclass(frozen=True)
class ClassificationMetrics:
    """Every figure of one evaluation of a classifier on one set."""

    labels: tuple[str, ...]
    """Class names, in index order."""
    count: int
    """Samples evaluated."""
    accuracy: float
    """Share predicted right."""
    macro_f1: float
    """Mean F1 over the classes present in the truth."""
    uar: float
    """Unweighted average recall over the classes present in the truth."""
    confusion: IntArray
    """Counts ``[true, predicted]``."""
    precision: FloatArray
    """Per-class precision."""
    recall: FloatArray
    """Per-class recall."""
    f1: FloatArray
    """Per-class F1."""
    engaged_auc: float | None = None
    """AUC of levels 2–3 against 0–1 (engagement tasks with 4 levels only)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further task-specific figures (e.g. mean absolute level error)."""

    def summary(self) -> dict[str, float]:
        """The scalar figures, for the per-epoch log and ``run.json``."""
        result = {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "uar": self.uar, "count": float(self.count)}
        if self.engaged_auc is not None:
            result["engaged_auc"] = self.engaged_auc
        result.update(self.extra)
        return result

    def to_dict(self) -> dict[str, object]:
        """Everything, as JSON-ready values."""
        return {
            **self.summary(),
            "labels": list(self.labels),
            "confusion": self.confusion.tolist(),
            "per_class": {
                label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for label, p, r, f, s in zip(self.labels, self.precision, self.recall, self.f1,
                                             self.confusion.sum(axis=1), strict=True)
            },
        }


def classify_metrics(
    y_true: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    labels: Sequence[str],
    *,
    ordinal_levels: bool = False,
) -> ClassificationMetrics:
    """Metrics of class probabilities (or scores) ``[N, C]`` against true indices.

    With ``ordinal_levels`` (DAiSEE's four levels) the engaged-vs-not AUC and the mean
    absolute level error are added.
    """
    scores = np.asarray(probabilities, dtype=np.float64)
    truth = _as_indices(y_true)
    if scores.ndim != 2 or scores.shape[1] != len(labels) or scores.shape[0] != truth.size:
        raise ValueError(f"expected scores [{truth.size}, {len(labels)}], got {scores.shape}")
    predicted = scores.argmax(axis=1) if truth.size else np.zeros(0, np.int64)
    matrix = confusion_matrix(truth, predicted, len(labels))
    precision, recall, f1 = per_class_scores(matrix)
    present = matrix.sum(axis=1) > 0
    extra: dict[str, float] = {}
    auc: float | None = None
    if ordinal_levels and len(labels) == 4:
        auc = engaged_auc(scores, truth)
        extra["level_mae"] = float(np.abs(predicted - truth).mean()) if truth.size else float("nan")
    return ClassificationMetrics(
        labels=tuple(labels),
        count=int(truth.size),
        accuracy=accuracy(truth, predicted),
        macro_f1=float(f1[present].mean()) if present.any() else float("nan"),
        uar=float(recall[present].mean()) if present.any() else float("nan"),
        confusion=matrix,
        precision=precision,
        recall=recall,
        f1=f1,
        engaged_auc=auc,
        extra=extra,
    )


def subgroup_metrics(
    y_true: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    groups: Sequence[str],
    labels: Sequence[str],
    *,
    ordinal_levels: bool = False,
) -> dict[str, ClassificationMetrics]:
    """The same metrics computed separately for every subgroup (bias analysis, EduMood seed)."""
    truth = _as_indices(y_true)
    scores = np.asarray(probabilities, dtype=np.float64)
    group_array = np.asarray([str(g) for g in groups])
    if group_array.size != truth.size:
        raise ValueError(f"{group_array.size} subgroup labels for {truth.size} samples")
    return {
        str(group): classify_metrics(truth[group_array == group], scores[group_array == group], labels,
                                     ordinal_levels=ordinal_levels)
        for group in sorted(set(group_array.tolist()))
    }
