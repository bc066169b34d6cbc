"""``segformer info``: what a model is — variant, parameters, compute, labels, origin."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a model: variant, parameters, GMACs, labels, source, licence",
        description=(
            "Describe a model: variant, parameter count, multiply-accumulates at an input size "
            "(convolutions, linear layers and attention matmuls: what the SegFormer paper's "
            "table calls GFLOPs), labels and palette, preprocessing, source and licence."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="built-in name, checkpoint file, model folder or hub id (default: the built-in model)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input size for the GMACs (default: the model's input size)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    from segformer.errors import SegformerError
    from segformer.inference.processing import ImageProcessor
    from segformer.inference.segmenter import model_info
    from segformer.weights.builtin import DEFAULT_MODEL
    from segformer.weights.checkpoints import load_segmentation_model

    model = load_segmentation_model(args.model, purpose="`segformer info`")
    name = args.model or DEFAULT_MODEL
    processor = ImageProcessor.from_model(model)
    if args.size is not None:
        if min(args.size) < 1:
            raise SegformerError("--size takes two positive numbers (H W)")
        size = (args.size[0], args.size[1])
    elif processor.do_resize and not (processor.keep_ratio or processor.shortest_edge):
        size = processor.size
    else:
        size = (512, 512)
    info = model_info(model, name, processor=processor, macs_at=size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _preprocessing_text(pre: dict[str, Any]) -> str:
    ours = pre.get("segformer") or {}
    if not pre.get("do_resize", True):
        resize = "no resize"
    elif ours.get("keep_ratio"):
        scale = ours.get("scale", [2048, 512])
        resize = f"keep-ratio resize into {scale[0]}×{scale[1]}"
        if ours.get("size_divisor"):
            resize += f", sides rounded up to multiples of {ours['size_divisor']}"
    elif "shortest_edge" in pre.get("size", {}):
        resize = f"short side to {pre['size']['shortest_edge']}"
    else:
        resize = f"resize to {pre['size']['height']}×{pre['size']['width']}"
    mean = ", ".join(f"{m:g}" for m in pre.get("image_mean", []))
    std = ", ".join(f"{s:g}" for s in pre.get("image_std", []))
    return f"{resize}; mean ({mean}), std ({std})"


def format_info(info: dict[str, Any]) -> str:
    """The text ``segformer info`` prints."""
    macs = info.get("macs")
    labels = info["labels"]
    shown = ", ".join(labels[:30]) + (f", … (+{len(labels) - 30} more)" if len(labels) > 30 else "")
    rows = [
        ("model", info["name"]),
        ("made for", info.get("domain") or "not stated (see the model's own documentation)"),
        ("variant", f"MiT-{info['variant']}" if info["variant"] != "custom" else "custom encoder"),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.2f} M)"),
    ]
    if macs:
        rows.append(
            (
                "GMACs",
                f"{macs['macs'] / 1e9:.2f} at {macs['height']}×{macs['width']} "
                '(convs, linear layers, attention matmuls; the paper\'s "GFLOPs")',
            )
        )
        rows.append(
            (
                "computed",
                f"{macs['macs_computed'] / 1e9:.2f} GMACs (the decoder's projections folded "
                "into its fuse conv: same function, fewer operations)",
            )
        )
    rows += [
        ("labels", f"{info['num_labels']}: {shown}"),
        ("palette", info["palette_source"]),
        ("preprocess", _preprocessing_text(info["preprocessing"])),
        ("source", info.get("source") or "unknown"),
        ("format", info.get("format") or "unknown"),
        ("licence", info.get("license") or "not stated"),
        ("warns", _out_of_domain_text(info.get("out_of_domain"))),
    ]
    if info.get("metrics"):
        rows.append(("metrics", _metrics_text(info["metrics"])))
    width = max(len(key) for key, _ in rows)
    # A value of several lines continues under the first one.
    return "\n".join(
        f"{key:<{width}}  " + value.replace("\n", "\n" + " " * (width + 2)) for key, value in rows
    )


def _out_of_domain_text(settings: dict[str, Any] | None) -> str:
    """When predictions warn that a picture is unlike the training data."""
    if not settings:
        return "never: no out-of-domain threshold measured for this model"
    text = f"when a picture's {settings.get('score')} score is above {settings.get('threshold')}"
    flagged = (settings.get("calibration") or {}).get("flagged") or {}
    if flagged:
        shown = ", ".join(f"{name} {share * 100:.0f}%" for name, share in flagged.items())
        text += f"\nflagged in calibration: {shown}"
    return text


def _metrics_text(metrics: dict[str, Any]) -> str:
    """Metadata metrics as lines: what they were measured on, then one line per group of
    scores (e.g. one per inference mode, and the per-class IoU)."""
    head, lines = [], []
    for name, value in metrics.items():
        if isinstance(value, dict):
            separator = ", " if len(value) > 3 else "  "
            shown = separator.join(f"{k} {_number(v)}" for k, v in value.items())
            lines.append(f"{name.replace('_', ' ')}: {shown}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            head.append(f"{name} {_number(value)}")
        else:
            head.append(str(value))
    return "\n".join([" ".join(head), *lines] if head else lines)


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "n/a" if value is None else str(value)
