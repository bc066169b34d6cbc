"""Segmentation datasets in the formats people have, decoded to one form, and the data
loaders that feed training and evaluation.

Every dataset yields an RGB image (uint8, H×W×3) and a label map (uint8, H×W) of train ids
0..K−1 with 255 = ignore. Formats differ only in where files are and in a 256-entry lookup
table from stored mask values to train ids:

    folder      root/images[/split] + root/masks[/split]  (or root/split/images + …/masks),
                matched by file stem; masks hold train ids
    binary      the folder layout with 0/255 (or 0/1) masks → 0 background, 1 foreground
    list        root/<split>.txt (or a .txt file): one "image mask" pair per line
    camvid      SegNet layout root/<split> + root/<split>annot; 11 = void → ignored
    ade20k      ADEChallengeData2016: images/<training|validation> + annotations/…;
                reduced labels 0 → 255, k → k−1
    cityscapes  leftImg8bit/<split>/<city> + gtFine/…_labelIds.png → the 19 train ids
    hf          a Hugging Face ``datasets`` dataset on local disk (image + annotation
                columns, as scene_parse_150), from ``save_to_disk`` or local data files
    coco, voc, cvat, roboflow, labelstudio
                annotation tools' exports (``segformer.training.annotations``)

A ``labels.json`` at the root of a folder dataset names its classes (and colours), as
``segformer data convert`` writes it.

``scan`` checks a whole dataset before training (masks that do not fit the label set,
size mismatches, unreadable files) and counts class pixels on the way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from segformer.errors import DataError, SegformerError
from segformer.inference.visualize import (
    ADE20K_LABELS,
    ADE20K_PALETTE,
    CAMVID_LABELS,
    CAMVID_PALETTE,
    CITYSCAPES_LABELS,
    CITYSCAPES_PALETTE,
)
from segformer.training import annotations as tools
from segformer.training.files import (
    image_size,
    read_image_array,
    read_labels_file,
    read_mask_array,
)

log = logging.getLogger("segformer")

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_DIR_NAMES = ("masks", "labels", "annotations", "annotation", "mask", "label", "gt")
# Suffixes some tools append to a mask's stem (photo.jpg ↔ photo_mask.png).
MASK_STEM_SUFFIXES = ("", "_mask", "_label", "_labels", "_gt", "_seg", "_segmentation")

# ---------------------------------------------------------------------------------------
# Label sets that come with a format: names and colours live in segformer.inference.visualize
# ---------------------------------------------------------------------------------------
CAMVID_VOID = 11

# Cityscapes label id → train id for the 19 evaluated classes; every other id is ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

BINARY_LABELS = ["background", "foreground"]

FORMATS = (
    "folder", "binary", "list", "camvid", "ade20k", "cityscapes", "hf",
    "coco", "voc", "cvat", "roboflow", "labelstudio",
)  # fmt: skip
# Formats whose masks are drawn from shapes; their unlabelled pixels are a background class
# or ignore (the ``background`` setting).
DRAWN_FORMATS = ("coco", "labelstudio")


# ---------------------------------------------------------------------------------------
# Mask value → train id lookup tables
# ---------------------------------------------------------------------------------------
def identity_table() -> np.ndarray:
    return np.arange(256, dtype=np.uint8)


def reduce_labels_table() -> np.ndarray:
    """0 ("other") → ignore, k → k − 1 (ADE20K / scene_parse_150)."""
    table = np.arange(-1, 255, dtype=np.int64)
    table[0] = IGNORE_INDEX
    return table.astype(np.uint8)


def camvid_table() -> np.ndarray:
    table = identity_table()
    table[CAMVID_VOID] = IGNORE_INDEX
    return table


def cityscapes_table() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def binary_table() -> np.ndarray:
    """0/255 masks (and 0/1 ones) → 0/1; values in between, as JPEG leaves them, are
    thresholded at 128."""
    table = (np.arange(256) >= 128).astype(np.uint8)
    table[1] = 1
    return table


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------
@dataclass
class SegmentationDataset(Dataset):
    """Image/mask pairs decoded to (uint8 RGB image, uint8 train-id label map).

    ``table`` maps stored mask values to train ids (see the format's ``*_table``);
    ``labels`` / ``palette`` are the format's own, when it has them.
    ``dataset[i]`` gives ``{"image": uint8 (H, W, 3), "labels": int64 (H, W), "index": i}``
    as tensors, the form evaluation wants; training goes through ``AugmentedDataset``.
    """

    name: str
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    table: np.ndarray = field(default_factory=identity_table)
    labels: list[str] | None = None
    palette: list[list[int]] | None = None
    ignore_index: int = IGNORE_INDEX
    # Palette used to read colour (RGB) masks, when masks are stored that way.
    mask_palette: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages."""
        return str(self.pairs[index][0])

    def mask_source(self, index: int) -> str:
        return str(self.pairs[index][1])

    def image_size(self, index: int) -> tuple[int, int]:
        return image_size(self.pairs[index][0])

    def read_image(self, index: int) -> np.ndarray:
        return read_image_array(self.pairs[index][0])

    def read_stored_mask(self, index: int) -> np.ndarray:
        return read_mask_array(self.pairs[index][1], self.mask_palette)

    def read_label(self, index: int) -> np.ndarray:
        return self.table[self.read_stored_mask(index)]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.read_image(index), self.read_label(index)
        if image.shape[:2] != label.shape:
            raise DataError(
                f"{self.describe(index)}: image is {image.shape[1]}×{image.shape[0]} but its mask "
                f"{self.mask_source(index)} is {label.shape[1]}×{label.shape[0]}"
            )
        return image, label

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "labels": torch.from_numpy(label.astype(np.int64)),
            "index": index,
        }


