"""Checkpoints written in the background: the training thread copies, one worker thread writes.

A save stalls training only for the copy of the state to CPU memory (`cpu_snapshot`); torch.save, fsync, the atomic
rename, the folder fsync and the rotation (`sam3.checkpoint.write_checkpoint`) run on `BackgroundWriter`'s thread
while the next steps train:

    stall of a save  =  copy of the trainable weights, buffers and optimiser state to CPU
                        + the rest of the previous write, when it has not finished yet (one write in flight)

The copy is what makes this safe: the optimiser updates weights and moments in place, so the thread must not read
the live tensors. On CUDA each tensor is copied into pinned memory with non_blocking and one synchronize closes the
copies; on the CPU a plain copy. A run copies into the same buffers every time (`SnapshotBuffers`: memory touched
once, no page faults on later saves), so it holds one checkpoint's worth of host memory (pinned on CUDA) for its
whole length; before copying it waits for the write in flight, which reads those buffers (`wait_turn`).

Errors: a write that fails in the thread is kept and raised as CheckpointError, naming the file, by the next
`submit`, `wait_turn`, `flush` or `close`: a run never goes on believing a checkpoint exists that does not. A process
killed during a write leaves the previous files as they were (the rename is atomic; the temp file is removed by the
next save, `sam3.checkpoint`).

Test hook: the environment variable SAM3_CHECKPOINT_WRITE_DELAY_S (seconds, float), read by every write of
`sam3.checkpoint`, sleeps between the fsync of the temp file and its rename, so a test can kill a process while a
write is certainly in flight. It is unset outside tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from sam3.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def cpu_snapshot(value: Any, buffers: SnapshotBuffers | None = None) -> Any:
    """`value` with every tensor replaced by a CPU copy of its own (containers rebuilt, plain values kept).

    CUDA tensors go to pinned memory with non_blocking copies, then one synchronize per device, so the copies are
    complete when this returns; CPU tensors are copied too (the training thread changes the originals in place).
    With `buffers`, each copy goes into the buffer kept for its place in `value` (same shape and dtype) from the
    previous snapshot, allocated only the first time: the caller makes sure no write still reads them.
    """
    devices: set[torch.device] = set()

    def copy(place: tuple, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        cuda = tensor.device.type == "cuda"
        if cuda:
            devices.add(tensor.device)
        out = buffers.get(place, tensor, pinned=cuda) if buffers is not None else None
        if out is None:
            # pinned memory makes the device-to-host copy asynchronous and fast; torch's caching host allocator
            # keeps freed pinned blocks for the next snapshot
            out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=cuda)
            if buffers is not None:
                buffers.keep(place, out)
        return out.copy_(tensor, non_blocking=cuda)

    copied = _map_tensors(value, copy, ())
    for device in devices:
        torch.cuda.synchronize(device)  # the non_blocking copies are done before anyone reads them
    return copied


class SnapshotBuffers:
    """CPU tensors kept from one `cpu_snapshot` to the next, one per place in the snapshot (its key path).

    Copying into memory already touched runs at memcpy speed; a fresh allocation of a checkpoint's size first takes a
    page fault per 4 KiB page (bench/checkpoint.py, the full model with train.freeze vision on this 2-core CPU
    machine: 4.6 GB copied in 2.1 s into fresh memory, 6.4 s when memory was short, 0.45 s into the kept buffers).
    The price: the buffers hold one checkpoint's worth of host memory for the whole run, not only while a write is
    in flight.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple, torch.Tensor] = {}

    def get(self, place: tuple, like: torch.Tensor, pinned: bool) -> torch.Tensor | None:
        """The buffer kept for `place` when it fits a copy of `like` (shape, dtype, pinned or not), else None."""
        out = self._kept.get(place)
        if out is None or out.shape != like.shape or out.dtype != like.dtype or out.is_pinned() != pinned:
            return None
        return out

    def keep(self, place: tuple, buffer: torch.Tensor) -> None:
        self._kept[place] = buffer

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kept.values())


