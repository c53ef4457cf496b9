"""Starting training processes: on this node (torch's elastic launcher, as torchrun) or on SLURM (submitit).

Local: `nproc` processes on one node, each with RANK / WORLD_SIZE / LOCAL_RANK set, running
`sam3.trainer.train`; the trainer picks NCCL on GPUs and gloo on CPU.
SLURM: one submitit job (or a job array over datasets) with nodes x gpus_per_node tasks; submitit exports the
SLURM variables, `_SlurmTask` turns them into torch.distributed's, and a preempted or timed-out job is requeued
(`checkpoint()` returns the same call) and resumes from the run's newest checkpoint. A job trains on any annotation
file of the train split (--train-annotations) and from a feature cache (cache.enabled) as a local run does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sam3.coco import ANNOTATIONS_FILE

log = logging.getLogger(__name__)


def launch_local(job, nproc: int) -> None:
    """Run `train(job)` in `nproc` processes on this machine, rendezvous on localhost."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from sam3.trainer import train

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        run_id=f"sam3-{os.getpid()}",
        max_restarts=0,
        monitor_interval=1,
    )
    elastic_launch(config, train)(job)
    log.info("fine-tuned model: %s", Path(job.run_dir) / "model")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _SlurmTask:
    """What a SLURM task runs: map SLURM's variables to torch.distributed's, then train. Requeued on preemption."""

    def __init__(self, job):
        self.job = job

    def __call__(self):
        import submitit

        from pipeline.logs import configure_logging
        from sam3.trainer import train

        configure_logging()  # the job's log says what a local run's says (images, steps, the feature cache read)

        env = submitit.JobEnvironment()
        hostnames = env.hostnames
        os.environ.update(
            MASTER_ADDR=hostnames[0],
            MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
            RANK=str(env.global_rank),
            LOCAL_RANK=str(env.local_rank),
            WORLD_SIZE=str(env.num_tasks),
        )
        return train(self.job)

    def checkpoint(self):
        """Called by submitit on preemption / timeout: requeue the same task; training resumes from its checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(_SlurmTask(self.job))


def submit_slurm(
    params,
    run_dir: Path,
    datasets: list[str],
    negatives: str | None,
    train_annotations: str = ANNOTATIONS_FILE,
    feature_caches: list[str] | None = None,
) -> list:
    """Submit one job per dataset (a job array when several) and print their ids. `feature_caches`: each dataset's
    feature cache folder (read when cache.enabled), in `datasets` order. Each job carries a plain-valued TrainJob
    (picklable: strings, numbers, dataclasses); its relative paths resolve against the submission folder, where
    SLURM starts the job (and submitit's local fallback its processes)."""
    import submitit

    from pipeline.train_job import build_job, write_resolved_params
    from sam3.run_lock import run_lock

    launcher = params.launcher
    executor = submitit.AutoExecutor(folder=launcher.log_dir)
    executor.update_parameters(
        nodes=launcher.nodes,
        tasks_per_node=launcher.gpus_per_node,
        gpus_per_node=launcher.gpus_per_node,
        cpus_per_task=launcher.cpus_per_task,
        timeout_min=launcher.time_min,
        slurm_partition=launcher.partition,
        slurm_account=launcher.account,
        slurm_qos=launcher.qos,
        **({"mem_gb": launcher.mem_gb} if launcher.mem_gb else {}),
        slurm_signal_delay_s=120,
        name="sam3-finetune",
    )
    jobs_to_run = []
    caches = feature_caches or [None] * len(datasets)
    for dataset, cache in zip(datasets, caches, strict=True):
        target = Path(run_dir) / Path(dataset).name if len(datasets) > 1 else Path(run_dir)
        with run_lock(target, "training run"):  # a job still training there: RunLocked, its params.yaml kept
            write_resolved_params(params, target)
        jobs_to_run.append(_SlurmTask(build_job(params, target, dataset, negatives, train_annotations, cache)))
    on_this_machine = executor.cluster != "slurm"
    if on_this_machine:
        # submitit falls back to running the jobs here, in the background, when it finds no SLURM: say so plainly
        print(
            f"no SLURM on this machine (submitit chose its {executor.cluster!r} executor): the jobs run here as "
            f"background processes; their logs go to {launcher.log_dir}. Submit from a SLURM login node to use the "
            "cluster, or set launcher.kind local to train in the foreground."
        )
    with executor.batch():
        submitted = [executor.submit(task) for task in jobs_to_run]
    where = f" ({executor.cluster}, on this machine)" if on_this_machine else ""
    for dataset, job in zip(datasets, submitted, strict=True):
        print(f"submitted {job.job_id}{where}: {dataset}")
    return submitted
