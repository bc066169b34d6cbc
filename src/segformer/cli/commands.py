"""The subcommands, in the order ``segformer --help`` lists them. Each module has
``register(subparsers)``, which adds its parser and sets ``run`` to a function of the args."""

ALL: list = []
