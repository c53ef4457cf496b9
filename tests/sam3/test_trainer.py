"""`sam3.trainer.train` end to end on the tiny model and a generated shapes dataset (CPU, fp32).

- batch 4 x accumulation 1 == batch 2 x accumulation 2: same logged losses, same exported weights
- a run resumed from a mid-epoch checkpoint ends with bitwise the weights of the uninterrupted run (dropout on)
- the export: `Sam3Model.from_pretrained(run_dir/model)` and `load_model` hold bitwise the in-memory weights and give
  its outputs (bitwise once the loaded tensors sit in freshly allocated memory); every checkpoint loads with
  weights_only=True
- each freeze mode: counts logged, frozen parameters without gradient, optimiser state or change
- a NaN loss at one step: rollback event logged, lr multiplied, training finishes
- (slow) 2 gloo processes at batch 2 == 1 process at batch 4, and both ranks hold the same weights
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import Sam3Model

import sam3.trainer as trainer
import sam3.training.setup as run_setup
from sam3.checkpoint import step_checkpoint_name
from sam3.config import AdapterConfig, DDPConfig, GuardConfig
from sam3.data import CocoPromptDataset, collate_prompts
from sam3.freeze import FREEZE_MODES
from sam3.model import Sam3Detector, load_model, parameters_without_text_gradients
from tests.training_runs import (
    IMAGE_SIZE,
    SPLIT_INVARIANT,
    TEST_OPTIM,
    NanOnCall,
    build_small_shapes,
    ddp_train_worker,
    make_job,
    read_weights,
    save_dropout_free_tiny,
)
from tests.weights import assert_same_weights


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> Path:
    return save_dropout_free_tiny(tmp_path_factory.mktemp("init"))


def _train_keeping_model(job, monkeypatch: pytest.MonkeyPatch) -> Sam3Detector:
    """Run `train(job)` and return the trainer's own in-memory model (the real `load_model`, wrapped to keep it)."""
    built = []

    def keep(*args, **kwargs):
        built.append(load_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(run_setup, "load_model", keep)
    trainer.train(job)
    return built[0]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "train_stats.jsonl").read_text().splitlines()]


def _step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(shapes, tmp_path_factory):
    """6 steps of the default tiny model (dropout on), checkpoints at steps 0, 3 (mid-epoch), 4 (epoch end), 6."""
    run_dir = tmp_path_factory.mktemp("reference")
    job = make_job(run_dir, shapes, max_steps=6, checkpoint_every=3)
    with pytest.MonkeyPatch.context() as monkeypatch:
        detector = _train_keeping_model(job, monkeypatch)
    return run_dir, detector.eval()


@pytest.fixture(scope="module")
def batch4_run(shapes, no_dropout_model, tmp_path_factory) -> Path:
    """3 steps at batch 4 of the dropout-free tiny model: the reference of the accumulation and DDP tests."""
    run_dir = tmp_path_factory.mktemp("batch4")
    trainer.train(make_job(run_dir, shapes, no_dropout_model, batch_size=4, accumulation=1, **SPLIT_INVARIANT))
    return run_dir


def _assert_same_training(run_dir: Path, reference_dir: Path, initial_dir: Path) -> None:
    """Same logged losses (rel 1e-5) and same exported weights as the reference run, which moved its weights."""
    losses, reference_losses = _step_losses(run_dir), _step_losses(reference_dir)
    assert list(losses) == list(reference_losses) == [1, 2, 3]
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    weights, reference, initial = (read_weights(d) for d in (run_dir / "model", reference_dir / "model", initial_dir))
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-3  # the weights moved
    # up to round-off (tolerances and why in tests/weights.py)
    assert_same_weights(((name, weights[name]) for name in reference), reference.items())


def test_trainer_accumulation_2_x_2_equals_batch_4(batch4_run, shapes, no_dropout_model, tmp_path):
    trainer.train(make_job(tmp_path, shapes, no_dropout_model, batch_size=2, accumulation=2, **SPLIT_INVARIANT))
    _assert_same_training(tmp_path, batch4_run, no_dropout_model)


