"""What a run writes as it trains, from rank 0 only: TensorBoard scalars, train_stats.jsonl (one JSON object per
line: a step's loss terms, grad norm, lr per component, images/s, peak memory; rollback and early-stop events;
validation metrics with the best value so far), optionally Weights & Biases. The progress bar or line is
`sam3.training.progress`.

A resumed run appends to its logs; a run that starts at step 0 first moves an earlier run's logs aside
(train_stats.superseded.jsonl, tensorboard.superseded/, replacing older ones), so each file holds one run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sam3.config import TRAIN_STATS_FILE
from sam3.distributed import DistInfo
from sam3.engine import StepResult
from sam3.errors import ConfigError
from sam3.host_sync import to_host


def _set_aside(path: Path, aside: Path) -> None:
    """Move an earlier run's log `path` (file or folder) to `aside`, replacing what was there."""
    if not path.exists():
        return
    if aside.is_dir():
        shutil.rmtree(aside)
    os.replace(path, aside)


class TrainLogs:
    """TensorBoard scalars, train_stats.jsonl and optionally Weights & Biases, written by rank 0 only."""

    def __init__(
        self,
        run_dir: Path,
        dist_info: DistInfo,
        wandb_project: str | None = None,
        params: dict | None = None,
        fresh: bool = False,
    ):
        self.enabled = dist_info.is_main
        self.wandb = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if fresh:
            _set_aside(run_dir / TRAIN_STATS_FILE, run_dir / "train_stats.superseded.jsonl")
            _set_aside(run_dir / "tensorboard", run_dir / "tensorboard.superseded")

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / TRAIN_STATS_FILE).open("a", encoding="utf-8")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "train.wandb_project is set but the wandb package is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=params or {}, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)
        self.event({"step": step, **values})

    def step(
        self,
        step: int,
        result: StepResult,
        optimizer: torch.optim.Optimizer,
        images_per_s: float,
        device: torch.device,
    ) -> None:
        if not self.enabled:
            return
        # the log step's one host read: every term and the gradient norm in one copy (sam3.host_sync)
        names = list(result.terms)
        values = [result.terms[name].detach().float().reshape(()) for name in names]
        if result.grad_norm is not None:
            values.append(result.grad_norm.detach().float().reshape(()))
        read = [float(v) for v in to_host(*values)] if values else []
        record = {"step": step, **dict(zip(names, read, strict=False))}
        record["grad_norm"] = read[-1] if result.grad_norm is not None else None
        for group in optimizer.param_groups:
            record.setdefault(f"lr/{group['component']}", group["lr"])
        record["images_per_s"] = images_per_s
        if device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.scalars(step, {key: value for key, value in record.items() if key != "step"})

    def event(self, record: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()
