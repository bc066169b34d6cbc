"""From normalised pixel values to logits and labels for whole images: the inference modes
NVlabs SegFormer and mmsegmentation evaluate with, which transformers lacks.

- ``whole``: one forward pass over the (resized) image; logits are upsampled from 1/4
  resolution straight to the requested size, as transformers' post-processing does.
- ``slide``: windows of ``crop_size`` every ``stride`` pixels. Each window's logits are
  upsampled to the window, summed into a full-size map, and divided by the number of windows
  covering each pixel. Window placement follows mmsegmentation's ``slide_inference``: there
  are ``max(H - crop + stride - 1, 0) // stride + 1`` rows of windows (likewise columns); a
  window that would run past the bottom/right edge is shifted back inside the image rather
  than padded, and when the image is smaller than the crop the window is the whole image
  (no padding either). So every window has the same size, and they can be batched.
- test-time augmentation: several ``scales`` (the image resized by each factor) and/or a
  horizontal ``flip``; each variant's result is resized to the output size (and flipped back)
  and the variants are averaged. ``average="logits"`` averages raw logits;
  ``average="softmax"`` averages class probabilities, which is what mmsegmentation's
  ``aug_test`` does (it applies softmax after resizing to the original size), so use it to
  reproduce their multi-scale numbers. A single pass with no augmentation gives the same
  labels either way. Scales resize the normalised tensor (bilinear, antialiased when
  shrinking, sides rounded half up as mmsegmentation rounds them); mmsegmentation resizes the
  8-bit image before normalising, so sizes agree and pixel values differ slightly.

Memory: a single pass never holds more than the model's own logits (whole) or one full-size
accumulator per image (slide). Augmentation adds one accumulator per image at the output size;
the scales are run one after another and folded into it, never kept side by side.

An *engine* is any callable mapping pixel values (B, 3, H, W) to float32 logits
(B, K, ⌈H/4⌉, ⌈W/4⌉) — ``segformer.inference.engine.create_engine(model)`` or the model itself. Labels
always come from ``segformer.inference.labels.labels_from_logits``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segformer.errors import SegformerError
from segformer.inference.labels import labels_from_logits

EngineFn = Callable[[Tensor], Tensor]
Size = tuple[int, int]

MODES = ("whole", "slide")
AVERAGES = ("logits", "softmax")
# The scales NVlabs and mmsegmentation use for their multi-scale results.
MMSEG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _pair(value: int | Sequence[int] | None, name: str) -> Size | None:
    if value is None:
        return None
    pair = (
        (int(value), int(value))
        if isinstance(value, (int, float))
        else tuple(int(v) for v in value)
    )
    if len(pair) != 2 or min(pair) < 1:
        raise SegformerError(
            f"{name} must be one positive integer or two (height, width), got {value!r}"
        )
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class InferenceMode:
    """How to run a model over a whole image.

    ``mode``: ``"whole"`` or ``"slide"``. ``crop_size`` / ``stride``: the slide window and its
    step, (height, width) or one number for both; ``crop_size=None`` leaves the choice to the
    caller (``Segmenter`` uses the model's training size) and ``stride=None`` means two thirds
    of the crop. ``scales``: resize factors for multi-scale testing (``(1.0,)``: none).
    ``flip``: also run the horizontally flipped image. ``average``: ``"logits"`` or
    ``"softmax"`` (mmsegmentation's way) for combining augmented passes. ``window_batch``: how
    many slide windows go through the engine at once.
    """

    mode: str = "whole"
    crop_size: Size | None = None
    stride: Size | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    average: str = "logits"
    window_batch: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SegformerError(
                f"inference mode must be one of {', '.join(MODES)}, not {self.mode!r}"
            )
        if self.average not in AVERAGES:
            raise SegformerError(
                f"average must be one of {', '.join(AVERAGES)}, not {self.average!r}"
            )
        object.__setattr__(self, "crop_size", _pair(self.crop_size, "crop_size"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        scales = (self.scales,) if isinstance(self.scales, (int, float)) else tuple(self.scales)
        if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
            raise SegformerError(f"scales must be positive numbers, got {self.scales!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        if self.window_batch < 1:
            raise SegformerError("window_batch must be at least 1")
        if (
            self.crop_size
            and self.stride
            and any(s > c for s, c in zip(self.stride, self.crop_size, strict=True))
        ):
            raise SegformerError(
                f"stride {self.stride} is larger than the crop {self.crop_size}: "
                "some pixels would be covered by no window"
            )

    @property
    def augmented(self) -> bool:
        """True when more than one pass is averaged (several scales, a flip, or a rescale)."""
        return self.flip or self.scales != (1.0,)

    @property
    def window(self) -> tuple[Size, Size]:
        """(crop_size, stride) for slide mode, with the default stride filled in."""
        if self.crop_size is None:
            raise SegformerError("slide mode needs a crop_size")
        stride = self.stride or tuple(max(1, round(c * 2 / 3)) for c in self.crop_size)
        return self.crop_size, stride  # type: ignore[return-value]

    def with_defaults(self, crop_size: int | Sequence[int]) -> InferenceMode:
        """This mode with ``crop_size`` filled in where it was left open."""
        if self.crop_size is not None:
            return self
        return dataclasses.replace(self, crop_size=_pair(crop_size, "crop_size"))

    def describe(self) -> str:
        """A short human description, e.g. ``slide 1024×1024 / 768×768, scales 0.5–1.75, flip``."""
        parts = [self.mode]
        if self.mode == "slide" and self.crop_size:
            crop, stride = self.window
            parts[0] += f" {crop[0]}×{crop[1]} / {stride[0]}×{stride[1]}"
        if self.scales != (1.0,):
            parts.append("scales " + ", ".join(f"{s:g}" for s in self.scales))
        if self.flip:
            parts.append("flip")
        if self.augmented and self.average == "softmax":
            parts.append("softmax average")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("crop_size", "stride", "scales"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data


WHOLE = InferenceMode()


# -------------------------------------------------------------------------------------
# Sliding windows
# -------------------------------------------------------------------------------------
def sliding_windows(
    height: int, width: int, crop_size: Size, stride: Size
) -> list[tuple[int, int, int, int]]:
    """Windows (top, left, bottom, right) covering a ``height`` × ``width`` image, placed as
    mmsegmentation places them (see the module docstring). All windows have the same size:
    ``min(crop, image)`` along each axis."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        bottom = min(r * stride_h + crop_h, height)
        top = max(bottom - crop_h, 0)
        for c in range(cols):
            right = min(c * stride_w + crop_w, width)
            left = max(right - crop_w, 0)
            windows.append((top, left, bottom, right))
    return windows


def slide_logits(
    engine: EngineFn, pixel_values: Tensor, crop_size: Size, stride: Size, window_batch: int = 4
) -> Tensor:
    """Window-averaged logits (B, K, H, W) at the input's full size."""
    batch, _, height, width = pixel_values.shape
    windows = sliding_windows(height, width, crop_size, stride)
    # Every (image, window) pair, fed to the engine ``window_batch`` at a time.
    jobs = [(b, w) for b in range(batch) for w in windows]
    total: Tensor | None = None
    for start in range(0, len(jobs), window_batch):
        chunk = jobs[start : start + window_batch]
        crops = torch.stack(
            [pixel_values[b, :, top:bottom, left:right] for b, (top, left, bottom, right) in chunk]
        )
        logits = engine(crops)
        if total is None:
            total = logits.new_zeros((batch, logits.shape[1], height, width))
        win_h, win_w = crops.shape[-2:]
        for i, (b, (top, left, bottom, right)) in enumerate(chunk):
            # Upsampled one window at a time: only one window-sized (K, h, w) block is alive.
            up = F.interpolate(
                logits[i : i + 1], size=(win_h, win_w), mode="bilinear", align_corners=False
            )
            total[b, :, top:bottom, left:right] += up[0]
    assert total is not None
    coverage = torch.zeros((height, width), device=total.device)
    for top, left, bottom, right in windows:
        coverage[top:bottom, left:right] += 1
    return total.div_(coverage)


# -------------------------------------------------------------------------------------
# Passes, augmentation and the public entry points
# -------------------------------------------------------------------------------------
def single_pass(engine: EngineFn, pixel_values: Tensor, mode: InferenceMode = WHOLE) -> Tensor:
    """One un-augmented pass. Whole mode: the engine's logits (B, K, ⌈H/4⌉, ⌈W/4⌉); slide
    mode: averaged window logits (B, K, H, W). Either describes the whole input image and is
    brought to any output size by bilinear resizing."""
    if mode.mode == "slide":
        crop, stride = mode.window
        return slide_logits(engine, pixel_values, crop, stride, mode.window_batch)
    return engine(pixel_values)


def rescale(pixel_values: Tensor, scale: float) -> Tensor:
    """The batch resized by ``scale`` (sizes rounded half up, as mmsegmentation rounds them).
    Downscaling is antialiased, like the PIL resize the image processor uses."""
    if scale == 1.0:
        return pixel_values
    height, width = pixel_values.shape[-2:]
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    return F.interpolate(
        pixel_values, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
    )


def _augmented_logits(
    engine: EngineFn, pixel_values: Tensor, mode: InferenceMode, out_sizes: list[Size]
) -> list[Tensor]:
    """Per image, the average over scales and flips of its logits (or probabilities) resized to
    its output size: a list of (1, K, H_i, W_i) tensors."""
    sums: list[Tensor | None] = [None] * pixel_values.shape[0]
    flips = (False, True) if mode.flip else (False,)
    for scale in mode.scales:
        scaled = rescale(pixel_values, scale)
        for flipped in flips:
            logits = single_pass(engine, scaled.flip(-1) if flipped else scaled, mode)
            for i, size in enumerate(out_sizes):
                resized = F.interpolate(
                    logits[i : i + 1], size=size, mode="bilinear", align_corners=False
                )
                if mode.average == "softmax":
                    resized = resized.softmax(dim=1)
                if flipped:
                    resized = resized.flip(-1)
                if sums[i] is None:
                    sums[i] = resized
                else:
                    sums[i].add_(resized)  # type: ignore[union-attr]
            del logits
    count = len(mode.scales) * len(flips)
    return [s.div_(count) for s in sums]  # type: ignore[union-attr]


def _input_size(pixel_values: Tensor) -> Size:
    return (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))


def predict_logits(
    engine: EngineFn,
    pixel_values: Tensor,
    mode: InferenceMode = WHOLE,
    out_size: Size | None = None,
) -> Tensor:
    """Logits (B, K, H, W) for ``pixel_values`` (B, 3, h, w) at ``out_size`` (default: the input
    size), computed in ``mode``. With ``average="softmax"`` and augmentation they are averaged
    probabilities instead. For labels, ``predict_labels`` avoids holding this full-size tensor
    when it can."""
    size = out_size or _input_size(pixel_values)
    if not mode.augmented:
        logits = single_pass(engine, pixel_values, mode)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.cat(_augmented_logits(engine, pixel_values, mode, [size] * pixel_values.shape[0]))


def predict_labels(
    engine: EngineFn,
    pixel_values: Tensor,
    mode: InferenceMode = WHOLE,
    out_size: Size | None = None,
) -> Tensor:
    """Labels (B, H, W) (int64) for ``pixel_values`` (B, 3, h, w) at ``out_size`` (default: the
    input size). Equal to ``predict_logits(...).argmax(1)``."""
    size = out_size or _input_size(pixel_values)
    return torch.stack(
        predict_labels_each(engine, pixel_values, mode, [size] * pixel_values.shape[0])
    )


def predict_labels_each(
    engine: EngineFn, pixel_values: Tensor, mode: InferenceMode, out_sizes: Sequence[Size]
) -> list[Tensor]:
    """Labels for a batch whose images go back to different sizes: one (H_i, W_i) int64 tensor
    per image, ``out_sizes[i] = (H_i, W_i)`` (typically each image's original size)."""
    return predict_labels_scored(engine, pixel_values, mode, out_sizes)[0]


def predict_labels_scored(
    engine: EngineFn,
    pixel_values: Tensor,
    mode: InferenceMode,
    out_sizes: Sequence[Size],
    score: Callable[[Tensor], list[float]] | None = None,
) -> tuple[list[Tensor], list[float] | None]:
    """``predict_labels_each`` and, with ``score`` (logits (B, K, h, w) → one number per image,
    e.g. ``segformer.inference.domain.DomainCheck.scores``), each image's score of the very
    logits its labels come from: the engine's (whole), the window average (slide) or the
    average over scales and flips. Scores are None when there are no logits to score: with
    ``average="softmax"`` the augmented passes are averaged as probabilities."""
    sizes = [(int(h), int(w)) for h, w in out_sizes]
    if len(sizes) != pixel_values.shape[0]:
        raise ValueError(f"{len(sizes)} output sizes for a batch of {pixel_values.shape[0]}")
    if mode.augmented:
        merged = _augmented_logits(engine, pixel_values, mode, sizes)
        scores = None
        if score is not None and mode.average == "logits":
            scores = [score(m)[0] for m in merged]
        # Already at the output size: labels_from_logits' resize is the identity here.
        labels = [labels_from_logits(m, size)[0] for m, size in zip(merged, sizes, strict=True)]
        return labels, scores
    logits = single_pass(engine, pixel_values, mode)
    scores = score(logits) if score is not None else None
    if len(set(sizes)) == 1:
        return list(labels_from_logits(logits, sizes[0])), scores
    labels = [labels_from_logits(logits[i : i + 1], size)[0] for i, size in enumerate(sizes)]
    return labels, scores
