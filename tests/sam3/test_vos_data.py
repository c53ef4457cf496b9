"""VOS data: split-folder index, clip sampling, clip transforms, COCO images as 1-frame videos, SA-V conversion.

Every dataset is built here in tmp_path: frames as PNG/JPEG written with PIL, annotations as palette PNGs.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3.coco import encode_mask, save_coco
from sam3.errors import DataError
from sam3.video.config import ClipConfig
from sam3.video.data import ClipDataset, CocoVideoIndex, VosIndex, first_clip, natural_key
from sam3.video.palette import read_label_map, write_label_map
from sam3.video.sav import sav_to_folder
from sam3.video.transforms import IMAGENET_MEAN, IMAGENET_STD, PIXEL_STATS, resize, train_clip

H, W = 24, 32
NO_AUG = ClipConfig(
    hflip=0.0,
    degrees=0.0,
    shear=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    grayscale=0.0,
    frame_brightness=0.0,
    frame_contrast=0.0,
    frame_saturation=0.0,
)


def square_map(objects: dict[int, tuple[int, int, int]], height: int = H, width: int = W) -> np.ndarray:
    """A label map with object k a size x size square at (y, x): objects = {k: (y, x, size)}."""
    label = np.zeros((height, width), dtype=np.uint8)
    for k, (y, x, size) in objects.items():
        label[y : y + size, x : x + size] = k
    return label


def write_video(
    split: Path,
    name: str,
    labels: list[np.ndarray | None],
    names: list[str] | None = None,
    suffix: str = ".png",
) -> list[str]:
    """Frames whose red channel is 10 * t and green 255 on objects; an annotation PNG for each non-None label."""
    names = names or [f"{t:05d}" for t in range(len(labels))]
    for t, (stem, label) in enumerate(zip(names, labels, strict=True)):
        pixels = np.zeros((H, W, 3), dtype=np.uint8)
        pixels[..., 0] = 10 * t
        if label is not None:
            pixels[..., 1] = np.where(label > 0, 255, 0)
            write_label_map(split / "Annotations" / name / f"{stem}.png", label)
        path = split / "JPEGImages" / name / f"{stem}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return names


def moving_video(split: Path, name: str = "walk", frames: int = 12) -> list[np.ndarray]:
    """Object 1 always present, 2 leaves after frame 5, 3 enters at frame 4, 4 present throughout."""
    labels = []
    for t in range(frames):
        objects = {1: (2, t, 4), 4: (16, 20, 4)}
        if t <= 5:
            objects[2] = (10, 2, 3)
        if t >= 4:
            objects[3] = (10, 24, 3)
        labels.append(square_map(objects))
    write_video(split, name, labels)
    return labels


# ---------------------------------------------------------------- index


def test_natural_key_orders_numbers_as_numbers():
    names = ["f10", "f2", "f1", "00010", "00009", "b"]
    assert sorted(names, key=natural_key) == ["00009", "00010", "b", "f1", "f2", "f10"]


def test_index_sorts_videos_and_frames_and_reads_sparse_annotations(tmp_path):
    label = square_map({1: (0, 0, 4)})
    write_video(tmp_path, "zebra", [label, None, label], names=["1", "2", "10"], suffix=".jpg")
    write_video(tmp_path, "ant", [None, label])
    index = VosIndex.read(tmp_path)
    assert [v.name for v in index.videos] == ["ant", "zebra"]
    zebra = index.videos[1]
    assert [p.name for p in zebra.frames] == ["1.jpg", "2.jpg", "10.jpg"]
    assert zebra.annotated == [0, 2]
    assert index.videos[0].annotated == [1]
    objects = index.read_objects(zebra, 2)
    assert list(objects) == [1] and objects[1].sum() == 16
    assert index.read_frame(zebra, 0).shape == (H, W, 3)


def test_index_reads_a_video_list(tmp_path):
    label = square_map({1: (0, 0, 4)})
    for name in ("a", "b", "c"):
        write_video(tmp_path, name, [label])
    listing = tmp_path / "ImageSets" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("c\n\na\nc\n")
    assert [v.name for v in VosIndex.read(tmp_path, listing).videos] == ["a", "c"]


def test_index_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "JPEGImages"))):
        VosIndex.read(tmp_path)
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "Annotations"))):
        VosIndex.read(tmp_path)
    (tmp_path / "Annotations").mkdir()
    write_video(tmp_path, "ok", [square_map({1: (0, 0, 2)})])
    listing = tmp_path / "list.txt"
    listing.write_text("ok\nghost\n")
    with pytest.raises(DataError, match=re.escape(f"{listing}:2: video 'ghost' not found")):
        VosIndex.read(tmp_path, listing)
    (tmp_path / "JPEGImages" / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'JPEGImages' / 'empty'}: video 'empty' has no frames")):
        VosIndex.read(tmp_path)


def test_index_skips_unannotated_videos_with_a_warning(tmp_path, caplog):
    write_video(tmp_path, "good", [square_map({1: (0, 0, 2)})])
    write_video(tmp_path, "bare", [None, None])
    with caplog.at_level(logging.WARNING, logger="sam3.video.data"):
        index = VosIndex.read(tmp_path)
    assert [v.name for v in index.videos] == ["good"]
    assert "bare" in caplog.text and "without any annotated frame" in caplog.text


def test_annotation_of_another_size_is_refused(tmp_path):
    write_video(tmp_path, "v", [square_map({1: (0, 0, 2)})])
    write_label_map(tmp_path / "Annotations" / "v" / "00000.png", np.ones((5, 5), dtype=np.uint8))
    dataset = ClipDataset(VosIndex.read(tmp_path), NO_AUG, image_size=16, train=False)
    with pytest.raises(DataError, match="annotation is 5x5 but its frame"):
        dataset[0]


# ---------------------------------------------------------------- sampling


def test_train_clip_shapes_dtypes_and_objects_from_first_frame(tmp_path):
    labels = moving_video(tmp_path)
    index = VosIndex.read(tmp_path)
    clip_cfg = ClipConfig(num_frames=5, max_objects=2)
    dataset = ClipDataset(index, clip_cfg, image_size=16, seed=3)
    assert len(dataset) == 2  # 1 video x multiplier 2
    sizes = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        clip = dataset[epoch % 2]
        assert clip.frames.shape == (5, 3, 16, 16) and clip.frames.dtype == torch.float32
        assert clip.masks.shape == (5, clip.num_objects, 16, 16) and clip.masks.dtype == torch.bool
        start = int(clip.frame_names[0])
        assert clip.frame_names == [f"{t:05d}" for t in range(start, start + 5)]
        visible = set(np.unique(labels[start]).tolist()) - {0}
        assert set(clip.object_ids) <= visible and 1 <= len(clip.object_ids) <= 2
        assert clip.object_ids == sorted(clip.object_ids)
        assert clip.masks[0].flatten(1).any(dim=1).all()  # every chosen object is visible in the first frame
        sizes.add(len(clip.object_ids))
    assert sizes == {2}  # every start shows at least 2 objects, so the subset is always full


def test_clip_is_deterministic_per_seed_epoch_index_and_changes_with_epoch(tmp_path):
    moving_video(tmp_path)
    clip_cfg = ClipConfig(num_frames=4, max_objects=2)
    first = ClipDataset(VosIndex.read(tmp_path), clip_cfg, image_size=16, seed=7)
    second = ClipDataset(VosIndex.read(tmp_path), clip_cfg, image_size=16, seed=7)
    a, b = first.sample(1, epoch=2), second.sample(1, epoch=2)
    assert a.frame_names == b.frame_names and a.object_ids == b.object_ids
    assert torch.equal(a.frames, b.frames) and torch.equal(a.masks, b.masks)
    second.set_epoch(2)
    assert torch.equal(second[1].frames, a.frames)  # __getitem__ uses the epoch given to set_epoch
    c = first.sample(1, epoch=3)
    assert not torch.equal(a.frames, c.frames)  # augmentation (and usually the start) redrawn each epoch
    d = ClipDataset(VosIndex.read(tmp_path), clip_cfg, image_size=16, seed=8).sample(1, epoch=2)
    assert not torch.equal(a.frames, d.frames)


def test_short_video_gives_a_shorter_clip_and_uses_annotated_frames_only(tmp_path):
    label = square_map({1: (4, 4, 6)})
    write_video(tmp_path, "sparse", [label, None, label, None, label])
    dataset = ClipDataset(VosIndex.read(tmp_path), ClipConfig(num_frames=8), image_size=16)
    clip = dataset.sample(0, epoch=0)
    assert clip.frame_names == ["00000", "00002", "00004"]
    assert clip.frames.shape == (3, 3, 16, 16) and clip.masks.shape == (3, 1, 16, 16)


def test_start_frames_without_objects_are_never_drawn(tmp_path):
    empty = np.zeros((H, W), dtype=np.uint8)
    labels = [empty] * 6 + [square_map({2: (3, 3, 5)})] * 3
    write_video(tmp_path, "late", labels)
    dataset = ClipDataset(VosIndex.read(tmp_path), ClipConfig(num_frames=2), image_size=16)
    starts = {int(dataset.sample(i, epoch=e).frame_names[0]) for e in range(8) for i in range(2)}
    assert starts <= {6, 7} and starts == {6, 7}  # uniform over the valid starts (6 and 7; 8 is too late)


def test_video_without_any_object_makes_the_sampler_draw_another(tmp_path, caplog):
    empty = np.zeros((H, W), dtype=np.uint8)
    write_video(tmp_path, "a_void", [empty, empty])
    write_video(tmp_path, "b_full", [square_map({5: (0, 0, 8)})] * 2)
    dataset = ClipDataset(VosIndex.read(tmp_path), ClipConfig(num_frames=2), image_size=16)
    with caplog.at_level(logging.WARNING, logger="sam3.video.data"):
        clip = dataset.sample(0, epoch=0)  # item 0 is video a_void
    assert clip.video == "b_full" and clip.object_ids == [5]
    assert "a_void" in caplog.text
    assert dataset.sample(0, epoch=0).frame_names == clip.frame_names  # same draw once a_void is known empty


def test_eval_clip_starts_at_first_annotated_frame_with_all_objects(tmp_path):
    first = square_map({1: (0, 0, 4), 2: (8, 8, 4), 5: (16, 24, 4)})
    write_video(tmp_path, "val", [None, None, first, None, square_map({1: (0, 0, 4)})])
    dataset = ClipDataset(VosIndex.read(tmp_path), ClipConfig(num_frames=8, max_objects=1), image_size=H, train=False)
    assert len(dataset) == 1  # no multiplier in eval
    clip = dataset[0]
    assert clip.frame_names == ["00002", "00004"] and clip.object_ids == [1, 2, 5]
    assert clip.masks.shape == (2, 3, H, H)
    assert clip.masks[1, 0].any() and not clip.masks[1, 1].any() and not clip.masks[1, 2].any()
    # no augmentation: frame 2's red channel is 20 everywhere, normalised with ImageNet statistics
    expected_red = (20 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(clip.frames[0, 0], torch.full((H, H), expected_red), atol=1e-5)
    dataset.set_epoch(5)
    assert torch.equal(dataset[0].frames, clip.frames)


def test_eval_clip_without_first_frame_object_is_refused(tmp_path):
    write_video(tmp_path, "v", [np.zeros((H, W), dtype=np.uint8)])
    dataset = ClipDataset(VosIndex.read(tmp_path), ClipConfig(), image_size=16, train=False)
    with pytest.raises(DataError, match="first annotated frame of video 'v' has no object"):
        dataset[0]


def test_sam3_tracker_normalises_with_half_mean_std(tmp_path):
    write_video(tmp_path, "v", [square_map({1: (0, 0, 4)})])
    clip = ClipDataset(VosIndex.read(tmp_path), ClipConfig(), image_size=H, train=False, tracker="sam3")[0]
    assert PIXEL_STATS["sam3"] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(clip.frames[0, 0], torch.full((H, H), -1.0))  # red 0 -> (0 - 0.5) / 0.5


def test_first_clip_collates_batch_of_one(tmp_path):
    write_video(tmp_path, "v", [square_map({1: (0, 0, 4)})])
    clip = ClipDataset(VosIndex.read(tmp_path), ClipConfig(), image_size=8, train=False)[0]
    assert first_clip([clip]) is clip
    with pytest.raises(ValueError, match="batch of 2"):
        first_clip([clip, clip])


# ---------------------------------------------------------------- transforms


def test_flip_moves_frame_and_mask_together():
    frames = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    frames[:, :, 5, 2] = 255  # a white pixel near the left edge
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    masks[:, :, 5, 2] = True
    clip_cfg = ClipConfig(**{**NO_AUG.__dict__, "hflip": 1.0})
    out_frames, out_masks = train_clip(frames, masks, clip_cfg, 16, torch.Generator().manual_seed(0))
    assert out_masks[:, 0].nonzero().tolist() == [[0, 5, 13], [1, 5, 13]]  # x -> 15 - x
    white = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(out_frames[:, 0, 5, 13], torch.tensor([white, white]))
    assert out_frames[:, 0, 5, 2].max() < 0  # the left pixel is now black


def test_affine_and_resize_keep_masks_on_their_pixels():
    frames = torch.zeros(3, 3, 40, 60, dtype=torch.uint8)
    masks = torch.zeros(3, 1, 40, 60, dtype=torch.bool)
    masks[:, 0, 10:30, 20:45] = True
    frames[:, :, 10:30, 20:45] = 255
    clip_cfg = ClipConfig(**{**NO_AUG.__dict__, "degrees": 25.0, "shear": 20.0})
    out_frames, out_masks = train_clip(frames, masks, clip_cfg, 32, torch.Generator().manual_seed(1))
    bright = out_frames[:, 0] > 0  # above ImageNet mean red: the white object (the fill is at the mean)
    agree = (bright == out_masks[:, 0]).float().mean()
    assert agree > 0.97
    assert not torch.equal(out_masks, resize(frames, masks, 32)[1])  # it did warp
    assert torch.equal(out_masks[0], out_masks[2])  # the same affine on every frame


def test_affine_that_empties_a_first_frame_object_is_dropped():
    frames = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    masks = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    masks[0, 0, 0, 0] = True  # corner pixels: any rotation of more than a few degrees moves them outside
    masks[0, 1, 15, 15] = True
    clip_cfg = ClipConfig(**{**NO_AUG.__dict__, "degrees": 45.0})
    unwarped = 0
    for seed in range(6):
        _, out = train_clip(frames, masks, clip_cfg, 16, torch.Generator().manual_seed(seed))
        assert out[0].flatten(1).any(dim=1).all()  # the tracker is never prompted with an empty mask
        unwarped += int(torch.equal(out, masks))
    assert unwarped == 6  # the seeds draw 5 to 36 degrees: every one pushes a corner out


def test_colour_jitter_is_per_frame_only_where_configured():
    frames = torch.full((4, 3, 8, 8), 120, dtype=torch.uint8)
    masks = torch.ones(4, 1, 8, 8, dtype=torch.bool)
    clip_wide = ClipConfig(**{**NO_AUG.__dict__, "brightness": 0.5})
    out, _ = train_clip(frames, masks, clip_wide, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(out[0], out[3])  # one draw for the clip
    assert not torch.allclose(out[0], train_clip(frames, masks, NO_AUG, 8, torch.Generator())[0][0])
    per_frame = ClipConfig(**{**NO_AUG.__dict__, "frame_brightness": 0.5})
    out, _ = train_clip(frames, masks, per_frame, 8, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])  # a draw per frame


# ---------------------------------------------------------------- COCO as 1-frame videos


def test_coco_images_are_one_frame_videos(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(split / "a.png")
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(split / "b.png")
    rle_mask = np.zeros((20, 30), dtype=bool)
    rle_mask[12:18, 2:8] = True
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 20},
        ],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            # a 10 x 6 rectangle as a polygon: x 10..20, y 2..8
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[10, 2, 20, 2, 20, 8, 10, 8]]},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": encode_mask(rle_mask)},
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": encode_mask(rle_mask)},
            {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": encode_mask(rle_mask)},
        ],
    }
    save_coco(split / "_annotations.coco.json", data)
    index = CocoVideoIndex.read(tmp_path, "train")
    assert [v.name for v in index.videos] == ["1"]  # image 2 has only a crowd annotation
    clip = ClipDataset(index, ClipConfig(), image_size=30, train=False)[0]
    assert clip.object_ids == [11, 12] and clip.frame_names == ["a"]
    assert clip.frames.shape == (1, 3, 30, 30) and clip.masks.shape == (1, 2, 30, 30)
    polygon = index.read_objects(index.videos[0], 0)[11]
    assert polygon[2:8, 10:20].all() and polygon.sum() == 60  # pycocotools fills the polygon's pixel grid
    train = ClipDataset(index, ClipConfig(max_objects=1), image_size=16)
    clip = train.sample(0, epoch=0)
    assert clip.num_frames == 1 and clip.num_objects == 1 and clip.object_ids[0] in (11, 12)


# ---------------------------------------------------------------- SA-V


def _write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"qscale": "2"}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_sav_conversion_round_trip(tmp_path):
    height, width, count = 32, 48, 9
    frames, big, small = [], [], []
    for t in range(count):
        pixels = np.full((height, width, 3), 40, dtype=np.uint8)
        x = 4 + 2 * t
        pixels[8:24, x : x + 16] = (220, 40, 40)  # a red square moving right
        frames.append(pixels)
        b = np.zeros((height, width), dtype=bool)
        b[8:24, x : x + 16] = True
        s = np.zeros((height, width), dtype=bool)
        s[12:16, x + 4 : x + 8] = True  # a part inside the square: overlaps masklet 0
        big.append(b)
        small.append(s)
    mp4 = tmp_path / "sav_000042.mp4"
    _write_mp4(mp4, frames)
    annotated = range(0, count, 4)  # 6 fps annotations of a 24 fps video: frames 0, 4, 8
    masklet = [[encode_mask(big[t]), encode_mask(small[t])] for t in annotated]
    manual = tmp_path / "sav_000042_manual.json"
    manual.write_text(json.dumps({"video_id": "sav_000042", "masklet": masklet, "masklet_num": 2}))

    out = tmp_path / "train"
    assert sav_to_folder(mp4, manual, out) == ["00000", "00004", "00008"]
    index = VosIndex.read(out)
    (video,) = index.videos
    assert video.name == "sav_000042" and video.annotated == [0, 1, 2]
    for t, frame_index in enumerate(annotated):
        label = read_label_map(video.annotations[t])
        assert np.array_equal(label == 2, small[frame_index])  # the smaller masklet stays on top
        assert np.array_equal(label == 1, big[frame_index] & ~small[frame_index])
        pixels = index.read_frame(video, t).astype(int)
        inside = pixels[big[frame_index]].mean(axis=0)
        assert abs(inside[0] - 220) < 12 and abs(inside[1] - 40) < 12  # lossy codecs: close, not equal
        assert abs(pixels[~big[frame_index]].mean() - 40) < 8

    too_long = tmp_path / "long_manual.json"
    too_long.write_text(json.dumps({"masklet": masklet + [masklet[0]]}))  # a 4th annotation needs frame 12
    with pytest.raises(DataError, match="need 13 video frames"):
        sav_to_folder(mp4, too_long, tmp_path / "other")
