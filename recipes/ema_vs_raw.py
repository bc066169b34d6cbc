"""Score a run's averaged (EMA) weights against its raw weights at one checkpoint, on the run's
own validation images: how much the weight average is worth.

    python recipes/ema_vs_raw.py runs/camvid-b0-holdout            # the newest checkpoint
    python recipes/ema_vs_raw.py runs/camvid-b0-holdout --step 3000

A checkpoint keeps both the weights the optimiser trains and their running average (the run
validates and exports the average); this evaluates each the way the run validates (whole
image, the run's preprocessing) and prints one line per set of weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segformer.errors import SegformerError
from segformer.training.checkpointing import list_checkpoints, load_checkpoint
from segformer.training.config import TrainConfig
from segformer.training.loop import (
    image_processor,
    inference_mode,
    model_from_checkpoint,
    open_split,
)
from segformer.training.metrics import evaluate_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder (with checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    args = parser.parse_args()
    checkpoints = dict(list_checkpoints(args.run / "checkpoints"))
    if not checkpoints:
        raise SegformerError(f"{args.run}: no checkpoints")
    step = args.step if args.step is not None else max(checkpoints)
    if step not in checkpoints:
        raise SegformerError(
            f"{args.run}: no checkpoint at step {step} (have {sorted(checkpoints)})"
        )
    state = load_checkpoint(checkpoints[step])
    if not state.get("ema"):
        raise SegformerError(f"{checkpoints[step]}: the run kept no weight average (ema_decay)")
    config = TrainConfig.from_dict(state["train_config"])
    if config.val_split in (None, "none"):
        raise SegformerError(f"{args.run}: the run has no validation split to score on")
    dataset = open_split(config, config.val_split, include=config.val_include)
    for name, averaged in (("raw", False), ("EMA", True)):
        model = model_from_checkpoint(state, averaged)
        metrics = evaluate_dataset(
            model, dataset, inference_mode(config), processor=image_processor(config)
        )
        scores = "  ".join(f"{k} {v:.2f}" for k, v in metrics.summary().items())
        print(f"step {step} {name:>3} weights on {dataset.name} ({len(dataset)} images): {scores}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SegformerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
