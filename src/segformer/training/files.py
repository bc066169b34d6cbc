"""Reading a dataset's files: images and masks as numpy arrays, decoded exactly as prediction
decodes them, image sizes from headers alone, and label files."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segformer.errors import DataError, ImageError
from segformer.inference import processing

# The largest image or mask a dataset may hold (Pillow's own decompression-bomb limit, about
# 9500 × 9500): a file claiming more is refused before it is decoded, not read into memory.
MAX_PIXELS = processing.DEFAULT_MAX_PIXELS


def read_image_array(
    source: str | os.PathLike[str] | Image.Image, name: str | None = None
) -> np.ndarray:
    """An image (file or PIL image) as uint8 RGB (H, W, 3), decoded exactly as prediction
    decodes it (``segformer.inference.processing.read_image``: EXIF orientation applied, transparency on
    white)."""

    try:
        return np.array(processing.read_image(source, max_pixels=MAX_PIXELS, name=name))
    except ImageError as exc:
        raise DataError(str(exc)) from None


def read_mask_array(
    source: str | os.PathLike[str] | Image.Image,
    palette: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """A stored mask as uint8 (H, W), decoded as ``segformer.inference.processing.read_mask`` decodes
    label images (palette PNGs give their indices; colour masks are read through ``palette``,
    colour k → k); values must fit 0..255, where 255 is "ignore"."""

    label = name or str(source)
    try:
        values = processing.read_mask(source, max_pixels=MAX_PIXELS, name=label, palette=palette)
    except ImageError as exc:
        raise DataError(str(exc)) from None
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DataError(
                f"{label}: mask values reach {int(values.max())}; masks must hold 0..255"
            )
        values = values.astype(np.uint8)
    return values


# EXIF orientations that turn the stored picture by 90° (so height and width swap).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) as ``read_image_array`` returns the image, from the file header alone."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            height, width = image.height, image.width
            try:
                orientation = image.getexif().get(0x0112, 1)
            except Exception:  # unreadable EXIF: read_image shows the pixels as stored too
                orientation = 1
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(
            f"{path}: the image claims more than {MAX_PIXELS:,} pixels: refused as a possible "
            "decompression bomb (resize it if it is a real picture)"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    return (width, height) if orientation in _TRANSPOSED_ORIENTATIONS else (height, width)


def read_labels_file(path: str | os.PathLike[str]) -> tuple[list[str], list[list[int]] | None]:
    """Class names (and colours) from JSON: a list of names; {"0": "sky", …}; or an object
    with "labels" (or "id2label") and optionally "palette" ([[r, g, b], …])."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable labels JSON file ({exc})") from None
    palette = None
    if isinstance(data, dict) and ("labels" in data or "id2label" in data):
        palette = data.get("palette")
        data = data.get("labels", data.get("id2label"))
    if isinstance(data, dict):
        try:
            ids = sorted(int(k) for k in data)
        except ValueError:
            raise DataError(f"{path}: label ids must be integers") from None
        if ids != list(range(len(ids))):
            raise DataError(f"{path}: label ids must be 0..{len(ids) - 1} without gaps")
        names = [str(data[str(i)] if str(i) in data else data[i]) for i in ids]
    elif isinstance(data, list) and all(isinstance(n, str) for n in data):
        names = list(data)
    else:
        raise DataError(f"{path}: expected a list of class names or an object with 'labels'")
    if not names:
        raise DataError(f"{path}: no labels")
    if palette is not None:
        valid = isinstance(palette, list) and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not valid or len(palette) != len(names):
            raise DataError(f"{path}: palette must be {len(names)} [r, g, b] triples of 0..255")
    return names, palette