def test_activation_checkpointing_and_compiled_vit_blocks_train_the_same(
    batch4_run, shapes, no_dropout_model, tmp_path, monkeypatch
):
    # the trainer compiles with inductor; aot_eager traces the same graphs without a C++ compiler
    from functools import partial

    from sam3.compiling import compile_vit_blocks

    monkeypatch.setattr(run_setup, "compile_vit_blocks", partial(compile_vit_blocks, backend="aot_eager"))
    job = make_job(
        tmp_path, shapes, no_dropout_model, batch_size=4, activation_checkpointing=True, compile=True, **SPLIT_INVARIANT
    )
    trainer.train(job)
    _assert_same_training(tmp_path, batch4_run, no_dropout_model)


def test_resume_from_a_mid_epoch_checkpoint_gives_bitwise_identical_weights(reference_run, shapes, tmp_path):
    reference_dir, _ = reference_run
    checkpoints = sorted(p.name for p in (reference_dir / "checkpoints").glob("step_*.pt"))
    assert checkpoints == [step_checkpoint_name(s) for s in (0, 3, 4, 6)]
    # a run that stopped after step 3, in the middle of epoch 0 (its 4th batch not yet seen)
    (tmp_path / "checkpoints").mkdir()
    for step in (0, 3):
        shutil.copy(reference_dir / "checkpoints" / step_checkpoint_name(step), tmp_path / "checkpoints")

    trainer.train(make_job(tmp_path, shapes, max_steps=6, checkpoint_every=3))

    assert list(_step_losses(tmp_path)) == [4, 5, 6]  # resumed at step 3: nothing done twice
    reference_losses = _step_losses(reference_dir)
    for step, loss in _step_losses(tmp_path).items():
        assert loss == reference_losses[step], step  # same batches, same dropout masks, same weights
    resumed, reference = read_weights(tmp_path / "model"), read_weights(reference_dir / "model")
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name


def _outputs_equal(ours: dict, theirs: dict, exact: bool) -> None:
    for key, value in ours.items():
        if exact:
            assert torch.equal(theirs[key], value), key
        else:
            torch.testing.assert_close(theirs[key], value, msg=key)  # float32 defaults: rtol 1.3e-6, atol 1e-5


def _realign(model: torch.nn.Module) -> None:
    """Copy every parameter into fresh memory. Weights read from safetensors can sit at addresses that are not
    64-byte aligned (measured: offsets 16, 32, 36, ...), which sends the CPU BLAS down another kernel path whose
    rounding differs by an ulp; freshly allocated tensors are aligned like the trained ones."""
    for param in model.parameters():
        param.data = param.data.clone()


def test_export_loads_with_transformers_and_gives_identical_outputs(reference_run, shapes):
    run_dir, trained = reference_run
    dataset = CocoPromptDataset(shapes, "valid", image_size=IMAGE_SIZE, train=False)
    batch = collate_prompts([dataset[0]])

    exported = Sam3Model.from_pretrained(run_dir / "model").eval()
    trained_state = trained.model.state_dict()
    assert exported.state_dict().keys() == trained_state.keys()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained_state[name]), name
    # transformers' own forward on one (image, prompt) pair
    inputs = {
        "pixel_values": batch.pixel_values,
        "input_ids": batch.input_ids[:1],
        "attention_mask": batch.attention_mask[:1],
    }
    keys = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits")
    with torch.no_grad():
        ours = {key: getattr(trained.model(**inputs), key) for key in keys}
        _outputs_equal(ours, {key: getattr(exported(**inputs), key) for key in keys}, exact=False)
        _realign(exported)
        _outputs_equal(ours, {key: getattr(exported(**inputs), key) for key in keys}, exact=True)

    # our adapter over the folder: every decoder layer, every query, masks included
    loaded = load_model(run_dir / "model")
    _realign(loaded)
    with torch.no_grad():
        ours, theirs = trained(batch, with_masks=True), loaded(batch, with_masks=True)
    assert len(ours["aux_outputs"]) == len(theirs["aux_outputs"]) == 1
    _outputs_equal(ours["aux_outputs"][0], theirs["aux_outputs"][0], exact=True)
    _outputs_equal({k: v for k, v in ours.items() if k != "aux_outputs"}, theirs, exact=True)


