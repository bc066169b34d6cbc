"""Pictures of label maps: class palettes, colouring, overlays with a legend.

Palettes: the standard colours of ADE20K (150 classes), Cityscapes (19 training classes) and
CamVid (11 classes, SegNet's colours); any other label set gets a generated palette of
distinct colours that is the same on every run. ``palette_for(labels, metadata)`` picks one:
the model's own palette (its metadata's ``palette``) first, then a known data set whose label
names (or count, for generic names) match, then a generated one.
"""

from __future__ import annotations

import colorsys
import functools
import math
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Palette = np.ndarray  # (K, 3) uint8

# --- standard palettes (facts: the colours each data set publishes) -------------------------
CITYSCAPES_LABELS = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

CAMVID_LABELS = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip

# The first name of each ADE20K SceneParsing class (objectInfo150.txt), in id order.
ADE20K_LABELS = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

# name → (label names, colours)
KNOWN_PALETTES: dict[str, tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]] = {
    "ade20k": (ADE20K_LABELS, ADE20K_PALETTE),
    "cityscapes": (CITYSCAPES_LABELS, CITYSCAPES_PALETTE),
    "camvid": (CAMVID_LABELS, CAMVID_PALETTE),
}

# Spellings of the same class across label files (after normalisation).
_SYNONYMS = {
    "sidewalk": "pavement",
    "signsymbol": "sign/symbol",
    "sign": "sign/symbol",
    "symbol": "sign/symbol",
}
_GENERIC = re.compile(r"^(class|label|cls)?[ _-]?\d+$")


def _normalise(name: str) -> str:
    name = name.split(",")[0].strip().lower().replace("_", " ").replace("-", " ")
    name = re.sub(r"\s+", " ", name)
    return _SYNONYMS.get(name, name)


def _is_generic(labels: Sequence[str]) -> bool:
    return all(_GENERIC.match(label.strip().lower()) for label in labels)


def match_dataset(labels: Sequence[str]) -> str | None:
    """The known data set whose label set this is: the same number of classes, and either the
    same names in order (at least 80% of them, allowing for spelling) or generic names
    (``class_0``, ``LABEL_0`` …)."""
    for dataset, (names, _) in KNOWN_PALETTES.items():
        if len(labels) != len(names):
            continue
        if _is_generic(labels):
            return dataset
        same = sum(_normalise(a) == _normalise(b) for a, b in zip(labels, names, strict=True))
        if same >= 0.8 * len(names):
            return dataset
    return None


