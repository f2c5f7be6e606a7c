"""Emotion data sets: FER2013's CSV, a folder per class, or a ``labels.csv`` of photos.

Every reader produces :class:`EmotionSet`: grey model inputs ``[N, 1, S, S]`` (float32,
0–255) built in memory, the FER2013 class index of each, a subject id (for
subject-disjoint splits), an optional subgroup, and the split the data set itself
assigns (FER2013's ``Usage``) if any.

What a model sees must be what the workers will feed it:

* photos (class folders, ``labels.csv``) go through the runtime's own pipeline: the
  configured face detector, the largest face, :func:`vision.geometry.align_face` to the
  112×112 crop, then :func:`workers.runners.emotion_model_input` (centred 90 %, grey,
  area resize). Detection is slow, so the five keypoints of each photo (numbers, never
  pixels) are cached in ``<cache>/keypoints-<detector>.json``, keyed by the photo's path,
  size and modification time; the crops are rebuilt in memory from the photo each run.
* FER2013 rows already are 48×48 grey faces framed like the runtime's centred crop, so
  they are only resized to the model's input size. ``--faces as-is`` treats photos the
  same way (for data sets of pre-cropped faces, e.g. AffectNet's).

Labels are mapped to FER2013's seven classes in the runtime's order
(:data:`kernel.types.EMOTION_LABELS`): ``angry, disgust, fear, happy, sad, surprise,
neutral``, accepting common spellings (anger, happiness, sadness, surprised, ...).
AffectNet's eighth class, contempt, has no FER2013 counterpart: its images are left out
and counted in :attr:`EmotionSet.dropped`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import cv2
import numpy as np
import numpy.typing as npt

from kernel.types import EMOTION_LABELS
from training.run import TrainingError, data_fingerprint, write_atomic

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

FaceHandling = Literal["detect", "as-is"]
DType = TypeVar("DType", np.uint8, np.float32)
"""Pixel type a resize keeps: uint8 from image files, float32 from FER2013's CSV."""

LABEL_ALIASES: dict[str, str] = {
    "angry": "angry", "anger": "angry",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral",
}
"""Accepted label spellings (lower case) → FER2013 class names."""
DROPPED_LABELS: frozenset[str] = frozenset({"contempt"})
"""Labels with no FER2013 class; their samples are left out and counted."""

DEFAULT_FER2013_WEIGHT = 0.25
"""Weight of FER2013's original label in the FER+ soft target (``--fer2013-weight``)."""

FER_USAGE_SPLITS: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
"""FER2013's ``Usage`` column → split."""

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def label_index(name: str) -> int | None:
    """FER2013 class index of a label spelling; None for a dropped label (contempt)."""
    key = name.strip().lower()
    if key in DROPPED_LABELS:
        return None
    if key.isdigit() and int(key) < len(EMOTION_LABELS):
        return int(key)  # FER2013's own numeric labels use the same order
    if key not in LABEL_ALIASES:
        raise TrainingError(f"unknown emotion label {name!r}; expected one of {', '.join(EMOTION_LABELS)}")
    return EMOTION_LABELS.index(LABEL_ALIASES[key])


