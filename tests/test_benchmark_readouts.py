"""The read-outs that two accuracy benchmarks fit: folds of whole students, a logistic read-out, class biases."""

from __future__ import annotations

import numpy as np

from benchmarks.emotion_domain_fit import balanced_accuracy, fit_bias, person_halves
from benchmarks.engagement_across_subjects import LinearReadout, deal_groups


def test_folds_keep_every_pseudo_subject_whole_and_balance_their_sizes() -> None:
    groups = np.repeat(np.arange(12), [40, 35, 30, 25, 20, 20, 15, 10, 10, 5, 5, 5])
    folds = deal_groups(groups, 4)
    for group in np.unique(groups):
        assert len(np.unique(folds[groups == group])) == 1
    sizes = np.bincount(folds)
    assert len(sizes) == 4 and sizes.max() - sizes.min() <= 10


def test_linear_readout_separates_four_levels_and_regularisation_pulls_it_to_the_prior() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 3.0, (4, 8))
    levels = np.repeat(np.arange(4), [20, 40, 200, 140])
    features = centres[levels] + rng.normal(0.0, 1.0, (len(levels), 8))
    held = rng.normal(0.0, 1.0, (len(levels), 8)) + centres[levels]
    fitted = LinearReadout(1.0).fit(features, levels).predict(held)
    assert fitted.shape == (len(levels), 4) and np.allclose(fitted.sum(1), 1.0)
    assert balanced_accuracy(levels, fitted) > 0.9
    # With almost no weight on the data, class weighting leaves every level equally likely.
    flat = LinearReadout(1e-9).fit(features, levels).predict(held)
    assert np.allclose(flat, 0.25, atol=1e-3)


def test_class_bias_recovers_an_under_predicted_class() -> None:
    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(7), 30)
    scores = np.log(np.full((len(truth), 7), 0.02))
    scores[np.arange(len(truth)), truth] = np.log(0.5) + rng.normal(0.0, 0.3, len(truth))
    # Class 1's faces score higher on class 6 than on their own: class 1 is never predicted.
    scores[truth == 1, 1] -= 1.5
    scores[truth == 1, 6] = np.log(0.3)
    assert balanced_accuracy(truth, scores) < 0.9
    bias = fit_bias(scores, truth)
    assert balanced_accuracy(truth, scores + bias) > 0.97
    assert bias[1] > 0.0


def test_halves_keep_every_person_whole_and_share_the_labels() -> None:
    rng = np.random.default_rng(2)
    people = [f"person_{i // 3}" for i in range(300)]
    truth = np.array([rng.integers(0, 7) if i % 3 else (i // 3) % 7 for i in range(300)], np.int64)
    first = person_halves(truth, people)
    for person in set(people):
        assert len({bool(first[i]) for i, name in enumerate(people) if name == person}) == 1
    assert 120 <= int(first.sum()) <= 180
    for cls in range(7):
        members = first[truth == cls]
        assert abs(int(members.sum()) - len(members) / 2) <= 0.25 * len(members)
