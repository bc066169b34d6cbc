"""The ``segformer`` command. Each subcommand lives in its own module beside this one and
calls the same library functions the Python API exposes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from segformer.errors import SegformerError
from segformer.tools.allocator import use_fast_allocator


def build_parser() -> argparse.ArgumentParser:
    # Imported here so that `segformer --help` stays quick and a broken optional dependency
    # of one subcommand cannot break the others.
    from segformer.cli import commands

    parser = argparse.ArgumentParser(
        prog="segformer",
        description="SegFormer semantic segmentation: predict, train, evaluate, export, benchmark, serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in commands.ALL:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_fast_allocator(argv)  # may re-exec this process once with tcmalloc preloaded
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s" if args.verbose else "%(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except SegformerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
