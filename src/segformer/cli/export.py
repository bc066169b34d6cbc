"""``segformer export``: a model as an ONNX file (dynamic batch, height and width), checked
against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch, height, width), checked with onnxruntime",
        description=(
            "Export a segmentation model to ONNX: input pixel_values (batch, 3, height, width), "
            "output logits (batch, classes, height/4, width/4), all three input sizes dynamic. "
            "The graph is the exact re-associated forward pass of the 'fast' engine. onnxruntime "
            "then runs the file on two input shapes and its logits must match PyTorch's within "
            "a relative error of 1e-4, or nothing is written. Labels, palette and preprocessing "
            "are stored in the file's metadata."
        ),
    )
    parser.add_argument("model", help="built-in name, checkpoint file, model folder or hub id")
    parser.add_argument(
        "--format", default="onnx", choices=["onnx"], help="output format (default: onnx)"
    )
    parser.add_argument("--out", required=True, help="the file to write (.onnx)")
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: 18; at least 17)"
    )
    parser.add_argument(
        "--sample-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="input size traced and checked (default: the model's preprocessing size)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from segformer.errors import SegformerError
    from segformer.inference.export import DEFAULT_OPSET, export_onnx
    from segformer.inference.processing import ImageProcessor
    from segformer.weights.checkpoints import load

    model = load(args.model)
    size = (
        tuple(args.sample_size)
        if args.sample_size
        else tuple(ImageProcessor.from_model(model).size)
    )
    if min(size) < 8:
        raise SegformerError("--sample-size takes two numbers of at least 8 (H W)")
    report = export_onnx(
        model,
        args.out,
        opset=args.opset or DEFAULT_OPSET,
        sample_size=size,  # type: ignore[arg-type]
        check=not args.no_check,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(
        f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}) in {report.seconds:.1f} s"
    )
    for checked in report.checked:
        shape = "×".join(str(v) for v in checked["shape"])
        print(
            f"  onnxruntime vs PyTorch on {shape}: relative error {checked['relative_error']:.1e}"
        )
    return 0
