"""Small synthetic segmentation data sets written to disk in each format the library reads.

Every image is a few flat-coloured regions (one colour per class, plus noise), so a tiny model
can learn it in a few steps, and its label map says which region is which class. Some pixels
are ignore (255) in train-id terms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_COLOURS = np.array(
    [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.int16
)


def make_sample(
    rng: np.random.Generator, size: tuple[int, int] = (64, 64), classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), train ids uint8 (H, W)) with vertical bands of random widths
    and a small ignored square."""
    height, width = size
    cuts = np.sort(rng.choice(np.arange(8, width - 8), size=classes - 1, replace=False))
    columns = np.searchsorted(cuts, np.arange(width), side="right")
    order = rng.permutation(classes)
    label = np.tile(order[columns], (height, 1)).astype(np.uint8)
    top, left = rng.integers(0, height - 6), rng.integers(0, width - 6)
    image = CLASS_COLOURS[label] + rng.integers(-25, 26, size=(height, width, 3))
    label[top : top + 5, left : left + 5] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_samples(
    count: int, seed: int = 0, size: tuple[int, int] = (64, 64), classes: int = 3
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size, classes) for _ in range(count)]


def save_png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_folder(
    root: Path,
    samples: list[tuple[np.ndarray, np.ndarray]],
    split: str | None = "train",
    image_suffix: str = ".png",
    mask_dir: str = "masks",
) -> Path:
    """root/images/<split>/NNN.png + root/<mask_dir>/<split>/NNN.png (no split level if None)."""
    for i, (image, label) in enumerate(samples):
        images = root / "images" / split if split else root / "images"
        masks = root / mask_dir / split if split else root / mask_dir
        save_png(image, (images / f"{i:03d}").with_suffix(image_suffix))
        save_png(label, masks / f"{i:03d}.png")
    return root


def write_camvid(root: Path, samples: list[tuple[np.ndarray, np.ndarray]], split: str) -> Path:
    """SegNet layout; ignore is stored as 11 (void)."""
    for i, (image, label) in enumerate(samples):
        stored = np.where(label == 255, 11, label).astype(np.uint8)
        save_png(image, root / split / f"frame_{i:03d}.png")
        save_png(stored, root / f"{split}annot" / f"frame_{i:03d}.png")
    return root


def write_ade20k(root: Path, samples: list[tuple[np.ndarray, np.ndarray]], split: str) -> Path:
    """ADEChallengeData2016 layout; labels stored unreduced (0 = other, k + 1 = class k)."""
    folder = {"train": "training", "val": "validation"}[split]
    for i, (image, label) in enumerate(samples):
        stored = np.where(label == 255, 0, label.astype(np.int16) + 1).astype(np.uint8)
        save_png(image, root / "images" / folder / f"ADE_{folder}_{i:08d}.png")
        save_png(stored, root / "annotations" / folder / f"ADE_{folder}_{i:08d}.png")
    return root
