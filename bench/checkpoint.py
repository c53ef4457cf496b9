"""What a checkpoint costs the run, the old way and the new one, per freeze mode. One JSON object per line.

    python -m bench.checkpoint                                   # tiny model, every freeze mode (seconds)
    python -m bench.checkpoint --model full --freeze vision none # the real size: 840M parameters, random weights

The state saved is a run's: the model (random weights, `sam3.model.load_model`) frozen as the trainer freezes it
(`--freeze` plus what text prompts never reach), the recipe's AdamW (`sam3.optim.build_optimizer`) over the
trainable parameters with its moments filled by one step on constant gradients. Each way saves it `--saves` times
into a temporary folder (`--dir`, default the system's; the files are deleted at the end):

- old: what save_checkpoint did before format version 2, emulated: the whole state_dict (frozen weights included)
  and the optimiser state, written synchronously by the training thread (torch.save, fsync, rename, folder fsync).
  The stall is the whole save.
- new: what a run does now (`sam3.training.resume.RunCheckpoints`): the trainable weights and buffers only, the
  frozen part's fingerprint (hashed once: `fingerprint_s`), the optimiser state; the training thread copies it to
  CPU memory (`sam3.checkpoint_writer.cpu_snapshot`, into the run's reused `SnapshotBuffers`) and hands it to the
  background writer. The stall is the copy and the submit; the write itself (`write_s`, measured in the writer's
  thread) overlaps the next steps. Each save here starts after the previous write finished (checkpoints are many
  steps apart); a save that came sooner would also wait for the rest of the previous write. The first save of a
  run also allocates the buffers (`stall_first_s`); `stall_s` is the median of the later ones.

While the background write runs, the training thread keeps computing: `compute_during_write` is the rate of a
256x256 float32 matmul loop in the training thread during the write, over its rate with no write (1.0: the write
costs the training thread nothing). torch.save releases the GIL while it writes (a pure-Python loop kept its
full rate during a 2 GB write here), so what it takes is cores: on a machine with few of them, the writer's CRC-32,
copies and I/O compete with the training thread's own threads.

Lines: `save` per (freeze, way): file_bytes, stall_s and write_s (median over the saves), params trainable/frozen;
for the new way also copy_s (the part of the stall spent copying to CPU memory), stall_first_s, snapshot_bytes
(the host memory the run keeps for the copies) and fingerprint_s; the new way is skipped (said in the line) when
the copy would not fit in the available memory with 2 GB to spare. Then `summary` per freeze: bytes_ratio
(new / old), stall_ratio (new / old).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from sam3.checkpoint import (
    TrainState,
    checkpoint_payload,
    step_checkpoint_name,
    write_checkpoint,
)
from sam3.checkpoint_frozen import FrozenPart
from sam3.checkpoint_writer import BackgroundWriter, SnapshotBuffers, cpu_snapshot
from sam3.freeze import FREEZE_MODES, apply_freeze
from sam3.model import load_model, parameters_without_text_gradients
from sam3.optim import OptimConfig, build_optimizer

MARGIN = 2e9  # bytes of available memory the new way's copy leaves untouched (else it is skipped)


def filled_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The recipe's AdamW over the trainable parameters, after one step on constant gradients (moments allocated
    and non-zero); the gradients are freed again."""
    optimizer = build_optimizer(model, OptimConfig(), model.config.vision_config.backbone_config.num_hidden_layers)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.full_like(param, 1e-3)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    _return_freed_memory()
    return optimizer


def _return_freed_memory() -> None:
    """Give the freed gradients' heap back to the OS (glibc keeps small freed blocks in its arenas), so the memory
    check of the new way sees what is really free. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def old_payload(model, optimizer, state: TrainState) -> dict:
    """A format-version-1 payload: what save_checkpoint wrote before (every weight, frozen ones included)."""
    payload = checkpoint_payload(model, optimizer, None, None, state, {})
    payload.update(format_version=1, model=model.state_dict())
    del payload["frozen"]
    return payload


def compute_rate(seconds: float, until: threading.Event | None = None) -> float:
    """Matmuls per second of a 256x256 float32 loop in this thread, for `seconds` or until `until` is set."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    count, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        elapsed = time.perf_counter() - started
        if (until is not None and until.is_set()) or (until is None and elapsed >= seconds):
            return count / elapsed


def measure_old(model, optimizer, folder: Path, saves: int) -> dict:
    stalls, size = [], 0
    for step in range(1, saves + 1):
        state = TrainState(step=step)
        started = time.perf_counter()
        path = write_checkpoint(old_payload(model, optimizer, state), folder, step_checkpoint_name(step), keep_last=1)
        stalls.append(time.perf_counter() - started)
        size = path.stat().st_size
    median = statistics.median(stalls)
    return {"way": "old", "file_bytes": size, "stall_s": round(median, 4), "write_s": round(median, 4)}


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = next(int(line.split()[1]) for line in lines if line.startswith("MemAvailable:"))
    return kib * 1024


