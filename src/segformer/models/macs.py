"""Counting multiply-accumulates: as the paper's table counts them, or as a model computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from segformer.models.config import SegformerConfig
from segformer.models.segformer import SegformerForSemanticSegmentation

Size = tuple[int, int]


def count_macs(
    model: torch.nn.Module | SegformerConfig, size: Size = (512, 512), as_published: bool = True
) -> int:
    """Multiply-accumulates of one forward pass at ``size`` (height, width), batch 1, for a
    model or a config (a segmentation model is assumed for a config).

    ``as_published``: count the decoder as the paper draws it (project → upsample → concat →
    fuse), which is what its table reports. With ``False``, count what our model computes:
    the same function with the projections folded into the fuse conv, about half the MACs.

    Counted: every convolution, linear layer and the two attention matmuls (QKᵀ and AV) —
    what fvcore/mmcv count and what the SegFormer paper's table calls "GFLOPs" (B0 at 512²,
    150 classes: 8.4). Not counted: norms, activations, softmax, bilinear upsampling and
    additions. The count runs on a weightless copy on PyTorch's "meta" device, so it is
    instant and allocates nothing, at any size.
    """
    if isinstance(model, SegformerConfig):
        config, model_cls = model, SegformerForSemanticSegmentation
    elif isinstance(getattr(model, "config", None), SegformerConfig):
        config, model_cls = model.config, type(model)
    else:
        raise TypeError("count_macs needs a SegFormer model or config")
    with torch.device("meta"):
        shadow = model_cls(config).eval()
        pixels = torch.empty(1, config.num_channels, *size)
    if as_published and isinstance(shadow, SegformerForSemanticSegmentation):
        return macs_of(lambda x: shadow.decode_head.forward_as_published(shadow.encoder(x)), pixels)
    return macs_of(shadow, pixels)


def macs_of(function: Callable[[Tensor], Any], pixels: Tensor) -> int:
    """Multiply-accumulates of ``function(pixels)``: convs, linear layers and matmuls (the
    math attention backend decomposes attention into batched matmuls, which the counter sees)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function(pixels)
    return counter.get_total_flops() // 2
