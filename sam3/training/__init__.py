"""The pieces of `sam3.trainer.train`, one job per module, in the order a run uses them:

setup       seed, model (frozen, checkpointed, compiled, on the device), training data, optimiser, criterion,
            guard: `build_run(job, dist_info) -> RunParts`
checkpoint_folder
            a run's checkpoint folder (`CheckpointFolder`: background saves, the newest intact file, loading),
            shared with the video trainer
resume      the image run's checkpoints (`RunCheckpoints`: with best.pt), `resume_or_start` (the newest checkpoint of
            the same params, or step 0 saved as the first "last good" state) and `roll_back` (both trainers' guard)
fit         `FitLoop`: the optimiser steps, with guard rollbacks, logging, checkpoints and validation
validation  box / mask AP and cgF1 on the valid split (every K epochs, or the "val" mode's only pass)
logs        TensorBoard, train_stats.jsonl, Weights & Biases, the progress bar (rank 0)
ddp         DistributedDataParallel wrapping and the loss means over ranks
"""
