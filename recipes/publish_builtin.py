"""Turn a finished CamVid run into the package's built-in model, with its model card.

    python recipes/publish_builtin.py runs/camvid-b0 [--data ../shared/data/camvid]

Evaluates the run's best checkpoint on CamVid val with the library's own evaluation (whole
image at 480×360; then flip; then multi-scale + flip), writes the weights, config and
preprocessing into src/segformer/weights/builtin/camvid-b0/ with the metrics in the model's metadata,
copies the training curves, and writes the model card (README.md) from those numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

import segformer
from segformer.inference.modes import InferenceMode
from segformer.inference.processing import ImageProcessor
from segformer.tools.bench import cpu_model
from segformer.training import reports
from segformer.training.datasets import open_dataset
from segformer.training.metrics import evaluate_dataset

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "src" / "segformer" / "weights" / "builtin" / "camvid-b0"
MODES = {
    "whole": InferenceMode("whole"),
    "whole + flip": InferenceMode("whole", flip=True),
    "multi-scale (0.5–1.75) + flip": InferenceMode(
        "whole", scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True
    ),
}
DATA_TERMS = (
    "CamVid (Brostow, Fauqueur, Cipolla, 'Semantic object classes in video: a high-definition "
    "ground truth database', Pattern Recognition Letters 2008), 11-class version as "
    "redistributed with the SegNet tutorial; a research data set — check its terms before "
    "commercial use of models trained on it."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, help="the training run folder (with best/ and history.json)"
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument(
        "--wall-time", default=None, help="training wall time to report, e.g. '2 h 40 min'"
    )
    parser.add_argument(
        "--notes",
        type=Path,
        default=REPO / "recipes" / "camvid-b0-notes.md",
        help="Markdown on how the run went and what mattered, put into the card",
    )
    args = parser.parse_args()

    notes = args.notes.read_text(encoding="utf-8").strip() if args.notes.is_file() else ""
    model = segformer.load(args.run / "best")
    processor = ImageProcessor.from_model(model)
    dataset = open_dataset(args.data, "camvid", "val")
    results = {}
    for name, mode in MODES.items():
        metrics = evaluate_dataset(model, dataset, mode, processor=processor, progress=True)
        results[name] = metrics
        print(f"{name}: {metrics.summary()}")

    whole = results["whole"]
    history = read_history(args.run)
    training = model.metadata.training or {}
    model.metadata = model.metadata.replace(
        **{
            "name": "camvid-b0",
            "domain": DOMAIN,
            "license": "Apache-2.0 (weights trained by the segformer project); data: CamVid research terms",
            "dataset": "CamVid 11 classes, train split (367 images); selected on val (101 images)",
            "metrics": {
                "dataset": "camvid:val",
                "size": "480x360",
                **{
                    name: {k: round(v, 2) for k, v in m.summary().items()}
                    for name, m in results.items()
                },
                "per_class_IoU": {
                    n: (None if math.isnan(v) else round(100 * v, 2))
                    for n, v in zip(whole.labels, whole.iou, strict=True)
                },
            },
            "training": {k: v for k, v in training.items() if k != "recipe"},
        }
    )

    with tempfile.TemporaryDirectory(dir=TARGET.parent, prefix=".publish-") as tmp:
        staging = Path(tmp) / "camvid-b0"
        segformer.save(model, staging)
        reports.plot_training_curves(history, staging / "training_curves.png")
        reports.plot_validation_curve(history, staging / "validation.png")
        reports.plot_per_class_iou(whole, staging / "per_class_iou.png")
        (staging / "README.md").write_text(
            model_card(results, history, training, args.wall_time, notes), encoding="utf-8"
        )
        if TARGET.exists():
            shutil.rmtree(TARGET)
        os.replace(staging, TARGET)
    size = (TARGET / "model.safetensors").stat().st_size / 2**20
    print(f"published to {TARGET} (weights {size:.1f} MiB)")
    print(AFTER)


def read_history(run: Path) -> dict:
    """The run's loss/lr/val history: history.json once the run has finished, else the one
    carried by its newest checkpoint (so a run still going can be published)."""
    if (run / "history.json").is_file():
        return json.loads((run / "history.json").read_text())
    from segformer.training.checkpointing import list_checkpoints, load_checkpoint

    checkpoints = list_checkpoints(run / "checkpoints")
    return load_checkpoint(checkpoints[-1][1])["history"] if checkpoints else {}


# What the model is for, shown wherever it is used (info, predict, the web page, JSON).
DOMAIN = "road scenes seen from a car, like CamVid's street video of Cambridge, UK at 480×360"
# The out-of-domain threshold belongs to the weights: new weights need a new one.
AFTER = "then python recipes/calibrate_ood.py (the out-of-domain threshold for these weights)"


def model_card(
    results: dict, history: dict, training: dict, wall_time: str | None, notes: str = ""
) -> str:
    whole = results["whole"]
    steps = training.get("steps", "?")
    recipe = training.get("recipe", {})
    rows = "\n".join(
        f"| {name} | {m.summary()['mIoU']:.2f} | {m.summary()['mAcc']:.2f} | {m.summary()['aAcc']:.2f} |"
        for name, m in results.items()
    )
    per_class = "\n".join(
        f"| {n} | {'n/a' if math.isnan(v) else f'{100 * v:.2f}'} |"
        for n, v in zip(whole.labels, whole.iou, strict=True)
    )
    scheduled = recipe.get("max_steps")
    reached = max((r["step"] for r in history.get("train", [])), default=steps)
    status = (
        f"\n**Status: an intermediate checkpoint** — the run is at step {reached} of the "
        f"recipe's {scheduled}. It is resumable and this card is regenerated when it goes "
        "further.\n"
        if isinstance(reached, int) and isinstance(scheduled, int) and reached < scheduled
        else ""
    )
    best = max(history.get("val", []), key=lambda r: r["mIoU"], default=None)
    selected = (
        f"step {best['step']} (val mIoU {best['mIoU']:.2f} during training)"
        if best
        else "the last step"
    )
    return f"""# camvid-b0: SegFormer-B0 trained from scratch on CamVid

