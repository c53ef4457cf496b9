"""`python -m pipeline vos-shapes-data`: a generated video object segmentation (VOS) dataset with exact masks.

Each video has 1-3 annotated objects (circle, square, triangle or ellipse; distinct colours) over a muted gradient
or drifting-texture background with per-frame noise, and sometimes one unannotated distractor of an object's colour.
Every object follows a smooth path and turns, spins and breathes over time (t = frame index):

    heading(t) = h0 + turn * t,   position(t) = fold(p0 + sum_{s<t} speed * (cos heading(s), sin heading(s)))
    angle(t) = a0 + spin * t,     scale(t) = 1 + A_s sin(2 pi t / P_s + phi_s),   aspect(t) = a_base (1 + A_a sin(...))

`fold` bounces the path off the walls of a box (a triangle wave); for half the objects that box reaches 2 bounding
radii past the image, so they leave the frame entirely and come back. Objects are painted back to front in a fixed
depth order: the annotation of an object is what is left visible, so it can shrink or vanish (occluded, or out of
the frame: "absent", an all-background frame for that id). Each annotated object is at least half visible in frame
0, where semi-supervised VOS gives its mask.

Masks are exact: a pixel belongs to a shape when its centre (x + 0.5, y + 0.5) does, and the frame's pixels are
painted from those very masks (no anti-aliasing), so label map and picture agree pixel for pixel before the frame
is saved as JPEG (quality 95, 4:4:4 chroma, as DAVIS and MOSE ship JPEG frames). Annotations are indexed PNGs
(`sam3.video.palette`): 0 background, k object k. Every frame of every video is annotated, valid included, so a
held-out J&F can be scored on any frame.

Layouts: "mose" writes ROOT/{train,valid}/{JPEGImages,Annotations}/<video>/<frame>; "davis" writes one
ROOT/{JPEGImages,Annotations}/<video>/<frame> with ImageSets/2017/{train,val}.txt listing the videos. Frames are
named 00000.jpg / 00000.png; videos train_0000, valid_0000, ... ROOT/meta.json holds the arguments, per-split
counts and per video its objects (count, shapes, colours), whether it has a distractor and each object's absent
frames.

Deterministic: video v of split s is drawn from `default_rng([seed, s, v, 0])` (scene) and its frame noise from
`default_rng([seed, s, v, 1])`, so a seed gives byte-identical files (no threads involved), and a video's first
frames depend neither on --frames nor on the number of videos.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.preprocess import JPEG_OPTIONS  # quality 95, 4:4:4, fixed settings: reproducible bytes
from sam3.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR = "vos-shapes-data"
DEFAULT_OUT = "data/raw/vos_shapes"
SPLITS = ("train", "valid")
LAYOUTS = ("mose", "davis")
DAVIS_LISTS = {"train": "train.txt", "valid": "val.txt"}  # ImageSets/2017/<file> per split
META_FILE = "meta.json"
FRAME_DIGITS = 5

SHAPES = ("circle", "square", "triangle", "ellipse")
# Saturated colours far apart in hue; the background is muted (low saturation), so objects stand out from it
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 200, 30),
    "magenta": (200, 45, 190),
    "cyan": (30, 185, 200),
    "orange": (240, 125, 20),
    "purple": (115, 50, 175),
}
MAX_OBJECTS = 3
COLOUR_JITTER = 12  # per channel and video
SHADE = 0.12  # brightness ramp across a shape, in its own frame: factor 1 + SHADE * (u - v) / 2, u, v in [-1, 1]
SIZE_FRACTION = (0.15, 0.35)  # base size (circle diameter, square side, triangle circumscribed diameter) / side
SPEED_FRACTION = (0.012, 0.04)  # pixels per frame / side
TURN = 0.08  # heading change, +- radians per frame
SPIN = 0.12  # rotation, +- radians per frame
SCALE_AMPLITUDE = 0.25  # A_s drawn from [0, this]
ASPECT_AMPLITUDE = 0.25  # A_a drawn from [0, this]
ELLIPSE_ASPECT = (1.6, 2.4)  # a_base of an ellipse (long axis / short axis); 1 for the other shapes
PERIOD = (12.0, 40.0)  # frames per breathing cycle
EXIT_PROB = 0.5  # share of objects whose bounce box reaches past the image, so they can leave it
EXIT_MARGIN = 2.0  # such a box extends this many bounding radii past each edge
INSIDE_MARGIN = 0.3  # other boxes stop the centre this many bounding radii inside the edges
DISTRACTOR_PROB = 0.3  # share of videos with an unannotated shape of an annotated object's colour
MIN_FIRST_VISIBLE = 0.5  # visible share of each annotated object's (unclipped) area in frame 0
SCENE_TRIES = 50  # scenes drawn before giving up on the first-frame rule
BACKGROUND_GREY = (70, 200)
BACKGROUND_TINT = 20  # +- per channel
GRADIENT_SPAN = 50  # +- per channel from one side of a gradient background to the other
TEXTURE_WAVES = 3  # sinusoids summed into a texture background
TEXTURE_AMPLITUDE = (4.0, 14.0)  # per sinusoid and channel
TEXTURE_DRIFT = 0.15  # +- radians of phase per frame: the texture drifts like a slow camera pan
NOISE_STD = (1.5, 5.0)  # per-frame Gaussian noise of the whole picture

UNIT_AREA = {"circle": math.pi, "ellipse": math.pi, "square": 4.0, "triangle": 3 * math.sqrt(3) / 4}
UNIT_RADIUS = {"circle": 1.0, "ellipse": 1.0, "square": math.sqrt(2), "triangle": 1.0}
# Outward normals of the unit triangle's edges (circumradius 1, inradius 1/2, a vertex pointing up at -90 deg)
TRIANGLE_NORMALS = tuple((math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (90.0, 210.0, 330.0))


@dataclass(frozen=True)
class Track:
    """One shape and its motion over a whole video (module docstring). `object_id` 0: an unannotated distractor.

    Positions are in pixels, x to the right and y down; `path` is the [T, 2] centre (x, y) of every frame.
    """

    object_id: int
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    size: float
    path: np.ndarray
    angle0: float
    spin: float
    scale_amplitude: float
    scale_period: float
    scale_phase: float
    aspect_base: float
    aspect_amplitude: float
    aspect_period: float
    aspect_phase: float

    def pose(self, t: int) -> tuple[float, float, float, float, float]:
        """(cx, cy, angle, r, aspect) at frame t: r = size / 2 * scale(t) is the unit shape's pixel scale."""
        scale = 1 + self.scale_amplitude * math.sin(2 * math.pi * t / self.scale_period + self.scale_phase)
        aspect = self.aspect_base * (
            1 + self.aspect_amplitude * math.sin(2 * math.pi * t / self.aspect_period + self.aspect_phase)
        )
        cx, cy = self.path[t]
        return float(cx), float(cy), self.angle0 + self.spin * t, self.size / 2 * scale, aspect

    def full_area(self, t: int) -> float:
        """Unclipped area in pixels at frame t: UNIT_AREA * r^2 (the aspect stretch u / sqrt(a), v * sqrt(a) keeps
        areas)."""
        return UNIT_AREA[self.shape] * self.pose(t)[3] ** 2


