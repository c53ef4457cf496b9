"""Offline CLIP byte-pair-encoding tokenizer for SAM 3 text prompts.

SAM 3's text tower is CLIP's, so prompts are tokenised exactly as CLIP does it (ids identical to
`open_clip.tokenize(texts, context_length=32)`), from the vocabulary file `bpe_simple_vocab_16e6.txt.gz` that the
`open_clip_torch` package ships. Nothing is downloaded.

Steps for one text:
    1. clean: ftfy fixes broken unicode, HTML entities are unescaped (twice, as CLIP does), runs of whitespace
       become one space, then lower-case;
    2. split into words with CLIP's pattern: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single
       digits, runs of other non-space characters;
    3. each word's UTF-8 bytes become printable unicode symbols (one per byte), the last symbol gets the
       end-of-word mark "</w>", and the ranked merges join adjacent symbols, lowest rank first, until none applies;
    4. ids = [START] + symbols' ids + [END], truncated to the context length with END kept last, padded with 0.

Vocabulary: 256 byte symbols + 256 byte symbols with "</w>" + 48,894 merges + 2 special tokens = 49,408,
so START = 49406 and END = 49407, the bos/eos ids of transformers' Sam3 text config.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import itertools
from dataclasses import dataclass
from functools import lru_cache

import ftfy
import regex
import torch

CONTEXT_LENGTH = 32  # SAM 3's text tower has 32 position embeddings
VOCAB_PACKAGE = "open_clip"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48_894  # merges CLIP uses: the file's lines 1..48894 (line 0 is a version header)
START_TEXT = "<start_of_text>"
END_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
START_ID = 49_406
END_ID = 49_407
PAD_ID = 0

# CLIP's word pattern. The special tokens come first so that they stay whole; \p{L} / \p{N} are unicode letter and
# number classes, which is why this uses the `regex` package rather than `re`.
_WORD_PATTERN = regex.compile(
    rf"""{START_TEXT}|{END_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+""",
    regex.IGNORECASE,
)


def _byte_symbols() -> dict[int, str]:
    """One printable unicode character per byte value, in CLIP's vocabulary order.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and come first; the other 68
    bytes (controls, space, soft hyphen) follow in byte order as the characters 256, 257, ..., so that the merges
    never see whitespace or control characters. The dict's order is the order of the first 256 token ids
    (so "!" is id 0), its keys are byte values.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + n) for n, b in enumerate(others)})
    return symbols


@dataclass(frozen=True)
class _Vocabulary:
    byte_symbols: list[str]  # [256] symbol of each byte value (index = byte)
    ids: dict[str, int]  # symbol (or merged symbol) -> token id
    merge_ranks: dict[tuple[str, str], int]  # pair of adjacent symbols -> priority (lower merges first)


@lru_cache(maxsize=1)
def _vocabulary() -> _Vocabulary:
    """Read the merges from open_clip's vocabulary file once per process."""
    path = importlib.resources.files(VOCAB_PACKAGE) / VOCAB_FILE
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = _byte_symbols()
    # Token order defines the ids: byte symbols, the same ending a word, merges in rank order, the special tokens.
    in_vocab_order = list(symbols.values())
    tokens = in_vocab_order + [s + END_OF_WORD for s in in_vocab_order] + ["".join(m) for m in merges]
    tokens += [START_TEXT, END_TEXT]
    return _Vocabulary(
        byte_symbols=[symbols[b] for b in range(256)],
        ids={token: i for i, token in enumerate(tokens)},
        merge_ranks={pair: rank for rank, pair in enumerate(merges)},
    )


@lru_cache(maxsize=65_536)
def _merge_word(word: str) -> tuple[str, ...]:
    """Byte-pair-merge one word (already in byte symbols) into vocabulary tokens.

    Repeatedly takes the adjacent pair with the lowest merge rank and joins every occurrence of it, left to right
    without overlap, until no adjacent pair has a rank. Cached: prompts repeat the same few words.
    """
    if word in (START_TEXT, END_TEXT):
        return (word,)
    ranks = _vocabulary().merge_ranks
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        best = min(itertools.pairwise(symbols), key=lambda pair: ranks.get(pair, NUM_MERGES))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return tuple(symbols)


def clean_text(text: str) -> str:
    """CLIP's cleanup: fix mojibake, unescape HTML entities, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def encode(text: str) -> list[int]:
    """Token ids of `text` without the start/end tokens."""
    vocab = _vocabulary()
    ids: list[int] = []
    for word in _WORD_PATTERN.findall(clean_text(text)):
        symbols = "".join(vocab.byte_symbols[b] for b in word.encode("utf-8"))
        ids.extend(vocab.ids[token] for token in _merge_word(symbols))
    return ids


def tokenize(texts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP token ids of each text, long [n, context_length].

    Row = [START, ids..., END, 0, 0, ...]; a text too long for the context keeps its first context_length - 1
    tokens and ends with END (so the text tower still sees a complete sequence).
    """
    if isinstance(texts, str):
        raise TypeError(f"tokenize takes a list of strings; got the string {texts!r}: wrap it as [{texts!r}]")
    if context_length < 2:
        raise ValueError(f"context_length must hold the start and end tokens (>= 2), got {context_length}")
    result = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [START_ID, *encode(text)][: context_length - 1] + [END_ID]
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


def attention_mask(ids: torch.Tensor) -> torch.Tensor:
    """1 for the tokens of each row up to and including its END token, 0 for the padding after it; long [n, L].

    Found from the END position rather than `ids != 0`, because id 0 is also a real token ("!" inside a word
    such as '!"#').
    """
    is_end = ids == END_ID
    if not bool(is_end.any(dim=1).all()):
        raise ValueError("every row of ids must contain the end token 49407 (make them with sam3.tokenizer.tokenize)")
    end_position = is_end.long().argmax(dim=1, keepdim=True)  # first END per row, [n, 1]
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # [1, L]
    return (positions <= end_position).long()


def vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """The vocabulary as a BPE tokenizer file holds it (transformers' CLIPTokenizer: vocab.json + merges.txt).

    tokens  [49,408] token strings in id order: 256 byte symbols, the same with "</w>", the 48,894 merges joined,
            START_TEXT, END_TEXT (open_clip's names of the special tokens; OpenAI's CLIP calls them
            <|startoftext|> and <|endoftext|>)
    merges  [48,894] pairs of symbols in rank order (the first merges first)
    """
    vocab = _vocabulary()
    return list(vocab.ids), list(vocab.merge_ranks)  # dicts keep insertion order: id order, rank order
