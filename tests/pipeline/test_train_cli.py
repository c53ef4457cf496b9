"""`python -m pipeline train`: dry run, parameter errors, the run folder, divergence exit, a run folder locked by
another trainer, resume after SIGKILL (also in the middle of a background checkpoint write), and `launcher.kind:
slurm` with the feature cache and a few-shot annotation file.

The CLI runs in this process (`pipeline.cli.main`) except the run that is killed, which must be a process of its own,
and the SLURM job: submitted through submitit exactly as on a cluster, where this machine has no `srun`, so
submitit's AutoExecutor runs it with its local executor (the pickled job unpickled and run by
`python -m submitit.core._submit` in a process of its own, started in the submission folder as SLURM starts jobs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.params import load_params, to_dict
from pipeline.shapes_data import CATEGORY_NAMES
from pipeline.train_job import image_params
from sam3.checkpoint import WRITE_DELAY_ENV, TrainState, latest_checkpoint, save_checkpoint, step_checkpoint_name
from sam3.coco import ANNOTATIONS_FILE, load_coco, save_coco
from sam3.features import write_disabled
from tests.lock_holder import lock_held_elsewhere
from tests.training_runs import IMAGE_SIZE, build_small_shapes, read_weights

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
# Test-sized runs: small images, a few steps, lr 1e-3 without warm-up so every step moves the weights visibly.
SMALL = [
    f"model.image_size={IMAGE_SIZE}",
    "train.batch_size=2",
    "train.log_every=1",
    "optim.lr_detr=1.0e-3",
    "optim.lr_vision=1.0e-3",
    "optim.lr_text=1.0e-3",
    "optim.warmup=0",
    "train.val_every_epochs=0",  # params.yaml's demo validates; these runs check other things
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"))


def _args(run_dir: Path, dataset: Path, *overrides: str) -> list[str]:
    sets = [arg for item in (*SMALL, *overrides) for arg in ("--set", item)]
    return ["train", "--params", str(PARAMS), "--run-dir", str(run_dir), "--dataset", str(dataset), *sets]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_dry_run_prints_the_resolved_params_and_trains_nothing(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*_args(run_dir, shapes, "train.max_steps=7", "train.freeze=heads"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)  # the closing "# params OK ..." line is a YAML comment
    expected = to_dict(load_params(PARAMS, [*SMALL, "train.max_steps=7", "train.freeze=heads"]))
    assert printed == json.loads(json.dumps(expected))  # tuples (optim.betas) print as lists
    assert printed["train"]["max_steps"] == 7 and printed["train"]["freeze"] == "heads"
    assert printed["model"]["image_size"] == IMAGE_SIZE
    assert out.rstrip().splitlines()[-1] == f"# params OK; dataset {shapes}; run dir {run_dir}"
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=5", "unknown key train.max_step; did you mean train.max_steps?"),
        ("trian.seed=1", "unknown key trian; did you mean train?"),
        ("train.freeze=decoder", "train.freeze = 'decoder': must be one of 'none', 'vision', 'vision_text', 'heads'"),
        ("train.batch_size=two", "train.batch_size = 'two': expected int"),
        ("train.export=best", "train.export = 'best' needs validation: set train.val_every_epochs >= 1"),
    ],
)
def test_parameter_mistakes_exit_2_with_one_line_naming_the_key(shapes, tmp_path, capsys, override, message):
    assert main([*_args(tmp_path / "run", shapes, override), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_dry_run_with_a_missing_dataset_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([*_args(tmp_path / "run", missing), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and str(missing) in line


def test_set_takes_several_values_as_dvc_unpacks_them_and_a_missing_train_annotations_file_exits_2(
    shapes, tmp_path, capsys
):
    from pipeline.cli import build_parser

    # `--set a b` is what DVC writes for {set: [a, b]} (suites/*/dvc.yaml); the seed given after still comes last
    args = build_parser().parse_args(["train", "--run-dir", "r", "--set", "a.b=1", "c.d=2", "--set", "train.seed=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "train.seed=3"]
    assert args.train_annotations == "_annotations.coco.json"
    assert main([*_args(tmp_path / "run", shapes), "--train-annotations", "fewshot_train_shot10_seed3.json"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {shapes / 'train' / 'fewshot_train_shot10_seed3.json'}: --train-annotations")
    assert not (tmp_path / "run").exists()


def test_run_folder_holds_checkpoints_model_tensorboard_stats_and_params(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, shapes, "train.max_steps=2")) == 0
    printed = capsys.readouterr().out
    assert f"fine-tuned model: {run_dir / 'model'}" in printed
    assert f"training curves: {run_dir / 'plots' / 'training.png'}" in printed

    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "model",
        "params.yaml",
        "plots",
        "tensorboard",
        "train_stats.jsonl",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [step_checkpoint_name(s) for s in (0, 2)]
    # self-contained: the model, its class names, the processor and tokenizer, the card
    exported = {p.name for p in (run_dir / "model").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= exported
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(CATEGORY_NAMES)
    with Image.open(run_dir / "plots" / "training.png") as figure:
        assert figure.format == "PNG" and figure.width >= 800
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run_dir / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in records)
    written = yaml.safe_load((run_dir / "params.yaml").read_text())
    # every section of the image run (the video one, vos:, is no image run's: pipeline.train_job.image_params)
    assert written == json.loads(json.dumps(image_params(load_params(PARAMS, [*SMALL, "train.max_steps=2"]))))
    assert "vos" not in written


def test_the_same_command_with_more_steps_goes_on_and_with_fewer_exits_2(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, shapes, "train.max_steps=2")) == 0
    assert main(_args(run_dir, shapes, "train.max_steps=3")) == 0  # params.yaml's other keys unchanged: resumed
    records = [json.loads(line) for line in (run_dir / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not (run_dir / "checkpoints" / "superseded.pt").exists()
    capsys.readouterr()

    assert main(_args(run_dir, shapes, "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    newest = run_dir / "checkpoints" / step_checkpoint_name(3)
    assert line.startswith(f"error: train.max_steps = 1 is below step 3 of the run's newest checkpoint {newest}: ")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [step_checkpoint_name(s) for s in (0, 2, 3)]


def test_a_run_that_keeps_diverging_exits_2_with_one_line(shapes, tmp_path, capsys):
    # a learning rate far too high: after one step the weights are ~1e30 and the loss is NaN, every time
    huge = ["optim.lr_detr=1.0e+30", "optim.lr_vision=1.0e+30", "optim.lr_text=1.0e+30", "guard.max_rollbacks=1"]
    assert main(_args(tmp_path, shapes, "train.max_steps=4", *huge)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith("error: training diverged again after 1 rollback(s)")
    assert line.endswith("or allow more rollbacks.")  # the whole message on that one line
    events = [json.loads(line) for line in (tmp_path / "train_stats.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["lr_multiplier"]) for e in events if "event" in e] == [("rollback", 1, 0.5)]
    assert not (tmp_path / "model").exists()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_a_second_trainer_on_a_locked_run_folder_exits_2_naming_the_holder_and_touches_nothing(
    shapes, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    state = TrainState(step=1)
    save_checkpoint(run_dir / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()), None, None, state, {})
    (run_dir / "params.yaml").write_text("train: {max_steps: 5}\n")  # the running trainer's params
    with lock_held_elsewhere(run_dir) as holder:
        before = _snapshot(run_dir)
        assert main(_args(run_dir, shapes, "train.max_steps=2")) == 2
        err = capsys.readouterr().err
        assert _snapshot(run_dir) == before  # params.yaml, checkpoints and the holder's lock file as they were
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"error: {run_dir} is in use by another training run (pid {holder.pid} on ")
    assert ", started 20" in line


def _steps_on_disk(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.pt")) if folder.is_dir() else []


# 6 steps: epoch 0 (4 steps) and half of epoch 1; a checkpoint every 2 steps and at the end of epoch 0
KILLED_RUN = ("train.max_steps=6", "train.checkpoint_every=2")


@pytest.fixture(scope="module")
def straight_weights(shapes, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The exported weights of the KILLED_RUN settings trained without interruption."""
    run_dir = tmp_path_factory.mktemp("straight")
    assert main(_args(run_dir, shapes, *KILLED_RUN)) == 0
    return read_weights(run_dir / "model")


