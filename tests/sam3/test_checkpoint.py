"""Checkpoints: round trip of every state, weights_only files, skipping damaged files, rotation, SIGKILL safety."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sam3.checkpoint import (
    CheckpointError,
    TrainState,
    epoch_checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_checkpoint_name,
)
from sam3.errors import Sam3Error

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"train": {"lr_detr": 8e-5, "epochs": 2, "freeze": "vision", "sizes": [1008, 1008]}, "seed": 7}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm brings buffers (running stats, num_batches_tracked) into the state_dict
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.AdamW]:
    """A model after two AdamW steps, so the optimizer holds moments and a step count."""
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _save(folder, step, model, optimizer, **kwargs):
    state = TrainState(step=step, epoch=step // 10)
    return save_checkpoint(folder, step, model, optimizer, None, None, state, PARAMS, **kwargs)


def _draws():
    return torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]


def test_round_trip_restores_weights_optimizer_counters_and_rng(tmp_path):
    model, optimizer = _trained(seed=0)
    state = TrainState(
        step=12,
        epoch=1,
        epoch_step=2,
        best_metric=0.25,
        best_step=8,
        validations_since_best=1,
        total_steps=40,
        guard={"history": [1.0], "rollbacks": 0},
    )
    scheduler_state = {"last_step": 12, "total": 100}
    path = save_checkpoint(tmp_path, 12, model, optimizer, scheduler_state, None, state, PARAMS)
    assert path == tmp_path / "step_00000012.pt"
    expected_draws = _draws()  # what the run would have drawn next

    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # a fresh process seeds differently
    fresh, fresh_optimizer = _trained(seed=1)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    loaded_state, loaded_scheduler, loaded_params = load_checkpoint(path, fresh, fresh_optimizer)

    for (name, tensor), fresh_tensor in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(tensor, fresh_tensor), name
    saved_opt, loaded_opt = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    for index, moments in saved_opt["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded_opt["state"][index][key], moments[key]), (index, key)
    assert loaded_state == state
    assert loaded_scheduler == scheduler_state
    assert loaded_params == PARAMS

    torch_draw, numpy_draw, python_draw = _draws()
    assert torch.equal(torch_draw, expected_draws[0])
    np.testing.assert_array_equal(numpy_draw, expected_draws[1])
    assert python_draw == expected_draws[2]


def test_numpy_gaussian_cache_survives(tmp_path):
    # numpy's legacy normal() draws pairs and caches the second one: that cache is part of the state
    model, optimizer = _trained()
    np.random.seed(3)
    np.random.normal()  # leaves has_gauss = 1
    path = _save(tmp_path, 1, model, optimizer)
    expected = np.random.normal()
    np.random.seed(4)
    load_checkpoint(path, model, optimizer)
    assert np.random.normal() == expected


def test_restore_rng_false_leaves_generators_alone(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    load_checkpoint(path, model, optimizer, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_file_loads_with_weights_only_and_holds_plain_values(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, 3, model, optimizer)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "sam3-finetune-checkpoint"
    assert payload["train_state"] == {
        "step": 3,
        "epoch": 0,
        "epoch_step": 0,
        "best_metric": None,
        "best_step": None,
        "validations_since_best": 0,
        "total_steps": None,
        "guard": {},
    }
    assert payload["params"] == PARAMS
    assert payload["scaler"] is None
    assert set(payload["model"]) == set(model.state_dict())
    python_rng = payload["rng"]["python"]
    assert python_rng[0] == 3 and len(python_rng[1]) == 625  # version 3, 624 Mersenne words + position
    assert payload["rng"]["numpy"]["key"].shape == (624,)
    assert payload["rng"]["torch"].dtype == torch.uint8


def test_a_weights_only_checkpoint_is_exported_not_resumed(tmp_path):
    model, optimizer = _trained()
    state = TrainState(step=4, best_metric=0.5, best_step=4)
    path = save_checkpoint(tmp_path, 4, model, None, None, None, state, PARAMS, name="best.pt")
    assert torch.load(path, weights_only=True)["optimizer"] is None
    fresh, fresh_optimizer = _trained(seed=1)
    with pytest.raises(CheckpointError, match=r"best.pt holds weights only, no optimiser state .* resume from a step"):
        load_checkpoint(path, fresh, fresh_optimizer)
    loaded, _, _ = load_checkpoint(path, fresh)  # the weights alone
    assert loaded == state
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_train_state_saved_before_the_validation_counters_loads_with_their_defaults(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, 3, model, optimizer)
    payload = torch.load(path, weights_only=True)
    payload["train_state"] = {"step": 3, "epoch": 0, "epoch_step": 3, "best_metric": 0.5, "guard": {}}  # as of old
    torch.save(payload, path)
    state, _, _ = load_checkpoint(path, model, optimizer)
    assert state == TrainState(step=3, epoch_step=3, best_metric=0.5, best_step=None, validations_since_best=0)
    assert state.total_steps is None  # unknown: a resumed run then says nothing about a changed length


def test_non_plain_value_is_refused_before_anything_is_written(tmp_path):
    model, optimizer = _trained()
    # numpy.float64 is a float subclass, Path a plain object: weights_only loading refuses both
    for bad, text in [(np.float64(1e-4), "numpy.float64"), (Path("data"), "pathlib.*Path")]:
        params = {"train": {"lr": [1.0, bad]}}
        with pytest.raises(TypeError, match=rf"params'\]\['train'\]\['lr'\]\[1\] is a {text}"):
            save_checkpoint(tmp_path, 1, model, optimizer, None, None, TrainState(step=1), params)
    assert list(tmp_path.iterdir()) == []


def test_grad_scaler_state_round_trip(tmp_path):
    model, optimizer = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    path = save_checkpoint(tmp_path, 1, model, optimizer, None, scaler, TrainState(step=1), PARAMS)
    fresh = torch.amp.GradScaler("cpu")
    assert fresh.state_dict()["scale"] == 65536.0
    load_checkpoint(path, model, optimizer, scaler=fresh)
    assert fresh.state_dict()["scale"] == 1024.0
    assert fresh.state_dict()["growth_interval"] == 7


def test_disabled_scaler_is_stored_as_none_and_enabled_scaler_starts_fresh(tmp_path, caplog):
    model, optimizer = _trained()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    path = save_checkpoint(tmp_path, 1, model, optimizer, None, disabled, TrainState(step=1), PARAMS)
    assert torch.load(path, weights_only=True)["scaler"] is None
    fresh = torch.amp.GradScaler("cpu")
    with caplog.at_level(logging.INFO, logger="sam3.checkpoint"):
        load_checkpoint(path, model, optimizer, scaler=fresh)
    assert fresh.state_dict()["scale"] == 65536.0
    assert "holds no GradScaler state" in caplog.text


def _check_bare_keys(tmp_path, model, optimizer, wrapped):
    path = _save(tmp_path, 1, wrapped, optimizer)
    assert set(torch.load(path, weights_only=True)["model"]) == set(model.state_dict())  # no "module." prefix
    fresh = _model(seed=1)
    load_checkpoint(path, nn.DataParallel(fresh))
    assert torch.equal(fresh[3].weight, model[3].weight)


def test_data_parallel_model_saves_bare_keys_and_loads_either_way(tmp_path):
    model, optimizer = _trained()
    _check_bare_keys(tmp_path, model, optimizer, nn.DataParallel(model))  # on CPU it just calls the module


@pytest.mark.slow  # importing the compiler takes seconds
def test_compiled_model_saves_bare_keys(tmp_path):
    model, optimizer = _trained()
    _check_bare_keys(tmp_path, model, optimizer, torch.compile(model))  # no compilation without a forward call


def test_truncated_newest_file_is_skipped_with_a_warning(tmp_path, caplog):
    model, optimizer = _trained()
    older = _save(tmp_path, 1, model, optimizer)
    newest = _save(tmp_path, 2, model, optimizer)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="sam3.checkpoint"):
        assert latest_checkpoint(tmp_path) == older
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_00000002.pt" in warnings[0].getMessage()
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(newest, model, optimizer)


def _flip_middle(path: Path, count: int = 64) -> bytes:
    """Overwrite `count` bytes in the middle of the file with 0xFF (a float32 NaN pattern), size kept; the bytes."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return bytes(data)


