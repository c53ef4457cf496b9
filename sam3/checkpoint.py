"""Training checkpoints: atomic save, rotation, resume from the newest readable file.

A checkpoint is one `torch.save` file holding everything a run needs to continue as if it had never stopped:

    format, format_version   our tag, so a foreign file is refused with a clear message
    train_state              `TrainState` as a plain dict (step, epoch, ...)
    model                    the state_dict of the model, unwrapped from DDP / torch.compile, WITHOUT its frozen
                             parameters (`sam3.checkpoint_frozen`): the trainable parameters and every buffer
    frozen                   {"names": count, "sha256": digest} of the frozen parameters left out: loading refuses a
                             model whose frozen part differs (another model source); the run rebuilds them from its
                             model source, as at its start
    optimizer                optimizer state_dict (AdamW moments, param groups with `base_lr`); None in a file of
                             weights only (the best checkpoint), which can be exported but not resumed
    scheduler                the trainer's scheduler state (plain dict) or None
    scaler                   GradScaler state_dict, None when there is no enabled scaler
    rng                      python `random`, numpy global, torch CPU and every CUDA device's generator
    params                   the resolved parameters of the run (plain dict)

Every value is a tensor or a plain Python value (dict, list, tuple, str, int, float, bool, None), checked before
writing, so every file loads with `torch.load(..., weights_only=True)`: no pickled code runs when a checkpoint
is read.

Files: `step_{step:08d}.pt` for the rolling checkpoints (the newest `keep_last` are kept), any other name for
checkpoints kept for good (`epoch_checkpoint_name(n)` = `epoch_{n:04d}.pt`, `BEST_CHECKPOINT` = `best.pt`, the weights
of the best validation so far). A save writes a hidden temporary
file in the same folder, flushes and fsyncs it, renames it over the final name (`os.replace` is atomic on one
file system) and fsyncs the folder, so a crash or SIGKILL at any moment leaves either the old set of files or
the new one, never a half-written checkpoint under a real name.

Integrity: torch's zip format stores a CRC-32 of every record, which torch.load never checks; `latest_checkpoint`
does (`sam3.checkpoint_integrity`), so a file damaged in its middle (size kept), truncated or unreadable is skipped
(with `set_aside_damaged`, moved to corrupt/) and the newest intact one is returned. Files written before that
check existed carry the same CRCs and are verified alike.

Versions: 1 held the whole state_dict and no "frozen" record; such files still load (strictly, every weight). 2 is
written now. With train.freeze none every parameter trains and a file is as large as a version-1 one.

A save is two halves that `save_checkpoint` runs in a row and a run splits over two threads
(`sam3.checkpoint_writer`): `checkpoint_payload` gathers the values (which the run copies to CPU memory,
`cpu_snapshot`, so the training thread may go on changing the originals) and `write_checkpoint` writes them as above.
The environment variable SAM3_CHECKPOINT_WRITE_DELAY_S (a test hook, unset otherwise) sleeps that many seconds
between the fsync of the temp file and the rename.

One process writes a folder (rank 0 under DDP); the RNG states saved are that process's.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sam3.checkpoint_frozen import FrozenPart
from sam3.checkpoint_integrity import damage, set_aside
from sam3.errors import Sam3Error

log = logging.getLogger(__name__)

FORMAT = "sam3-finetune-checkpoint"
FORMAT_VERSION = 2  # 1: the whole state_dict, no frozen record (still read)
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-"
WRITE_DELAY_ENV = "SAM3_CHECKPOINT_WRITE_DELAY_S"  # test hook: seconds between the temp file and the rename
# What torch's weights_only unpickler accepts, as we allow it. Exact types for scalars and containers:
# subclasses such as numpy.float64 (a float) or enum members (an int / str) are refused by that unpickler.
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
_PLAIN_MAPPINGS = (dict, OrderedDict)
_PLAIN_SEQUENCES = (list, tuple, set, torch.Size)


class CheckpointError(Sam3Error):
    """A checkpoint file is missing, unreadable, not ours, or does not fit the model/optimizer given."""


@dataclass
class TrainState:
    """Small counters of a run, saved with every checkpoint.

    step: optimiser steps done so far; epoch: the epoch the next step belongs to; epoch_step: optimiser steps
    already done inside that epoch (a mid-epoch resume skips that many batches); best_metric: the best
    validation metric so far, None before the first evaluation; best_step: the step it was measured at;
    validations_since_best: validations since then without improvement (early stopping counts these);
    total_steps: the run's length when this state was saved (None in files older than the field), so a resumed
    run can say that its length changed; guard: `DivergenceGuard.state_dict()`.
    Fields missing from an older file take these defaults when it is loaded.
    """

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    validations_since_best: int = 0
    total_steps: int | None = None
    guard: dict[str, Any] = field(default_factory=dict)


BEST_CHECKPOINT = "best.pt"  # the weights of the best validation so far (sam3.training.best); never rotated


def step_checkpoint_name(step: int) -> str:
    """`step_00000042.pt`: zero-padded so names sort like steps (we still sort by the parsed number)."""
    return f"step_{step:08d}.pt"


def epoch_checkpoint_name(epoch: int) -> str:
    """`epoch_0003.pt`: a checkpoint kept for good, never removed by rotation."""
    return f"epoch_{epoch:04d}.pt"


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler_state: dict[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    train_state: TrainState,
    params: dict[str, Any],
    keep_last: int = 3,
    extra_names: tuple[str, ...] = (),
    name: str | None = None,
    frozen: FrozenPart | None = None,
) -> Path:
    """Atomically write a checkpoint and rotate old step files, in this thread; returns the path written.

    The file is `ckpt_dir/step_{step:08d}.pt`, or `ckpt_dir/name` when `name` is given (e.g.
    `epoch_checkpoint_name(3)`). After writing, step files other than the `keep_last` newest and those named in
    `extra_names` are deleted (pass the same `extra_names` on every call); files not named `step_*.pt` are
    never deleted. `optimizer` None writes the weights without optimiser state (a third of the bytes with AdamW):
    such a file is exported or evaluated, never resumed. Frozen parameters are left out (module docstring); pass
    the run's `frozen` to hash them once per run rather than on every call. Raises TypeError, before anything is
    written, if some value is not a tensor or plain Python value (the file would not load with weights_only).
    """
    file_name = checkpoint_file_name(step, train_state, name, keep_last)
    payload = checkpoint_payload(model, optimizer, scheduler_state, scaler, train_state, params, frozen)
    return write_checkpoint(payload, ckpt_dir, file_name, keep_last, extra_names)


def checkpoint_file_name(step: int, train_state: TrainState, name: str | None, keep_last: int) -> str:
    """The file name a save of `step` writes (`save_checkpoint`); ValueError for arguments that cannot be saved."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the checkpoint just written is one of them), got {keep_last}")
    if train_state.step != step:
        raise ValueError(f"step {step} differs from train_state.step {train_state.step}")
    file_name = step_checkpoint_name(step) if name is None else name
    if Path(file_name).name != file_name or not file_name.endswith(".pt") or file_name.startswith(_TEMP_PREFIX):
        raise ValueError(f"checkpoint name must be a plain file name ending in .pt, got {file_name!r}")
    return file_name


