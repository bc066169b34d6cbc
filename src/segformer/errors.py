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


class InputError(SegformerError):
    """Prediction inputs or an output folder that cannot be used (a bad list file, outputs
    that would overwrite an input)."""


class AccuracyError(SegformerError):
    """A converted or quantized model that fails its accuracy check against the original (or
    whose accuracy could not be checked)."""


class VideoRefused(SegformerError):
    """A video upload the server cannot take as a job; ``status`` is the HTTP status to answer
    with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TrainingDiverged(SegformerError):
    """The training loss became NaN or infinite."""


class SettingsError(SegformerError, ValueError):
    """A setting (an option, a preprocessing value) of the wrong type or out of range. Also a
    ``ValueError``, which is what such settings raised before and what callers may catch."""
