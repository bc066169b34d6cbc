"""Does a picture look like what the model was trained on? A score computed from the model's
own logits, and a threshold chosen on the model's training images, stored in its metadata
(``ModelMetadata.out_of_domain``)::

    {"score": "energy", "threshold": -4.56, "calibration": {...}}

A segmentation model labels every pixel with one of its classes whatever the picture shows:
the built-in CamVid road-scene model calls a cat "tree" and a sofa "sign/symbol". Its logits
still tell: on pictures unlike its training data the winning class wins by less, and the
logits are smaller overall. The scores, per pixel, then averaged over the picture (higher
means less like the training data):

- ``energy``: ``-logsumexp(logits)`` (Liu et al. 2020, *Energy-based out-of-distribution
  detection*). It keeps the logits' magnitude, which softmax throws away.
- ``max_softmax``: ``1 - max softmax probability`` (Hendrycks & Gimpel 2017).
- ``entropy``: the entropy of the softmax (nats).

They need only the logits the labels are computed from, so every engine (PyTorch, compiled,
onnxruntime) gets them for the price of one reduction over the low-resolution logits.
``recipes/calibrate_ood.py`` measures them on real photos and writes the threshold; the
built-in model's card gives the rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from segformer.errors import CheckpointError


def _energy(logits: Tensor) -> Tensor:
    return -torch.logsumexp(logits, dim=1)


def _max_softmax(logits: Tensor) -> Tensor:
    return 1.0 - logits.softmax(dim=1).amax(dim=1)


def _entropy(logits: Tensor) -> Tensor:
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


# name → per-pixel score (B, K, h, w) → (B, h, w); higher: less like the training data.
PIXEL_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "energy": _energy,
    "max_softmax": _max_softmax,
    "entropy": _entropy,
}


def image_scores(logits: Tensor, score: str = "energy") -> Tensor:
    """One score per image (B,) from logits (B, K, h, w): the per-pixel score averaged over the
    picture, in float32 whatever the logits' precision."""
    if score not in PIXEL_SCORES:
        raise CheckpointError(
            f"unknown out-of-domain score {score!r} (known: {', '.join(PIXEL_SCORES)})"
        )
    return PIXEL_SCORES[score](logits.float()).mean(dim=(1, 2))


@dataclass(frozen=True)
class DomainCheck:
    """A model's out-of-domain detector: ``score`` (a name in ``PIXEL_SCORES``) and the
    ``threshold`` above which a picture is flagged. ``domain``: what the model is for, in
    words, for messages."""

    score: str
    threshold: float
    domain: str | None = None

    @classmethod
    def from_metadata(cls, metadata: Any) -> DomainCheck | None:
        """The check a model's metadata describes, or None when it has none (most checkpoints:
        then nothing is flagged, because nothing was measured). A malformed entry is a
        ``CheckpointError``: a check that silently never fires would be worse than none."""
        settings = metadata.out_of_domain
        if not settings:
            return None
        if not isinstance(settings, dict):
            raise CheckpointError('config: "out_of_domain" must be a JSON object')
        score, threshold = settings.get("score"), settings.get("threshold")
        if score not in PIXEL_SCORES:
            raise CheckpointError(
                f"config: out_of_domain score {score!r} is not one of {', '.join(PIXEL_SCORES)}"
            )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
        ):
            raise CheckpointError(
                f"config: out_of_domain threshold must be a finite number, got {threshold!r}"
            )
        return cls(score, float(threshold), metadata.domain)

    def scores(self, logits: Tensor) -> list[float]:
        """Per image, the score of logits (B, K, h, w)."""
        return [float(s) for s in image_scores(logits.detach(), self.score).cpu()]

    def flags(self, score: float) -> bool:
        """True when a picture with this score is out of domain."""
        return score > self.threshold


__all__ = ["PIXEL_SCORES", "DomainCheck", "image_scores"]
