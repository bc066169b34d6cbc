"""``segformer predict``: segment images, folders, globs, list files and videos into an
output folder, resumably and, under torchrun, sharded across ranks. The work is done by
``segformer.inference.batch.run_batch``; this module parses the command line and prints.

Per image ``DIR/<stem>.png`` (label map, palette PNG), ``DIR/<stem>_overlay.png`` and
``DIR/<stem>.json`` (``--save`` picks); per video ``DIR/<stem>_overlay.<ext>`` and
``DIR/<stem>_frames.csv``; for the run ``DIR/summary.json`` and ``DIR/summary.csv``. A bad
file prints one ``error:`` line and the others go on; the exit status is 1 when any input
failed (on rank 0; other ranks exit 0 so that torchrun does not stop the job).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from segformer.errors import SegformerError
from segformer.inference.batch import DEFAULT_SAVE, OUTPUT_KINDS

log = logging.getLogger("segformer")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images, folders and videos; write label maps, overlays and statistics",
        description=(
            "Segment images (files, folders searched recursively, glob patterns, list files) and "
            "videos. Writes DIR/<stem>.png (palette label map), DIR/<stem>_overlay.png and "
            "DIR/<stem>.json per image (see --save); DIR/<stem>_overlay.mp4 (or the source's "
            "container) and DIR/<stem>_frames.csv per video; DIR/summary.json and "
            "DIR/summary.csv for the run. Run it again with the same arguments to finish an "
            "interrupted run: finished inputs are skipped. Under torchrun each rank takes every "
            "N-th input."
        ),
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="image or video files, folders, or glob patterns"
    )
    parser.add_argument(
        "--from-list", action="append", default=[], metavar="FILE",
        help="also segment the files listed in FILE, one path per line (# comments); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="output folder (created if needed)"
    )
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        help="built-in name, checkpoint file, model folder or hub id (default: the built-in model)",
    )
    add_mode_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--save", type=_save_kinds, default=",".join(DEFAULT_SAVE), metavar="KINDS",
        help="image outputs, comma-separated from labels, overlay, json (default: all three)",
    )  # fmt: skip
    out.add_argument(
        "--opacity", type=float, default=0.5, help="overlay colour opacity, 0–1 (default 0.5)"
    )
    out.add_argument("--no-overlay", action="store_true", help="do not write overlay images")
    out.add_argument("--no-legend", action="store_true", help="overlays without the legend")
    out.add_argument(
        "--max-frames", type=int, default=None, metavar="N", help="videos: stop after N frames"
    )
    out.add_argument(
        "--codec",
        default=None,
        help="videos: FFmpeg encoder to use (default: chosen per container)",
    )
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images (or video frames) per model call (default: 1 on a CPU, 4 on a GPU)",
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: auto)")
    run.add_argument(
        "--precision", default="fp32", help="fp32, bf16 … as the engine supports (default fp32)"
    )
    run.add_argument("--backend", default="auto", help="inference engine backend (default: auto)")
    run.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads per process (default: the cores, divided among torchrun's local ranks)",
    )  # fmt: skip
    run.add_argument(
        "--max-pixels", type=_max_pixels, default="100000000", metavar="N",
        help="refuse images larger than N pixels; 0 for no limit (default 100000000)",
    )  # fmt: skip
    run.add_argument(
        "--reduced-decode", action="store_true",
        help="decode JPEGs at 1/2, 1/4 or 1/8 of their size (never below the model's input "
        "size): much faster for large photos; outputs come at the decoded size and labels "
        "differ from a full decode's on a few pixels",
    )  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_predict)


def _save_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"--save takes a comma-separated list of {', '.join(OUTPUT_KINDS)}, not {text!r}"
        )
    return kinds


def _max_pixels(text: str) -> int | None:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of pixels: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the pixel limit cannot be negative")
    return value or None


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The inference-mode flags, shared by ``predict`` and ``eval`` (they run the same path)."""
    mode = parser.add_argument_group("inference mode")
    mode.add_argument(
        "--mode",
        choices=("whole", "slide"),
        default="whole",
        help="whole image, or sliding windows (default: whole)",
    )
    mode.add_argument(
        "--crop-size",
        type=int,
        nargs="+",
        metavar="N",
        help="slide window: one size or H W (default: the model's input size)",
    )
    mode.add_argument(
        "--stride",
        type=int,
        nargs="+",
        metavar="N",
        help="slide step: one size or H W (default: 2/3 of the window)",
    )
    mode.add_argument(
        "--scales",
        type=float,
        nargs="+",
        metavar="S",
        help="multi-scale test: resize factors, e.g. 0.5 0.75 1 1.25 1.5 1.75",
    )
    mode.add_argument("--flip", action="store_true", help="also run the mirrored image and average")
    mode.add_argument(
        "--average", choices=("logits", "softmax"), default="logits",
        help="how augmented passes are combined (softmax: as mmsegmentation; default: logits)",
    )  # fmt: skip


