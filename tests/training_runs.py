"""Shared pieces of the trainer, engine and train-CLI tests: a small shapes dataset, a dropout-free tiny model,
trainer jobs with test-sized settings, and the worker of a 2-process gloo run.

Why dropout-free: the tiny model's DETR encoder and decoder use dropout 0.1 (as SAM 3 does), whose masks depend on
the layout of the batch. Equivalences such as batch 4 x 1 == batch 2 x 2, or 1 process == 2 processes, hold only
without it, so those tests train a tiny model whose config sets dropout 0, saved as a transformers folder (the same
path a user's own model folder takes).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Sam3Config, Sam3Model

from sam3.config import (
    AdapterConfig,
    DDPConfig,
    GuardConfig,
    LoopConfig,
    LossConfig,
    ModelOptions,
    OptimConfig,
    TrainJob,
)
from sam3.losses import Criterion
from sam3.model import tiny_config
from tests.datasets import build_shapes_dataset

IMAGE_SIZE = 112  # a multiple of the patch size 14; 4x fewer pixels than the tiny model's 224, so steps are fast
TRAIN_IMAGES = 8
# Larger than the recipe's rates, without warm-up, so three steps move the weights well beyond float round-off and
# equality checks between runs mean something.
TEST_OPTIM = OptimConfig(lr_detr=1e-3, lr_vision=1e-3, lr_text=1e-3, warmup=0, cooldown=0)


def build_small_shapes(out: Path, n: int = TRAIN_IMAGES) -> Path:
    """`n` training images of IMAGE_SIZE px (and 1 valid, 1 test) under `out`."""
    build_shapes_dataset(out, n=n, seed=0, image_size=IMAGE_SIZE, n_valid=1, n_test=1)
    return out


def dropout_free_tiny_config(image_size: int = IMAGE_SIZE) -> Sam3Config:
    """The tiny config at `image_size` with dropout 0 in every sub-config that has dropout."""
    config = tiny_config(image_size)
    for sub in (config.geometry_encoder_config, config.detr_encoder_config, config.detr_decoder_config):
        sub.dropout = 0.0
    return config


def save_dropout_free_tiny(folder: Path, image_size: int = IMAGE_SIZE, seed: int = 0) -> Path:
    """Random dropout-free tiny weights (from `seed`) written with save_pretrained: a model source for `TrainJob`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3Model(dropout_free_tiny_config(image_size))
    model.save_pretrained(folder)
    return folder


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights of a run (`run_dir/model`), as a name -> tensor dict."""
    return load_file(Path(model_dir) / "model.safetensors")


# Settings under which splitting a batch (over micro-batches or ranks) leaves the loss and gradients unchanged: no
# drop-path (its per-sample masks are drawn per forward, so they depend on the split) and no sqrt(queries) scale of
# the loss (the reference scales each forward by its own query count). The recipe's defaults have both.
SPLIT_INVARIANT = {"model": ModelOptions(drop_path=0.0), "loss": LossConfig(scale_by_sqrt_num_queries=False)}


def make_job(
    run_dir: Path,
    dataset: Path,
    model_source: str | Path = "tiny",
    optim: OptimConfig = TEST_OPTIM,
    guard: GuardConfig | None = None,
    model: ModelOptions | None = None,
    loss: LossConfig | None = None,
    ddp: DDPConfig | None = None,
    adapter: AdapterConfig | None = None,
    **loop: object,
) -> TrainJob:
    """A TrainJob at IMAGE_SIZE with test-sized loop settings; `loop` overrides LoopConfig fields; `model` and `loss`
    default to the recipe's (e.g. `**SPLIT_INVARIANT` for the batch-split equivalence tests)."""
    defaults = LoopConfig(max_steps=3, batch_size=2, checkpoint_every=100, keep_last=20, log_every=1)
    return TrainJob(
        run_dir=str(run_dir),
        dataset_dir=str(dataset),
        model_source=str(model_source),
        image_size=IMAGE_SIZE,
        loop=replace(defaults, **loop),
        optim=optim,
        guard=guard or GuardConfig(),
        model=model or ModelOptions(),
        loss=loss or LossConfig(),
        ddp=ddp or DDPConfig(),
        adapter=adapter or AdapterConfig(),
        params={"test": True},
    )


class NanOnCall(Criterion):
    """The real criterion, except that the calls numbered in `bad_calls` (from 1) return a NaN total loss.

    A stand-in for a diverging step at a chosen moment; `bad_calls=None` makes every call NaN.
    """

    def __init__(self, bad_calls: tuple[int, ...] | None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_calls, self.calls = bad_calls, 0

    def __call__(self, outputs, targets, num_boxes=None, num_queries=None):
        losses = super().__call__(outputs, targets, num_boxes, num_queries)
        self.calls += 1
        if self.bad_calls is None or self.calls in self.bad_calls:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def ddp_train_worker(rank: int, world_size: int, port: int, job: TrainJob, out_dir: str) -> None:
    """One rank of a gloo run (torch.multiprocessing.spawn target): train `job`, then save this rank's weights.

    The environment is what torchrun sets. `sam3.training.setup.load_model` is wrapped to keep a handle on the model the
    trainer builds (the real function runs), so each rank can write its final in-memory weights to
    `out_dir/rank{rank}.pt` and the test can compare the ranks with each other.
    """
    import sam3.trainer as trainer
    import sam3.training.setup as run_setup
    from sam3.distributed import shutdown

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # two ranks share the machine's cores
    built = []
    load_model = run_setup.load_model

    def keep_handle(*args, **kwargs):
        detector = load_model(*args, **kwargs)
        built.append(detector)
        return detector

    optimizers = []
    build_optimizer = run_setup.build_optimizer

    def keep_optimizer(*args, **kwargs):
        optimizers.append(build_optimizer(*args, **kwargs))
        return optimizers[-1]

    run_setup.load_model = keep_handle
    run_setup.build_optimizer = keep_optimizer
    try:
        trainer.train(job)
        state = {name: value.detach().clone() for name, value in built[0].model.state_dict().items()}
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
        # which optimiser the rank ran, and how many parameters' moments it holds itself (ZeRO: its shard)
        optimizer = optimizers[0]
        local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard's AdamW in .optim
        held = {"optimizer": type(optimizer).__name__, "local_states": len(local.state)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(held))
    finally:
        shutdown()
