"""What every engine shares: the ``Engine`` interface, input checks, the on-disk cache folder
and the digest that keys cached programs and exports."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from segformer.errors import SegformerError
from segformer.models.segformer import SegformerForSemanticSegmentation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """``$SEGFORMER_CACHE``, else ``$XDG_CACHE_HOME/segformer``, else ``~/.cache/segformer``."""
    explicit = os.environ.get("SEGFORMER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "segformer"


class Engine:
    """Pixel values (B, 3, H, W) → float32 logits (B, K, ⌈H/4⌉, ⌈W/4⌉) on ``device``,
    contiguous (channels-first).

    ``backend``, ``precision`` and ``device`` say what runs; ``model`` is the model the engine
    was made from (None for an ONNX file).
    """

    backend: str = ""

    def __init__(
        self, model: SegformerForSemanticSegmentation | None, precision: str, device: torch.device
    ) -> None:
        self.model = model
        self.precision = precision
        self.device = device

    def __call__(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, precision={self.precision!r}, device={str(self.device)!r})"


def check_pixels(pixel_values: Tensor) -> None:
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        shape = (
            tuple(pixel_values.shape)
            if isinstance(pixel_values, Tensor)
            else type(pixel_values).__name__
        )
        raise SegformerError(
            f"pixel values must be a (batch, channels, height, width) tensor, got {shape}"
        )


# The code that decides what a cached program or export computes: a new version of any of it
# must not load programs made by the old one.
_GRAPH_MODULES = (
    "segformer.models.segformer",
    "segformer.models.fast",
    "segformer.inference.export",
    "segformer.inference.backends.compiled",
    "segformer.inference.backends.openvino",
)


@functools.cache
def _code_fingerprint() -> bytes:
    """A hash of the sources that build the exported and compiled graphs (read once per
    process)."""
    digest = hashlib.sha256()
    for name in _GRAPH_MODULES:
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.digest()


def model_digest(model: nn.Module) -> str:
    """A short hash of a model's config and weights and of the code that builds its forward
    pass: the key of its cached exports (a new version of the engine must not load programs
    compiled from the old one)."""
    digest = hashlib.sha256(_code_fingerprint())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_hf_dict"):
        digest.update(json.dumps(config.to_hf_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(str(data.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]
