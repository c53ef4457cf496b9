"""Speed and memory of fine-tuning: the data loader, training per freeze mode with and without the feature cache,
peak memory and model FLOP utilisation. One JSON object per line.

    python -m bench.speed --device cpu     # tiny model, 224 px, fp32 (a few minutes on 2 cores)
    python -m bench.speed --device cuda    # the full SAM 3 (840M parameters, random weights) at 1008 px, bf16

Lines, in order:
- `peak`: the device's measured dense matmul rate (`peak_tflops`, in the step's matmul `dtype`: bf16 on CUDA and
  with `--amp bf16`, else fp32), the denominator of MFU. A measured peak rather than the data-sheet figure: on an
  H100 SXM it measures near 800 TFLOP/s in bf16 (the data sheet says 989).
- `loader`: the training data path alone (`CocoPromptDataset` with the train transform over a generated dataset
  already at the model's input size, as `preprocess` leaves it, `collate_prompts`, pinned memory on CUDA, the
  trainer's epoch keys and persistent workers): `images_per_s` for each number of `workers` over the second epoch
  (the first, untimed, starts the workers, which the trainer does once per run), and `images_per_s_per_worker`.
- `train`: one line per freeze mode x feature cache x batch size: `images_per_s`, `step_ms`, `peak_mem_gb`,
  `flops_per_image`, `mfu`, and the host syncs of one more step (`host_syncs_per_step`, `host_syncs_by_kind`,
  `host_syncs_by_origin`: "ours", "transformers", "backward"; `--sync-sites` adds them per file:line; see
  `sam3.host_sync`). Batch 1 and then doubling up to `--max-batch`, stopping at the first out-of-memory;
  `best` is true on the fastest batch of each mode (and cache setting). The step is `sam3.engine.train_step`
  as the trainer runs it (forward over every decoder layer, Hungarian matching, the recipe's losses, backward,
  clipping, AdamW over the recipe's groups, fused); the batch is synthetic (random pixels, `--prompts`
  prompts per image, half of them with 1-3 boxes), so the loader is not in the timed loop. With the cache, the
  step starts from the cached vision features (and, with the text encoder frozen too, cached prompt embeddings),
  as training with `cache.enabled` does.
  Each mode runs with the one-to-many (DAC) queries on and off (`one_to_many`; `--one-to-many on|off` for one):
  with them the decoder runs 2N queries in training (the mask decoder too, on the final layer) and the criterion
  adds the o2m terms.
  `--adapter lora|dora` (with `--adapter-rank`, `--adapter-parts`): the model trains through peft adapters
  (sam3.adapters) as the trainer does with the `adapter` section: an `adapter` line first (adapted layers, trainable
  parameters), then each train line with `adapter`, `adapter_rank`, `adapter_parts` and `trainable_params`.
- `summary`: the loader's best rate over the fastest training rate from pixels (`loader_headroom`; the target is
  >= 3; cached steps read no pixels), the cache speed-up per freeze mode, and what DAC costs per freeze mode
  (`dac_step_time_ratio_<freeze>`: step time with DAC over without, both at batch 1 from pixels;
  `dac_peak_mem_ratio_<freeze>` likewise, on CUDA only: the CPU's peak resident set never goes down).

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one whole step (forward, loss
and backward: matmuls, convolutions and attention, the operations that dominate; element-wise work is not
counted), divided by the images in the step. MFU = flops_per_image x images_per_s / peak. Activation
checkpointing recomputes forwards that FlopCounterMode then counts too; MFU here counts them (hardware
utilisation), so compare `flops_per_image` between lines to see the recompute.

Peak memory: on CUDA, torch.cuda.max_memory_allocated, reset before each line. On CPU, the process's peak resident
set size, which never goes down: a later line includes what earlier ones used. Without a GPU, `--amp bf16` runs
the CPU under bf16 autocast, so the activations kept for the backward are bf16 as on the GPU: its peak resident
set (which also holds the Python process, the allocator's slack and the model's construction) approximates, likely
from above, what the same step allocates on a GPU; CPU and CUDA autocast differ in a few ops, and CUDA kernels'
workspaces are not in it. The FLOP-counting step runs after the peak is read, and holds more memory than a plain
step; `--no-flops` skips it where memory is short. E.g. for the 24 GB memory mode:

    python -m bench.speed --device cpu --model full --freeze none --activation-checkpointing --amp bf16 \
        --prompts 1 --max-batch 1 --warmup 1 --steps 1 --skip-loader --no-cache
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from bench.cache import CACHE_FREEZE_MODES, feature_batch
from bench.train_step import amp_used, bench_step, sync, synthetic_batch
from pipeline.shapes_data import build_shapes_dataset
from sam3.adapters import adapted_layer_counts, attach_adapter, is_adapter_parameter, set_adapter_trainable
from sam3.config import ADAPTER_PARTS, SAM3_IMAGE_SIZE, AdapterConfig
from sam3.data import CocoPromptDataset, collate_prompts
from sam3.data.sampler import EpochKeyed, ResumableSampler
from sam3.features import CachedDetector
from sam3.freeze import FREEZE_MODES, apply_freeze, freezes_text
from sam3.host_sync import HostSyncs, count_host_syncs
from sam3.losses import Criterion
from sam3.memory import CHECKPOINT_PARTS, DETR_PARTS, enable_activation_checkpointing, peak_memory_gb
from sam3.model import load_model, parameters_without_text_gradients
from sam3.optim import OptimConfig, build_optimizer


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Dense matmul TFLOP/s in `dtype` (the step's matmul dtype): square matmuls, n = 8192 on CUDA, 1024 on CPU,
    for ~`seconds`."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ b
        sync(device)
        count += 10
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e12


def loader_lines(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Images/s of the training data path per number of workers (see the module docstring)."""
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        build_shapes_dataset(tmp, n=args.loader_images, seed=0, image_size=args.image_size, n_valid=1, n_test=1)
        dataset = EpochKeyed(CocoPromptDataset(tmp, "train", image_size=args.image_size, train=True))
        for workers in args.workers:
            # as the trainer loads: (epoch, index) keys, workers started once per run (persistent)
            sampler = ResumableSampler(len(dataset), with_epoch=True)
            loader = DataLoader(
                dataset,
                batch_size=args.loader_batch,
                sampler=sampler,
                num_workers=workers,
                collate_fn=collate_prompts,
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
            )
            for _batch in loader:  # epoch 0, untimed: the workers' start-up, paid once per run
                pass
            sampler.set_epoch(1)
            started = time.perf_counter()
            images = sum(batch.pixel_values.shape[0] for batch in loader)
            rate = images / (time.perf_counter() - started)
            lines.append(
                {
                    "what": "loader",
                    "workers": workers,
                    "batch": args.loader_batch,
                    "image_size": args.image_size,
                    "images_per_s": round(rate, 2),
                    "images_per_s_per_worker": round(rate / max(1, workers), 2),
                }
            )
    return lines


