"""Reader for the DAiSEE data set in its own layout, and subject-disjoint folds.

DAiSEE (Gupta et al., 2016) ships 10-second clips of 112 students, each labelled with
four affective states at levels 0–3::

    <root>/DataSet/{Train,Validation,Test}/<subject>/<clip>/<clip>.avi
    <root>/Labels/{Train,Validation,Test}Labels.csv   # ClipID,Boredom,Engagement,Confusion,Frustration

The real files are untidy, and the reader tolerates what they contain: header names with
stray spaces (``Frustration `` ends in one), ClipIDs written ``.mp4`` for clips stored as
``.avi`` (and the other way round), label rows of clips that are not on disk and clips
that have no label row. Each of those, and a clip that cannot be opened as a video, is
recorded as a :class:`DatasetProblem` and left out; none of them stops the reading. A
subject whose clips sit in two splits would leak faces between training and evaluation,
so that one is an error (:class:`SubjectLeakError`) naming the subject and the splits.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kernel.errors import BadInputError

logger = logging.getLogger(__name__)

#: DAiSEE's split folders, in the order they are read.
SPLITS: tuple[str, ...] = ("Train", "Validation", "Test")

#: The four affective states, in the order of the label columns and of the model heads.
AFFECTIVE_STATES: tuple[str, ...] = ("boredom", "engagement", "confusion", "frustration")

#: Levels per affective state (0 very low … 3 very high).
LEVEL_COUNT = 4

#: File extensions a clip may have on disk; ClipIDs use either.
CLIP_EXTENSIONS: tuple[str, ...] = (".avi", ".mp4")

ProblemKind = Literal["missing_label", "missing_clip", "corrupt_clip", "bad_label"]


class SubjectLeakError(BadInputError):
    """A subject has clips in more than one split, so the splits are not subject-disjoint."""


@dataclass(frozen=True)
class DaiseeClip:
    """One labelled clip."""

    clip_id: str
    """The clip's name without extension (e.g. ``1100011002``)."""
    subject: str
    """The student, i.e. the clip's grandparent folder."""
    split: str
    """``Train``, ``Validation`` or ``Test``."""
    path: Path
    """The video file."""
    labels: tuple[int, int, int, int]
    """Levels 0–3 of boredom, engagement, confusion and frustration (:data:`AFFECTIVE_STATES`)."""

    def label(self, state: str) -> int:
        """The level of one affective state."""
        return self.labels[AFFECTIVE_STATES.index(state)]


@dataclass(frozen=True)
class DatasetProblem:
    """Something in the data set that was skipped, with the reason."""

    kind: ProblemKind
    """What is wrong: a clip without label, a label without clip, a clip that cannot be read, a bad label row."""
    split: str
    """The split it was found in."""
    item: str
    """The clip id or file path concerned."""
    detail: str
    """One line saying what was found."""

    def __str__(self) -> str:
        return f"{self.split}/{self.item}: {self.kind.replace('_', ' ')} ({self.detail})"


@dataclass
class DaiseeDataset:
    """The readable, labelled clips of a DAiSEE tree and what was skipped on the way."""

    root: Path
    """The folder holding ``DataSet`` and ``Labels``."""
    clips: list[DaiseeClip]
    """Every usable clip, sorted by split, subject and clip id."""
    problems: list[DatasetProblem] = field(default_factory=list)
    """Everything skipped, in the order it was found (the ``DatasetProblems`` list)."""

    def split(self, name: str) -> list[DaiseeClip]:
        """The clips of one split."""
        if name not in SPLITS:
            raise BadInputError(f"unknown DAiSEE split {name!r}; expected one of {', '.join(SPLITS)}")
        return [clip for clip in self.clips if clip.split == name]

    def subjects(self, split: str | None = None) -> list[str]:
        """Sorted subject ids, of one split or of all."""
        return sorted({clip.subject for clip in self.clips if split is None or clip.split == split})

    def add_problem(self, problem: DatasetProblem) -> None:
        """Record a problem found later (e.g. a clip that fails while decoding) and drop that clip."""
        self.problems.append(problem)
        self.clips = [clip for clip in self.clips if not (clip.split == problem.split and
                                                          problem.item in (clip.clip_id, str(clip.path)))]

    def summary(self) -> str:
        """A few lines for the terminal: clips per split and every problem, counted by kind."""
        counts = Counter(clip.split for clip in self.clips)
        lines = [f"DAiSEE {self.root}: " + ", ".join(f"{split} {counts.get(split, 0)} clips" for split in SPLITS)
                 + f", {len(self.subjects())} subjects"]
        if self.problems:
            kinds = Counter(problem.kind for problem in self.problems)
            lines.append("skipped: " + ", ".join(f"{count} {kind.replace('_', ' ')}"
                                                 for kind, count in sorted(kinds.items())))
            lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)


def _normalised(name: str) -> str:
    """Header or id key: no surrounding spaces, lower case (DAiSEE's headers have stray spaces)."""
    return name.strip().lower()


def _clip_key(clip_id: str) -> str:
    """ClipIDs are written with .avi or .mp4 whatever the file on disk is: compare stems."""
    text = clip_id.strip()
    for extension in CLIP_EXTENSIONS:
        if text.lower().endswith(extension):
            return text[: -len(extension)]
    return text


