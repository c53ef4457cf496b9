"""The feature cache on disk: safetensors shards and a manifest.

    <cache>/manifest.json              written last, so a cache without it is incomplete (and rebuilt)
        format, enabled, key (sam3.features.key), source (how it was built, for people),
        splits: {split: [{image_id, file_name, shard, targets}, ...]} in the split's image order,
        prompts: [prompt key, ...] (sam3.tokenizer.clean_text), the rows of text.safetensors
    <cache>/<split>-00000.safetensors  whole images, all their views; per image id i and view v:
        i/v/level<j>  float16|32 [C, H_j, W_j]  FPN level j of the view's pixels (only the key's levels)
        i/v/boxes     float32 [n, 4]            the image's targets through the view's geometry, normalised cxcywh
        i/v/masks     uint8 [n, ceil(S*S / 8)]  their masks, bit-packed (numpy.packbits), segmentation only
    <cache>/text.safetensors           tokens: float16|32 [P, L, D], projected token embeddings of every prompt

A cache built with `cache.enabled: false` (the DVC stage when the cache is off) holds only a manifest with
enabled false: nothing to read, and nothing for DVC to store.

The manifest's reading and writing: sam3.features.manifest. Reading is lazy and memory-mapped (safetensors
`safe_open`), one handle per shard and process: `FeatureStore` drops its handles when pickled into DataLoader
workers, which open their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TEXT_FILE = "text.safetensors"
SHARD_PATTERN = "{split}-{index:05d}.safetensors"
STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """bool [n, S, S] -> uint8 [n, ceil(S*S / 8)], 8 pixels per byte (row-major, most significant bit first)."""
    flat = masks.reshape(masks.shape[0], -1).numpy()
    return torch.from_numpy(np.packbits(flat, axis=1))


def unpack_masks(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of `pack_masks`: uint8 [n, ceil(S*S / 8)] -> bool [n, S, S]."""
    bits = np.unpackbits(packed.numpy(), axis=1, count=size * size)
    return torch.from_numpy(bits.astype(bool)).reshape(-1, size, size)


def entry_name(image_id: int, view: int, part: str) -> str:
    return f"{image_id}/{view}/{part}"


class ShardWriter:
    """Collects whole images' tensors and writes a shard whenever the collected bytes reach `shard_bytes`."""

    def __init__(self, folder: Path, split: str, shard_bytes: int) -> None:
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.index, self.pending, self.pending_bytes = 0, {}, 0

    @property
    def current(self) -> str:
        """File name of the shard being filled."""
        return SHARD_PATTERN.format(split=self.split, index=self.index)

    def add(self, tensors: dict[str, torch.Tensor]) -> str:
        """Queue one image's tensors (all its views); return the shard file they land in."""
        shard = self.current
        self.pending.update({name: t.contiguous() for name, t in tensors.items()})
        self.pending_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending_bytes >= self.shard_bytes:
            self.flush()
        return shard

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, str(self.folder / self.current))
            self.index += 1
            self.pending, self.pending_bytes = {}, 0


class FeatureStore:
    """Read access to a complete, enabled cache folder (see the module docstring for the layout)."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.key: dict[str, Any] = manifest["key"]
        self.prompts: list[str] = manifest.get("prompts", [])
        self._entries = {
            split: {entry["image_id"]: entry for entry in entries} for split, entries in manifest["splits"].items()
        }
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files stay in their process
        return state

    def has(self, split: str, image_id: int) -> bool:
        return image_id in self._entries.get(split, {})

    def read(
        self, split: str, image_id: int, view: int, levels: list[int], with_masks: bool
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]:
        """The stored levels (in `levels` order), boxes [n, 4] and masks bool [n, S, S] (or None) of one view."""
        handle = self._open(self._entries[split][image_id]["shard"])
        features = tuple(handle.get_tensor(entry_name(image_id, view, f"level{j}")) for j in levels)
        boxes = handle.get_tensor(entry_name(image_id, view, "boxes"))
        masks = None
        if with_masks:
            masks = unpack_masks(handle.get_tensor(entry_name(image_id, view, "masks")), self.key["image_size"])
        return features, boxes, masks

    def text_tokens(self) -> torch.Tensor:
        """float [P, L, D]: the projected token embeddings of `prompts`, row by row."""
        return self._open(TEXT_FILE).get_tensor("tokens")

    def _open(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]
