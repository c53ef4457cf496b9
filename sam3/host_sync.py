"""Host syncs of a training step: counted, and the deliberate ones funnelled through one copy each way.

On a GPU the CPU queues kernels ahead of the device; any operation whose result the CPU must see (a scalar read, an
output whose shape depends on the data, a copy to host memory, a blocking copy from it) stops the CPU until the
GPU has caught up, and the GPU then idles while the CPU queues the next kernels. `count_host_syncs()` counts those
operations during a block of code, by kind:

    scalar_reads           aten._local_scalar_dense (`.item()`, `float(t)`, `bool(t)`, `int(t)`), aten.equal
    data_dependent_shapes  aten.nonzero, masked_select, unique*, bincount, repeat_interleave without output_size,
                           index / index_put with a boolean index (`t[mask]`, `t[mask] = v`)
    host_copies            `to_host` calls, and aten._to_copy / copy_ from a device to the CPU outside it
    blocking_uploads       on CUDA, copies from the CPU to the device without non_blocking and `torch.tensor(...,
                           device="cuda")` (a blocking upload waits for the stream to drain); on a CPU run, where
                           no upload exists, every tensor of one or more dimensions made from host data
                           (aten.lift_fresh: torch.tensor, torch.as_tensor, torch.from_numpy) inside the block,
                           the stand-in for the upload that would follow it on a GPU (an upper bound: a CPU tensor
                           that never reaches the device counts too; a lower one: `torch.tensor(0-dim, device=...)`
                           is not counted, as a CPU run cannot tell it from a Python scalar written into a tensor)

and reports `total`, their sum. `to_device` calls, uploads from pinned memory that do not block, are counted apart
(`async_uploads`, not in the total). Each event is also attributed to where it came from (`by_origin`):
"backward" (inside autograd's backward), "transformers" (the innermost project-or-library frame is transformers'
code: syncs we cannot change), or "ours" (this project's code, sam3/ and bench/, calling torch directly: the ones
we can); `sites` counts them per kind, origin and file:line.

A CPU tensor's `.cpu()` dispatches nothing, so on a CPU run a deliberate device->host copy would go unseen; route
every one through `to_host(*tensors)`, which counts itself once and makes ONE copy for all its tensors, so the count
is the same on the CPU and on a GPU. Work on the host copies is then done in numpy (which dispatches nothing),
so a CPU run does not count host-side arithmetic that on a GPU run costs no sync.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("scalar_reads", "data_dependent_shapes", "host_copies", "blocking_uploads")
ORIGINS = ("ours", "transformers", "backward", "other")

_aten = torch.ops.aten
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.equal.default}
_DATA_DEPENDENT = {
    "nonzero",  # overload packets: every overload of these counts
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",  # its output length is max(input) + 1
}
_BOOL_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}

_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + "/" for name in ("sam3", "bench"))
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + "/"
_THIS_FILE = str(Path(__file__).resolve())
# Byte offsets of the packed buffer's pieces are rounded up to this, so every piece can be viewed back as its dtype.
_ALIGN = 16

_local = threading.local()


@dataclass
class HostSyncs:
    """What `count_host_syncs` counted: by kind (module docstring), by origin, and per site."""

    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    by_origin: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ORIGINS, 0))
    sites: Counter = field(default_factory=Counter)
    async_uploads: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def add(self, kind: str) -> None:
        origin, site = _where()
        self.by_kind[kind] += 1
        self.by_origin[origin] += 1
        self.sites[f"{kind} {origin} {site}"] += 1


class _SyncCounter(TorchDispatchMode):
    """Classifies each aten op that reaches the Python dispatch key (below autograd: forward and backward ops)."""

    def __init__(self, syncs: HostSyncs, cpu_run: bool):
        super().__init__()
        self.syncs, self.cpu_run = syncs, cpu_run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_local, "quiet", 0):
            kind = _classify(func, args, kwargs, self.cpu_run)
            if kind is not None:
                self.syncs.add(kind)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str = "cpu") -> Iterator[HostSyncs]:
    """Count the host syncs of the block (module docstring); the yielded `HostSyncs` fills as the block runs.

    `device`: where the counted step computes. On "cpu" a tensor made from host data counts as a blocking upload
    (the stand-in for the upload a GPU run would make); elsewhere only the real uploads count.
    Counters nest: an inner one counts its block, an outer one everything including the inner block.
    """
    syncs = HostSyncs()
    active = _active()
    active.append(syncs)
    try:
        with _SyncCounter(syncs, cpu_run=torch.device(device).type == "cpu"):
            yield syncs
    finally:
        active.remove(syncs)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Copy `tensors` to the CPU in ONE device->host transfer; counted as one host copy by every active counter.

    Any dtypes and shapes: their bytes are packed into one buffer on their (common) device, copied, and viewed back,
    so the values are bitwise those of the inputs. The results are new CPU tensors (never views of the inputs, also
    on a CPU run), in the order given. Blocks until the device has computed the inputs: call it once, for everything
    the host needs at that point.
    """
    _count("host_copies")
    with _quiet():
        buffer = _pack(tensors)
        return _unpack(buffer.to("cpu"), tensors)


