"""DAiSEE reader, face extraction, engagement model families, export and loading in the workers.

The tests build a small DAiSEE tree in its real layout from clips cut out of the videos
in ../shared/media (re-encoded with PyAV), with the real files' quirks: a header with a
stray space, a ClipID written ``.mp4`` for a clip stored as ``.avi``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from kernel.types import CropBatch, FaceAnalysisBatch
from tests.conftest import MEDIA_DIR, REPO_ROOT

pytestmark = [pytest.mark.media]

#: (split, subject, clip number, source video, start second, labels boredom/engagement/confusion/frustration)
CLIPS: tuple[tuple[str, str, int, str, float, tuple[int, int, int, int]], ...] = (
    ("Train", "500001", 1, "WolfgangLanger_Pexels.mp4", 0.0, (0, 3, 0, 0)),
    ("Train", "500001", 2, "WolfgangLanger_Pexels.mp4", 2.0, (1, 2, 1, 0)),
    ("Train", "500002", 1, "WolfgangLanger_Pexels.mp4", 4.0, (2, 1, 0, 1)),
    ("Train", "500002", 2, "face_noface.mov", 3.0, (3, 0, 2, 1)),
    ("Train", "500003", 1, "single_face.mp4", 0.0, (0, 3, 0, 0)),
    ("Train", "500003", 2, "noface_face.mov", 0.5, (2, 1, 1, 2)),
    ("Validation", "500004", 1, "WolfgangLanger_Pexels.mp4", 8.0, (1, 2, 0, 0)),
    ("Validation", "500004", 2, "face_noface.mov", 0.0, (0, 3, 1, 0)),
    ("Test", "500005", 1, "WolfgangLanger_Pexels.mp4", 12.0, (0, 2, 0, 0)),
    ("Test", "500005", 2, "noface_face.mov", 4.0, (2, 1, 0, 1)),
)

#: Seconds per test clip (DAiSEE's are 10 s; short keeps the tests fast).
CLIP_SECONDS = 2.0


def cut_clip(source: Path, target: Path, start: float, seconds: float = CLIP_SECONDS) -> None:
    """Re-encode ``seconds`` of ``source`` from ``start`` into a small MJPEG .avi (DAiSEE's container)."""
    import av

    target.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        stream = reader.streams.video[0]
        out = writer.add_stream("mjpeg", rate=10)
        out.width, out.height, out.pix_fmt = 320, 180, "yuvj420p"
        out.time_base = Fraction(1, 10)
        next_time, index = start, 0
        for frame in reader.decode(stream):
            if frame.time is None or frame.time < next_time:
                continue
            if frame.time >= start + seconds:
                break
            image = frame.reformat(width=320, height=180, format="yuvj420p")
            image.pts, image.time_base = index, Fraction(1, 10)
            for packet in out.encode(image):
                writer.mux(packet)
            index += 1
            next_time = start + index / 10
        for packet in out.encode():
            writer.mux(packet)


def write_labels(root: Path, split: str, rows: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    """``<Split>Labels.csv`` with DAiSEE's header, including its stray trailing space."""
    path = root / "Labels" / f"{split}Labels.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ClipID", "Boredom", "Engagement", "Confusion", "Frustration "])
        writer.writerows([clip, *labels] for clip, labels in rows)


ClipRow = tuple[str, str, int, str, float, tuple[int, int, int, int]]


def build_daisee(root: Path, clips: tuple[ClipRow, ...] = CLIPS) -> Path:
    """A DAiSEE tree: DataSet/<split>/<subject>/<clip>/<clip>.avi and Labels/<split>Labels.csv."""
    rows: dict[str, list[tuple[str, tuple[int, int, int, int]]]] = {}
    for position, (split, subject, number, video, start, labels) in enumerate(clips):
        clip_id = f"{subject}{number:04d}"
        cut_clip(MEDIA_DIR / video, root / "DataSet" / split / subject / clip_id / f"{clip_id}.avi", start)
        # One ClipID written .mp4 although the file is .avi, as in DAiSEE's own label files.
        rows.setdefault(split, []).append((f"{clip_id}.mp4" if position == 1 else f"{clip_id}.avi", labels))
    for split, split_rows in rows.items():
        write_labels(root, split, split_rows)
    return root


