"""One split's annotation file, parsed once and indexed: images, categories, and the annotations of each image.

    split = CocoSplit.read("data/mine", "train")        # data/mine/train/_annotations.coco.json (`locate`)
    split.categories    {category id: name}, sorted by id
    split.images        {image id: image record}, in file order
    split.annotations   {image id: [annotation, ...]}, in file order; [] for an image without any
    split.image_path(image_id), split.present_categories(image_id)

Every reader of a split (the training dataset `sam3.data`, the negatives stage, evaluation) needs these indexes and
the consistency they rely on, checked here once, each failure a DataError naming the file and the entry:
- the file is a JSON object whose `images`, `annotations` and `categories` are lists;
- each category has a unique integer id and a non-empty name, and there is at least one (prompts are their names);
- each image has a unique integer id;
- each annotation names a listed image and a listed category.
The validate stage quarantines whatever breaks these rules, so its output always passes. What one reader needs
beyond them (sizes, boxes, masks, distinct prompts) that reader checks itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3.coco import ANNOTATIONS_FILE, load_coco, present_splits, split_annotation_path
from sam3.errors import DataError

_VALIDATE = "run the validate stage"  # the remedy: it quarantines the entries these checks refuse
_TABLES = ("images", "annotations", "categories")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not an id


@dataclass(frozen=True)
class CocoSplit:
    """One annotation file of a split folder, checked and indexed (see the module docstring)."""

    annotation_file: Path
    data: dict[str, Any]  # the parsed file, unchanged: writers and scorers take it whole
    categories: dict[int, str]
    images: dict[int, dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]

    @classmethod
    def read(cls, dataset_dir: str | Path, split: str, annotations_file: str = ANNOTATIONS_FILE) -> CocoSplit:
        """Load `locate(dataset_dir, split, annotations_file)`."""
        return cls.load(cls.locate(dataset_dir, split, annotations_file))

    @staticmethod
    def locate(dataset_dir: str | Path, split: str, annotations_file: str = ANNOTATIONS_FILE) -> Path:
        """`<dataset_dir>/<split>/<annotations_file>`: the split's own file by default, or another file of the
        split folder over the same images (a few-shot file). DataError when the split or the file is missing."""
        splits = present_splits(dataset_dir)
        if split not in splits:
            raise DataError(
                f"{split_annotation_path(dataset_dir, split)}: split {split!r} not found; "
                f"this dataset has {', '.join(splits)}"
            )
        path = Path(dataset_dir) / split / annotations_file
        if not path.is_file():
            raise DataError(
                f"{path}: annotation file not found in split {split!r}; give an annotation file of that split "
                "folder (a few-shot file is made by the validate stage: --fewshot-seeds)"
            )
        return path

    @classmethod
    def load(cls, annotation_file: str | Path) -> CocoSplit:
        """Parse and index one COCO annotation file (any path)."""
        path = Path(annotation_file)
        data = load_coco(path)
        for table in _TABLES:
            if not isinstance(data.get(table), list):
                raise DataError(f"{path}: '{table}' must be a list (COCO format: images, annotations, categories)")
        categories = _index_categories(path, data["categories"])
        images = _index_images(path, data["images"])
        return cls(path, data, categories, images, _index_annotations(path, data["annotations"], images, categories))

    @property
    def folder(self) -> Path:
        """The split folder: image file names are relative to it."""
        return self.annotation_file.parent

    def image_path(self, image_id: int) -> Path:
        """The file of image `image_id`; DataError when its record has no file_name."""
        file_name = self.images[image_id].get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{self.annotation_file}: image id {image_id} has no file_name; {_VALIDATE}")
        return self.folder / file_name

    def present_categories(self, image_id: int) -> list[int]:
        """Ids of the categories annotated in image `image_id`, sorted: any annotation counts, crowd or not."""
        return sorted({ann["category_id"] for ann in self.annotations[image_id]})


def _index_categories(path: Path, categories: list[Any]) -> dict[int, str]:
    """Category id -> name, sorted by id."""
    index: dict[int, str] = {}
    for category in categories:
        cat_id = category.get("id") if isinstance(category, dict) else None
        name = category.get("name") if isinstance(category, dict) else None
        if not _is_int(cat_id) or cat_id in index or not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: category {str(category)[:80]} needs a unique integer id and a non-empty name")
        index[cat_id] = name
    if not index:
        raise DataError(f"{path}: no categories; every prompt is a category name")
    return dict(sorted(index.items()))


def _index_images(path: Path, images: list[Any]) -> dict[int, dict[str, Any]]:
    """Image id -> record, in file order."""
    index: dict[int, dict[str, Any]] = {}
    for image in images:
        image_id = image.get("id") if isinstance(image, dict) else None
        if not _is_int(image_id) or image_id in index:
            raise DataError(f"{path}: image entry {str(image)[:80]} has a missing or duplicate integer id; {_VALIDATE}")
        index[image_id] = image
    return index


def _index_annotations(
    path: Path, annotations: list[Any], images: dict[int, dict[str, Any]], categories: dict[int, str]
) -> dict[int, list[dict[str, Any]]]:
    """Image id -> its annotations, in file order; every image has a list."""
    by_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{k}] must be an object; {_VALIDATE}")
        image_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or image_id not in by_image:
            raise DataError(
                f"{path}: annotation {ann.get('id')} refers to image id {image_id!r}, which is not in 'images'; "
                f"{_VALIDATE}"
            )
        if not _is_int(cat_id) or cat_id not in categories:
            raise DataError(
                f"{path}: annotation {ann.get('id')} (image id {image_id}) has category id {cat_id!r}, which is not "
                f"in 'categories'; {_VALIDATE}"
            )
        by_image[image_id].append(ann)
    return by_image
