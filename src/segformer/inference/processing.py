"""Images in, pixel values out; logits in, label maps out.

``read_image`` turns anything a user holds (a path, bytes, a file object, a PIL image, a
numpy array, a tensor) into an upright 8-bit RGB PIL image, and ``read_mask`` turns a label
file into an integer label map. Both decode the whole file at once, so that a broken file
fails here, with its name, and not deep inside a model.

``ImageProcessor`` prepares images for the model exactly as transformers'
``SegformerImageProcessor`` (its PIL backend) does: resize with Pillow on 8-bit RGB, then
``float32(float64(pixel) * rescale_factor)``, then ``(x - mean) / std`` in float32. Because
every output value depends only on an 8-bit input level and its channel, the rescale and
normalisation are a 3×256 lookup table computed with exactly those operations. On top of
transformers' fixed-size resize it offers the keep-ratio resize NVlabs SegFormer and
mmsegmentation evaluate with.

Choices made where a person could expect either:

- Transparency (RGBA, LA, palette images with a transparent colour) is composited onto
  white, as transformers' ``convert_to_rgb`` does.
- 16-bit images are brought to 8 bits by ``round(v / 257)`` (65535 → 255), rather than
  Pillow's ``convert`` which clips everything above 255 to white.
- EXIF orientation is applied (the photo comes out the way viewers show it), also for PIL
  images given directly. transformers does not do this.
- ``max_pixels`` guards decoding of files, bytes and streams (decompression bombs); it
  replaces Pillow's own bomb warning, so one limit, the caller's, applies. Images already in
  memory (PIL, numpy, tensors) are taken as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from segformer.errors import CheckpointError, ImageError, SettingsError
from segformer.inference.labels import labels_from_logits
from segformer.weights.resolve import resolve

# An image source: a path, encoded bytes, a binary file object, or pixels already in memory.
ImageSource = (
    str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image | np.ndarray | torch.Tensor
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's default decompression-bomb threshold (2**30 // 4 // 3, about 89.5 megapixels, 256 MiB
# as 8-bit RGB): above any phone photo, and nothing Pillow would flag gets through unnoticed.
DEFAULT_MAX_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


# ---------------------------------------------------------------------------------------
# Reading images and masks
# ---------------------------------------------------------------------------------------
def _source_name(source: Any, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<numpy array>"
    if isinstance(source, torch.Tensor):
        return "<tensor>"
    if not hasattr(source, "read"):
        return f"<{type(source).__name__}>"
    file_name = getattr(source, "name", None)
    return str(file_name) if isinstance(file_name, (str, os.PathLike)) else "<stream>"


def _read_bytes(source: Any, name: str) -> bytes:
    """The encoded bytes of a path, bytes object or binary file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a folder, not an image file") from None
        except PermissionError:
            raise ImageError(f"{name}: permission denied") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if hasattr(source, "read"):
        try:
            data = source.read()
        except OSError as exc:
            raise ImageError(f"{name}: cannot be read ({exc})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(
                f"{name}: the stream gives text, not bytes; open the file in binary mode ('rb')"
            )
        return bytes(data)
    raise ImageError(
        f"{name}: cannot read an image from a {type(source).__name__} object; give a path, bytes, a binary "
        "file, a PIL image, a numpy array or a tensor"
    )


def _describe(exc: Exception) -> str:
    """An exception as one line, for inside an error message."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _open_encoded(data: bytes, name: str) -> Image.Image:
    """Parse the header (Pillow opens lazily). Pillow's decompression-bomb warning and error
    are taken out of the way: the caller's ``max_pixels`` is the limit that applies."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        pass  # larger than Pillow's own limit: open again without it, then check ours
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's plugins raise many types for malformed headers
        raise ImageError(f"{name}: truncated or corrupt image ({_describe(exc)})") from None
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(image: Image.Image, name: str, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}×{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} pixels; pass a larger max_pixels (or max_pixels=None) to read it"
        )


