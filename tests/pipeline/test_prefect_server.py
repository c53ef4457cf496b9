"""`make prefect-up` / `make prefect-down` for real, in a throw-away copy of the repository (tiny params): a Prefect
server on 127.0.0.1 (a free port), `python -m pipeline.serve`, `prefect deployment run finetune/demo --watch` to
completion with the DVC state left clean, `finetune/mose` on a generated MOSE-layout dataset (its DVC state clean
too), the retrain schedule, a retrain run that promotes its model, and no process left behind afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.flows import dvc_path, registry, tasks
from pipeline.vos_shapes import build_vos_shapes
from tests.pipeline.prefect_repo import copy_repo

VENV = Path(sys.executable).parent.parent
RUN_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make(repo: Path, target: str, port: int) -> subprocess.CompletedProcess:
    """`make <target>` in `repo` with this venv; `-o` keeps make from (re)installing it (its stamp is taken as done)."""
    command = [
        "make",
        "-s",
        "-C",
        str(repo),
        target,
        f"VENV={VENV}",
        "-o",
        f"{VENV}/.installed",
        f"PREFECT_PORT={port}",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def process_groups() -> dict[int, int]:
    """{pid: process group id} of every process now running."""
    groups = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, pgrp, ...
        except (FileNotFoundError, ProcessLookupError):
            continue
        groups[int(stat.parent.name)] = int(fields[2])
    return groups


def prefect(repo: Path, api: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api}
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


@pytest.mark.slow
def test_prefect_up_serves_the_deployments_and_down_leaves_nothing(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = copy_repo(tmp_path / "repo")
    # finetune/mose on a generated dataset in MOSE layout, with the suite's recipe flags cut to 2 tiny steps
    build_vos_shapes(repo / "data/raw/mose", train_videos=2, valid_videos=2, frames=4, size=64, seed=0)
    flags = {"set": ["vos.train.max_steps=2", "vos.preprocess.size=64"]}
    mose = {"mose": {"root": "data/raw", "datasets": ["mose"], "flags": flags}}
    (repo / "suites/mose/params.yaml").write_text(yaml.safe_dump(mose), encoding="utf-8")
    port = free_port()
    state = repo / ".prefect"
    up = make(repo, "prefect-up", port)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pids = {name: int((state / f"{name}.pid").read_text()) for name in ("server", "serve")}
        api = f"http://127.0.0.1:{port}/api"
        assert (state / "env").read_text() == f"export PREFECT_API_URL={api}\n"
        assert (state / "prefect.db").is_file()  # SQLite under the repository's .prefect/

        demo = prefect(repo, api, "deployment", "run", "finetune/demo", "--watch")
        assert demo.returncode == 0 and "Completed" in demo.stdout, demo.stdout + demo.stderr
        stages = [s for s in tasks.DVC_STAGES if s in dvc_path.dvc_stage_names(repo)]
        assert json.loads(dvc_path.dvc_output(repo, "status", "--json", *stages)) == {}  # as `dvc repro` leaves it
        bbox_ap = json.loads((repo / "reports/demo/metrics.json").read_text())["bbox_AP"]

        video = prefect(repo, api, "deployment", "run", "finetune/mose", "--watch")
        assert video.returncode == 0 and "Completed" in video.stdout, video.stdout + video.stderr
        mose_stages = [f"suites/mose/dvc.yaml:{stage}" for stage in tasks.VOS_STAGES]
        assert json.loads(dvc_path.dvc_output(repo, "status", "--json", *mose_stages)) == {}
        summary = json.loads((repo / "reports/mose/mose/vos_summary.json").read_text())
        assert summary["vos_steps"] == 2 and 0 <= summary["J&F"] <= 1
        assert (repo / "runs/mose/mose/model/config.json").is_file()

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            retrain = client.read_deployment_by_name("finetune/retrain")
        assert not retrain.paused
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in retrain.schedules] == [
            ("0 3 * * 1", "Europe/Paris", True)
        ]

        run = prefect(repo, api, "deployment", "run", "finetune/retrain", "--watch")
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr
        champion = json.loads((repo / registry.REGISTRY_FILE).read_text())["champion"]
        assert (champion["metric"], champion["value"], champion["source"]) == ("bbox_AP", bbox_ap, "runs/demo/model")
        assert (repo / registry.CHAMPION_DIR / "config.json").is_file()
    finally:
        down = make(repo, "prefect-down", port)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "serve (process group" in down.stdout and "server (process group" in down.stdout
    assert not list(state.glob("*.pid")) and not (state / "env").exists()
    left = {pid: group for pid, group in process_groups().items() if group in pids.values()}
    assert left == {}, f"processes left in the groups of {pids}: {left}"
