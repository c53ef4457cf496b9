"""Prompt embeddings from the model's own text encoder, for similarity between phrases.

Hard negatives are phrases the model could confuse with a category, so "close" is measured where the model reads
text: SAM 3's text tower followed by its projection to the DETR width (`Sam3Detector.encode_prompts`), not some
other embedding model. One vector per phrase:

    t        float [P, L, D]   projected token features of P phrases (L = 32 tokens)
    m        bool  [P, L]      attention mask (start token, the phrase's tokens, end token)
    e_p    = sum_l m_pl t_pl / sum_l m_pl          mean over the phrase's real tokens, padding left out
    ê_p    = e_p / ||e_p||_2                        L2-normalised, float [P, D]
    sim_pq = ê_p . ê_q                              cosine similarity in [-1, 1]

`PhraseEmbedder` binds one model and keeps every phrase's vector in memory, so a bank of a few thousand phrases is
encoded once per model and process however many images ask for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sam3.model import Sam3Detector
from sam3.tokenizer import attention_mask, tokenize

DEFAULT_BATCH_SIZE = 256  # phrases per text-encoder call: bounds memory for the full 24-layer tower


def mean_pooled(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, L2-normalised: float [P, L, D] and bool [P, L] -> float [P, D] (formula above)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # [P, L, 1]
    summed = (tokens * weights).sum(dim=1)  # [P, D]
    counts = weights.sum(dim=1).clamp_min(1.0)  # [P, 1]; every tokenized row has >= 2 real tokens anyway
    return torch.nn.functional.normalize(summed / counts, dim=-1)


@torch.no_grad()
def prompt_embeddings(
    model: Sam3Detector, phrases: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """float32 [len(phrases), D] unit vectors of `phrases` on the CPU, D = the model's DETR width."""
    if isinstance(phrases, str):
        raise TypeError(f"prompt_embeddings takes a list of phrases; got the string {phrases!r}: wrap it as a list")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(phrases), batch_size):
        ids = tokenize(list(phrases[start : start + batch_size]))
        features = model.encode_prompts(ids.to(device), attention_mask(ids).to(device))
        chunks.append(mean_pooled(features.tokens.float(), features.mask).cpu())
    if not chunks:
        return torch.zeros(0, model.config.detr_decoder_config.hidden_size)
    return torch.cat(chunks)


class PhraseEmbedder:
    """`prompt_embeddings` of one model with an in-memory cache keyed by phrase text.

    `embed(phrases)` encodes only the phrases it has not seen and returns float [n, D] rows in the order asked.
    """

    def __init__(self, model: Sam3Detector, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.model = model
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, phrases: Sequence[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(phrases) if p not in self._cache]
        if new:
            for phrase, vector in zip(new, prompt_embeddings(self.model, new, self.batch_size), strict=True):
                self._cache[phrase] = vector
        if not phrases:
            return torch.zeros(0, self.model.config.detr_decoder_config.hidden_size)
        return torch.stack([self._cache[p] for p in phrases])

    def similarity(self, rows: Sequence[str], columns: Sequence[str]) -> torch.Tensor:
        """Cosine similarity float [len(rows), len(columns)] between two lists of phrases."""
        return self.embed(rows) @ self.embed(columns).T
