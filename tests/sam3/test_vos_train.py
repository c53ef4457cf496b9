"""`sam3.video.train.train_vos` end to end on the tiny SAM 2.1 tracker and a generated moving-square dataset (CPU).

- a short run trains: finite losses logged, checkpoints, TensorBoard and the exported folder exist
- EXACT resume: a run stopped after its step-2 checkpoint and started again ends bitwise where the uninterrupted
  4-step run ends
- the export loads with plain `Sam2VideoModel.from_pretrained` (and AutoProcessor): same state_dict, same outputs
- loop.freeze image_encoder: the image encoder's weights do not move, the rest does
- a NaN loss at one step: the guard rolls back (event logged), the run finishes with finite weights
- (slow) 2 gloo processes x 1 clip == 1 process x accumulation 2
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import AutoProcessor, Sam2VideoModel

import sam3.video.train as vos_train
from sam3.video.config import ClipConfig, PromptConfig, VosJob, VosLoopConfig, VosOptimConfig
from sam3.video.palette import write_label_map

SIDE = 64  # frames are drawn at the tiny tracker's input side
FRAMES = 4
NO_AUGMENT = dict(hflip=0.0, degrees=0.0, shear=0.0, brightness=0.0, contrast=0.0, saturation=0.0, grayscale=0.0)


def build_squares(root: Path, videos: int = 2) -> Path:
    """ROOT/train/{JPEGImages,Annotations}/<video>/<frame>: a square (object 1, and object 2 in odd videos) moving
    4 px per frame over a grey background."""
    for v in range(videos):
        name = f"video{v}"
        images, annotations = root / "train" / "JPEGImages" / name, root / "train" / "Annotations" / name
        images.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for t in range(FRAMES + 1):
            pixels = np.full((SIDE, SIDE, 3), 90, dtype=np.uint8)
            labels = np.zeros((SIDE, SIDE), dtype=np.uint8)
            x = 8 + 4 * t + 3 * v
            pixels[16:32, x : x + 16] = (220, 60, 40)
            labels[16:32, x : x + 16] = 1
            if v % 2:
                pixels[40:56, 40 - 2 * t : 52 - 2 * t] = (40, 200, 90)
                labels[40:56, 40 - 2 * t : 52 - 2 * t] = 2
            Image.fromarray(pixels).save(images / f"{t:05d}.jpg", quality=95)
            write_label_map(annotations / f"{t:05d}.png", labels)
    return root


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    return build_squares(tmp_path_factory.mktemp("squares"))


def make_job(dataset: Path, run_dir: Path, **loop) -> VosJob:
    """A tiny run: clips of 3 frames, at most 2 objects, 1 correction frame of 2 clicks, lr large enough to move the
    weights visibly in a few steps."""
    settings = dict(max_steps=4, checkpoint_every=2, log_every=1, keep_last=3, seed=3)
    settings.update(loop)
    return VosJob(
        dataset_dir=str(dataset),
        run_dir=str(run_dir),
        model_source="tiny-sam2.1",
        clip=ClipConfig(num_frames=3, max_objects=2, multiplier=2, **NO_AUGMENT),
        prompts=PromptConfig(max_init_cond_frames=1, max_correction_frames=1, correction_clicks=2),
        optim=VosOptimConfig(lr=1e-3, lr_vision=5e-4, grad_clip=1.0),
        loop=VosLoopConfig(**settings),
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_stats.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return Sam2VideoModel.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def straight_run(squares, tmp_path_factory) -> Path:
    """4 steps, uninterrupted; checkpoints at steps 0, 2, 4."""
    run_dir = tmp_path_factory.mktemp("straight")
    vos_train.train_vos(make_job(squares, run_dir))
    return run_dir


@pytest.mark.slow
def test_short_run_trains_and_writes_its_files(straight_run):
    losses = [r["loss"] for r in _records(straight_run) if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    record = next(r for r in _records(straight_run) if "loss" in r)
    assert {"focal", "dice", "iou", "object_score", "grad_norm", "lr/vision", "lr/tracker"} <= set(record)
    names = sorted(p.name for p in (straight_run / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000000.pt", "step_00000002.pt", "step_00000004.pt"]
    assert list((straight_run / "tensorboard").iterdir())
    model_dir = straight_run / "model"
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert "Sam2VideoModel.from_pretrained" in (model_dir / "README.md").read_text()
    # the weights moved from the tiny model's initial ones
    start = vos_train.build_tracker("tiny-sam2.1").state_dict()
    trained = _weights(model_dir)
    assert any(not torch.equal(start[k], trained[k]) for k in start)


@pytest.mark.slow
def test_resume_is_exact(squares, straight_run, tmp_path, monkeypatch):
    """Stopped after step 2 (its checkpoint written), then train_vos again: bitwise the uninterrupted run."""
    run_dir = tmp_path / "resumed"
    job = make_job(squares, run_dir)
    real_step, calls = vos_train.vos_step, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies during step 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vos_train, "vos_step", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        vos_train.train_vos(job)
    assert (run_dir / "checkpoints" / "step_00000002.pt").is_file()
    steps_run = []

    def count(*args, **kwargs):
        steps_run.append(args[3])  # vos_step(parts, job, clips, step, dist_info)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vos_train, "vos_step", count)
    vos_train.train_vos(job)
    assert steps_run == [2, 3]  # resumed, not started again
    assert not (run_dir / "train_stats.superseded.jsonl").exists()
    straight, resumed = _weights(straight_run / "model"), _weights(run_dir / "model")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = {r["step"]: r["loss"] for r in _records(straight_run) if "loss" in r}
    assert {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r} == losses


@pytest.mark.slow
def test_other_params_start_a_new_run(squares, straight_run, tmp_path):
    """A checkpoint of another lr is set aside as superseded.pt, not resumed; a shorter total is refused."""
    run_dir = tmp_path / "changed"
    vos_train.train_vos(make_job(squares, run_dir, max_steps=2))
    with pytest.raises(vos_train.ConfigError, match="not shortened"):
        vos_train.train_vos(make_job(squares, run_dir, max_steps=1))
    changed = make_job(squares, run_dir, max_steps=1)
    vos_train.train_vos(replace(changed, optim=replace(changed.optim, lr=2e-3)))
    assert (run_dir / "checkpoints" / "superseded.pt").is_file()
    assert vos_train.changed_params({"job": {"loop": {"log_every": 1}}}, {"job": {"loop": {"log_every": 5}}}) == []


@pytest.mark.slow
def test_export_round_trip(straight_run):
    """Plain transformers loads the export: same weights as the run's last checkpoint, same outputs on a clip."""
    folder = straight_run / "model"
    loaded = Sam2VideoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Sam2VideoProcessor" and processor.target_size == SIDE
    model = vos_train.build_tracker("tiny-sam2.1")
    checkpoint = torch.load(straight_run / "checkpoints" / "step_00000004.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())
    frames = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval().get_image_features(frames)
        theirs = loaded.eval().get_image_features(frames)
    flat = [t for t in torch.utils._pytree.tree_leaves(ours) if isinstance(t, torch.Tensor)]
    flat_theirs = [t for t in torch.utils._pytree.tree_leaves(theirs) if isinstance(t, torch.Tensor)]
    assert flat and all(torch.equal(a, b) for a, b in zip(flat, flat_theirs, strict=True))


@pytest.mark.slow
def test_frozen_image_encoder_does_not_move(squares, tmp_path):
    run_dir = tmp_path / "frozen"
    vos_train.train_vos(make_job(squares, run_dir, max_steps=2, freeze="image_encoder"))
    start = vos_train.build_tracker("tiny-sam2.1").state_dict()
    trained = _weights(run_dir / "model")
    vision = [k for k in start if k.startswith("vision_encoder.")]
    others = [k for k in start if not k.startswith("vision_encoder.")]
    assert vision and all(torch.equal(start[k], trained[k]) for k in vision)
    assert any(not torch.equal(start[k], trained[k]) for k in others)
    # the checkpoints hold only what trains
    checkpoint = torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert checkpoint["frozen"]["names"] > 0
    assert not [k for k in checkpoint["model"] if k.startswith("vision_encoder.backbone.blocks.")]


@pytest.mark.slow
def test_nan_loss_rolls_back(squares, tmp_path, monkeypatch):
    """The loss of step 3's clip is NaN once: nothing steps, the guard rolls back to step 2 with lr x 0.5."""
    run_dir = tmp_path / "nan"
    real_loss, calls = vos_train.vos_loss, []

    def nan_once(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(vos_train, "vos_loss", nan_once)
    vos_train.train_vos(make_job(squares, run_dir))
    events = [r for r in _records(run_dir) if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 2 and events[0]["lr_multiplier"] == 0.5
    steps = [r["step"] for r in _records(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(torch.isfinite(v).all() for v in _weights(run_dir / "model").values() if v.is_floating_point())


def ddp_worker(rank: int, world_size: int, port: int, job: VosJob) -> None:
    """One gloo rank (torch.multiprocessing.spawn target) with torchrun's environment."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from sam3.distributed import shutdown

    try:
        vos_train.train_vos(job)
    finally:
        shutdown()


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(squares, tmp_path):
    """2 clips per step: 2 gloo ranks x 1 clip or 1 process x 2; same losses and weights (round-off apart)."""
    single = make_job(squares, tmp_path / "single", max_steps=2, accumulation=2)
    vos_train.train_vos(single)
    double = make_job(squares, tmp_path / "ddp", max_steps=2, accumulation=1)
    mp.spawn(ddp_worker, args=(2, get_free_port(), double), nprocs=2, join=True)
    one = {r["step"]: r["loss"] for r in _records(tmp_path / "single") if "loss" in r}
    two = {r["step"]: r["loss"] for r in _records(tmp_path / "ddp") if "loss" in r}
    assert one.keys() == two.keys() and all(one[s] == pytest.approx(two[s], rel=1e-5) for s in one)
    a, b = _weights(tmp_path / "single" / "model"), _weights(tmp_path / "ddp" / "model")
    # The all-reduce sums the two clips' gradients in another order than accumulation does. AdamW's first steps move
    # a weight by lr * m / (sqrt(v) + eps): for a gradient near eps (1e-8) that ratio turns the sum's round-off into a
    # visible part of one lr-1e-3 step (runs gave 1.8e-6 and 3.8e-5 on a few elements). So: every element within a
    # fifth of a step, and the weights equal on average to 1e-6, where a real difference (a clip missing, another
    # seed, other prompts) moves most elements by about lr per step.
    floats = [key for key in a if a[key].is_floating_point()]
    for key in floats:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-4)
    gap = torch.cat([(a[key] - b[key]).abs().flatten() for key in floats])
    assert gap.mean() < 1e-6, gap.mean()


@pytest.mark.slow
def test_tiny_sam3_trains_with_drop_path_and_exports(squares, tmp_path):
    """SAM 3's tracker (56 px input, drop-path on its ViT): 2 steps, then plain transformers loads the export."""
    from transformers import Sam3TrackerVideoModel

    job = make_job(squares, tmp_path / "sam3", max_steps=2)
    job = replace(job, model_source="tiny-sam3", loop=replace(job.loop, drop_path=0.1))
    folder = vos_train.train_vos(job)
    loaded = Sam3TrackerVideoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Sam3TrackerVideoProcessor" and processor.target_size == 56
    assert tuple(processor.video_processor.image_mean) == (0.5, 0.5, 0.5)  # SAM 3's normalisation, as trained
    start = vos_train.build_tracker("tiny-sam3").state_dict()
    assert any(not torch.equal(start[k], v) for k, v in loaded.state_dict().items())


def test_bad_loop_values_are_config_errors(tmp_path):
    job = make_job(tmp_path, tmp_path / "run")
    with pytest.raises(vos_train.ConfigError, match="vos.loop.accumulation must be at least 1"):
        vos_train.check_job(replace(job, loop=replace(job.loop, accumulation=0)))
    with pytest.raises(vos_train.ConfigError, match="vos.loop.freeze"):
        vos_train.check_job(replace(job, loop=replace(job.loop, freeze="vision")))
    assert not (tmp_path / "run").exists()


def test_clip_seed_depends_on_step_and_clip_only():
    seeds = {vos_train.clip_seed(0, step, clip) for step in range(3) for clip in range(3)}
    assert len(seeds) == 9 and vos_train.clip_seed(0, 1, 2) == vos_train.clip_seed(0, 1, 2)