def _non_finite(value) -> bool:
    """Whether a loaded checkpoint holds a non-finite floating-point value anywhere."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return any(_non_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(item) for item in value)
    return False


def test_bytes_changed_in_the_middle_load_but_are_caught_and_the_file_set_aside(tmp_path, caplog):
    model, optimizer = _trained()
    older = _save(tmp_path, 1, model, optimizer)
    newest = _save(tmp_path, 2, model, optimizer)
    size = newest.stat().st_size
    damaged = _flip_middle(newest)
    assert newest.stat().st_size == size
    assert torch.load(newest, weights_only=True)["format"] == "sam3-finetune-checkpoint"  # the danger: no error

    with caplog.at_level(logging.WARNING, logger="sam3.checkpoint"):
        assert latest_checkpoint(tmp_path) == older  # a plain query skips it and leaves it in place
        assert newest.read_bytes() == damaged
        assert latest_checkpoint(tmp_path, set_aside_damaged=True) == older
    moved = tmp_path / "corrupt" / "step_00000002.pt"
    assert not newest.exists() and moved.read_bytes() == damaged  # set aside, never deleted
    assert len(caplog.records) == 2
    assert all("step_00000002.pt, damaged: Bad CRC-32 for file 'archive/data/" in r.message for r in caplog.records)
    assert caplog.records[1].message.endswith(f"moved it to {moved}")
    state, _, _ = load_checkpoint(older, *_trained(seed=1))
    assert state.step == 1


def test_a_truncated_file_is_set_aside_and_a_second_one_of_that_name_is_numbered(tmp_path, caplog):
    model, optimizer = _trained()
    older = _save(tmp_path, 1, model, optimizer)
    for _ in range(2):
        newest = _save(tmp_path, 2, model, optimizer)
        newest.write_bytes(newest.read_bytes()[:-100])  # the end, with the zip directory, is missing
        with caplog.at_level(logging.WARNING, logger="sam3.checkpoint"):
            assert latest_checkpoint(tmp_path, set_aside_damaged=True) == older
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["step_00000002.1.pt", "step_00000002.pt"]
    assert "step_00000002.pt, damaged: File is not a zip file" in caplog.text


def test_a_checkpoint_written_before_the_integrity_check_is_verified_and_resumed(tmp_path, caplog):
    # the code before the check wrote this payload with a plain torch.save: torch's zip writer always stored the
    # records' CRC-32s, so an old file needs no checksum beside it and is verified like a new one
    model, optimizer = _trained()
    payload = {
        "format": "sam3-finetune-checkpoint",
        "format_version": 1,
        "train_state": {"step": 5, "epoch": 0, "epoch_step": 5, "best_metric": None, "guard": {}},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None,
        "scaler": None,
        "rng": {
            "python": [3, list(random.getstate()[1]), None],
            "numpy": {
                "bit_generator": "MT19937",
                "key": torch.zeros(624, dtype=torch.int64),
                "pos": 624,
                "has_gauss": 0,
                "cached_gaussian": 0.0,
            },
            "torch": torch.get_rng_state(),
            "cuda": [],
        },
        "params": PARAMS,
    }
    old = tmp_path / step_checkpoint_name(5)
    torch.save(payload, old)
    with caplog.at_level(logging.WARNING, logger="sam3.checkpoint"):
        assert latest_checkpoint(tmp_path, set_aside_damaged=True) == old
    assert caplog.records == []
    fresh, fresh_optimizer = _trained(seed=1)
    state, _, params = load_checkpoint(old, fresh, fresh_optimizer)
    assert state.step == 5 and params == PARAMS
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))

    _flip_middle(old)  # and an old file damaged later is caught like a new one
    assert latest_checkpoint(tmp_path, set_aside_damaged=True) is None
    assert (tmp_path / "corrupt" / old.name).is_file()


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model trained 2 steps on a small shapes dataset, a checkpoint after each: (dataset, run folder)."""
    import sam3.trainer as trainer
    from tests.training_runs import build_small_shapes, make_job

    shapes = build_small_shapes(tmp_path_factory.mktemp("shapes"))
    run_dir = tmp_path_factory.mktemp("run")
    trainer.train(make_job(run_dir, shapes, max_steps=2, checkpoint_every=1))
    return shapes, run_dir


