"""sam3.data: prompt samples from COCO, the reference transforms, the negatives file, collation into a PromptBatch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as F

from sam3.batch import PromptBatch
from sam3.coco import encode_mask, load_coco, save_coco, split_annotation_path
from sam3.data import (
    CocoPromptDataset,
    PromptSample,
    WarpPad,
    collate_prompts,
    load_negatives,
    sample_train_warp_pad,
    train_sides,
    train_transform,
    val_transform,
)
from sam3.data.sampler import EpochKeyed, ResumableSampler
from sam3.errors import DataError
from tests.sam3.tiny_coco import Ann, Img, write_split, write_standard

S = 224  # the tiny model's input side


def identity(batch):
    return batch


def prompts_and_ids(sample: PromptSample) -> list[tuple[str, int, int]]:
    return [(q.prompt, q.category_id, int(q.boxes.shape[0])) for q in sample.queries]


# ---------------------------------------------------------------- transforms


def test_train_sides_follow_the_reference_rule():
    assert train_sides(1008) == tuple(range(480, 993, 32))
    sides = train_sides(224)
    # round(k * 224 / 1008) = round(2k / 9): 480 -> 106.67 -> 107, 512 -> 113.78 -> 114, 544 -> 120.89 -> 121,
    # 576 -> 128 exactly, 992 -> 220.44 -> 220. All 17 stay distinct at 224.
    assert sides[:4] == (107, 114, 121, 128)
    assert sides[-1] == 220
    assert len(sides) == 17


def test_val_transform_boxes_by_hand_and_deterministic():
    image = torch.full((3, 64, 96), 200, dtype=torch.uint8)  # H 64, W 96
    boxes = torch.tensor([[8.0, 16.0, 32.0, 48.0]])  # xyxy
    out = val_transform(image, boxes, None, S)
    # x scale 224 / 96 = 7/3: x0 = 18.667, x1 = 74.667 -> cx = 46.667 / 224 = 0.208333, w = 56 / 224 = 0.25
    # y scale 224 / 64 = 3.5: y0 = 56, y1 = 168 -> cy = 112 / 224 = 0.5, h = 112 / 224 = 0.5
    torch.testing.assert_close(out.boxes, torch.tensor([[0.208333, 0.5, 0.25, 0.5]]), atol=1e-5, rtol=0)
    assert out.image.shape == (3, S, S) and out.image.dtype == torch.float32
    # a uniform 200 image normalises to (200 / 255 - 0.5) / 0.5 = 0.568627 everywhere: no padding in validation
    torch.testing.assert_close(out.image, torch.full((3, S, S), 200 / 255 * 2 - 1))
    assert out.masks is None
    again = val_transform(image, boxes, None, S)
    assert torch.equal(again.image, out.image) and torch.equal(again.boxes, out.boxes)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_transform_pads_with_minus_one_and_keeps_boxes_on_masks(seed):
    height, width = 60, 90
    image = torch.randint(10, 256, (3, height, width), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 5.0, 35.0, 25.0], [40.0, 20.0, 88.0, 58.0]])  # xyxy, integer pixel edges
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 5:25, 5:35] = True
    masks[1, 20:58, 40:88] = True

    geometry = sample_train_warp_pad(S, torch.Generator().manual_seed(seed))
    out = train_transform(image, boxes, masks, S, torch.Generator().manual_seed(seed))
    assert geometry.side in train_sides(S)
    assert out.image.shape == (3, S, S) and out.masks.shape == (2, S, S) and out.masks.dtype == torch.bool

    side, left, top = geometry.side, geometry.left, geometry.top
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[top : top + side, left : left + side] = True
    assert torch.all(out.image[:, ~inside] == -1.0)
    assert not out.masks[:, ~inside].any()
    expected = F.resize(image, [side, side], antialias=True).float() / 255 * 2 - 1
    torch.testing.assert_close(out.image[:, top : top + side, left : left + side], expected)

    # The box each transformed mask spans (masks_to_boxes gives inclusive pixel indices, hence + 1) equals the
    # transformed box within the one pixel of nearest-neighbour rounding.
    mask_boxes = masks_to_boxes(out.masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    cx, cy, w, h = (out.boxes * S).unbind(-1)
    boxes_xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    torch.testing.assert_close(mask_boxes, boxes_xyxy, atol=1.0, rtol=0)
    # and the box sits where the geometry says: x0 of box 0 = left + 5 * side / 90
    assert boxes_xyxy[0, 0].item() == pytest.approx(left + 5 * side / width, abs=1e-3)


def test_warp_pad_rejects_geometry_off_the_canvas():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        from sam3.data import warp_pad

        warp_pad(image, torch.zeros(0, 4), None, WarpPad(side=200, left=30, top=0), S)


# ---------------------------------------------------------------- dataset: queries


def test_queries_match_the_annotations(tmp_path):
    root = write_standard(tmp_path)
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False)
    assert len(dataset) == 3
    assert dataset.categories == {1: "cat", 2: "dog", 3: "bird"}

    s0, s1, s2 = dataset[0], dataset[1], dataset[2]
    # image 0: two cats, one dog, no bird; image 1: one bird; image 2: nothing (all three are negatives)
    assert prompts_and_ids(s0) == [("cat", 1, 2), ("dog", 2, 1), ("bird", 3, 0)]
    assert prompts_and_ids(s1) == [("cat", 1, 0), ("dog", 2, 0), ("bird", 3, 1)]
    assert prompts_and_ids(s2) == [("cat", 1, 0), ("dog", 2, 0), ("bird", 3, 0)]
    assert [s.image_id for s in (s0, s1, s2)] == [0, 1, 2]
    assert s0.image.shape == (3, S, S)
    # orig_size is (height, width); image 2 carries orig_width 800 / orig_height 600 from preprocessing
    assert (s0.orig_size, s1.orig_size, s2.orig_size) == ((64, 96), (96, 64), (600, 800))

    # cat boxes of image 0 (96 x 64 -> 224: x * 7/3, y * 3.5):
    # [8, 16, 24, 32] -> x 18.667..74.667, y 56..168 -> (46.667, 112, 56, 112) / 224
    # [40, 8, 16, 16] -> x 93.333..130.667, y 28..84 -> (112, 56, 37.333, 56) / 224
    torch.testing.assert_close(
        s0.queries[0].boxes,
        torch.tensor([[0.208333, 0.5, 0.25, 0.5], [0.5, 0.25, 0.166667, 0.25]]),
        atol=1e-5,
        rtol=0,
    )
    assert all(q.masks is None for q in s0.queries)
    assert dataset.stats["images"] == 3
    assert dataset.stats["positive_queries"] == 3  # cat + dog in image 0, bird in image 1
    assert dataset.stats["negative_queries"] == 6  # 9 category queries - 3
    assert dataset.stats["targets"] == 4


def test_extra_negatives_are_appended_and_contradictions_counted(tmp_path):
    root = write_standard(tmp_path)
    negatives_file = tmp_path / "negatives.json"
    negatives_file.write_text(
        json.dumps(
            {
                "images": {
                    "0": ["cat", "fish", {"phrase": "Bird", "strategy": "absent"}, "fish", "  Horse "],
                    "1": [{"phrase": "tree", "strategy": "hard"}],
                    "99": ["ghost"],
                },
                "summary": {"images": 3},
            }
        )
    )
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False, negatives=negatives_file)
    # image 0: "cat" is present -> skipped (present); "Bird" is the absent category bird -> duplicate;
    # the second "fish" -> duplicate; "  Horse " kept verbatim (compared as "horse", prompted as written)
    assert prompts_and_ids(dataset[0]) == [
        ("cat", 1, 2),
        ("dog", 2, 1),
        ("bird", 3, 0),
        ("fish", -1, 0),
        ("  Horse ", -1, 0),
    ]
    assert prompts_and_ids(dataset[1])[-1] == ("tree", -1, 0)
    assert prompts_and_ids(dataset[2]) == [("cat", 1, 0), ("dog", 2, 0), ("bird", 3, 0)]
    assert dataset[0].queries[3].boxes.shape == (0, 4)
    assert dataset.stats["extra_negative_queries"] == 3
    assert dataset.stats["extra_negatives_skipped_present"] == 1
    assert dataset.stats["extra_negatives_skipped_duplicate"] == 2
    assert dataset.stats["extra_negatives_unknown_image"] == 1  # image 99 is not in this split

    # the loaded mapping can be passed directly and gives the same queries
    from_mapping = CocoPromptDataset(root, "valid", image_size=S, train=False, negatives=load_negatives(negatives_file))
    assert prompts_and_ids(from_mapping[0]) == prompts_and_ids(dataset[0])


def write_counts_dataset(root: Path) -> None:
    """A split built to exercise each count (see test_dropped_and_replaced_are_counted_exactly)."""
    empty_rle = encode_mask(np.zeros((64, 64), dtype=bool))
    images = [
        Img(
            0,
            64,
            64,
            [
                *[Ann(1, (4 + 12 * i, 4, 8, 8)) for i in range(4)],  # 4 "a" > max_targets 3: query dropped
                Ann(2, (4, 30, 10, 10)),
                Ann(2, (20, 30, 10, 10)),
                Ann(2, (40, 30, 20, 20), iscrowd=1),  # crowd dropped, the other two "b" stay
                Ann(3, (4, 50, 10, 10), iscrowd=1),  # "c" only as a crowd: a negative query for "c" here
            ],
        ),
        Img(
            1,
            64,
            64,
            [
                Ann(1, (8, 8, 16, 16), segmentation=[]),  # empty polygon list -> filled box
                Ann(2, (30, 8, 10, 12), segmentation=empty_rle),  # RLE of an all-zero mask -> filled box
                Ann(3, (50, 50, 30, 30)),  # reaches past the 64 x 64 image: clipped to [50, 50, 64, 64]
                Ann(4, (10, 40, 0, 5)),  # zero width: dropped; "d" then has no valid target, a negative query
            ],
        ),
    ]
    write_split(root, "train", {1: "a", 2: "b", 3: "c", 4: "d"}, images)


def test_dropped_and_replaced_are_counted_exactly(tmp_path, caplog):
    write_counts_dataset(tmp_path)
    with caplog.at_level(logging.INFO, logger="sam3.data.dataset"):
        dataset = CocoPromptDataset(tmp_path, "train", image_size=S, train=False, with_masks=True, max_targets=3)
    stats = dataset.stats
    assert stats["crowd_annotations_dropped"] == 2
    assert stats["queries_over_max_targets_dropped"] == 1  # "a" in image 0
    assert stats["queries_without_valid_targets_negative"] == 2  # "c" in image 0 (crowd only), "d" in image 1
    assert stats["empty_masks_filled"] == 2
    assert stats["boxes_clipped"] == 1
    assert stats["degenerate_boxes_dropped"] == 1
    # negatives: "c" (crowd only) and "d" (absent) in image 0, "d" (degenerate only) in image 1
    assert stats["positive_queries"] == 4 and stats["negative_queries"] == 3 and stats["targets"] == 5
    # logged once, at INFO, with the counts
    build_lines = [r.getMessage() for r in caplog.records if "crowd_annotations_dropped 2" in r.getMessage()]
    assert len(build_lines) == 1

    assert prompts_and_ids(dataset[0]) == [("b", 2, 2), ("c", 3, 0), ("d", 4, 0)]
    s1 = dataset[1]
    assert prompts_and_ids(s1) == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1), ("d", 4, 0)]
    # the empty masks became their boxes: "a" [8, 8, 24, 24] * 3.5 -> pixels 28..83, "b" [30, 8, 40, 20] -> 105..139
    # x, 28..69 y. masks_to_boxes gives inclusive indices.
    a_mask, b_mask = s1.queries[0].masks, s1.queries[1].masks
    assert a_mask.shape == (1, S, S)
    torch.testing.assert_close(masks_to_boxes(a_mask), torch.tensor([[28.0, 28.0, 83.0, 83.0]]))
    torch.testing.assert_close(masks_to_boxes(b_mask), torch.tensor([[105.0, 28.0, 139.0, 69.0]]))
    # clipped box of "c": [50, 50, 64, 64] in a 64 px image -> cx = cy = 57 / 64, w = h = 14 / 64
    torch.testing.assert_close(s1.queries[2].boxes, torch.tensor([[0.890625, 0.890625, 0.21875, 0.21875]]))


def test_num_negatives_keeps_positives_and_samples_absent_categories(tmp_path):
    root = write_standard(tmp_path)
    dataset = CocoPromptDataset(root, "train", image_size=S, num_negatives=1, seed=5)
    # image 0: cat, dog present + the only absent one (bird); image 2: one of the three absent categories
    assert prompts_and_ids(dataset[0]) == [("cat", 1, 2), ("dog", 2, 1), ("bird", 3, 0)]
    queries = prompts_and_ids(dataset[2])
    assert len(queries) == 1 and queries[0][1] in (1, 2, 3) and queries[0][2] == 0
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        seen.add(dataset[2].queries[0].prompt)
    assert seen == {"cat", "dog", "bird"}  # the draw changes with the epoch


def write_many_categories(root: Path) -> Path:
    """One train image with categories 1 and 2 present among 8, and 2 extra negative phrases: 10 prompts."""
    names = {i: f"thing{i}" for i in range(1, 9)}
    write_split(root, "train", names, [Img(0, 64, 64, [Ann(1, (4, 4, 10, 10)), Ann(2, (30, 30, 10, 10))])])
    negatives = root / "negatives.json"
    negatives.write_text(json.dumps({"0": ["ghost", "cloud"]}))
    return negatives


def test_prompt_budget_keeps_every_positive_and_draws_negatives_per_epoch(tmp_path):
    negatives = write_many_categories(tmp_path)
    every = CocoPromptDataset(tmp_path, "train", image_size=S, negatives=negatives, seed=3)
    assert len(every[0].queries) == 10  # no budget: every prompt (the reference)
    budget = CocoPromptDataset(tmp_path, "train", image_size=S, negatives=negatives, seed=3, max_prompts_per_image=4)
    order = [q.prompt for q in every[0].queries]  # categories by id, then the phrases in file order
    drawn = set()
    for epoch in range(30):
        queries = budget.sample(0, epoch).queries
        prompts = [q.prompt for q in queries]
        assert len(queries) == 4
        assert prompts[:2] == ["thing1", "thing2"]  # both positives, whatever the draw
        assert [len(q.boxes) for q in queries] == [1, 1, 0, 0]
        assert prompts == sorted(prompts, key=order.index)  # the usual order kept
        assert prompts == [q.prompt for q in budget.sample(0, epoch).queries]  # same (seed, epoch, index): same
        drawn.update(prompts[2:])
    assert drawn == set(order[2:])  # every negative comes up across epochs, the file's phrases included
    # the warp does not depend on the budget: the image of a sample is the same with or without it
    assert torch.equal(budget.sample(0, 7).image, every.sample(0, 7).image)
    counts = budget.prompt_counts()
    assert counts["before"].tolist() == [10] and counts["after"].tolist() == [4]


def test_prompt_budget_below_the_positives_keeps_the_positives(tmp_path, caplog):
    negatives = write_many_categories(tmp_path)
    with caplog.at_level(logging.INFO, logger="sam3.data.dataset"):
        dataset = CocoPromptDataset(tmp_path, "train", image_size=S, negatives=negatives, max_prompts_per_image=1)
    assert [(q.prompt, len(q.boxes)) for q in dataset[0].queries] == [("thing1", 1), ("thing2", 1)]
    assert dataset.prompt_counts()["after"].tolist() == [2]
    said = [r.getMessage() for r in caplog.records if "prompts per image" in r.getMessage()]
    assert len(said) == 1 and "budget 1" in said[0] and "(mean 10.0, max 10)" in said[0]
    with pytest.raises(ValueError, match="max_prompts_per_image must be None or >= 1"):
        CocoPromptDataset(tmp_path, "train", image_size=S, max_prompts_per_image=0)


# ---------------------------------------------------------------- dataset: randomness


def test_train_samples_reproducible_per_seed_and_epoch_whatever_the_workers(tmp_path):
    root = write_standard(tmp_path)
    first = CocoPromptDataset(root, "train", image_size=S, seed=7)
    second = CocoPromptDataset(root, "train", image_size=S, seed=7)
    for index in (2, 0, 1):  # access order does not matter
        a, b = first[index], second[index]
        assert torch.equal(a.image, b.image)
        assert all(torch.equal(qa.boxes, qb.boxes) for qa, qb in zip(a.queries, b.queries, strict=True))

    epoch0 = [first[i].image for i in range(3)]
    first.set_epoch(1)
    epoch1 = [first[i].image for i in range(3)]
    assert all(not torch.equal(x, y) for x, y in zip(epoch0, epoch1, strict=True))
    other_seed = CocoPromptDataset(root, "train", image_size=S, seed=8)
    assert not torch.equal(other_seed[0].image, epoch0[0])

    # the same samples through two worker processes
    second.set_epoch(1)
    # spawn, not fork: a forked worker inherits whatever threads earlier tests left in this process (Prefect's
    # test harness, servers) and can die on them; spawned workers start clean, as they do on macOS and Windows
    loader = DataLoader(second, batch_size=None, num_workers=2, collate_fn=identity, multiprocessing_context="spawn")
    loaded = list(loader)
    assert all(torch.equal(s.image, x) for s, x in zip(loaded, epoch1, strict=True))


def test_persistent_workers_draw_each_epoch_from_epoch_keys(tmp_path):
    # The trainer's loader: one DataLoader for the run, workers started once (persistent), the epoch carried by
    # each (epoch, index) key. Every sample equals the dataset's own draw for that epoch, and epochs differ.
    root = write_standard(tmp_path)
    dataset = CocoPromptDataset(root, "train", image_size=S, seed=7)
    keyed = EpochKeyed(dataset, indices=[2, 0])  # a subset, as train.subset_images makes
    sampler = ResumableSampler(len(keyed), seed=1, with_epoch=True)
    loader = DataLoader(
        keyed,
        batch_size=None,
        sampler=sampler,
        num_workers=2,
        collate_fn=identity,
        persistent_workers=True,
        multiprocessing_context="spawn",  # see test_train_samples_reproducible_per_seed_and_epoch_whatever_the_workers
    )
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for (key_epoch, index), sample in zip(list(sampler), loader, strict=True):
            expected = dataset.sample([2, 0][index], key_epoch)
            assert sample.image_id == expected.image_id
            assert torch.equal(sample.image, expected.image)
            dataset.set_epoch(key_epoch)  # the same as the set_epoch way of drawing
            assert torch.equal(dataset[[2, 0][index]].image, sample.image)
            seen[epoch, sample.image_id] = sample.image
    assert sorted(seen) == sorted((e, dataset.records[i].image_id) for e in (0, 1) for i in (2, 0))
    for i in (2, 0):
        image_id = dataset.records[i].image_id
        assert not torch.equal(seen[0, image_id], seen[1, image_id])  # each epoch its own warp


def test_validation_samples_do_not_depend_on_epoch(tmp_path):
    root = write_standard(tmp_path)
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False)
    before = dataset[0].image
    dataset.set_epoch(3)
    assert torch.equal(dataset[0].image, before)
    # no padding in validation: the grey background (128) is everywhere at the corners
    assert before[:, 0, 0].tolist() == pytest.approx([128 / 255 * 2 - 1] * 3, abs=1e-6)  # 0.003922


# ---------------------------------------------------------------- dataset: errors


def test_missing_image_raises_data_error_naming_file_and_id(tmp_path):
    root = write_standard(tmp_path)
    (root / "valid" / "img_001.png").unlink()
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False)
    dataset[0]  # the other images still load
    with pytest.raises(DataError, match=r"img_001\.png: image file of image id 1 not found"):
        dataset[1]


def test_corrupt_or_wrong_size_image_raises_data_error(tmp_path):
    root = write_standard(tmp_path)
    (root / "valid" / "img_000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False)
    with pytest.raises(DataError, match=r"img_000\.png: cannot decode image id 0"):
        dataset[0]

    coco = load_coco(split_annotation_path(root, "valid"))
    coco["images"][1]["width"] = 65  # the file is 64 wide
    save_coco(split_annotation_path(root, "valid"), coco)
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False)
    with pytest.raises(DataError, match=r"image id 1 is 64x96 pixels but .* says 65x96"):
        dataset[1]


def test_mask_that_does_not_decode_raises_data_error(tmp_path):
    root = write_standard(tmp_path)
    coco = load_coco(split_annotation_path(root, "valid"))
    coco["annotations"][3]["segmentation"] = {"size": [10, 10], "counts": "PPYo0"}  # image 1 is 96 x 64
    save_coco(split_annotation_path(root, "valid"), coco)
    CocoPromptDataset(root, "valid", image_size=S, train=False)  # boxes only: masks are not read
    with pytest.raises(DataError, match=r"annotation 4 \(image id 1\) does not decode"):
        CocoPromptDataset(root, "valid", image_size=S, train=False, with_masks=True)


def test_bad_dataset_layout_raises_data_error(tmp_path):
    root = write_standard(tmp_path, splits=("train",))
    with pytest.raises(DataError, match="split 'valid' not found; this dataset has train"):
        CocoPromptDataset(root, "valid")
    coco = load_coco(split_annotation_path(root, "train"))
    coco["categories"].append({"id": 9, "name": "Cat "})
    save_coco(split_annotation_path(root, "train"), coco)
    with pytest.raises(DataError, match="categories 1 and 9 have the same prompt"):
        CocoPromptDataset(root, "train")


def test_another_annotation_file_of_the_split_is_read_instead(tmp_path):
    """A few-shot file beside the split's own file: image 1 only (one bird) of the standard valid split's 3 images."""
    root = write_standard(tmp_path)
    coco = load_coco(split_annotation_path(root, "valid"))
    fewshot = {
        **coco,
        "images": [i for i in coco["images"] if i["id"] == 1],
        "annotations": [a for a in coco["annotations"] if a["image_id"] == 1],
    }
    save_coco(root / "valid" / "fewshot_train_shot1_seed3.json", fewshot)
    dataset = CocoPromptDataset(
        root, "valid", image_size=S, train=False, annotations_file="fewshot_train_shot1_seed3.json"
    )
    assert len(dataset) == 1 and dataset.annotation_file == root / "valid" / "fewshot_train_shot1_seed3.json"
    assert prompts_and_ids(dataset[0]) == [("cat", 1, 0), ("dog", 2, 0), ("bird", 3, 1)]
    assert dataset[0].image_id == 1
    with pytest.raises(DataError, match=r"valid/absent.json: annotation file not found in split 'valid'"):
        CocoPromptDataset(root, "valid", annotations_file="absent.json")


# ---------------------------------------------------------------- negatives file


def test_load_negatives_accepts_bare_mapping_and_wrapper(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"3": ["cat", {"phrase": "dog", "strategy": "absent"}], "10": []}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"images": json.loads(bare.read_text()), "summary": {"phrases": 2}}))
    expected = {3: ["cat", "dog"], 10: []}
    assert load_negatives(bare) == expected
    assert load_negatives(wrapped) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"3": ["cat",]}', r"bad\.json:1:14: invalid JSON"),
        ('["cat"]', "top level must be a JSON object"),
        ('{"three": ["cat"]}', "key 'three' is not an image id"),
        ('{"3": "cat"}', "image 3: expected a list of phrases, got str"),
        ('{"3": ["cat", 5]}', "image 3, entry 1: 5 is not a non-empty phrase"),
        ('{"images": {"3": [{"strategy": "hard"}]}}', "image 3, entry 0: .* is not a non-empty phrase"),
        ('{"3": [" "]}', "image 3, entry 0"),
    ],
)
def test_load_negatives_bad_format_says_where(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_negatives(path)


def test_load_negatives_missing_file(tmp_path):
    with pytest.raises(DataError, match="negatives file not found"):
        load_negatives(tmp_path / "nope.json")


# ---------------------------------------------------------------- collate


def test_collate_dedups_prompts_and_indexes_queries(tmp_path):
    from sam3.tokenizer import tokenize

    root = write_standard(tmp_path)
    negatives = {0: ["fish"], 1: ["fish", "tree"]}
    dataset = CocoPromptDataset(root, "valid", image_size=S, train=False, with_masks=True, negatives=negatives)
    samples = [dataset[i] for i in range(3)]
    batch = collate_prompts(samples)

    assert isinstance(batch, PromptBatch)
    # queries: image 0 cat dog bird fish | image 1 cat dog bird fish tree | image 2 cat dog bird -> Q = 12, P = 5
    assert batch.prompts == ["cat", "dog", "bird", "fish", "tree"]
    assert batch.query_image.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert batch.query_prompt.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.num_queries == 12
    assert batch.input_ids.shape == (5, 32) and batch.input_ids.dtype == torch.long
    assert torch.equal(batch.input_ids, tokenize(["cat", "dog", "bird", "fish", "tree"]))
    assert batch.attention_mask.shape == (5, 32)
    assert batch.pixel_values.shape == (3, 3, S, S)
    assert torch.equal(batch.pixel_values[1], samples[1].image)
    assert batch.image_ids == [0, 1, 2]
    assert batch.orig_sizes.tolist() == [[64, 96], [96, 64], [600, 800]]
    assert [t["category_id"] for t in batch.targets] == [1, 2, 3, -1, 1, 2, 3, -1, -1, 1, 2, 3]
    assert [t["boxes"].shape[0] for t in batch.targets] == [2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert batch.num_target_boxes == 4
    assert batch.targets[0]["masks"].shape == (2, S, S) and batch.targets[3]["masks"].shape == (0, S, S)
    assert torch.equal(batch.targets[6]["boxes"], samples[1].queries[2].boxes)  # image 1's bird

    moved = batch.to("cpu")
    assert moved.pixel_values.device.type == "cpu"
    assert torch.equal(moved.targets[0]["masks"], batch.targets[0]["masks"])
    assert torch.equal(moved.query_prompt, batch.query_prompt)


def test_collate_through_a_dataloader(tmp_path):
    root = write_standard(tmp_path)
    dataset = CocoPromptDataset(root, "train", image_size=S)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_prompts))
    assert [b.image_ids for b in batches] == [[0, 1], [2]]
    assert batches[0].prompts == ["cat", "dog", "bird"] and batches[0].num_queries == 6
    assert batches[0].pixel_values.min().item() == -1.0  # training pads with -1
