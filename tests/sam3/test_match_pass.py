"""The matching pass of a step (`sam3.match_pass.match_layers`): the matches of each matcher called on its own, in
one host copy and one upload, with the target rows the losses gather from."""

from __future__ import annotations

import torch

from sam3.host_sync import count_host_syncs
from sam3.match_pass import match_layers
from sam3.matcher import HungarianMatcher
from sam3.o2m_matcher import OneToManyMatcher

CPU = torch.device("cpu")


def _layer(gen: torch.Generator, queries: int, preds: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(queries, preds, generator=gen) * 2, 0.2 + 0.5 * torch.rand(queries, preds, 4, generator=gen)


def test_every_layer_matched_as_alone_in_one_copy():
    """4 queries (one negative, one with 5 targets), 8 predictions, 3 Hungarian layers and one one-to-many layer:
    the same pairs as each matcher's own call, query and target rows consistent with them, one host copy."""
    gen = torch.Generator().manual_seed(0)
    sizes = [2, 0, 5, 1]
    targets = [{"boxes": 0.3 + 0.4 * torch.rand(n, 4, generator=gen)} for n in sizes]
    hungarian, o2m = HungarianMatcher(), OneToManyMatcher(topk=2, threshold=0.2)
    layers = [(hungarian, *_layer(gen, 4, 8)) for _ in range(3)] + [(o2m, *_layer(gen, 4, 8))]

    with count_host_syncs() as syncs:
        matched = match_layers(layers, targets, CPU)
    assert syncs.total == 1 and syncs.by_kind["host_copies"] == 1 and syncs.async_uploads == 1

    assert matched.has_target.tolist() == [True, False, True, True]
    all_boxes = torch.cat([t["boxes"] for t in targets])
    for (matcher, logits, boxes), got in zip(layers, matched.layers, strict=True):
        alone = matcher(logits, boxes, targets)
        assert got.counts == [len(pred) for pred, _ in alone]
        for (pred, tgt), (got_pred, got_tgt) in zip(alone, got.per_query(), strict=True):
            assert torch.equal(got_pred, pred) and torch.equal(got_tgt, tgt)
        assert got.query.tolist() == [q for q, n in enumerate(got.counts) for _ in range(n)]
        local = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, alone, strict=True)])
        assert torch.equal(all_boxes[got.target], local)
    assert matched.layers[0].counts == [2, 0, 5, 1]  # min(N, n_q): each target matched once, N = 8
    assert sum(matched.layers[3].counts) > 0


def test_nothing_to_match_copies_nothing():
    """Only negative prompts: no host copy at all, empty matches for every layer."""
    gen = torch.Generator().manual_seed(1)
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    layers = [(HungarianMatcher(), *_layer(gen, 2, 5)), (OneToManyMatcher(), *_layer(gen, 2, 5))]
    with count_host_syncs() as syncs:
        matched = match_layers(layers, targets, CPU)
    assert syncs.total == 0
    assert matched.has_target.tolist() == [False, False]
    for layer in matched.layers:
        assert layer.counts == [0, 0] and layer.query.numel() == layer.pred.numel() == layer.target.numel() == 0