@pytest.mark.slow  # two short training runs of the tiny model: about 10 s each on a busy CPU
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_training_resumes_from_the_newest_intact_checkpoint_and_exports_finite_weights(
    two_step_run, tmp_path, caplog, damage
):
    import sam3.trainer as trainer
    from tests.training_runs import make_job, read_weights

    shapes, source = two_step_run
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    for step in (0, 1, 2):
        shutil.copy(source / "checkpoints" / step_checkpoint_name(step), ckpt_dir)
    newest = ckpt_dir / step_checkpoint_name(2)
    if damage == "flipped":
        damaged = _flip_middle(newest, count=4096)
        # what made it dangerous: it loads without a word, NaNs included, and a run resumed from it exported them
        assert _non_finite(torch.load(newest, weights_only=True))
    else:
        damaged = newest.read_bytes()[: newest.stat().st_size // 2]
        newest.write_bytes(damaged)

    with caplog.at_level(logging.INFO):
        trainer.train(make_job(tmp_path, shapes, max_steps=3, checkpoint_every=1))

    warning = next(r.message for r in caplog.records if "step_00000002.pt" in r.message)
    reason = "Bad CRC-32 for file 'archive/data/" if damage == "flipped" else "File is not a zip file"
    assert f"skipping checkpoint {newest}, damaged: {reason}" in warning
    assert (ckpt_dir / "corrupt" / "step_00000002.pt").read_bytes() == damaged  # kept, out of the way
    assert "resumed from " + str(ckpt_dir / step_checkpoint_name(1)) in caplog.text
    logged = [json.loads(line) for line in (tmp_path / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [2, 3]  # from step 1: step 2 trained again
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == [step_checkpoint_name(s) for s in range(4)]
    weights = read_weights(tmp_path / "model")
    assert all(bool(torch.isfinite(value).all()) for value in weights.values() if value.is_floating_point())


def test_latest_orders_by_step_number_and_skips_foreign_files(tmp_path, caplog):
    model, optimizer = _trained()
    _save(tmp_path, 9, model, optimizer, keep_last=10)
    best = _save(tmp_path, 100_000_000, model, optimizer, keep_last=10)  # 9 digits: sorts after 8-digit names
    assert best.name == "step_100000000.pt"
    _save(tmp_path, 10, model, optimizer, keep_last=10, name=epoch_checkpoint_name(1))  # not a step file
    assert latest_checkpoint(tmp_path) == best
    torch.save(model.state_dict(), tmp_path / step_checkpoint_name(200_000_000))  # a bare state_dict
    with caplog.at_level(logging.WARNING, logger="sam3.checkpoint"):
        assert latest_checkpoint(tmp_path) == best
    assert "step_200000000.pt: not a sam3-finetune-checkpoint file" in caplog.text


def test_latest_is_none_without_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None


def test_rotation_keeps_last_n_extra_names_and_named_files(tmp_path):
    model, optimizer = _trained()
    keep = ("step_00000002.pt",)
    for step in range(1, 7):
        _save(tmp_path, step, model, optimizer, keep_last=3, extra_names=keep)
    _save(tmp_path, 6, model, optimizer, keep_last=3, extra_names=keep, name=epoch_checkpoint_name(0))
    names = sorted(p.name for p in tmp_path.iterdir())
    # no hidden temp files either
    assert names == ["epoch_0000.pt", "step_00000002.pt", "step_00000004.pt", "step_00000005.pt", "step_00000006.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000006.pt"


def test_stale_temp_file_is_removed_by_the_next_save(tmp_path, caplog):
    model, optimizer = _trained()
    stale = tmp_path / ".tmp-step_00000001.pt.abc123"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="sam3.checkpoint"):
        _save(tmp_path, 1, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]
    assert "removed 1 unfinished checkpoint temp file" in caplog.text


def test_foreign_and_missing_files_raise_a_sam3_error(tmp_path):
    model, optimizer = _trained()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="is not a sam3-finetune-checkpoint file") as info:
        load_checkpoint(tmp_path / "weights.pt", model)
    assert isinstance(info.value, Sam3Error)
    torch.save({"format": "sam3-finetune-checkpoint", "obj": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt"):  # weights_only refuses the pickled object
        load_checkpoint(tmp_path / "pickled.pt", model)
    with pytest.raises(CheckpointError, match="no checkpoint file at"):
        load_checkpoint(tmp_path / "nope.pt", model)


def test_checkpoint_of_another_model_or_optimizer_is_refused(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    extended = _model()
    extended.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"2 missing \(e.g. \['extra.bias', 'extra.weight'\]\), 0 unexpected"):
        load_checkpoint(path, extended)
    wider = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_checkpoint(path, wider)
    head_only = torch.optim.AdamW(model[3].parameters())  # one group of 2 tensors instead of 6
    with pytest.raises(CheckpointError, match="does not fit this optimizer"):
        load_checkpoint(path, model, head_only)


def test_bad_arguments_are_refused(tmp_path):
    model, optimizer = _trained()
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 1, model, optimizer, keep_last=0)
    with pytest.raises(ValueError, match="differs from train_state.step"):
        save_checkpoint(tmp_path, 2, model, optimizer, None, None, TrainState(step=1), PARAMS)
    with pytest.raises(ValueError, match="plain file name"):
        _save(tmp_path, 1, model, optimizer, name="sub/epoch.pt")


# Saves forever, as a trainer would. argv: folder, the step whose save stalls half-written (0: none), marker file.
_SAVER = """
import io, pathlib, sys, time
import torch
from torch import nn
from sam3.checkpoint import TrainState, save_checkpoint

folder, stall_at, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])  # 1M parameters: 12 MB with AdamW moments
optimizer = torch.optim.AdamW(model.parameters())
real_save = torch.save


def half_save(obj, handle):
    # fault injection: write half the bytes, then hang, as if the machine died in the middle of the write
    buffer = io.BytesIO()
    real_save(obj, buffer)
    handle.write(buffer.getvalue()[: buffer.tell() // 2])
    handle.flush()
    marker.touch()
    time.sleep(600)


for step in range(1, 10_000):
    optimizer.zero_grad()
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    if step == stall_at:
        torch.save = half_save
    save_checkpoint(folder, step, model, optimizer, None, None, TrainState(step=step), {"step": step}, keep_last=2)
"""


def _start_saver(folder: Path, stall_at: int, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(folder), str(stall_at), str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"saver exited early with {proc.returncode}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("saver made no progress")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _resume(folder: Path) -> int:
    """Load the newest checkpoint into the saver's architecture; returns its step."""
    path = latest_checkpoint(folder)
    assert path is not None
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters())
    state, _, params = load_checkpoint(path, model, optimizer)
    assert path.name == step_checkpoint_name(state.step)
    assert params == {"step": state.step}
    assert optimizer.state_dict()["state"][0]["step"].item() == state.step  # one AdamW step per saved step
    return state.step


def _steps_on_disk(folder: Path) -> list[int]:
    return [int(p.name[5:-3]) for p in folder.glob("step_*.pt")]


@pytest.mark.slow
def test_sigkill_during_a_save_loop_leaves_a_loadable_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    proc = _start_saver(folder, stall_at=0, marker=tmp_path / "unused")
    _wait_for(proc, lambda: folder.is_dir() and max(_steps_on_disk(folder), default=0) >= 4)
    time.sleep(0.03)  # somewhere inside a later save, most of which is writing and fsyncing 12 MB
    _kill(proc)
    assert _resume(folder) >= 4
    assert len(_steps_on_disk(folder)) <= 3  # keep_last 2, plus at most the newest before its rotation ran


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    folder, marker = tmp_path / "ckpt", tmp_path / "stalled"
    proc = _start_saver(folder, stall_at=3, marker=marker)
    _wait_for(proc, marker.exists)
    _kill(proc)
    temps = list(folder.glob(".tmp-step_00000003.pt.*"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the half-written file exists, under a hidden name
    assert sorted(_steps_on_disk(folder)) == [1, 2]
    assert _resume(folder) == 2
    model, optimizer = _trained()
    _save(folder, 3, model, optimizer)  # the resumed run's next save clears the debris
    assert not temps[0].exists()


# --- only what trains: frozen parameters left out, fingerprinted -----------------------------------------------------


def _frozen_tiny(freeze: str, seed: int = 0):
    """The tiny SAM 3 model frozen as a run freezes it (`freeze` plus what text prompts never reach), after one AdamW
    step of the recipe's optimiser on random gradients: (model, optimizer). `seed` draws its random weights."""
    from sam3.freeze import apply_freeze
    from sam3.model import load_model, parameters_without_text_gradients
    from sam3.optim import OptimConfig, build_optimizer

    detector = load_model("tiny", image_size=112, seed=seed)
    model = detector.model
    apply_freeze(model, freeze, also_freeze=parameters_without_text_gradients(detector, with_masks=False))
    optimizer = build_optimizer(model, OptimConfig(), model.config.vision_config.backbone_config.num_hidden_layers)
    generator = torch.Generator().manual_seed(seed + 100)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    return model, optimizer


def _frozen_keys(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if not param.requires_grad}


@pytest.mark.parametrize("freeze", ["heads", "vision"])
def test_a_checkpoint_holds_the_trainable_parameters_and_buffers_and_the_frozen_record(tmp_path, freeze):
    from sam3.checkpoint_frozen import FrozenPart

    model, optimizer = _frozen_tiny(freeze)
    path = _save(tmp_path, 1, model, optimizer)
    saved = torch.load(path, weights_only=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    buffers = set(model.state_dict()) - {name for name, _ in model.named_parameters()}
    frozen = _frozen_keys(model)
    assert frozen and trainable  # both parts exist in this mode
    assert set(saved["model"]) == trainable | buffers
    assert len(saved["model"]) == len(model.state_dict()) - len(frozen)
    assert saved["format_version"] == 2
    assert saved["frozen"] == {"names": len(frozen), "sha256": FrozenPart(model).record()["sha256"]}
    assert len(saved["frozen"]["sha256"]) == 64
    # the optimiser's state covers the trainable tensors only (sam3.optim), so nothing frozen is in the file
    assert len(saved["optimizer"]["state"]) == len(trainable)


@pytest.mark.parametrize("freeze", ["heads", "vision"])
def test_resuming_a_checkpoint_without_its_frozen_part_restores_every_weight_and_moment(tmp_path, freeze):
    model, optimizer = _frozen_tiny(freeze)
    path = _save(tmp_path, 1, model, optimizer)

    # the same model source (seed 0: the same frozen weights), trained another way: other trainable weights, moments
    fresh, fresh_optimizer = _frozen_tiny(freeze)
    with torch.no_grad():
        for param in fresh.parameters():
            if param.requires_grad:
                param.add_(1.0)
    fresh_optimizer.step()
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    load_checkpoint(path, fresh, fresh_optimizer)

    expected, loaded = model.state_dict(), fresh.state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    saved_opt, loaded_opt = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    assert loaded_opt["state"].keys() == saved_opt["state"].keys()
    for index, moments in saved_opt["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded_opt["state"][index][key], value), (index, key)


def test_a_checkpoint_is_refused_by_a_model_with_other_frozen_weights_or_another_freeze(tmp_path):
    model, optimizer = _frozen_tiny("heads")
    path = _save(tmp_path, 1, model, optimizer)

    other, other_optimizer = _frozen_tiny("heads", seed=1)  # another model source: other frozen weights
    before = {name: value.clone() for name, value in other.state_dict().items()}
    count = len(_frozen_keys(model))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path, other, other_optimizer)
    message = str(refused.value)
    assert message.startswith(f"{path} was trained over other frozen weights than this model's (the same {count} ")
    assert "Build the model from the same model source" in message
    assert all(torch.equal(value, before[name]) for name, value in other.state_dict().items())  # nothing loaded

    one_more = dict(model.named_parameters())["detr_decoder.layers.0.self_attn.q_proj.weight"]
    one_more.requires_grad_(False)  # one more frozen tensor: the saved keys no longer fit
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. \['detr_decoder.layers.0.self_attn.q_proj"):
        load_checkpoint(path, model)

    vision, _ = _frozen_tiny("vision")  # the detr encoder trains there: its weights are missing from the file
    with pytest.raises(CheckpointError, match=r"\d+ missing \(e.g. \['detr_encoder.*another train.freeze"):
        load_checkpoint(path, vision)


def test_the_frozen_record_is_hashed_once_and_again_only_when_the_frozen_part_changes(tmp_path, monkeypatch):
    import sam3.checkpoint_frozen as frozen_module

    calls = []
    real = frozen_module.fingerprint
    monkeypatch.setattr(frozen_module, "fingerprint", lambda model, keys: calls.append(keys) or real(model, keys))
    model, optimizer = _trained()
    model[0].weight.requires_grad_(False)
    part = frozen_module.FrozenPart(model)
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer, frozen=part)
    load_checkpoint(tmp_path / step_checkpoint_name(3), model, optimizer, frozen=part)
    assert calls == [("0.weight",)]  # three saves and a load, one hash
    model[0].bias.requires_grad_(False)
    _save(tmp_path, 4, model, optimizer, frozen=part)
    assert calls[-1] == ("0.bias", "0.weight")
    part.forget()
    part.record()
    assert len(calls) == 3
    with pytest.raises(ValueError, match="another model"):
        _save(tmp_path, 5, _model(), optimizer, frozen=part)


def test_a_version_1_file_with_every_weight_still_loads_whole(tmp_path):
    from sam3.checkpoint_frozen import FrozenPart

    # as the code before format version 2 wrote it: the whole state_dict, frozen weights included, no record
    model, optimizer = _frozen_tiny("heads")
    payload = torch.load(_save(tmp_path, 1, model, optimizer), weights_only=True)
    payload.update(format_version=1, model=model.state_dict())
    del payload["frozen"]
    old = tmp_path / step_checkpoint_name(2)
    torch.save(payload, old)

    other, other_optimizer = _frozen_tiny("heads", seed=1)  # other frozen weights: a version-1 file brings its own
    part = FrozenPart(other)
    stale = part.record()
    assert latest_checkpoint(tmp_path) == old
    load_checkpoint(old, other, other_optimizer, frozen=part)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in other.state_dict().items())
    assert part.record() != stale and part.record() == FrozenPart(model).record()  # hashed again after the load
