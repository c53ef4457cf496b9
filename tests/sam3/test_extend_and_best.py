"""Runs that extend and stop well: a longer run resumes with the schedule of its new total, a shorter one is refused,
the best checkpoint and early stopping (counters that survive a resume), the export of the best weights, the
settings that need validation, and the live progress line.

Every run here is the tiny model at 112 px on 8 shapes images, batch 2: 4 steps per epoch. The tiny model's random
weights find nothing on the valid image (box AP 0 at every validation), so the first validation is the best and every
later one is a validation without improvement: the early-stopping tests rely on that (they assert the stop before
the run's end). The best step, the stop step and the counters are still worked out from the logged metrics by the
rule of `sam3.training.best`, written out again in `_expected_course`; the rule itself is checked on a scripted
series of values with improvements, a tie and an undefined value.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import sam3.trainer as trainer
from sam3.checkpoint import BEST_CHECKPOINT, TrainState, step_checkpoint_name
from sam3.config import OptimConfig
from sam3.errors import ConfigError
from sam3.training.best import record_validation, stop_reason
from sam3.training.progress import Progress, eta_seconds, format_duration, progress_line
from tests.training_runs import build_small_shapes, make_job, read_weights

# warm-up off and a 2-step cool-down: the lr of step s of T is 1e-3 * r(s) * min(1, (T - s) / 2)
COOLING = OptimConfig(lr_detr=1e-3, lr_vision=1e-3, lr_text=1e-3, warmup=0, cooldown=2)


def _lr(step: int, total: int) -> float:
    """COOLING's lr at optimiser step `step` of `total` (sam3.optim.inverse_sqrt_lr with W = 0, C = 2, tau = 20)."""
    decay = math.sqrt(20 / (step + 20)) if step > 0 else 1.0
    return 1e-3 * decay * max(0.0, min(1.0, (total - step) / 2))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"))


def _job(run_dir: Path, shapes: Path, **loop):
    """A test job whose params hold its train section, as the pipeline's do: resume compares them."""
    job = make_job(run_dir, shapes, **loop)
    job.params = {"train": asdict(job.loop), "optim": asdict(job.optim)}
    return job


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_stats.jsonl").read_text().splitlines()]