class HFSegmentationDataset(SegmentationDataset):
    """Rows of a Hugging Face ``datasets`` table with an image and an annotation column."""

    def __init__(
        self,
        name: str,
        rows: Any,
        image_column: str,
        mask_column: str,
        table: np.ndarray,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, table=table, **kwargs)
        self.images = rows.select_columns([image_column])
        self.masks = rows.select_columns([mask_column])
        self.image_column, self.mask_column = image_column, mask_column

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"{self.name} row {index} ({self.image_column})"

    def mask_source(self, index: int) -> str:
        return f"{self.name} row {index} ({self.mask_column})"

    def _cell(self, rows: Any, column: str, index: int, source: str) -> Image.Image:
        value = rows[index][column]
        if value is None:
            raise DataError(f"{source}: empty")
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            try:
                return Image.open(
                    io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
                )
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{source}: not a readable image ({exc})") from None
        if isinstance(value, np.ndarray | list):
            return Image.fromarray(np.asarray(value, dtype=np.uint8))
        raise DataError(f"{source}: expected an image, found {type(value).__name__}")

    def image_size(self, index: int) -> tuple[int, int]:
        image = self._cell(self.images, self.image_column, index, self.describe(index))
        return image.height, image.width

    def read_image(self, index: int) -> np.ndarray:
        source = self.describe(index)
        return read_image_array(self._cell(self.images, self.image_column, index, source), source)

    def read_stored_mask(self, index: int) -> np.ndarray:
        source = self.mask_source(index)
        return read_mask_array(
            self._cell(self.masks, self.mask_column, index, source), self.mask_palette, source
        )


@dataclass
class DrawnMaskDataset(SegmentationDataset):
    """Images whose masks are drawn from an annotation file (COCO, Label Studio): ``pairs``
    are (image, annotation file). Each process parses a file once, on first use, so the
    dataset stays small to send to loader workers."""

    kind: str = "coco"
    background: bool = True
    # The class names the annotation file's label names map to, before any reduce_labels.
    drawn_labels: list[str] | None = None

    def mask_source(self, index: int) -> str:
        image, annotations = self.pairs[index]
        return f"{annotations} ({image.name})"

    def read_stored_mask(self, index: int) -> np.ndarray:
        image, path = self.pairs[index]
        if self.kind == "coco":
            return tools.coco_mask(tools.coco_index(path, self.background), image)
        return tools.labelstudio_mask(
            tools.labelstudio_index(path), image, self.drawn_labels or [], self.background
        )


