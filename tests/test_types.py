import numpy as np
import pytest

from kernel.types import CropBatch, FaceAnalysisBatch, FrameDetections


def _batch(count: int = 3) -> CropBatch:
    rng = np.random.default_rng(0)
    return CropBatch(
        analysis_id=7,
        streams=("main",) * count,
        track_ids=np.arange(count, dtype=np.int64),
        timestamps=np.linspace(0, 2, count),
        crops=rng.integers(0, 255, (count, 112, 112, 3), dtype=np.uint8),
        boxes=rng.random((count, 4), dtype=np.float32),
        detection_scores=rng.random(count, dtype=np.float32),
        head_pose=rng.random((count, 3), dtype=np.float32),
    )


def test_crop_batch_round_trips_through_msgpack() -> None:
    batch = _batch()
    restored = CropBatch.from_bytes(batch.to_bytes())
    assert restored.analysis_id == 7
    assert restored.streams == batch.streams
    np.testing.assert_array_equal(restored.crops, batch.crops)
    np.testing.assert_array_equal(restored.timestamps, batch.timestamps)
    np.testing.assert_array_equal(restored.head_pose, batch.head_pose)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (b"\x90", "version-1 map"),
    ],
)
def test_corrupt_payload_is_rejected_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CropBatch.from_bytes(payload)


def test_truncated_crop_bytes_name_the_field() -> None:
    import msgpack

    data = msgpack.unpackb(_batch().to_bytes(), raw=False)
    data["crops"]["data"] = data["crops"]["data"][:-10]
    with pytest.raises(ValueError, match=r"crops has .* bytes"):
        CropBatch.from_bytes(msgpack.packb(data, use_bin_type=True))


def test_wrong_shapes_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"FrameDetections.keypoints: expected shape \[2, 5, 2\], got \[2, 4, 2\]"):
        FrameDetections(stream="main", timestamp=0.0, frame_size=(10, 10),
                        boxes=np.zeros((2, 4), np.float32), scores=np.zeros(2, np.float32),
                        keypoints=np.zeros((2, 4, 2), np.float32))
    with pytest.raises(ValueError, match="expected dtype uint8, got float32"):
        CropBatch(analysis_id=1, streams=("a",), track_ids=np.zeros(1, np.int64), timestamps=np.zeros(1),
                  crops=np.zeros((1, 112, 112, 3), np.float32), boxes=np.zeros((1, 4), np.float32),
                  detection_scores=np.zeros(1, np.float32), head_pose=np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="engagement_probabilities"):
        FaceAnalysisBatch(emotion_probabilities=None, eyes_closed=None, gaze_away=None,
                          engagement_probabilities=np.zeros((2, 3), np.float32))


def test_detections_default_to_unassigned_tracks_and_select() -> None:
    detections = FrameDetections(stream="main", timestamp=1.0, frame_size=(100, 100),
                                 boxes=np.array([[0, 0, 10, 10], [20, 20, 60, 60]], np.float32),
                                 scores=np.array([0.9, 0.8], np.float32),
                                 keypoints=np.zeros((2, 5, 2), np.float32))
    assert detections.track_ids.tolist() == [-1, -1]
    kept = detections.select(np.array([False, True]))
    assert len(kept) == 1 and kept.boxes[0, 2] == 60


def test_concatenate_refuses_mixed_analyses() -> None:
    first = _batch(2)
    second = CropBatch.from_bytes(_batch(1).to_bytes())
    object.__setattr__(second, "analysis_id", 8)
    with pytest.raises(ValueError, match="several analyses"):
        CropBatch.concatenate([first, second])
    assert len(CropBatch.concatenate([first, _batch(1)])) == 3


def test_slice_keeps_crops_and_ids_together() -> None:
    batch = _batch(5)
    part = batch.slice(1, 3)
    assert len(part) == 2 and part.analysis_id == batch.analysis_id
    np.testing.assert_array_equal(part.track_ids, batch.track_ids[1:3])
    np.testing.assert_array_equal(part.crops, batch.crops[1:3])
    assert part.streams == batch.streams[1:3]
