"""vos-preprocess: longer side SIZE with the aspect kept, palette indices kept exactly, copies, layout, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import vos_preprocess, vos_shapes
from pipeline.stage_args import stage_params
from pipeline.vos_preprocess import SHORTHANDS
from sam3.errors import ConfigError, DataError
from sam3.video.palette import PALETTE, read_label_map, write_label_map

IDS = np.array([0, 1, 2, 7, 255], dtype=np.uint8)


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vos_preprocess.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MOSE root: train/ (2 videos) and valid/ (1 video) of 3 frames, 64 x 64."""
    out = tmp_path_factory.mktemp("vos_shapes")
    vos_shapes.build_vos_shapes(out, train_videos=2, valid_videos=1, frames=3, size=64, seed=0)
    return out


def make_split(root: Path, width: int = 80, height: int = 48, frames: int = 2) -> np.ndarray:
    """A DAVIS-style split folder with one video under 480p/ (as DAVIS nests it): constant-colour PNG frames and
    label maps made of 2 x 2 blocks of ids from IDS, plus ImageSets/2017/train.txt. Returns the [T, H/2, W/2]
    block ids."""
    rng = np.random.default_rng(0)
    blocks = IDS[rng.integers(len(IDS), size=(frames, height // 2, width // 2))]
    for t in range(frames):
        frame_dir = root / "JPEGImages" / "480p" / "bear"
        frame_dir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (10 * t + 20, 130, 240)).save(frame_dir / f"{t:05d}.png")
        write_label_map(root / "Annotations" / "480p" / "bear" / f"{t:05d}.png", np.kron(blocks[t], np.ones((2, 2))))
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "train.txt").write_text("bear\n")
    return blocks


def test_mose_root_is_mirrored_at_the_new_size_with_ids_and_palette_kept(shapes_root: Path, tmp_path: Path) -> None:
    assert vos_preprocess.run(parse(["--in", str(shapes_root), "--out", str(tmp_path), "--size", "96"])) == 0
    inputs, outputs = all_files(shapes_root), all_files(tmp_path)
    assert set(outputs) == set(inputs) - {"meta.json"} | {"preprocess.json"}
    for name in (n for n in inputs if n.endswith(".jpg")):
        with Image.open(tmp_path / name) as image:
            assert (image.format, image.size) == ("JPEG", (96, 96))
    for name in (n for n in inputs if n.endswith(".png")):
        before, after = read_label_map(shapes_root / name), read_label_map(tmp_path / name)
        assert after.shape == (96, 96)
        assert set(np.unique(after).tolist()) == set(np.unique(before).tolist())  # 64 -> 96 enlarges: none lost
        with Image.open(tmp_path / name) as image:
            assert image.getpalette() == PALETTE
    summary = json.loads((tmp_path / "preprocess.json").read_text())
    assert {k: summary[k] for k in ("size", "enlarge", "videos", "frames", "annotations", "resized", "copied")} == {
        "size": 96,
        "enlarge": True,
        "videos": 3,
        "frames": 9,
        "annotations": 9,
        "resized": 18,
        "copied": 0,
    }
    assert summary["splits"]["train"]["videos"] == 2 and summary["splits"]["valid"]["frames"] == 3
    assert "seconds" not in summary  # a DVC output: no timing, the same bytes on any machine


def test_nearest_keeps_index_values_exactly_and_aspect_is_kept(tmp_path: Path) -> None:
    blocks = make_split(tmp_path / "davis")
    summary = vos_preprocess.preprocess_vos(tmp_path / "davis", tmp_path / "out", size=40)
    for t in range(2):
        labels = read_label_map(tmp_path / "out" / "Annotations" / "480p" / "bear" / f"{t:05d}.png")
        # 80 x 48 -> 40 x 24: scale 1/2, nearest picks one pixel of each 2 x 2 block, so the output is the blocks
        assert labels.shape == (24, 40)
        assert np.array_equal(labels, blocks[t])
        with Image.open(tmp_path / "out" / "JPEGImages" / "480p" / "bear" / f"{t:05d}.png") as image:
            assert (image.format, image.size) == ("PNG", (40, 24))
            # bilinear of a constant picture is that constant (weights sum to 1)
            assert set(map(tuple, np.asarray(image).reshape(-1, 3).tolist())) == {(10 * t + 20, 130, 240)}
    assert (tmp_path / "out" / "ImageSets" / "2017" / "train.txt").read_text() == "bear\n"
    assert list(summary["splits"]) == ["."] and summary["videos"] == 1 and summary["ids_lost"] == 0
    # enlarging: longer side 160, aspect 80 : 48 kept -> 160 x 96
    vos_preprocess.preprocess_vos(tmp_path / "davis", tmp_path / "big", size=160)
    with Image.open(tmp_path / "big" / "JPEGImages" / "480p" / "bear" / "00000.png") as image:
        assert image.size == (160, 96)
    assert read_label_map(tmp_path / "big" / "Annotations" / "480p" / "bear" / "00001.png").shape == (96, 160)
    assert vos_preprocess.target_size(1920, 1080, 1024) == (1024, 576)
    assert vos_preprocess.target_size(854, 480, 1008) == (1008, 567)  # 480 * 1008 / 854 = 566.6
    assert vos_preprocess.target_size(854, 480, 1008, enlarge=False) == (854, 480)


def test_shrinking_counts_annotations_that_lose_an_id(tmp_path: Path) -> None:
    labels = np.zeros((64, 64), dtype=np.uint8)
    # a 1-pixel line: at 1/4 scale nearest takes the row under each output centre, (y + 0.5) * 4 = 2, 6, 10, 14, ...
    labels[11, 10:20] = 3
    frames, annotations = tmp_path / "in" / "JPEGImages" / "v", tmp_path / "in" / "Annotations" / "v"
    frames.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(frames / "00000.jpg")
    write_label_map(annotations / "00000.png", labels)
    summary = vos_preprocess.preprocess_vos(tmp_path / "in", tmp_path / "out", size=16)
    assert summary["ids_lost"] == 1
    assert set(np.unique(read_label_map(tmp_path / "out" / "Annotations" / "v" / "00000.png")).tolist()) == {0}


def test_files_already_at_the_size_are_copied_byte_for_byte(shapes_root: Path, tmp_path: Path) -> None:
    summary = vos_preprocess.preprocess_vos(shapes_root, tmp_path / "same", size=64)
    assert (summary["resized"], summary["copied"]) == (0, 18)
    inputs, outputs = all_files(shapes_root), all_files(tmp_path / "same")
    assert all(outputs[name] == data for name, data in inputs.items() if name != "meta.json")
    # --no-enlarge: 64 < 96, so nothing grows and everything is copied
    args = parse(["--in", str(shapes_root), "--out", str(tmp_path / "small"), "--size", "96", "--no-enlarge"])
    assert vos_preprocess.run(args) == 0
    summary = json.loads((tmp_path / "small" / "preprocess.json").read_text())
    assert (summary["enlarge"], summary["resized"], summary["copied"]) == (False, 0, 18)


def test_same_bytes_with_two_workers(shapes_root: Path, tmp_path: Path) -> None:
    vos_preprocess.preprocess_vos(shapes_root, tmp_path / "one", size=48, workers=1)
    vos_preprocess.preprocess_vos(shapes_root, tmp_path / "two", size=48, workers=2)
    one, two = all_files(tmp_path / "one"), all_files(tmp_path / "two")
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k] and k != "preprocess.json"] == []


