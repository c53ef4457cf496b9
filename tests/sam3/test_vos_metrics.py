"""J, F and J&F (`sam3.video.metrics`) against values worked out by hand on tiny masks and folders.

Geometry used throughout: a square at rows a..b, columns c..d has the boundary ring [a-1, b] x [c-1, d] minus
[a, b-1] x [c, d-1]; in a 10 x 10 frame the tolerance is r = ceil(0.008 * sqrt(200)) = ceil(0.113) = 1, a disk of
radius 1 being the pixel and its 4 neighbours.
"""

import numpy as np
import pytest
from skimage.morphology import disk

from sam3.errors import DataError
from sam3.video.metrics import (
    boundary_f_measure,
    boundary_tolerance,
    disk_footprint,
    evaluate_folders,
    evaluate_video,
    frame_statistics,
    region_similarity,
    seg_to_boundary,
)
from sam3.video.palette import write_label_map


def square(rows: tuple[int, int], cols: tuple[int, int], size: int = 10, value: int = 1) -> np.ndarray:
    """A size x size uint8 map with `value` on rows[0]..rows[1] x cols[0]..cols[1] (inclusive)."""
    mask = np.zeros((size, size), np.uint8)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value
    return mask


GT_SQUARE = square((2, 5), (2, 5))  # 16 pixels; boundary ring [1,5]x[1,5] minus [2,4]x[2,4]: 25 - 9 = 16 pixels


# --- J ---


def test_region_similarity_is_iou():
    # pred = columns 3..6: overlap rows 2..5 x cols 3..5 = 12, union 16 + 16 - 12 = 20 -> 0.6
    assert region_similarity(square((2, 5), (3, 6)), GT_SQUARE) == pytest.approx(0.6)
    # shifted by 2: overlap 4 x 2 = 8, union 32 - 8 = 24 -> 1/3
    assert region_similarity(square((2, 5), (4, 7)), GT_SQUARE) == pytest.approx(1 / 3)


def test_region_similarity_empty_cases():
    empty = np.zeros((10, 10), np.uint8)
    assert region_similarity(empty, empty) == 1.0  # nothing to find, nothing found
    assert region_similarity(empty, GT_SQUARE) == 0.0
    assert region_similarity(GT_SQUARE, empty) == 0.0


def test_region_similarity_ignores_void_pixels():
    gt, pred, void = np.array([[1, 1, 0, 0]]), np.array([[1, 0, 1, 0]]), np.array([[0, 0, 1, 0]])
    # without void: intersection {0}, union {0, 1, 2} -> 1/3; pixel 2 void: union {0, 1} -> 1/2
    assert region_similarity(pred, gt) == pytest.approx(1 / 3)
    assert region_similarity(pred, gt, void=void) == pytest.approx(1 / 2)
    # all of the union void: both masks empty once void is cleared -> 1
    assert region_similarity(pred, gt, void=np.ones_like(gt)) == 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        region_similarity(np.zeros((4, 4)), np.zeros((4, 5)))


# --- boundaries ---


def test_seg_to_boundary_of_a_square():
    # 2x2 square at rows 1..2, cols 1..2: a pixel is on the boundary when it differs from its E, S or SE neighbour;
    # ring [0,2]x[0,2] minus [1,1]x[1,1] = 8 pixels, offset half a pixel towards the origin
    mask = square((1, 2), (1, 2), size=5)
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(seg_to_boundary(mask), expected)


def test_seg_to_boundary_at_the_frame_edge():
    # the frame's edge is no boundary: a full frame has none; a mask on the right half of a 3x4 frame (columns 2..3)
    # changes only between columns 1 and 2, so only column 1 is marked
    assert not seg_to_boundary(np.ones((4, 4))).any()
    right_half = np.zeros((3, 4), bool)
    right_half[:, 2:] = True
    expected = np.zeros((3, 4), bool)
    expected[:, 1] = True
    np.testing.assert_array_equal(seg_to_boundary(right_half), expected)


