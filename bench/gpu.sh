#!/usr/bin/env bash
# Every GPU measurement of docs/PERFORMANCE.md in one run, under 8 minutes on one H100, each JSON line printed as
# soon as it is measured (a timeout keeps what ran). Run from the repository root on the GPU machine:
#
#     bash bench/gpu.sh 2>&1 | tee bench/out/gpu.jsonl
#
# Each command has its own time limit (timeout), so one slow or out-of-memory line cannot eat the others' time.
# Lines: bench.speed (full model, 1008 px, bf16 autocast, random weights): full fine-tuning at batch 1/2/4 with and
# without activation checkpointing at 4 and 16 prompts per image; LoRA rank 8 and 32 (16 prompts); freeze=vision from the feature cache at batch 8
# and 16 (bench.cache); segmentation at batch 1; each train line carries peak_mem_gb, mfu and host_syncs_per_step.
# Then bench.checkpoint: the bytes and the training thread's stall per checkpoint save, before and after; and
# bench.vos_step: a VOS training step of SAM 2.1 B+'s architecture at 1024 px, 8 frames, 3 objects.
set -u
cd "$(dirname "$0")/.."
mkdir -p bench/out
run() {  # run LIMIT_SECONDS COMMAND...: one measurement, its lines as they come, a note when it fails
    local limit=$1
    shift
    echo "{\"line\": \"start\", \"command\": \"$*\", \"date\": \"$(date -u +%FT%TZ)\"}"
    timeout "$limit" "$@" || echo "{\"line\": \"failed\", \"command\": \"$*\", \"rc\": $?}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
common=(--device cuda --model full --skip-loader --no-cache --warmup 2 --steps 4 --one-to-many on)
# full fine-tuning, 4 and 16 prompts per image, batch 1 -> 4, without and with activation checkpointing
run 45 python -m bench.speed "${common[@]}" --freeze none --prompts 4 --max-batch 4
run 45 python -m bench.speed "${common[@]}" --freeze none --prompts 4 --max-batch 4 --activation-checkpointing
run 55 python -m bench.speed "${common[@]}" --freeze none --prompts 16 --max-batch 4
run 55 python -m bench.speed "${common[@]}" --freeze none --prompts 16 --max-batch 4 --activation-checkpointing
# LoRA rank 8 and 32 in the ViT and the DETR encoder and decoder, heads in full, 16 prompts, checkpointing
for rank in 8 32; do
    run 40 python -m bench.speed "${common[@]}" --freeze heads --adapter lora --adapter-rank "$rank" --prompts 16 \
        --max-batch 2 --activation-checkpointing
done
# freeze=vision from the feature cache (the vision encoder never runs), batch 8 and 16, 4 prompts
run 45 python -m bench.cache --device cuda --config full --freeze vision --prompts 4 --batch 8 --steps 5
run 35 python -m bench.cache --device cuda --config full --freeze vision --prompts 4 --batch 16 --steps 5
# segmentation (mask decoder and mask losses), batch 1, 4 prompts
run 30 python -m bench.speed "${common[@]}" --freeze none --prompts 4 --max-batch 1 --with-masks
# the loader at 1008 px against the training step (loader_headroom in the summary line)
run 30 python -m bench.speed --device cuda --model full --freeze vision --prompts 4 --max-batch 8 --no-cache \
    --one-to-many on --warmup 1 --steps 3 --workers 4 8 12
# checkpoint saves: bytes and stall, the old synchronous whole-model way and the new one
run 30 python -m bench.checkpoint --model full --freeze vision --device cuda
# VOS: SAM 2.1 B+'s architecture at 1024 px, 8 frames, 3 objects, bf16: step time and peak memory
run 30 python -m bench.vos_step --model sam2.1-b+ --device cuda --size 1024 --frames 8 --objects 3 --warmup 2 --steps 4
