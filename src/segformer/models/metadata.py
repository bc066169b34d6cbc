"""What a model's weights carry besides tensors: typed, and converted to and from JSON in one
place. ``segformer.save`` writes it into ``config.json`` under ``"segformer"`` (transformers
ignores the key) and the preprocessing into ``preprocessor_config.json``; ``segformer.load``
reads it back, and fills in ``source`` and ``format`` from where the weights came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The preprocessing every SegFormer checkpoint was trained with, as ``preprocessor_config.json``
# states it (resize to 512×512 bilinear, scale to 0–1, ImageNet mean and std).
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "image_processor_type": "SegformerImageProcessor",
    "do_resize": True,
    "size": {"height": 512, "width": 512},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_reduce_labels": False,
}


@dataclass
class ModelMetadata:
    """A model's metadata. Every field is optional: a bare checkpoint knows none of them.

    - ``name``: a short name (the built-in models have one).
    - ``source``, ``format``: where the weights were read from and in which key-name scheme
      (hf, hf-live, nvlabs, mit, ours); set by loading, never saved.
    - ``domain``: what the model is for, in words people read (e.g. "road scenes …").
    - ``palette``: one RGB colour per label.
    - ``preprocessing``: ``preprocessor_config.json`` content (saved as that file).
    - ``license``, ``dataset``: the weights' licence and training data.
    - ``metrics``: evaluation results, as ``segformer eval`` / training write them.
    - ``training``: how the weights were trained (steps, recipe).
    - ``out_of_domain``: the out-of-domain detector's settings (score name and threshold).
    - ``extra``: keys this version does not know, kept so that a round trip loses nothing.
    """

    name: str | None = None
    source: str | None = None
    format: str | None = None
    domain: str | None = None
    palette: list[list[int]] | None = None
    preprocessing: dict[str, Any] | None = None
    license: str | None = None
    dataset: str | None = None
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    out_of_domain: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Fields that describe this copy of the weights rather than the model: not written.
    _NOT_SAVED = ("source", "format", "preprocessing", "extra")

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ModelMetadata:
        """From the ``"segformer"`` object of a ``config.json`` (unknown keys go to ``extra``)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        data = dict(data or {})
        values = {key: data.pop(key) for key in list(data) if key in known}
        return cls(**values, extra=data)

    def to_json(self) -> dict[str, Any]:
        """The ``"segformer"`` object of ``config.json``: the fields that are set, then ``extra``."""
        saved = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self._NOT_SAVED and getattr(self, f.name) is not None
        }
        return {**self.extra, **saved}

    def replace(self, **changes: Any) -> ModelMetadata:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
