"""The PyTorch engine: the model as written (``eager``, the reference) or ``FastSegformer``
(``fast``); bf16/fp16 through autocast."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from segformer.inference.backends.base import DTYPES, Engine, check_pixels
from segformer.models.segformer import SegformerForSemanticSegmentation


class TorchEngine(Engine):
    """Runs a PyTorch module: the model as written (``eager``) or ``FastSegformer`` (``fast``);
    bf16/fp16 through autocast."""

    def __init__(
        self,
        model: SegformerForSemanticSegmentation,
        module: nn.Module,
        backend: str,
        precision: str,
        device: torch.device,
    ) -> None:
        super().__init__(model, precision, device)
        self.backend = backend
        self.module = module

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def _run(self, pixel_values: Tensor) -> Tensor:
        with self._autocast():
            return self.module(pixel_values)

    def __call__(self, pixel_values: Tensor) -> Tensor:
        check_pixels(pixel_values)
        with torch.inference_mode():
            x = pixel_values.to(self.device, torch.float32, non_blocking=True)
            return self._run(x).float().contiguous()
