"""Does smoothing an engagement model over a student's own timeline agree better with per-frame labels?

Usage::

    classlens evaluate classlens-engagement-v1 --data ../shared/data/wacv_engagement --out eval/wacv
    python benchmarks/engagement_smoothing.py eval/wacv/predictions.csv

``wacv_engagement`` is the one labelled set here with timelines: its images are frames
``img<video>_<frame>.jpg`` of webcam videos of students, each frame labelled 0
(disengaged), 1 (partially engaged) or 2 (engaged). The script reads the per-frame
probabilities that ``classlens evaluate`` wrote, orders each video's frames by frame number,
and replaces every frame's four level probabilities by their mean over the frames within
``±h`` frame numbers of it (a centred box window; ``h = 0`` is no smoothing), as a report
that smoothed a student's timeline would. It then scores the smoothed readings against the
per-frame labels: ROC AUC of P(level 2 or 3) for "engaged" (label 2), ROC AUC of the
negated expected level for "disengaged" (label 0), and Spearman's rho between expected level
and label. The window is chosen on the videos with even ranks in id order and reported on
the others, so the reported figures come from videos the choice never saw.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.metrics import binary_auc

#: Frame files of wacv_engagement: ``img<video>_<frame>.jpg``.
FRAME_NAME = re.compile(r"img(\d+)_(\d+)\.\w+$")
#: The level names ``classlens evaluate`` writes, as WACV's three labels.
WACV_LABELS = {"very low": 0, "low": 1, "high": 2}
PROBABILITY_COLUMNS = ("p_very low", "p_low", "p_high", "p_very high")
HALF_WINDOWS = (0, 1, 2, 3, 5, 8, 12)

Timeline = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Frame numbers [T], labels [T] and level probabilities [T, 4] of one video, in frame order."""


def read_timelines(predictions: Path) -> dict[int, Timeline]:
    """Every video's frames from a ``predictions.csv``, in frame order."""
    frames: dict[int, list[tuple[int, int, list[float]]]] = defaultdict(list)
    with predictions.open(newline="") as handle:
        for row in csv.DictReader(handle):
            match = FRAME_NAME.search(row["image"])
            if match is None or row["true"] not in WACV_LABELS:
                continue
            frames[int(match.group(1))].append((int(match.group(2)), WACV_LABELS[row["true"]],
                                                [float(row[column]) for column in PROBABILITY_COLUMNS]))
    timelines = {}
    for video, rows in frames.items():
        rows.sort()
        timelines[video] = (np.array([r[0] for r in rows], float), np.array([r[1] for r in rows]),
                            np.array([r[2] for r in rows], float))
    return timelines


def smooth(frame_numbers: np.ndarray, probabilities: np.ndarray, half_window: int) -> np.ndarray:
    """Each row replaced by the mean of the rows within ``±half_window`` frame numbers of it."""
    if half_window == 0:
        return probabilities
    near = np.abs(frame_numbers[:, None] - frame_numbers[None, :]) <= half_window
    smoothed: np.ndarray = near.astype(float) @ probabilities / near.sum(axis=1, keepdims=True)
    return smoothed


def score(timelines: list[Timeline], half_window: int) -> dict[str, float]:
    """Agreement of the smoothed readings of these videos with their per-frame labels."""
    labels = np.concatenate([t[1] for t in timelines])
    probabilities = np.concatenate([smooth(t[0], t[2], half_window) for t in timelines])
    expected = probabilities @ np.arange(4)
    return {"engaged AUC": binary_auc(probabilities[:, 2] + probabilities[:, 3], labels == 2),
            "disengaged AUC": binary_auc(-expected, labels == 0),
            "rho": float(spearmanr(expected, labels)[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="predictions.csv of `classlens evaluate` on wacv_engagement")
    args = parser.parse_args()
    timelines = read_timelines(args.predictions)
    videos = sorted(timelines)
    selection = [timelines[v] for v in videos[0::2]]
    reported = [timelines[v] for v in videos[1::2]]
    frames = sum(len(t[1]) for t in timelines.values())
    print(f"{len(videos)} videos, {frames} frames; selection videos {videos[0::2]}, reported videos {videos[1::2]}")
    print("| ±frames | selection: engaged AUC | disengaged AUC | rho | reported: engaged AUC | disengaged AUC | rho |")
    print("|---|---|---|---|---|---|---|")
    best, best_value = 0, -1.0
    for half_window in HALF_WINDOWS:
        chosen, held = score(selection, half_window), score(reported, half_window)
        # Choose on the mean of the two AUCs of the selection videos only.
        value = (chosen["engaged AUC"] + chosen["disengaged AUC"]) / 2
        if value > best_value:
            best, best_value = half_window, value
        print(f"| {half_window} | " + " | ".join(f"{chosen[k]:.3f}" for k in chosen) + " | "
              + " | ".join(f"{held[k]:.3f}" for k in held) + " |")
    print(f"chosen on the selection videos: ±{best} frames")


if __name__ == "__main__":
    main()