@dataclass
class EmotionSet:
    """Model inputs and labels of an emotion data set, in memory."""

    inputs: npt.NDArray[np.float32]
    """Grey pixels ``[N, 1, S, S]`` in 0–255, as the runtime feeds the model."""
    labels: npt.NDArray[np.int64]
    """FER2013 class indices ``[N]``."""
    subjects: list[str]
    """Who is in each sample (file-name stem for photos, the row for FER2013)."""
    sources: list[str]
    """Each sample's file path or CSV row id (for the data fingerprint and error messages)."""
    splits: list[str] = field(default_factory=list)
    """Split assigned by the data set (FER2013 Usage), or empty."""
    groups: list[str] = field(default_factory=list)
    """Subgroup of each sample when the data set gives one (``group`` column), or empty."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Samples left out, by reason (contempt, no face found, unreadable)."""
    description: str = ""
    """One line: which data set this is."""
    targets: npt.NDArray[np.float32] | None = None
    """Soft targets ``[N, 7]`` (class shares summing to 1) when the data set has them (FER+ votes)."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | npt.NDArray[np.int64]) -> EmotionSet:
        """The samples at ``indices``."""
        index = np.asarray(indices, dtype=np.int64)
        pick = index.tolist()
        return EmotionSet(
            inputs=self.inputs[index], labels=self.labels[index],
            subjects=[self.subjects[i] for i in pick], sources=[self.sources[i] for i in pick],
            splits=[self.splits[i] for i in pick] if self.splits else [],
            groups=[self.groups[i] for i in pick] if self.groups else [],
            description=self.description,
            targets=self.targets[index] if self.targets is not None else None,
        )

    def fingerprint(self) -> str:
        """sha256 over sources and labels (and soft targets, rounded to 1e-4, when there are any)."""
        if self.targets is None:
            return data_fingerprint(zip(self.sources, self.labels.tolist(), strict=True))
        return data_fingerprint(
            (f"{source}\t{label}", ",".join(f"{value:.4f}" for value in target))
            for source, label, target in zip(self.sources, self.labels.tolist(), self.targets.tolist(), strict=True))

    def soft_targets(self) -> npt.NDArray[np.float32]:
        """``[N, 7]`` training targets: the soft targets when the set has them, else one-hot labels."""
        if self.targets is not None:
            return self.targets
        return np.eye(len(EMOTION_LABELS), dtype=np.float32)[self.labels]

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Samples per class, ``[7]``."""
        return np.bincount(self.labels, minlength=len(EMOTION_LABELS)).astype(np.int64)


# --- FER2013 --------------------------------------------------------------------------


def resize_square(image: npt.NDArray[DType], size: int) -> npt.NDArray[DType]:
    """A square face image at ``size``×``size`` in its own dtype: area averaging to shrink, linear to grow."""
    if image.shape[:2] == (size, size):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, (size, size), interpolation=interpolation), image.dtype)


def read_fer2013_csv(path: Path, size: int) -> EmotionSet:
    """FER2013's ``emotion,pixels,Usage`` CSV (``Usage`` optional) at ``size``×``size``."""
    inputs, labels, sources, splits = [], [], [], []
    try:
        stream = path.open(newline="")
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc}") from None
    with stream:
        reader = csv.DictReader(stream)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "emotion" not in columns or "pixels" not in columns:
            raise TrainingError(f"{path}: a FER2013 CSV needs the columns emotion and pixels, has {reader.fieldnames}")
        for number, row in enumerate(reader, start=2):
            try:
                pixels = np.array(row[columns["pixels"]].split(), dtype=np.float32)
                side = round(pixels.size ** 0.5)
                if side * side != pixels.size or side < 8:
                    raise ValueError(f"{pixels.size} pixels is not a square image")
                label = label_index(row[columns["emotion"]])
            except (ValueError, TrainingError) as exc:
                raise TrainingError(f"{path}, line {number}: {exc}") from None
            if label is None:
                continue
            inputs.append(resize_square(pixels.reshape(side, side), size))
            labels.append(label)
            # A row's identity is its content: the fingerprint then changes when any pixel does.
            sources.append(f"row{number}:{hashlib.sha1(row[columns['pixels']].encode()).hexdigest()[:16]}")
            usage = row.get(columns.get("usage", ""), "") or ""
            splits.append(FER_USAGE_SPLITS.get(usage.strip(), "train"))
    if not labels:
        raise TrainingError(f"{path} has no usable rows")
    return EmotionSet(
        inputs=np.stack(inputs)[:, np.newaxis].astype(np.float32), labels=np.array(labels, np.int64),
        # FER2013 has no subject ids: each row is its own subject, and its Usage column splits.
        subjects=sources.copy(), sources=sources, splits=splits, description=f"FER2013 CSV {path.name}",
    )