def _load(image: Image.Image, name: str) -> None:
    """Decode every pixel now, so that a truncated or corrupt file fails at read time."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageError(f"{name}: truncated or corrupt image ({_describe(exc)})") from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if there is one."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: show the pixels as stored
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


# EXIF orientations that turn the stored image a quarter turn (upright width = stored height).
_QUARTER_TURNS = (5, 6, 7, 8)


def _reduce_jpeg(image: Image.Image, needed: Callable[[int, int], tuple[int, int]]) -> None:
    """Before decoding: ask libjpeg for the largest of its reductions (1/2, 1/4, 1/8, done in
    the DCT, so most of the decoding work is skipped) that keeps ``image`` at least
    ``needed(upright height, upright width)`` (height, width). Not a JPEG: nothing happens."""
    if image.format != "JPEG":
        return
    try:
        turned = image.getexif().get(_EXIF_ORIENTATION, 1) in _QUARTER_TURNS
    except Exception:  # unreadable EXIF: _upright leaves the pixels as stored too
        turned = False
    width, height = image.size
    if turned:
        width, height = height, width
    need_height, need_width = needed(height, width)
    if turned:
        need_height, need_width = need_width, need_height
    image.draft(None, (max(1, need_width), max(1, need_height)))


def _decode(
    source: Any,
    name: str,
    max_pixels: int | None,
    reduce_for: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """A fully decoded, upright PIL image from an encoded source or a PIL image."""
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open_encoded(_read_bytes(source, name), name)
        _check_pixels(image, name, max_pixels)
        if reduce_for is not None:
            _reduce_jpeg(image, reduce_for)
    _load(image, name)
    return _upright(image)


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    # 0..65535 onto 0..255 with rounding (65535 / 257 = 255 exactly)
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def _unit_float_to_eight(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: image contains NaN or infinite values")
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"{name}: floating-point images must hold values in [0, 1] (found {low:g} … {high:g})"
        )
    return np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)


def _gray_to_eight(image: Image.Image, name: str) -> np.ndarray:
    """8-bit levels of a single-band image whose mode is wider than 8 bits."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(values)
    if image.mode == "F":
        high = float(values.max(initial=0.0))
        if high <= 1.0:
            return _unit_float_to_eight(values, name)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    # "I" (32-bit) carries no declared range: 8-bit content stays as it is, wider content is
    # taken as 16-bit (what 16-bit files decode to in older Pillow and some TIFF writers).
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return _sixteen_to_eight(values)
    raise ImageError(f"{name}: 32-bit image values {low} … {high} fall outside 0 … 65535")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return Image.fromarray(_gray_to_eight(image, name)).convert("RGB")
    if (
        "A" in image.getbands()
        or "a" in image.getbands()
        or image.info.get("transparency") is not None
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"{name}: colour mode {image.mode} cannot be converted to RGB") from None


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """A PIL image from an HW or HWC (or CHW) array of 8-bit, 16-bit or [0, 1] float values."""
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first (as tensors are) → channels last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ImageError(
            f"{name}: expected an H×W or H×W×C (C = 1, 3 or 4) image, got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: image is empty (shape {tuple(array.shape)})")
    if array.dtype == np.uint8:
        levels = array
    elif array.dtype == np.bool_:
        levels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        levels = _sixteen_to_eight(array)
    elif np.issubdtype(array.dtype, np.floating):
        levels = _unit_float_to_eight(array, name)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageError(
                f"{name}: integer image values must lie in 0 … 255 (found {low} … {high}); "
                "give 16-bit images as uint16"
            )
        levels = array.astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported pixel type {array.dtype}")
    # Pillow names the mode from the shape: L, LA, RGB or RGBA
    return Image.fromarray(np.ascontiguousarray(levels))


