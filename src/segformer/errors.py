"""Errors the library raises for bad input. Each carries a one-line message meant for a person;
the command line prints it as ``error: <message>`` and exits non-zero."""


class SegformerError(Exception):
    """Base class: a problem with what the user gave us, not a bug."""


class CheckpointError(SegformerError):
    """A checkpoint or config that cannot be found, read or matched to the model."""


class ImageError(SegformerError):
    """An image that cannot be read, or is refused (too large, not an image)."""


class DataError(SegformerError):
    """A dataset problem found before or during training/evaluation."""


class SettingsError(SegformerError, ValueError):
    """A setting (an option, a preprocessing value) of the wrong type or out of range. Also a
    ``ValueError``, which is what such settings raised before and what callers may catch."""
