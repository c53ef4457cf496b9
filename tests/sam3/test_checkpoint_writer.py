"""Checkpoints written in the background: the step goes on while the file is written, one write in flight, a failed
write surfaces, rotation, a snapshot unaffected by later in-place updates, the write-delay test hook. Real files,
real torch.save: a write is held back by a threading.Event the test controls, never replaced."""

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sam3.checkpoint import (
    WRITE_DELAY_ENV,
    CheckpointError,
    TrainState,
    checkpoint_payload,
    latest_checkpoint,
    load_checkpoint,
    step_checkpoint_name,
    write_checkpoint,
)
from sam3.checkpoint_writer import BackgroundWriter, SnapshotBuffers, cpu_snapshot

TIMEOUT = 30  # seconds any wait in these tests may take at most on a busy machine


def _trained() -> tuple[nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    return model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()


def _snapshot(model, optimizer, step: int) -> dict:
    """What RunCheckpoints hands the writer: the payload of `step`, copied to CPU memory."""
    payload = checkpoint_payload(model, optimizer, None, None, TrainState(step=step), {"step": step})
    return cpu_snapshot(payload)


def _held_write(folder: Path, payload: dict, release: threading.Event, order: list[int] | None = None, keep_last=3):
    """A write that waits for `release` before the real write_checkpoint."""
    step = payload["train_state"]["step"]

    def write() -> Path:
        assert release.wait(TIMEOUT)
        if order is not None:
            order.append(step)
        return write_checkpoint(payload, folder, step_checkpoint_name(step), keep_last=keep_last)

    return write


def _blocked(thread: threading.Thread) -> bool:
    thread.join(0.2)
    return thread.is_alive()


@pytest.fixture
def writer():
    writer = BackgroundWriter()
    yield writer
    writer.close(raise_error=False)


def test_submit_returns_before_the_file_exists_and_flush_waits_for_it(tmp_path, writer):
    model, optimizer = _trained()
    release = threading.Event()
    final = tmp_path / step_checkpoint_name(1)
    writer.submit(str(final), _held_write(tmp_path, _snapshot(model, optimizer, 1), release))
    assert writer.busy and not final.exists()

    _step(model, optimizer)  # training goes on while the file is written
    flusher = threading.Thread(target=writer.flush)
    flusher.start()
    assert _blocked(flusher)  # flush waits for the write
    release.set()
    flusher.join(TIMEOUT)
    assert not flusher.is_alive() and not writer.busy
    assert latest_checkpoint(tmp_path) == final
    state, _, params = load_checkpoint(final, *_trained())
    assert state.step == 1 and params == {"step": 1}
    assert writer.submits == 1 and writer.waits == 0 and len(writer.write_s) == 1


def test_the_snapshot_is_the_state_at_the_save_whatever_the_steps_after_it_change(tmp_path, writer):
    model, optimizer = _trained()
    at_save = {name: value.clone() for name, value in model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    release = threading.Event()
    writer.submit("step 1", _held_write(tmp_path, _snapshot(model, optimizer, 1), release))
    for _ in range(3):  # in-place updates of the weights, the BatchNorm statistics and the moments
        _step(model, optimizer)
    release.set()
    writer.flush()

    saved = torch.load(tmp_path / step_checkpoint_name(1), weights_only=True)
    assert saved["model"].keys() == at_save.keys()
    assert all(torch.equal(saved["model"][name], value) for name, value in at_save.items())
    assert not torch.equal(model[0].weight, at_save["0.weight"])
    for index, state in moments.items():
        assert all(torch.equal(saved["optimizer"]["state"][index][k], v) for k, v in state.items())


def test_one_write_in_flight_a_second_submit_waits_and_writes_keep_their_order(tmp_path, writer, caplog):
    model, optimizer = _trained()
    release, order = threading.Event(), []
    writer.submit("step 1", _held_write(tmp_path, _snapshot(model, optimizer, 1), release, order))
    second = _held_write(tmp_path, _snapshot(model, optimizer, 2), release, order)
    with caplog.at_level(logging.DEBUG, logger="sam3.checkpoint_writer"):
        submitter = threading.Thread(target=writer.submit, args=("step 2", second))
        submitter.start()
        assert _blocked(submitter)  # the first write still runs: the second save waits for it
        release.set()
        submitter.join(TIMEOUT)
        writer.flush()
    assert order == [1, 2]
    assert writer.submits == 2 and writer.waits == 1 and writer.wait_s > 0
    assert "checkpoint step 2 waits for the write of step 1 (one write in flight)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_checkpoint_name(1), step_checkpoint_name(2)]


def test_a_failed_write_surfaces_on_the_next_flush_or_submit_naming_the_file(tmp_path, writer):
    model, optimizer = _trained()
    not_a_folder = tmp_path / "checkpoints"
    not_a_folder.write_text("a file where the folder should be")
    payload = _snapshot(model, optimizer, 1)
    label = str(not_a_folder / step_checkpoint_name(1))

    def write():
        return write_checkpoint(payload, not_a_folder, step_checkpoint_name(1))

    writer.submit(label, write)
    with pytest.raises(CheckpointError, match=rf"^writing checkpoint {label} failed in the background \(File"):
        writer.flush()
    writer.flush()  # raised once

    writer.submit(label, write)
    deadline = time.monotonic() + TIMEOUT
    while writer.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match="the files written before it are intact"):
        writer.submit(label, write)  # the next save raises it rather than writing on


def test_close_lets_the_write_in_flight_finish_and_logs_a_failure_when_asked_not_to_raise(tmp_path, caplog):
    model, optimizer = _trained()
    writer = BackgroundWriter()
    release = threading.Event()
    writer.submit("step 1", _held_write(tmp_path, _snapshot(model, optimizer, 1), release))
    closer = threading.Thread(target=writer.close)
    closer.start()
    assert _blocked(closer)
    release.set()
    closer.join(TIMEOUT)
    assert (tmp_path / step_checkpoint_name(1)).is_file()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit("step 2", lambda: None)

    failing = BackgroundWriter()
    failing.submit("nowhere.pt", lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="sam3.checkpoint_writer"):
        failing.close(raise_error=False)
    assert "writing checkpoint nowhere.pt failed (ZeroDivisionError" in caplog.text


def test_background_writes_rotate_to_keep_last(tmp_path, writer):
    model, optimizer = _trained()
    release = threading.Event()
    release.set()
    for step in range(1, 7):
        _step(model, optimizer)
        writer.submit(str(step), _held_write(tmp_path, _snapshot(model, optimizer, step), release, keep_last=2))
    writer.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_checkpoint_name(5), step_checkpoint_name(6)]
    state, _, _ = load_checkpoint(latest_checkpoint(tmp_path), *_trained())
    assert state.step == 6


