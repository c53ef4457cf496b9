"""The generated VOS shapes dataset: layout, exact masks under occlusion, motion, absence, determinism, CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import vos_shapes
from sam3.errors import ConfigError
from sam3.video.palette import read_label_map

# small enough for a fraction of a second, large enough that seed 0 has occlusion and absence (checked below)
ARGS = {"train_videos": 6, "valid_videos": 3, "frames": 16, "size": 64, "seed": 0}


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def scene_of(split: str, index: int, args: dict = ARGS) -> tuple[vos_shapes.Scene, np.random.Generator]:
    """The scene and noise generator of one video, drawn as the builder draws them."""
    split_index = vos_shapes.SPLITS.index(split)
    rng = np.random.default_rng([args["seed"], split_index, index, 0])
    scene = vos_shapes.sample_scene(rng, args["frames"], args["size"], "test")
    return scene, np.random.default_rng([args["seed"], split_index, index, 1])


def videos(root: Path) -> list[tuple[str, int, str]]:
    """(split, index, name) of every video of a mose-layout build of ARGS."""
    counts = {"train": ARGS["train_videos"], "valid": ARGS["valid_videos"]}
    return [(s, i, vos_shapes.video_name(s, i)) for s in vos_shapes.SPLITS for i in range(counts[s])]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vos_shapes")
    return out, vos_shapes.build_vos_shapes(out, **ARGS)


def test_layout_counts_and_meta(built: tuple[Path, dict]) -> None:
    root, summary = built
    meta = json.loads((root / "meta.json").read_text())
    assert meta["generator"] == "vos-shapes-data"
    assert meta["arguments"] == {**ARGS, "layout": "mose"}
    assert sorted(p.name for p in root.iterdir()) == ["meta.json", "train", "valid"]
    names = [f"{t:05d}" for t in range(16)]
    for split, _, video in videos(root):
        frames = sorted((root / split / "JPEGImages" / video).iterdir())
        labels = sorted((root / split / "Annotations" / video).iterdir())
        assert [p.name for p in frames] == [f"{n}.jpg" for n in names]
        assert [p.name for p in labels] == [f"{n}.png" for n in names]  # every frame annotated, valid included
        with Image.open(frames[0]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        count = meta["videos"][split][video]["objects"]
        assert 1 <= count <= 3
        maps = np.stack([read_label_map(p) for p in labels])
        # ids are exactly 1..count over the video, and all of them are visible in frame 0 (where VOS prompts)
        assert set(np.unique(maps).tolist()) - {0} == set(range(1, count + 1))
        assert set(np.unique(maps[0]).tolist()) == set(range(0, count + 1))
        absent = [int(((maps == k).sum(axis=(1, 2)) == 0).sum()) for k in range(1, count + 1)]
        assert meta["videos"][split][video]["absent_frames"] == absent
    assert summary["splits"]["train"]["videos"] == 6 and summary["splits"]["valid"]["videos"] == 3
    assert summary["splits"]["train"]["frames"] == 96 and summary["splits"]["valid"]["annotations"] == 48
    assert summary["splits"]["train"]["objects"] == sum(v["objects"] for v in meta["videos"]["train"].values())


def test_masks_are_the_visible_part_of_the_rendered_geometry(built: tuple[Path, dict]) -> None:
    root, _ = built
    occluded = absent = 0
    for split, index, video in videos(root):
        scene, noise = scene_of(split, index)
        for t in range(scene.frames):
            labels = read_label_map(root / split / "Annotations" / video / f"{t:05d}.png")
            rgb, rendered = vos_shapes.render_frame(scene, t, noise)
            assert np.array_equal(labels, rendered)
            with Image.open(root / split / "JPEGImages" / video / f"{t:05d}.jpg") as image:
                jpeg = np.asarray(image).astype(int)
            assert np.abs(jpeg - rgb).mean() < 3.0  # JPEG q95 of the very picture the masks were painted with
            fulls = [vos_shapes.full_mask(track, t, scene.size) for track in scene.tracks]  # back to front
            for depth, track in enumerate(scene.tracks):
                in_front = np.zeros_like(labels, dtype=bool)
                for mask in fulls[depth + 1 :]:
                    in_front |= mask
                visible = fulls[depth] & ~in_front
                if track.object_id == 0:  # the distractor is never annotated
                    assert not (labels[visible] > 0).any()
                    continue
                assert np.array_equal(labels == track.object_id, visible)
                # painted pixels are the shape's colour times the shade ramp 1 +- SHADE, rounded
                pixels = rgb[visible].astype(float)
                colour = np.array(track.rgb, dtype=float)
                assert (pixels >= np.floor(colour * (1 - vos_shapes.SHADE)) - 1).all()
                assert (pixels <= np.ceil(colour * (1 + vos_shapes.SHADE)) + 1).all()
                occluded += 0 < visible.sum() < fulls[depth].sum()
                absent += visible.sum() == 0
    assert occluded >= 5 and absent >= 1


def test_objects_move_turn_and_deform() -> None:
    moved, deformed = [], []
    for split, index, _ in videos(Path()):
        scene, _ = scene_of(split, index)
        for track in scene.objects:
            path = track.path
            steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
            # constant speed between bounces: at least 0.012 * 64 = 0.77 px per frame, at most 0.04 * 64 = 2.56
            assert steps.max() <= 0.04 * 64 + 1e-9
            moved.append(np.linalg.norm(path - path[0], axis=1).max())
            areas = [track.full_area(t) for t in range(scene.frames)]
            deformed.append(max(areas) / min(areas))
            poses = [track.pose(t) for t in range(scene.frames)]
            assert poses[1][2] - poses[0][2] == pytest.approx(track.spin)  # radians per frame
            assert abs(track.spin) <= vos_shapes.SPIN and 0 <= track.angle0 < 2 * math.pi
    assert min(moved) > 0.77 * 15 / 2  # even a path bouncing straight back has gone half its length away once
    assert max(deformed) > 1.3  # scale(t) up to 1 +- 0.25: an area ratio up to (1.25 / 0.75)^2 = 2.8


def test_unit_shapes_by_hand() -> None:
    u, v = np.meshgrid(np.linspace(-1.5, 1.5, 301), np.linspace(-1.5, 1.5, 301))
    cell = (3.0 / 300) ** 2
    for shape, area in vos_shapes.UNIT_AREA.items():
        inside = vos_shapes.inside_unit_shape(shape, u, v)
        assert inside.sum() * cell == pytest.approx(area, rel=0.02)
    # the triangle's vertices: (0, -1) up, (+-sqrt(3)/2, 1/2); its centre and points just inside them are in
    corners = np.array([[0.0, -0.99], [0.85, 0.49], [-0.85, 0.49], [0.0, 0.0]])
    assert vos_shapes.inside_unit_shape("triangle", corners[:, 0], corners[:, 1]).all()
    assert not vos_shapes.inside_unit_shape("triangle", np.array([0.0, 0.5]), np.array([0.51, -0.9])).any()


def test_full_mask_of_a_square_at_a_pose_by_hand() -> None:
    track = vos_shapes.Track(
        object_id=1, shape="square", colour="red", rgb=(220, 40, 40), size=20.0,
        path=np.array([[32.0, 32.0]]), angle0=0.0, spin=0.0, scale_amplitude=0.0, scale_period=20.0,
        scale_phase=0.0, aspect_base=4.0, aspect_amplitude=0.0, aspect_period=20.0, aspect_phase=0.0,
    )  # fmt: skip
    # r = 10, aspect 4: half widths r sqrt(4) = 20 along x and r / sqrt(4) = 5 along y: x in [12, 52], y in [27, 37]
    mask = vos_shapes.full_mask(track, 0, 64)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (12, 51, 27, 36)
    assert int(mask.sum()) == 40 * 10 == pytest.approx(track.full_area(0))


def test_fold_bounces_continuously() -> None:
    values = np.array([-3.0, 0.0, 4.0, 10.0, 13.0, 21.0, 25.0])
    assert vos_shapes.fold(values, 0.0, 10.0).tolist() == [3.0, 0.0, 4.0, 10.0, 7.0, 1.0, 5.0]


def test_same_arguments_byte_identical_other_seed_differs(built: tuple[Path, dict], tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    vos_shapes.build_vos_shapes(again, **ARGS)
    vos_shapes.build_vos_shapes(other, **{**ARGS, "seed": 1})
    first, second, third = all_files(built[0]), all_files(again), all_files(other)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    assert all(first[k] != third.get(k) for k in first if k.endswith(".jpg"))


def test_first_frames_do_not_depend_on_length_or_video_count(built: tuple[Path, dict], tmp_path: Path) -> None:
    vos_shapes.build_vos_shapes(tmp_path, train_videos=2, valid_videos=1, frames=5, size=64, seed=0)
    big, small = all_files(built[0]), all_files(tmp_path)
    same = [k for k in small if k != "meta.json"]
    assert len(same) == 2 * 3 * 5 and all(small[k] == big[k] for k in same)


def test_davis_layout_lists_and_same_videos(built: tuple[Path, dict], tmp_path: Path) -> None:
    summary = vos_shapes.build_vos_shapes(tmp_path, **ARGS, layout="davis")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Annotations", "ImageSets", "JPEGImages", "meta.json"]
    lists = tmp_path / "ImageSets" / "2017"
    assert (lists / "train.txt").read_text().split() == [f"train_{i:04d}" for i in range(6)]
    assert (lists / "val.txt").read_text().split() == [f"valid_{i:04d}" for i in range(3)]
    assert len(list((tmp_path / "JPEGImages").iterdir())) == 9
    mose = built[0]
    for folder in ("JPEGImages/valid_0002/00015.jpg", "Annotations/train_0004/00003.png"):
        split = folder.split("/")[1][:5]
        assert (tmp_path / folder).read_bytes() == (mose / split / folder).read_bytes()
    assert summary["layout"] == "davis" and summary["splits"]["valid"]["videos"] == 3


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vos_shapes.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_defaults_and_rebuild_removes_stale_videos(tmp_path: Path) -> None:
    defaults = parse([])
    assert (defaults.train_videos, defaults.valid_videos, defaults.frames, defaults.size, defaults.seed) == (
        24,
        8,
        24,
        128,
        0,
    )
    assert defaults.layout == "mose" and defaults.out == Path("data/raw/vos_shapes")
    argv = ["--out", str(tmp_path), "--train-videos", "3", "--valid-videos", "1", "--frames", "2", "--size", "32"]
    assert vos_shapes.run(parse(argv)) == 0
    assert vos_shapes.run(parse(argv[:3] + ["1"] + argv[4:])) == 0  # 1 train video now: the 2 others are gone
    assert sorted(p.name for p in (tmp_path / "train" / "JPEGImages").iterdir()) == ["train_0000"]


def test_bad_arguments_and_foreign_folder_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--frames must be >= 2"):
        vos_shapes.build_vos_shapes(tmp_path / "a", frames=1)
    with pytest.raises(ConfigError, match="at least one video"):
        vos_shapes.build_vos_shapes(tmp_path / "a", train_videos=0, valid_videos=0)
    with pytest.raises(ConfigError, match="--size must be >= 32"):
        vos_shapes.build_vos_shapes(tmp_path / "a", size=16)
    with pytest.raises(ConfigError, match="--layout"):
        vos_shapes.build_vos_shapes(tmp_path / "a", layout="ytvos")
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=f"{tmp_path} is not empty and was not written by vos-shapes-data"):
        vos_shapes.build_vos_shapes(tmp_path, train_videos=1, valid_videos=0, frames=2, size=32)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
