"""Learning is real: train the tiny SAM 3 from scratch on generated shapes and measure held-out box AP50.

    python -m bench.learning                      # 2,000 training / 100 held-out images, 10 minutes of training
    python -m bench.learning --minutes 2 --n-train 400
    python -m bench.learning --minutes 30 --eval-every 1000     # the held-out AP50 curve as training goes on
    python -m bench.learning --no-priors                        # transformers' random init alone (stays on the plateau)
    python -m bench.learning --no-one-to-many                   # without the DAC queries (on by default, the recipe's)

Prints one JSON object: ap50_before, ap50_after (pycocotools through sam3.evaluation.score on the held-out test
split, model inference as `sam3.inference.predict_dataset`), seconds (training wall time), steps, settings, and
`curve`: held-out AP50 every --eval-every steps (evaluation time is not counted in the budget).

Settings are the recipe's from-scratch ones (docs/RECIPE.md section 1), not the fine-tuning recipe: hidden 64 tiny
config with initializer_range 0.1 (our "tiny"), AdamW lr 1e-3 and weight decay 1e-4, 200 warm-up steps then cosine
decay, gradient clipping 1.0, batch 8 images each with its present prompts plus 3 random absent ones, Hungarian
matching, the recipe's box losses, the presence loss at weight 5 instead of 20 (at 20 it dominates the loss from
scratch: seed 0 AP50 0.60 at 2,194 steps, seed 1 0.40), and sigmoid focal classification (`class_loss="focal"`: the
IoU-aware BCE stays on the plateau from scratch). The reference's model-side defaults are on (docs/RECIPE.md
section 3): the one-to-many (DAC) queries with their loss at weight 2 (`--no-one-to-many` turns them off), the
geometry encoder's token on every prompt, drop-path 0.1 in the ViT (`--drop-path`), and the sqrt(queries) scale of
the loss (`--no-sqrt-scale`). Training stops at --minutes; the schedule is laid over the number of steps the first
20 steps' pace predicts.

The model starts with the decoder's spatial priors for training from scratch (`sam3.scratch`: reference boxes on a
grid, a box position bias that attends inside each query's box), as every built-in random model does. Without them
(`--no-priors`) the queries attend to the whole image and learn only a position prior per query in ten minutes: the
held-out AP50 stays near 0.005 (README's "Benchmarks").

Images go through the plain warp to 224 px (the validation transform: the generated shapes are already 224 px, so
it is the identity), as in the recipe's measured run. `--augment` uses the reference train transform instead
(random square warp to 107-220 px, random pad to 224); it makes the task harder for a model trained from scratch
for ten minutes (see the figures in README's benchmarks). The loss terms go to stderr every 100 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.shapes_data import build_shapes_dataset
from sam3.config import META_DROP_PATH, LossConfig
from sam3.data import CocoPromptDataset, collate_prompts
from sam3.data.sampler import ResumableSampler
from sam3.drop_path import attach_drop_path
from sam3.engine import train_step
from sam3.evaluation import score
from sam3.inference import predict_dataset
from sam3.losses import Criterion
from sam3.model import load_model

IMAGE_SIZE = 224
WARMUP = 200


def held_out_ap50(model, dataset_dir: Path) -> float:
    model.eval()
    predictions = predict_dataset(model, dataset_dir, "test")
    model.train()
    gt = dataset_dir / "test" / "_annotations.coco.json"
    return float(score(gt, predictions, "bbox")["bbox_AP50"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: the recipe's 1e-3)")
    parser.add_argument(
        "--presence-weight", type=float, default=5.0, help="presence loss weight (default 5; the recipe's is 20)"
    )
    parser.add_argument("--augment", action="store_true", help="the reference's random warp + pad train transform")
    parser.add_argument(
        "--no-priors", action="store_true", help="transformers' random initialisation without sam3.scratch's priors"
    )
    parser.add_argument(
        "--no-one-to-many", action="store_true", help="train without the one-to-many (DAC) queries and their loss"
    )
    parser.add_argument("--drop-path", type=float, default=META_DROP_PATH, help="ViT stochastic depth (default 0.1)")
    parser.add_argument("--no-sqrt-scale", action="store_true", help="no sqrt(queries) scale of the loss")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also measure held-out AP50 every STEPS steps (stderr and `curve`; not counted in the time budget)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        build_shapes_dataset(data, n=args.n_train, seed=args.seed, image_size=IMAGE_SIZE, n_valid=4, n_test=args.n_test)
        model = load_model(
            "tiny", seed=args.seed, scratch_priors=not args.no_priors, one_to_many=not args.no_one_to_many
        )
        if args.drop_path > 0:
            attach_drop_path(model.model, args.drop_path)
        model.train()
        before = held_out_ap50(model, data)

        dataset = CocoPromptDataset(
            data, "train", image_size=IMAGE_SIZE, train=args.augment, seed=args.seed, num_negatives=3
        )
        sampler = ResumableSampler(len(dataset), seed=args.seed)
        criterion = Criterion(
            LossConfig(
                class_loss="focal",
                weight_presence=args.presence_weight,
                scale_by_sqrt_num_queries=not args.no_sqrt_scale,
            )
        )
        # fused: one kernel for all parameters, as sam3.optim.build_optimizer uses (4x faster on the CPU)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4, fused=True)
        budget = args.minutes * 60
        total_steps, step, started, epoch = None, 0, time.perf_counter(), 0
        curve: list[dict] = []
        while time.perf_counter() - started < budget:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, collate_fn=collate_prompts)
            for batch in loader:
                elapsed = time.perf_counter() - started
                if elapsed >= budget:
                    break
                if step == 20:  # the pace of the first steps sets the length of the cosine schedule
                    total_steps = max(WARMUP + 1, int(budget / (elapsed / 20)))
                horizon = total_steps or 10**9
                warm = min(1.0, (step + 1) / WARMUP)
                cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - WARMUP) / (horizon - WARMUP))))
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * warm * cosine
                result = train_step(model, criterion, optimizer, [batch], device=torch.device("cpu"), grad_clip=1.0)
                step += 1
                if step % 100 == 0:
                    terms = " ".join(f"{k}={float(v):.3f}" for k, v in result.terms.items() if not k[-1].isdigit())
                    print(f"step {step} {elapsed:.0f}s loss={float(result.loss):.3f} {terms}", file=sys.stderr)
                if args.eval_every and step % args.eval_every == 0:
                    paused = time.perf_counter()
                    ap50 = held_out_ap50(model, data)
                    curve.append({"step": step, "seconds": round(paused - started, 1), "ap50": round(ap50, 4)})
                    print(f"step {step} held-out AP50 {ap50:.4f}", file=sys.stderr)
                    started += time.perf_counter() - paused  # evaluation time is not training time
            epoch += 1
        seconds = time.perf_counter() - started
        after = held_out_ap50(model, data)
    print(
        json.dumps(
            {
                "ap50_before": round(before, 4),
                "ap50_after": round(after, 4),
                "seconds": round(seconds, 1),
                "steps": step,
                "n_train": args.n_train,
                "n_test": args.n_test,
                "batch": args.batch,
                "threads": args.threads,
                "seed": args.seed,
                "augment": args.augment,
                "priors": not args.no_priors,
                "lr": args.lr,
                "presence_weight": args.presence_weight,
                "one_to_many": not args.no_one_to_many,
                "drop_path": args.drop_path,
                "sqrt_scale": not args.no_sqrt_scale,
                "curve": curve,
            }
        )
    )


if __name__ == "__main__":
    main()