The model `segformer predict`, `segformer serve` and `segformer eval` use when no `--model` is
given. A SegFormer-B0 (3.7 M parameters) trained **from scratch** — no ImageNet encoder, no
other pretrained weights — by this project's own trainer and recipe.

**For road scenes** seen from a car, like CamVid's street video of Cambridge, UK: on other
pictures it still answers with these 11 classes, and predictions warn (see
[Out-of-domain warning](#out-of-domain-warning)). For other photos use a model trained on
them (e.g. `--model nvidia/segformer-b0-finetuned-ade-512-512`) or `segformer train` your own.

- Classes (11): sky, building, pole, road, pavement, tree, sign/symbol, fence, car,
  pedestrian, bicyclist; CamVid's void label is ignored. Standard CamVid colours.
- Input: the whole image at its own size (CamVid frames are 480×360), ImageNet mean/std.
{status}
## Results on CamVid val (101 images, 480×360)

| inference | mIoU | mAcc | aAcc |
| --- | --- | --- | --- |
{rows}

Per-class IoU (whole image, no test-time augmentation):

| class | IoU |
| --- | --- |
{per_class}

Reproduce: `segformer eval --data ../shared/data/camvid --format camvid --split val --native`
(add `--flip`, or `--scales 0.5 0.75 1 1.25 1.5 1.75 --flip`). The CamVid test split was
never used: it is held back to judge this model.

## Training

- Data: CamVid train (367 images). Model selection: val mIoU, best at {selected}.
- Recipe: `recipes/camvid-b0.yaml` — random resize 0.5–2.0 of each image's own size,
  random {recipe.get("crop_size", "?")} crops (at most 75 % one class), flip, photometric
  distortion; AdamW lr {recipe.get("lr", "?")}, weight decay {recipe.get("weight_decay", "?")},
  linear warm-up then linear decay in two cycles (a warm restart at step 7200), ENet class
  weights, gradient clipping, bf16 autocast.
- Command: `segformer train recipes/camvid-b0.yaml` (resume with `segformer train --resume runs/camvid-b0`),
  then `python recipes/publish_builtin.py runs/camvid-b0`.
- Steps: {steps} of batch {recipe.get("batch_size", "?")} (of {reached} trained).
- Hardware: {cpu_model()}, 2 cores, no GPU (torch {torch.__version__}).
- Wall time: {wall_time or "see the run log"}.

![training curves](training_curves.png)
![validation mIoU](validation.png)
![per-class IoU](per_class_iou.png)

{notes}

## Licence

Weights: Apache-2.0, like the code that trained them. Data: {DATA_TERMS}
"""


if __name__ == "__main__":
    main()