def to_device(arrays: Sequence[torch.Tensor | np.ndarray], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Copy CPU tensors or numpy arrays to `device` in ONE host->device transfer, from pinned memory on CUDA, without
    blocking.

    Bitwise the same values, in the order given; new tensors on `device` (also on a CPU run). Counted apart from
    the syncs (`HostSyncs.async_uploads`): a non-blocking upload from pinned memory lets the CPU run on. Numpy
    arrays become tensors in here, where no counter sees it, so a CPU run does not count them as uploads.
    """
    for syncs in _active():
        syncs.async_uploads += 1
    device = torch.device(device)
    with _quiet():
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in arrays]
        buffer = _pack(tensors)
        if device.type == "cuda":
            buffer = buffer.pin_memory()
        return _unpack(buffer.to(device, non_blocking=True), tensors)


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 [B]: the bytes of every tensor, each piece starting at a multiple of _ALIGN."""
    pieces = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        pieces.append(raw)
        if pad:
            pieces.append(raw.new_zeros(pad))
    if not pieces:
        device = tensors[0].device if tensors else "cpu"
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(pieces)


def _unpack(buffer: torch.Tensor, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The tensors of `_pack(like)` read back from `buffer` (a copy of it, anywhere)."""
    out, offset = [], 0
    for t in like:
        nbytes = t.numel() * t.element_size()
        out.append(buffer[offset : offset + nbytes].view(t.dtype).view(t.shape))
        offset += nbytes + (-nbytes % _ALIGN)
    return tuple(out)


def _classify(func, args, kwargs, cpu_run: bool) -> str | None:
    """The kind of host sync `func(*args, **kwargs)` is, or None."""
    if func in _SCALAR_READS:
        return "scalar_reads"
    name = func.overloadpacket.__name__
    if name in _DATA_DEPENDENT:
        return "data_dependent_shapes"
    if name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
        if kwargs.get("output_size") is None:  # repeats given as a tensor: the output length is their sum
            return "data_dependent_shapes"
    if name in _BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "data_dependent_shapes"
    if name == "_to_copy":
        source, target = args[0].device, kwargs.get("device") or args[0].device
        return _copy_kind(source, torch.device(target), kwargs.get("non_blocking", False))
    if name == "copy_":
        target, source = args[0].device, args[1].device
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return _copy_kind(source, target, non_blocking)
    if name == "lift_fresh":
        # a tensor made from host data: on CUDA already uploaded (blocking) when it lives there; on a CPU run the
        # stand-in for the upload to come (module docstring), except a 0-dim one: that is how a CPU run wraps a
        # Python scalar written into a tensor (`t[idx] = True`), which on a GPU becomes a device fill, no upload
        if args[0].device.type != "cpu" or (cpu_run and args[0].dim() > 0):
            return "blocking_uploads"
    return None


def _copy_kind(source: torch.device, target: torch.device, non_blocking: bool) -> str | None:
    if source.type != "cpu" and target.type == "cpu":
        return "host_copies"
    if source.type == "cpu" and target.type != "cpu" and not non_blocking:
        return "blocking_uploads"
    return None


def _where() -> tuple[str, str]:
    """(origin, site) of the op being counted, from the Python stack (module docstring)."""
    origin, site = "other", "?"
    frame = sys._getframe(1)
    while frame is not None:
        path, name = frame.f_code.co_filename, frame.f_code.co_name
        if name == "_engine_run_backward":  # wherever the op came from, it runs in a backward pass
            return "backward", site if origin != "other" else "backward"
        if origin == "other" and path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            # the innermost frame of transformers or of this project; torchvision, scipy...: who called them
            if "/transformers/" in path:
                origin, site = "transformers", f"{_short(path)}:{frame.f_lineno}"
            elif path.startswith(_PROJECT_DIRS):
                origin, site = "ours", f"{_short(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return origin, site


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/sam3/", "/bench/"):
        if marker in path:
            head = "" if marker == "/site-packages/" else marker.strip("/") + "/"
            return head + path.split(marker, 1)[1]
    return path


def _active() -> list[HostSyncs]:
    if not hasattr(_local, "active"):
        _local.active = []
    return _local.active


def _count(kind: str) -> None:
    for syncs in _active():
        syncs.add(kind)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The ops of to_host / to_device themselves are not counted again."""
    _local.quiet = getattr(_local, "quiet", 0) + 1
    try:
        yield
    finally:
        _local.quiet -= 1
