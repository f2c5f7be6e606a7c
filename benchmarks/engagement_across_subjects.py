"""How much engagement can a linear read-out of the emotion network find, measured across students?

Usage::

    python benchmarks/engagement_across_subjects.py \\
        [--daisee ../shared/data/daisee_frames] [--wacv ../shared/data/wacv_engagement] \\
        [--keypoint-cache DIR]

The question behind it: ``classlens-engagement-v1`` scores UAR 0.33 and engaged AUC 0.62 on
DAiSEE Validation, and fine-tuning more of the network did not help. Is that the model, or
how little a single frame says about a student's engagement? A linear read-out answers it
honestly because it has one knob (its L2 strength) and can be chosen across students.

1. Every DAiSEE frame goes through the runtime's detector, alignment and emotion model (the
   configured default); the network's pooled features (``--feature-output``, the input of its
   classifier) are taken in memory.
2. Train's faces are grouped into pseudo-subjects as ``classlens train engagement
   --selection-by faces`` groups them (recogniser descriptors joined at
   :data:`training.engagement_images.SAME_FACE_COSINE`), and the groups are dealt into
   ``--folds`` folds.
3. For each L2 strength, a class-weighted multinomial logistic regression (standardised
   features, L-BFGS) is trained on all folds but one and scored on the held-out students:
   UAR and engaged (levels 2–3) vs not ROC AUC, averaged over the folds.
4. The strength with the best mean UAR + AUC is refitted on all of Train and scored **once**
   on DAiSEE Validation (subject-disjoint from Train), beside the configured engagement model
   on the same faces.

With ``--wacv`` a second read-out also learns from ``wacv_engagement``'s extremes
(disengaged as level 0, engaged as level 3; partially engaged left out), which adds 17
students; the folds still score DAiSEE students only. Nothing is written: crops, features and
descriptors stay in memory (``--keypoint-cache`` keeps the detector's five keypoints only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.settings import load_settings
from kernel.types import ENGAGEMENT_LEVELS
from model_export.cache import resolve_model
from pipeline.models import load_recognizer, model_cache_for
from training.engagement_images import (
    SAME_FACE_COSINE,
    engagement_probabilities,
    face_groups,
    read_engagement_images,
)
from training.metrics import classify_metrics, engaged_auc, unweighted_average_recall

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: L2 strengths tried (sklearn's C: larger is weaker regularisation).
STRENGTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
#: wacv_engagement's labels that are kept, as DAiSEE levels.
WACV_EXTREMES = {0: 0, 2: 3}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def pooled_features(model_path: Path, crops: npt.NDArray[np.uint8], output: str = "features") -> FloatArray:
    """An emotion network's ``output`` tensor for every aligned crop, preprocessed as the workers do."""
    import onnx
    import onnxruntime as ort

    from workers.runners import EmotionRunner

    runner = EmotionRunner(model_path, preference="cpu")
    graph = onnx.load(str(model_path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    chunks = [session.run([output], {input_name: runner.preprocess(crops[start:start + 128])})[0]
              for start in range(0, len(crops), 128)]
    return np.concatenate(chunks).reshape(len(crops), -1).astype(np.float64)


def deal_groups(groups: IntArray, folds: int) -> IntArray:
    """Fold of each sample: whole groups, largest first, each to the fold with fewest samples so far."""
    names, sizes = np.unique(groups, return_counts=True)
    fold_of_group: dict[int, int] = {}
    load = np.zeros(folds, np.int64)
    for index in np.argsort(-sizes, kind="stable"):
        fold = int(load.argmin())
        fold_of_group[int(names[index])] = fold
        load[fold] += sizes[index]
    return np.array([fold_of_group[int(group)] for group in groups], np.int64)


class LinearReadout:
    """Class-weighted multinomial logistic regression on standardised features (L2, as sklearn's ``C``)."""

    def __init__(self, strength: float, classes: int = len(ENGAGEMENT_LEVELS)) -> None:
        self.strength = strength
        self.classes = classes
        self.mean: FloatArray = np.zeros(0)
        self.scale: FloatArray = np.ones(0)
        self.weights: FloatArray = np.zeros(0)

    def fit(self, features: FloatArray, levels: IntArray) -> LinearReadout:
        """Minimise ½‖W‖² + C·Σ wᵢ·cross-entropyᵢ, with wᵢ the inverse frequency of sample i's level."""
        self.mean, self.scale = features.mean(0), features.std(0) + 1e-8
        inputs = self._design(features)
        counts = np.bincount(levels, minlength=self.classes).astype(np.float64)
        sample_weight = (len(levels) / (np.count_nonzero(counts) * np.maximum(counts, 1)))[levels]
        onehot = np.eye(self.classes)[levels]

        def objective(flat: FloatArray) -> tuple[float, FloatArray]:
            weights = flat.reshape(inputs.shape[1], self.classes)
            logits = inputs @ weights
            logits -= logits.max(1, keepdims=True)
            log_probabilities = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            penalty = weights[:-1]  # the bias is not penalised
            loss = 0.5 * float((penalty ** 2).sum()) - self.strength * float(
                (sample_weight[:, None] * onehot * log_probabilities).sum())
            gradient = self.strength * inputs.T @ (sample_weight[:, None] * (np.exp(log_probabilities) - onehot))
            gradient[:-1] += penalty
            return loss, gradient.ravel()

        start = np.zeros(inputs.shape[1] * self.classes)
        result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 3000})
        self.weights = result.x.reshape(inputs.shape[1], self.classes)
        return self

    def _design(self, features: FloatArray) -> FloatArray:
        """Standardised features with a constant column for the bias."""
        design: FloatArray = np.hstack([(features - self.mean) / self.scale, np.ones((len(features), 1))])
        return design

    def predict(self, features: FloatArray) -> FloatArray:
        """Level probabilities ``[N, classes]``."""
        logits = self._design(features) @ self.weights
        logits -= logits.max(1, keepdims=True)
        probabilities: FloatArray = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return probabilities