def count_step_flops(model, criterion, optimizer, batch, device, args) -> float:
    """FLOPs of one training step (forward, loss, backward) under FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        bench_step(model, criterion, optimizer, batch, device, args.with_masks, amp=args.amp)
    return float(counter.get_total_flops())


def count_step_syncs(model, criterion, optimizer, batch, device, args) -> HostSyncs:
    """Host syncs of one more step like the timed ones (not a log step: nothing is read for logging), counted by
    `sam3.host_sync.count_host_syncs`."""
    with count_host_syncs(device) as syncs:
        result = bench_step(model, criterion, optimizer, batch, device, args.with_masks, amp=args.amp)
        float(result.mean_loss)  # what the divergence guard reads (sam3.training.fit): read by the step already
    return syncs


def train_line(detector, freeze: str, cached: bool, batch_size: int, args, device, peak_tflops: float) -> dict:
    """One `train` line: freeze, optimiser, warm-up, timed steps, FLOPs and peak memory.

    `cached`: the step reads the vision encoder's 1x FPN level (and, with the text encoder frozen, the prompt
    embeddings) in fp16 as the feature cache stores them (bench.cache.feature_batch), through `CachedDetector`.
    """
    model = detector.model
    unused = parameters_without_text_gradients(detector, with_masks=args.with_masks)
    apply_freeze(model, freeze, also_freeze=unused)
    if args.adapter:  # as the trainer does: adapter weights train, the adapted layers' own weights do not
        set_adapter_trainable(model, keep_frozen=unused)
    if args.activation_checkpointing:
        parts = CHECKPOINT_PARTS if args.activation_checkpointing == "encoders" else CHECKPOINT_PARTS + DETR_PARTS
        enable_activation_checkpointing(model, parts)
    model.zero_grad(set_to_none=True)
    optimizer = build_optimizer(
        model,
        OptimConfig(),
        model.config.vision_config.backbone_config.num_hidden_layers,
        adapter_lr=AdapterConfig().lr if args.adapter else None,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    criterion = Criterion(with_masks=args.with_masks)
    batch = synthetic_batch(batch_size, args.image_size, args.prompts, args.with_masks).to(device)
    step_model = detector
    if cached:
        batch = feature_batch(detector, batch, with_text=freezes_text(freeze))
        step_model = CachedDetector(detector)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(args.warmup):
            bench_step(step_model, criterion, optimizer, batch, device, args.with_masks, amp=args.amp)
        sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            bench_step(step_model, criterion, optimizer, batch, device, args.with_masks, amp=args.amp)
        sync(device)
        seconds = (time.perf_counter() - started) / args.steps
        # read before counting FLOPs: FlopCounterMode's step holds more memory than a plain one
        peak_mem = peak_memory_gb(device)
        syncs = count_step_syncs(step_model, criterion, optimizer, batch, device, args)
        flops = None if args.no_flops else count_step_flops(step_model, criterion, optimizer, batch, device, args)
    finally:
        optimizer.state.clear()  # free the AdamW moments before the next line builds its own optimiser
        model.zero_grad(set_to_none=True)
    rate = batch_size / seconds
    return {
        "what": "train",
        "model": args.model,
        "device": device.type,
        "image_size": args.image_size,
        "freeze": freeze,
        "adapter": args.adapter,
        "adapter_rank": args.adapter_rank if args.adapter else None,
        "adapter_parts": args.adapter_parts if args.adapter else None,
        "trainable_params": trainable,
        "cache": cached,
        "one_to_many": detector.one_to_many,
        "batch": batch_size,
        "prompts": args.prompts,
        "activation_checkpointing": args.activation_checkpointing,
        "amp": args.amp_used,
        "images_per_s": round(rate, 3),
        "step_ms": round(seconds * 1000, 2),
        "peak_mem_gb": round(peak_mem, 3),
        "flops_per_image": None if flops is None else round(flops / batch_size),
        "mfu": None if flops is None else round(flops / batch_size * rate / (peak_tflops * 1e12), 4),
        "host_syncs_per_step": syncs.total,
        "host_syncs_by_kind": syncs.by_kind,
        "host_syncs_by_origin": syncs.by_origin,
        **({"host_sync_sites": dict(syncs.sites.most_common())} if args.sync_sites else {}),
    }


def batch_sizes(max_batch: int) -> list[int]:
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size *= 2
    return sizes


def mode_lines(detector, freeze: str, cached: bool, args, device, peak_tflops: float) -> list[dict]:
    """Batch 1, 2, 4, ... up to --max-batch or the first out-of-memory; the fastest is marked `best`."""
    lines = []
    for size in batch_sizes(args.max_batch):
        try:
            line = train_line(detector, freeze, cached, size, args, device, peak_tflops)
        except torch.cuda.OutOfMemoryError:
            lines.append(
                {
                    "what": "train",
                    "freeze": freeze,
                    "cache": cached,
                    "one_to_many": detector.one_to_many,
                    "batch": size,
                    "out_of_memory": True,
                }
            )
            torch.cuda.empty_cache()
            break
        lines.append(line)
    timed = [line for line in lines if "images_per_s" in line]
    for line in timed:
        line["best"] = line is max(timed, key=lambda t: t["images_per_s"])
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", "full"), help="default: tiny on CPU, full on CUDA")
    parser.add_argument("--image-size", type=int, help="default: 224 for tiny, 1008 for full")
    parser.add_argument("--freeze", nargs="+", choices=FREEZE_MODES, default=list(FREEZE_MODES))
    parser.add_argument("--max-batch", type=int, help="largest batch tried (default: 8 on CPU, 32 on CUDA)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per image (default: 4)")
    parser.add_argument("--with-masks", action="store_true", help="segmentation mode: mask decoder and mask losses")
    parser.add_argument(
        "--activation-checkpointing",
        nargs="?",
        const="all",
        choices=("all", "encoders"),
        help="checkpoint the trainable blocks: all (the flag alone: ViT, text, DETR encoder and decoder, as "
        "train.activation_checkpointing does) or encoders (ViT and text only, as before the DETR layers were)",
    )
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU (as the trainer); bf16 on CPU: CPU autocast, to see a bf16 "
        "step's memory without a GPU",
    )
    parser.add_argument(
        "--adapter",
        choices=("lora", "dora"),
        help="train through peft adapters (sam3.adapters) in --adapter-parts, the rest as --freeze says",
    )
    parser.add_argument("--adapter-rank", type=int, default=8, help="adapter rank (alpha = 2 x rank; default 8)")
    parser.add_argument(
        "--adapter-parts",
        nargs="+",
        choices=ADAPTER_PARTS,
        default=["vision_attention", "vision_mlp", "detr_encoder", "detr_decoder"],
        help="where the adapters go (default: the ViT and the DETR encoder and decoder)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--workers", type=int, nargs="+", help="loader workers to try (default: 0 1 2 on CPU)")
    parser.add_argument("--loader-images", type=int, help="images in the loader's dataset (default: 64 / 256)")
    parser.add_argument("--loader-batch", type=int, default=4)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--no-cache", action="store_true", help="skip the feature-cache lines")
    parser.add_argument(
        "--one-to-many",
        choices=("both", "on", "off"),
        default="both",
        help="train lines with the one-to-many (DAC) queries, without, or both (default)",
    )
    parser.add_argument(
        "--sync-sites", action="store_true", help="add each train line's host syncs per kind, origin and file:line"
    )
    parser.add_argument(
        "--no-flops",
        action="store_true",
        help="skip counting FLOPs (flops_per_image and mfu null): the counted step holds more memory than a plain one",
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cuda else "cpu")
    args.model = args.model or ("full" if cuda else "tiny")
    args.amp_used = amp_used(args.amp, device)
    args.image_size = args.image_size or (SAM3_IMAGE_SIZE if args.model == "full" else 224)
    args.max_batch = args.max_batch or (32 if cuda else 8)
    args.workers = args.workers or ([0, 2, 4, 8, 12] if cuda else [0, 1, 2])
    args.loader_images = args.loader_images or (256 if cuda else 64)
    torch.backends.cuda.matmul.allow_tf32 = False  # the trainer's default train.tf32 (the reference's)
    torch.backends.cudnn.allow_tf32 = False

    peak = measured_peak_tflops(device, torch.bfloat16 if args.amp_used == "bf16" else torch.float32)
    line = {"what": "peak", "device": device.type, "dtype": args.amp_used, "peak_tflops": round(peak, 2)}
    print(json.dumps(line), flush=True)
    loader = [] if args.skip_loader else loader_lines(args, device)
    for line in loader:
        print(json.dumps(line), flush=True)

    with device:  # the full model's 840M random weights are drawn on the GPU directly: minutes faster than on CPU
        detector = load_model(args.model, image_size=args.image_size)
    if args.adapter:
        config = AdapterConfig(
            kind=args.adapter, rank=args.adapter_rank, alpha=2.0 * args.adapter_rank, parts=args.adapter_parts
        )
        attach_adapter(detector, config)
        layers = {part: n for part, n in adapted_layer_counts(detector.model).items() if n}
        weights = sum(p.numel() for name, p in detector.model.named_parameters() if is_adapter_parameter(name))
        print(json.dumps({"what": "adapter", "kind": args.adapter, "layers": layers, "weights": weights}), flush=True)
    detector.to(device).train()
    trained = []
    dac_settings = {"both": [True, False], "on": [True], "off": [False]}[args.one_to_many]
    for one_to_many in dac_settings:
        detector.one_to_many = one_to_many
        for freeze in args.freeze:
            for cached in [False, True] if freeze in CACHE_FREEZE_MODES and not args.no_cache else [False]:
                trained += mode_lines(detector, freeze, cached, args, device, peak)
    print(json.dumps(summary_line(trained, loader, args, device)), flush=True)


def summary_line(trained: list[dict], loader: list[dict], args: argparse.Namespace, device: torch.device) -> dict:
    """Loader headroom, the cache's speed-up and DAC's cost per freeze mode (module docstring)."""
    timed = [t for t in trained if "images_per_s" in t]

    def best(**match) -> float | None:
        rates = [t["images_per_s"] for t in timed if all(t[k] == v for k, v in match.items())]
        return max(rates, default=None)

    def batch_one(freeze: str, one_to_many: bool) -> dict | None:
        lines = [
            t
            for t in timed
            if (t["freeze"], t["cache"], t["one_to_many"], t["batch"]) == (freeze, False, one_to_many, 1)
        ]
        return lines[0] if lines else None

    # the loader feeds training from pixels; a cached step reads features instead, so it is not compared
    best_train = best(cache=False)
    best_loader = max((line["images_per_s"] for line in loader), default=None)
    summary = {"what": "summary", "best_train_images_per_s": best_train, "best_loader_images_per_s": best_loader}
    if best_train and best_loader:
        summary["loader_headroom"] = round(best_loader / best_train, 2)
    for freeze in args.freeze:
        with_dac = True if args.one_to_many != "off" else False
        pixels, cached = (
            best(freeze=freeze, cache=False, one_to_many=with_dac),
            best(freeze=freeze, cache=True, one_to_many=with_dac),
        )
        if pixels and cached:  # the cache's speed-up: best images/s from the cache over best from pixels
            summary[f"cache_speedup_{freeze}"] = round(cached / pixels, 2)
        on, off = batch_one(freeze, True), batch_one(freeze, False)
        if on and off:
            summary[f"dac_step_time_ratio_{freeze}"] = round(on["step_ms"] / off["step_ms"], 3)
            if device.type == "cuda":
                summary[f"dac_peak_mem_ratio_{freeze}"] = round(on["peak_mem_gb"] / off["peak_mem_gb"], 3)
    return summary


if __name__ == "__main__":
    main()
