"""DivergenceGuard on hand-written loss sequences: spike = loss > factor x median(last `window` good losses)."""

import io
import math

import pytest
import torch

from sam3.config import GuardConfig
from sam3.errors import Sam3Error
from sam3.guard import DivergenceError, DivergenceGuard


def _feed(guard, losses):
    """Check each loss; all must pass (they build the history)."""
    for step, loss in enumerate(losses):
        assert guard.check(loss, step) is None, f"loss {loss} at step {step} should pass"


def test_spike_above_factor_times_median_is_flagged_and_not_recorded():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, window=50, min_history=10))
    _feed(guard, [1.0] * 10)  # median 1.0, limit 10 x 1.0 = 10.0
    reason = guard.check(11.0, step=10)  # 11.0 > 10.0
    assert reason == "loss 11 at step 10 is 11.0x the running median 1 of the last 10 good losses (limit 10x)"
    assert guard.last_reason == reason
    assert len(guard.history) == 10  # the spike did not join the window
    assert guard.check(9.0, step=11) is None  # 9.0 <= 10.0
    assert guard.check(10.0, step=12) is None  # exactly at the limit is not above it
    assert list(guard.history) == [1.0] * 10 + [9.0, 10.0]


def test_reason_string_for_a_large_spike():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, min_history=3))
    _feed(guard, [10.0, 9.0, 11.0])  # median 10.0
    # 123.4 / 10.0 = 12.34 -> "12.3x"
    assert guard.check(123.4, step=7) == (
        "loss 123.4 at step 7 is 12.3x the running median 10 of the last 3 good losses (limit 10x)"
    )
    assert guard.check(123.4).startswith("loss 123.4 is 12.3x")  # no step given: no "at step"


def test_no_spike_judged_before_min_history():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, min_history=10))
    _feed(guard, [1.0] * 9)
    assert guard.check(100.0) is None  # only 9 good losses seen: the median is not trusted yet
    assert len(guard.history) == 10
    # now 10 losses, median of [1]*9 + [100] = 1.0, so 11.0 is a spike
    assert guard.check(11.0) is not None


def test_median_not_mean():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, min_history=10))
    _feed(guard, [1.0] * 6 + [8.0] * 4)
    # sorted: 1 1 1 1 1 | 1 8 8 8 8 -> median (1 + 1) / 2 = 1.0; the mean would be (6 + 32) / 10 = 3.8
    assert guard.check(11.0) is not None  # 11 > 10 x 1.0, though 11 < 10 x 3.8 = 38


def test_median_over_the_last_window_losses_only():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, window=3, min_history=3))
    _feed(guard, [1.0, 1.0, 1.0, 5.0, 5.0, 5.0])
    assert list(guard.history) == [5.0, 5.0, 5.0]  # median 5.0; over all six it would be (1 + 5) / 2 = 3.0
    assert guard.check(40.0) is None  # 40 <= 10 x 5 = 50 (but > 10 x 3 = 30)
    # window [5, 5, 40] -> median 5.0, limit 50
    assert guard.check(60.0) is not None


@pytest.mark.parametrize(("loss", "text"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
def test_non_finite_flagged_at_once_without_history(loss, text):
    guard = DivergenceGuard()
    assert guard.check(loss, step=0) == f"non-finite loss {text} at step 0"
    assert len(guard.history) == 0


def test_zero_dim_tensor_loss_is_accepted():
    guard = DivergenceGuard()
    assert guard.check(torch.tensor(float("nan"))) == "non-finite loss nan"
    assert guard.check(torch.tensor(0.5)) is None
    assert list(guard.history) == [0.5]


def test_non_positive_median_skips_the_spike_test():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, min_history=3))
    _feed(guard, [0.0, 0.0, 0.0])  # median 0: any positive loss would be "infinitely" above it
    assert guard.check(1.0) is None


def test_rollbacks_halve_the_lr_then_raise_past_the_limit():
    guard = DivergenceGuard(GuardConfig(lr_factor=0.5, max_rollbacks=3))
    assert guard.lr_multiplier == 1.0
    reason = guard.check(math.nan, step=42)
    assert guard.register_rollback() == 0.5  # 0.5 ** 1
    assert guard.register_rollback() == 0.25  # 0.5 ** 2
    assert guard.register_rollback() == 0.125  # 0.5 ** 3: the third of three allowed
    assert guard.lr_multiplier == 0.125
    with pytest.raises(DivergenceError) as info:
        guard.register_rollback()
    message = str(info.value)
    assert "after 3 rollback(s)" in message
    assert reason in message  # "non-finite loss nan at step 42"
    assert "Lower the learning rates" in message
    assert isinstance(info.value, Sam3Error)  # the CLI prints it as a one-line error


def test_zero_rollbacks_allowed_raises_on_the_first():
    guard = DivergenceGuard(GuardConfig(max_rollbacks=0))
    guard.check(math.inf)
    with pytest.raises(DivergenceError, match="after 0 rollback"):
        guard.register_rollback()


def test_state_round_trip_through_a_weights_only_file():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, window=5, min_history=3, lr_factor=0.5, max_rollbacks=2))
    _feed(guard, [2.0, 4.0, 3.0, 5.0, 1.0, 3.0])  # window 5 keeps [4, 3, 5, 1, 3], median 3
    guard.check(math.nan, step=6)
    guard.register_rollback()

    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == {
        "history": [4.0, 3.0, 5.0, 1.0, 3.0],
        "rollbacks": 1,
        "last_reason": "non-finite loss nan at step 6",
    }

    restored = DivergenceGuard(GuardConfig(spike_factor=10.0, window=5, min_history=3, lr_factor=0.5, max_rollbacks=2))
    restored.load_state_dict(state)
    assert restored.lr_multiplier == 0.5
    assert restored.check(30.0) is None  # 30 <= 10 x 3
    assert restored.check(40.0) is not None  # window [3, 5, 1, 3, 30] -> median 3, 40 > 30
    assert restored.register_rollback() == 0.25
    with pytest.raises(DivergenceError):
        restored.register_rollback()  # the count carried over: this is the third of two allowed


def test_smaller_window_on_load_keeps_the_newest_losses():
    guard = DivergenceGuard(GuardConfig(window=3, min_history=1))
    guard.load_state_dict({"history": [1.0, 2.0, 3.0, 4.0, 5.0], "rollbacks": 0, "last_reason": None})
    assert list(guard.history) == [3.0, 4.0, 5.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spike_factor": 1.0},
        {"window": 5, "min_history": 6},
        {"min_history": 0},
        {"lr_factor": 0.0},
        {"lr_factor": 1.5},
        {"max_rollbacks": -1},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DivergenceGuard(GuardConfig(**kwargs))


def test_rewind_takes_the_checkpoints_window_and_keeps_the_rollback_count():
    guard = DivergenceGuard(GuardConfig(spike_factor=10.0, window=5, min_history=2, lr_factor=0.5, max_rollbacks=2))
    at_checkpoint = guard.state_dict()  # step 0: no loss seen yet
    for loss in (100.0, 50.0, 10.0, 5.0, 4.0):
        assert guard.check(loss) is None
    assert guard.check(200.0) is not None  # 50x the median 10
    guard.register_rollback()
    guard.rewind(at_checkpoint)
    # the restored step-0 weights' loss (100) is no spike against the checkpoint's (empty) window
    assert list(guard.history) == [] and guard.check(100.0) is None
    assert guard.rollbacks == 1 and guard.lr_multiplier == 0.5