# --- photos ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSample:
    """One labelled photo before face extraction."""

    path: Path
    """The image file."""
    label: str
    """Its label as written in the data set."""
    subject: str
    """Who is in it."""
    group: str = ""
    """Subgroup, when the data set gives one."""


def subject_of(path: Path) -> str:
    """Subject id from a file name: the stem without a trailing counter (``Abdullah_Gul_0005`` → ``Abdullah_Gul``)."""
    return re.sub(r"[_\-\s]*\d+$", "", path.stem) or path.stem


def list_labels_csv(folder: Path) -> list[PhotoSample]:
    """Photos of a folder with ``labels.csv`` (``image`` and ``label``/``emotion`` columns).

    Images are looked up in ``images/`` then beside the CSV; optional columns ``subject``
    and ``group`` give subject ids and subgroups.
    """
    table = folder / "labels.csv"
    with table.open(newline="") as stream:
        reader = csv.DictReader(stream)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        label_column = columns.get("label") or columns.get("emotion")
        if "image" not in columns or label_column is None:
            raise TrainingError(f"{table}: needs the columns image and label (or emotion), has {reader.fieldnames}")
        samples = []
        for row in reader:
            name = row[columns["image"]].strip()
            path = folder / "images" / name
            if not path.is_file():
                path = folder / name
            samples.append(PhotoSample(
                path=path, label=row[label_column],
                subject=(row.get(columns.get("subject", ""), "") or "").strip() or subject_of(Path(name)),
                group=(row.get(columns.get("group", ""), "") or "").strip(),
            ))
    return samples


def list_class_folders(folder: Path) -> list[PhotoSample]:
    """Photos in a folder per class (``happy/``, ``sad/``, ...)."""
    samples = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                samples.append(PhotoSample(path=path, label=class_dir.name, subject=subject_of(path)))
    if not samples:
        raise TrainingError(f"{folder} has no class sub-folders with images")
    return samples


class KeypointCache:
    """Five face keypoints per photo, keyed by path, size and mtime; a JSON file of numbers only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list[list[float]] | None] = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring unreadable keypoint cache %s", path)

    @staticmethod
    def key(image: Path) -> str:
        """Identity of a photo's current content."""
        stat = image.stat()
        return f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def get(self, image: Path) -> tuple[bool, list[list[float]] | None]:
        """(known, keypoints or None when no face was found)."""
        key = self.key(image)
        return (key in self.entries, self.entries.get(key))

    def put(self, image: Path, keypoints: list[list[float]] | None) -> None:
        """Remember a photo's keypoints (None: no face)."""
        self.entries[self.key(image)] = keypoints
        self.changed = True

    def save(self) -> None:
        """Write the cache atomically when it changed."""
        if self.path is not None and self.changed:
            write_atomic(self.path, json.dumps(self.entries).encode())
            self.changed = False


def load_runtime_detector(settings: Settings) -> tuple[Any, str]:
    """The runtime's configured detector (same model, input size, threshold) and its name."""
    from model_export.cache import resolve_model
    from pipeline.models import model_cache_for
    from vision.detection import FaceDetector

    cache = model_cache_for(settings)
    resolved = resolve_model(cache, settings.detector)
    detector = FaceDetector(resolved.path, input_size=settings.detector_input_size,
                            threshold=settings.detection_threshold, min_face_pixels=settings.min_face_pixels,
                            preference="cpu")
    return detector, f"{resolved.name}-{settings.detector_input_size}-{settings.detection_threshold}"


def largest_face_keypoints(detector: Any, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32] | None:
    """Keypoints ``[5, 2]`` of the largest detected face, or None."""
    from kernel.types import VideoFrame

    detections = detector.detect(VideoFrame("training", 0.0, np.ascontiguousarray(image)))
    if len(detections) == 0:
        return None
    sides = detections.boxes[:, 2:] - detections.boxes[:, :2]
    return np.asarray(detections.keypoints[int(np.argmax(sides[:, 0] * sides[:, 1]))], np.float32)