def _train_then_kill(run_dir: Path, shapes: Path, log_path: Path, until, env: dict[str, str] | None = None) -> None:
    """Start `python -m pipeline train` with KILLED_RUN on `run_dir` and SIGKILL it as soon as `until()` is true."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *_args(run_dir, shapes, *KILLED_RUN)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 300
        try:
            while not until():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the moment to kill did not come within 300 s"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()  # no-op after the SIGKILL; stops the run if an assertion fired first
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _restart_equals_straight(run_dir: Path, shapes: Path, killed_at: int, straight, caplog) -> None:
    """The same command again resumes from step `killed_at` and exports the uninterrupted run's weights."""
    caplog.set_level("INFO", logger="sam3.training")  # sam3.training.resume says where the run resumed
    assert main(_args(run_dir, shapes, *KILLED_RUN)) == 0
    assert f"at step {killed_at}" in caplog.text and "resumed from" in caplog.text
    resumed = read_weights(run_dir / "model")
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.slow
def test_sigkill_then_restart_ends_with_the_weights_of_an_uninterrupted_run(shapes, tmp_path, caplog, straight_weights):
    # the kill lands after step 2's checkpoint (mid-epoch: the resumed sampler must skip 4 images) or step 4's
    killed_dir = tmp_path / "killed"
    _train_then_kill(
        killed_dir,
        shapes,
        tmp_path / "killed.log",
        until=lambda: max(_steps_on_disk(killed_dir / "checkpoints"), default=0) > 0,
    )
    killed_at = int(latest_checkpoint(killed_dir / "checkpoints").stem.split("_")[1])
    assert 0 < killed_at < 6 and not (killed_dir / "model").exists()
    _restart_equals_straight(killed_dir, shapes, killed_at, straight_weights, caplog)


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_in_the_background_then_restart_ends_with_the_same_weights(
    shapes, tmp_path, caplog, straight_weights
):
    # every write stays in flight 3 s between its finished temp file and the rename (sam3.checkpoint's test hook)
    # while training goes on: the kill lands inside the write of step 4, after step 2's was renamed into place
    killed_dir = tmp_path / "killed"
    checkpoints = killed_dir / "checkpoints"
    in_flight = f".tmp-{step_checkpoint_name(4)}.*"

    def written_not_renamed() -> bool:
        """Step 4's temp file holds bytes and has not changed for 0.5 s: inside the 3 s before its rename."""
        temps = list(checkpoints.glob(in_flight)) if checkpoints.is_dir() else []
        if not temps:
            return False
        info = temps[0].stat()
        return info.st_size > 0 and time.time() - info.st_mtime > 0.5

    _train_then_kill(
        killed_dir,
        shapes,
        tmp_path / "killed.log",
        until=written_not_renamed,
        env={**os.environ, WRITE_DELAY_ENV: "3"},
    )
    (temp,) = checkpoints.glob(in_flight)  # the whole file, written and fsynced, under its hidden name only
    assert torch.load(temp, weights_only=True)["train_state"]["step"] == 4
    assert _steps_on_disk(checkpoints) == [0, 2] and latest_checkpoint(checkpoints) == checkpoints / "step_00000002.pt"
    assert not (killed_dir / "model").exists()

    _restart_equals_straight(killed_dir, shapes, 2, straight_weights, caplog)  # WRITE_DELAY_ENV unset here
    assert not temp.exists() and not list(checkpoints.glob(".tmp-*"))  # the restarted run's first save cleared it
    assert _steps_on_disk(checkpoints) == [2, 4, 6]  # params.yaml keeps the last 3


