"""sam3.tokenizer gives the ids open_clip's reference CLIP tokenizer gives, offline, at context length 32."""

import time

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import Sam3Config

from sam3.tokenizer import END_ID, START_ID, _vocabulary, attention_mask, encode, tokenize

TEXTS = [
    "red circle",
    "a photo of a dog",
    "traffic light, stop sign & fire-hydrant!",
    "person's bag",
    "don't",
    "  Mixed   CASE\twith\nwhitespace  ",
    "caf\u00e9 na\u00efve \u65e5\u672c \U0001f600",  # accented letters, CJK, emoji (bytes outside the merges)
    "fish &amp; chips",  # HTML entity, unescaped before tokenising
    "3.5 kg of 1/2 apples",  # digits are single tokens
    "",
    '!"#',  # id 0 ("!") inside a word
    "one two three four five six seven eight nine ten " * 4,  # 40 words: truncated
]


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=32)


def test_ids_match_open_clip(reference: SimpleTokenizer) -> None:
    ours = tokenize(TEXTS)
    theirs = reference(TEXTS, context_length=32)
    assert ours.dtype == torch.long and ours.shape == (len(TEXTS), 32)
    assert torch.equal(ours, theirs)


def test_known_ids() -> None:
    # "red circle" -> start, "red</w>", "circle</w>", end, zero padding (ids from open_clip's vocabulary).
    ids = tokenize(["red circle"])[0]
    assert ids[:4].tolist() == [49406, 736, 7117, 49407]
    assert ids[4:].eq(0).all()
    # The empty string is just start and end.
    assert tokenize([""])[0, :3].tolist() == [49406, 49407, 0]


def test_truncation_keeps_end_token(reference: SimpleTokenizer) -> None:
    text = "one two three four five six seven eight nine ten " * 4
    assert len(encode(text)) == 40  # 40 words, one token each: 42 with start/end, more than 32
    ids = tokenize([text])[0]
    assert ids[0] == START_ID and ids[-1] == END_ID and ids.ne(0).all()
    assert ids[1:31].tolist() == encode(text)[:30]
    assert torch.equal(tokenize([text], context_length=8), reference([text], context_length=8))


def test_special_ids_match_sam3_text_config() -> None:
    vocab = _vocabulary()
    # 256 byte symbols + 256 with "</w>" + 48,894 merges + 2 special tokens = 49,408 distinct tokens.
    assert len(vocab.ids) == 49408 and len(vocab.merge_ranks) == 48894
    assert vocab.ids["<start_of_text>"] == START_ID and vocab.ids["<end_of_text>"] == END_ID
    text_config = Sam3Config().text_config
    assert (text_config.bos_token_id, text_config.eos_token_id) == (START_ID, END_ID) == (49406, 49407)
    assert text_config.vocab_size == 49408 and text_config.max_position_embeddings == 32


def test_attention_mask_counts_start_end_and_inner_zero_ids() -> None:
    ids = tokenize(["red circle", "", '!"#'])
    # '!"#' -> start, 0 ("!"), 8345 ('"#</w>'), end: the 0 is a real token and must stay in the mask.
    assert ids[2, :4].tolist() == [49406, 0, 8345, 49407]
    mask = attention_mask(ids)
    assert mask.dtype == torch.long
    assert mask.sum(dim=1).tolist() == [4, 2, 4]
    assert mask[0, :4].eq(1).all() and mask[0, 4:].eq(0).all()
    assert mask[2, 1] == 1


def test_attention_mask_rejects_rows_without_end() -> None:
    with pytest.raises(ValueError, match="end token"):
        attention_mask(torch.zeros(1, 32, dtype=torch.long))


def test_string_instead_of_list_is_rejected() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        tokenize("red circle")


def test_repeated_calls_are_cheap() -> None:
    tokenize(["warm up the vocabulary cache"])
    start = time.perf_counter()
    for _ in range(100):
        tokenize(["red circle", "blue square", "green triangle"])
    # 300 short prompts from cached merges: a few ms; reading the vocabulary each time would take seconds.
    assert time.perf_counter() - start < 1.0
