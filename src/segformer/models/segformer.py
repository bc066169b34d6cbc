"""The SegFormer family's whole forward pass (Xie et al. 2021, "SegFormer: Simple and Efficient
Design for Semantic Segmentation with Transformers").

    image (B, 3, H, W)
      └─ MixTransformer encoder: 4 stages, each = overlapping patch embedding (a strided conv)
         + N transformer blocks (efficient self-attention + Mix-FFN) + LayerNorm
         → feature maps at 1/4, 1/8, 1/16, 1/32 of the input
      └─ AllMLPDecoder: per-stage linear to one width, upsample to 1/4, concatenate,
         1×1 fuse conv + BatchNorm + ReLU, 1×1 classifier
         → logits (B, num_labels, ⌈H/4⌉, ⌈W/4⌉)

Names say what things are; checkpoint formats with other names are translated in
``segformer.weights.checkpoints``. Shapes in comments use B batch, C channels, N = h·w tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segformer.models.config import SegformerConfig
from segformer.models.metadata import ModelMetadata

# LayerNorms inside the patch embedding and the key/value reduction use PyTorch's default eps
# in every reference implementation; only the block and stage norms follow the config.
FIXED_LAYER_NORM_EPS = 1e-5


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    return nn.SiLU()  # "silu" / "swish"; the config rejects anything else


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class OverlapPatchEmbed(nn.Module):
    """A conv whose kernel is larger than its stride, so neighbouring patches overlap."""

    def __init__(self, in_channels: int, width: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(width, eps=FIXED_LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)  # (B, C, h, w), h = ⌈H/stride⌉
        _, _, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        return x, h, w


# The explicit form materialises the score matrix: it beats the fused kernel's half-precision
# path on the CPU while a head's matrix is small (measured: up to ~1 M scores, 2-4× faster in
# training, ~1.3× in inference) and loses to it beyond (stage 1 at 512²: 4 M scores, 1.8×
# slower). The rule depends on sizes only, never on the batch, so that compiled programs
# with a free batch size can apply it.
EXPLICIT_ATTENTION_MAX_HEAD_SCORES = 1 << 20


def attend(
    q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0, explicit: bool | None = None
) -> Tensor:
    """softmax(q·kᵀ/√d)·v over (B, heads, N, d) queries and (B, heads, M, d) keys and values.

    ``explicit``: spell it out as two matmuls and a softmax instead of PyTorch's fused kernel.
    None chooses: explicit for half precision on the CPU when each head's score matrix is
    small (see above); the fused kernel otherwise (fp32 results stay bit-for-bit those of
    transformers, which uses it too)."""
    if explicit is None:
        explicit = (
            q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] * k.shape[-2] <= EXPLICIT_ATTENTION_MAX_HEAD_SCORES
        )
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (B, heads, N, M)
    probabilities = F.dropout(scores.softmax(dim=-1), dropout, training=dropout > 0)
    return torch.matmul(probabilities, v)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a sequence shrunk by ``sr_ratio``²
    (a conv with kernel = stride = sr_ratio), so the cost is N·N/R² instead of N²."""

    def __init__(
        self, width: int, heads: int, sr_ratio: int, attn_dropout: float, dropout: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(width, width)
        # Keys and values in one matrix (keys first): one matmul instead of two.
        self.key_value = nn.Linear(width, 2 * width)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.reduction = nn.Conv2d(width, width, sr_ratio, sr_ratio)
            self.reduction_norm = nn.LayerNorm(width, eps=FIXED_LAYER_NORM_EPS)
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.query(x).view(b, n, self.heads, d).transpose(1, 2)  # (B, heads, N, d)
        if self.sr_ratio > 1:
            kv_in = x.transpose(1, 2).reshape(b, c, h, w)
            kv_in = self.reduction(kv_in).flatten(2).transpose(1, 2)  # (B, N/R², C)
            kv_in = self.reduction_norm(kv_in)
        else:
            kv_in = x
        kv = self.key_value(kv_in).view(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, heads, N/R², d)
        dropout = self.attn_dropout if self.training else 0.0
        out = attend(q, k, v, dropout)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.dropout(self.proj(out))


class MixFFN(nn.Module):
    """Linear → 3×3 depthwise conv → activation → linear. The depthwise conv leaks position
    information into the tokens, which is why SegFormer needs no positional encoding."""

    def __init__(self, width: int, ratio: int, activation: str, dropout: float) -> None:
        super().__init__()
        hidden = width * ratio
        self.fc1 = nn.Linear(width, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)  # (B, N, 4C)
        b, _, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        x = self.dropout(self.act(x))
        return self.dropout(self.fc2(x))  # (B, N, C)


class TransformerBlock(nn.Module):
    def __init__(self, config: SegformerConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        width = config.hidden_sizes[stage]
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attention = EfficientSelfAttention(
            width,
            config.num_attention_heads[stage],
            config.sr_ratios[stage],
            config.attention_probs_dropout_prob,
            config.hidden_dropout_prob,
        )
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mix_ffn = MixFFN(
            width, config.mlp_ratios[stage], config.hidden_act, config.hidden_dropout_prob
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x), h, w))
        return x + self.drop_path(self.mix_ffn(self.norm2(x), h, w))


