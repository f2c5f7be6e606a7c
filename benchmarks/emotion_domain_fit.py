"""How far does an emotion model get on web photos when its read-out is fitted to half of them?

Usage::

    classlens evaluate classlens-emotion-v1 --data ../shared/data/facial_expressions_dev --out eval/dev
    classlens evaluate face-api-expression --data ../shared/data/facial_expressions_dev --out eval/dev-face-api
    python benchmarks/emotion_domain_fit.py eval/dev/predictions.csv [eval/dev-face-api/predictions.csv] \
        [--data ../shared/data/facial_expressions_dev --readout classlens-emotion-v1 --readout face-api-expression]

``facial_expressions_dev`` (web photos) is kept out of training and model selection for the
shipped emotion model. This script asks what using it would buy: the photos are split in two
halves by person (file names without their counter, as training groups subjects; each
person's photos go to the half that has fewer of that person's most common label so far, in
a seeded order), and on one half it fits

- a per-class bias added to the model's log-probabilities (coordinate search, to maximise
  balanced accuracy; the smallest bias wins ties);
- with a second model's ``predictions.csv``, the weight of a log-probability ensemble, then a
  bias on top of it;
- with ``--data`` and ``--readout``, a new class-weighted logistic read-out of the named
  networks' pooled features (concatenated), its L2 strength chosen by 4-fold cross-validation
  inside the fitting half. This is the most that half the photos can teach a frozen network.

Each fit is scored on the other half, both ways round. If even these in-domain fits stay
below a target, no calibration or new classifier on these networks reaches it: their
features are what limit them. Crops and features stay in memory; nothing is written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.types import EMOTION_LABELS
from training.emotion_data import subject_of
from training.metrics import unweighted_average_recall

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
#: Biases tried for each class in log-probability units.
BIAS_GRID = np.linspace(-4.0, 4.0, 33)
#: Ensemble weights tried for the second model.
ENSEMBLE_WEIGHTS = np.linspace(0.0, 1.0, 11)
#: L2 strengths (sklearn's C) tried for a new read-out.
READOUT_STRENGTHS = (1e-3, 1e-2, 1e-1)


def read_predictions(path: Path) -> dict[str, tuple[int, FloatArray]]:
    """Image → (true class index, log-probabilities) from ``classlens evaluate``'s predictions.csv."""
    rows = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["true"] not in EMOTION_LABELS:
                continue
            probabilities = np.array([float(row[f"p_{label}"]) for label in EMOTION_LABELS])
            rows[row["image"]] = (EMOTION_LABELS.index(row["true"]), np.log(probabilities + 1e-7))
    return rows


def balanced_accuracy(truth: IntArray, scores: FloatArray) -> float:
    """UAR of the arg-max over the classes present."""
    return unweighted_average_recall(truth, scores.argmax(1), len(EMOTION_LABELS))


def fit_bias(scores: FloatArray, truth: IntArray, rounds: int = 4) -> FloatArray:
    """Per-class additive bias that maximises balanced accuracy (coordinate search over :data:`BIAS_GRID`)."""
    bias = np.zeros(scores.shape[1])
    for _ in range(rounds):
        for cls in range(scores.shape[1]):
            def score_of(value: float, cls: int = cls) -> tuple[float, float]:
                trial = bias.copy()
                trial[cls] = value
                return balanced_accuracy(truth, scores + trial), -abs(value)

            bias[cls] = max(BIAS_GRID, key=score_of)
    return bias


def person_halves(truth: IntArray, people: list[str], seed: int = 0) -> npt.NDArray[np.bool_]:
    """True for the photos of half A: whole people, each to the half with fewer of their commonest label."""
    rng = np.random.default_rng(seed)
    names = sorted(set(people))
    members = {name: [i for i, person in enumerate(people) if person == name] for name in names}
    counts = np.zeros((2, int(truth.max()) + 1), np.int64)
    first = np.zeros(len(truth), bool)
    for name in (names[i] for i in rng.permutation(len(names))):
        label = int(np.bincount(truth[members[name]]).argmax())
        half = int(counts[1, label] < counts[0, label])
        first[members[name]] = half == 0
        counts[half] += np.bincount(truth[members[name]], minlength=counts.shape[1])
    return first


