"""``segformer quantize``: a model as an int8 OpenVINO IR, quantized with NNCF on images of the
user's own data and checked on its labelled validation split, saved as a model folder.

    segformer quantize camvid-b0 --data ../shared/data/camvid --format camvid --out camvid-b0-int8
"""

from __future__ import annotations

import argparse
import logging

from segformer.training.config import DATASET_FORMATS as FORMATS

log = logging.getLogger("segformer")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="int8-quantize a model for OpenVINO (NNCF), checked on your validation split",
        description=(
            "Quantize a segmentation model to int8 with NNCF post-training quantization for "
            "OpenVINO's CPU plugin. Calibration images come from --calibration-split of your "
            "data, preprocessed as prediction does; fp32 and int8 are then scored on "
            "--val-split. Writes the folder OUT: the model (Hugging Face layout), "
            "openvino_int8.xml/.bin and quantization.json (recipe, mIoU of both, agreement). "
            "Nothing is written when int8 loses more than --max-drop mIoU points."
        ),
    )
    parser.add_argument("model", help="built-in name, checkpoint file, model folder or hub id")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="DIR", help="dataset folder (or list file)")
    data.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    data.add_argument(
        "--calibration-split", default="train", help="split to calibrate on (default: train)"
    )
    data.add_argument("--val-split", default="val", help="split to check on (default: val)")
    data.add_argument(
        "--samples",
        type=int,
        default=100,
        help="calibration images, a fixed random choice (default 100)",
    )
    data.add_argument(
        "--val-samples", type=int, default=None, help="validation images (default: all)"
    )
    data.add_argument(
        "--reduce-labels",
        choices=("yes", "no"),
        default=None,
        help="0 → ignore, k → k−1 (default: yes for ade20k only)",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="largest mIoU loss accepted, in points (default 1.0)",
    )
    parser.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="model folder to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from segformer.errors import SegformerError
    from segformer.tools.quantize import check_out_folder, quantize, write_quantized
    from segformer.training.datasets import open_dataset
    from segformer.weights.checkpoints import load_segmentation_model
    from segformer.weights.resolve import resolve

    if args.samples < 1 or (args.val_samples is not None and args.val_samples < 1):
        raise SegformerError("--samples and --val-samples take a number of at least 1")
    if args.max_drop < 0:
        raise SegformerError("--max-drop takes a number of points of at least 0")
    model = load_segmentation_model(args.model, purpose="quantization")
    protected = {"model's folder": resolve(args.model), "data": args.data}
    check_out_folder(args.out, protected)  # before the long part, and again when writing
    reduce = None if args.reduce_labels is None else args.reduce_labels == "yes"
    calibration = open_dataset(args.data, args.format, args.calibration_split, reduce_labels=reduce)
    validation = open_dataset(args.data, args.format, args.val_split, reduce_labels=reduce)
    if args.calibration_split == args.val_split:
        log.warning(
            "calibrating on the split that is checked (%s): the accuracy reported is optimistic",
            args.val_split,
        )
    result = quantize(
        model,
        calibration,
        validation,
        samples=args.samples,
        val_samples=args.val_samples,
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(result.report.table())
    print(result.report.summary())
    extra = {"model": args.model, "data": str(args.data), "format": args.format}
    out = write_quantized(
        model, result, args.out, max_drop=args.max_drop, protected=protected, extra=extra
    )
    print(f"wrote {out} (openvino_int8.xml, quantization.json and the model)")
    return 0