def as_runtime_crop(face: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A pre-cropped face (grey or BGR) → a 112×112 BGR crop whose centred 90 % is the face.

    Used for FER2013 rows and ``--faces as-is`` photos when they are fed to the runtime
    runner, which keeps the centred :attr:`EmotionRunner.crop_fraction` of every crop.
    """
    from kernel.types import CROP_SIZE
    from workers.runners import EmotionRunner

    margin = round(CROP_SIZE * (1 - EmotionRunner.crop_fraction) / 2)
    inner = CROP_SIZE - 2 * margin
    colour = face if face.ndim == 3 else cv2.cvtColor(face, cv2.COLOR_GRAY2BGR)
    resized = cv2.resize(colour, (inner, inner), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.copyMakeBorder(resized, margin, margin, margin, margin, cv2.BORDER_REPLICATE), np.uint8)


def iter_photo_crops(
    samples: Sequence[PhotoSample],
    *,
    faces: FaceHandling = "detect",
    settings: Settings | None = None,
    cache_dir: Path | None = None,
    dropped: Counter[str] | None = None,
    progress: bool = False,
) -> Iterator[tuple[PhotoSample, int, npt.NDArray[np.uint8]]]:
    """Yield (sample, FER2013 class, runtime crop ``[112, 112, 3]`` BGR) for every usable photo.

    With ``faces="detect"`` the crop is the runtime's: the configured detector's largest
    face aligned by :func:`vision.geometry.align_face`. Photos left out are counted in ``dropped``.
    """
    from training.loop import progress_bar
    from vision.geometry import align_face

    dropped = dropped if dropped is not None else Counter()
    detector = None
    cache = KeypointCache(None)
    if faces == "detect":
        from kernel.settings import load_settings

        detector, detector_name = load_runtime_detector(settings or load_settings())
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", detector_name)
        cache = KeypointCache(cache_dir / f"keypoints-{safe_name}.json" if cache_dir else None)
    try:
        for sample in progress_bar(samples, "faces", enabled=progress):
            try:
                label = label_index(sample.label)
            except TrainingError:
                dropped[f"unknown label {sample.label.strip()}"] += 1
                continue
            if label is None:
                dropped[sample.label.strip().lower()] += 1
                continue
            raw = cv2.imread(str(sample.path), cv2.IMREAD_COLOR)
            if raw is None:
                dropped["unreadable image"] += 1
                continue
            image = np.asarray(raw, np.uint8)
            if detector is None:
                yield sample, label, as_runtime_crop(image)
                continue
            known, points = cache.get(sample.path)
            if not known:
                found = largest_face_keypoints(detector, image)
                points = found.tolist() if found is not None else None
                cache.put(sample.path, points)
            if points is None:
                dropped["no face found"] += 1
                continue
            yield sample, label, align_face(image, np.asarray(points, np.float32))
    finally:
        cache.save()


def read_photos(
    samples: Sequence[PhotoSample],
    size: int,
    *,
    faces: FaceHandling = "detect",
    settings: Settings | None = None,
    cache_dir: Path | None = None,
    description: str = "",
    progress: bool = False,
) -> EmotionSet:
    """Model inputs for labelled photos, built exactly as the runtime builds them."""
    from workers.runners import EmotionRunner, emotion_model_input

    inputs, labels, subjects, sources, groups = [], [], [], [], []
    dropped: Counter[str] = Counter()
    for sample, label, crop in iter_photo_crops(samples, faces=faces, settings=settings, cache_dir=cache_dir,
                                                dropped=dropped, progress=progress):
        inputs.append(emotion_model_input(crop[np.newaxis], size, crop_fraction=EmotionRunner.crop_fraction)[0])
        labels.append(label)
        subjects.append(sample.subject)
        sources.append(str(sample.path))
        groups.append(sample.group)
    if not labels:
        raise TrainingError(f"no usable face in {len(samples)} photos ({dict(dropped)})")
    return EmotionSet(
        inputs=np.stack(inputs).astype(np.float32), labels=np.array(labels, np.int64), subjects=subjects,
        sources=sources, groups=groups if any(groups) else [], dropped=dropped, description=description,
    )


def list_photo_samples(path: Path) -> tuple[list[PhotoSample], str]:
    """The photos of a ``labels.csv`` folder or of class folders, and which kind it is."""
    if (path / "labels.csv").is_file():
        return list_labels_csv(path), "labels.csv folder"
    return list_class_folders(path), "class folders"


def concatenate_sets(sets: Sequence[EmotionSet], *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0) -> EmotionSet:
    """Several data sets as one, each sample keeping a split.

    Each set is split on its own first (:func:`split_by_subject`: its own split when it has
    one, with a validation slice carved from its training part, else by subject), so every
    source contributes to every split it can.
    """
    if len(sets) == 1:
        return sets[0]
    splits: list[str] = []
    for data in sets:
        own = ["train"] * len(data)
        for name, indices in split_by_subject(data, val_fraction=val_fraction, test_fraction=test_fraction,
                                              seed=seed).items():
            for index in indices.tolist():
                own[index] = name
        splits += own
    with_targets = any(data.targets is not None for data in sets)
    dropped: Counter[str] = Counter()
    for data in sets:
        dropped.update({f"{data.description}: {reason}": count for reason, count in data.dropped.items()})
    return EmotionSet(
        inputs=np.concatenate([data.inputs for data in sets]),
        labels=np.concatenate([data.labels for data in sets]),
        subjects=[subject for data in sets for subject in data.subjects],
        sources=[source for data in sets for source in data.sources],
        splits=splits,
        groups=[group for data in sets for group in (data.groups or [""] * len(data))]
        if any(data.groups for data in sets) else [],
        dropped=dropped,
        description=" + ".join(data.description for data in sets),
        targets=np.concatenate([data.soft_targets() for data in sets]) if with_targets else None,
    )


def split_by_subject(
    data: EmotionSet, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
) -> dict[str, npt.NDArray[np.int64]]:
    """Indices of train / val / test with no subject in two splits.

    The data set's own split (FER2013 Usage, FER+) wins when it has one. When that split has
    no validation part (FER+ has Training and PublicTest here), a ``val_fraction`` of the
    training subjects becomes the validation split, so the test split is never used to pick
    a model. Without an own split, subjects are shuffled with ``seed`` and assigned greedily
    until each split holds its share of samples.
    """
    if data.splits and len(set(data.splits)) > 1:
        own = {name: np.array([i for i, s in enumerate(data.splits) if s == name], np.int64)
               for name in ("train", "val", "test")}
        if len(own["val"]) == 0 and val_fraction > 0 and len(own["train"]):
            carved = _split_subjects([data.subjects[i] for i in own["train"].tolist()],
                                     val_fraction=val_fraction, test_fraction=0.0, seed=seed)
            own["val"] = own["train"][carved["val"]]
            own["train"] = own["train"][carved["train"]]
        return own
    return _split_subjects(data.subjects, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def _split_subjects(subject_of_sample: Sequence[str], *, val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, npt.NDArray[np.int64]]:
    """Indices of train / val / test: subjects shuffled with ``seed``, assigned greedily by sample share."""
    counts = Counter(subject_of_sample)
    subjects = sorted(counts)
    np.random.default_rng(seed).shuffle(subjects)
    total = len(subject_of_sample)
    assigned: dict[str, str] = {}
    filled = {"test": 0, "val": 0}
    for subject in subjects:
        if filled["test"] < test_fraction * total:
            assigned[subject] = "test"
        elif filled["val"] < val_fraction * total:
            assigned[subject] = "val"
        else:
            assigned[subject] = "train"
        if assigned[subject] in filled:
            filled[assigned[subject]] += counts[subject]
    return {name: np.array([i for i, s in enumerate(subject_of_sample) if assigned[s] == name], np.int64)
            for name in ("train", "val", "test")}