def _in_memory_array(source: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().numpy()
    return np.asarray(source)


def read_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    reduce_for: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """An upright, fully decoded 8-bit RGB image from a path, bytes, a binary file object, a
    PIL image, a numpy array (H×W or H×W×C; uint8, uint16, bool or float in [0, 1]) or a tensor
    (C×H×W or H×W). ``name`` is how errors refer to the source (default: its path). Files,
    bytes and streams larger than ``max_pixels`` are refused before they are decoded.

    ``reduce_for``: a function from an image's upright (height, width) to the smallest
    (height, width) the caller needs, typically the size it resizes to next. An encoded JPEG
    is then decoded at the largest of libjpeg's reductions (1/2, 1/4 or 1/8) that keeps it at
    least that large: for a phone photo read at a model's input size, several times less work
    than decoding every pixel. The result is smaller than the file's own size, and its pixels
    (hence a model's input after resizing) differ slightly from a full decode's, so no reader
    here does it unless asked. Other formats and in-memory images are decoded as they are.

    Raises ImageError (one line, naming the source) for a missing file, something that is not
    an image, a truncated or corrupt file, or an image over the limit.
    """
    label = _source_name(source, name)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _to_rgb(_array_to_image(_in_memory_array(source), label), label)
    return _to_rgb(_decode(source, label, max_pixels, reduce_for), label)


def read_mask(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    palette: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """An (H, W) integer label map from a label image (8- or 16-bit grayscale PNG; palette PNGs
    give their palette indices, not colours), a PIL image, or an integer array / tensor.
    ``palette``: class k's colour, for reading colour masks (colour k → k).

    Raises ImageError for unreadable files, and for colour masks without a ``palette`` or
    with a colour that is not in it.
    """
    label = _source_name(source, name)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        labels = _in_memory_array(source)
        if labels.ndim == 3 and 1 in (labels.shape[0], labels.shape[-1]):
            labels = labels.reshape(labels.shape[1:] if labels.shape[0] == 1 else labels.shape[:-1])
        if labels.ndim != 2:
            raise ImageError(f"{label}: a label map must be H×W, got shape {tuple(labels.shape)}")
        if labels.dtype == np.bool_:
            return labels.astype(np.uint8)
        if np.issubdtype(labels.dtype, np.floating):
            if not (np.isfinite(labels).all() and np.array_equal(labels, np.rint(labels))):
                raise ImageError(f"{label}: a label map must hold whole numbers (class indices)")
            return labels.astype(np.int64)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ImageError(f"{label}: unsupported label type {labels.dtype}")
        return labels

    image = _decode(source, label, max_pixels)
    if image.mode in ("LA", "PA"):  # the alpha band carries no labels
        image = image.getchannel(0)
    if image.mode in ("P", "L", "I", *_SIXTEEN_BIT_MODES):
        return np.array(image)
    if image.mode == "1":
        return np.asarray(image).astype(np.uint8)
    if image.mode in ("RGB", "RGBA"):
        bands = np.asarray(image)
        if np.array_equal(bands[..., 0], bands[..., 1]) and np.array_equal(
            bands[..., 0], bands[..., 2]
        ):
            return np.ascontiguousarray(bands[..., 0])  # a gray mask saved as RGB
        if palette is not None:
            return colour_mask_to_ids(bands[..., :3], palette, label)
        raise ImageError(
            f"{label}: a colour mask; labels must be class indices (a grayscale or palette image), "
            "or give the palette that maps its colours to classes (for training: a labels JSON "
            "with a palette)"
        )
    raise ImageError(
        f"{label}: mode {image.mode} is not a label image (expected grayscale or palette)"
    )


def colour_mask_to_ids(
    rgb: np.ndarray, palette: Sequence[Sequence[int]], source: str
) -> np.ndarray:
    """(H, W, 3) colours → (H, W) uint8 class ids, colour ``palette[k]`` → k."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int64)
    order = np.argsort(palette_codes)
    position = np.searchsorted(palette_codes[order], codes).clip(0, len(order) - 1)
    found = palette_codes[order][position] == codes
    if not found.all():
        y, x = np.argwhere(~found)[0]
        raise ImageError(
            f"{source}: colour {tuple(int(c) for c in rgb[y, x])} at ({x}, {y}) is not in the palette"
        )
    return order[position].astype(np.uint8)


# ---------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _pixel_table(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """The (3, 256) float32 output value of every 8-bit level in every channel, computed with
    the same operations and dtypes as transformers' PIL backend."""
    levels = np.arange(256, dtype=np.float64)
    if do_rescale:
        levels = levels * rescale_factor  # float64 product, then float32, as transformers rescales
    table = np.tile(levels.astype(np.float32), (3, 1))
    if do_normalize:
        mean_column = np.asarray(mean, np.float32)[:, None]
        std_column = np.asarray(std, np.float32)[:, None]
        table = (table - mean_column) / std_column  # float32 throughout, as transformers
    return table


def _as_list(items: Any) -> list[Any]:
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, (np.ndarray, torch.Tensor)) and items.ndim == 4:
        return list(items)
    return [items]


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise SettingsError(f"{what} must be two whole numbers, got {value!r}") from None
    if len(pair) != 2:
        raise SettingsError(f"{what} must be two numbers, got {value!r}")
    return pair  # type: ignore[return-value]


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    try:
        values = (
            (float(value),) * 3
            if isinstance(value, (int, float))
            else tuple(float(v) for v in value)
        )
    except (TypeError, ValueError):
        raise SettingsError(f"{what} needs one number per RGB channel, got {value!r}") from None
    if len(values) != 3:
        raise SettingsError(f"{what} needs one value per RGB channel, got {value!r}")
    return values  # type: ignore[return-value]


@dataclass
class ImageProcessor:
    """Images → ``pixel_values`` (and masks → ``labels``) for a SegFormer; logits → label maps.

    The fields are those of transformers' ``preprocessor_config.json``. The output size is
    chosen by one of three resize modes:

    - ``size`` (height, width): every image to that size (transformers' default, 512×512).
    - ``shortest_edge`` (and optionally ``longest_edge``): keep the aspect ratio, as
      transformers does for a ``{"shortest_edge": …}`` size in a hub file.
    - ``keep_ratio``: the NVlabs / mmsegmentation evaluation resize. The image is scaled to
      fit inside the ``scale`` box (long side, short side), keeping its aspect ratio, by
      ``min(long / max(h, w), short / min(h, w))`` with sides rounded to the nearest integer
      (mmcv's rule), then each side is rounded up to a multiple of ``size_divisor``. The
      NVlabs code resizes twice (to the box, then to the multiple) with OpenCV; here one Pillow
      resize goes straight to the final size, so sizes match theirs and pixels differ slightly.

    Masks are always resized with nearest-neighbour sampling. With ``do_reduce_labels``
    (ADE20K-style data where 0 means "unlabelled"), 0 → 255, k → k − 1, and 255 stays 255.
    """

    do_resize: bool = True
    size: tuple[int, int] = (512, 512)
    resample: int = Image.Resampling.BILINEAR.value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    do_reduce_labels: bool = False
    shortest_edge: int | None = None
    longest_edge: int | None = None
    keep_ratio: bool = False
    scale: tuple[int, int] = (2048, 512)
    size_divisor: int | None = 32

    def __post_init__(self) -> None:
        self.size = _pair(self.size, "size")
        self.scale = _pair(self.scale, "scale")
        self.image_mean = _triple(self.image_mean, "image_mean")
        self.image_std = _triple(self.image_std, "image_std")
        try:
            self.resample = int(self.resample)
            self.rescale_factor = float(self.rescale_factor)
        except (TypeError, ValueError):
            raise SettingsError(
                f"resample and rescale_factor must be numbers, got {self.resample!r} and "
                f"{self.rescale_factor!r}"
            ) from None
        if min(self.size) < 1 or min(self.scale) < 1:
            raise SettingsError(
                f"size and scale must be positive, got size={self.size}, scale={self.scale}"
            )
        if self.resample not in {r.value for r in Image.Resampling}:
            raise SettingsError(f"resample must be a Pillow filter code 0 … 5, got {self.resample}")
        if 0.0 in self.image_std:
            raise SettingsError("image_std must not contain 0")
        for name in ("shortest_edge", "longest_edge", "size_divisor"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise SettingsError(f"{name} must be a positive whole number, got {value!r}")
        if self.longest_edge is not None and self.shortest_edge is None:
            raise SettingsError("longest_edge needs shortest_edge")
        if self.keep_ratio and self.shortest_edge is not None:
            raise SettingsError("choose one resize mode: keep_ratio or shortest_edge, not both")

    # -- sizes ---------------------------------------------------------------------------
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size has after resizing."""
        if not self.do_resize:
            return (height, width)
        if self.keep_ratio:
            return self._keep_ratio_size(height, width)
        if self.shortest_edge is not None:
            return self._shortest_edge_size(height, width)
        return self.size

    def _keep_ratio_size(self, height: int, width: int) -> tuple[int, int]:
        long_side, short_side = max(self.scale), min(self.scale)
        factor = min(long_side / max(height, width), short_side / min(height, width))
        new_height, new_width = int(height * factor + 0.5), int(width * factor + 0.5)
        if self.size_divisor:
            divisor = self.size_divisor
            new_height = math.ceil(new_height / divisor) * divisor
            new_width = math.ceil(new_width / divisor) * divisor
        return (max(new_height, 1), max(new_width, 1))

    def _shortest_edge_size(self, height: int, width: int) -> tuple[int, int]:
        # transformers' rules, integer truncation included: the short side becomes
        # shortest_edge and the long side follows; with longest_edge, the short side shrinks
        # first if the long side would pass it.
        shortest = self.shortest_edge
        assert shortest is not None
        if self.longest_edge is None:
            short, long = min(height, width), max(height, width)
            new_short, new_long = shortest, int(shortest * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        exact_short = None
        if max(height, width) / min(height, width) * shortest > self.longest_edge:
            exact_short = self.longest_edge * min(height, width) / max(height, width)
            shortest = round(exact_short)
        if min(height, width) == shortest:
            return (height, width)
        short_side = exact_short if exact_short is not None else shortest
        if width < height:
            return (int(short_side * height / width), shortest)
        return (shortest, int(short_side * width / height))

    # -- the steps -------------------------------------------------------------------------
    def resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """``image`` resized to ``size`` (height, width) with the processor's filter."""
        height, width = size
        return image.resize((width, height), resample=self.resample)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """Rescale and normalise 8-bit RGB (H, W, 3) or (B, H, W, 3) into float32 (3, H, W) or
        (B, 3, H, W), bit for bit as transformers does."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[-1] != 3 or pixels.ndim not in (3, 4):
            raise ImageError(
                f"expected uint8 (H, W, 3) or (B, H, W, 3) pixels, got {pixels.dtype} {pixels.shape}"
            )
        table = _pixel_table(
            self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )
        batch = pixels if pixels.ndim == 4 else pixels[None]
        # Channel planes made contiguous first: looking up a strided view of interleaved RGB
        # is about three times slower than copying the bytes apart and looking up planes.
        planes = np.ascontiguousarray(np.moveaxis(batch, -1, 1))  # (B, 3, H, W) uint8
        out = np.empty(planes.shape, dtype=np.float32)
        for channel in range(3):
            np.take(table[channel], planes[:, channel], out=out[:, channel])
        result = torch.from_numpy(out)
        return result if pixels.ndim == 4 else result[0]

    def reduce_labels(self, labels: np.ndarray) -> np.ndarray:
        """0 (unlabelled) → 255, k → k − 1, 255 (ignore) stays 255; as int64."""
        labels = np.asarray(labels)
        reduced = labels.astype(np.int64) - 1
        reduced[(labels == 0) | (labels == 255)] = 255
        return reduced

    def resize_labels(self, labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A label map resized to ``size`` (height, width) by nearest-neighbour sampling (Pillow's,
        as transformers uses), as int64."""
        labels = np.asarray(labels)
        if labels.shape == tuple(size):
            return labels.astype(np.int64)
        height, width = size
        if labels.dtype == np.uint8:
            image = Image.fromarray(labels)  # mode L
        else:
            low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
            if low < -(2**31) or high >= 2**31:
                raise ImageError(f"label values {low} … {high} do not fit in 32 bits")
            image = Image.fromarray(labels.astype(np.int32))  # mode I
        resized = image.resize((width, height), resample=Image.Resampling.NEAREST)
        return np.asarray(resized).astype(np.int64)

    def prepare_labels(self, labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Labels as the model's loss expects them: reduced if configured, resized to ``size``."""
        if self.do_reduce_labels:
            labels = self.reduce_labels(labels)
        return self.resize_labels(labels, size)

    # -- the whole thing -----------------------------------------------------------------
    def __call__(self, images: Any, segmentation_maps: Any = None) -> dict[str, Any]:
        """Prepare one image or a list of images (anything ``read_image`` accepts), and
        optionally their label maps (anything ``read_mask`` accepts; each the size of its image).

        Returns a dict with ``pixel_values`` (float32, B×3×H×W), ``labels`` (int64, B×H×W, when
        masks are given) and ``original_sizes`` (each image's (height, width), what
        ``post_process_semantic_segmentation`` should restore). When the images of one call come
        out at different sizes (keep-ratio and shortest-edge modes), ``pixel_values`` and
        ``labels`` are lists of per-image tensors (3×H×W and H×W) instead: padding them into
        one batch would change the model's predictions near the padding. Iterating over either
        form gives one image at a time.
        """
        sources = _as_list(images)
        if not sources:
            raise ImageError("no images given")
        masks = None if segmentation_maps is None else _as_list(segmentation_maps)
        if masks is not None and len(masks) != len(sources):
            raise ImageError(f"{len(sources)} images but {len(masks)} segmentation maps")

        resized: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        original_sizes: list[tuple[int, int]] = []
        for index, source in enumerate(sources):
            image = read_image(source)
            original_sizes.append((image.height, image.width))
            target = self.output_size(image.height, image.width)
            resized.append(np.asarray(self.resize(image, target)))
            if masks is not None:
                mask_source = masks[index]
                mask = read_mask(mask_source)
                if mask.shape != (image.height, image.width):
                    mask_name, image_name = (
                        _source_name(mask_source, None),
                        _source_name(source, None),
                    )
                    raise ImageError(
                        f"{mask_name}: label map is {mask.shape[0]}×{mask.shape[1]} but its image "
                        f"{image_name} is {image.height}×{image.width}"
                    )
                labels.append(self.prepare_labels(mask, target))

        result: dict[str, Any] = {"original_sizes": original_sizes}
        if len({pixels.shape for pixels in resized}) == 1:
            result["pixel_values"] = self.normalize(np.stack(resized))
            if masks is not None:
                result["labels"] = torch.from_numpy(np.stack(labels))
        else:
            result["pixel_values"] = [self.normalize(pixels) for pixels in resized]
            if masks is not None:
                result["labels"] = [torch.from_numpy(label) for label in labels]
        return result

    def post_process_semantic_segmentation(
        self, logits: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Label maps (H, W) from logits (B, K, h, w), a list of per-image logits, or a model
        output with ``.logits``. With ``target_sizes`` each map is upsampled bilinearly
        (align_corners=False) to its size before the argmax, as transformers does; without,
        it is the argmax at the logits' resolution."""

        logits = getattr(logits, "logits", logits)
        per_image = list(logits) if isinstance(logits, (list, tuple)) else None
        count = len(per_image) if per_image is not None else logits.shape[0]
        if target_sizes is None:
            if per_image is None:
                return list(logits.argmax(dim=1))
            return [item.reshape(item.shape[-3:]).argmax(dim=0) for item in per_image]

        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        sizes = [(int(h), int(w)) for h, w in target_sizes]
        if len(sizes) != count:
            raise SettingsError(f"{count} logits but {len(sizes)} target sizes")
        if per_image is None and len(set(sizes)) == 1:
            return list(labels_from_logits(logits, sizes[0]))
        items = per_image if per_image is not None else list(logits)
        return [
            labels_from_logits(item.reshape(1, *item.shape[-3:]), size)[0]
            for item, size in zip(items, sizes, strict=True)
        ]

    # -- preprocessor_config.json ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``preprocessor_config.json`` content, readable by transformers; the keep-ratio
        options (which transformers does not know) go under ``"segformer"``."""
        if self.shortest_edge is not None:
            size: dict[str, int] = {"shortest_edge": self.shortest_edge}
            if self.longest_edge is not None:
                size["longest_edge"] = self.longest_edge
        else:
            size = {"height": self.size[0], "width": self.size[1]}
        data: dict[str, Any] = {
            "image_processor_type": "SegformerImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_reduce_labels": self.do_reduce_labels,
        }
        ours = {
            "keep_ratio": self.keep_ratio,
            "scale": list(self.scale),
            "size_divisor": self.size_divisor,
        }
        defaults = ImageProcessor()
        if (self.keep_ratio, self.scale, self.size_divisor) != (
            defaults.keep_ratio,
            defaults.scale,
            defaults.size_divisor,
        ):
            data["segformer"] = ours
        return data

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "preprocessor config"
    ) -> ImageProcessor:
        """From ``preprocessor_config.json`` content, as transformers writes it or as older hub
        files have it (``"size": 512``, ``"reduce_labels"``). Unknown keys are ignored."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields: dict[str, Any] = {}
        try:
            for key in (
                "do_resize",
                "resample",
                "do_rescale",
                "rescale_factor",
                "do_normalize",
                "image_mean",
                "image_std",
            ):
                if data.get(key) is not None:
                    fields[key] = data[key]
            # transformers 5 reads only do_reduce_labels; older files (e.g. the ADE20K nvidia/*
            # models) say reduce_labels, which older transformers honoured.
            reduce = data.get("do_reduce_labels", data.get("reduce_labels"))
            if reduce is not None:
                fields["do_reduce_labels"] = bool(reduce)
            size = data.get("size")
            if isinstance(size, dict):
                if "height" in size and "width" in size:
                    fields["size"] = (size["height"], size["width"])
                elif "shortest_edge" in size:
                    fields["shortest_edge"] = int(size["shortest_edge"])
                    if size.get("longest_edge") is not None:
                        fields["longest_edge"] = int(size["longest_edge"])
                else:
                    raise ValueError(
                        f"size {size} is not supported (use height/width or shortest_edge)"
                    )
            elif size is not None:
                fields["size"] = size
            ours = data.get("segformer") or {}
            for key in ("keep_ratio", "scale", "size_divisor"):
                if key in ours:
                    fields[key] = ours[key]
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid preprocessing settings ({exc})") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str]) -> ImageProcessor:
        """The processor of a model (built-in name, folder, ``preprocessor_config.json`` file or
        hub id): its ``preprocessor_config.json`` when it has one, else the defaults."""

        path = resolve(name_or_path)
        config = path / "preprocessor_config.json" if path.is_dir() else path
        if config.suffix != ".json" or not config.is_file():
            return cls()
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(config))

    @classmethod
    def from_model(cls, model: Any) -> ImageProcessor:
        """The processor a loaded model carries in its metadata's ``preprocessing``, else the
        defaults."""
        data = model.metadata.preprocessing
        return cls.from_dict(data, source="model preprocessing") if data else cls()

    def replace(self, **changes: Any) -> ImageProcessor:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