@dataclass(frozen=True)
class Background:
    """Per channel c: base_c + gradient_c * ((x, y) . direction / side - 1/2) + sum_k amp_kc sin(f_k . (x, y) +
    phase_k + drift_k t), and N(0, noise_std) per pixel and frame."""

    base: np.ndarray  # [3]
    gradient: np.ndarray  # [3]; 0 for a texture background
    direction: tuple[float, float]
    frequencies: np.ndarray  # [K, 2] radians per pixel; K = 0 for a gradient background
    amplitudes: np.ndarray  # [K, 3]
    phases: np.ndarray  # [K]
    drifts: np.ndarray  # [K]
    noise_std: float


@dataclass(frozen=True)
class Scene:
    """A whole video's content: its background and its shapes in depth order, back first."""

    background: Background
    tracks: list[Track]  # back to front; annotated ids 1..n, distractor 0
    frames: int
    size: int

    @property
    def objects(self) -> list[Track]:
        """The annotated tracks, by id."""
        return sorted((t for t in self.tracks if t.object_id), key=lambda t: t.object_id)


def fold(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Bounce `values` into [low, high] (a triangle wave of period 2 (high - low)): a path leaving the box at one
    wall comes back mirrored, continuously."""
    span = high - low
    phase = np.mod(values - low, 2 * span)
    return low + np.where(phase <= span, phase, 2 * span - phase)


def sample_path(rng: np.random.Generator, frames: int, size: int, radius: float) -> np.ndarray:
    """[T, 2] centres: constant speed, a heading turning at a constant rate, folded into the object's bounce box."""
    margin = -EXIT_MARGIN * radius if rng.random() < EXIT_PROB else INSIDE_MARGIN * radius
    low, high = margin, size - margin
    if high - low < 1.0:  # a very large shape on a small image: let it roam across the centre
        low, high = size / 2 - 0.5, size / 2 + 0.5
    start = rng.uniform(low, high, size=2)
    speed = rng.uniform(*SPEED_FRACTION) * size
    heading = rng.uniform(0, 2 * math.pi) + rng.uniform(-TURN, TURN) * np.arange(frames)
    steps = speed * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    raw = start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], axis=0)])
    return fold(raw, low, high)