def test_help_names_both_model_sizes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    vos_preprocess.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "SAM 2.1 uses 1024, SAM 3 1008" in text
    # the size is vos.preprocess.size (built-in default 1024, the recipe's for SAM 2.1); --size is its shorthand
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert (
        stage_params(parse(["--in", "a", "--out", "b", "--params", str(empty)]), SHORTHANDS).vos.preprocess.size == 1024
    )
    given = parse(["--in", "a", "--out", "b", "--params", str(empty), "--size", "96"])
    assert stage_params(given, SHORTHANDS).vos.preprocess.size == 96


def test_input_without_frames_folder_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    args = parse(["--in", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no JPEGImages/ folder and no split folder"):
        vos_preprocess.run(args)
    with pytest.raises(DataError, match="input folder not found"):
        vos_preprocess.run(parse(["--in", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]))


@pytest.mark.parametrize("content", [b"not a picture", "truncated"])
def test_unreadable_frame_is_a_data_error_naming_it(shapes_root: Path, tmp_path: Path, content: object) -> None:
    split = tmp_path / "split"
    make_split(split)
    bad = split / "JPEGImages" / "480p" / "bear" / "00001.png"
    bad.write_bytes(bad.read_bytes()[:60] if content == "truncated" else content)
    args = parse(["--in", str(split), "--out", str(tmp_path / "out"), "--size", "40"])
    with pytest.raises(DataError, match=f"{bad}: cannot read the frame .*validate stage normally quarantines"):
        vos_preprocess.run(args)


def test_bad_annotations_are_data_errors(tmp_path: Path) -> None:
    split = tmp_path / "split"
    make_split(split)
    label = split / "Annotations" / "480p" / "bear" / "00000.png"
    Image.new("RGB", (80, 48)).save(label)
    with pytest.raises(DataError, match=f"{label}: annotation PNG is in mode 'RGB', not an indexed"):
        vos_preprocess.preprocess_vos(split, tmp_path / "out", size=40)
    write_label_map(label, np.zeros((40, 80), dtype=np.uint8))
    with pytest.raises(DataError, match=f"{label}: annotation is 80x40 pixels but its frame .* is 80x48"):
        vos_preprocess.preprocess_vos(split, tmp_path / "out", size=40)


def test_bad_options_are_config_errors(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--out must differ from --in"):
        vos_preprocess.preprocess_vos(shapes_root, shapes_root, size=32)
    with pytest.raises(ConfigError, match="--size must be a positive number of pixels, got 0"):
        vos_preprocess.preprocess_vos(shapes_root, tmp_path, size=0)
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        vos_preprocess.preprocess_vos(shapes_root, tmp_path, size=32, workers=0)