def test_every_checkpoint_loads_weights_only_and_the_last_holds_the_exported_weights(reference_run):
    run_dir, _ = reference_run
    files = sorted((run_dir / "checkpoints").glob("*.pt"))
    assert files
    for path in files:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert payload["train_state"]["step"] == int(path.stem.split("_")[1])
        assert payload["params"] == {"test": True}
    last = torch.load(files[-1], map_location="cpu", weights_only=True)
    exported = read_weights(run_dir / "model")
    assert last["train_state"]["step"] == 6
    assert last["model"].keys() <= exported.keys()  # what trains; the frozen rest is rebuilt from the model source
    for name, value in last["model"].items():
        assert torch.equal(exported[name], value), name


# What each mode freezes, by name prefix (sam3.freeze docs), on top of the parameters text prompts never reach.
FROZEN_PREFIXES = {
    "none": (),
    "vision": ("vision_encoder.",),
    "vision_text": ("vision_encoder.", "text_encoder.", "text_projection."),
    "heads": ("vision_encoder.", "text_encoder.", "text_projection.", "detr_encoder.", "geometry_encoder."),
}


@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_freeze_mode_trains_only_its_parts(mode, shapes, tmp_path, monkeypatch, caplog):
    assert set(FREEZE_MODES) == set(FROZEN_PREFIXES)
    initial = load_model("tiny", image_size=IMAGE_SIZE).model
    never_reached = set(parameters_without_text_gradients(initial, with_masks=False))
    frozen = {n for n, _ in initial.named_parameters() if n.startswith(FROZEN_PREFIXES[mode]) or n in never_reached}
    trainable = {n for n, _ in initial.named_parameters()} - frozen
    frozen_count = sum(p.numel() for n, p in initial.named_parameters() if n in frozen)
    trainable_count = sum(p.numel() for n, p in initial.named_parameters() if n in trainable)

    caplog.set_level("INFO", logger="sam3.training")
    detector = _train_keeping_model(make_job(tmp_path, shapes, max_steps=1, freeze=mode), monkeypatch)

    assert f"parameters: {trainable_count:,} trainable, {frozen_count:,} frozen (freeze={mode}," in caplog.text
    for name, param in detector.model.named_parameters():
        assert param.requires_grad == (name in trainable), name
        # autograd kept no gradient for a frozen parameter; a trainable one holds the last step's
        assert (param.grad is None) == (name in frozen), name
    # the optimiser holds exactly the trainable parameters, each with AdamW state after its step
    optimizer_state = torch.load(tmp_path / "checkpoints" / step_checkpoint_name(1), weights_only=True)["optimizer"]
    in_optimizer = [name for group in optimizer_state["param_groups"] for name in group["names"]]
    assert sorted(in_optimizer) == sorted(trainable)
    assert len(optimizer_state["state"]) == len(trainable)
    assert all(int(s["step"]) == 1 for s in optimizer_state["state"].values())
    # frozen weights unchanged, trainable ones moved
    before, after = initial.state_dict(), read_weights(tmp_path / "model")
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    changed = [name for name in trainable if not torch.equal(after[name], before[name])]
    assert len(changed) == len(trainable)


def _lr(step: int, multiplier: float = 1.0) -> float:
    """TEST_OPTIM's lr at optimiser step s: warm-up and cool-down off, so 1e-3 * sqrt(20 / (s + 20)) for s > 0."""
    assert TEST_OPTIM.warmup == 0 and TEST_OPTIM.cooldown == 0 and TEST_OPTIM.timescale == 20
    return multiplier * 1e-3 * (math.sqrt(20 / (step + 20)) if step > 0 else 1.0)