def test_boundary_tolerance_in_pixels():
    assert boundary_tolerance((10, 10)) == 1  # ceil(0.008 * 14.14) = ceil(0.113)
    assert boundary_tolerance((100, 100)) == 2  # ceil(0.008 * 141.4) = ceil(1.131)
    assert boundary_tolerance((480, 854)) == 8  # ceil(0.008 * 979.6) = ceil(7.837), DAVIS's 480p frames
    assert boundary_tolerance((10, 10), bound_th=3) == 3  # >= 1: already pixels


@pytest.mark.parametrize("radius", [1, 2, 3, 8])
def test_disk_footprint_is_the_reference_disk(radius):
    np.testing.assert_array_equal(disk_footprint(radius), disk(radius).astype(bool))


# --- F ---


def test_boundary_f_one_pixel_shift_is_within_tolerance():
    # pred columns 3..6: its ring [1,5]x[2,6] - [2,4]x[3,5] lies on or next to (4-neighbour) the gt ring
    # [1,5]x[1,5] - [2,4]x[2,4] and vice versa: P = R = 16/16 -> F = 1 (while J = 0.6)
    assert boundary_f_measure(square((2, 5), (3, 6)), GT_SQUARE) == 1.0


def test_boundary_f_two_pixel_shift_is_outside_tolerance():
    # pred columns 4..7, ring: col 3 rows 1..5, col 7 rows 1..5, rows 1 and 5 cols 4..6 (16 pixels).
    # Within 1 (4-neighbour) of the gt ring (col 1, col 5, rows 1 and 5 cols 1..5): col 3 rows 1, 2, 4, 5 (not 3),
    # rows 1/5 cols 4, 5, 6 (6 pixels), none of col 7 -> 10/16 = P. The mirror count gives R = 10/16, F = 5/8.
    pred = square((2, 5), (4, 7))
    assert boundary_f_measure(pred, GT_SQUARE) == pytest.approx(5 / 8)
    # with a 2-pixel tolerance every one of those pixels has a match 2 columns (or one diagonal step) away
    assert boundary_f_measure(pred, GT_SQUARE, bound_th=2) == 1.0


def test_boundary_f_precision_and_recall_differ():
    # pred = the gt square plus a lone pixel at (8, 8), whose ring (7..8 x 7..8, 4 pixels) is far from the gt ring:
    # P = 16/20 = 0.8, R = 16/16 = 1 -> F = 2 * 0.8 / 1.8 = 8/9
    pred = GT_SQUARE.copy()
    pred[8, 8] = 1
    assert boundary_f_measure(pred, GT_SQUARE) == pytest.approx(8 / 9)


def test_boundary_f_empty_boundaries():
    empty, full = np.zeros((10, 10), np.uint8), np.ones((10, 10), np.uint8)
    assert boundary_f_measure(empty, empty) == 1.0  # P = R = 1
    assert boundary_f_measure(empty, GT_SQUARE) == 0.0  # missed: P = 1, R = 0
    assert boundary_f_measure(GT_SQUARE, empty) == 0.0  # hallucinated: P = 0, R = 1
    # a full-frame mask has no boundary either: F = 1 against an empty prediction, though J = 0
    assert boundary_f_measure(empty, full) == 1.0
    assert region_similarity(empty, full) == 0.0


def test_boundary_f_clears_void_first():
    # void over the lone pixel at (8, 8) removes it from the prediction: back to the exact gt square, F = 1
    pred = GT_SQUARE.copy()
    pred[8, 8] = 1
    void = square((8, 8), (8, 8))
    assert boundary_f_measure(pred, GT_SQUARE, void=void) == 1.0


# --- statistics over frames ---


def test_frame_statistics_five_frames():
    # mean 2.7 / 5 = 0.54; recall: 1.0, 0.9 > 0.5 (0.5 is not) -> 2/5; T = 5: parts' bounds round(1..5) - 1 =
    # 0, 1, 2, 3, 4, first part v0..v1, last part v3..v4: decay = 0.95 - 0.15 = 0.8
    stats = frame_statistics([1.0, 0.9, 0.5, 0.3, 0.0])
    assert stats == {"mean": pytest.approx(0.54), "recall": pytest.approx(0.4), "decay": pytest.approx(0.8)}