@pytest.fixture(scope="module")
def daisee_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The well-formed test tree, built once for the module."""
    return build_daisee(tmp_path_factory.mktemp("daisee"))


# --- reader -----------------------------------------------------------------------------


def test_reader_reads_the_layout_with_stray_spaces_and_mp4_ids(daisee_root: Path) -> None:
    from training.daisee import read_daisee, subject_folds

    dataset = read_daisee(daisee_root)
    assert dataset.problems == []
    assert len(dataset.clips) == len(CLIPS)
    assert [len(dataset.split(split)) for split in ("Train", "Validation", "Test")] == [6, 2, 2]
    second = next(clip for clip in dataset.clips if clip.clip_id == "5000010002")
    assert second.path.suffix == ".avi" and second.labels == (1, 2, 1, 0) and second.subject == "500001"
    assert second.label("engagement") == 2
    folds = subject_folds(dataset.split("Train"), 3, seed=1)
    held_out = [sorted({clip.subject for clip in test}) for _, test in folds]
    assert sorted(subject for fold in held_out for subject in fold) == ["500001", "500002", "500003"]
    for train, test in folds:
        assert not {clip.subject for clip in train} & {clip.subject for clip in test}
        assert len(train) + len(test) == 6


def test_reader_reports_missing_labels_missing_clips_and_corrupt_clips(tmp_path: Path) -> None:
    from training.daisee import read_daisee

    root = build_daisee(tmp_path, CLIPS[:3] + CLIPS[6:7])
    # A corrupt clip: garbage bytes with an .avi name, labelled.
    corrupt = root / "DataSet" / "Train" / "500009" / "5000090001" / "5000090001.avi"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with (root / "Labels" / "TrainLabels.csv").open("a") as handle:
        handle.write("5000090001.avi,0,3,0,0\n")
        handle.write("5000770001.avi,1,1,1,1\n")  # labelled, not on disk
        handle.write("5000010009.avi,1,seven,1,1\n")  # not a level
    # The validation clip loses its label row.
    write_labels(root, "Validation", [])

    dataset = read_daisee(root)
    kinds = sorted((problem.kind, problem.item) for problem in dataset.problems)
    assert ("corrupt_clip", "5000090001") in kinds
    assert ("missing_clip", "5000770001") in kinds
    assert ("missing_label", "5000040001") in kinds
    assert any(kind == "bad_label" for kind, _ in kinds)
    assert sorted(clip.clip_id for clip in dataset.clips) == ["5000010001", "5000010002", "5000020001"]
    summary = dataset.summary()
    assert "1 corrupt clip" in summary and "1 missing clip" in summary and "5000090001" in summary


def test_reader_rejects_a_subject_in_two_splits(tmp_path: Path) -> None:
    from training.daisee import SubjectLeakError, read_daisee

    leaking = (*CLIPS[:2], ("Test", "500001", 3, "single_face.mp4", 0.0, (0, 3, 0, 0)))
    root = build_daisee(tmp_path, leaking)
    with pytest.raises(SubjectLeakError, match=r"subject 500001 in Train and Test"):
        read_daisee(root)


def test_reader_rejects_a_folder_that_is_not_daisee(tmp_path: Path) -> None:
    from kernel.errors import BadInputError
    from training.daisee import read_daisee, subject_folds

    with pytest.raises(BadInputError, match="not a DAiSEE folder"):
        read_daisee(tmp_path)
    with pytest.raises(BadInputError, match="need at least 4 subjects"):
        subject_folds([], 4)


# --- faces and features -------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor(default_models: Path) -> Iterator[object]:
    from kernel.settings import Settings
    from training.frames import ClipFaceExtractor

    settings = Settings(model_cache_dir=default_models, execution_provider="cpu")
    yield ClipFaceExtractor.from_settings(settings, sample_fps=2.0, cache_dir=None)


def test_faces_match_the_runtime_and_are_cached_as_numbers_only(daisee_root: Path, extractor: object,
                                                                tmp_path: Path) -> None:
    from kernel.types import CROP_SIZE
    from pipeline.capture import crop_batch_for
    from training.frames import ClipFaceExtractor, ClipFaces, largest_face

    assert isinstance(extractor, ClipFaceExtractor)
    cached = ClipFaceExtractor(extractor.detector, detector_id=extractor.detector_id, sample_fps=2.0,
                               cache_dir=tmp_path / "cache")
    clip = daisee_root / "DataSet" / "Train" / "500001" / "5000010001" / "5000010001.avi"
    faces = cached.faces(clip)
    assert len(faces) == 4 and faces.found.all()  # 2 s at 2 fps, the lecturer always in view
    again = cached.faces(clip)
    assert (cached.detected, cached.cache_hits) == (1, 1)
    np.testing.assert_array_equal(again.keypoints, faces.keypoints)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1
    with np.load(entries[0]) as stored:  # numbers only: no array with an image's shape
        assert all(stored[name].ndim <= 3 and stored[name].size <= 4 * 10 for name in stored.files)
    # The crops re-made in memory are the runtime's crops of the same frames.
    from vision.sources import RecordedFileSource

    batch = cached.crops(clip, faces)
    assert batch.crops.shape == (4, CROP_SIZE, CROP_SIZE, 3)
    frame = next(iter(RecordedFileSource(clip, 2.0)))
    runtime = crop_batch_for(0, frame, largest_face(extractor.detector.detect(frame)))
    np.testing.assert_array_equal(batch.crops[0], runtime.crops[0])
    np.testing.assert_allclose(batch.head_pose[0], runtime.head_pose[0], atol=1e-5)
    # A clip that changes on disk gets a new cache key.
    clip.touch()
    assert cached.cache_key(clip) != entries[0].stem
    assert isinstance(ClipFaces.load(entries[0]), ClipFaces)


def test_faces_of_a_clip_without_face_and_of_a_corrupt_clip(tmp_path: Path, extractor: object) -> None:
    from kernel.errors import BadInputError
    from training.frames import ClipFaceExtractor

    assert isinstance(extractor, ClipFaceExtractor)
    empty = tmp_path / "empty.avi"
    cut_clip(MEDIA_DIR / "no_face.mp4", empty, 0.0)
    faces = extractor.faces(empty)
    assert len(faces) == 4 and not faces.found.any() and faces.face_share == 0.0
    assert len(extractor.crops(empty, faces)) == 0
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    with pytest.raises(BadInputError):
        extractor.faces(garbage)


# --- training ---------------------------------------------------------------------------


def _settings(default_models: Path) -> object:
    from kernel.settings import Settings

    return Settings(model_cache_dir=default_models, execution_provider="cpu")


def _train(daisee_root: Path, out: Path, default_models: Path, model: str, *, epochs: int = 2,
           folds: int = 0, init: Path | None = None, scheduler: str = "cosine",
           subgroups: Path | None = None) -> object:
    from kernel.settings import Settings
    from training.engagement_train import EngagementTrainOptions, train_engagement
    from training.loop import TrainConfig

    settings = _settings(default_models)
    assert isinstance(settings, Settings)
    options = EngagementTrainOptions(
        daisee=daisee_root, out=out, model=model, init=init, fps=2.0, folds=folds,  # type: ignore[arg-type]
        subgroups=subgroups,
        config=TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, device="cpu", seed=7,
                           scheduler=scheduler))  # type: ignore[arg-type]
    return train_engagement(options, settings, progress=False, echo=lambda _line: None)


@pytest.mark.torch
def test_feature_model_trains_with_cross_validation_and_reports_every_metric(
        daisee_root: Path, default_models: Path, tmp_path: Path) -> None:
    from training.engagement_train import EngagementRunResult

    groups = tmp_path / "groups.csv"
    groups.write_text("subject,group\n500005,glasses\n500001,no glasses\n")
    result = _train(daisee_root, tmp_path / "features", default_models, "features", epochs=3, folds=3,
                    subgroups=groups)
    assert isinstance(result, EngagementRunResult)
    engagement = result.test_metrics["clip engagement"]
    assert engagement.count == 2 and engagement.confusion.sum() == 2
    summary = engagement.summary()
    assert {"accuracy", "macro_f1", "uar", "engaged_auc"} <= set(summary)
    assert set(result.test_metrics) >= {f"{level} {state}" for level in ("clip", "frame")
                                        for state in ("boredom", "engagement", "confusion", "frustration")}
    assert {"accuracy_mean", "macro_f1_mean", "uar_mean"} <= set(result.cross_validation)
    assert sorted(p.name for p in (tmp_path / "features" / "folds").iterdir()) == ["1", "2", "3"]
    run = json.loads((tmp_path / "features" / "run.json").read_text())
    assert run["task"] == "engagement" and run["input_spec"]["kind"] == "features"
    assert run["metrics"]["subgroups"]["glasses"]["count"] == 2  # the Test split's subject
    assert run["metrics"]["test"]["clip engagement"]["confusion"]
    report = (tmp_path / "features" / "report.html").read_text()
    assert "<svg" in report and "clip engagement" in report and "Per-subgroup metrics" in report
    # The cache holds numbers only: .npz files of faces and features, no image files.
    cached = list((tmp_path / "features" / "cache").iterdir())
    assert cached and all(path.suffix == ".npz" for path in cached)

    # Exported with parity on the run's real feature rows, it replaces the baseline in the workers.
    from training.export import export_run

    exported = export_run(tmp_path / "features", "daisee-features-test", cache_dir=tmp_path / "models")
    assert exported.parity_max_abs_diff <= 1e-4 and exported.parity_samples > 0
    models = _worker_models(default_models, exported.path)
    batch = _real_crops(daisee_root, default_models)
    analysis = _analyse(batch, models)
    from training.engagement_features import ordinal_feature_model
    from training.run import load_trained_model
    from workers.inference import engagement_features

    trained, _ = load_trained_model(tmp_path / "features")
    rows = engagement_features(batch.head_pose, analysis.emotion_probabilities, None, None)
    import torch

    with torch.no_grad():
        expected = trained(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(analysis.engagement_probabilities, expected, atol=1e-4)
    assert isinstance(ordinal_feature_model(), torch.nn.Module)


@pytest.mark.torch
def test_temporal_model_trains_on_clip_sequences(daisee_root: Path, default_models: Path, tmp_path: Path) -> None:
    from training.engagement_train import EngagementRunResult

    result = _train(daisee_root, tmp_path / "temporal", default_models, "temporal")
    assert isinstance(result, EngagementRunResult)
    assert result.info.config["sequence_length"] == 4
    assert "frame engagement" not in result.test_metrics
    assert result.test_metrics["clip engagement"].count == 2
    from kernel.errors import ModelSupplyError
    from training.export import export_run

    exported = export_run(tmp_path / "temporal", "daisee-temporal-test", cache_dir=tmp_path / "models")
    assert exported.parity_max_abs_diff <= 1e-4
    # Any batch size and clip length run in onnxruntime as in PyTorch.
    import onnxruntime
    import torch

    from training.run import load_trained_model

    trained, _ = load_trained_model(tmp_path / "temporal")
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    sequences = np.load(tmp_path / "temporal" / "parity_inputs.npy")
    for inputs in (sequences[:1], np.concatenate([sequences] * 3)[:, :3]):
        with torch.no_grad():
            expected = trained(torch.from_numpy(inputs)).numpy()
        got = session.run(None, {session.get_inputs()[0].name: inputs})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    # Exported, but the workers score one crop at a time: they refuse it and say why.
    with pytest.raises(ModelSupplyError, match="temporal"):
        _worker_models(default_models, exported.path)


@pytest.mark.torch
def test_frame_model_trains_and_resumes(daisee_root: Path, default_models: Path, tmp_path: Path) -> None:
    import torch

    from training.engagement_train import EngagementRunResult

    # A constant learning rate: a 1-epoch run's schedule is then the first epoch of a 2-epoch run's.
    first = _train(daisee_root, tmp_path / "frame", default_models, "frame", epochs=1, scheduler="constant")
    assert isinstance(first, EngagementRunResult)
    assert first.test_metrics["frame engagement"].count > 0
    resumed = _train(daisee_root, tmp_path / "frame", default_models, "frame", epochs=2, scheduler="constant")
    straight = _train(daisee_root, tmp_path / "straight", default_models, "frame", epochs=2, scheduler="constant")
    assert isinstance(resumed, EngagementRunResult) and isinstance(straight, EngagementRunResult)
    assert resumed.info.run_id == first.info.run_id
    for name, value in torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"].items():
        other = torch.load(tmp_path / "frame" / "checkpoint.pt", weights_only=True)["model"][name]
        torch.testing.assert_close(other, value, msg=f"{name} differs after resuming")

    from kernel.settings import Settings
    from training.engagement_train import engagement_parity_inputs
    from training.export import export_run
    from training.run import load_trained_model
    from workers.runners import emotion_model_input

    settings = _settings(default_models)
    assert isinstance(settings, Settings)
    parity = engagement_parity_inputs(tmp_path / "frame", settings, count=8)
    assert parity.shape == (8, 1, 64, 64) and parity.max() > 50  # real faces, not zeros
    exported = export_run(tmp_path / "frame", "daisee-frame-test", cache_dir=tmp_path / "models",
                          parity_inputs=parity)
    assert exported.parity_max_abs_diff <= 1e-4
    models = _worker_models(default_models, exported.path)
    batch = _real_crops(daisee_root, default_models)
    analysis = _analyse(batch, models)
    trained, _ = load_trained_model(tmp_path / "frame")
    with torch.no_grad():
        expected = trained(torch.from_numpy(emotion_model_input(batch.crops, 64))).numpy()
    np.testing.assert_allclose(analysis.engagement_probabilities, expected, atol=1e-4)
    np.testing.assert_allclose(analysis.engagement_probabilities.sum(axis=1), 1.0, atol=1e-5)


def _fer2013_csv(path: Path) -> Path:
    """FER2013 CSV rows (48×48 grey) made from two face photos per class of the dev set."""
    import cv2

    from tests.conftest import DATA_DIR
    from training.emotion_data import label_index

    folder = DATA_DIR / "facial_expressions_dev"
    taken: dict[int, int] = {}
    with (folder / "labels.csv").open(newline="") as handle, path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["emotion", "pixels", "Usage"])
        for row in csv.DictReader(handle):
            label = label_index(row["emotion"])
            if label is None or taken.get(label, 0) >= 2:
                continue
            image = cv2.imread(str(folder / "images" / row["image"]), cv2.IMREAD_GRAYSCALE)
            if image is None:
                continue
            side = min(image.shape)
            top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
            face = cv2.resize(image[top:top + side, left:left + side], (48, 48), interpolation=cv2.INTER_AREA)
            usage = "Training" if taken.get(label, 0) == 0 else "PublicTest"
            writer.writerow([label, " ".join(str(int(v)) for v in face.ravel()), usage])
            taken[label] = taken.get(label, 0) + 1
    return path


@pytest.mark.torch
def test_transfer_starts_from_an_emotion_run(daisee_root: Path, default_models: Path, tmp_path: Path) -> None:
    import torch

    from training.emotion_train import train_emotion
    from training.engagement_models import FrameEngagementNet, emotion_backbone
    from training.engagement_train import EngagementRunResult
    from training.loop import TrainConfig
    from training.run import TrainingError, load_trained_model

    emotion_dir = tmp_path / "emo"
    train_emotion(_fer2013_csv(tmp_path / "fer.csv"), emotion_dir, family="mini-xception",
                  config=TrainConfig(epochs=1, batch_size=8, device="cpu"), progress=False)
    fresh = FrameEngagementNet("mini-xception")
    assert fresh.load_backbone(emotion_dir) > 10
    emotion, _ = load_trained_model(emotion_dir)
    for name, value in emotion_backbone(emotion).state_dict().items():
        torch.testing.assert_close(fresh.backbone.state_dict()[name], value)
    result = _train(daisee_root, tmp_path / "transfer", default_models, "transfer", epochs=1, init=emotion_dir)
    assert isinstance(result, EngagementRunResult)
    assert result.info.config["init"] == str(emotion_dir)
    assert result.test_metrics["frame engagement"].count > 0
    # An engagement run is not an emotion run to start from.
    with pytest.raises(TrainingError, match="expected an emotion run"):
        fresh.load_backbone(tmp_path / "transfer")


# --- helpers for the worker checks ------------------------------------------------------


def _worker_models(default_models: Path, engagement_model: Path) -> object:
    """The workers' models with the exported engagement model configured, as a worker loads them."""
    from kernel.settings import Settings
    from pipeline.models import load_inference_models

    settings = Settings(model_cache_dir=default_models, execution_provider="cpu",
                        engagement_model=str(engagement_model))
    return load_inference_models(settings)