def test_nan_loss_rolls_back_to_the_last_checkpoint_lowers_the_lr_and_finishes(shapes, tmp_path, monkeypatch):
    # call 4 is optimiser step index 3 (the 4th step); the newest checkpoint then is step 2
    monkeypatch.setattr(run_setup, "Criterion", lambda *args, **kwargs: NanOnCall((4,), *args, **kwargs))
    trainer.train(make_job(tmp_path, shapes, max_steps=4, checkpoint_every=2))

    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 3, 4]
    first_3, event, replayed_3 = records[2:5]
    assert event["event"] == "rollback" and event["lr_multiplier"] == 0.5
    assert event["reason"] == "non-finite loss nan at step 3"
    # the replayed step starts from the step-2 weights again: same batch, same dropout, same loss, half the lr
    assert replayed_3["loss"] == first_3["loss"]
    # the lr logged with step record k is the one of optimiser step k - 1
    assert first_3["lr/detr"] == pytest.approx(_lr(2))  # 1e-3 * sqrt(20/22) = 9.5346e-4
    assert replayed_3["lr/detr"] == pytest.approx(_lr(2, 0.5))  # 4.7673e-4
    assert records[-1]["lr/detr"] == pytest.approx(_lr(3, 0.5))  # 0.5e-3 * sqrt(20/23) = 4.6625e-4
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    # finished and exported; the guard's count rides in the last checkpoint
    assert (tmp_path / "model" / "model.safetensors").is_file()
    final = torch.load(tmp_path / "checkpoints" / step_checkpoint_name(4), weights_only=True)
    assert final["train_state"]["guard"]["rollbacks"] == 1
    # the guard's window was rewound to the step-2 checkpoint's: it holds the losses of the steps the run kept
    # (1, 2, replayed 3, 4), not the undone first step 3 (its weights are gone; it would skew the spike test)
    kept = [records[0], records[1], replayed_3, records[5]]
    assert final["train_state"]["guard"]["history"] == pytest.approx([r["loss"] for r in kept], rel=1e-6)


