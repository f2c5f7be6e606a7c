import numpy as np

from kernel.types import FrameDetections
from vision.tracking import StudentTracker, TrackSummary, box_iou, is_student


def _frame(t: float, boxes: list[list[float]], size: tuple[int, int] = (720, 1280)) -> FrameDetections:
    array = np.array(boxes, np.float32).reshape(-1, 4)
    count = array.shape[0]
    keypoints = np.zeros((count, 5, 2), np.float32)
    return FrameDetections(stream="main", timestamp=t, frame_size=size, boxes=array,
                           scores=np.full(count, 0.9, np.float32), keypoints=keypoints)


def test_iou() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0], rtol=1e-6)


def test_ids_are_stable_through_motion_and_a_short_absence() -> None:
    tracker = StudentTracker(max_gap_seconds=10)
    first = tracker.update(_frame(0, [[100, 100, 200, 200], [600, 100, 700, 200]]))
    moved = tracker.update(_frame(1, [[130, 100, 230, 200], [600, 110, 700, 210]]))
    assert moved.track_ids.tolist() == first.track_ids.tolist()
    # The first student looks away for three samples, then is back near where they were.
    for t in (2, 3, 4):
        only_second = tracker.update(_frame(t, [[600, 110, 700, 210]]))
        assert only_second.track_ids.tolist() == [first.track_ids[1]]
    back = tracker.update(_frame(5, [[170, 105, 270, 205], [600, 110, 700, 210]]))
    assert back.track_ids.tolist() == first.track_ids.tolist()


def test_a_new_face_far_away_gets_a_new_id_and_gaps_expire() -> None:
    tracker = StudentTracker(max_gap_seconds=3)
    first = tracker.update(_frame(0, [[100, 100, 200, 200]]))
    other = tracker.update(_frame(1, [[900, 400, 1000, 500]]))
    assert other.track_ids[0] != first.track_ids[0]
    later = tracker.update(_frame(10, [[100, 100, 200, 200]]))
    assert later.track_ids[0] not in (first.track_ids[0], other.track_ids[0])


def test_a_stream_that_changes_resolution_keeps_its_students() -> None:
    """WebRTC senders halve their resolution under loss and restore it later; the faces stay the same students."""
    tracker = StudentTracker(max_gap_seconds=10)
    first = tracker.update(_frame(0, [[600, 300, 700, 400], [100, 100, 200, 200]])).track_ids.tolist()
    halved = tracker.update(_frame(1, [[300, 150, 350, 200], [50, 50, 100, 100]], size=(360, 640)))
    assert halved.track_ids.tolist() == first
    restored = tracker.update(_frame(2, [[600, 300, 700, 400], [100, 100, 200, 200]]))
    assert restored.track_ids.tolist() == first
    # Without the rescale the halved boxes would not overlap the old ones at all: a real test of it.
    assert tracker.update(_frame(3, [[300, 150, 350, 200]])).track_ids.tolist() != [first[0]]


def test_crossing_students_keep_their_ids_by_motion() -> None:
    tracker = StudentTracker(max_gap_seconds=10)
    ids = tracker.update(_frame(0, [[100, 100, 200, 200], [400, 100, 500, 200]])).track_ids.tolist()
    ids1 = tracker.update(_frame(1, [[150, 100, 250, 200], [350, 100, 450, 200]])).track_ids.tolist()
    assert ids1 == ids


def test_short_tracks_are_not_students() -> None:
    assert not is_student(TrackSummary(1, "main", 5.0, 5.0, 1), min_seconds=2, sample_interval=1)
    assert is_student(TrackSummary(2, "main", 5.0, 6.0, 2), min_seconds=2, sample_interval=1)
    assert not is_student(TrackSummary(3, "main", 5.0, 5.5, 2), min_seconds=2, sample_interval=0.5)


def test_low_confidence_tracks_are_not_students() -> None:
    flicker = TrackSummary(4, "main", 0.0, 8.0, 3, score_total=3 * 0.59)
    assert not is_student(flicker, min_seconds=2, sample_interval=1, min_score=0.7)
    assert is_student(TrackSummary(5, "main", 0.0, 8.0, 3, score_total=3 * 0.95), min_seconds=2,
                      sample_interval=1, min_score=0.7)


def test_tracks_that_take_turns_for_one_face_are_joined() -> None:
    from vision.tracking import alternating_tracks

    # Track 2 began at 1 s and track 1 came back at 3 s: two looks of one face, never in one frame.
    turns = [(1, 0.5), (2, 1.0), (2, 2.0), (1, 3.0), (1, 4.0), (2, 5.0), (1, 6.0)]
    assert alternating_tracks(turns) == {2: 1}
    # One person after another (track 1 never returns) stays two students.
    assert alternating_tracks([(1, 0.0), (1, 1.0), (2, 2.0), (2, 3.0)]) == {}
    # Two faces in one frame are two people, however they alternate elsewhere.
    assert alternating_tracks([*turns, (3, 7.0), (1, 7.0), (3, 8.0), (1, 9.0)]) == {2: 1}


def test_a_track_joins_no_group_it_shares_a_frame_with() -> None:
    from vision.tracking import alternating_tracks

    # 3 alternates with 2 but shares a frame with 1, which 2 joined: 3 stays apart. 4 shares a frame with 1
    # too, so it joins 3's group, the one it alternates with.
    appearances = [(1, 0.0), (2, 1.0), (1, 2.0), (3, 2.0), (2, 3.0), (3, 4.0), (4, 5.0), (1, 5.0), (3, 6.0),
                   (1, 7.0)]
    assert alternating_tracks(appearances) == {2: 1, 4: 3}