def test_loader_workers_train_exactly_as_the_main_process(shapes, tmp_path):
    # 6 steps cross from epoch 0 (4 steps) into epoch 1: the two persistent workers, started once, must draw epoch
    # 1's augmentation from the (epoch, index) keys. Run as its own process: forked workers are safe there (this
    # pytest process may hold other tests' threads; see tests/sam3/test_data.py).
    settings = ("train.max_steps=6",)
    workers = subprocess.run(
        [sys.executable, "-m", "pipeline", *_args(tmp_path / "workers", shapes, *settings, "train.num_workers=2")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert workers.returncode == 0, workers.stderr[-3000:]
    assert main(_args(tmp_path / "main", shapes, *settings, "train.num_workers=0")) == 0

    with_workers, in_main = read_weights(tmp_path / "workers" / "model"), read_weights(tmp_path / "main" / "model")
    assert with_workers.keys() == in_main.keys()
    for name, value in in_main.items():
        assert torch.equal(with_workers[name], value), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "workers" / "train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- launcher.kind slurm ----------------------------------------------------------------------------------------------

SLURM_CACHE = ("launcher.kind=slurm", "launcher.log_dir=slurm", "cache.enabled=true", "train.freeze=vision")


def test_slurm_checks_each_datasets_feature_cache_before_submitting_anything(shapes, tmp_path, monkeypatch, capsys):
    """A job array (--datasets a b) reads FEATURE_CACHE/<dataset name>: one written with the cache off and one
    missing are both named, with the command that builds each, and no job is submitted."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(shapes)
    write_disabled(tmp_path / "features" / "a")
    args = [*_args(Path("runs"), shapes, *SLURM_CACHE), "--datasets", "a", "b", "--feature-cache", "features"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cache.enabled is true but features/a was written with cache.enabled false (build")
    assert "; features/b holds no feature cache (build it: python -m pipeline cache-features b --out features/b" in line
    assert line.endswith("nothing was submitted")
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "runs").exists()


def wait_for_local_job(log_dir: Path, job_id: str, timeout_s: float = 300) -> str:
    """Wait for a job of submitit's local executor to write its result; assert it succeeded; return its log."""
    from submitit.core.utils import JobPaths, pickle_load

    paths = JobPaths(log_dir, job_id, task_id=0)
    deadline = time.monotonic() + timeout_s
    while not paths.result_pickle.exists():
        log = paths.stderr.read_text() if paths.stderr.exists() else ""
        assert time.monotonic() < deadline, f"job {job_id} wrote no result within {timeout_s} s:\n{log[-3000:]}"
        time.sleep(0.2)
    outcome, value = pickle_load(paths.result_pickle)
    log = paths.stderr.read_text()
    assert outcome == "success", f"{value}\n{log[-3000:]}"
    return log


@pytest.mark.slow
def test_a_slurm_job_trains_from_the_feature_cache_on_a_fewshot_file(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user submits from the repository
    shutil.copytree(shapes, tmp_path / "data")
    full = load_coco(tmp_path / "data/train" / ANNOTATIONS_FILE)
    kept = {image["id"] for image in full["images"][:2]}
    fewshot = {
        **full,
        "images": full["images"][:2],
        "annotations": [a for a in full["annotations"] if a["image_id"] in kept],
    }
    save_coco(tmp_path / "data/train/fewshot.json", fewshot)
    train = [*_args(Path("run"), Path("data"), *SLURM_CACHE, "train.max_steps=2")]
    train += ["--train-annotations", "fewshot.json", "--feature-cache", "features"]

    # no cache yet: nothing submitted; the message holds the command that builds the one this run reads
    assert main(train) == 2
    (build,) = re.findall(r"build it: (python -m pipeline cache-features .*?)\); nothing", capsys.readouterr().err)
    assert main(shlex.split(build)[3:]) == 0
    assert "feature cache: 2 images x 1 views" in capsys.readouterr().out

    assert main(train) == 0
    out = capsys.readouterr().out
    assert "no SLURM on this machine" in out  # submitit's local fallback is said, not silent
    (job_id,) = re.findall(r"^submitted (\S+) \(local, on this machine\): data$", out, re.MULTILINE)
    log = wait_for_local_job(tmp_path / "slurm", job_id)
    assert "training from the feature cache features: 1 views per image" in log
    assert "2 training images (2 per process)" in log  # the few-shot file's, not the split's 8
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "run/model/model.safetensors").is_file()