def test_the_write_delay_hook_holds_the_write_between_the_temp_file_and_the_rename(tmp_path, writer, monkeypatch):
    monkeypatch.setenv(WRITE_DELAY_ENV, "0.5")
    model, optimizer = _trained()
    payload = _snapshot(model, optimizer, 1)
    final = tmp_path / step_checkpoint_name(1)
    writer.submit(str(final), lambda: write_checkpoint(payload, tmp_path, final.name))
    deadline = time.monotonic() + TIMEOUT
    while not list(tmp_path.glob(".tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(f".tmp-{final.name}.*")) and not final.exists()  # written, not yet renamed
    writer.flush()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_cpu_snapshot_copies_tensors_and_rebuilds_containers():
    weight = torch.ones(3)
    value = {"a": [weight, (weight, 2)], "b": torch.Size([1, 2]), "c": "text", "d": None}
    copied = cpu_snapshot(value)
    weight.add_(1)
    assert torch.equal(copied["a"][0], torch.ones(3)) and torch.equal(copied["a"][1][0], torch.ones(3))
    assert copied["a"][0].data_ptr() != weight.data_ptr()
    assert isinstance(copied["a"][1], tuple) and copied["b"] == torch.Size([1, 2]) and copied["c"] == "text"
    assert copied["a"] is not value["a"]


def test_snapshot_buffers_are_reused_from_one_save_to_the_next_and_replaced_when_a_shape_changes():
    buffers = SnapshotBuffers()
    value = {"w": torch.ones(4), "opt": [torch.zeros(2, 2)], "n": 3}
    first = cpu_snapshot(value, buffers)
    value["w"].add_(1)
    value["opt"][0].fill_(5)
    second = cpu_snapshot(value, buffers)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # the same memory, copied into again
    assert second["opt"][0].data_ptr() == first["opt"][0].data_ptr()
    assert torch.equal(second["w"], torch.full((4,), 2.0)) and torch.equal(second["opt"][0], torch.full((2, 2), 5.0))
    assert second["w"].data_ptr() != value["w"].data_ptr() and second["n"] == 3
    assert buffers.nbytes == 4 * 4 + 4 * 4

    value["w"] = torch.ones(6, dtype=torch.float64)  # another shape and dtype at that place: a new buffer
    third = cpu_snapshot(value, buffers)
    assert third["w"].dtype == torch.float64 and third["w"].data_ptr() != first["w"].data_ptr()


def test_wait_turn_waits_for_the_write_in_flight_and_counts_it(tmp_path, writer):
    model, optimizer = _trained()
    release = threading.Event()
    writer.submit("step 1", _held_write(tmp_path, _snapshot(model, optimizer, 1), release))
    waiter = threading.Thread(target=writer.wait_turn, args=("step 2",))
    waiter.start()
    assert _blocked(waiter)  # a save copying into reused buffers must not start while step 1 is written from them
    release.set()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive() and not writer.busy and writer.waits == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_snapshot_of_cuda_tensors_lands_complete_in_pinned_memory():
    weights = {"w": torch.randn(1024, 1024, device="cuda"), "step": torch.tensor(3.0, device="cuda")}
    copied = cpu_snapshot(weights)
    weights["w"].add_(1)  # queued after the copies, which the snapshot waited for
    assert all(t.device.type == "cpu" and t.is_pinned() for t in copied.values())
    assert torch.equal(copied["w"] + 1, weights["w"].cpu()) and copied["step"].item() == 3.0

    buffers = SnapshotBuffers()
    first = cpu_snapshot(weights, buffers)
    weights["w"].add_(1)
    second = cpu_snapshot(weights, buffers)  # into the same pinned buffers, complete on return
    assert second["w"].data_ptr() == first["w"].data_ptr() and second["w"].is_pinned()
    assert torch.equal(second["w"], weights["w"].cpu())