def test_frame_statistics_short_videos():
    # T = 3: linspace(1, 3, 5) = 1, 1.5, 2, 2.5, 3, halves rounded up -> bounds 0, 1, 1, 2, 2: first part v0..v1,
    # last part v2: decay = (0.8 + 0.6) / 2 - 0.2 = 0.5
    assert frame_statistics([0.8, 0.6, 0.2])["decay"] == pytest.approx(0.5)
    # T = 2: bounds 0, 0, 1, 1, 1 -> v0 - v1; T = 1: the same frame twice -> 0
    assert frame_statistics([1.0, 0.6])["decay"] == pytest.approx(0.4)
    assert frame_statistics([0.3]) == {"mean": pytest.approx(0.3), "recall": 0.0, "decay": 0.0}


# --- folders ---


def write_video(root, video, frames):
    for index, label_map in enumerate(frames):
        if label_map is not None:
            write_label_map(root / video / f"{index:05d}.png", label_map)


OBJ1 = GT_SQUARE  # object 1: rows 2..5 x cols 2..5
OBJ2 = square((7, 8), (7, 8), value=2)  # object 2: rows 7..8 x cols 7..8
TWO_OBJECTS = OBJ1 + OBJ2


@pytest.fixture
def folders(tmp_path):
    """Video a: 4 frames, objects 1 and 2; video b: 3 frames, object 1 (and a void pixel 255); extra prediction c.

    Scored frames (first and last dropped): a/00001, a/00002, b/00001.
      a/00001: both objects exact                          -> obj 1 J 1, F 1; obj 2 J 1, F 1
      a/00002: obj 1 shifted 1 column right, obj 2 absent  -> obj 1 J 0.6, F 1; obj 2 J 0, F 0 (P = 1, R = 0)
      b/00001: obj 1 shifted 2 columns right               -> J 1/3, F 5/8
    The predictions of a's first and last frames are empty: counted, they would lower a's scores.
    """
    gt, pred = tmp_path / "Annotations", tmp_path / "pred"
    with_void = GT_SQUARE.copy()
    with_void[9, 0] = 255  # void, not object 255: b still has 1 object
    write_video(gt, "a", [TWO_OBJECTS] * 4)
    write_video(gt, "b", [with_void] * 3)
    empty = np.zeros((10, 10), np.uint8)
    write_video(pred, "a", [empty, TWO_OBJECTS, square((2, 5), (3, 6)), empty])
    write_video(pred, "b", [None, square((2, 5), (4, 7)), None])  # first and last frames need no prediction
    write_video(pred, "c", [TWO_OBJECTS] * 3)  # no ground truth: ignored
    return gt, pred


def test_evaluate_video_scores_the_middle_frames(folders):
    gt, pred = folders
    scores = evaluate_video(gt / "a", pred / "a")
    assert sorted(scores) == [1, 2]
    np.testing.assert_allclose(scores[1]["J"], [1.0, 0.6])
    np.testing.assert_allclose(scores[1]["F"], [1.0, 1.0])
    np.testing.assert_allclose(scores[2]["J"], [1.0, 0.0])
    np.testing.assert_allclose(scores[2]["F"], [1.0, 0.0])