def read_labels(csv_path: Path, split: str, problems: list[DatasetProblem]) -> dict[str, tuple[int, int, int, int]]:
    """Read one ``<Split>Labels.csv``: clip stem → four levels; bad rows become problems.

    Raises:
        BadInputError: the file has no ClipID column or lacks one of the four states.
    """
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise BadInputError(f"{csv_path}: the label file is empty")
        columns = {_normalised(name): index for index, name in enumerate(header)}
        wanted = ("clipid", *AFFECTIVE_STATES)
        missing = [name for name in wanted if name not in columns]
        if missing:
            raise BadInputError(f"{csv_path}: missing column(s) {', '.join(missing)}; the header is {header}")
        labels: dict[str, tuple[int, int, int, int]] = {}
        for line_number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                clip = _clip_key(row[columns["clipid"]])
                levels = tuple(int(row[columns[state]].strip()) for state in AFFECTIVE_STATES)
            except (IndexError, ValueError):
                problems.append(DatasetProblem("bad_label", split, f"{csv_path.name}:{line_number}",
                                               f"row {row!r} is not a ClipID and four levels"))
                continue
            if not clip or any(level < 0 or level >= LEVEL_COUNT for level in levels):
                problems.append(DatasetProblem("bad_label", split, f"{csv_path.name}:{line_number}",
                                               f"levels {levels} outside 0–{LEVEL_COUNT - 1}"))
                continue
            labels[clip] = (levels[0], levels[1], levels[2], levels[3])
    return labels


def _clip_files(split_dir: Path) -> dict[str, tuple[str, Path]]:
    """Clip stem → (subject, file) for every clip file under ``DataSet/<Split>``."""
    found: dict[str, tuple[str, Path]] = {}
    if not split_dir.is_dir():
        return found
    for subject_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for clip_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
            for path in sorted(clip_dir.iterdir()):
                if path.is_file() and path.suffix.lower() in CLIP_EXTENSIONS:
                    found[path.stem] = (subject_dir.name, path)
    return found


def _readable(path: Path) -> str | None:
    """None when PyAV opens the clip and finds a video stream; otherwise why not."""
    from vision.sources import RecordedFileSource

    try:
        RecordedFileSource(path, 1.0).probe()
    except BadInputError as exc:
        return str(exc)
    return None


def read_daisee(root: Path, *, check_clips: bool = True, splits: Sequence[str] = SPLITS) -> DaiseeDataset:
    """Read a DAiSEE tree: labelled, readable clips plus the problems met on the way.

    ``check_clips`` opens every clip's container (cheap: no frame is decoded) so that a
    corrupt file is skipped here rather than in the middle of training.

    Raises:
        BadInputError: ``root`` has no ``DataSet`` or ``Labels`` folder, or a label file is unusable.
        SubjectLeakError: a subject has clips in two splits.
    """
    root = Path(root)
    if not (root / "DataSet").is_dir() or not (root / "Labels").is_dir():
        raise BadInputError(f"{root}: not a DAiSEE folder (expected DataSet/ and Labels/ inside)")
    problems: list[DatasetProblem] = []
    clips: list[DaiseeClip] = []
    subject_splits: dict[str, set[str]] = {}
    for split in splits:
        label_file = root / "Labels" / f"{split}Labels.csv"
        files = _clip_files(root / "DataSet" / split)
        for subject, _ in files.values():
            subject_splits.setdefault(subject, set()).add(split)
        if not label_file.is_file():
            if files:
                problems.extend(DatasetProblem("missing_label", split, stem, f"no {label_file.name}")
                                for stem in sorted(files))
            continue
        labels = read_labels(label_file, split, problems)
        for stem in sorted(labels.keys() - files.keys()):
            problems.append(DatasetProblem("missing_clip", split, stem,
                                           f"labelled in {label_file.name}, no video on disk"))
        for stem, (subject, path) in sorted(files.items()):
            if stem not in labels:
                problems.append(DatasetProblem("missing_label", split, stem, f"no row in {label_file.name}"))
                continue
            reason = _readable(path) if check_clips else None
            if reason is not None:
                problems.append(DatasetProblem("corrupt_clip", split, stem, reason))
                continue
            clips.append(DaiseeClip(stem, subject, split, path, labels[stem]))
    leaks = {subject: sorted(found, key=SPLITS.index) for subject, found in subject_splits.items() if len(found) > 1}
    if leaks:
        described = "; ".join(f"subject {subject} in {' and '.join(found)}" for subject, found in sorted(leaks.items()))
        raise SubjectLeakError(f"{root}: the splits are not subject-disjoint: {described}")
    dataset = DaiseeDataset(root, clips, problems)
    for problem in problems:
        logger.warning("DAiSEE: skipped %s", problem)
    return dataset


def subject_folds(clips: Iterable[DaiseeClip], folds: int, *,
                  seed: int = 0) -> list[tuple[list[DaiseeClip], list[DaiseeClip]]]:
    """Subject-disjoint k-fold cross-validation: ``folds`` pairs of (training clips, held-out clips).

    Subjects are shuffled with ``seed`` and dealt round-robin so fold sizes differ by at
    most one subject; every subject is held out exactly once.

    Raises:
        BadInputError: fewer subjects than folds, or fewer than two folds.
    """
    pool = list(clips)
    subjects = sorted({clip.subject for clip in pool})
    if folds < 2:
        raise BadInputError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(subjects) < folds:
        raise BadInputError(f"{folds} subject-disjoint folds need at least {folds} subjects, found {len(subjects)}")
    random.Random(seed).shuffle(subjects)
    fold_of = {subject: index % folds for index, subject in enumerate(subjects)}
    return [([clip for clip in pool if fold_of[clip.subject] != fold],
             [clip for clip in pool if fold_of[clip.subject] == fold]) for fold in range(folds)]
