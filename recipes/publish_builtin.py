"""Turn a finished CamVid run into the package's built-in model, with its model card.

    python recipes/publish_builtin.py runs/camvid-b0-trainval --holdout runs/camvid-b0-holdout

Gives the run's exported model (``best/``: the best validation, or the last step when the
run had no validation; with ``--checkpoint``, the newest checkpoint's averaged weights of a
run still going, which the card calls an intermediate checkpoint) the built-in input size
(short side ``INPUT_SHORT_SIDE``), evaluates it on CamVid val with the library's own
evaluation (whole image; then flip; then multi-scale + flip) and, with ``--holdout``, the same
recipe's run that left one recording out on that recording (its ``val_include``), at the same
input size and at the recording's own size: the estimate of how the model does on a drive it
has not seen. ``--holdout-published`` keeps the published model's hold-out figures instead
(the card then says which schedule they measured), for new weights whose own hold-out run
could not be finished. Writes the weights, config and preprocessing into
src/segformer/weights/builtin/camvid-b0/ with the metrics in the model's metadata, the
training curves, and the model card (README.md) from those numbers and the notes file.
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
from segformer.training.checkpointing import list_checkpoints, load_checkpoint
from segformer.training.config import TrainConfig
from segformer.training.datasets import open_dataset, open_splits
from segformer.training.loop import model_from_checkpoint
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
# The built-in model sees every photo resized so that its short side is 480 pixels (CamVid's
# 480×360 frames become 640×480). Chosen on the unseen recording of the hold-out run (trained
# without 0006R0, scored on it with `segformer eval --size H W`): short side 360 (the frames'
# own size), 448, 480, 540 gave 39.66, 42.13, 42.51, 42.52 mIoU; 480 is the smallest at the
# top. Most of the gain is a height that is a multiple of 32, as every training crop is
# (352×480: 41.25; 450×600: 40.14, 448×600: 42.13); see "The input size" in the notes.
INPUT_SHORT_SIDE = 480
# (height, width) of a 4:3 CamVid frame at that input size.
CAMVID_FRAME_INPUT = (INPUT_SHORT_SIDE, INPUT_SHORT_SIDE * 4 // 3)
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
        "--hardware",
        default=None,
        help="where the run trained, when not on this machine's CPU, e.g. "
        "'steps 1–7500 on one NVIDIA H200, the rest on …'",
    )
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="publish the newest checkpoint's averaged weights (a run still going; the card "
        "says it is an intermediate checkpoint) instead of best/",
    )
    holdout_source = parser.add_mutually_exclusive_group()
    holdout_source.add_argument(
        "--holdout",
        type=Path,
        default=None,
        help="the same recipe's run without one recording, validated on it (cross-drive estimate)",
    )
    holdout_source.add_argument(
        "--holdout-published",
        action="store_true",
        help="keep the published built-in's hold-out figures (from its own schedule) in the card",
    )
    parser.add_argument(
        "--notes",
        type=Path,
        default=REPO / "recipes" / "camvid-b0-trainval-notes.md",
        help="Markdown on how the run went and what mattered, put into the card",
    )
    args = parser.parse_args()

    notes = args.notes.read_text(encoding="utf-8").strip() if args.notes.is_file() else ""
    model = run_model(args.run, args.checkpoint)
    processor = builtin_processor(model)
    model.metadata = model.metadata.replace(preprocessing=processor.to_dict())
    dataset = open_dataset(args.data, "camvid", "val")
    results = {}
    for name, mode in MODES.items():
        metrics = evaluate_dataset(model, dataset, mode, processor=processor, progress=True)
        results[name] = metrics
        print(f"{name}: {metrics.summary()}")
    holdout = (
        evaluate_holdout(args.holdout, args.data, processor)
        if args.holdout
        else published_holdout()
        if args.holdout_published
        else None
    )

    whole = results["whole"]
    history = read_history(args.run)
    training = model.metadata.training or {}
    recipe = training.get("recipe", {})
    model.metadata = model.metadata.replace(
        **{
            "name": "camvid-b0",
            "domain": DOMAIN,
            "license": "Apache-2.0 (weights trained by the segformer project); data: CamVid research terms",
            "dataset": dataset_text(recipe),
            "metrics": {
                "dataset": "camvid:val",
                "val_in_training_data": trains_on_val(recipe),
                "size": f"short side {INPUT_SHORT_SIDE} (480x360 frames at {CAMVID_FRAME_INPUT[1]}x{CAMVID_FRAME_INPUT[0]})",
                **{
                    name: {k: round(v, 2) for k, v in m.summary().items()}
                    for name, m in results.items()
                },
                "per_class_IoU": per_class(whole),
                **({"held_out_recording": holdout} if holdout else {}),
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
            model_card(results, history, training, args.wall_time, notes, holdout, args.hardware),
            encoding="utf-8",
        )
        if TARGET.exists():
            shutil.rmtree(TARGET)
        os.replace(staging, TARGET)
    size = (TARGET / "model.safetensors").stat().st_size / 2**20
    print(f"published to {TARGET} (weights {size:.1f} MiB)")
    print(AFTER)


def per_class(metrics) -> dict[str, float | None]:
    return {
        n: (None if math.isnan(v) else round(100 * v, 2))
        for n, v in zip(metrics.labels, metrics.iou, strict=True)
    }


def trains_on_val(recipe: dict) -> bool:
    """Whether the run trained on CamVid val (``train_split: train+val``)."""
    return "val" in recipe.get("train_split", "train").split("+")


def dataset_text(recipe: dict) -> str:
    if trains_on_val(recipe):
        return (
            "CamVid 11 classes, train + val (468 images); no model selection: the last step's "
            "averaged weights"
        )
    return "CamVid 11 classes, train split (367 images); selected on val (101 images)"


def builtin_processor(model: segformer.SegformerForSemanticSegmentation) -> ImageProcessor:
    """The model's processor (mean, std) resizing every image to a short side of
    ``INPUT_SHORT_SIDE``, aspect ratio kept."""
    return ImageProcessor.from_model(model).replace(
        do_resize=True, shortest_edge=INPUT_SHORT_SIDE, longest_edge=None, keep_ratio=False
    )


def evaluate_holdout(run: Path, data: str, processor: ImageProcessor) -> dict:
    """The hold-out run's last weights on the recording it left out (whole image) at the
    built-in input size and at the frames' own size, with the command that reproduces the
    first figure."""
    config = TrainConfig.from_file(run / "config.yaml")
    model = segformer.load(run / "last")
    dataset = open_splits(data, "camvid", config.val_split, include=config.val_include)
    metrics = evaluate_dataset(model, dataset, MODES["whole"], processor=processor, progress=True)
    native = evaluate_dataset(model, dataset, MODES["whole"], progress=True)
    print(f"held-out recording {config.val_include}: {metrics.summary()}")
    print(f"  at the frames' own size: {native.summary()}")
    include = " ".join(f"--include '{g}'" for g in config.val_include)
    height, width = CAMVID_FRAME_INPUT
    return {
        "steps": config.max_steps,
        "recording": " ".join(config.val_include),
        "images": len(dataset),
        "trained_without": " ".join(config.train_exclude),
        **{k: round(v, 2) for k, v in metrics.summary().items()},
        "native_size_mIoU": round(native.summary()["mIoU"], 2),
        "per_class_IoU": per_class(metrics),
        "command": (
            f"segformer eval --model {run}/last --data ../shared/data/camvid --format camvid "
            f"--split {config.val_split} {include} --size {height} {width}"
        ),
    }


def published_holdout() -> dict:
    """The hold-out figures of the built-in model now published, with the length of the
    schedule they measured (cards written before it was recorded: the published run's)."""
    published = segformer.load(TARGET).metadata
    holdout = (published.metrics or {}).get("held_out_recording")
    if not holdout:
        raise SystemExit("the published built-in model has no hold-out figures to keep")
    return {"steps": (published.training or {}).get("steps"), **holdout}


def run_model(run: Path, newest_checkpoint: bool) -> segformer.SegformerForSemanticSegmentation:
    """The run's exported model (``best/``), or its newest checkpoint's model as the run would
    export it at that step."""
    if not newest_checkpoint:
        return segformer.load(run / "best")
    checkpoints = list_checkpoints(run / "checkpoints")
    if not checkpoints:
        raise SystemExit(f"{run}: no checkpoints")
    return model_from_checkpoint(load_checkpoint(checkpoints[-1][1]))


def read_history(run: Path) -> dict:
    """The run's loss/lr/val history: history.json once the run has finished, else the one
    carried by its newest checkpoint (so a run still going can be published)."""
    if (run / "history.json").is_file():
        return json.loads((run / "history.json").read_text())
    checkpoints = list_checkpoints(run / "checkpoints")
    return load_checkpoint(checkpoints[-1][1])["history"] if checkpoints else {}


# What the model is for, shown wherever it is used (info, predict, the web page, JSON).
DOMAIN = "road scenes seen from a car, like CamVid's street video of Cambridge, UK at 480×360"
# The out-of-domain threshold belongs to the weights: new weights need a new one.
AFTER = "then python recipes/calibrate_ood.py (the out-of-domain threshold for these weights)"


def model_card(
    results: dict,
    history: dict,
    training: dict,
    wall_time: str | None,
    notes: str = "",
    holdout: dict | None = None,
    hardware: str | None = None,
) -> str:
    whole = results["whole"]
    steps = training.get("steps", "?")
    recipe = training.get("recipe", {})
    hardware = hardware or (
        f"{cpu_model()}, {recipe.get('threads') or 2} PyTorch thread(s), no GPU"
        f" (torch {torch.__version__})"
    )
    trained_on_val = trains_on_val(recipe)
    rows = "\n".join(
        f"| {name} | {m.summary()['mIoU']:.2f} | {m.summary()['mAcc']:.2f} | {m.summary()['aAcc']:.2f} |"
        for name, m in results.items()
    )
    per_class_rows = "\n".join(
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
    if trained_on_val:
        selection = (
            "none: the schedule was fixed in advance and the last step's averaged (EMA) "
            "weights ship"
        )
        data = "CamVid train + val (468 images from the three recordings 0001TP, 0006R0, 0016E5)"
        recipe_file, run_dir = "recipes/camvid-b0-trainval.yaml", "runs/camvid-b0-trainval"
        val_title = "CamVid val (101 images) — part of the training data"
        val_caveat = (
            "These frames were trained on: the table shows how well the model fits them,\n"
            "not how it does on pictures it has not seen (for that, see the unseen recording\n"
            "above).\n\n"
        )
    else:
        at = f"step {best['step']} (val mIoU {best['mIoU']:.2f} during training)" if best else ""
        selection = f"val mIoU, best at {at or 'the last step'}"
        data = "CamVid train (367 images)"
        recipe_file, run_dir = "recipes/camvid-b0.yaml", "runs/camvid-b0"
        val_title = "CamVid val (101 images)"
        val_caveat = ""
    publish_options = (
        ""
        if not holdout
        else " --holdout-published"
        if from_other_schedule(holdout, steps)
        else " --holdout runs/camvid-b0-holdout"
    )
    schedule = (
        f"linear warm-up ({recipe.get('warmup_steps', '?')} steps), then linear decay to zero"
        + (f" with warm restarts at {recipe['restarts']}" if recipe.get("restarts") else "")
    )
    augment = "flip, photometric distortion" + (
        ", gamma and colour temperature (dusk and overcast light)" if recipe.get("lighting") else ""
    )
    ema = (
        f"; weights averaged over steps (EMA, decay {recipe['ema_decay']}): those ship"
        if recipe.get("ema_decay")
        else ""
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
- Input: the whole image, resized so that its short side is {INPUT_SHORT_SIDE} pixels (CamVid's
  480×360 frames become {CAMVID_FRAME_INPUT[1]}×{CAMVID_FRAME_INPUT[0]}), ImageNet mean/std. The size was chosen on the
  unseen recording below (see "The input size" in the notes).
{status}{holdout_section(holdout, steps)}
## Results on {val_title}

{val_caveat}| inference | mIoU | mAcc | aAcc |
| --- | --- | --- | --- |
{rows}

Per-class IoU (whole image, no test-time augmentation):

| class | IoU |
| --- | --- |
{per_class_rows}

Reproduce: `segformer eval --data ../shared/data/camvid --format camvid --split val`
(add `--flip`, or `--scales 0.5 0.75 1 1.25 1.5 1.75 --flip`). The CamVid test split was
never used: it is held back to judge this model.

## Training

- Data: {data}.
- Model selection: {selection}.
- Recipe: `{recipe_file}` — random resize {recipe.get("ratio_range", "?")} of each image's
  own size, random {recipe.get("crop_size", "?")} crops (at most 75 % one class), {augment};
  AdamW lr {recipe.get("lr", "?")}, weight decay {recipe.get("weight_decay", "?")},
  {schedule}, ENet class weights, stochastic depth {recipe.get("drop_path_rate", "?")},
  gradient clipping, bf16 autocast{ema}.
- Command: `segformer train {recipe_file}` (resume with
  `segformer train --resume {run_dir}`), then
  `python recipes/publish_builtin.py {run_dir}{publish_options}`.
- Steps: {steps} of batch {recipe.get("batch_size", "?")} (of {reached} trained).
- Hardware: {hardware}.
- Wall time: {wall_time or "see the run log"}.

![training curves](training_curves.png)
{"" if trained_on_val else "![validation mIoU](validation.png)"}
![per-class IoU](per_class_iou.png)

{notes}

## Licence

Weights: Apache-2.0, like the code that trained them. Data: {DATA_TERMS}
"""


def from_other_schedule(holdout: dict, steps: int | str | None) -> bool:
    """Whether the hold-out figures measured a schedule other than the shipped weights'."""
    return bool(holdout.get("steps") and steps and holdout["steps"] != steps)


def holdout_section(holdout: dict | None, steps: int | str | None = None) -> str:
    """The cross-recording estimate: the same recipe trained without one recording, scored on
    it (saying so when that run's schedule differs from the shipped weights' ``steps``)."""
    if not holdout:
        return ""
    recipe, run = "The same recipe", "the hold-out run"
    if from_other_schedule(holdout, steps):
        recipe = (
            f"The same recipe on its earlier {holdout['steps']}-step schedule (these weights "
            f"trained {steps} steps; the unfinished hold-out run of {steps} steps is in the notes)"
        )
        run = f"the hold-out run with `--set max_steps={holdout['steps']}`"
    rows = "\n".join(
        f"| {n} | {'n/a' if v is None else f'{v:.2f}'} |"
        for n, v in holdout["per_class_IoU"].items()
    )
    return f"""
## Expected on a drive it has not seen

{recipe}, trained on train + val without recording {holdout["recording"]}
({holdout["images"]} frames), then scored on that recording (whole image, at the built-in
input size): **mIoU {holdout["mIoU"]:.2f}** (mAcc {holdout["mAcc"]:.2f}, aAcc {holdout["aAcc"]:.2f}); at the
frames' own 480×360 it scores {holdout["native_size_mIoU"]:.2f}.
Validation frames from the recordings the model trained on flatter it; a whole unseen
recording is the honest estimate.

| class | IoU on the unseen recording |
| --- | --- |
{rows}

Reproduce (after training {run}, see the notes below):
`{holdout["command"]}`
"""


if __name__ == "__main__":
    main()