def checkpoint_payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler_state: dict[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    train_state: TrainState,
    params: dict[str, Any],
    frozen: FrozenPart | None = None,
) -> dict[str, Any]:
    """What a checkpoint file holds (module docstring), checked plain (TypeError otherwise).

    The tensors are the model's and optimiser's own, for a write that happens before they change again; a write in
    another thread while training goes on takes `sam3.checkpoint_writer.cpu_snapshot` of this. `frozen`: the bare
    model's `FrozenPart`, whose record is hashed once and kept; None hashes the frozen parameters now.
    """
    target = _unwrap(model)
    if frozen is None:
        frozen = FrozenPart(target)
    elif frozen.model is not target:
        raise ValueError("frozen describes another model than the one saved")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "train_state": asdict(train_state),
        "model": frozen.trainable_state(),
        "frozen": frozen.record(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler_state,
        # a disabled GradScaler's state_dict is {} and cannot be loaded back, so store None
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": _rng_state(),
        "params": params,
    }
    _check_plain(payload, "checkpoint")
    return payload


def write_checkpoint(
    payload: dict[str, Any],
    ckpt_dir: str | Path,
    file_name: str,
    keep_last: int = 3,
    extra_names: tuple[str, ...] = (),
) -> Path:
    """Write `payload` (`checkpoint_payload`) atomically as ckpt_dir/file_name, then rotate the step files
    (`save_checkpoint`); the path written. Safe to run in another thread, one write per folder at a time."""
    folder = Path(ckpt_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(folder)
    final = folder / file_name
    _atomic_torch_save(payload, final)
    _rotate(folder, keep_last, extra_names)
    state = payload["train_state"]
    log.info("saved checkpoint %s (step %d, epoch %d)", final, state["step"], state["epoch"])
    return final


def latest_checkpoint(ckpt_dir: str | Path, set_aside_damaged: bool = False) -> Path | None:
    """The newest intact step checkpoint in `ckpt_dir`, or None when there is none.

    Step files are tried from the highest step down. One that is damaged (a record whose CRC-32 does not match,
    truncated: `sam3.checkpoint_integrity.damage`, which reads the whole file) or that torch cannot read is skipped
    with a WARNING naming it and why; with `set_aside_damaged` (the process that owns the folder, when resuming)
    it is also moved to ckpt_dir/corrupt/, never deleted, so the next save cannot mistake it for the newest. An
    intact file that is not ours (a bare state_dict) is skipped and left where it is. The readability probe
    memory-maps the file (`mmap=True`), so it unpickles the small index without copying the weights.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    for _, path in sorted(_step_files(folder), reverse=True):
        problem = damage(path)
        if problem is None:
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises OSError, RuntimeError, KeyError, ... for a file it cannot use
                problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is not None:
            if set_aside_damaged:
                moved = set_aside(path)
                log.warning("skipping checkpoint %s, %s; moved it to %s", path, problem, moved)
            else:
                log.warning("skipping checkpoint %s, %s", path, problem)
            continue
        if not _is_ours(payload):
            log.warning("skipping %s: not a %s file", path, FORMAT)
            continue
        return path
    return None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
    frozen: FrozenPart | None = None,
) -> tuple[TrainState, dict[str, Any] | None, dict[str, Any]]:
    """Restore model, optimizer, scaler and RNG states from `path`.

    The model is built from its source first (frozen weights included), then the file is loaded over it. Version 2:
    the saved keys must be exactly the model's trainable parameters and buffers, and the frozen record must match the
    model's (`sam3.checkpoint_frozen`; pass the run's `frozen` to hash once per run); version 1: every key, strictly.
    Returns (train_state, scheduler_state, params): the trainer restores its scheduler itself and may compare
    `params` with the current ones. Raises CheckpointError when the file is missing, unreadable, not ours, or
    does not fit the given model/optimizer.
    """
    path = Path(path)
    payload = _read(path, map_location)
    target = _unwrap(model)
    if frozen is None:
        frozen = FrozenPart(target)
    elif frozen.model is not target:
        raise ValueError("frozen describes another model than the one loaded into")
    _load_model_state(path, payload, target, frozen)

    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(
                f"{path} holds weights only, no optimiser state (a best checkpoint): export or evaluate it, resume "
                "from a step_*.pt file"
            )
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{path}: the saved optimizer state does not fit this optimizer ({err}). The parameter groups "
                "changed (another freeze or optimiser setting?); resume with the params stored in the checkpoint."
            ) from err
    if scaler is not None and scaler.is_enabled():
        if payload["scaler"] is None:
            log.info("%s holds no GradScaler state (saved without mixed precision); the scaler starts fresh", path)
        else:
            scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        _set_rng_state(payload["rng"])

    known = {f.name for f in fields(TrainState)}
    train_state = TrainState(**{k: v for k, v in payload["train_state"].items() if k in known})
    log.info("loaded checkpoint %s (step %d, epoch %d)", path, train_state.step, train_state.epoch)
    return train_state, payload["scheduler"], payload["params"]


def _load_model_state(path: Path, payload: dict[str, Any], target: nn.Module, frozen: FrozenPart) -> None:
    """Load the file's weights into the bare model `target`: all of them (version 1), or all but the frozen ones,
    whose record must match (version 2). CheckpointError when they do not fit: before any weight is changed when
    the names or the frozen record differ."""
    state = payload["model"]
    whole = payload["format_version"] < 2  # a version-1 file holds the frozen weights too
    frozen_keys = () if whole else frozen.keys()
    expected = set(target.state_dict()) - set(frozen_keys)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the saved weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). It was saved from another model or with another "
            "train.freeze; resume with the params stored in it, or start the new run in an empty checkpoint folder."
        )
    if not whole:
        _check_frozen(path, payload.get("frozen"), frozen.record())
    try:
        # strict=False only for the frozen keys, which the file leaves out; size mismatches still raise
        result = target.load_state_dict(state, strict=whole)
    except RuntimeError as err:  # same names, different shapes
        raise CheckpointError(f"{path}: the saved weights do not fit this model: {err}") from err
    if whole:
        frozen.forget()  # the frozen weights are the file's now: hash them again
    elif sorted(result.missing_keys) != list(frozen_keys) or result.unexpected_keys:
        # not expected after the checks above: the frozen parameters must be exactly what the file left out
        raise CheckpointError(
            f"{path}: loading left {len(result.missing_keys)} weights as built where the model has "
            f"{len(frozen_keys)} frozen ones, and {len(result.unexpected_keys)} unused. Start the new run in an "
            "empty checkpoint folder."
        )


def _check_frozen(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """CheckpointError when the frozen part the file was trained over (its record) is not this model's."""
    if saved == current:
        return
    if saved is None:
        what = "the file has no record of them"
    elif saved.get("names") != current["names"]:
        what = f"{saved.get('names')} frozen tensors in the file, {current['names']} in this model"
    else:
        what = (
            f"the same {current['names']} frozen tensors, other values (sha256 {str(saved.get('sha256'))[:12]}... in "
            f"the file, {current['sha256'][:12]}... here)"
        )
    raise CheckpointError(
        f"{path} was trained over other frozen weights than this model's ({what}); the file holds only the "
        "trained part and needs the frozen part it was trained with. Build the model from the same model source "
        "(model.source: the same weights folder, unchanged) as the run that wrote it, or start the new run in an "
        "empty checkpoint folder."
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`).

    Saving the bare model keeps keys free of `module.` / `_orig_mod.` prefixes, so a checkpoint from a DDP run
    loads into a single-process model and the other way round.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and plain values (no numpy arrays, no tuples of objects)."""
    py_version, py_key, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_key), py_gauss],
        "numpy": {
            "bit_generator": str(np_name),
            "key": torch.from_numpy(np_key.astype(np.int64)),  # uint32 values; torch has no uint32 tensors to save
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    py_version, py_key, py_gauss = rng["python"]
    random.setstate((py_version, tuple(py_key), py_gauss))
    np_state = rng["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(rng["torch"].cpu())
    cuda_states = rng["cuda"]
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        log.warning(
            "checkpoint holds %d CUDA RNG states but CUDA is not available; they are not restored", len(cuda_states)
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        log.warning(
            "checkpoint holds CUDA RNG states for %d devices, this machine has %d; restoring the first %d",
            len(cuda_states),
            count,
            min(count, len(cuda_states)),
        )
    for device, state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(state.cpu(), device)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first value (by key path) that weights_only loading would refuse."""
    if type(value) in _PLAIN_MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in _PLAIN_SEQUENCES:
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif type(value) not in _PLAIN_SCALARS and not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}, which torch.load(weights_only=True) "
            "refuses; convert it to a plain value (str, int, float, list, dict) or a tensor before saving"
        )


def _is_ours(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}; check the path (latest_checkpoint finds the newest)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure here means the file cannot be used; keep torch's words in the message
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {err}). It is truncated, corrupt or holds "
            "pickled objects; move it away to resume from the previous one (a resuming run sets it aside by itself), "
            "or pass another file."
        ) from err
    if not _is_ours(payload):
        raise CheckpointError(
            f"{path} is not a {FORMAT} file (a bare state_dict or another tool's checkpoint?). Pass a file "
            "written by save_checkpoint; pretrained weights are loaded by the model adapter, not here."
        )
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload['format_version']}, this code reads up to "
            f"{FORMAT_VERSION}; upgrade sam3-finetune to resume from it"
        )
    return payload


def _atomic_torch_save(payload: dict[str, Any], final: Path) -> None:
    """torch.save into a temp file next to `final`, fsync it, rename it over `final`, fsync the folder."""
    fd, temp_name = tempfile.mkstemp(dir=final.parent, prefix=f"{_TEMP_PREFIX}{final.name}.")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        _test_write_delay()
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(final.parent)


def _test_write_delay() -> None:
    """The test hook SAM3_CHECKPOINT_WRITE_DELAY_S (module docstring): a write that stays in flight that long."""
    delay = os.environ.get(WRITE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable. Folders cannot be opened for fsync on Windows; there we rely on NTFS."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_files(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.iterdir():
        match = _STEP_FILE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return found


def _rotate(folder: Path, keep_last: int, extra_names: tuple[str, ...]) -> None:
    """Delete step files other than the `keep_last` highest steps and those named in `extra_names`."""
    for _, path in sorted(_step_files(folder), reverse=True)[keep_last:]:
        if path.name not in extra_names:
            path.unlink()
            log.debug("rotated out checkpoint %s", path)


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files left by a save that was killed mid-write; only one process writes a folder, so none is live."""
    stale = [path for path in folder.glob(f"{_TEMP_PREFIX}*") if path.is_file()]
    for path in stale:
        path.unlink()
    if stale:
        log.warning(
            "removed %d unfinished checkpoint temp file(s) in %s left by an interrupted save", len(stale), folder
        )