def cross_validate(features: FloatArray, levels: IntArray, folds: IntArray, strength: float,
                   extra: tuple[FloatArray, IntArray] | None) -> tuple[float, float, list[float]]:
    """Mean UAR and engaged AUC over the held-out folds, and each fold's AUC."""
    uars, aucs = [], []
    for fold in np.unique(folds):
        held = folds == fold
        train_x, train_y = features[~held], levels[~held]
        if extra is not None:
            train_x, train_y = np.vstack([train_x, extra[0]]), np.concatenate([train_y, extra[1]])
        probabilities = LinearReadout(strength).fit(train_x, train_y).predict(features[held])
        uars.append(unweighted_average_recall(levels[held], probabilities.argmax(1), len(ENGAGEMENT_LEVELS)))
        aucs.append(engaged_auc(probabilities, levels[held]))
    return float(np.mean(uars)), float(np.mean(aucs)), aucs


def main() -> None:
    """Run the measurement and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--daisee", type=Path, default=SHARED_DATA / "daisee_frames")
    parser.add_argument("--wacv", type=Path, default=None, help="also try wacv_engagement's extremes as extra data")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--feature-output", default="features", help="ONNX tensor fed to the emotion classifier")
    parser.add_argument("--keypoint-cache", type=Path, default=None, help="keep detected keypoints here")
    args = parser.parse_args()
    settings = load_settings()
    cache = model_cache_for(settings)
    emotion_path = resolve_model(cache, settings.emotion_model).path
    embedder = load_recognizer(settings)[0]
    data = read_engagement_images(args.daisee, settings=settings, cache_dir=args.keypoint_cache,
                                  splits=("train", "test"), progress=True, embedder=embedder)
    assert data.descriptors is not None
    train, test = data.indices("train"), data.indices("test")
    features = pooled_features(emotion_path, data.crops, args.feature_output)
    groups = face_groups(data.descriptors[train].astype(np.float32), SAME_FACE_COSINE)
    folds = deal_groups(groups, args.folds)
    print(f"emotion model {settings.emotion_model}; DAiSEE Train {len(train)} faces in {len(np.unique(groups))} "
          f"pseudo-subjects, {args.folds} folds of {np.bincount(folds).tolist()} faces; Validation {len(test)}")
    variants: dict[str, tuple[FloatArray, IntArray] | None] = {"DAiSEE Train": None}
    if args.wacv is not None:
        wacv = read_engagement_images(args.wacv, settings=settings, cache_dir=args.keypoint_cache)
        keep = np.isin(wacv.levels, list(WACV_EXTREMES))
        variants["DAiSEE Train + WACV extremes"] = (
            pooled_features(emotion_path, wacv.crops[keep], args.feature_output),
            np.array([WACV_EXTREMES[int(level)] for level in wacv.levels[keep]], np.int64))
    print("\n| data | C | across students: mean UAR | mean engaged AUC | fold AUCs |\n|---|---|---|---|---|")
    chosen: dict[str, float] = {}
    for name, extra in variants.items():
        best = -1.0
        for strength in STRENGTHS:
            uar, auc, fold_aucs = cross_validate(features[train], data.levels[train], folds, strength, extra)
            print(f"| {name} | {strength:g} | {uar:.3f} | {auc:.3f} | {', '.join(f'{a:.2f}' for a in fold_aucs)} |")
            if uar + auc > best:
                best, chosen[name] = uar + auc, strength
    print("\nDAiSEE Validation (each read-out at its chosen C, scored once):\n"
          "| model | accuracy | UAR | macro-F1 | engaged AUC | recall 0 / 1 / 2 / 3 |\n|---|---|---|---|---|---|")
    rows = {}
    for name, extra in variants.items():
        train_x, train_y = features[train], data.levels[train]
        if extra is not None:
            train_x, train_y = np.vstack([train_x, extra[0]]), np.concatenate([train_y, extra[1]])
        rows[f"read-out on {name}, C={chosen[name]:g}"] = LinearReadout(chosen[name]).fit(
            train_x, train_y).predict(features[test])
    engagement_path = resolve_model(cache, settings.engagement_model).path
    rows[settings.engagement_model] = engagement_probabilities(engagement_path, data.subset(test),
                                                               settings).astype(np.float64)
    for name, probabilities in rows.items():
        m = classify_metrics(data.levels[test], probabilities, ENGAGEMENT_LEVELS, ordinal_levels=True)
        recalls = " / ".join(f"{value:.2f}" for value in m.recall)
        print(f"| {name} | {m.accuracy:.3f} | {m.uar:.3f} | {m.macro_f1:.3f} | {m.engaged_auc or float('nan'):.3f} "
              f"| {recalls} |")


if __name__ == "__main__":
    main()
