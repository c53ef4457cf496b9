"""Benchmark of one training step: images/s, step time and peak memory per freeze mode, one JSON object per line.

    python -m bench.train_step                  # the tiny model on CPU, 224 px, batch 2, freeze none (< 1 minute)
    python -m bench.train_step --device cuda    # the full SAM 3 (840M parameters, random weights) at 1008 px,
                                                # batch 1, bf16 autocast, every freeze mode

A step is `sam3.engine.train_step` as the trainer runs it: forward over every decoder layer, the recipe's criterion
(Hungarian matching, box, IoU-aware BCE and presence losses), backward, gradient clipping at 0.1 and an AdamW step
over the recipe's parameter groups; frozen parts as `sam3.freeze` sets them, plus the parameters text prompts never
reach (as the trainer freezes them). The batch is synthetic and the same every step: random pixels, `--prompts`
prompts per image, the first half of them with 1-3 random target boxes, the others negative. `--warmup` untimed
steps come first (allocator, kernel choice), then `--steps` timed ones.

Peak memory: on CUDA, torch.cuda.max_memory_allocated, reset before each mode. On CPU, the process's peak resident
set size (resource.getrusage ru_maxrss), which never goes down: a later line includes what the earlier ones used.
Output keys: model, device, image_size, freeze, batch, images_per_s, step_ms, peak_mem_gb.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sam3.config import GRAD_CLIP, SAM3_IMAGE_SIZE
from sam3.data import PromptQuery, PromptSample, collate_prompts
from sam3.engine import train_step
from sam3.freeze import FREEZE_MODES, apply_freeze
from sam3.losses import Criterion
from sam3.memory import peak_memory_gb
from sam3.model import load_model, parameters_without_text_gradients
from sam3.optim import OptimConfig, build_optimizer

# 32 distinct prompts: RF100-VL datasets have up to dozens of categories, each absent one a negative prompt
PHRASES = (
    *("red circle", "blue square", "green triangle", "yellow star", "dog", "car", "person", "tree"),
    *("bicycle", "boat", "traffic light", "bird", "horse", "sheep", "cow", "elephant"),
    *("bottle", "cup", "chair", "potted plant", "laptop", "keyboard", "book", "clock"),
    *("crack", "rust spot", "weld seam", "solar panel", "wind turbine", "ship wake", "cell nucleus", "leaf blight"),
)


def synthetic_batch(batch: int, image_size: int, prompts: int, with_masks: bool, seed: int = 0):
    """A PromptBatch of `batch` random images, each with `prompts` prompts; the first half carry 1-3 target boxes."""
    if prompts > len(PHRASES):
        raise SystemExit(f"--prompts must be at most {len(PHRASES)}")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for image_id in range(batch):
        queries = []
        for index, phrase in enumerate(PHRASES[:prompts]):
            count = int(torch.randint(1, 4, (1,), generator=generator)) if index < (prompts + 1) // 2 else 0
            centres = 0.3 + 0.4 * torch.rand(count, 2, generator=generator)  # normalised cxcywh inside the image
            sizes = 0.1 + 0.3 * torch.rand(count, 2, generator=generator)
            boxes = torch.cat([centres, sizes], dim=1)
            masks = _box_masks(boxes, image_size) if with_masks else None
            queries.append(PromptQuery(phrase, index + 1, boxes, masks))
        image = torch.rand(3, image_size, image_size, generator=generator) * 2 - 1  # normalised range [-1, 1]
        samples.append(PromptSample(image, image_id, (image_size, image_size), queries))
    return collate_prompts(samples)


def _box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """bool [n, S, S]: each normalised cxcywh box filled."""
    grid = (torch.arange(size) + 0.5) / size
    x0, x1 = boxes[:, 0:1] - boxes[:, 2:3] / 2, boxes[:, 0:1] + boxes[:, 2:3] / 2
    y0, y1 = boxes[:, 1:2] - boxes[:, 3:4] / 2, boxes[:, 1:2] + boxes[:, 3:4] / 2
    inside_x = (grid >= x0) & (grid < x1)  # [n, S]
    inside_y = (grid >= y0) & (grid < y1)
    return inside_y[:, :, None] & inside_x[:, None, :]


def measure(detector, batch, freeze: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Freeze, build the optimiser, run the warm-up and the timed steps; one result line."""
    model = detector.model
    apply_freeze(model, freeze, also_freeze=parameters_without_text_gradients(detector, with_masks=args.with_masks))
    model.zero_grad(set_to_none=True)
    optimizer = build_optimizer(model, OptimConfig(), model.config.vision_config.backbone_config.num_hidden_layers)
    criterion = Criterion(with_masks=args.with_masks)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def run(count: int) -> None:
        for _ in range(count):
            bench_step(detector, criterion, optimizer, batch, device, args.with_masks, label=f"freeze {freeze}")
        sync(device)

    run(args.warmup)
    started = time.perf_counter()
    run(args.steps)
    seconds = (time.perf_counter() - started) / args.steps
    images = batch.pixel_values.shape[0]
    line = {
        "model": args.model,
        "device": device.type,
        "image_size": args.image_size,
        "freeze": freeze,
        "batch": images,
        "images_per_s": round(images / seconds, 3),
        "step_ms": round(seconds * 1000, 2),
        "peak_mem_gb": round(peak_memory_gb(device), 3),
    }
    optimizer.state.clear()  # free the AdamW moments before the next mode builds its own optimiser
    model.zero_grad(set_to_none=True)
    return line


