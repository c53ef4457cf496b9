"""The built-in bank of candidate negative phrases: object category names of three public detection vocabularies.

Files (one phrase per line, UTF-8, shipped as package data):
    coco.txt        the 80 COCO detection categories
    objects365.txt  the 365 Objects365 (v1) categories; a name listing alternatives ("cabinet/shelf") is written as
                    one phrase per alternative, and a repeat of an earlier line ("bread" of "bread/bun") is left out:
                    378 phrases
    lvis.txt        the 1,203 LVIS v1 categories, underscores written as spaces, the sense in parentheses kept
                    ("bat (animal)"), "monitor_(computer_equipment) computer_monitor" written "computer monitor"

`load_phrase_bank` joins the files in that order and keeps the first of phrases that are equal as the model reads
them (`sam3.tokenizer.clean_text`: lower case, whitespace collapsed); the number merged is logged.
"""

from __future__ import annotations

import importlib.resources
import logging
from functools import lru_cache

from sam3.errors import DataError
from sam3.tokenizer import clean_text

log = logging.getLogger(__name__)

BANK_FILES: tuple[str, ...] = ("coco.txt", "objects365.txt", "lvis.txt")


def read_phrase_file(name: str) -> list[str]:
    """The phrases of one bank file, in file order, surrounding whitespace stripped; blank lines are an error."""
    resource = importlib.resources.files(__package__) / name
    if not resource.is_file():
        raise DataError(f"phrase bank file {name!r} is missing from {__package__}; reinstall the project")
    phrases = []
    for number, line in enumerate(resource.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            raise DataError(f"{__package__}/{name}:{number}: blank line; the bank holds one phrase per line")
        phrases.append(line.strip())
    return phrases


@lru_cache(maxsize=4)
def load_phrase_bank(files: tuple[str, ...] = BANK_FILES) -> tuple[str, ...]:
    """Every phrase of `files`, in order, one per `clean_text` key (the first spelling kept). Cached per process."""
    phrases: dict[str, str] = {}
    total = 0
    for name in files:
        for phrase in read_phrase_file(name):
            total += 1
            phrases.setdefault(clean_text(phrase), phrase)
    log.debug(
        "phrase bank: %d phrases from %s (%d repeats merged)", len(phrases), ", ".join(files), total - len(phrases)
    )
    return tuple(phrases.values())
