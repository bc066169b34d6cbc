"""The training loss: cross-entropy of logits upsampled to the label size, computed band by
band of label rows with its gradient, so the full-resolution logits never exist all at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from segformer.training.transforms import IGNORE_INDEX

__all__ = ["segmentation_loss"]


def segmentation_loss(
    logits: Tensor,
    labels: Tensor,
    class_weights: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Cross-entropy of logits upsampled (bilinear) to the label size, summed over labelled
    pixels (weighted by class when weights are given) and divided by their number.

    Computed in float32 a band of rows at a time, gradient included (see
    ``_UpsampledCrossEntropy``), so the full-resolution logits never exist all at once."""
    total = _UpsampledCrossEntropy.apply(logits, labels, class_weights, ignore_index)
    return total / (labels != ignore_index).sum().clamp(min=1)


# Full-resolution logits (float32 elements) per band: a few MB, so a band's upsampled logits,
# softmax and gradient stay in cache instead of streaming gigabytes through memory.
_LOSS_BAND_ELEMENTS = 1 << 20

# From this many classes on, bands are computed channels-last (see the forward pass).
_LOSS_CHANNELS_LAST_FROM = 16


def _label_rows(upsampled: Tensor, channels_last: bool, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a (1, K, R, W) map as a view: (rows, W, K) when it is
    channels-last, else (K, rows, W)."""
    if channels_last:
        return upsampled[0].permute(1, 2, 0)[start:stop]
    return upsampled[0, :, start:stop]


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Σ over labelled pixels of weight[y]·−log softmax(upsample(logits))[y], and its gradient
    with respect to ``logits``, both computed in the forward pass band by band.

    Upsampling every class to label size, then log-softmax, then their gradients, moves the
    whole (B, K, H, W) tensor through memory several times: with 150 classes that was two
    thirds of a training step. Here each band of label rows is upsampled from the few logit
    rows it needs (bilinear with align_corners=False reads at most one row beyond each end),
    and the band's loss and gradient are computed while it is in cache; ``backward`` only
    scales the stored gradient. Bands split the height only when it is an exact multiple of
    the logits' (as for crops divisible by 4), which keeps every band's sampling positions
    those of the whole image; otherwise each image is one band."""

    @staticmethod
    def forward(ctx, logits, labels, class_weights, ignore_index):  # type: ignore[override]
        batch, classes, height, width = logits.shape
        out_height, out_width = labels.shape[-2:]
        scale, remainder = divmod(out_height, height)
        rows = height
        if remainder == 0 and scale >= 1:
            rows = max(1, _LOSS_BAND_ELEMENTS // (classes * scale * out_width))
        gradient = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        weight = None if class_weights is None else class_weights.float()
        # Many classes: channels-last, where resampling and its gradient vectorise over the
        # classes (3-6× faster than planar at 150) and the softmax reads them contiguously.
        # Few classes: planar, where those vectorise over pixels instead.
        channels_last = classes >= _LOSS_CHANNELS_LAST_FROM
        class_dim = -1 if channels_last else 0  # of a band as _label_rows gives it
        for image in range(batch):
            for top in range(0, height, rows):
                bottom = min(top + rows, height)
                first, last = max(top - 1, 0), min(bottom + 1, height)  # the logit rows read
                if rows == height:
                    target, size, offset = labels[image], (out_height, out_width), 0
                else:
                    target = labels[image, top * scale : bottom * scale]
                    size, offset = ((last - first) * scale, out_width), (top - first) * scale
                valid = target != ignore_index
                if not valid.any():
                    continue
                part = logits[image : image + 1, :, first:last].float()
                if channels_last:
                    part = part.contiguous(memory_format=torch.channels_last)
                upsampled = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
                stop = offset + target.shape[0]
                band = _label_rows(upsampled, channels_last, offset, stop)
                log_probabilities = band.log_softmax(dim=class_dim)
                safe = torch.where(valid, target, 0)  # ignored pixels point at class 0, weight 0
                pixel_weight = valid.float() if weight is None else weight[safe] * valid
                safe, pixel_weight = safe.unsqueeze(class_dim), pixel_weight.unsqueeze(class_dim)
                total -= (log_probabilities.gather(class_dim, safe) * pixel_weight).sum()
                # d loss / d band = weight[y]·(softmax − one-hot(y)) at labelled pixels.
                band_gradient = log_probabilities.exp_().mul_(pixel_weight)
                band_gradient.scatter_add_(class_dim, safe, -pixel_weight)
                upsampled_gradient = torch.zeros_like(upsampled)
                _label_rows(upsampled_gradient, channels_last, offset, stop).copy_(band_gradient)
                gradient[image : image + 1, :, first:last] += (
                    torch.ops.aten.upsample_bilinear2d_backward(
                        upsampled_gradient, list(size), [1, classes, last - first, width], False
                    )
                )
        ctx.save_for_backward(gradient)
        ctx.logits_dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (gradient,) = ctx.saved_tensors
        return (gradient * grad_output).to(ctx.logits_dtype), None, None, None