def _real_crops(daisee_root: Path, default_models: Path) -> CropBatch:
    """Runtime crops of a test clip's faces."""
    from kernel.settings import Settings
    from training.frames import ClipFaceExtractor

    settings = _settings(default_models)
    assert isinstance(settings, Settings)
    extractor = ClipFaceExtractor.from_settings(settings, sample_fps=2.0, cache_dir=None)
    clip = daisee_root / "DataSet" / "Test" / "500005" / "5000050001" / "5000050001.avi"
    batch = extractor.crops(clip, extractor.faces(clip))
    assert len(batch) > 0
    return batch


def _analyse(batch: CropBatch, models: object) -> FaceAnalysisBatch:
    from workers.inference import InferenceModels, analyse_crops

    assert isinstance(models, InferenceModels)
    analysis = analyse_crops(batch, models)
    assert analysis.engagement_probabilities.shape == (len(batch), 4)
    return analysis


# --- command line -------------------------------------------------------------------------


def _classlens(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The repository on the path: an editable install made before training/ existed does not map it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "classlens", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, check=False, env=env)


@pytest.mark.torch
def test_command_line_trains_and_evaluates_the_default_model_on_daisee(
        daisee_root: Path, default_models: Path, isolated_env: Path) -> None:
    del default_models  # pulled into the shared cache the command line reads
    trained = _classlens("train", "engagement", "--daisee", str(daisee_root), "--model", "features", "--fps", "2",
                         "--epochs", "1", "--device", "cpu", "--out", str(isolated_env / "run"), "--quiet",
                         cwd=isolated_env)
    assert trained.returncode == 0, trained.stderr
    assert "Train 6 clips" in trained.stdout and "test, clip engagement: accuracy" in trained.stdout
    evaluated = _classlens("evaluate", "engagement-baseline-v1", "--data", str(daisee_root), "--out",
                           str(isolated_env / "eval"), "--quiet", cwd=isolated_env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "clip engagement: accuracy" in evaluated.stdout and "engaged AUC" in evaluated.stdout
    saved = json.loads((isolated_env / "eval" / "evaluation.json").read_text())
    assert saved["metrics"]["clip engagement"]["count"] == 2
    assert "<svg" in (isolated_env / "eval" / "evaluation.html").read_text()
    # Bad requests: one line, exit code 2.
    no_init = _classlens("train", "engagement", "--daisee", str(daisee_root), "--model", "transfer",
                         "--out", str(isolated_env / "t"), cwd=isolated_env)
    assert no_init.returncode == 2 and "--init" in no_init.stderr and "Traceback" not in no_init.stderr
    bad_fps = _classlens("train", "engagement", "--daisee", str(daisee_root), "--fps", "5",
                         "--out", str(isolated_env / "t"), cwd=isolated_env)
    assert bad_fps.returncode == 2 and "--fps must be 1 or 2" in bad_fps.stderr