def amp_used(amp: str, device: torch.device) -> str:
    """What `--amp` (auto | bf16 | fp32) means on `device`, as "bf16" or "fp32". auto is the trainer's rule: bf16
    autocast on CUDA, fp32 on CPU."""
    return "bf16" if amp == "bf16" or (amp == "auto" and device.type == "cuda") else "fp32"


def bench_step(
    model,
    criterion,
    optimizer,
    batch,
    device: torch.device,
    with_masks: bool = False,
    label: str = "",
    amp: str = "auto",
):
    """One `sam3.engine.train_step` as the trainer runs it (clipping at GRAD_CLIP); a non-finite loss ends the
    benchmark (SystemExit naming `label`). Returns the StepResult.

    `amp`: see `amp_used`; "bf16" autocasts on the CPU too, "fp32" never autocasts."""
    amp_dtype = torch.bfloat16 if amp_used(amp, device) == "bf16" else None
    result = train_step(
        model,
        criterion,
        optimizer,
        [batch],
        device=device,
        with_masks=with_masks,
        amp_dtype=amp_dtype,
        grad_clip=GRAD_CLIP,
        cpu_autocast=amp == "bf16",
    )
    if not result.finite:
        raise SystemExit(f"{label + ': ' if label else ''}the loss is not finite ({float(result.loss)})")
    return result


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (timing); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", "full"), help="default: tiny on CPU, full on CUDA")
    parser.add_argument("--image-size", type=int, help="default: 224 for tiny, 1008 for full")
    parser.add_argument("--batch", type=int, help="images per step; default: 2 on CPU, 1 on CUDA")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per image (default: 4)")
    parser.add_argument("--freeze", nargs="+", choices=FREEZE_MODES, help="default: none on CPU, every mode on CUDA")
    parser.add_argument("--with-masks", action="store_true", help="segmentation mode: mask decoder and mask losses")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.model = args.model or ("full" if cuda else "tiny")
    args.image_size = args.image_size or (SAM3_IMAGE_SIZE if args.model == "full" else 224)
    args.batch = args.batch or (1 if cuda else 2)
    modes = args.freeze or (list(FREEZE_MODES) if cuda else ["none"])
    device = torch.device("cuda" if cuda else "cpu")

    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer's default train.tf32
    torch.backends.cudnn.allow_tf32 = True
    with device:  # the full model's 840M random weights are drawn on the GPU directly: minutes faster than on CPU
        detector = load_model(args.model, image_size=args.image_size)
    detector.to(device).train()
    batch = synthetic_batch(args.batch, args.image_size, args.prompts, args.with_masks)
    for mode in modes:
        print(json.dumps(measure(detector, batch, mode, args, device)), flush=True)


if __name__ == "__main__":
    main()
