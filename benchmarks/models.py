"""Per-face inference time of each role's models, in the code that runs them, at batch 32.

Usage: python benchmarks/models.py [--batches 30] [--threads 1 2]

For every emotion and engagement model in the manifest that is in (or can be put in) the
model cache, the workers' runner (``EmotionRunner`` / ``EngagementRunner``) predicts on
batches of 32 real aligned face crops (from insightface's ``t1.jpg``), preprocessing
included, as a worker does. Every recogniser embeds 32 faces of one frame (the six faces of
``t1.jpg``, repeated) through the tracker's embedder, its own crop included. Prints one
Markdown row per model and thread count: median and best milliseconds per face over
``--batches`` timed batches after two warm-up ones. A last row times the default emotion and
engagement models as the workers run them together: one graph that computes their shared
first layers once (``workers/shared_trunk.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.analyze import host_description
from kernel.errors import ModelSupplyError
from kernel.settings import load_settings
from kernel.types import VideoFrame
from model_export.manifest import MANIFEST
from pipeline.models import model_cache_for
from training.emotion_data import load_runtime_detector
from vision.geometry import align_face
from vision.recognition import load_embedder
from workers.runners import EmotionRunner, EngagementRunner
from workers.shared_trunk import SharedTrunkRunner

BATCH = 32


def t1_faces() -> tuple[np.ndarray, np.ndarray]:
    """insightface's t1.jpg and the keypoints [32, 5, 2] of its six faces, repeated."""
    import insightface

    image = np.ascontiguousarray(cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg")))
    detector, _ = load_runtime_detector(load_settings())
    keypoints = detector.detect(VideoFrame("t1", 0.0, image)).keypoints
    return image, np.stack([keypoints[i % len(keypoints)] for i in range(BATCH)])


def face_crops(image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """32 aligned crops of the faces at ``keypoints``."""
    return np.stack([align_face(image, points) for points in keypoints])


def time_model(name: str, path: Path, image: np.ndarray, keypoints: np.ndarray, threads: int,
               batches: int) -> list[float]:
    """Milliseconds per face of each timed batch."""
    role = MANIFEST[name].role
    crops = face_crops(image, keypoints)
    features = np.zeros((BATCH, 11), np.float32)
    if role == "recognizer":
        embedder = load_embedder(path, MANIFEST[name].extra, preference="cpu",
                                 intra_op_threads=threads)

        def run() -> None:
            embedder.embed(image, keypoints)
    elif role == "emotion":
        runner = EmotionRunner(path, preference="cpu", intra_op_threads=threads)

        def run() -> None:
            runner.predict(crops)
    else:
        engagement = EngagementRunner(path, preference="cpu", intra_op_threads=threads)

        def run() -> None:
            engagement.predict(features, crops)
    return timed_batches(run, batches)


def timed_batches(run: Callable[[], object], batches: int) -> list[float]:
    """Milliseconds per face of each of ``batches`` runs of a batch, after two warm-up runs."""
    for _ in range(2):
        run()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000 / BATCH)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    settings = load_settings()
    cache = model_cache_for(settings)
    image, keypoints = t1_faces()
    print(f"host: {host_description()}")
    print("| model | role | default | threads | ms per face (median) | ms per face (best) |")
    print("|---|---|---|---|---|---|")
    for name, spec in MANIFEST.items():
        if spec.role not in ("emotion", "engagement", "recognizer"):
            continue
        try:
            path = cache.ensure(name)
        except ModelSupplyError as exc:
            print(f"| {name} | {spec.role} | | | not available: {exc} | |")
            continue
        default = name in (settings.emotion_model, settings.engagement_model, settings.recognizer)
        for threads in args.threads:
            times = time_model(name, path, image, keypoints, threads, args.batches)
            print(f"| `{name}` | {spec.role} | {'yes' if default else ''} | {threads} | "
                  f"{statistics.median(times):.2f} | {min(times):.2f} |", flush=True)
    crops = face_crops(image, keypoints)
    for threads in args.threads:
        emotion = EmotionRunner(cache.ensure(settings.emotion_model), preference="cpu", intra_op_threads=threads)
        engagement = EngagementRunner(cache.ensure(settings.engagement_model), preference="cpu",
                                      intra_op_threads=threads)
        shared = SharedTrunkRunner.fused(emotion, engagement, preference="cpu", intra_op_threads=threads)
        if shared is None:
            print(f"| `{settings.emotion_model}` + `{settings.engagement_model}` | share no layers | | | | |")
            break
        times = timed_batches(lambda s=shared: s.predict(crops), args.batches)
        print(f"| `{settings.emotion_model}` + `{settings.engagement_model}`, one graph ({shared.shared_nodes} "
              f"nodes shared) | emotion and engagement | yes | {threads} | {statistics.median(times):.2f} | "
              f"{min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
