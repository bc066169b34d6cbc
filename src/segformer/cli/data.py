"""``segformer data``: look at a dataset before training on it, and rewrite it in the
canonical folder layout.

    segformer data check DATA --format coco [--split val] [--preview preview.png]
    segformer data convert DATA --format voc --out my-data/

``check`` prints the images and masks found, pixel and image counts per class, and notes
(a background class at 0, class weights against imbalance); when the data cannot train it
prints one ``error:`` line per kind of problem and exits 2. ``convert`` writes images, index
PNG masks and labels.json (what ``--format folder`` reads), atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segformer.errors import DataError, SegformerError
from segformer.training.config import DATASET_FORMATS


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="dataset folder (or list / annotation file)")
    parser.add_argument("--format", "-f", required=True, choices=DATASET_FORMATS)
    parser.add_argument(
        "--labels", metavar="JSON", help="class names (and palette) for formats without them"
    )
    parser.add_argument(
        "--reduce-labels",
        choices=("yes", "no"),
        default=None,
        help="0 → ignore, k → k−1 (default: yes for ade20k only)",
    )
    parser.add_argument(
        "--background",
        choices=("yes", "no"),
        default="yes",
        help="coco, labelstudio: pixels no object covers are class 0 'background' (yes) or ignored",
    )
    parser.add_argument("--image-column", help="hf format: image column")
    parser.add_argument("--mask-column", help="hf format: annotation column")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="check a dataset (counts, problems, preview) or convert it to the folder layout",
        description="Check a dataset before training, or convert it to the canonical folder layout.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    check = sub.add_parser(
        "check",
        help="pairs, unreadable or mis-sized files, label values, class balance, a preview",
        description=(
            "Read every image header and mask of one split: report pairs found, pixel and image "
            "counts per class, values outside the label set, colour masks, whether label 0 looks "
            "like background, class imbalance with suggested weights. Exit 2 when the data "
            "cannot train, with one line per kind of problem."
        ),
    )
    _data_arguments(check)
    check.add_argument("--split", default="train", help="split to check (default: train)")
    check.add_argument(
        "--num-labels", type=int, help="size of the label set (default: the format's or --labels)"
    )
    check.add_argument(
        "--preview", metavar="PNG", help="write a grid of samples with masks over them"
    )
    check.add_argument("--samples", type=int, default=8, help="images in the preview (default 8)")
    check.add_argument("--seed", type=int, default=0, help="which random samples (default 0)")
    check.set_defaults(run=run_check)

    convert = sub.add_parser(
        "convert",
        help="write images + index PNG masks + labels.json (the folder format), atomically",
        description=(
            "Write the dataset as OUT/images/<split>/, OUT/masks/<split>/ (train ids, 255 = "
            "ignore, palette PNGs) and OUT/labels.json, through a temporary folder renamed at "
            "the end. OUT must not exist and must not be inside the input."
        ),
    )
    _data_arguments(convert)
    convert.add_argument("--out", "-o", required=True, metavar="DIR", help="new folder to write")
    convert.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="SPLIT",
        help="split to convert (repeatable; default: whichever of train, val, test exist)",
    )
    convert.set_defaults(run=run_convert)


def _open(args: argparse.Namespace, split: str | None, unpaired: list[str] | None = None):
    from segformer.training.datasets import open_dataset

    return open_dataset(
        args.data,
        args.format,
        split,
        reduce_labels=None if args.reduce_labels is None else args.reduce_labels == "yes",
        image_column=args.image_column,
        mask_column=args.mask_column,
        background=args.background == "yes",
        unpaired=unpaired,
    )


def run_check(args: argparse.Namespace) -> int:
    from segformer.training.datacheck import check_dataset, write_preview
    from segformer.training.files import read_labels_file

    unpaired: list[str] = []
    dataset = _open(args, args.split, unpaired)
    palette = None
    if args.labels:
        names, palette = read_labels_file(args.labels)
        dataset.labels = names
    report = check_dataset(dataset, args.num_labels, unpaired=unpaired)
    for line in report.summary_lines():
        print(line)
    if args.preview:
        written = write_preview(dataset, args.preview, args.samples, args.seed, palette=palette)
        print(f"wrote {written}")
    if report.ok:
        print("ok: the data can train")
        return 0
    for line in report.problem_lines():
        print(f"error: {line}", file=sys.stderr)
    return 2


def run_convert(args: argparse.Namespace) -> int:
    from segformer.training.convert import check_destination, convert_dataset
    from segformer.training.files import read_labels_file

    sources = [Path(args.data)]
    check_destination(Path(args.out), sources)  # before reading anything
    splits = args.splits or ["train", "val", "test"]
    datasets = {}
    for split in splits:
        try:
            datasets[split] = _open(args, split)
        except DataError as exc:
            if args.splits:
                raise
            print(f"split {split}: skipped ({exc})", file=sys.stderr)
    if not datasets:
        raise SegformerError(f"{args.data}: no split could be read (tried {', '.join(splits)})")
    labels = palette = None
    if args.labels:
        labels, palette = read_labels_file(args.labels)
    result = convert_dataset(datasets, args.out, labels, palette, sources=sources)
    counts = ", ".join(f"{split} {count}" for split, count in result.splits.items())
    print(f"wrote {result.out}: {counts} images, {len(result.labels)} classes (--format folder)")
    return 0