class EncoderStage(nn.Module):
    def __init__(self, config: SegformerConfig, stage: int, drop_paths: list[float]) -> None:
        super().__init__()
        in_channels = config.num_channels if stage == 0 else config.hidden_sizes[stage - 1]
        self.patch_embed = OverlapPatchEmbed(
            in_channels,
            config.hidden_sizes[stage],
            config.patch_sizes[stage],
            config.strides[stage],
        )
        self.blocks = nn.ModuleList(TransformerBlock(config, stage, rate) for rate in drop_paths)
        self.norm = nn.LayerNorm(config.hidden_sizes[stage], eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x, h, w = self.patch_embed(x)  # (B, N, C)
        for block in self.blocks:
            x = block(x, h, w)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C, h, w)


def min_input_size(config: SegformerConfig) -> int:
    """The smallest side length for which every stage's map is at least as large as its
    key/value reduction kernel."""
    side = 1
    while True:
        size, fits = side, True
        for patch, stride, ratio in zip(
            config.patch_sizes, config.strides, config.sr_ratios, strict=True
        ):
            size = (size + 2 * (patch // 2) - patch) // stride + 1
            fits = fits and size >= ratio
        if fits:
            return side
        side += 1


class MixTransformer(nn.Module):
    """The hierarchical encoder (MiT). ``forward`` returns the four stage outputs,
    (B, C_i, H/4, W/4) … (B, C_4, H/32, W/32), rounded up."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        total = sum(config.depths)
        # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last.
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
        self.stages = nn.ModuleList(
            EncoderStage(config, i, rates[start : start + depth])
            for i, (start, depth) in enumerate(zip(starts, config.depths, strict=True))
        )
        self.min_size = min_input_size(config)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        if min(pixel_values.shape[-2:]) < self.min_size:
            raise ValueError(
                f"input {tuple(pixel_values.shape[-2:])} is too small: this encoder needs at least "
                f"{self.min_size} pixels per side (its key/value reduction convs need that much)"
            )
        features = []
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class AllMLPDecoder(nn.Module):
    """Unify each stage's channels with a linear layer, bring every map to 1/4 resolution,
    and let a 1×1 conv fuse them; a second 1×1 conv classifies each pixel.

    The projections, the bilinear upsampling and the fuse conv are all linear, so they
    commute. ``forward`` folds each stage's projection into its slice of the fuse weights and
    mixes channels at the stage's own resolution; only the D-channel results are upsampled and
    summed. That is the same function as project → upsample → concatenate → fuse (up to float
    rounding) at a fraction of the cost: the fuse conv over 4·D channels at 1/4 resolution was
    most of SegFormer's FLOPs.
    """

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        width = config.decoder_hidden_size
        self.projections = nn.ModuleList(nn.Linear(c, width) for c in config.hidden_sizes)
        # Input blocks of D channels, deepest stage first (the published checkpoints' order).
        self.fuse = nn.Conv2d(width * config.num_stages, width, 1, bias=False)
        self.fuse_norm = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(width, config.num_labels, 1)

    def stage_mixers(self) -> list[tuple[Tensor, Tensor]]:
        """Per stage, the (D, C_i) weight and (D,) bias of fuse-slice ∘ projection."""
        width = self.fuse.out_channels
        fuse = self.fuse.weight.flatten(1)  # (D, stages·D)
        last = len(self.projections) - 1
        mixers = []
        for i, projection in enumerate(self.projections):
            block = fuse[:, (last - i) * width : (last - i + 1) * width]  # (D, D)
            mixers.append((block @ projection.weight, block @ projection.bias))
        return mixers

    def forward_as_published(self, features: list[Tensor]) -> Tensor:
        """The decoder as the paper draws it: project, upsample, concatenate, fuse. Same
        function as ``forward``; kept as the reference and for counting the paper's FLOPs."""
        size = features[0].shape[2:]
        unified = []
        for feature, projection in zip(features, self.projections, strict=True):
            x = projection(feature.flatten(2).transpose(1, 2))  # (B, h·w, D)
            x = x.transpose(1, 2).reshape(feature.shape[0], -1, *feature.shape[2:])  # (B, D, h, w)
            unified.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        x = self.fuse(torch.cat(unified[::-1], dim=1))  # (B, D, H/4, W/4)
        x = self.dropout(self.act(self.fuse_norm(x)))
        return self.classifier(x)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[2:]
        x = None
        for feature, (weight, bias) in zip(features, self.stage_mixers(), strict=True):
            y = F.conv2d(feature, weight[:, :, None, None], bias)  # (B, D, h_i, w_i)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            x = y if x is None else x + y  # (B, D, H/4, W/4)
        x = self.dropout(self.act(self.fuse_norm(x)))
        return self.classifier(x)  # (B, num_labels, H/4, W/4)


def init_weights(module: nn.Module, std: float) -> None:
    """Initialisation for training from scratch: truncated normal for linear layers, He
    (fan-out) for convs, identity for norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegformerForSemanticSegmentation(nn.Module):
    """Encoder + all-MLP decoder. ``model(pixel_values)`` returns logits at 1/4 resolution."""

    task = "semantic-segmentation"

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        if config.num_labels < 1:
            raise ValueError("a segmentation model needs at least one label")
        self.config = config
        self.encoder = MixTransformer(config)
        self.decode_head = AllMLPDecoder(config)
        init_weights(self, config.initializer_range)
        # A classifier that starts near zero gives first losses of about ln(num_labels),
        # instead of many times that under the He init the other convs get.
        nn.init.normal_(self.decode_head.classifier.weight, std=0.01)
        # Filled in by segformer.weights.checkpoints: palette, preprocessing, licence, source …
        self.metadata = ModelMetadata()

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.decode_head(self.encoder(pixel_values))

    @property
    def labels(self) -> list[str]:
        return self.config.labels


class SegformerForImageClassification(nn.Module):
    """Encoder + mean-pooled last stage + linear head (the ImageNet MiT models)."""

    task = "image-classification"

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        if config.num_labels < 1:
            raise ValueError("a classification model needs at least one label")
        self.config = config
        self.encoder = MixTransformer(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels)
        init_weights(self, config.initializer_range)
        self.metadata = ModelMetadata()

    def forward(self, pixel_values: Tensor) -> Tensor:
        last = self.encoder(pixel_values)[-1]  # (B, C, H/32, W/32)
        return self.classifier(last.mean(dim=(2, 3)))  # (B, num_labels)

    @property
    def labels(self) -> list[str]:
        return self.config.labels


SegformerModel = SegformerForSemanticSegmentation | SegformerForImageClassification