def _loss_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _records(run_dir) if "loss" in r]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["train_state"]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` but the lock file: its bytes and modification time."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


# --- the run's length -------------------------------------------------------------------------------------------------


def test_a_longer_run_resumes_with_the_schedule_of_its_new_total_and_a_shorter_one_is_refused(
    shapes, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: the plain progress lines
    caplog.set_level("INFO", logger="sam3.training")
    trainer.train(_job(tmp_path, shapes, max_steps=3, optim=COOLING))
    progress = [r.getMessage() for r in caplog.records if r.name == "sam3.training.progress"]
    assert [line.split(":")[0] for line in progress] == [f"train step {k}/3 ({100 * k // 3}%)" for k in (1, 2, 3)]

    caplog.clear()
    trainer.train(_job(tmp_path, shapes, max_steps=6, optim=COOLING))

    assert _loss_steps(tmp_path) == [1, 2, 3, 4, 5, 6]  # went on from step 3: nothing trained twice
    assert not (tmp_path / "checkpoints" / "superseded.pt").exists()
    assert f"resumed from {tmp_path / 'checkpoints' / step_checkpoint_name(3)} at step 3" in caplog.text
    # lr x 0.9325 (sqrt(20/23), no cool-down yet of 6 steps) instead of 0 (step 3 was the end of the 3 steps)
    assert (
        "the run's length changed from 3 to 6 steps (train.max_steps / train.epochs): resuming at step 3 with the lr "
        f"schedule recomputed for 6 steps (lr x {math.sqrt(20 / 23):.4g} of the base rates at step 3; x 0 under the "
        "old 3)" in caplog.text
    )
    # the record of step k holds the lr of optimiser step k - 1: steps 0-2 of 3, then steps 3-5 of 6
    logged = {r["step"]: r["lr/detr"] for r in _records(tmp_path) if "loss" in r}
    expected = {k: _lr(k - 1, 3 if k <= 3 else 6) for k in range(1, 7)}
    assert logged == pytest.approx(expected, rel=1e-12)
    # by hand: step 2 of 3 is in the cool-down (half rate), step 3 of 6 is not (it would be 0 of 3), step 5 of 6 is
    assert [logged[k] for k in (3, 4, 6)] == pytest.approx([4.7673e-4, 9.3250e-4, 4.4721e-4], rel=1e-4)
    assert "train step 6/6 (100%)" in caplog.text
    assert _state(tmp_path / "checkpoints" / step_checkpoint_name(6))["total_steps"] == 6

    # 2 steps: below the checkpoint's 6, refused before anything is trained or written
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError) as refused:
        trainer.train(_job(tmp_path, shapes, max_steps=2, optim=COOLING))
    assert str(refused.value) == (
        f"train.max_steps = 2 is below step 6 of the run's newest checkpoint "
        f"{tmp_path / 'checkpoints' / step_checkpoint_name(6)}: a run is not shortened after the fact; set "
        f"train.max_steps >= 6 to go on (step 6 exactly: export that checkpoint as it is), or move "
        f"{tmp_path / 'checkpoints'} away to train a new run of 2 steps"
    )
    assert _snapshot(tmp_path) == before

    # 6 steps again: the run is complete, nothing more trained, the same weights exported
    exported = read_weights(tmp_path / "model")
    trainer.train(_job(tmp_path, shapes, max_steps=6, optim=COOLING))
    assert _loss_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert all(torch.equal(value, exported[name]) for name, value in read_weights(tmp_path / "model").items())


def test_epochs_below_the_checkpoint_name_the_epochs_needed(shapes, tmp_path):
    trainer.train(_job(tmp_path, shapes, max_steps=6))  # 6 steps = 1.5 epochs of 4
    with pytest.raises(ConfigError, match=r"^train.epochs = 1 \(4 steps\) is below step 6 .* set train.epochs >= 2 "):
        trainer.train(_job(tmp_path, shapes, max_steps=None, epochs=1))


# --- the best checkpoint and early stopping ---------------------------------------------------------------------------

# validation every epoch (4 steps), patience 1, 12 steps at most, the best weights exported
STOPPING = dict(max_steps=12, val_every_epochs=1, patience=1, export="best")


def _expected_course(values: list[tuple[int, float]], patience: int) -> tuple[int, int, int]:
    """(best step, step where the run stops, validations since the best there) of the validations `values`
    [(step, metric)] by the module's rule, worked out here on its own: a strictly higher value is a new best."""
    best, best_step, since = None, None, 0
    for step, value in values:
        if best is None or value > best:
            best, best_step, since = value, step, 0
        else:
            since += 1
        if since >= patience:
            return best_step, step, since
    return best_step, values[-1][0], since


@pytest.fixture(scope="module")
def stopped_run(shapes, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped")
    trainer.train(_job(run_dir, shapes, **STOPPING))
    return run_dir


def test_early_stopping_keeps_the_best_checkpoint_and_exports_its_weights(stopped_run):
    validations = [(r["step"], r["val/bbox_AP"]) for r in _records(stopped_run) if "val/bbox_AP" in r]
    best_step, stop_step, since = _expected_course(validations, patience=1)
    assert [step for step, _ in validations] == [4, 8] and stop_step == 8  # AP 0, then no improvement: stopped
    assert _loss_steps(stopped_run) == list(range(1, stop_step + 1))  # 8 of the 12 steps
    (event,) = [r for r in _records(stopped_run) if r.get("event") == "early_stop"]
    assert event["step"] == stop_step
    assert event["reason"].startswith(f"validation bbox_AP has not improved for {since} validations (train.patience 1")

    checkpoints = stopped_run / "checkpoints"
    last = _state(checkpoints / step_checkpoint_name(stop_step))
    best_value = dict(validations)[best_step]
    assert (last["best_step"], last["best_metric"], last["validations_since_best"]) == (best_step, best_value, since)
    best = torch.load(checkpoints / BEST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert best["train_state"]["step"] == best_step and best["optimizer"] is None  # weights only
    # the export holds best.pt's weights, which are the best step's, not the last step's (checkpoints hold what
    # trains; the frozen rest is the model source's in every one of them)
    exported = read_weights(stopped_run / "model")
    at_best = torch.load(checkpoints / step_checkpoint_name(best_step), weights_only=True)["model"]
    at_last = torch.load(checkpoints / step_checkpoint_name(stop_step), weights_only=True)["model"]
    assert at_best.keys() == at_last.keys() == best["model"].keys() and at_best.keys() <= exported.keys()
    assert all(torch.equal(exported[name], value) for name, value in at_best.items())
    assert all(torch.equal(exported[name], value) for name, value in best["model"].items())
    assert any(not torch.equal(exported[name], value) for name, value in at_last.items())


def test_a_stopped_run_stays_stopped_and_goes_on_when_patience_is_raised(stopped_run, shapes, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    caplog.set_level("INFO", logger="sam3.training")
    trainer.train(_job(run_dir, shapes, **STOPPING))  # the same command again: nothing to train
    assert _loss_steps(run_dir) == list(range(1, 9))
    assert "the run stopped early at step 8: validation bbox_AP has not improved for 1 validations" in caplog.text

    trainer.train(_job(run_dir, shapes, **{**STOPPING, "patience": 5}))  # patience is read anew: it goes on
    assert _loss_steps(run_dir) == list(range(1, 13))
    validations = [(r["step"], r["val/bbox_AP"]) for r in _records(run_dir) if "val/bbox_AP" in r]
    assert [step for step, _ in validations] == [4, 8, 12]
    best_step, _, since = _expected_course(validations, patience=5)
    last = _state(run_dir / "checkpoints" / step_checkpoint_name(12))
    assert (last["best_step"], last["validations_since_best"]) == (best_step, since)


def test_the_best_and_patience_counters_survive_a_resume(stopped_run, shapes, tmp_path):
    # a run killed after step 4's checkpoint (its validation counted in it): resumed, it stops where the straight
    # run stopped, with the same counters and the same exported weights
    (tmp_path / "checkpoints").mkdir()
    for name in (step_checkpoint_name(0), step_checkpoint_name(4), BEST_CHECKPOINT):
        shutil.copy(stopped_run / "checkpoints" / name, tmp_path / "checkpoints")
    trainer.train(_job(tmp_path, shapes, **STOPPING))

    assert _loss_steps(tmp_path) == [5, 6, 7, 8]
    resumed, straight = (_state(d / "checkpoints" / step_checkpoint_name(8)) for d in (tmp_path, stopped_run))
    assert {k: v for k, v in resumed.items() if k != "guard"} == {k: v for k, v in straight.items() if k != "guard"}
    exported, reference = read_weights(tmp_path / "model"), read_weights(stopped_run / "model")
    assert all(torch.equal(value, reference[name]) for name, value in exported.items())


def test_keep_best_false_writes_no_best_checkpoint_and_still_counts_the_validations(shapes, tmp_path):
    trainer.train(_job(tmp_path, shapes, max_steps=4, val_every_epochs=1, keep_best=False))
    checkpoints = tmp_path / "checkpoints"
    assert not (checkpoints / BEST_CHECKPOINT).exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == [step_checkpoint_name(0), step_checkpoint_name(4)]
    last = _state(checkpoints / step_checkpoint_name(4))
    (value,) = [r["val/bbox_AP"] for r in _records(tmp_path) if "val/bbox_AP" in r]
    assert (last["best_step"], last["best_metric"], last["validations_since_best"]) == (4, value, 0)


@pytest.mark.slow  # two gloo processes: about 20 s on 2 cores
def test_two_processes_stop_at_the_same_validation(shapes, tmp_path):
    """Rank 0 alone validates; its metric, broadcast, leads both ranks to stop at the same step (a rank going on alone
    would wait for the other at its next all-reduce until the DDP timeout)."""
    from dataclasses import replace

    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    from tests.training_runs import ddp_train_worker

    job = _job(tmp_path / "run", shapes, **STOPPING)  # 2 ranks x batch 2: 2 steps per epoch
    job.ddp = replace(job.ddp, timeout_s=120)
    mp.spawn(ddp_train_worker, args=(2, get_free_port(), job, str(tmp_path)), nprocs=2, join=True)

    run_dir = tmp_path / "run"
    validations = [(r["step"], r["val/bbox_AP"]) for r in _records(run_dir) if "val/bbox_AP" in r]
    best_step, stop_step, _ = _expected_course(validations, patience=1)
    assert stop_step < 12 and _loss_steps(run_dir) == list(range(1, stop_step + 1))
    # rank 0 put best.pt's weights into its model for the export; rank 1 holds the last step's, as every rank did
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    checkpoints = run_dir / "checkpoints"
    at_best = torch.load(checkpoints / step_checkpoint_name(best_step), weights_only=True)["model"]
    at_last = torch.load(checkpoints / step_checkpoint_name(stop_step), weights_only=True)["model"]
    assert all(torch.equal(rank0[name], value) for name, value in at_best.items())
    assert all(torch.equal(rank1[name], value) for name, value in at_last.items())


def test_the_counting_rule_on_a_scripted_series_of_validations(caplog):
    # values 0.1, 0.3, 0.3 (a tie), 0.2, NaN (not counted), 0.25: the best is 0.3 at step 20; with patience 3 the
    # run stops at step 60, the third validation after it without improvement
    state = TrainState()
    course = []
    for step, value in [(10, 0.1), (20, 0.3), (30, 0.3), (40, 0.2), (50, float("nan")), (60, 0.25)]:
        state.step = step
        improved = record_validation(state, value, "bbox_AP")
        course.append((improved, state.validations_since_best, stop_reason(state, 3, "bbox_AP")))
    assert [c[:2] for c in course] == [(True, 0), (True, 0), (False, 1), (False, 2), (False, 2), (False, 3)]
    assert [c[2] is None for c in course] == [True] * 5 + [False]
    assert course[-1][2] == (
        "validation bbox_AP has not improved for 3 validations (train.patience 3; best 0.3 at step 20)"
    )
    assert (state.best_metric, state.best_step) == (0.3, 20)
    assert "step 50: validation bbox_AP is undefined (nan); not counted" in caplog.text
    assert stop_reason(state, 0, "bbox_AP") is None and stop_reason(state, None, "bbox_AP") is None  # off


# --- settings that need validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        ({"export": "best"}, "train.export = 'best' needs validation: set train.val_every_epochs >= 1 with"),
        ({"patience": 2, "val_every_epochs": 1, "mode": "train_only"}, "train.patience = 2 needs validation"),
        ({"best_metric": "segm_AP", "val_every_epochs": 1}, "train.best_metric = 'segm_AP' needs model.mode segm"),
    ],
)
def test_settings_that_need_validation_are_refused_before_the_run_folder_is_touched(shapes, tmp_path, loop, message):
    with pytest.raises(ConfigError, match=message):
        trainer.train(_job(tmp_path / "run", shapes, **loop))
    assert not (tmp_path / "run").exists()


def test_the_best_export_without_a_valid_split_is_refused(shapes, tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(shapes, dataset)
    shutil.rmtree(dataset / "valid")
    with pytest.raises(ConfigError, match=r"^train.export = 'best' needs the dataset's valid split, but .* not a file"):
        trainer.train(_job(tmp_path / "run", dataset, **STOPPING))
    assert not (tmp_path / "run").exists()


# --- live progress ----------------------------------------------------------------------------------------------------


def test_the_plain_progress_line_and_its_eta():
    # 20 of 100 steps run in 40 s: 2 s per step, 80 steps left -> 160 s
    assert eta_seconds(100, 20, 40.0, 20) == 160.0
    assert eta_seconds(100, 30, 40.0, 20) == 140.0  # resumed at step 10: 20 steps run here, 70 left
    assert eta_seconds(100, 0, 0.0, 0) is None
    assert [format_duration(s) for s in (None, 0, 59.6, 3725, 100 * 3600)] == [
        "?",
        "0:00:00",
        "0:01:00",
        "1:02:05",
        "100:00:00",
    ]
    assert progress_line(120, 400, 1.23456, 8e-5, 12.34, 312) == (
        "train step 120/400 (30%): loss 1.235, lr 8.00e-05, 12.3 images/s, ETA 0:05:12"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(caplog):
    caplog.set_level("INFO", logger="sam3.training.progress")
    plain = Progress(total=5, done=0, every=2, is_main=True, stream=io.StringIO())
    for step in range(1, 6):
        plain.step(step, loss=2.0 / step, lr=1e-4, images_per_s=3.0)
    plain.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == [
        "train step 2/5 (40%)",
        "train step 4/5 (80%)",
        "train step 5/5 (100%)",
    ]
    assert lines[0].startswith("train step 2/5 (40%): loss 1, lr 1.00e-04, 3.0 images/s, ETA 0:00:0")

    caplog.clear()
    terminal = _Terminal()
    bar = Progress(total=5, done=2, every=2, is_main=True, stream=terminal)
    bar.step(3, loss=0.5, lr=1e-4, images_per_s=3.0)
    bar.close()
    assert not caplog.records  # no lines on a terminal: the bar says it
    assert "3/5" in terminal.getvalue() and "loss 0.5, 3.0 images/s" in terminal.getvalue()

    other_rank = Progress(total=5, done=0, every=1, is_main=False, stream=_Terminal())
    other_rank.step(1, loss=1.0, lr=1e-4, images_per_s=3.0)
    assert not caplog.records