# ---------------------------------------------------------------------------------------
# Finding pairs on disk
# ---------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def match_by_stem(
    image_dir: Path, mask_dir: Path, unpaired: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """Pair every image with the mask at the same relative path and stem (any image suffix,
    optionally ``_mask``/``_label``/… appended). An image without a mask is an error, or,
    when ``unpaired`` is a list, noted there and left out."""
    masks: dict[tuple[str, ...], Path] = {}
    for path in _images_in(mask_dir):
        masks[path.relative_to(mask_dir).with_suffix("").parts] = path
    pairs = []
    for image in _images_in(image_dir):
        key = image.relative_to(image_dir).with_suffix("").parts
        mask = next(
            (
                masks[(*key[:-1], key[-1] + s)]
                for s in MASK_STEM_SUFFIXES
                if (*key[:-1], key[-1] + s) in masks
            ),
            None,
        )
        if mask is None:
            problem = f"{image}: no mask for this image in {mask_dir} (looked for {key[-1]}.png and similar)"
            if unpaired is None:
                raise DataError(problem)
            unpaired.append(problem)
            continue
        pairs.append((image, mask))
    return pairs


def folder_pairs(
    root: Path, split: str | None, unpaired: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """Pairs from root/images[/split] + root/masks[/split], or root/split/images + masks."""
    tried = []
    for base in ([root / split] if split else []) + [root]:
        for images_name in ("images", "image", "img", "imgs"):
            for masks_name in MASK_DIR_NAMES:
                layouts = [(base / images_name, base / masks_name)]
                if split and base == root:
                    layouts.insert(0, (root / images_name / split, root / masks_name / split))
                for image_dir, mask_dir in layouts:
                    if image_dir.is_dir() and mask_dir.is_dir():
                        return match_by_stem(image_dir, mask_dir, unpaired)
        tried.append(f"{base}/images + {base}/masks")
    where = f"{root}/images/{split} + {root}/masks/{split}, " if split else ""
    raise DataError(
        f"{root}: no image and mask folders found (expected {where}{' or '.join(tried)})"
    )


def list_pairs(root: Path, split: str | None) -> list[tuple[Path, Path]]:
    """Pairs from a list file: each line "image mask" (whitespace or comma separated), paths
    relative to the list file's folder; blank lines and lines starting with # are skipped."""
    list_file = root if root.is_file() else root / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: no such list file")
    pairs = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 2:
            raise DataError(f"{list_file}:{number}: expected 'image mask', found {line!r}")
        image, mask = (Path(f) if Path(f).is_absolute() else list_file.parent / f for f in fields)
        if not image.is_file():
            raise DataError(f"{list_file}:{number}: {image}: no such image")
        if not mask.is_file():
            raise DataError(f"{list_file}:{number}: {mask}: missing mask for {image.name}")
        pairs.append((image, mask))
    return pairs


def _png_masks_mirroring(
    image_dir: Path, mask_dir: Path, noun: str, unpaired: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """Each image under ``image_dir`` with the PNG at the same relative path under
    ``mask_dir``; a missing one is an error naming it as ``noun`` (or noted in ``unpaired``)."""
    pairs = []
    for image in _images_in(image_dir):
        mask = mask_dir / image.relative_to(image_dir).with_suffix(".png")
        if not mask.is_file():
            if unpaired is None:
                raise DataError(f"{image}: missing {noun} {mask}")
            unpaired.append(f"{image}: missing {noun} {mask}")
            continue
        pairs.append((image, mask))
    return pairs


def camvid_pairs(
    root: Path, split: str, unpaired: list[str] | None = None
) -> list[tuple[Path, Path]]:
    image_dir, mask_dir = root / split, root / f"{split}annot"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(
            f"{root}: not a CamVid (SegNet layout) folder: expected {split}/ and {split}annot/"
        )
    return _png_masks_mirroring(image_dir, mask_dir, "mask", unpaired)


_ADE_SPLITS = {
    "train": "training",
    "val": "validation",
    "validation": "validation",
    "training": "training",
}


def ade20k_pairs(
    root: Path, split: str, unpaired: list[str] | None = None
) -> list[tuple[Path, Path]]:
    folder = _ADE_SPLITS.get(split, split)
    image_dir, mask_dir = root / "images" / folder, root / "annotations" / folder
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(
            f"{root}: not an ADEChallengeData2016 folder: expected images/{folder}/ and annotations/{folder}/"
        )
    return _png_masks_mirroring(image_dir, mask_dir, "annotation", unpaired)


def ade20k_labels(root: Path) -> list[str] | None:
    """Class names from objectInfo150.txt (first synonym of each Name), when the folder has it."""
    info = root / "objectInfo150.txt"
    if not info.is_file():
        return None
    names = []
    for line in info.read_text(encoding="utf-8").splitlines()[1:]:
        columns = line.split("\t")
        if len(columns) >= 5:
            names.append(columns[4].split(",")[0].strip())
    return names or None


def cityscapes_pairs(root: Path, split: str) -> tuple[list[tuple[Path, Path]], bool]:
    """Pairs and whether the masks are labelIds (True: map to train ids) or labelTrainIds."""
    image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(
            f"{root}: not a Cityscapes folder: expected leftImg8bit/{split}/ and gtFine/{split}/"
        )
    pairs, kinds = [], set()
    for image in sorted(image_dir.rglob("*_leftImg8bit.png")):
        stem = image.name.removesuffix("_leftImg8bit.png")
        folder = mask_dir / image.parent.relative_to(image_dir)
        label_ids, train_ids = (
            folder / f"{stem}_gtFine_labelIds.png",
            folder / f"{stem}_gtFine_labelTrainIds.png",
        )
        if label_ids.is_file():
            pairs.append((image, label_ids))
            kinds.add("labelIds")
        elif train_ids.is_file():
            pairs.append((image, train_ids))
            kinds.add("labelTrainIds")
        else:
            raise DataError(f"{image}: missing mask {label_ids}")
    if len(kinds) > 1:
        raise DataError(
            f"{mask_dir}: some images have only labelTrainIds masks, others labelIds; use one kind"
        )
    return pairs, kinds != {"labelTrainIds"}


_MASK_COLUMNS = ("annotation", "semantic_map", "segmentation", "mask", "label", "seg", "labels")
_IMAGE_COLUMNS = ("image", "img", "pixel_values", "pixel_value")
_HF_SPLITS = {
    "val": ("validation", "val", "valid"),
    "train": ("train", "training"),
    "test": ("test",),
}


def open_hf_rows(root: Path, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "the 'hf' format needs the Hugging Face datasets package: pip install datasets"
        ) from None
    datasets.disable_progress_bars()
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            data = datasets.load_from_disk(str(root))
        else:
            data = datasets.load_dataset(str(root))
    except Exception as exc:  # datasets raises many types for an unreadable folder
        raise DataError(
            f"{root}: not a readable Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        for name in (split, *_HF_SPLITS.get(split, ())):
            if name in data:
                return data[name]
        raise DataError(f"{root}: no split {split!r} (splits: {', '.join(data)})")
    return data


def _pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, root: Path
) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{root}: no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"{root}: cannot tell which column holds the {what} (columns: {', '.join(columns)}); name it"
    )


# ---------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------
def open_dataset(
    root: str | os.PathLike[str],
    format: str,
    split: str | None = "train",
    *,
    reduce_labels: bool | None = None,
    image_column: str | None = None,
    mask_column: str | None = None,
    mask_palette: list[list[int]] | None = None,
    background: bool | None = None,
    unpaired: list[str] | None = None,
) -> SegmentationDataset:
    """Open split ``split`` of the dataset at ``root`` stored in ``format`` (one of
    ``FORMATS``). ``reduce_labels`` (0 → ignore, k → k−1) defaults to on for ade20k only.
    ``background`` (coco, labelstudio): pixels no object covers are class 0 "background"
    (default) or ignore. ``unpaired``: a list to note images without a mask in (they are left
    out) instead of failing on the first; ``segformer data check`` reports them all."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such dataset folder")
    if format not in FORMATS:
        raise DataError(f"unknown dataset format {format!r}: choose one of {', '.join(FORMATS)}")
    name = f"{root} [{split}]" if split else str(root)
    labels: list[str] | None = None
    palette: list[list[int]] | None = None
    table = identity_table()
    if format in ("folder", "binary"):
        pairs = folder_pairs(root, split, unpaired)
        if format == "binary":
            table, labels = binary_table(), list(BINARY_LABELS)
        elif (root / "labels.json").is_file():
            labels, palette = read_labels_file(root / "labels.json")
            # Colour masks are read through the same colours the labels file gives.
            mask_palette = mask_palette or palette
    elif format == "list":
        pairs = list_pairs(root, split)
    elif format == "camvid":
        pairs, table = camvid_pairs(root, split or "train", unpaired), camvid_table()
        labels, palette = list(CAMVID_LABELS), [list(c) for c in CAMVID_PALETTE]
    elif format in ("coco", "voc", "cvat", "roboflow", "labelstudio"):
        return _open_tool_export(
            root, format, split, name, reduce_labels, mask_palette, background, unpaired
        )
    elif format == "ade20k":
        pairs = ade20k_pairs(root, split or "train", unpaired)
        labels = ade20k_labels(root) or list(ADE20K_LABELS)
        palette = [list(c) for c in ADE20K_PALETTE] if len(labels) == len(ADE20K_PALETTE) else None
        reduce_labels = True if reduce_labels is None else reduce_labels
    elif format == "cityscapes":
        pairs, label_ids = cityscapes_pairs(root, split or "train")
        table = cityscapes_table() if label_ids else identity_table()
        labels, palette = list(CITYSCAPES_LABELS), [list(c) for c in CITYSCAPES_PALETTE]
    else:  # hf
        rows = open_hf_rows(root, split or "train")
        columns = list(rows.column_names)
        image_col = _pick_column(columns, image_column, _IMAGE_COLUMNS, "images", root)
        mask_col = _pick_column(
            [c for c in columns if c != image_col], mask_column, _MASK_COLUMNS, "masks", root
        )
        if reduce_labels:
            table = reduce_labels_table()
        dataset = HFSegmentationDataset(
            name,
            rows,
            image_col,
            mask_col,
            table,
            mask_palette=mask_palette,
            labels=None,
            palette=None,
        )
        if len(dataset) == 0:
            raise DataError(f"{name}: the dataset is empty")
        return dataset
    if reduce_labels:
        table = reduce_labels_table()[table]
    if not pairs:
        raise DataError(f"{name}: no images found")
    return SegmentationDataset(
        name=name,
        pairs=pairs,
        table=table,
        labels=labels,
        palette=palette,
        mask_palette=mask_palette,
    )


def open_splits(
    root: str | os.PathLike[str],
    format: str,
    split: str,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    **options: Any,
) -> SegmentationDataset:
    """``open_dataset`` for ``split``, where ``a+b`` joins splits (``train+val``) and file-name
    patterns (fnmatch, on the image's name) keep (``include``) or drop (``exclude``) images,
    so that one whole recording can be held out, trained without and evaluated alone.
    ``options`` go to ``open_dataset``."""
    include, exclude = list(include), list(exclude)
    parts = [open_dataset(root, format, name, **options) for name in split.split("+")]
    if len(parts) == 1 and not include and not exclude:
        return parts[0]
    if any(isinstance(part, HFSegmentationDataset) for part in parts):
        raise DataError("joining splits or filtering files needs a file-based format")
    pairs = [pair for part in parts for pair in part.pairs]
    if include:
        pairs = [p for p in pairs if any(fnmatch.fnmatch(p[0].name, g) for g in include)]
    pairs = [p for p in pairs if not any(fnmatch.fnmatch(p[0].name, g) for g in exclude)]
    if not pairs:
        raise DataError(f"{root} [{split}]: no images left after the file-name filters")
    name = f"{root} [{split}" + (f" {' '.join(include)}" if include else "")
    name += (f" without {' '.join(exclude)}" if exclude else "") + "]"
    return dataclasses.replace(parts[0], name=name, pairs=pairs)


def _open_tool_export(
    root: Path,
    format: str,
    split: str | None,
    name: str,
    reduce_labels: bool | None,
    mask_palette: list[list[int]] | None,
    background: bool | None,
    unpaired: list[str] | None,
) -> SegmentationDataset:
    split = split or "train"
    background = True if background is None else background
    table, palette = identity_table(), None
    if format == "coco":
        pairs, labels = tools.coco_pairs(root, split, background, unpaired)
    elif format == "labelstudio":
        pairs, labels = tools.labelstudio_pairs(root, split, background, unpaired)
    elif format == "voc":
        pairs, labels = tools.voc_pairs(root, split, unpaired), list(tools.VOC_LABELS)
        palette = tools.voc_palette(len(labels))
        # Masks saved again as RGB (by an editor) still read through VOC's colours; all 256
        # of them (distinct), so the border colour reads as 255 too.
        mask_palette = mask_palette or tools.voc_palette(256)
    elif format == "cvat":
        pairs, labels, palette = tools.cvat_pairs(root, split, unpaired)
        mask_palette = palette
    else:  # roboflow
        pairs, classes = tools.roboflow_pairs(root, split, unpaired)
        table, labels = tools.roboflow_table(classes)
    drawn_labels = list(labels)
    if reduce_labels:
        table = reduce_labels_table()[table]
        labels, palette = labels[1:], palette[1:] if palette else None
    if not pairs:
        raise DataError(f"{name}: no images found")
    if format in DRAWN_FORMATS:
        return DrawnMaskDataset(
            name=name,
            pairs=pairs,
            table=table,
            labels=labels,
            palette=palette,
            kind=format,
            background=background,
            drawn_labels=drawn_labels,
        )
    return SegmentationDataset(
        name=name,
        pairs=pairs,
        table=table,
        labels=labels,
        palette=palette,
        mask_palette=mask_palette,
    )


# ---------------------------------------------------------------------------------------
# Pre-flight scan
# ---------------------------------------------------------------------------------------
@dataclass
class ScanReport:
    """What a full pass over the masks found. ``class_pixels[k]``: pixels of class k;
    ``present_pixels[k]``: all pixels of the images in which class k appears."""

    images: int
    class_pixels: np.ndarray
    present_pixels: np.ndarray
    ignored_pixels: int
    # The classes each image holds, by dataset index.
    image_classes: list[np.ndarray] = field(default_factory=list)

    def class_balanced_weights(self, temperature: float) -> np.ndarray:
        """Per-image sampling probabilities of rare-class sampling (Hoyer et al., DAFormer,
        2022): a class is drawn with probability ∝ exp((1 − f_c) / T), f_c its share of the
        labelled pixels, then one of the images holding it, uniformly. An image's weight is
        the chance that this draws it; an image with no labelled pixel is never drawn."""
        counts = self.class_pixels.astype(np.float64)
        share = counts / max(counts.sum(), 1.0)
        holders = np.zeros(len(counts), np.int64)
        for classes in self.image_classes:
            holders[classes] += 1
        present = (counts > 0) & (holders > 0)
        if not present.any():
            raise DataError("class-balanced sampling needs labelled pixels in the training masks")
        logits = np.where(present, (1.0 - share) / temperature, -np.inf)
        chance = np.exp(logits - logits[present].max())  # a softmax over the present classes
        per_image_of_class = np.divide(
            chance / chance.sum(), holders, out=np.zeros_like(chance), where=holders > 0
        )
        return np.array([per_image_of_class[c].sum() for c in self.image_classes])

    def class_weights(self, method: str) -> list[float]:
        """Loss weights against class imbalance. ``median-frequency`` (Eigen & Fergus; SegNet's
        CamVid recipe): median(f) / f_k with f_k = class_pixels / present_pixels.
        ``enet``: 1 / ln(1.02 + p_k) with p_k the class's share of labelled pixels."""
        counts = self.class_pixels.astype(np.float64)
        if method == "median-frequency":
            frequency = np.divide(
                counts,
                self.present_pixels,
                out=np.zeros_like(counts),
                where=self.present_pixels > 0,
            )
            median = np.median(frequency[frequency > 0])
            weights = np.divide(median, frequency, out=np.zeros_like(counts), where=frequency > 0)
        elif method == "enet":
            share = counts / max(counts.sum(), 1.0)
            weights = np.where(counts > 0, 1.0 / np.log(1.02 + share), 0.0)
        else:
            raise DataError(
                f"unknown class weighting {method!r}: use median-frequency, enet or a list of numbers"
            )
        return [float(w) for w in weights]


def outside_label_message(
    dataset: SegmentationDataset, index: int, value: int, num_labels: int
) -> str:
    """The one-line problem of sample ``index``: ``value`` is not one of the ``num_labels``
    labels (named with the stored mask value it came from)."""
    stored = np.nonzero(dataset.table == value)[0]
    what = (
        f"stored value {int(stored[0])} → label {value}"
        if len(stored) and stored[0] != value
        else f"label {value}"
    )
    return (
        f"{dataset.mask_source(index)}: {what}, but there are {num_labels} classes "
        f"(0..{num_labels - 1}, {dataset.ignore_index} = ignore)"
    )


def check_labels(
    dataset: SegmentationDataset, index: int, label: np.ndarray, num_labels: int
) -> None:
    """Raise DataError naming the mask when sample ``index``'s ``label`` map holds an id
    ≥ ``num_labels`` other than ignore: the pre-flight's check, for one sample, for runs that
    skip the pre-flight."""
    values = np.unique(np.asarray(label))
    bad = values[(values >= num_labels) & (values != dataset.ignore_index)]
    if len(bad):
        raise DataError(outside_label_message(dataset, index, int(bad[0]), num_labels))


# ---------------------------------------------------------------------------------------
# Training view and loaders
# ---------------------------------------------------------------------------------------
class AugmentedDataset(Dataset):
    """A dataset seen through a random training transform. Items are addressed by
    ``(index, epoch)``: the sample's RNG is seeded from (seed, epoch, index), so its
    augmentation is the same whichever worker or process produces it, and after a resume."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        transform: Callable[
            [np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]
        ],
        seed: int,
        num_labels: int | None = None,
    ) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        # Set when the pre-flight scan was skipped: each mask is checked as it is read, so a
        # bad label stops the run with the file's name instead of an indexing error.
        self.num_labels = num_labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        # (index, epoch), or (index, epoch, draw) from a sampler that may draw an image
        # twice in an epoch: each draw then gets its own augmentation.
        index, epoch, *draw = key
        rng = np.random.default_rng([self.seed, epoch, index, *draw])
        image, label = self.dataset.load(index)
        if self.num_labels is not None:
            check_labels(self.dataset, index, label, self.num_labels)
        pixel_values, labels = self.transform(image, label, rng)
        return {"pixel_values": pixel_values, "labels": labels}


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (this process's share of a per-epoch shuffle seeded by seed +
    epoch) that yields ``(index, epoch)`` keys and can start part-way into an epoch, which
    is how a resumed run picks up at the exact sample it stopped at."""

    def __init__(
        self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip :]
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ClassBalancedSampler(Sampler):
    """Per epoch, as many draws as the dataset has images, with replacement, each image with
    probability ``weights[i]`` (``ScanReport.class_balanced_weights``); this process's share
    of them. Seeded by seed + epoch and resumable part-way like ``EpochSampler``; yields
    ``(index, epoch, draw)`` keys so that an image drawn twice is augmented twice apart."""

    def __init__(self, weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.weights = torch.as_tensor(np.asarray(weights, np.float64))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_samples = math.ceil(len(self.weights) / world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.world_size
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        mine = range(self.rank, total, self.world_size)
        keys = [(int(drawn[draw]), self.epoch, draw) for draw in mine]
        return iter(keys[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _seed_worker(worker_id: int) -> None:
    # Transforms here use only the per-sample generator; this makes any user transform that
    # reaches for the global RNGs deterministic too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader_kwargs(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_seed_worker)
    return kwargs


def train_loader(
    dataset: AugmentedDataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    weights: np.ndarray | None = None,
) -> tuple[DataLoader, EpochSampler | ClassBalancedSampler]:
    """Batches of augmented crops; incomplete last batches are dropped, as the recipe does.
    Each image once per epoch, or with ``weights`` drawn by ``ClassBalancedSampler``."""
    sampler: EpochSampler | ClassBalancedSampler = (
        EpochSampler(dataset, seed, rank, world_size)
        if weights is None
        else ClassBalancedSampler(weights, seed, rank, world_size)
    )
    if sampler.num_samples < batch_size:
        raise DataError(
            f"{dataset.dataset.name}: {len(dataset)} images give {sampler.num_samples} per process, "
            f"fewer than the batch size {batch_size}"
        )
    # An explicit generator keeps the loader from drawing on the global torch RNG (which
    # dropout uses), so creating a loader on resume does not shift the model's randomness.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        **_loader_kwargs(num_workers, pin_memory),
    )
    return loader, sampler


def loader_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``loader``, with the one-line message of a SegformerError raised in a
    worker process: torch re-raises it there with the worker's whole traceback as message."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except SegformerError as exc:
            raise _one_line(exc) from None
        yield batch


def _one_line(exc: SegformerError) -> SegformerError:
    text = str(exc)
    if not text.startswith("Caught ") or "\n" not in text:
        return exc
    # The traceback's last line is "module.ErrorType: message".
    _, sep, message = text.rstrip().splitlines()[-1].partition(": ")
    return type(exc)(message) if sep else exc


def collate_eval(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation images keep their own sizes: a batch is a list."""
    return items


def eval_loader(
    dataset: SegmentationDataset,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
) -> DataLoader:
    """Every ``world_size``-th image starting at ``rank``, no padding and no repeats, so the
    confusion counts of all processes sum to exactly those of one process."""
    shard = list(range(rank, len(dataset), world_size))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=shard,
        collate_fn=collate_eval,
        generator=torch.Generator().manual_seed(0),
        **_loader_kwargs(num_workers, False),
    )
