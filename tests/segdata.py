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


# ---------------------------------------------------------------------------------------
# Encoders of the annotation tools' mask formats, written from their documentation
# ---------------------------------------------------------------------------------------
def coco_rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the pixels in column-major order, starting
    with a run of zeros (empty when the first pixel is set)."""
    flat = np.asarray(mask, bool).T.ravel()
    counts, current, run = [], False, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def brush_rle(values: np.ndarray, literal_prefix: int = 3) -> list[int]:
    """Label Studio's brush RLE (the @thi.ng/rle-pack stream) of a flat uint8 array: a
    header (32-bit count, 5-bit word size − 1, four 4-bit run-length widths − 1), then chunks
    (1 bit repeat, 2 bits width choice, run length − 1, value or values), bytes filled from
    the most significant bit. The first ``literal_prefix`` values go in one literal chunk so
    both chunk kinds occur."""
    widths = [3, 4, 8, 16]
    bits: list[int] = []

    def put(value: int, width: int) -> None:
        bits.extend((value >> (width - 1 - i)) & 1 for i in range(width))

    flat = np.asarray(values, np.uint8).ravel()
    put(len(flat), 32)
    put(8 - 1, 5)
    for width in widths:
        put(width - 1, 4)
    start = 0
    if literal_prefix:
        put(0, 1)
        put(0, 2)
        put(literal_prefix - 1, widths[0])
        for value in flat[:literal_prefix]:
            put(int(value), 8)
        start = literal_prefix
    while start < len(flat):
        end = start
        while end < len(flat) and flat[end] == flat[start] and end - start < 1 << 16:
            end += 1
        length = end - start
        choice = next(i for i, w in enumerate(widths) if length - 1 < 1 << w)
        put(1, 1)
        put(choice, 2)
        put(length - 1, widths[choice])
        put(int(flat[start]), 8)
        start = end
    bits.extend([0] * (-len(bits) % 8))
    return [int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8)]
