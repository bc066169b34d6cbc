"""``segformer eval``: a model's mIoU, mAcc, aAcc and per-class scores on a labelled dataset,
computed through the same code path as ``segformer predict`` (processor, inference mode,
engine). Prints the per-class table; writes metrics.json, per_class.txt, per_class_iou.png and
confusion_matrix.png. Under ``torchrun`` the images are shared between processes and the
confusion counts summed exactly.

    segformer eval --model runs/camvid/best --data ../shared/data/camvid --format camvid --split val
    segformer eval --model nvidia/segformer-b0-finetuned-cityscapes-1024-1024 \\
        --data cityscapes --format cityscapes --mode slide --crop-size 1024 --stride 768
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segformer.cli.predict import add_mode_arguments, mode_from_args
from segformer.errors import DataError
from segformer.training.config import DATASET_FORMATS as FORMATS

log = logging.getLogger("segformer")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a model on a labelled dataset (mIoU, per-class IoU, confusion matrix)",
        description=(
            "Evaluate a model on a labelled dataset with the inference path of `segformer predict`. "
            "Prints a per-class table and writes OUT/metrics.json, OUT/per_class.txt, "
            "OUT/per_class_iou.png and OUT/confusion_matrix.png."
        ),
    )
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        help="built-in name, checkpoint, model folder or hub id (default: the built-in model)",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="DIR", help="dataset folder (or list file)")
    data.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    data.add_argument(
        "--split", default="val", help="split to evaluate; a+b joins splits (default: val)"
    )
    data.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep only images whose file name matches (repeatable), e.g. '0006R0_*'",
    )
    data.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out images whose file name matches (repeatable)",
    )
    data.add_argument(
        "--labels",
        metavar="JSON",
        help="class names (and palette) when neither the format nor the model has them right",
    )
    data.add_argument(
        "--reduce-labels",
        choices=("yes", "no"),
        default=None,
        help="0 → ignore, k → k−1 (default: yes for ade20k only)",
    )
    data.add_argument(
        "--background",
        choices=("yes", "no"),
        default="yes",
        help="coco, labelstudio: pixels no object covers are class 0 'background' (yes) or ignored",
    )
    data.add_argument("--image-column", help="hf format: image column")
    data.add_argument("--mask-column", help="hf format: annotation column")
    data.add_argument("--no-preflight", action="store_true", help="skip checking every mask first")
    add_mode_arguments(parser)
    resize = parser.add_argument_group(
        "preprocessing (default: the model's preprocessor_config.json)"
    )
    chosen = resize.add_mutually_exclusive_group()
    chosen.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H×W"
    )
    chosen.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("LONG", "SHORT"),
        help="keep-ratio resize into LONG×SHORT, sides rounded up to a multiple of 32",
    )
    chosen.add_argument("--native", action="store_true", help="no resize: the images' own size")
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--out", "-o", default="eval", metavar="DIR", help="output folder (default: ./eval)"
    )
    run.add_argument("--batch-size", type=int, default=1, help="images per model call (default 1)")
    run.add_argument(
        "--num-workers", type=int, default=2, help="data-loading worker processes (default 2)"
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: auto)")
    run.add_argument("--precision", default="fp32", help="engine precision (default fp32)")
    run.add_argument("--backend", default="auto", help="inference engine backend (default: auto)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from segformer.inference.processing import ImageProcessor
    from segformer.training import reports
    from segformer.training.datacheck import scan
    from segformer.training.datasets import open_splits
    from segformer.training.distributed import setup_distributed
    from segformer.training.files import read_labels_file
    from segformer.training.metrics import evaluate_dataset
    from segformer.weights.builtin import DEFAULT_MODEL
    from segformer.weights.checkpoints import load_segmentation_model

    process, device = setup_distributed(args.device)
    model = load_segmentation_model(args.model, purpose="evaluation")
    model_name = args.model or DEFAULT_MODEL
    reduce = None if args.reduce_labels is None else args.reduce_labels == "yes"
    dataset = open_splits(
        args.data,
        args.format,
        args.split,
        include=args.include,
        exclude=args.exclude,
        reduce_labels=reduce,
        image_column=args.image_column,
        mask_column=args.mask_column,
        background=args.background == "yes",
    )
    names = read_labels_file(args.labels)[0] if args.labels else dataset.labels
    if names is not None and len(names) != len(model.labels):
        raise DataError(
            f"{dataset.name}: the dataset has {len(names)} classes but the model predicts {len(model.labels)}"
        )
    if names is not None and [n.lower() for n in names] != [n.lower() for n in model.labels]:
        log.warning(
            "class names differ between the dataset and the model; reporting the model's names"
        )
    if not args.no_preflight:
        scan(dataset, len(model.labels))

    processor = ImageProcessor.from_model(model)
    if args.size:
        processor = processor.replace(
            do_resize=True, size=tuple(args.size), keep_ratio=False, shortest_edge=None
        )
    elif args.scale:
        processor = processor.replace(
            do_resize=True,
            keep_ratio=True,
            scale=tuple(args.scale),
            size_divisor=32,
            shortest_edge=None,
        )
    elif args.native:
        processor = processor.replace(do_resize=False)
    mode = mode_from_args(args)
    metrics = evaluate_dataset(
        model,
        dataset,
        mode,
        processor=processor,
        device=str(device),
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    if process.is_main:
        info = {
            "model": str(model_name),
            "data": str(args.data),
            "format": args.format,
            "split": args.split,
            "include": args.include,
            "exclude": args.exclude,
            "images": len(dataset),
            "mode": mode.describe(),
            "preprocessing": processor.to_dict(),
        }
        written = reports.write_metrics_report(
            metrics, Path(args.out), info, model.metadata.palette
        )
        print(f"{model_name} on {dataset.name} ({len(dataset)} images, {mode.describe()})")
        print(metrics.table())
        print(f"wrote {written['metrics']} and plots in {Path(args.out)}")
    if process.active:
        dist.barrier()
    return 0
