"""An annotation file read with its annotations kept packed: each as its JSON text, decoded when it is looked at.

Parsed by `json.load`, a COCO file takes about five times its size in Python objects (a polygon coordinate is a
24-byte float plus an 8-byte list slot for about 7 bytes of text), and validation needs every record several times
over. Here the annotations (the bulk of any COCO file) stay text:

    read_packed(path) -> {"images": [...], "categories": [...], "annotations": PackedRecords, other keys: values}
    PackedRecords     a read-only sequence of the records: records[i] decodes item i (a fresh dict each time),
                      iteration decodes one item at a time, subset(indices) shares the texts
    write_packed(path, data)  writes `data` as `sam3.coco.save_coco` would (sorted keys, indent 1, newline at the
                      end: byte-identical), one record at a time, atomically

The file is scanned with the standard library's JSON decoder (`raw_decode`), value by value: the top-level object
is walked key by key, and the `annotations` array item by item, each item's text kept as UTF-8 bytes. Anything the
scan does not expect (not an object, a syntax error, a byte-order mark, invalid UTF-8) is handed to
`sam3.coco.load_coco`, whose error names the file, line and column; the scan never reports errors of its own.
Peak memory is the file's text once (1 to 4 bytes a character: Python stores a string at its widest character's
width) plus the packed items, instead of five copies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from sam3.coco import load_coco
from sam3.io import write_chunks

PACKED_KEY = "annotations"  # the one list worth packing: images and categories are small beside it
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


class PackedRecords(Sequence[Any]):
    """The items of a JSON array, each kept as its UTF-8 text and decoded on access."""

    def __init__(self, items: Iterable[bytes]) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> PackedRecords: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return PackedRecords(self._items[index])
        return json.loads(self._items[index])

    def __iter__(self) -> Iterator[Any]:
        for item in self._items:
            yield json.loads(item)

    def subset(self, indices: Iterable[int]) -> PackedRecords:
        """The items at `indices`, in that order, sharing their texts with this sequence."""
        return PackedRecords(self._items[i] for i in indices)

    def __eq__(self, other: object) -> bool:  # compares as the list it stands for
        if isinstance(other, PackedRecords | list):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-list semantics: not hashable

    def __repr__(self) -> str:
        return f"PackedRecords({len(self)} items)"


class _Unexpected(Exception):
    """The scan met something it does not handle; `load_coco` will say what is wrong."""


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _expect(text: str, pos: int, char: str) -> int:
    pos = _skip(text, pos)
    if pos >= len(text) or text[pos] != char:
        raise _Unexpected
    return pos + 1


def _decode(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        raise _Unexpected from None


def _packed_array(text: str, pos: int) -> tuple[PackedRecords, int]:
    """The array starting at text[pos] == "[" as packed items, and the position after its "]"."""
    pos, items = _skip(text, pos + 1), []
    if pos < len(text) and text[pos] == "]":
        return PackedRecords(items), pos + 1
    while True:
        start = _skip(text, pos)
        _, end = _decode(text, start)  # the value itself is dropped at once: only its text is kept
        items.append(text[start:end].encode("utf-8"))
        pos = _skip(text, end)
        if pos < len(text) and text[pos] == "]":
            return PackedRecords(items), pos + 1
        pos = _expect(text, pos, ",")


def _scan(text: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    pos = _expect(text, 0, "{")
    if _skip(text, pos) < len(text) and text[_skip(text, pos)] == "}":
        pos = _skip(text, pos) + 1
    else:
        while True:
            key, pos = _decode(text, _skip(text, pos))
            if not isinstance(key, str):
                raise _Unexpected
            pos = _skip(text, _expect(text, pos, ":"))
            if key == PACKED_KEY and text.startswith("[", pos):
                data[key], pos = _packed_array(text, pos)
            else:
                data[key], pos = _decode(text, pos)
            pos = _skip(text, pos)
            if text.startswith("}", pos):
                pos += 1
                break
            pos = _expect(text, pos, ",")
    if _skip(text, pos) != len(text):
        raise _Unexpected  # trailing data: json.load refuses it, and so does load_coco
    return data


def read_packed(path: str | Path) -> dict[str, Any]:
    """The COCO file at `path` with its `annotations` packed (module docstring); the same errors as `load_coco`.

    Every other value is decoded as `json.load` decodes it (NaN and Infinity included, a repeated key's last value
    kept), so the records compare equal to `load_coco(path)`'s.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors="strict") as file:
            text = file.read()
        if text.startswith("\ufeff"):
            raise _Unexpected  # load_coco explains the byte-order mark
        return _scan(text)
    except (_Unexpected, OSError, UnicodeDecodeError):
        return load_coco(path)  # raises its DataError; returns only if the scan was wrong to give up


def _dumps(value: Any, allow_nan: bool) -> str:
    return json.dumps(value, sort_keys=True, indent=1, allow_nan=allow_nan)


def _indented(text: str, spaces: int) -> str:
    """`text` (a json.dumps(..., indent=1) block) nested `spaces` levels deeper: every line after the first."""
    return text.replace("\n", "\n" + " " * spaces)


def _chunks(data: dict[str, Any], allow_nan: bool) -> Iterator[str]:
    """json.dumps(data, sort_keys=True, indent=1) + "\\n", in pieces, with PackedRecords written item by item."""
    if not data:
        yield "{}\n"
        return
    yield "{"
    for number, key in enumerate(sorted(data)):
        value = data[key]
        yield ("\n " if number == 0 else ",\n ") + json.dumps(key) + ": "
        if isinstance(value, PackedRecords):
            if not len(value):
                yield "[]"
                continue
            yield "["
            for position, record in enumerate(value):
                yield ("\n  " if position == 0 else ",\n  ") + _indented(_dumps(record, allow_nan), 2)
            yield "\n ]"
        else:
            yield _indented(_dumps(value, allow_nan), 1)
    yield "\n}\n"


def write_packed(path: str | Path, data: dict[str, Any], allow_nan: bool = False) -> None:
    """Write `data` exactly as `sam3.coco.save_coco(path, data, allow_nan)` would, with any PackedRecords value
    written one record at a time (never the whole file's text in memory); atomic (`<path>.tmp`, then renamed).
    NaN / Infinity raise ValueError unless `allow_nan`, as in save_coco; the temporary file is removed then."""
    write_chunks(path, _chunks(data, allow_nan))


def as_list(records: Sequence[Any]) -> list[Any]:
    """`records` as a plain list (decoding packed items): for code that needs them all at once."""
    return records if isinstance(records, list) else list(records)