def sample_track(rng: np.random.Generator, object_id: int, shape: str, colour: str, frames: int, size: int) -> Track:
    """One shape of the given kind and colour with a random size, path, spin and breathing."""
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    base_size = rng.uniform(*SIZE_FRACTION) * size
    aspect_base = rng.uniform(*ELLIPSE_ASPECT) if shape == "ellipse" else 1.0
    aspect_amplitude = rng.uniform(0, ASPECT_AMPLITUDE)
    scale_amplitude = rng.uniform(0, SCALE_AMPLITUDE)
    # the largest extent it ever reaches, so that the bounce box keeps (or lets out) the whole shape
    widest = math.sqrt(aspect_base * (1 + aspect_amplitude))
    radius = base_size / 2 * (1 + scale_amplitude) * widest * UNIT_RADIUS[shape]
    return Track(
        object_id=object_id,
        shape=shape,
        colour=colour,
        rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        size=base_size,
        path=sample_path(rng, frames, size, radius),
        angle0=rng.uniform(0, 2 * math.pi),
        spin=rng.uniform(-SPIN, SPIN),
        scale_amplitude=scale_amplitude,
        scale_period=rng.uniform(*PERIOD),
        scale_phase=rng.uniform(0, 2 * math.pi),
        aspect_base=aspect_base,
        aspect_amplitude=aspect_amplitude,
        aspect_period=rng.uniform(*PERIOD),
        aspect_phase=rng.uniform(0, 2 * math.pi),
    )


def sample_background(rng: np.random.Generator) -> Background:
    """A muted gradient (half the videos) or a drifting sum of sinusoids, with a noise level for its frames."""
    base = rng.integers(*BACKGROUND_GREY) + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.5:
        gradient = rng.uniform(-GRADIENT_SPAN, GRADIENT_SPAN, size=3)
        waves = 0
    else:
        gradient = np.zeros(3)
        waves = TEXTURE_WAVES
    # wavelengths of 8..64 pixels at any orientation
    wave_angles = rng.uniform(0, 2 * math.pi, size=waves)
    wave_numbers = 2 * math.pi / rng.uniform(8.0, 64.0, size=waves)
    return Background(
        base=base.astype(np.float64),
        gradient=gradient,
        direction=(math.cos(angle), math.sin(angle)),
        frequencies=wave_numbers[:, None] * np.stack([np.cos(wave_angles), np.sin(wave_angles)], axis=1),
        amplitudes=rng.uniform(*TEXTURE_AMPLITUDE, size=(waves, 3)),
        phases=rng.uniform(0, 2 * math.pi, size=waves),
        drifts=rng.uniform(-TEXTURE_DRIFT, TEXTURE_DRIFT, size=waves),
        noise_std=float(rng.uniform(*NOISE_STD)),
    )


