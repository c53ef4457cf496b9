"""Benchmark of the feature cache: training-step images/s from pixels vs from cached features, one JSON line each.

    python -m bench.cache                                 # tiny and proportional configs, freeze vision, CPU
    python -m bench.cache --config proportional --freeze vision vision_text heads --prompts 1 2 4
    python -m bench.cache --config proportional --image-size 448 --prompts 1 --threads 1
    python -m bench.cache --device cuda --config full     # the real architecture at 1008 px, bf16 autocast

A step is `sam3.engine.train_step` as the trainer runs it, with the parts frozen as the trainer freezes them:
- from pixels: `Sam3Detector.forward` on a synthetic batch (bench.train_step.synthetic_batch: random pixels, P
  prompts per image, the first half with 1-3 target boxes), the vision encoder running forward without gradient;
- from the cache: `CachedDetector` on the same batch as a `FeatureBatch`, its FPN levels computed once beforehand
  and stored in fp16 as the cache stores them (the text embeddings too, when the freeze mode freezes the text
  encoder): the vision encoder does not run. Reading a cache shard (memory-mapped safetensors) is not timed, nor
  is the pixel path's image decoding and warping, which would only widen the gap.

Configs:
    tiny          sam3.model.tiny_config at 224 px, the test model: 2 ViT layers of width 64. Its vision encoder is a
                  small share of a step, so the cache gains little there.
    proportional  the tiny widths with the FULL model's proportions, at 224 px: ViT 32 layers of width 256 (4x the
                  DETR width, as 1024 : 256), MLP 1184 (4.625x, as 4736 : 1024), global attention at 7/15/23/31;
                  DETR encoder and decoder 6 layers each, 200 queries; text 24 layers, width 64 (its share of FLOPs
                  per prompt 0.5% of the vision encoder's, full model 0.35%). FLOPs per image (forward, counted with
                  torch.utils.flop_counter): vision 15.7 G, decode 0.742 G per (image, prompt) pair, ratio
                  vision / (3 x decode) = 7.1 (forward + backward of the decode ~ 3 x forward). At --image-size
                  448 (1,024 tokens, closer to the full model's long sequences): vision 66.0 G, decode 3.16 G, 7.0.
    full          the default Sam3Config at 1008 px (840M parameters; GPU): vision 5,613 GFLOPs per image, decode
                  277 GFLOPs per pair, text 19.4 GFLOPs per prompt; vision / (3 x decode) = 6.8.
So with freeze=vision (DETR parts and text train) the ideal speedup is about 1 + 6.8 / k for k prompts per image:
7.8x at 1 prompt, 4.4x at 2, 2.7x at 4; more when the text encoder and the fusion encoder are frozen too (heads).
On a CPU the measured speedup stays below the FLOP ratio (gflop_per_step shows both): the decode's narrow matmuls
and head-dim-16 attention run at a third of the ViT's FLOP rate there.

Each measurement runs in a fresh process, so the CPU peak resident set size (ru_maxrss, which never goes down) is
its own; on CUDA, torch.cuda.max_memory_allocated. Output keys: config, device, image_size, freeze, cache, batch,
prompts, images_per_s (batch / fastest step time), step_ms (the fastest of --steps), gflop_per_step (one step,
counted: a figure no other process on the machine can disturb), peak_mem_gb, speedup (cache over pixels of the same
config, freeze mode and prompts; 1.0 on pixel lines).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from dataclasses import fields

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Sam3Config, Sam3Model

from bench.train_step import PHRASES, bench_step, sync, synthetic_batch
from sam3.batch import PromptBatch
from sam3.features import CachedDetector, FeatureBatch
from sam3.freeze import apply_freeze, freezes_text
from sam3.losses import Criterion
from sam3.memory import peak_memory_gb
from sam3.model import Sam3Detector, parameters_without_text_gradients, set_image_size, tiny_config
from sam3.optim import OptimConfig, build_optimizer

CONFIGS = ("tiny", "proportional", "full")
CACHE_FREEZE_MODES = ("vision", "vision_text", "heads")  # the modes a cache serves (vision encoder frozen)


def proportional_config(image_size: int = 224) -> Sam3Config:
    """The tiny widths with the full model's depths and width ratios (see the module docstring)."""
    config = tiny_config(image_size)
    vit = config.vision_config.backbone_config
    vit.hidden_size, vit.intermediate_size, vit.num_hidden_layers = 256, 1184, 32
    vit.global_attn_indexes = [7, 15, 23, 31]
    text = config.text_config
    text.num_hidden_layers = 24
    config.detr_encoder_config.num_layers = 6
    config.detr_decoder_config.num_layers = 6
    config.detr_decoder_config.num_queries = 200
    return config