def test_nan_after_the_rollback_budget_raises_divergence_error(shapes, tmp_path, monkeypatch):
    from sam3.guard import DivergenceError

    monkeypatch.setattr(run_setup, "Criterion", lambda *args, **kwargs: NanOnCall(None, *args, **kwargs))
    job = make_job(tmp_path, shapes, max_steps=4, guard=GuardConfig(max_rollbacks=2))
    with pytest.raises(DivergenceError, match=r"diverged again after 2 rollback\(s\)"):
        trainer.train(job)
    events = [r for r in _records(tmp_path) if r.get("event") == "rollback"]
    assert [e["lr_multiplier"] for e in events] == [0.5, 0.25]
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_two_gloo_processes_at_batch_2_equal_one_process_at_batch_4(batch4_run, shapes, no_dropout_model, tmp_path):
    two_job = make_job(tmp_path / "run", shapes, no_dropout_model, batch_size=2, **SPLIT_INVARIANT)
    mp.spawn(ddp_train_worker, args=(2, get_free_port(), two_job, str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), name  # DDP kept the ranks identical
    exported = read_weights(tmp_path / "run" / "model")  # written by rank 0
    assert exported.keys() == rank0.keys()
    for name, value in exported.items():
        assert torch.equal(rank0[name], value), name
    # rank 0 logs the all-reduced mean loss: the single process's loss of the same 4 images
    _assert_same_training(tmp_path / "run", batch4_run, no_dropout_model)


@pytest.mark.slow
def test_lora_on_two_gloo_processes_with_activation_checkpointing_equals_one_process(
    shapes, no_dropout_model, tmp_path
):
    """Adapters under DDP (and activation checkpointing): the same losses and merged weights as one process."""
    adapter = AdapterConfig(kind="lora", rank=4, parts=["vision_attention", "detr_encoder", "detr_decoder"], lr=1e-2)
    common = {"freeze": "heads", "adapter": adapter, **SPLIT_INVARIANT}
    trainer.train(make_job(tmp_path / "one", shapes, no_dropout_model, batch_size=4, **common))
    two_job = make_job(
        tmp_path / "run", shapes, no_dropout_model, batch_size=2, activation_checkpointing=True, **common
    )
    mp.spawn(ddp_train_worker, args=(2, get_free_port(), two_job, str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert any("lora_A" in name for name in rank0)
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), name
    losses, reference_losses = _step_losses(tmp_path / "run"), _step_losses(tmp_path / "one")
    assert list(losses) == list(reference_losses) == [1, 2, 3]
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    # A looser tolerance than tests/weights.py's: a LoRA A matrix's gradient is proportional to B, which is ~lr
    # after the first step, and AdamW divides it by sqrt(v), so the split batch's round-off grows to ~1e-4 in A at
    # adapter lr 1e-2 (measured 9.1e-5; batch 4 against 2 x 2 accumulation in one process differs as much)
    weights, reference = read_weights(tmp_path / "run" / "model"), read_weights(tmp_path / "one" / "model")
    initial = read_weights(no_dropout_model)
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-2  # the weights moved
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=5e-4, msg=name)


@pytest.mark.slow
def test_zero_sharded_optimizer_trains_as_ddp_and_checkpoints_the_whole_state(
    batch4_run, shapes, no_dropout_model, tmp_path
):
    """ddp.strategy zero: 2 gloo processes, each holding half of AdamW's moments, train as one process at batch 4
    (== DDP, the test above); the checkpoint holds the moments of every trainable parameter, gathered on rank 0."""
    zero_job = make_job(
        tmp_path / "run", shapes, no_dropout_model, batch_size=2, ddp=DDPConfig(strategy="zero"), **SPLIT_INVARIANT
    )
    mp.spawn(ddp_train_worker, args=(2, get_free_port(), zero_job, str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), name  # each rank's updated shard was broadcast to the other
    held = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [h["optimizer"] for h in held] == ["ZeroRedundancyOptimizer"] * 2
    _assert_same_training(tmp_path / "run", batch4_run, no_dropout_model)
    final = torch.load(tmp_path / "run" / "checkpoints" / step_checkpoint_name(3), weights_only=True)
    reference = torch.load(batch4_run / "checkpoints" / step_checkpoint_name(3), weights_only=True)
    assert len(final["optimizer"]["state"]) == len(reference["optimizer"]["state"]) > 0
    # each rank stepped only its shard: the two shards, disjoint, make up every trainable parameter
    assert sum(h["local_states"] for h in held) == len(reference["optimizer"]["state"])
    assert all(0 < h["local_states"] < len(reference["optimizer"]["state"]) for h in held)
    moments = sorted(v["exp_avg"].numel() for v in final["optimizer"]["state"].values())
    assert moments == sorted(v["exp_avg"].numel() for v in reference["optimizer"]["state"].values())


def test_checkpoints_written_in_the_training_thread_hold_the_same_state(batch4_run, shapes, no_dropout_model, tmp_path):
    """train.checkpoint_background false: the same files as the background writer's, written without its copy."""
    job = make_job(
        tmp_path, shapes, no_dropout_model, batch_size=4, accumulation=1, checkpoint_background=False, **SPLIT_INVARIANT
    )
    trainer.train(job)
    for step in (0, 3):
        ours = torch.load(tmp_path / "checkpoints" / step_checkpoint_name(step), weights_only=True)
        reference = torch.load(batch4_run / "checkpoints" / step_checkpoint_name(step), weights_only=True)
        assert ours["model"].keys() == reference["model"].keys()
        for name, value in reference["model"].items():
            assert torch.equal(ours["model"][name], value), (step, name)
        assert ours["train_state"] == reference["train_state"]


def test_changed_params_lists_only_run_defining_keys():
    from sam3.trainer import changed_params

    stored = {"train": {"seed": 0, "log_every": 10}, "optim": {"lr_detr": 8e-5}, "launcher": {"nodes": 1}}
    current = {"train": {"seed": 1, "log_every": 5}, "optim": {"lr_detr": 8e-5}, "launcher": {"nodes": 2}}
    # log_every is bookkeeping and launcher does not change the result: only the seed counts
    assert changed_params(stored, current) == ["train.seed: 0 -> 1"]
    # memory and speed switches compute the same values: a run resumes across them
    faster = {**stored, "train": {**stored["train"], "activation_checkpointing": True, "compile": True}}
    assert changed_params(stored, faster) == []
    # the run's length (resumed with the schedule recomputed), when to stop and what to export: resumed too
    other = {"max_steps": 80, "epochs": 3, "patience": 2, "export": "best"}
    assert changed_params(stored, {**stored, "train": {**stored["train"], **other}}) == []
    assert changed_params(stored, stored) == []


def test_rerun_with_other_params_starts_anew_and_sets_old_checkpoints_aside(shapes, tmp_path):
    """A DVC re-run after a param change must not resume the old run: 2 steps, then seed 1 -> a fresh run, and the
    first run's best checkpoint is set aside with its newest step checkpoint."""
    from dataclasses import asdict

    first = make_job(tmp_path, shapes, max_steps=2, checkpoint_every=1, val_every_epochs=1)
    first.params = {"train": asdict(first.loop)}
    trainer.train(first)  # validated at its last step: best.pt written
    best = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    second = make_job(tmp_path, shapes, max_steps=3, checkpoint_every=1, seed=1)
    second.params = {"train": asdict(second.loop)}
    trainer.train(second)
    steps = [r["step"] for r in _records(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3]  # the second run logged from step 1 again, it did not resume at 2
    # ... into a log of its own: the first run's was set aside, whole
    first_log = (tmp_path / "train_stats.superseded.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, first_log) if "loss" in r] == [1, 2]
    assert (tmp_path / "tensorboard.superseded").is_dir() and (tmp_path / "tensorboard").is_dir()
    assert (tmp_path / "checkpoints" / "superseded.pt").is_file()
    assert (tmp_path / "checkpoints" / "superseded_best.pt").read_bytes() == best
    assert not (tmp_path / "checkpoints" / "best.pt").exists()  # no validation in the second run: no best of its own
    # same params: a third call resumes at 3 = max_steps and trains nothing more
    trainer.train(second)
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == steps


def test_validation_every_epoch_and_val_mode(shapes, tmp_path):
    """val_every_epochs=1: box AP on the valid split is logged at each epoch end (8 images / batch 2 = 4 steps);
    mode "val" evaluates the same run's model without training and writes val_metrics.json."""
    job = make_job(tmp_path, shapes, max_steps=8, val_every_epochs=1)
    trainer.train(job)
    validated = [r for r in _records(tmp_path) if "val/bbox_AP" in r]
    assert [r["step"] for r in validated] == [4, 8]
    assert all(0.0 <= r["val/bbox_AP"] <= 1.0 for r in validated)
    losses_before = len([r for r in _records(tmp_path) if "loss" in r])
    metrics_path = trainer.train(make_job(tmp_path, shapes, max_steps=8, mode="val"))
    metrics = json.loads(metrics_path.read_text())
    assert {"bbox_AP", "bbox_AP50", "cgF1"} <= set(metrics)
    assert len([r for r in _records(tmp_path) if "loss" in r]) == losses_before  # nothing trained


def test_wandb_without_the_package_is_a_clear_error(shapes, tmp_path):
    from sam3.errors import ConfigError

    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="pip install wandb"):
        trainer.train(make_job(tmp_path, shapes, max_steps=1, wandb_project="sam3"))