def mode_from_args(args: argparse.Namespace) -> Any:
    """The ``InferenceMode`` the flags of ``add_mode_arguments`` describe."""
    from segformer.inference.modes import InferenceMode

    if args.mode != "slide" and (args.crop_size or args.stride):
        log.warning(
            "warning: --crop-size and --stride apply to --mode slide; ignored in whole mode"
        )
    return InferenceMode(
        mode=args.mode,
        crop_size=_pair(args.crop_size, "--crop-size"),
        stride=_pair(args.stride, "--stride"),
        scales=tuple(args.scales) if args.scales else (1.0,),
        flip=args.flip,
        average=args.average,
    )


def _pair(values: list[int] | None, flag: str) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise SegformerError(f"{flag} takes one or two positive sizes (H W)")
    return (values[0], values[-1])


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    from segformer.inference.batch import Ranks

    if not args.inputs and not args.from_list:
        raise SegformerError("nothing to segment: give INPUT paths or --from-list FILE")
    if not 0.0 <= args.opacity <= 1.0:
        raise SegformerError("--opacity must be between 0 and 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise SegformerError("--batch-size must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise SegformerError("--threads must be at least 1")
    if isinstance(args.save, str):
        args.save = _save_kinds(args.save)
    save = tuple(k for k in args.save if not (args.no_overlay and k == "overlay"))
    if not save:
        raise SegformerError("--no-overlay with --save overlay leaves nothing to write")
    mode = mode_from_args(args)
    ranks = Ranks.from_environment()
    try:
        return _run(args, mode, save, ranks)
    finally:
        ranks.close()


def _run(args: argparse.Namespace, mode: Any, save: tuple[str, ...], ranks: Any) -> int:
    import torch

    from segformer.inference.batch import BatchOptions, default_threads, run_batch
    from segformer.inference.segmenter import Segmenter
    from segformer.weights.builtin import DEFAULT_MODEL
    from segformer.weights.checkpoints import load_segmentation_model

    device = args.device
    if ranks.world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{ranks.local_rank}"  # one GPU per local rank
    torch.set_num_threads(args.threads or default_threads(ranks.local_world_size))
    # Load first and say what the model is for before anything else (the engine's one-off
    # conversion logs too), so the first line a user reads is what the model knows.
    model = load_segmentation_model(args.model)
    name = str(args.model or DEFAULT_MODEL)
    if ranks.rank == 0:
        if model.metadata.domain:
            log.info("%s is for %s", name, model.metadata.domain)
        else:
            log.info("%s does not say what pictures it is for: see its documentation", name)
    segmenter = Segmenter(
        model,
        name=name,
        device=device,
        precision=args.precision,
        backend=args.backend,
        mode=mode,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        reduced_decode=args.reduced_decode,
    )
    if ranks.rank == 0:
        where = f" on {ranks.world_size} ranks" if ranks.world_size > 1 else ""
        log.info(
            "%r, %d thread(s) per process%s → %s",
            segmenter,
            torch.get_num_threads(),
            where,
            args.out,
        )
    options = BatchOptions(
        save=save,
        opacity=args.opacity,
        legend=not args.no_legend,
        max_frames=args.max_frames,
        codec=args.codec,
        show_progress=not args.no_progress,
    )
    report = run_batch(
        segmenter, args.inputs, args.out, lists=args.from_list, options=options, ranks=ranks
    )
    if ranks.rank != 0:
        return 0
    counts = report.counts
    rate = f" ({report.images_per_second:.2f} images/s)" if report.images_per_second else ""
    skipped = f", {counts.skipped} skipped (finished by an earlier run)" if counts.skipped else ""
    ranks_text = f" on {ranks.world_size} ranks" if ranks.world_size > 1 else ""
    print(
        f"segmented {report.inputs - counts.failed - counts.skipped} of {report.inputs} input(s)"
        f"{skipped}, {counts.failed} failed, in {report.seconds:.1f} s{rate}{ranks_text}; "
        f"outputs in {args.out}",
        file=sys.stderr,
    )
    if counts.failed:
        more = ", …" if counts.failed > len(report.failures) else ""
        print(
            f"error: {counts.failed} of {report.inputs} input(s) failed: "
            + ", ".join(report.failures)
            + more,
            file=sys.stderr,
        )
        return 1
    return 0
