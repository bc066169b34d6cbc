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
    "load": "segformer.checkpoints",
    "save": "segformer.checkpoints",
    "SegformerConfig": "segformer.config",
    "VARIANTS": "segformer.config",
    "SegformerError": "segformer.errors",
    "CheckpointError": "segformer.errors",
    "ImageError": "segformer.errors",
    "DataError": "segformer.errors",
    "MixTransformer": "segformer.model",
    "SegformerForSemanticSegmentation": "segformer.model",
    "SegformerForImageClassification": "segformer.model",
    "ImageProcessor": "segformer.processing",
    "Segmenter": "segformer.segmenter",
    "InferenceMode": "segformer.inference",
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
    from segformer.checkpoints import load, save
    from segformer.config import VARIANTS, SegformerConfig
    from segformer.errors import CheckpointError, DataError, ImageError, SegformerError
    from segformer.inference import InferenceMode
    from segformer.model import (
        MixTransformer,
        SegformerForImageClassification,
        SegformerForSemanticSegmentation,
    )
    from segformer.processing import ImageProcessor
    from segformer.segmenter import Segmenter
