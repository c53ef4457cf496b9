"""Semi-supervised VOS inference through transformers' video API (sam3.video.inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Sam2VideoModel, Sam3TrackerVideoModel

from sam3.errors import DataError
from sam3.video.inference import predict_split, track_video
from sam3.video.palette import read_label_map, write_label_map
from sam3.video.tracker import build_tracker

HEIGHT, WIDTH = 48, 80


@pytest.fixture(scope="module", params=["tiny-sam2.1", "tiny-sam3"])
def model(request):
    model = build_tracker(request.param)
    with torch.no_grad():  # objects predicted present after frame 0, so the label maps are not all background
        model.mask_decoder.pred_obj_score_head.proj_out.bias += 5.0
    return model


def make_video(num_frames: int = 4, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Noise frames with two bright rectangles; their first-frame masks."""
    rng = np.random.default_rng(seed)
    first = np.zeros((HEIGHT, WIDTH), bool)
    first[5:25, 5:35] = True
    second = np.zeros((HEIGHT, WIDTH), bool)
    second[25:45, 40:75] = True
    frames = []
    for _ in range(num_frames):
        frame = (rng.random((HEIGHT, WIDTH, 3)) * 120).astype(np.uint8)
        frame[first | second] += 120
        frames.append(frame)
    return frames, first, second


def test_track_video_labels_every_frame_with_the_given_ids(model):
    frames, first, second = make_video()
    maps = track_video(model, frames, {3: (0, first), 7: (0, second)})
    assert len(maps) == 4 and all(m.shape == (HEIGHT, WIDTH) and m.dtype == np.uint8 for m in maps)
    assert set(np.unique(maps[0])) == {0, 3, 7}  # frame 0 is the given masks (through the low-res logits)
    assert (maps[0][first] == 3).mean() > 0.9 and (maps[0][second] == 7).mean() > 0.9
    assert all(set(np.unique(m)) <= {0, 3, 7} for m in maps)
    assert model.training  # the mode is restored


def test_an_object_joins_on_its_first_frame(model):
    frames, first, second = make_video()
    maps = track_video(model, frames, {1: (0, first), 2: (2, second)})
    assert all(2 not in m for m in maps[:2])
    assert (maps[2][second] == 2).mean() > 0.9
    empty = track_video(model, frames, {})
    assert len(empty) == 4 and not any(m.any() for m in empty)
    with pytest.raises(ValueError, match="mask of shape"):
        track_video(model, frames, {1: (0, first[:10])})


def test_a_reloaded_model_tracks_identically(model, tmp_path):
    """save_pretrained + the plain transformers from_pretrained: the same label maps through track_video."""
    frames, first, second = make_video(seed=1)
    model.save_pretrained(tmp_path / "m")
    cls = Sam2VideoModel if isinstance(model, Sam2VideoModel) else Sam3TrackerVideoModel
    reloaded = cls.from_pretrained(tmp_path / "m")
    masks = {1: (0, first), 2: (1, second)}
    expected, got = track_video(model, frames, masks), track_video(reloaded, frames, masks)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_predict_split_writes_one_png_per_frame(model, tmp_path):
    split = tmp_path / "split"
    for video, seed in (("bear", 0), ("cows", 1)):
        frames, first, second = make_video(num_frames=3, seed=seed)
        for t, frame in enumerate(frames):
            path = split / "JPEGImages" / video / f"{t:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(path, quality=95)
        write_label_map(split / "Annotations" / video / "00000.png", first * 1 + second * 4)
    videos = predict_split(model, split, tmp_path / "out", progress=False)
    assert videos == ["bear", "cows"]
    for video in videos:
        written = sorted((tmp_path / "out" / video).iterdir())
        assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
        maps = [read_label_map(p) for p in written]  # palette PNGs
        assert set(np.unique(maps[0])) == {0, 1, 4}
        assert all(m.shape == (HEIGHT, WIDTH) and set(np.unique(m)) <= {0, 1, 4} for m in maps)
    with pytest.raises(DataError, match="Annotations"):
        predict_split(model, tmp_path / "out", tmp_path / "out2", progress=False)


def test_predict_split_reads_png_frames_in_number_order(model, tmp_path):
    """Frames may be PNG (as the data readers and vos-validate take them); 2 < 10 by number, not by name."""
    split = tmp_path / "split"
    frames, first, second = make_video(num_frames=3, seed=0)
    for name, frame in zip(("2", "10", "1"), (frames[1], frames[2], frames[0]), strict=True):
        path = split / "JPEGImages" / "bear" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(path)
    write_label_map(split / "Annotations" / "bear" / "1.png", first * 1 + second * 4)
    assert predict_split(model, split, tmp_path / "out", progress=False) == ["bear"]
    assert sorted(p.name for p in (tmp_path / "out" / "bear").iterdir()) == ["1.png", "10.png", "2.png"]
    # the first frame (1.png) carries the given masks back: its label map holds both ids
    assert set(np.unique(read_label_map(tmp_path / "out" / "bear" / "1.png"))) == {0, 1, 4}