def _map_tensors(value: Any, fn: Callable[[tuple, torch.Tensor], torch.Tensor], place: tuple) -> Any:
    """`value` rebuilt with fn(place, tensor) for each tensor; `place` is the key path to it."""
    if isinstance(value, torch.Tensor):
        return fn(place, value)
    if isinstance(value, dict):
        return type(value)((key, _map_tensors(item, fn, (*place, key))) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_map_tensors(item, fn, (*place, i)) for i, item in enumerate(value))
    return value  # plain scalars, torch.Size, dtypes: immutable


class BackgroundWriter:
    """One worker thread that runs the writes submitted to it, one at a time, in order.

    `submit(label, write)` hands over `write` (a callable over data the caller has already copied) and returns at
    once, unless a write is still running: then it first waits for it (counted in `waits` and `wait_s`, said in a
    DEBUG line; `wait_turn` is that wait alone). `flush()` waits until no write runs. A failed write is raised by
    the next submit / wait_turn / flush / close as CheckpointError naming `label` (the file). Counters: submits,
    waits, wait_s (seconds saves waited), write_s (the seconds of each finished write, in order).
    """

    def __init__(self, name: str = "sam3-checkpoint-writer"):
        self._cond = threading.Condition()
        self._job: tuple[str, Callable[[], Any]] | None = None  # the write running or about to run
        self._error: tuple[str, BaseException] | None = None
        self._closed = False
        self.submits, self.waits, self.wait_s = 0, 0, 0.0
        self.write_s: list[float] = []
        # a daemon: a process that ends without close() (killed, os._exit) does not hang on it; the trainer
        # closes it in a finally so that a write in flight completes on every ordinary exit
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._job is not None

    def submit(self, label: str, write: Callable[[], Any]) -> None:
        """Run `write()` on the worker thread; `label` names it (the file) in logs and errors. Waits first for a
        write still running (`wait_turn`)."""
        with self._cond:
            self._wait_turn(label)
            self._job = (label, write)
            self.submits += 1
            self._cond.notify_all()

    def wait_turn(self, label: str) -> None:
        """Block until no write runs, so that the save of `label` may begin (counted in `waits` when it had to wait,
        said in a DEBUG line); CheckpointError for a failed write. A caller that copies into reused buffers
        (`SnapshotBuffers`) calls this before copying: the write in flight may still read them."""
        with self._cond:
            self._wait_turn(label)

    def _wait_turn(self, label: str) -> None:
        self._raise_error()
        if self._closed:
            raise RuntimeError(f"checkpoint writer is closed; cannot write {label}")
        if self._job is not None:
            log.debug("checkpoint %s waits for the write of %s (one write in flight)", label, self._job[0])
            started = time.perf_counter()
            self._cond.wait_for(lambda: self._job is None)
            self.waits += 1
            self.wait_s += time.perf_counter() - started
            self._raise_error()

    def flush(self) -> None:
        """Block until no write runs; CheckpointError when a write failed since the last check."""
        with self._cond:
            self._cond.wait_for(lambda: self._job is None)
            self._raise_error()

    def close(self, raise_error: bool = True) -> None:
        """Let the write in flight finish, then stop the thread. A failed write is raised (CheckpointError), or with
        `raise_error` False (an exception is already on its way out) logged as an ERROR."""
        with self._cond:
            self._cond.wait_for(lambda: self._job is None)
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if raise_error:
            with self._cond:
                self._raise_error()
        elif self._error is not None:
            label, err = self._error
            self._error = None
            log.error("writing checkpoint %s failed (%s: %s)", label, type(err).__name__, err)

    def _raise_error(self) -> None:
        """Raise the kept failure once (the caller holds the lock)."""
        if self._error is None:
            return
        label, err = self._error
        self._error = None
        raise CheckpointError(
            f"writing checkpoint {label} failed in the background ({type(err).__name__}: {err}); the files written "
            "before it are intact. Free disk space or fix the folder's permissions, then run the same command again "
            "to resume from the newest of them."
        ) from err

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._job is not None or self._closed)
                if self._job is None:
                    return  # closed, nothing left to write
                label, write = self._job
            started = time.perf_counter()
            error = None
            try:
                write()
            except BaseException as err:  # kept for the training thread, which raises it
                error = err
            del write  # drop the copied tensors now, not at the next submit
            with self._cond:
                self.write_s.append(time.perf_counter() - started)
                if error is not None:
                    self._error = (label, error)
                self._job = None
                self._cond.notify_all()
