"""The host-sync counter (`sam3.host_sync`) on hand-built cases, and the training step's own syncs counted.

- Each kind counts what it says: `float(t)` one scalar read, `t.nonzero()` and `t[mask]` one data-dependent shape,
  `to_host(a, b)` one host copy (with the values back bitwise, whatever the dtypes), `to_device` no sync but one
  async upload; pure tensor math none; a sync in a backward is attributed to "backward".
- The criterion matches every decoder layer with one host copy; a whole optimiser step of the real tiny SAM 3 makes
  two syncs of our own (the matching copy and the loss / finite read), whatever transformers' modules make.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Sam3Model

from sam3.data import CocoPromptDataset, collate_prompts
from sam3.engine import train_step
from sam3.host_sync import count_host_syncs, to_device, to_host
from sam3.losses import Criterion
from sam3.matcher import HungarianMatcher
from sam3.model import Sam3Detector
from sam3.optim import build_optimizer
from tests.training_runs import IMAGE_SIZE, TEST_OPTIM, build_small_shapes, dropout_free_tiny_config

CPU = torch.device("cpu")


def _kinds(syncs) -> dict[str, int]:
    return {kind: n for kind, n in syncs.by_kind.items() if n}


def _ours(syncs) -> dict[str, int]:
    """Our syncs per "kind file" (sites without their line numbers)."""
    counts: dict[str, int] = {}
    for site, n in syncs.sites.items():
        kind, origin, where = site.split(" ")
        if origin == "ours":
            key = f"{kind} {where.rsplit(':', 1)[0]}"
            counts[key] = counts.get(key, 0) + n
    return counts


@pytest.mark.parametrize(
    "read", [lambda t: float(t[0]), lambda t: bool(t[0] > 1), lambda t: int(t[1]), lambda t: t.sum().item()]
)
def test_a_scalar_read_counts_one(read):
    t = torch.tensor([1.0, 2.0])
    with count_host_syncs() as syncs:
        read(t)
    assert syncs.total == 1 and _kinds(syncs) == {"scalar_reads": 1}


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t.nonzero(),
        lambda t: t[t > 1],
        lambda t: torch.masked_select(t, t > 1),
        lambda t: torch.unique(t),
        lambda t: torch.repeat_interleave(torch.tensor([1, 2])),
    ],
)
def test_a_data_dependent_shape_counts_one(op):
    t = torch.tensor([1.0, 2.0, 3.0])
    with count_host_syncs() as syncs:
        op(t)
    assert _kinds(syncs).get("data_dependent_shapes") == 1


def test_to_host_is_one_copy_with_the_values_bitwise():
    a = torch.tensor([[1.5, float("nan")], [float("inf"), -0.0]], dtype=torch.float64)
    b = torch.arange(5)
    c = torch.tensor([True, False, True])
    d = torch.tensor(3.25, dtype=torch.float16)  # 0-dim, 2 bytes: the next piece still starts aligned
    e = torch.zeros(0, 4)
    f = torch.randn(3, 4)[:, ::2]  # not contiguous
    with count_host_syncs() as syncs:
        out = to_host(a, b, c, d, e, f)
    assert syncs.total == 1 and _kinds(syncs) == {"host_copies": 1}
    assert syncs.by_origin["other"] == 1  # this test file is neither the project's code nor transformers'
    for before, after in zip((a, b, c, d, e, f), out, strict=True):
        assert after.device.type == "cpu" and after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(after.view(-1).view(torch.uint8), before.contiguous().view(-1).view(torch.uint8))
        assert after.numel() == 0 or after.untyped_storage().data_ptr() != before.untyped_storage().data_ptr()


def test_to_device_is_one_async_upload_and_no_sync():
    rows = np.arange(6, dtype=np.int64).reshape(2, 3)
    flags = torch.tensor([True, False])
    with count_host_syncs() as syncs:
        got_rows, got_flags = to_device([rows, flags], CPU)
    assert syncs.total == 0 and syncs.async_uploads == 1
    assert got_rows.tolist() == [[0, 1, 2], [3, 4, 5]] and got_flags.tolist() == [True, False]


def test_pure_tensor_math_counts_nothing():
    x = torch.randn(4, 5, requires_grad=True)
    idx = torch.tensor([0, 2])
    with count_host_syncs() as syncs:
        y = (x @ x.T).sigmoid()
        z = torch.where(y > 0.5, y, 0.0)[idx].sum() + torch.full((), 2.0)
        z.backward()
    assert syncs.total == 0 and syncs.async_uploads == 0


def test_syncs_are_attributed_to_the_backward_and_to_our_code():
    x = torch.randn(6, requires_grad=True)
    with count_host_syncs() as syncs:
        x[x > 0].sum().backward()  # boolean-mask indexing: one in the forward, one in its backward
    assert syncs.by_kind["data_dependent_shapes"] == 2 and syncs.by_origin["backward"] == 1

    box = [0.5, 0.5, 0.2, 0.2]
    with count_host_syncs() as syncs:
        HungarianMatcher()(torch.zeros(1, 2), torch.tensor([[box, box]]), [{"boxes": torch.tensor([box])}])
    # the matches come back as CPU tensors made from numpy: on a CPU run that is counted as the stand-in for an upload
    assert syncs.by_kind["host_copies"] == 1 and _ours(syncs)["host_copies sam3/matcher.py"] == 1


def test_counters_nest():
    t = torch.tensor([1.0, 2.0])
    with count_host_syncs() as outer:
        float(t[0])
        with count_host_syncs() as inner:
            to_host(t)
    assert inner.total == 1 and outer.total == 2


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = build_small_shapes(tmp_path_factory.mktemp("shapes"), n=2)
    dataset = CocoPromptDataset(out, "train", image_size=IMAGE_SIZE, train=False)
    return [dataset[i] for i in range(2)]


def test_the_criterion_matches_every_layer_with_one_host_copy(samples):
    """The tiny model has 2 decoder layers, each with its o2m half: 4 prediction sets matched, 1 copy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = Sam3Detector(Sam3Model(dropout_free_tiny_config()), one_to_many=True).train()
    batch = collate_prompts(samples)
    assert batch.num_target_boxes > 0
    outputs = detector(batch)
    assert len(outputs["aux_outputs"]) == 1 and "pred_logits_o2m" in outputs
    with count_host_syncs() as syncs:
        Criterion()(outputs, batch.targets)
    assert syncs.total == 1 and _kinds(syncs) == {"host_copies": 1} and syncs.async_uploads == 1


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_training_step_makes_two_syncs_of_our_own(samples, accumulation):
    """One copy per micro-batch for the matching plus one read of the loss and finite flag per step: 2 at
    accumulation 1. What transformers' own modules do (attention-mask checks, a torch.arange on a tensor bound) is
    counted apart; none of it is in a backward."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = Sam3Detector(Sam3Model(dropout_free_tiny_config()), one_to_many=True).train()
    optimizer = build_optimizer(
        detector.model, TEST_OPTIM, detector.config.vision_config.backbone_config.num_hidden_layers
    )
    micro = [collate_prompts(samples)] if accumulation == 1 else [collate_prompts([s]) for s in samples]
    with count_host_syncs() as syncs:
        result = train_step(detector, Criterion(), optimizer, micro, device=CPU)
        float(result.mean_loss)  # the guard's read: a float already
    assert result.finite
    assert _ours(syncs) == {"host_copies sam3/match_pass.py": accumulation, "host_copies sam3/engine.py": 1}
    assert syncs.by_origin["ours"] == accumulation + 1 and syncs.by_origin["backward"] == 0
    assert syncs.by_origin["transformers"] > 0  # theirs, not ours to change: counted, but apart
