"""Training augmentation: the SegFormer paper's recipe (as NVlabs' and mmsegmentation's
configs run it), on numpy arrays.

    image uint8 (H, W, 3) RGB, label uint8 (H, W) train ids, 255 = ignore
      └─ random_resize      ratio 0.5–2.0 of a base scale, aspect kept (bilinear / nearest)
      └─ random_crop        crop size; retried until no class covers > cat_max_ratio of it
      └─ random_hflip       p = 0.5
      └─ photometric        brightness, contrast, saturation, hue, each with p = 0.5
      └─ lighting           (optional) gamma and colour temperature, each with p = 0.5
      └─ normalize          (x − mean) / std, to float32 (3, H, W)
      └─ pad                to the crop size: image with 0, label with the ignore index

Every random choice comes from the ``numpy.random.Generator`` passed in, never from a global
RNG. The data loader derives that generator from (seed, epoch, sample index), so a sample's
augmentation does not depend on which worker or process draws it, or on where a run resumed.

Evaluation needs no transform here: images go through ``segformer.inference.modes`` exactly as in
prediction, and labels stay at their original size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# ImageNet statistics on the 0–255 scale, as every SegFormer checkpoint was trained with.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------
# Geometry (image and label move together)
# ---------------------------------------------------------------------------------------
def resize(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` = (height, width): the image bilinearly, the label by nearest
    neighbour (a label must never be interpolated between two classes)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size keeping the aspect ratio that fits inside ``scale`` = (long side, short side)
    as tightly as possible (mmseg's "keep ratio" rescale)."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def random_resize(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[int, int] | None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to the base ``scale`` (long, short) times a ratio drawn uniformly from
    ``ratio_range``, keeping the aspect ratio. ``scale=None`` uses the image's own size as
    the base."""
    height, width = label.shape
    ratio = rng.uniform(*ratio_range)
    base = scale if scale is not None else (max(height, width), min(height, width))
    target = (int(base[0] * ratio), int(base[1] * ratio))
    return resize(image, label, rescaled_size(height, width, target))


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    attempts: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` = (height, width) window (smaller where the image is). With
    ``cat_max_ratio`` < 1, windows where one class covers more than that share of the
    labelled pixels (or only one class is present) are redrawn, up to ``attempts`` times;
    the last draw is kept."""
    height, width = label.shape
    crop_h, crop_w = min(size[0], height), min(size[1], width)
    for _ in range(attempts):
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        window = label[top : top + crop_h, left : left + crop_w]
        if cat_max_ratio >= 1.0:
            break
        counts = np.bincount(window.ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return image[top : top + crop_h, left : left + crop_w], window


def random_hflip(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def pad(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom and right up to ``size``: the (normalised, channel-first) image with 0 and
    the label with ``ignore_index``, so padding never counts in the loss."""
    height, width = label.shape
    extra_h, extra_w = max(size[0] - height, 0), max(size[1] - width, 0)
    if extra_h == 0 and extra_w == 0:
        return image, label
    image = np.pad(image, ((0, 0), (0, extra_h), (0, extra_w)), constant_values=0)
    label = np.pad(label, ((0, extra_h), (0, extra_w)), constant_values=ignore_index)
    return image, label


# ---------------------------------------------------------------------------------------
# Colour (image only)
# ---------------------------------------------------------------------------------------
def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in 0–255 → HSV with hue in degrees [0, 360), saturation in [0, 1], value 0–255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Channel by channel: a reduction over a last axis of length 3 is several times slower.
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    safe = np.where(chroma > 0, chroma, 1.0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1.0), 0.0)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6.0,
        np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(chroma > 0, hue * 60.0, 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = hue / 60.0

    def channel(n: float) -> np.ndarray:
        k = (n + sector) % 6.0
        return value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)

    return np.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: float = 36.0,
) -> np.ndarray:
    """Brightness shift, contrast scale, saturation scale and hue rotation, each applied with
    probability 0.5; contrast goes first or last at random. ``hue_delta`` is in degrees
    (36° = OpenCV's 18 half-degree units that the reference configs use). uint8 in, float32
    out (0–255), clipped after every step as the uint8 reference is."""
    x = image.astype(np.float32)
    if rng.integers(2):
        x = np.clip(x + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
    change_saturation, change_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if change_saturation or change_hue:
        hsv = rgb_to_hsv(x)
        if change_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 1)
        if change_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue_delta, hue_delta)) % 360.0
        x = np.clip(hsv_to_rgb(hsv), 0, 255).astype(np.float32)
    if not contrast_first and rng.integers(2):
        x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
    return x


def lighting_change(
    image: np.ndarray,
    rng: np.random.Generator,
    gamma_range: tuple[float, float] = (0.5, 2.0),
    temperature_shift: float = 0.15,
) -> np.ndarray:
    """Light that the paper's distortion does not reach: dusk and overcast frames are darker
    in the mid-tones (a gamma curve, not a uniform shift) and warmer or bluer (red and blue
    gains moved in opposite directions). Each with probability 0.5; gamma is drawn
    log-uniformly so brightening and darkening are equally likely. 0–255 in and out."""
    x = np.asarray(image, dtype=np.float32)
    if rng.integers(2):
        gamma = float(np.exp(rng.uniform(np.log(gamma_range[0]), np.log(gamma_range[1]))))
        x = 255.0 * np.power(x / 255.0, gamma)
    if rng.integers(2):
        t = rng.uniform(-temperature_shift, temperature_shift)
        x = np.clip(x * np.asarray([1.0 + t, 1.0, 1.0 - t], np.float32), 0, 255)
    return x


def normalize(
    image: np.ndarray,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
    """(H, W, 3) 0–255 → float32 (3, H, W), standardised per channel."""
    x = (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTransform:
    """The paper's training pipeline. ``crop_size`` and ``scale`` are (height, width) and
    (long side, short side); ``scale=None`` takes each image's own size as the base scale."""

    crop_size: tuple[int, int] = (512, 512)
    scale: tuple[int, int] | None = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    lighting: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = random_resize(image, label, rng, self.scale, self.ratio_range)
        image, label = random_crop(
            image, label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index
        )
        image, label = random_hflip(image, label, rng, self.flip_prob)
        pixels = photometric_distortion(image, rng) if self.photometric else image
        if self.lighting:
            pixels = lighting_change(pixels, rng)
        pixels, label = pad(
            normalize(pixels, self.mean, self.std), label, self.crop_size, self.ignore_index
        )
        return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(
            label.astype(np.int64)
        )