def test_evaluate_folders_by_hand(folders):
    gt, pred = folders
    scores = evaluate_folders(gt, pred, progress=False)
    # objects: a/1 J (1 + 0.6)/2 = 0.8, F 1; a/2 J 0.5, F 0.5; b/1 J 1/3, F 5/8
    # J = (0.8 + 0.5 + 1/3) / 3 = 49/90; F = (1 + 0.5 + 0.625) / 3 = 17/24; J&F = (196 + 255) / 360 / 2 = 451/720
    assert scores["J"] == pytest.approx(49 / 90)
    assert scores["F"] == pytest.approx(17 / 24)
    assert scores["J&F"] == pytest.approx(451 / 720)
    # recall: J a/1 [1, 0.6] -> 1, a/2 [1, 0] -> 0.5, b/1 [1/3] -> 0: 1.5/3; F: 1, 0.5, 1 -> 2.5/3
    assert scores["J_recall"] == pytest.approx(0.5)
    assert scores["F_recall"] == pytest.approx(5 / 6)
    # decay (T = 2: v0 - v1; T = 1: 0): J 0.4, 1, 0 -> 1.4/3; F 0, 1, 0 -> 1/3
    assert scores["J_decay"] == pytest.approx(1.4 / 3)
    assert scores["F_decay"] == pytest.approx(1 / 3)
    assert (scores["num_videos"], scores["num_objects"]) == (2, 3)
    assert sorted(scores["per_video"]) == ["a", "b"]  # c has no ground truth
    a, b = scores["per_video"]["a"], scores["per_video"]["b"]
    # a: J (0.8 + 0.5)/2 = 0.65, F (1 + 0.5)/2 = 0.75, J&F 0.7; b: J 1/3, F 5/8, J&F (8 + 15)/48 = 23/48
    assert (a["J"], a["F"], a["J&F"]) == (pytest.approx(0.65), pytest.approx(0.75), pytest.approx(0.7))
    assert (b["J"], b["F"], b["J&F"]) == (pytest.approx(1 / 3), pytest.approx(5 / 8), pytest.approx(23 / 48))
    assert a["objects"]["2"]["J"] == pytest.approx(0.5) and a["objects"]["2"]["F"] == pytest.approx(0.5)
    assert sorted(a["objects"]) == ["1", "2"] and sorted(b["objects"]) == ["1"]


def test_evaluate_folders_subset(folders):
    gt, pred = folders
    scores = evaluate_folders(gt, pred, videos=["b"], progress=False)
    assert (scores["J"], scores["F"]) == (pytest.approx(1 / 3), pytest.approx(5 / 8))
    assert scores["num_videos"] == 1


def test_object_ids_come_from_the_first_frame(tmp_path):
    # the first frame has only id 2, so objects are 1..2: object 1 is empty in the gt and in the prediction of the
    # one scored frame (J = F = 1); object 3, appearing later in the gt, is not scored at all
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    later = OBJ2 + square((0, 0), (0, 0), value=3)
    write_video(gt, "v", [OBJ2, later, later])
    write_video(pred, "v", [None, OBJ2, None])
    scores = evaluate_folders(gt, pred, progress=False)
    assert sorted(scores["per_video"]["v"]["objects"]) == ["1", "2"]
    assert scores["J"] == scores["F"] == 1.0


def test_missing_prediction_frame_names_video_and_frame(folders):
    gt, pred = folders
    (pred / "a" / "00002.png").unlink()
    with pytest.raises(DataError, match=r"video 'a', frame '00002'.*00002\.png"):
        evaluate_folders(gt, pred, progress=False)


def test_missing_prediction_video(folders):
    gt, pred = folders
    for path in (pred / "b").iterdir():
        path.unlink()
    (pred / "b").rmdir()
    with pytest.raises(DataError, match="video 'b': no predictions folder"):
        evaluate_folders(gt, pred, progress=False)


def test_size_mismatch_names_the_file(folders):
    gt, pred = folders
    write_label_map(pred / "b" / "00001.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"00001\.png: prediction is 12x10 \(W x H\)"):
        evaluate_folders(gt, pred, progress=False)


def test_predicted_id_beyond_the_first_frame_objects(folders):
    gt, pred = folders
    write_label_map(pred / "b" / "00001.png", square((2, 5), (2, 5), value=2))
    with pytest.raises(DataError, match=r"00001\.png: object id 2 .* objects 1\.\.1"):
        evaluate_folders(gt, pred, progress=False)


def test_too_few_frames(tmp_path):
    write_video(tmp_path / "gt", "v", [GT_SQUARE] * 2)
    (tmp_path / "pred").mkdir()
    with pytest.raises(DataError, match="video 'v': 2 ground-truth PNG.*at least 3"):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred", progress=False)


def test_unknown_listed_video(folders):
    gt, pred = folders
    with pytest.raises(DataError, match="no ground-truth folder for video.*'c'"):
        evaluate_folders(gt, pred, videos=["a", "c"], progress=False)
