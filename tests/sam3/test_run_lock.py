"""One process per folder (`sam3.run_lock`): a lock held by another live process refuses a second taker naming it;
a SIGKILLed holder's lock is taken over; re-entrant in one process; children of the holder work under its lock; the
lock leaves nothing behind; no fcntl -> no lock; under DDP every rank hears rank 0's refusal."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sam3.run_lock as run_lock_module
from sam3.errors import Sam3Error
from sam3.run_lock import HOLDER_ENV, LOCK_FILE, RunLocked, run_lock
from tests.lock_holder import REPO, lock_held_elsewhere

TAKER = """
import sys
from sam3.run_lock import RunLocked, run_lock
try:
    with run_lock(sys.argv[1]):
        print("took it")
except RunLocked as err:
    print(err)
"""


def _take_in_a_child(folder: Path, env: dict[str, str]) -> str:
    """What a `python -c` process started with `env` says when it takes `folder`'s lock."""
    done = subprocess.run(
        [sys.executable, "-c", TAKER, str(folder)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_lock_held_by_another_process_names_it_and_is_taken_over_once_it_is_killed(tmp_path):
    folder = tmp_path / "run"
    with lock_held_elsewhere(folder) as holder:
        content = (folder / LOCK_FILE).read_text()
        assert json.loads(content)["pid"] == holder.pid
        with pytest.raises(RunLocked) as refused, run_lock(folder, "training run"):
            pytest.fail("the body must not run while another process holds the lock")
        message = str(refused.value)
        assert isinstance(refused.value, Sam3Error) and "\n" not in message
        assert message.startswith(f"{folder} is in use by another training run (pid {holder.pid} on ")
        assert f"on {socket.gethostname()}, started 20" in message
        assert (folder / LOCK_FILE).read_text() == content  # the refused taker changed nothing

        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock with the process
        holder.wait()
        assert (folder / LOCK_FILE).is_file()  # the dead holder's file is still there: only information
        with run_lock(folder, "training run"):
            assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()


def test_nested_in_one_process_and_released_without_a_trace(tmp_path):
    folder = tmp_path / "a" / "b"
    with run_lock(folder):
        with run_lock(folder):  # the train CLI holds the run folder, then train() takes it again
            holder = json.loads((folder / LOCK_FILE).read_text())
        assert (folder / LOCK_FILE).is_file()  # still held by the outer one
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not (tmp_path / "a").exists()  # nothing was written there: the folders the lock made are gone too
    assert HOLDER_ENV not in os.environ

    with run_lock(folder):
        (folder / "out.txt").write_text("work")
    assert sorted(p.name for p in folder.iterdir()) == ["out.txt"]  # the work's files stay, the lock file goes


def test_children_of_the_holder_work_under_its_lock_and_no_one_else(tmp_path):
    folder = tmp_path / "run"
    stranger_env = {k: v for k, v in os.environ.items() if k != HOLDER_ENV}
    with run_lock(folder):
        assert os.environ[HOLDER_ENV] == str(os.getpid())
        assert _take_in_a_child(folder, dict(os.environ)) == "took it"  # e.g. the DDP workers of the train CLI
        refused = _take_in_a_child(folder, stranger_env)
        assert refused.startswith(f"{folder} is in use by another run (pid {os.getpid()} on ")
        # a variable naming some other process lets no one in
        assert "is in use" in _take_in_a_child(folder, {**stranger_env, HOLDER_ENV: str(os.getpid() + 1)})
    assert HOLDER_ENV not in os.environ

    # the other way round: a holder that is not our parent refuses us even with its pid in our environment
    with lock_held_elsewhere(folder) as holder:
        os.environ[HOLDER_ENV] = str(holder.pid)
        try:
            with pytest.raises(RunLocked, match=f"pid {holder.pid}"), run_lock(folder):
                pass
        finally:
            del os.environ[HOLDER_ENV]


def test_without_fcntl_there_is_no_lock(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_lock_module, "fcntl", None)  # what `import fcntl` leaves on Windows
    folder = tmp_path / "run"
    with caplog.at_level(logging.DEBUG, logger="sam3.run_lock"), run_lock(folder, "training run"):
        assert not (folder / LOCK_FILE).exists()
    assert f"no fcntl on this platform: {folder} is not locked against a second training run" in caplog.text


def _lock_worker(rank: int, world_size: int, port: int, folder: str, out_dir: str) -> None:
    """One gloo rank (torch.multiprocessing.spawn target): try `main_rank_lock`, write what happened."""
    import torch.distributed as dist

    from sam3.distributed import DistInfo
    from sam3.training.ddp import main_rank_lock

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with main_rank_lock(Path(folder), DistInfo(rank=rank, world_size=world_size, local_rank=rank)):
            outcome = "ran"
    except RunLocked as err:
        outcome = f"RunLocked: {err}"
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow  # two processes importing torch
def test_under_ddp_rank_0_takes_the_lock_and_every_rank_hears_a_refusal(tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    folder = tmp_path / "run"
    with lock_held_elsewhere(folder) as holder:
        # without the broadcast, rank 1 would wait at its first collective until the DDP timeout
        mp.spawn(_lock_worker, args=(2, get_free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
        outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith(f"RunLocked: {folder} is in use by another training run (pid {holder.pid} on ")

    mp.spawn(_lock_worker, args=(2, get_free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["ran", "ran"]


def _elastic_worker(folder: str, out_dir: str) -> None:
    """One worker of torch's elastic launcher: take the folder's lock as train() does, write what happened."""
    rank = os.environ["RANK"]
    try:
        with run_lock(folder, "training run"):
            outcome = "ran"
    except RunLocked as err:
        outcome = f"RunLocked: {err}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow  # two processes started by torch's elastic launcher
def test_workers_of_the_elastic_launcher_work_under_the_lock_of_the_process_that_started_them(tmp_path):
    from torch.distributed.elastic.utils.distributed import get_free_port
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{get_free_port()}",
        max_restarts=0,
        monitor_interval=1,
    )
    folder = tmp_path / "run"
    with run_lock(folder, "training run"):  # as `python -m pipeline train` holds it around launch_local
        elastic_launch(config, _elastic_worker)(str(folder), str(tmp_path))
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["ran", "ran"]