def generate_palette(count: int) -> Palette:
    """``count`` distinct colours, the same on every run: hues stepped by the golden angle so
    neighbouring ids differ strongly, with saturation and brightness cycling so that large
    label sets stay distinguishable."""
    colours = np.empty((count, 3), dtype=np.uint8)
    for i in range(count):
        hue = (0.07 + i * 0.618033988749895) % 1.0
        saturation = (0.75, 0.95, 0.55)[i % 3]
        value = (0.95, 0.75, 0.85, 0.6)[(i // 3) % 4]
        colours[i] = [round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colours


def palette_for(labels: Sequence[str], stored: Sequence[Sequence[int]] | None = None) -> Palette:
    """The palette (K, 3) uint8 for a model's labels: its own (``stored``, e.g. the model
    metadata's palette) when that has one colour per label, else a matching known data set's
    colours, else a generated palette."""
    count = len(labels)
    if stored is not None:
        array = np.asarray(stored)
        if array.shape == (count, 3) and array.min() >= 0 and array.max() <= 255:
            return array.astype(np.uint8)
    dataset = match_dataset(labels)
    if dataset is not None:
        return np.asarray(KNOWN_PALETTES[dataset][1], dtype=np.uint8)
    return generate_palette(count)


def palette_name(labels: Sequence[str], stored: Sequence[Sequence[int]] | None = None) -> str:
    """Where ``palette_for``'s colours come from: "model", a data set name, or "generated"."""
    if stored is not None and np.asarray(stored).shape == (len(labels), 3):
        return "model"
    return match_dataset(labels) or "generated"


# --- colouring and overlays ---------------------------------------------------------------
class LegendEntry(Protocol):
    """What the legend needs of a class: ``segformer.inference.segmenter.ClassShare`` has it."""

    name: str
    share: float
    color: tuple[int, int, int]


def colorize(labels: np.ndarray, palette: Palette) -> Image.Image:
    """An RGB image with each pixel in its class colour. Ids beyond the palette are black."""
    table = np.zeros((max(int(labels.max(initial=0)) + 1, len(palette)), 3), dtype=np.uint8)
    table[: len(palette)] = palette
    return Image.fromarray(table[labels])


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """True where a pixel's right or lower neighbour has another class."""
    edges = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edges[:, :-1] |= horizontal
    edges[:, 1:] |= horizontal
    edges[:-1, :] |= vertical
    edges[1:, :] |= vertical
    return edges


def blend(
    image: Image.Image,
    labels: np.ndarray,
    palette: Palette,
    opacity: float = 0.5,
    outline: bool = True,
) -> Image.Image:
    """``image`` with class colours laid over it at ``opacity`` (0: image only, 1: colours
    only). ``outline`` draws region borders in solid class colour so thin classes and borders
    stay visible at low opacity."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    rgb = image.convert("RGB")
    if rgb.size != (labels.shape[1], labels.shape[0]):
        raise ValueError(
            f"labels {labels.shape[1]}×{labels.shape[0]} do not match the image {rgb.size[0]}×{rgb.size[1]}"
        )
    colours = colorize(labels, palette)
    blended = Image.blend(rgb, colours, opacity)
    if outline and opacity > 0:
        edges = Image.fromarray(_boundaries(labels).astype(np.uint8) * 255)
        blended.paste(colours, mask=edges)
    return blended


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _share_text(share: float) -> str:
    percent = share * 100
    if 0 < percent < 0.1:
        return "<0.1%"
    return f"{percent:.1f}%"


def _legend_rows(
    entries: Sequence[LegendEntry], max_rows: int
) -> list[tuple[tuple[int, int, int] | None, str, str]]:
    rows: list[tuple[tuple[int, int, int] | None, str, str]] = [
        (tuple(e.color), e.name, _share_text(e.share)) for e in entries[:max_rows]
    ]
    rest = entries[max_rows:]
    if rest:
        rows[-1] = (
            None,
            f"+{len(rest) + 1} more",
            _share_text(sum(e.share for e in entries[max_rows - 1 :])),
        )
    return rows


def _spaced(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, size: int) -> str:
    """``text`` with each space repeated until it is at least a quarter of the font size wide:
    the bundled font's space is 2 px at small sizes, which ran "+4 more" together."""
    if " " not in text:
        return text
    space = max(font.getlength(" "), 1.0)
    return text.replace(" ", " " * max(1, math.ceil(size * 0.25 / space)))


def _geometry(font_size: int, compact: bool) -> tuple[int, int]:
    """(padding, row height) for a font size; ``compact`` for the in-frame video legend."""
    if compact:
        return max(3, round(font_size * 0.4)), round(font_size * 1.35)
    return max(4, round(font_size * 0.6)), round(font_size * 1.5)


def _draw_rows(
    draw: ImageDraw.ImageDraw,
    rows,
    origin: tuple[int, int],
    font_size: int,
    width: int,
    compact: bool = False,
) -> None:
    font = _font(font_size)
    pad, row_h = _geometry(font_size, compact)
    swatch = font_size
    x0, y = origin[0] + pad, origin[1] + pad
    for colour, name, share in rows:
        top = y + (row_h - swatch) // 2
        if colour is not None:
            draw.rectangle(
                (x0, top, x0 + swatch, top + swatch), fill=colour, outline=(235, 235, 235)
            )
        text_y = y + row_h // 2
        draw.text(
            (x0 + swatch + pad // 2 + 2, text_y),
            _spaced(name, font, font_size),
            font=font,
            fill=(240, 240, 240),
            anchor="lm",
        )
        draw.text(
            (origin[0] + width - pad, text_y), share, font=font, fill=(200, 200, 200), anchor="rm"
        )
        y += row_h


def _legend_width(rows, font_size: int, compact: bool = False) -> int:
    font = _font(font_size)
    pad, _ = _geometry(font_size, compact)
    name_w = max(font.getlength(_spaced(name, font, font_size)) for _, name, _ in rows)
    share_w = max(font.getlength(share) for _, _, share in rows)
    return int(pad + font_size + pad // 2 + 2 + name_w + 1.5 * pad + share_w + pad + 0.5)


LEGEND_BACKGROUND = (32, 33, 36)
INSIDE_ROWS = 5  # in-frame legend: the four largest classes and "+N more"


def add_legend(
    image: Image.Image, entries: Sequence[LegendEntry], placement: str = "side", max_rows: int = 24
) -> Image.Image:
    """``image`` with a legend: a colour swatch, the class name and its area for each entry
    (largest first, as given). ``placement="side"``: a panel to the right, so nothing of the
    picture is hidden (the result is wider, and taller when the legend needs more room);
    ``"inside"``: a translucent box in the top-left corner, keeping the size (for video)."""
    if not entries:
        return image
    width, height = image.size
    if placement == "side":
        font_size = int(np.clip(round(height / 28), 12, 32))
        rows = _legend_rows(entries, max_rows)
        panel_w = _legend_width(rows, font_size)
        pad = max(4, round(font_size * 0.6))
        panel_h = 2 * pad + len(rows) * round(font_size * 1.5)
        canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), LEGEND_BACKGROUND)
        canvas.paste(image.convert("RGB"), (0, 0))
        _draw_rows(ImageDraw.Draw(canvas), rows, (width, 0), font_size, panel_w)
        return canvas
    if placement == "inside":
        # Drawn over every video frame, so it must stay small: the font scales with the frame
        # (10 px at 360 rows, 28 at 1008+), rows are tight and at most INSIDE_ROWS are shown
        # (the smallest classes fold into "+N more"): about 5 % of a 480×360 frame.
        font_size = int(np.clip(round(height / 36), 10, 28))
        pad, row_h = _geometry(font_size, compact=True)
        fit = max(1, (height - 2 * pad) // row_h)
        rows = _legend_rows(entries, min(max_rows, INSIDE_ROWS, fit))
        box_w = min(_legend_width(rows, font_size, compact=True), width)
        box_h = 2 * pad + len(rows) * row_h
        base = image.convert("RGBA")
        layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        draw.rectangle((0, 0, box_w - 1, box_h - 1), fill=(*LEGEND_BACKGROUND, 190))
        _draw_rows(draw, rows, (0, 0), font_size, box_w, compact=True)
        return Image.alpha_composite(base, layer).convert("RGB")
    raise ValueError(f"legend placement must be 'side' or 'inside', not {placement!r}")


def overlay(
    image: Image.Image,
    labels: np.ndarray,
    palette: Palette,
    entries: Sequence[LegendEntry] = (),
    opacity: float = 0.5,
    legend: bool | str = True,
    outline: bool = True,
) -> Image.Image:
    """The image blended with class colours (see ``blend``) and, when ``legend`` is true
    ("side", the default for True, or "inside"), a legend of ``entries``."""
    picture = blend(image, labels, palette, opacity, outline)
    if legend:
        picture = add_legend(picture, entries, "side" if legend is True else str(legend))
    return picture