def background_frame(background: Background, t: int, size: int, noise: np.random.Generator) -> np.ndarray:
    """Float64 [S, S, 3] background of frame t, noise included (Background's formula)."""
    centres = np.arange(size) + 0.5
    x, y = centres[None, :], centres[:, None]
    ramp = (x * background.direction[0] + y * background.direction[1]) / size - 0.5  # [S, S], about -1..1
    picture = background.base + ramp[..., None] * background.gradient
    for (fx, fy), amplitude, phase, drift in zip(
        background.frequencies, background.amplitudes, background.phases, background.drifts, strict=True
    ):
        picture = picture + np.sin(fx * x + fy * y + phase + drift * t)[..., None] * amplitude
    return picture + noise.normal(0.0, background.noise_std, size=picture.shape)


def shape_coords(track: Track, t: int, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The shape's own coordinates (u, v) of the pixel centres in its bounding window at frame t.

    d = (x + 0.5 - cx, y + 0.5 - cy); q = R(-angle) d; u = q_x / (r sqrt(a)), v = q_y sqrt(a) / r. The unit shape
    is then tested in (u, v): the window (rows, cols slices) covers the shape's bounding circle, clipped to the image.
    """
    cx, cy, angle, r, aspect = track.pose(t)
    reach = r * max(math.sqrt(aspect), 1 / math.sqrt(aspect)) * UNIT_RADIUS[track.shape]
    x0, x1 = max(0, math.floor(cx - reach)), min(size, math.ceil(cx + reach) + 1)
    y0, y1 = max(0, math.floor(cy - reach)), min(size, math.ceil(cy + reach) + 1)
    dx = (np.arange(x0, max(x0, x1)) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, max(y0, y1)) + 0.5 - cy)[:, None]
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * dx + sin * dy) / (r * math.sqrt(aspect))
    v = (-sin * dx + cos * dy) * math.sqrt(aspect) / r
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1)), u, v


def inside_unit_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bool mask of the unit shape: disc u^2 + v^2 <= 1 (circle, ellipse: the stretch makes the ellipse), square
    max(|u|, |v|) <= 1, triangle n_k . (u, v) <= 1/2 for its three outward edge normals n_k."""
    if shape in ("circle", "ellipse"):
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == "triangle":
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for nx, ny in TRIANGLE_NORMALS:
            inside &= nx * u + ny * v <= 0.5
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def full_mask(track: Track, t: int, size: int) -> np.ndarray:
    """Bool [S, S]: the pixels whose centre lies in the shape at frame t, occlusion ignored, clipped to the image."""
    rows, cols, u, v = shape_coords(track, t, size)
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = inside_unit_shape(track.shape, u, v)
    return mask


def render_frame(scene: Scene, t: int, noise: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frame t: (RGB uint8 [S, S, 3], label map uint8 [S, S]), shapes painted back to front.

    A shape's pixels get its colour times 1 + SHADE (u - v) / 2 (a ramp that turns with it); the label map gets its
    id, 0 for the distractor, over exactly the same pixels, so an occluded part is relabelled by what hides it.
    """
    size = scene.size
    picture = background_frame(scene.background, t, size, noise)
    labels = np.zeros((size, size), dtype=np.uint8)
    for track in scene.tracks:
        rows, cols, u, v = shape_coords(track, t, size)
        inside = inside_unit_shape(track.shape, u, v)
        shade = 1 + SHADE * np.clip((u - v) / 2, -1.0, 1.0)
        window = picture[rows, cols]
        window[inside] = (shade[..., None] * np.array(track.rgb, dtype=np.float64))[inside]
        labels[rows, cols][inside] = track.object_id
    return np.clip(np.round(picture), 0, 255).astype(np.uint8), labels


def first_frame_ok(scene: Scene) -> bool:
    """Whether every annotated object shows at least MIN_FIRST_VISIBLE of its unclipped area in frame 0 (occlusion
    and the image border both count against it): semi-supervised VOS starts from the frame-0 masks."""
    labels = np.zeros((scene.size, scene.size), dtype=np.uint8)
    for track in scene.tracks:
        labels[full_mask(track, 0, scene.size)] = track.object_id
    return all((labels == track.object_id).sum() >= MIN_FIRST_VISIBLE * track.full_area(0) for track in scene.objects)


def sample_scene(rng: np.random.Generator, frames: int, size: int, where: str) -> Scene:
    """1..MAX_OBJECTS annotated shapes of distinct colours, maybe a distractor, in a random depth order; redrawn
    until the first-frame rule holds. ConfigError (naming `where`) if SCENE_TRIES draws all fail."""
    background = sample_background(rng)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(SCENE_TRIES):
        colours = [str(c) for c in rng.choice(list(COLOURS), size=count, replace=False)]
        tracks = [sample_track(rng, k + 1, str(rng.choice(SHAPES)), colours[k], frames, size) for k in range(count)]
        if rng.random() < DISTRACTOR_PROB:
            tracks.append(sample_track(rng, 0, str(rng.choice(SHAPES)), str(rng.choice(colours)), frames, size))
        order = rng.permutation(len(tracks))
        scene = Scene(background, [tracks[i] for i in order], frames, size)
        if first_frame_ok(scene):
            return scene
    raise ConfigError(
        f"{GENERATOR}: {where}: no placement of {count} shapes left each at least {MIN_FIRST_VISIBLE:.0%} visible "
        f"in frame 0 after {SCENE_TRIES} tries; raise --size"
    )


def frame_name(t: int) -> str:
    """The file stem of frame t: 5-digit zero-padded, as DAVIS and MOSE name frames."""
    return f"{t:0{FRAME_DIGITS}d}"


def video_name(split: str, index: int) -> str:
    return f"{split}_{index:04d}"


def split_root(out: Path, split: str, layout: str) -> Path:
    """The folder holding JPEGImages/ and Annotations/ for `split`."""
    return out / split if layout == "mose" else out


def write_video(scene: Scene, noise: np.random.Generator, frames_dir: Path, labels_dir: Path) -> dict[str, Any]:
    """Render and save every frame (JPEG) and label map (indexed PNG); return per-object visible pixel counts."""
    from PIL import Image

    from sam3.video.palette import write_label_map

    frames_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    ids = [track.object_id for track in scene.objects]
    visible = {k: [] for k in ids}
    for t in range(scene.frames):
        rgb, labels = render_frame(scene, t, noise)
        Image.fromarray(rgb).save(frames_dir / f"{frame_name(t)}.jpg", format="JPEG", **JPEG_OPTIONS)
        write_label_map(labels_dir / f"{frame_name(t)}.png", labels)
        counts = np.bincount(labels.ravel(), minlength=max(ids) + 1)
        for k in ids:
            visible[k].append(int(counts[k]))
    return visible


def check_arguments(train_videos: int, valid_videos: int, frames: int, size: int, seed: int, layout: str) -> None:
    """ConfigError naming the option for values out of range."""
    if train_videos < 0 or valid_videos < 0 or train_videos + valid_videos < 1:
        raise ConfigError(
            f"{GENERATOR}: --train-videos and --valid-videos must be >= 0 with at least one video, got "
            f"{train_videos} and {valid_videos}"
        )
    if frames < 2:
        raise ConfigError(f"{GENERATOR}: --frames must be >= 2 (a video), got {frames}")
    if size < 32:
        raise ConfigError(f"{GENERATOR}: --size must be >= 32 pixels, got {size}")
    if seed < 0:
        raise ConfigError(f"{GENERATOR}: --seed must be >= 0, got {seed}")
    if layout not in LAYOUTS:
        raise ConfigError(f"{GENERATOR}: --layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def clear_output(out: Path) -> None:
    """Remove a previous build in `out` (it has our meta.json), so no video of a larger earlier build stays behind.
    ConfigError if `out` holds anything else: we never delete files this generator did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{GENERATOR}: --out {out} is a file, not a folder")
    entries = list(out.iterdir())
    if not entries:
        return
    meta = out / META_FILE
    try:
        ours = json.loads(meta.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(
            f"{GENERATOR}: --out {out} is not empty and was not written by {GENERATOR} (no {META_FILE} of ours); "
            "give an empty or new folder"
        )
    for entry in entries:
        if entry.name in (*SPLITS, "JPEGImages", "Annotations", "ImageSets", META_FILE):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def build_vos_shapes(
    out: str | Path,
    train_videos: int = 24,
    valid_videos: int = 8,
    frames: int = 24,
    size: int = 128,
    seed: int = 0,
    layout: str = "mose",
) -> dict[str, Any]:
    """Generate the dataset under `out` (module docstring) and return its summary:

    {"out", "layout", "seconds", "splits": {split: {"videos", "frames", "annotations", "objects",
     "absent" (object-frames with no visible pixel), "occluded" (object-frames showing < 100% of their clipped
     full mask)}}}. `frames` and `annotations` count files. Raises ConfigError for arguments out of range.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    check_arguments(train_videos, valid_videos, frames, size, seed, layout)
    out = Path(out)
    clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": train_videos, "valid": valid_videos}
    videos_meta: dict[str, dict[str, Any]] = {}
    splits: dict[str, dict[str, int]] = {}
    with tqdm(total=train_videos + valid_videos, desc=GENERATOR, unit="video") as bar:
        for split_index, split in enumerate(SPLITS):
            root = split_root(out, split, layout)
            stats = {"videos": 0, "frames": 0, "annotations": 0, "objects": 0, "absent": 0, "occluded": 0}
            videos_meta[split] = {}
            for index in range(counts[split]):
                name = video_name(split, index)
                scene = sample_scene(np.random.default_rng([seed, split_index, index, 0]), frames, size, name)
                noise = np.random.default_rng([seed, split_index, index, 1])
                visible = write_video(scene, noise, root / "JPEGImages" / name, root / "Annotations" / name)
                for track in scene.objects:
                    for t, pixels in enumerate(visible[track.object_id]):
                        stats["absent"] += pixels == 0
                        stats["occluded"] += 0 < pixels < int(full_mask(track, t, size).sum())
                stats["videos"] += 1
                stats["frames"] += frames
                stats["annotations"] += frames
                stats["objects"] += len(scene.objects)
                videos_meta[split][name] = {
                    "objects": len(scene.objects),
                    "shapes": [track.shape for track in scene.objects],
                    "colours": [track.colour for track in scene.objects],
                    "distractor": any(track.object_id == 0 for track in scene.tracks),
                    "absent_frames": [sum(p == 0 for p in visible[track.object_id]) for track in scene.objects],
                }
                bar.update()
            splits[split] = stats
            if layout == "davis":
                lists = out / "ImageSets" / "2017"
                lists.mkdir(parents=True, exist_ok=True)
                (lists / DAVIS_LISTS[split]).write_text("".join(f"{name}\n" for name in videos_meta[split]))
    arguments = {
        "train_videos": train_videos,
        "valid_videos": valid_videos,
        "frames": frames,
        "size": size,
        "seed": seed,
        "layout": layout,
    }
    meta = {"generator": GENERATOR, "arguments": arguments, "splits": splits, "videos": videos_meta}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - start
    for split, stats in splits.items():
        log.info(
            "%s: %d videos, %d objects, %d frames; %d object-frames occluded, %d absent",
            split,
            stats["videos"],
            stats["objects"],
            stats["frames"],
            stats["occluded"],
            stats["absent"],
        )
    log.info("wrote %s (%s layout) in %.1f s", out, layout, seconds)
    return {"out": str(out), "layout": layout, "seconds": seconds, "splits": splits}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"dataset root (default: {DEFAULT_OUT})")
    parser.add_argument("--train-videos", type=int, default=24, help="training videos (default: 24)")
    parser.add_argument("--valid-videos", type=int, default=8, help="validation videos (default: 8)")
    parser.add_argument("--frames", type=int, default=24, help="frames per video (default: 24)")
    parser.add_argument("--size", type=int, default=128, help="side of the square frames in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="mose",
        help="mose: ROOT/{train,valid}/{JPEGImages,Annotations}/; davis: ROOT/{JPEGImages,Annotations}/ and "
        "ImageSets/2017/{train,val}.txt (default: mose)",
    )


def run(args: argparse.Namespace) -> int:
    build_vos_shapes(args.out, args.train_videos, args.valid_videos, args.frames, args.size, args.seed, args.layout)
    return 0
