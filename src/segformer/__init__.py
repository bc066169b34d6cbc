"""SegFormer semantic segmentation: the model family, every checkpoint format, and the tools
around it (inference, training, evaluation, a fast engine, a web app).

    import segformer
    model = segformer.load("nvidia/segformer-b0-finetuned-ade-512-512")   # or a file / folder
    logits = model(pixel_values)                                         # (B, labels, H/4, W/4)

The names below are imported on first use, so ``import segformer`` (and the command line)
starts without loading torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → module that defines it
_EXPORTS = {
    "load": "segformer.weights.checkpoints",
    "save": "segformer.weights.checkpoints",
    "SegformerConfig": "segformer.models.config",
    "VARIANTS": "segformer.models.config",
    "SegformerError": "segformer.errors",
    "CheckpointError": "segformer.errors",
    "ImageError": "segformer.errors",
    "DataError": "segformer.errors",
    "MixTransformer": "segformer.models.segformer",
    "SegformerForSemanticSegmentation": "segformer.models.segformer",
    "SegformerForImageClassification": "segformer.models.segformer",
    "ImageProcessor": "segformer.inference.processing",
    "Segmenter": "segformer.inference.segmenter",
    "InferenceMode": "segformer.inference.modes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'segformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from segformer.errors import CheckpointError, DataError, ImageError, SegformerError
    from segformer.inference.modes import InferenceMode
    from segformer.inference.processing import ImageProcessor
    from segformer.inference.segmenter import Segmenter
    from segformer.models.config import VARIANTS, SegformerConfig
    from segformer.models.segformer import (
        MixTransformer,
        SegformerForImageClassification,
        SegformerForSemanticSegmentation,
    )
    from segformer.weights.checkpoints import load, save
