"""The subcommands, in the order ``segformer --help`` lists them. Each module has
``register(subparsers)``, which adds its parser and sets ``run`` to a function of the args."""

from segformer.cli import bench, data, eval, export, info, predict, quantize, serve, train

ALL: list = [predict, info, train, eval, data, serve, export, quantize, bench]
