"""Whether a COCO RLE segmentation decodes: its run lengths must be non-negative and cover exactly height x width.

A COCO RLE is `{"size": [height, width], "counts": ...}` over the mask in column-major order, alternating runs of
0s and 1s starting with 0s. `counts` is either a list of run lengths (uncompressed) or pycocotools' compressed
string. We read the compressed string ourselves because pycocotools exposes no way to get the run lengths back,
and its decoder does not check that they add up to height * width: a short RLE decodes into uninitialised memory
instead of failing (pycocotools 2.0.11), which would hand the trainer a random mask.
"""

from __future__ import annotations

from typing import Any

_ALPHABET_START = ord("0")  # each character carries 6 bits: char - '0' in 0..63
_MORE = 0x20  # the number continues in the next character
_SIGN = 0x10  # on the last character of a number: the number is negative
_PAYLOAD = 0x1F  # 5 bits of the number per character, least significant group first


def compressed_runs(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools `rleFrString`).

    Each number is a little-endian base-32 signed integer, 5 bits per character; from the 4th number on it is the
    difference to the number two places before (runs of the same value tend to have similar lengths).
    Raises ValueError on a character outside the alphabet or a string that ends inside a number.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for position, char in enumerate(counts):
        code = ord(char) - _ALPHABET_START
        if not 0 <= code < 64:
            raise ValueError(f"character {char!r} at position {position} is not a compressed RLE character ('0'..'o')")
        value |= (code & _PAYLOAD) << shift
        shift += 5
        if code & _MORE:
            continue
        if code & _SIGN:
            value -= 1 << shift  # two's complement over the bits read so far
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("the string ends in the middle of a number")
    return runs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rle_size(segmentation: dict[str, Any]) -> tuple[int, int] | None:
    """`(height, width)` of an RLE whose `size` is two non-negative integers, else None."""
    size = segmentation.get("size")
    if isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size):
        return size[0], size[1]
    return None


def rle_error(segmentation: dict[str, Any]) -> str | None:
    """Why the RLE `segmentation` does not decode, or None when it does."""
    size = rle_size(segmentation)
    if size is None:
        return f"size must be [height, width] (two integers >= 0), got {segmentation.get('size')!r}"
    counts = segmentation.get("counts")
    if isinstance(counts, str):
        try:
            runs = compressed_runs(counts)
        except ValueError as err:
            return f"compressed counts: {err}"
    elif isinstance(counts, list) and all(_is_int(v) for v in counts):
        runs = counts
    else:
        return "counts must be a compressed RLE string or a list of integer run lengths"
    negative = [i for i, run in enumerate(runs) if run < 0]
    if negative:
        return f"run {negative[0]} has negative length {runs[negative[0]]}"
    height, width = size
    if sum(runs) != height * width:
        return f"run lengths add up to {sum(runs)} pixels but size {height}x{width} has {height * width}"
    return None
