"""Divergence guard: spot a loss that went non-finite or spiked, and count the rollbacks it caused.

A loss is bad when it is NaN or +-inf, or, once `min_history` good losses were seen, when

    loss > spike_factor * median(last `window` good losses)

(the median, unlike the mean, is not dragged up by the few large losses of a hard batch). Bad losses are not
added to the window. The spike test is skipped while that median is <= 0, where a ratio means nothing; the
losses of this project are non-negative.

How the trainer uses it, one optimiser step at a time:

    reason = guard.check(result.mean_loss, step)   # a float the step read (sam3.engine): averaged over
                                                   # ranks, so every rank agrees; no host sync here
    if reason is not None:
        log.warning(reason)
        multiplier = guard.register_rollback()      # raises DivergenceError once past max_rollbacks
        load_checkpoint(last_good, model, optimizer, scaler)   # NOT guard.load_state_dict: keep the count
        # from now on: lr = schedule(step) * multiplier, applied to the original base lrs
    ...
    train_state.guard = guard.state_dict()          # saved with each checkpoint; restored on resume

The multiplier is lr_factor ** rollbacks relative to the original learning rates, so it must be applied to
them (at set-lr time), not compounded into the optimiser's stored lrs.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from sam3.config import GuardConfig
from sam3.errors import Sam3Error


class DivergenceError(Sam3Error):
    """Training kept diverging after the allowed number of rollbacks."""


class DivergenceGuard:
    """Running-median spike and non-finite loss detector with a rollback budget.

    Configured by `GuardConfig` (the `guard` section). spike_factor: a loss above spike_factor x the running median
    is a spike. window: how many recent good losses the median is taken over. min_history: good losses needed before
    spikes are judged (non-finite losses are flagged from the first step). lr_factor: learning-rate multiplier per
    rollback. max_rollbacks: rollbacks allowed; the next one raises DivergenceError.
    """

    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        spike_factor, window, min_history = config.spike_factor, config.window, config.min_history
        lr_factor, max_rollbacks = config.lr_factor, config.max_rollbacks
        if spike_factor <= 1.0:
            raise ValueError(f"spike_factor must be > 1 (a loss equal to the median is no spike), got {spike_factor}")
        if not 1 <= min_history <= window:
            raise ValueError(f"need 1 <= min_history <= window, got min_history={min_history}, window={window}")
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        if max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
        self.spike_factor = spike_factor
        self.window = window
        self.min_history = min_history
        self.lr_factor = lr_factor
        self.max_rollbacks = max_rollbacks
        self.history: deque[float] = deque(maxlen=window)
        self.rollbacks = 0
        self.last_reason: str | None = None

    @property
    def lr_multiplier(self) -> float:
        """lr_factor ** rollbacks: 1 before any rollback."""
        return self.lr_factor**self.rollbacks

    def check(self, loss: float, step: int | None = None) -> str | None:
        """None if `loss` is fine (it then joins the window), else the reason it is not.

        `step` only goes into the reason so the log says where it happened.
        """
        value = float(loss)
        where = "" if step is None else f" at step {step}"
        if not math.isfinite(value):
            return self._flag(f"non-finite loss {value}{where}")
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and value > self.spike_factor * median:
                return self._flag(
                    f"loss {value:.4g}{where} is {value / median:.1f}x the running median {median:.4g} "
                    f"of the last {len(self.history)} good losses (limit {self.spike_factor:g}x)"
                )
        self.history.append(value)
        return None

    def register_rollback(self) -> float:
        """Count one rollback and return the new lr multiplier; raise DivergenceError past max_rollbacks."""
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise DivergenceError(
                f"training diverged again after {self.max_rollbacks} rollback(s), each to the last good checkpoint "
                f"with the learning rate multiplied by {self.lr_factor:g}; last problem: {self.last_reason}. "
                "Lower the learning rates, check the data for broken boxes or masks (run the validate stage), "
                "or allow more rollbacks."
            )
        return self.lr_multiplier

    def rewind(self, state: dict[str, Any]) -> None:
        """After a rollback: the window of the checkpoint rolled back to (`state`, its `state_dict()`), so the
        restored weights' losses are judged against the losses they had, not the newer ones of the steps undone (an
        early checkpoint's losses are far above those: they would read as spikes). The rollback count is kept."""
        self.history = deque((float(x) for x in state.get("history", [])), maxlen=self.window)

    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so it can ride in a weights_only checkpoint."""
        return {"history": list(self.history), "rollbacks": self.rollbacks, "last_reason": self.last_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after a resume. The window keeps the newest `window` losses if it shrank."""
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)
        self.rollbacks = int(state["rollbacks"])
        self.last_reason = state["last_reason"]

    def _flag(self, reason: str) -> str:
        self.last_reason = reason
        return reason