def readout_balanced_accuracy(features: FloatArray, truth: IntArray, fit: npt.NDArray[np.bool_],
                              scored: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Balanced accuracy on ``scored`` of a logistic read-out fitted on ``fit`` (C chosen inside it), and C."""
    from benchmarks.engagement_across_subjects import LinearReadout

    classes = len(EMOTION_LABELS)
    inner = np.flatnonzero(fit)
    folds = np.random.default_rng(0).permutation(len(inner)) % 4

    def inner_score(strength: float) -> float:
        scores = []
        for fold in range(4):
            train, held = inner[folds != fold], inner[folds == fold]
            readout = LinearReadout(strength, classes).fit(features[train], truth[train])
            scores.append(balanced_accuracy(truth[held], readout.predict(features[held])))
        return float(np.mean(scores))

    strength = max(READOUT_STRENGTHS, key=inner_score)
    readout = LinearReadout(strength, classes).fit(features[fit], truth[fit])
    return balanced_accuracy(truth[scored], readout.predict(features[scored])), strength


def photo_features(data: Path, models: list[str], images: list[str]) -> FloatArray:
    """Pooled features of ``models`` (concatenated) for ``images`` of a labels.csv folder, via the runtime's crops."""
    from benchmarks.engagement_across_subjects import pooled_features
    from kernel.settings import load_settings
    from model_export.cache import resolve_model
    from pipeline.models import model_cache_for
    from training.emotion_data import iter_photo_crops, list_photo_samples

    settings = load_settings()
    samples, _ = list_photo_samples(data)
    crops = {str(sample.path.relative_to(data)): crop
             for sample, _, crop in iter_photo_crops(samples, settings=settings, progress=True)}
    stacked = np.stack([crops[image] for image in images])
    cache = model_cache_for(settings)
    return np.hstack([pooled_features(resolve_model(cache, name).path, stacked) for name in models])


def main() -> None:
    """Fit on each half, score on the other, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("predictions", type=Path, help="predictions.csv of the model")
    parser.add_argument("second", type=Path, nargs="?", help="predictions.csv of a second model to ensemble")
    parser.add_argument("--data", type=Path, help="the photos' labels.csv folder, for --readout")
    parser.add_argument("--readout", action="append", default=[], help="model whose features a new read-out uses")
    args = parser.parse_args()
    if args.readout and args.data is None:
        parser.error("--readout needs --data")
    first_rows = read_predictions(args.predictions)
    second_rows = read_predictions(args.second) if args.second else {}
    images = sorted(set(first_rows) & set(second_rows)) if args.second else sorted(first_rows)
    truth = np.array([first_rows[image][0] for image in images], np.int64)
    model = np.stack([first_rows[image][1] for image in images])
    other = np.stack([second_rows[image][1] for image in images]) if args.second else None
    features = photo_features(args.data, args.readout, images) if args.readout else None
    first_half = person_halves(truth, [subject_of(Path(image)) for image in images])
    print(f"{len(images)} photos, halves of {int(first_half.sum())} and {int((~first_half).sum())} (whole people)")
    print("| fitted on → scored on | model | model + bias | second model | ensemble (w) | ensemble + bias |"
          " new read-out (C) |\n|---|---|---|---|---|---|---|")
    for fit, scored, name in ((first_half, ~first_half, "half A → half B"),
                              (~first_half, first_half, "half B → half A")):
        cells = [f"{balanced_accuracy(truth[scored], model[scored]):.3f}"]
        bias = fit_bias(model[fit], truth[fit])
        cells.append(f"{balanced_accuracy(truth[scored], model[scored] + bias):.3f}")
        if other is None:
            cells += ["–", "–", "–"]
        else:
            def blended(weight: float) -> FloatArray:
                mixed: FloatArray = (1 - weight) * model + weight * other
                return mixed

            weight = float(max(ENSEMBLE_WEIGHTS, key=lambda w: balanced_accuracy(truth[fit], blended(w)[fit])))
            ensemble = blended(weight)
            bias = fit_bias(ensemble[fit], truth[fit])
            cells += [f"{balanced_accuracy(truth[scored], other[scored]):.3f}",
                      f"{balanced_accuracy(truth[scored], ensemble[scored]):.3f} ({weight:.1f})",
                      f"{balanced_accuracy(truth[scored], ensemble[scored] + bias):.3f}"]
        if features is None:
            cells.append("–")
        else:
            score, strength = readout_balanced_accuracy(features, truth, fit, scored)
            cells.append(f"{score:.3f} ({strength:g})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