def build_config(name: str, image_size: int | None = None) -> Sam3Config:
    """The named config at `image_size` (None: 224 for tiny and proportional, 1008 for full)."""
    if name == "tiny":
        return tiny_config(image_size or 224)
    if name == "proportional":
        return proportional_config(image_size or 224)
    config = Sam3Config()
    if image_size is not None:
        set_image_size(config, image_size)
    return config


def feature_batch(detector: Sam3Detector, batch: PromptBatch, with_text: bool) -> FeatureBatch:
    """`batch` as the cache serves it: the 1x FPN level (detection) in fp16, prompt embeddings in fp16 or None."""
    with torch.no_grad():
        levels = detector.encode_images(batch.pixel_values, levels=1).levels
        tokens = detector.encode_prompts(batch.input_ids, batch.attention_mask).tokens if with_text else None
    plain = {f.name: getattr(batch, f.name) for f in fields(PromptBatch)}
    plain["pixel_values"] = batch.pixel_values.new_empty(batch.pixel_values.shape[0], 0)
    half_tokens = tokens.half() if tokens is not None else None
    return FeatureBatch(**plain, levels=tuple(level.half() for level in levels), prompt_tokens=half_tokens)


def measure(config_name: str, freeze: str, cached: bool, args: argparse.Namespace, prompts: int) -> dict:
    """One line: build the model, freeze, warm up, time `args.steps` steps, count one step's FLOPs."""
    device = torch.device(args.device)
    with device:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            detector = Sam3Detector(Sam3Model(build_config(config_name, args.image_size))).to(device).train()
    image_size = detector.config.vision_config.backbone_config.image_size
    unused = parameters_without_text_gradients(detector, with_masks=False)
    apply_freeze(detector.model, freeze, also_freeze=unused)
    num_blocks = detector.config.vision_config.backbone_config.num_hidden_layers
    optimizer = build_optimizer(detector.model, OptimConfig(), num_blocks)
    batch = synthetic_batch(args.batch, image_size, prompts, with_masks=False).to(device)
    model: torch.nn.Module = detector
    if cached:
        batch = feature_batch(detector, batch, with_text=freezes_text(freeze))
        model = CachedDetector(detector)
    criterion = Criterion(with_masks=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        bench_step(model, criterion, optimizer, batch, device, label=f"{config_name} freeze {freeze}")

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    # the fastest step (timeit's rule): the slower ones were slowed by other processes, not by the step
    seconds = min(times)
    peak_mem = peak_memory_gb(device)  # before counting FLOPs: FlopCounterMode's step holds more memory
    with FlopCounterMode(display=False) as flops:
        step()
    return {
        "config": config_name,
        "device": device.type,
        "image_size": image_size,
        "freeze": freeze,
        "cache": cached,
        "batch": args.batch,
        "prompts": prompts,
        "images_per_s": round(args.batch / seconds, 3),
        "step_ms": round(seconds * 1000, 1),
        "gflop_per_step": round(flops.get_total_flops() / 1e9, 2),
        "peak_mem_gb": round(peak_mem, 3),
    }


def _measure_in_child(job: tuple) -> dict:
    config_name, freeze, cached, args, prompts = job
    if args.threads:
        torch.set_num_threads(args.threads)
    return measure(config_name, freeze, cached, args, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", choices=CONFIGS, default=["tiny", "proportional"])
    parser.add_argument("--freeze", nargs="+", choices=CACHE_FREEZE_MODES, default=["vision"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[1, 4], help="prompts per image (default: 1 and 4)")
    parser.add_argument("--image-size", type=int, help="model input side (default: 224, full 1008; a multiple of 14)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default: 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads per measurement (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, the fastest reported (default: 10)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if "full" in args.config and args.device == "cpu":
        raise SystemExit("--config full needs --device cuda (5.6 TFLOPs per image through the vision encoder)")
    if max(args.prompts) > len(PHRASES):
        raise SystemExit(f"--prompts must be at most {len(PHRASES)}")

    # spawn: each measurement in a fresh process, so CPU peak memory is its own and no state carries over
    context = multiprocessing.get_context("spawn")
    for config_name in args.config:
        for freeze in args.freeze:
            for prompts in args.prompts:
                with context.Pool(1, maxtasksperchild=1) as pool:
                    pixels = pool.apply(_measure_in_child, ((config_name, freeze, False, args, prompts),))
                with context.Pool(1, maxtasksperchild=1) as pool:
                    cache = pool.apply(_measure_in_child, ((config_name, freeze, True, args, prompts),))
                print(json.dumps({**pixels, "speedup": 1.0}), flush=True)
                speedup = round(cache["images_per_s"] / pixels["images_per_s"], 2)
                print(json.dumps({**cache, "speedup": speedup}), flush=True)


if __name__ == "__main__":
    main()
