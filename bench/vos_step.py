"""Speed and memory of one VOS training step: the tracker's training forward (prompts, correction clicks, memory)
on an 8-frame clip with 3 objects, the recipe's loss, backward, AdamW. One JSON line per model.

    python -m bench.vos_step                                   # tiny-sam2.1 and tiny-sam3 on the CPU
    python -m bench.vos_step --model sam2.1-b+ --device cuda   # SAM 2.1 B+'s architecture at 1024 px, bf16 on CUDA
    python -m bench.vos_step --model sam2.1-b+ --size 512 --frames 2 --objects 1   # what fits a CPU box

`sam2.1-b+` builds SAM 2.1 Hiera B+'s configuration (embed 112, stages 2-3-16-3, heads 2-4-8-16, global attention in
blocks 12, 16, 20, FPN channels 896-448-224-112) with random weights: its speed and memory are those of the real
checkpoint (weights do not change them); `--model DIR` loads a transformers folder instead. The clip is synthetic
(random frames, square objects moving across them): content does not change the step's cost, apart from which
prompt kinds and correction frames the seeded draw picks (the same plan for every model: seed 0).

Per line: `step_s` (median of --steps timed steps after --warmup), `peak_mem_gb` (CUDA: max_memory_allocated; CPU:
the process's peak resident set, which never goes down, so a later line includes the earlier ones'), `frames`,
`objects`, `size`, `amp`, `params_m`, `device`, `decoder_passes` (the FrameSteps the plan ran: 1 per frame plus the
correction clicks).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from sam3.video.config import PromptConfig, VosLossConfig, VosOptimConfig
from sam3.video.losses import vos_loss
from sam3.video.optim import build_optimizer
from sam3.video.tracker import TrackerForward, build_tracker, model_image_size
from sam3.video.types import VideoClip

B_PLUS = "sam2.1-b+"


def b_plus(size: int) -> torch.nn.Module:
    """SAM 2.1 Hiera B+'s architecture with random weights, at input side `size`."""
    from transformers import Sam2VideoConfig, Sam2VideoModel
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    stride = size // 4
    hiera = Sam2HieraDetConfig(
        hidden_size=112, blocks_per_stage=[2, 3, 16, 3], embed_dim_per_stage=[112, 224, 448, 896],
        num_attention_heads_per_stage=[2, 4, 8, 16], global_attention_blocks=[12, 16, 20],
        window_positional_embedding_background_size=[14, 14], image_size=[size, size],
    )  # fmt: skip
    vision = Sam2VisionConfig(
        backbone_config=hiera, backbone_channel_list=[896, 448, 224, 112],
        backbone_feature_sizes=[[stride, stride], [stride // 2, stride // 2], [stride // 4, stride // 4]],
    )  # fmt: skip
    config = Sam2VideoConfig(vision_config=vision, image_size=size)
    config.prompt_encoder_config.image_size = size
    return Sam2VideoModel(config)


def synthetic_clip(frames: int, objects: int, size: int) -> VideoClip:
    """Random frames with `objects` squares moving right by size/32 per frame (masks exact)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(frames, 3, size, size, generator=generator)
    masks = torch.zeros(frames, objects, size, size, dtype=torch.bool)
    side = size // 6
    for t in range(frames):
        for k in range(objects):
            top, left = (k * size) // (objects + 1), (t * size) // 32 + k * side // 2
            masks[t, k, top : top + side, left : left + side] = True
    return VideoClip("synthetic", [f"{t:05d}" for t in range(frames)], pixels, masks, list(range(1, objects + 1)))


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = b_plus(args.size) if name == B_PLUS else build_tracker(name)
    model = model.to(device).train()
    size = model_image_size(model)
    forward = TrackerForward(model, PromptConfig())
    optimizer = build_optimizer(model, VosOptimConfig())
    clip = synthetic_clip(args.frames, args.objects, size).to(device)
    amp = device.type == "cuda" and args.amp == "bf16"
    times, passes = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            output = forward(clip, torch.Generator().manual_seed(0))
        loss = vos_loss(output, clip.masks, VosLossConfig())["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        passes = sum(len(frame.steps) for frame in output.frames)
    return {
        "model": name, "device": device.type, "size": size, "frames": args.frames, "objects": args.objects,
        "amp": "bf16" if amp else "fp32", "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_s": round(statistics.median(times), 4), "peak_mem_gb": round(peak_gb(device), 3),
        "decoder_passes": passes, "threads": torch.get_num_threads(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tiny-sam2.1", "tiny-sam3"], help=f"tiny-*, {B_PLUS}, DIR")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=1024, help=f"input side of {B_PLUS}")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="autocast on CUDA (CPU: fp32)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.model:
        print(json.dumps(measure(name, args, device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
