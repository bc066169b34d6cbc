"""``segformer train``: train or fine-tune a SegFormer with the paper's recipe.

Settings come from the TrainConfig defaults, then a YAML/TOML file, then ``--set key=value``
and ``--<key> value`` options (every TrainConfig field has one). The resolved config is saved
as ``<output_dir>/config.yaml``. ``--resume`` continues a run from its latest checkpoint with
its saved settings (options given again override them, with a warning); a run stopped before
its first checkpoint was complete starts again from step 0 with its saved settings. Files that
a kill left half-written (``.tmp`` files, ``.saving-*`` folders) are removed when a run starts.

    segformer train --data ../shared/data/camvid --format camvid --model b0 --output-dir runs/camvid
    segformer train recipe.yaml --set max_steps=2000
    segformer train --resume runs/camvid
    torchrun --nproc_per_node 2 -m segformer.cli train recipe.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from segformer.errors import SegformerError


def register(subparsers: argparse._SubParsersAction) -> None:
    from segformer.training.config import (  # the single list of settings (no torch)
        HELP,
        TrainConfig,
    )

    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (paper recipe, resumable, torchrun for several processes)",
        description=(
            "Train from scratch (--model b0 … b5), from an ImageNet MiT encoder, or fine-tune any "
            "segmentation checkpoint on a dataset (--format camvid, ade20k, cityscapes, folder, "
            "binary, list, hf, coco, voc, cvat, roboflow, labelstudio). Writes checkpoints, TensorBoard events, plots, metrics.json and the "
            "best model (OUTPUT_DIR/best, loadable with segformer.load) into --output-dir."
        ),
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="YAML or TOML file of settings")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set max_steps=2000 --set crop_size=360,480",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue a run: its folder or a checkpoint file (default: --output-dir)",
    )
    settings = parser.add_argument_group("settings (each is also a key for CONFIG and --set)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        shown = ",".join(str(v) for v in default) if isinstance(default, list) else default
        settings.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"setting_{f.name}",
            default=None,
            metavar="VALUE",
            help=f"{HELP[f.name]} (default: {shown})",
        )
    parser.set_defaults(run=run_train)


def collect_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given explicitly: from the config file, then --set, then --<key>."""
    from segformer.training.config import read_config_file

    values: dict[str, Any] = dict(read_config_file(args.config)) if args.config else {}
    for assignment in args.assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise SegformerError(f"--set expects KEY=VALUE, got {assignment!r}")
        values[key.strip().replace("-", "_")] = value
    for name, value in vars(args).items():
        if name.startswith("setting_") and value is not None:
            values[name.removeprefix("setting_")] = value
    return values


def run_train(args: argparse.Namespace) -> int:
    from segformer.training.loop import TrainConfig, train

    given = collect_settings(args)
    config = TrainConfig.from_dict(given)
    if not args.resume and not config.data:
        raise SegformerError(
            "no dataset: give --data DIR (and --format), or a CONFIG file that sets data"
        )
    train(config, resume=args.resume, overrides=given if args.resume else None)
    return 0
