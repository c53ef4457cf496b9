"""What a checkpoint leaves out: the frozen parameters, named and fingerprinted instead of saved.

A frozen parameter (requires_grad False, `sam3.freeze`) never changes during a run: the run rebuilds it from the
model source on resume exactly as it did at the start. So a checkpoint (format version 2, `sam3.checkpoint`) holds
only the rest of the state_dict, and a record of the frozen part to check the rebuilt model against:

    trainable state  =  state_dict(model) minus the frozen keys (trainable parameters and every buffer)
    frozen keys      =  the state_dict keys of parameters with requires_grad False, sorted
    record           =  {"names": len(frozen keys),
                         "sha256": sha256 over the frozen keys k, in order, of
                                   k NUL shape NUL dtype NUL (the tensor's bytes, C order)}

The real model (840M parameters, fp32, AdamW; bench/checkpoint.py): train.freeze vision leaves 1.8 of its 3.4 GB
of weights out, a file of 4.6 GB instead of 6.4; heads leaves 3.3 GB out, 0.15 GB instead of 3.5 (frozen
parameters never had AdamW moments). Hashing reads every frozen byte (1.5 s for vision's 1.8 GB, 2.6 s for heads'
3.3 GB on one core), so `FrozenPart` computes the record once and keeps it while the set of frozen keys stays the
same; `forget()` drops it when the frozen weights themselves were overwritten (a version-1 checkpoint, which holds
every weight, was loaded).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class FrozenPart:
    """The frozen parameters of one (bare) model: their keys, and their record hashed once and kept."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._keys: tuple[str, ...] | None = None
        self._record: dict[str, int | str] | None = None

    def keys(self) -> tuple[str, ...]:
        """The state_dict keys of the parameters that do not train now, sorted (cheap: names only)."""
        state_keys = set(self.model.state_dict(keep_vars=True))
        # remove_duplicate=False: a parameter shared by two modules has two state_dict keys, both frozen
        frozen = {name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return tuple(sorted(frozen & state_keys))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The state_dict without the frozen keys, detached (the tensors themselves, not copies)."""
        frozen = set(self.keys())
        return {key: value.detach() for key, value in self.model.state_dict().items() if key not in frozen}

    def record(self) -> dict[str, int | str]:
        """{"names": count, "sha256": hex digest} of the frozen part (module docstring); hashed again only when the
        frozen keys changed since the last call, or after `forget()`."""
        keys = self.keys()
        if self._record is None or keys != self._keys:
            started = time.perf_counter()
            self._keys, self._record = keys, fingerprint(self.model, keys)
            log.debug("fingerprint of %d frozen tensors: %.2f s", len(keys), time.perf_counter() - started)
        return self._record

    def forget(self) -> None:
        """The frozen weights were overwritten: hash them again at the next `record()`."""
        self._keys = self._record = None


def fingerprint(model: nn.Module, keys: tuple[str, ...]) -> dict[str, int | str]:
    """The record of the state_dict entries `keys` of `model` (module docstring)."""
    state = model.state_dict()
    return tensors_fingerprint([(key, state[key]) for key in keys])


def tensors_fingerprint(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, int | str]:
    """{"names": count, "sha256"} over (key, tensor) pairs in the given order (module docstring's digest)."""
    digest = hashlib.sha256()
    for key, tensor in named:
        tensor = tensor.detach()
        digest.update(f"{key}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        # one tensor at a time on the CPU: a GPU model is never copied whole; view(uint8) also covers bf16
        data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().data)
    return {"names": len(named), "sha256": digest.hexdigest()}