def snapshot_bytes(model, optimizer, frozen: FrozenPart) -> int:
    """Host memory one background save holds: the trainable state and the optimiser state, copied."""
    tensors = list(frozen.trainable_state().values())
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_new(model, optimizer, folder: Path, saves: int, baseline_rate: float) -> dict:
    frozen = FrozenPart(model)
    needed, available = snapshot_bytes(model, optimizer, frozen), available_bytes()
    if available is not None and needed + MARGIN > available:  # a shared machine: keep clear of the OOM killer
        return {"way": "new", "skipped": f"the copy needs {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"}
    started = time.perf_counter()
    frozen.record()  # once per run, at the first save (RunCheckpoints keeps it)
    fingerprint_s = time.perf_counter() - started
    writer, buffers = BackgroundWriter(), SnapshotBuffers()
    stalls, copies, rates, size = [], [], [], 0
    try:
        for step in range(1, saves + 1):
            state = TrainState(step=step)
            name = step_checkpoint_name(step)
            started = time.perf_counter()
            writer.wait_turn(name)  # as RunCheckpoints: the buffers are free again
            payload = checkpoint_payload(model, optimizer, None, None, state, {}, frozen=frozen)
            copy_started = time.perf_counter()
            payload = cpu_snapshot(payload, buffers)
            copies.append(time.perf_counter() - copy_started)
            done = threading.Event()

            def write(payload=payload, name=name, done=done) -> None:
                try:
                    write_checkpoint(payload, folder, name, keep_last=1)
                finally:
                    done.set()

            writer.submit(name, write)
            stalls.append(time.perf_counter() - started)
            del payload, write  # the writer holds the copy only while writing it, as in a run
            rates.append(compute_rate(0.0, until=done))  # the training thread goes on during the write
            writer.flush()
            size = (folder / name).stat().st_size
    finally:
        writer.close()
    later = slice(1, None) if saves > 1 else slice(None)  # the first save allocates the buffers; later ones reuse
    return {
        "way": "new",
        "file_bytes": size,
        "stall_s": round(statistics.median(stalls[later]), 4),
        "copy_s": round(statistics.median(copies[later]), 4),
        "stall_first_s": round(stalls[0], 4),
        "write_s": round(statistics.median(writer.write_s), 4),
        "fingerprint_s": round(fingerprint_s, 4),
        "frozen_tensors": frozen.record()["names"],
        "snapshot_bytes": needed,
        "compute_during_write": round(statistics.median(rates) / baseline_rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--freeze", nargs="+", choices=FREEZE_MODES, default=list(FREEZE_MODES))
    parser.add_argument("--with-masks", action="store_true", help="segmentation mode: the mask decoder trains")
    parser.add_argument("--saves", type=int, default=3, help="saves per way; the median is reported (default: 3)")
    parser.add_argument("--ways", nargs="+", choices=("old", "new"), default=["old", "new"])
    parser.add_argument("--dir", type=Path, help="where the files are written (default: a temporary folder)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model and its optimiser live (cuda: the copy goes to pinned host memory, as in training)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    started = time.perf_counter()
    detector = load_model(args.model)
    build_s = time.perf_counter() - started
    model = detector.model.to(args.device)
    unused = parameters_without_text_gradients(detector, with_masks=args.with_masks)
    baseline_rate = compute_rate(1.0)
    for freeze in args.freeze:
        counts = apply_freeze(model, freeze, also_freeze=unused)
        optimizer = filled_optimizer(model)
        common = {
            "line": "save",
            "model": args.model,
            "device": args.device,
            "freeze": freeze,
            "trainable_params": counts["trainable"],
            "frozen_params": counts["frozen"],
            "build_s": round(build_s, 1),
        }
        results = {}
        for way in args.ways:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix=f"bench-checkpoint-{freeze}-{way}-") as folder:
                if way == "old":
                    results[way] = measure_old(model, optimizer, Path(folder), args.saves)
                else:
                    results[way] = measure_new(model, optimizer, Path(folder), args.saves, baseline_rate)
            print(json.dumps({**common, **results[way]}), flush=True)
        if len(results) == 2 and not any("skipped" in r for r in results.values()):
            old, new = results["old"], results["new"]
            summary = {
                "line": "summary",
                "model": args.model,
                "freeze": freeze,
                "bytes_ratio": round(new["file_bytes"] / old["file_bytes"], 4),
                "stall_ratio": round(new["stall_s"] / old["stall_s"], 4),
            }
            print(json.dumps(summary), flush=True)
        optimizer.state.clear()  # free the moments before the next mode builds its own optimiser
        del optimizer


if __name__ == "__main__":
    main()
