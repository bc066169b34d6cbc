"""Readers for the exports of annotation tools: where each one puts images and masks, how
classes are named and numbered, and (for COCO and Label Studio, which store shapes rather
than mask images) how masks are drawn. ``segformer.training.datasets.open_dataset`` calls
these; every one yields train ids 0..K−1 with 255 = ignore.

    coco        COCO instances JSON: annotations/instances_<split>*.json + images[/<split>]
                or <split>[2017]/; Roboflow's <split>/_annotations.coco.json beside its images
    voc         Pascal VOC: JPEGImages + SegmentationClass palette PNGs +
                ImageSets/Segmentation/<split>.txt; the 255 borders are ignored
    cvat        CVAT "Segmentation mask 1.1": labelmap.txt, SegmentationClass colour PNGs,
                ImageSets/Segmentation/<subset>.txt, JPEGImages
    roboflow    Roboflow semantic-segmentation masks: train/ valid/ test/, each image beside
                its <stem>_mask.png, and _classes.csv ("Pixel Value, Class")
    labelstudio Label Studio JSON export with brush labels (its RLE) + the images

COCO and Label Studio masks are drawn object by object: crowd regions (COCO ``iscrowd``)
first, as ignore; then objects from the largest area to the smallest, so a small object on
top of a large one stays visible and any object covers a crowd region. Pixels no object
covers are class 0 "background" (``background=True``, the default) or ignore.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_rle

from segformer.errors import DataError
from segformer.training.files import image_size

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BACKGROUND = "background"

# ---------------------------------------------------------------------------------------
# Pascal VOC
# ---------------------------------------------------------------------------------------
VOC_LABELS = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette(count: int = 21) -> list[list[int]]:
    """VOC's colour map: the bits of the class index, three at a time, spread from the most
    significant bit down over red, green and blue (0 → black, 1 → (128, 0, 0), …)."""
    colours = []
    for index in range(count):
        rgb, value = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours.append(rgb)
    return colours


def _voc_base(root: Path) -> Path:
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir():
            return base
    raise DataError(
        f"{root}: not a Pascal VOC folder: expected JPEGImages/ and SegmentationClass/ "
        "(in it, in VOC2012/ or in VOCdevkit/VOC2012/)"
    )


def _read_id_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable list of image names ({exc})") from None
    # CVAT writes one name per line; VOC's main lists too (the per-class lists add " 1"/"-1").
    return [line.split()[0] for line in lines if line.strip()]


def _find_image(folder: Path, name: str) -> Path | None:
    """The image named ``name`` (a stem, maybe with folders) in ``folder``, any suffix."""
    direct = folder / name
    if direct.suffix.lower() in IMAGE_SUFFIXES and direct.is_file():
        return direct
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{name}{suffix}", folder / f"{name}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _listed_pairs(
    ids: list[str], image_dir: Path, mask_dir: Path, unpaired: list[str] | None
) -> list[tuple[Path, Path]]:
    pairs = []
    for name in ids:
        image = _find_image(image_dir, name)
        mask = mask_dir / f"{name}.png"
        problem = None
        if image is None:
            problem = f"{image_dir / name}: image listed but not found"
        elif not mask.is_file():
            problem = f"{image}: missing mask {mask}"
        if problem is None:
            pairs.append((image, mask))
        elif unpaired is None:
            raise DataError(problem)
        else:
            unpaired.append(problem)
    return pairs


def voc_pairs(root: Path, split: str, unpaired: list[str] | None = None) -> list[tuple[Path, Path]]:
    base = _voc_base(root)
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"{base}: no split list ImageSets/Segmentation/{split}.txt")
    return _listed_pairs(
        _read_id_list(split_file), base / "JPEGImages", base / "SegmentationClass", unpaired
    )


# ---------------------------------------------------------------------------------------
# CVAT "Segmentation mask 1.1"
# ---------------------------------------------------------------------------------------
def read_cvat_labelmap(path: Path) -> tuple[list[str], list[list[int]]]:
    """labelmap.txt: ``# label:color_rgb:parts:actions`` then one ``name:r,g,b:parts:actions``
    line per class, in mask index order (CVAT puts ``background:0,0,0::`` first)."""
    names, colours = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable label map ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        try:
            rgb = [int(v) for v in fields[1].split(",")]
        except (IndexError, ValueError):
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb) or not fields[0]:
            raise DataError(f"{path}:{number}: expected 'name:r,g,b:parts:actions', found {line!r}")
        if rgb in colours:
            raise DataError(f"{path}:{number}: colour {rgb} is already used by another label")
        names.append(fields[0])
        colours.append(rgb)
    if not names:
        raise DataError(f"{path}: no labels")
    return names, colours


def cvat_pairs(
    root: Path, split: str, unpaired: list[str] | None = None
) -> tuple[list[tuple[Path, Path]], list[str], list[list[int]]]:
    labelmap = root / "labelmap.txt"
    if not labelmap.is_file() or not (root / "SegmentationClass").is_dir():
        raise DataError(
            f"{root}: not a CVAT segmentation mask export: expected labelmap.txt and SegmentationClass/"
        )
    names, colours = read_cvat_labelmap(labelmap)
    lists = root / "ImageSets" / "Segmentation"
    split_file = lists / f"{split}.txt"
    if not split_file.is_file():
        # CVAT names the list after the task's subset, "default" when it has none.
        available = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
        if available != ["default"]:
            raise DataError(
                f"{root}: no subset {split!r} in ImageSets/Segmentation "
                f"(subsets: {', '.join(available) or 'none'})"
            )
        split_file = lists / "default.txt"
    image_dir = root / "JPEGImages"
    if not image_dir.is_dir():
        raise DataError(
            f"{root}: no JPEGImages/ (export the dataset from CVAT with 'Save images' on)"
        )
    pairs = _listed_pairs(
        _read_id_list(split_file), image_dir, root / "SegmentationClass", unpaired
    )
    return pairs, names, colours


# ---------------------------------------------------------------------------------------
# Roboflow semantic segmentation masks
# ---------------------------------------------------------------------------------------
ROBOFLOW_SPLITS = {"val": "valid", "validation": "valid"}


def _split_folder(root: Path, split: str) -> Path | None:
    for name in (split, ROBOFLOW_SPLITS.get(split, split)):
        if (root / name).is_dir():
            return root / name
    return None


def read_roboflow_classes(path: Path) -> dict[int, str]:
    """_classes.csv: a "Pixel Value, Class" header, then one "value, name" row per class."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = [
                [c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable class list ({exc})") from None
    if rows and not rows[0][0].isdigit():
        rows = rows[1:]  # the header
    classes: dict[int, str] = {}
    for row in rows:
        if len(row) < 2 or not row[0].isdigit() or int(row[0]) > 254:
            raise DataError(f"{path}: expected rows 'pixel value, class name', found {row}")
        classes[int(row[0])] = row[1]
    if not classes:
        raise DataError(f"{path}: no classes")
    return classes


def roboflow_pairs(
    root: Path, split: str, unpaired: list[str] | None = None
) -> tuple[list[tuple[Path, Path]], dict[int, str]]:
    folder = _split_folder(root, split)
    if folder is None:
        raise DataError(
            f"{root}: no {ROBOFLOW_SPLITS.get(split, split)}/ folder (a Roboflow export has train/, valid/, test/)"
        )
    classes_file = folder / "_classes.csv"
    if not classes_file.is_file():
        classes_file = root / "_classes.csv"
    if not classes_file.is_file():
        raise DataError(f"{folder}: no _classes.csv (not a Roboflow semantic segmentation export)")
    classes = read_roboflow_classes(classes_file)
    pairs = []
    for image in sorted(folder.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES or image.stem.endswith("_mask"):
            continue
        mask = image.with_name(f"{image.stem}_mask.png")
        if mask.is_file():
            pairs.append((image, mask))
        elif unpaired is None:
            raise DataError(f"{image}: missing mask {mask.name}")
        else:
            unpaired.append(f"{image}: missing mask {mask.name}")
    return pairs, classes


def roboflow_table(classes: dict[int, str]) -> tuple[np.ndarray, list[str]]:
    """Listed pixel values → 0..K−1 in value order; other values stay as they are, so the
    pre-flight names them when they fall outside the label set."""
    table = np.arange(256, dtype=np.uint8)
    values = sorted(classes)
    for index, value in enumerate(values):
        table[value] = index
    return table, [classes[v] for v in values]


# ---------------------------------------------------------------------------------------
# COCO instances
# ---------------------------------------------------------------------------------------
@dataclass
class CocoImage:
    file_name: str
    height: int
    width: int
    annotations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CocoIndex:
    """One instances JSON file: its classes (category id → train label) and its images."""

    path: Path
    category_names: list[str]
    category_labels: dict[int, int]
    images: dict[str, CocoImage]  # keyed by file_name
    background: bool

    def find(self, image: Path) -> CocoImage:
        entry = _lookup_by_path(self.images, image)
        if entry is None:
            raise DataError(f"{self.path}: no image entry for {image}")
        return entry


def _lookup_by_path(entries: dict[str, Any], image: Path) -> Any:
    """The entry whose key is the longest tail of ``image``'s path (a file_name may carry
    folders, or just the name)."""
    parts = image.parts
    for start in range(len(parts)):
        key = "/".join(parts[start:])
        if key in entries:
            return entries[key]
    return None


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None


def coco_categories(categories: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The categories that are classes. Roboflow adds one for the whole project (its
    supercategory "none", and every real class's supercategory is its name) that no object
    uses; it is left out."""
    if not isinstance(categories, list) or not categories:
        raise DataError(f"{path}: no categories")
    try:
        parents = {c["supercategory"] for c in categories if c.get("supercategory")}
        kept = [
            c for c in categories if not (c.get("supercategory") == "none" and c["name"] in parents)
        ]
        ids = [int(c["id"]) for c in kept]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: every category needs an integer id and a name") from None
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: category ids repeat")
    return sorted(kept, key=lambda c: int(c["id"]))


@functools.lru_cache(maxsize=8)
def _coco_index(path: Path, mtime_ns: int, background: bool) -> CocoIndex:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO instances file (no 'images' list)")
    categories = coco_categories(data.get("categories"), path)
    offset = 1 if background else 0
    labels = {int(c["id"]): i + offset for i, c in enumerate(categories)}
    names = ([BACKGROUND] if background else []) + [str(c["name"]) for c in categories]
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes; at most 255 fit a mask")
    by_id: dict[int, CocoImage] = {}
    images: dict[str, CocoImage] = {}
    for record in data["images"]:
        try:
            entry = CocoImage(
                str(record["file_name"]).replace("\\", "/"),
                int(record["height"]),
                int(record["width"]),
            )
            by_id[int(record["id"])] = entry
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{path}: every image needs id, file_name, height and width ({record!r:.80})"
            ) from None
        images[entry.file_name] = entry
    for annotation in data.get("annotations", []):
        image_id, category = annotation.get("image_id"), annotation.get("category_id")
        if image_id not in by_id:
            raise DataError(
                f"{path}: annotation {annotation.get('id')} refers to image {image_id}, which is not listed"
            )
        if category not in labels:
            known = ", ".join(str(k) for k in sorted(labels))
            raise DataError(
                f"{path}: annotation {annotation.get('id')} has category_id {category}, "
                f"not one of the categories ({known})"
            )
        by_id[image_id].annotations.append(annotation)
    return CocoIndex(path, names, labels, images, background)


def coco_index(path: Path, background: bool = True) -> CocoIndex:
    """The parsed file, once per process (workers each parse it once; the cache key carries
    the modification time, so an edited file is read again)."""
    path = Path(path).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return _coco_index(path, mtime, background)


def _coco_shape(annotation: dict[str, Any], height: int, width: int, source: str) -> Any:
    """The annotation's region as one pycocotools RLE, or None when it has no area."""

    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, list):
            # Fewer than three points is no area; a 4-number list would be read as a box.
            polygons = [
                [float(v) for v in p] for p in segmentation if isinstance(p, list) and len(p) >= 6
            ]
            if not polygons:
                return None
            return coco_rle.merge(coco_rle.frPyObjects(polygons, height, width))
        if isinstance(segmentation, dict) and "counts" in segmentation:
            size = [int(v) for v in segmentation.get("size", [])]
            if size != [height, width]:
                raise DataError(
                    f"{source}: annotation {annotation.get('id')} RLE size {size} is not the "
                    f"image's {[height, width]}"
                )
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed RLE (crowd regions)
                if sum(int(c) for c in counts) != height * width:
                    raise DataError(
                        f"{source}: annotation {annotation.get('id')} RLE counts do not add up to "
                        f"{height}×{width} pixels"
                    )
                return coco_rle.frPyObjects(segmentation, height, width)
            counts = counts.encode("ascii") if isinstance(counts, str) else counts
            return {"size": size, "counts": counts}
    except DataError:
        raise
    except Exception as exc:  # pycocotools raises bare exceptions on malformed input
        raise DataError(
            f"{source}: annotation {annotation.get('id')} has an unreadable segmentation ({exc})"
        ) from None
    if segmentation in (None, [], {}):
        return None
    raise DataError(
        f"{source}: annotation {annotation.get('id')}: segmentation must be polygons or RLE"
    )


def paint_objects(
    height: int,
    width: int,
    objects: Sequence[tuple[int, np.ndarray, bool, int]],
    background: bool,
) -> np.ndarray:
    """The label map of ``objects`` (label, boolean mask, crowd, tie-break order): crowd
    regions first as ignore, then objects from the largest to the smallest, so the smallest
    end up on top; pixels nothing covers are 0 (``background``) or ignore."""
    label = np.full((height, width), 0 if background else IGNORE_INDEX, dtype=np.uint8)
    for _, mask, crowd, _ in objects:
        if crowd:
            label[mask] = IGNORE_INDEX
    solid = [o for o in objects if not o[2]]
    for value, mask, _, _ in sorted(solid, key=lambda o: (-int(o[1].sum()), o[3])):
        label[mask] = value
    return label


def coco_mask(index: CocoIndex, image: Path) -> np.ndarray:

    entry = index.find(image)
    source = f"{index.path} ({entry.file_name})"
    objects = []
    for order, annotation in enumerate(entry.annotations):
        shape = _coco_shape(annotation, entry.height, entry.width, source)
        if shape is None:
            continue
        try:
            with warnings.catch_warnings():
                # pycocotools 2.0 builds its array in a way numpy 2 deprecates; harmless here.
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = coco_rle.decode(shape).astype(bool)
        except Exception as exc:  # a malformed compressed RLE string
            raise DataError(
                f"{source}: annotation {annotation.get('id')} has an unreadable RLE ({exc})"
            ) from None
        label = index.category_labels[annotation["category_id"]]
        objects.append((label, mask, bool(annotation.get("iscrowd", 0)), order))
    return paint_objects(entry.height, entry.width, objects, index.background)


def coco_files(root: Path, split: str) -> tuple[Path, list[Path]]:
    """The instances JSON of ``split`` and the folders its file_names are relative to."""
    if root.is_file():
        return root, [root.parent / "images", root.parent]
    aliases = [split, ROBOFLOW_SPLITS.get(split, split)]
    if split in ("val", "valid"):
        aliases.append("validation")
    for name in aliases:  # Roboflow: images and their JSON in one folder per split
        candidate = root / name / "_annotations.coco.json"
        if candidate.is_file():
            return candidate, [candidate.parent]
    annotations = root / "annotations"
    for name in aliases:
        matches = sorted(annotations.glob(f"instances_{name}*.json")) + sorted(
            annotations.glob(f"{name}.json")
        )
        if matches:
            found = matches[0]
            year = found.stem.removeprefix("instances_")  # val2017 when the file says so
            folders = [root / "images" / year, root / year, root / "images" / name, root / name]
            return found, [*folders, root / "images", root]
    raise DataError(
        f"{root}: no COCO annotations for split {split!r}: expected annotations/instances_{split}.json "
        f"(+ images/) or {split}/_annotations.coco.json"
    )


def coco_pairs(
    root: Path, split: str, background: bool, unpaired: list[str] | None = None
) -> tuple[list[tuple[Path, Path]], list[str]]:
    path, folders = coco_files(root, split)
    index = coco_index(path, background)
    folders = [f for f in folders if f.is_dir()]
    pairs = []
    for entry in index.images.values():
        image = next(
            (
                folder / name
                for folder in folders
                for name in (entry.file_name, Path(entry.file_name).name)
                if (folder / name).is_file()
            ),
            None,
        )
        if image is not None:
            pairs.append((image, path))
            continue
        problem = f"{path}: image {entry.file_name} not found in {', '.join(map(str, folders))}"
        if unpaired is None:
            raise DataError(problem)
        unpaired.append(problem)
    return pairs, index.category_names


# ---------------------------------------------------------------------------------------
# Label Studio brush labels
# ---------------------------------------------------------------------------------------
class _Bits:
    """Reads unsigned integers of any width from a byte string, most significant bit first."""

    def __init__(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "big")
        self.size = len(data) * 8
        self.position = 0

    def read(self, width: int) -> int:
        end = self.position + width
        if end > self.size:
            raise ValueError("the RLE ends early")
        value = (self.value >> (self.size - end)) & ((1 << width) - 1)
        self.position = end
        return value


def decode_brush_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio's brush RLE (the rle-pack scheme of @thi.ng/rle-pack) → the flat array of
    values it encodes (for brushes: RGBA bytes of the mask image). The stream: 32 bits value
    count, 5 bits word size − 1, four 4-bit run-length widths − 1; then chunks of 1 bit
    "repeat", 2 bits choosing a run-length width, the run length − 1, and one value (repeat)
    or that many values."""
    bits = _Bits(bytes(int(b) & 0xFF for b in rle))
    count = bits.read(32)
    word = bits.read(5) + 1
    widths = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8 if word <= 8 else np.uint32)
    position = 0
    while position < count:
        repeat = bits.read(1)
        end = min(count, position + 1 + bits.read(widths[bits.read(2)]))
        if repeat:
            out[position:end] = bits.read(word)
        else:
            out[position:end] = [bits.read(word) for _ in range(end - position)]
        position = end
    return out


@dataclass
class LabelStudioTask:
    image: str  # the task's image reference as exported
    results: list[dict[str, Any]]


@dataclass
class LabelStudioIndex:
    path: Path
    tasks: dict[str, LabelStudioTask]  # keyed by the image's file name as stored


_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def _image_reference(url: str) -> str:
    """The file path a task's image URL points at: Label Studio's local-files URLs carry it
    in ``?d=``; uploads are ``/data/upload/<project>/<8 hex>-<name>``; cloud URLs end in it."""
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    path = query["d"][0] if "d" in query else urllib.parse.unquote(parsed.path)
    return path.replace("\\", "/")


def _task_results(task: dict[str, Any]) -> list[dict[str, Any]]:
    # The first annotation not cancelled; a task may have several (several annotators).
    for annotation in task.get("annotations") or []:
        if not annotation.get("was_cancelled"):
            return [r for r in annotation.get("result", []) if r.get("type") == "brushlabels"]
    return []


@functools.lru_cache(maxsize=8)
def _labelstudio_index(path: Path, mtime_ns: int) -> LabelStudioIndex:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    tasks: dict[str, LabelStudioTask] = {}
    for number, task in enumerate(data):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DataError(f"{path}: task {number} has no 'data'")
        url = next(
            (v for k, v in task["data"].items() if k in ("image", "img") and isinstance(v, str)),
            None,
        ) or next((v for v in task["data"].values() if isinstance(v, str)), None)
        if url is None:
            raise DataError(f"{path}: task {task.get('id', number)} names no image")
        reference = _image_reference(url)
        tasks[reference] = LabelStudioTask(reference, _task_results(task))
    return LabelStudioIndex(path, tasks)


def labelstudio_index(path: Path) -> LabelStudioIndex:
    path = Path(path).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return _labelstudio_index(path, mtime)


def labelstudio_files(root: Path, split: str | None) -> tuple[Path, list[Path]]:
    """The export JSON for ``split`` and every export JSON in the folder (for the class list)."""
    if root.is_file():
        return root, [root]
    exports = sorted(p for p in root.glob("*.json") if p.name != "labels.json")
    for name in [split, ROBOFLOW_SPLITS.get(split, split)] if split else []:
        if (root / f"{name}.json").is_file():
            return root / f"{name}.json", exports
    if len(exports) == 1:
        return exports[0], exports
    raise DataError(
        f"{root}: expected one Label Studio JSON export, or one per split ({split}.json)"
        + (f"; found {', '.join(p.name for p in exports)}" if exports else "")
    )


def labelstudio_names(exports: list[Path], background: bool) -> list[str]:
    """Classes: the brush label names used in the exports, in alphabetical order (the JSON
    export does not carry the project's labelling config)."""
    names = set()
    for path in exports:
        for task in labelstudio_index(path).tasks.values():
            for result in task.results:
                names.update(str(n) for n in result.get("value", {}).get("brushlabels", []))
    # A brush named "background" is class 0 as the unpainted pixels are, when they are.
    painted_background = BACKGROUND in names
    names.discard(BACKGROUND)
    ordered = ([BACKGROUND] if background or painted_background else []) + sorted(names)
    if len(ordered) > IGNORE_INDEX:
        raise DataError(f"{exports[0].parent}: {len(ordered)} classes; at most 255 fit a mask")
    return ordered


def _images_by_name(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(path.name, []).append(path)
    return found


def labelstudio_pairs(
    root: Path, split: str | None, background: bool, unpaired: list[str] | None = None
) -> tuple[list[tuple[Path, Path]], list[str]]:
    path, exports = labelstudio_files(root, split)
    names = labelstudio_names(exports, background)
    index = labelstudio_index(path)
    folder = path.parent
    images = _images_by_name(folder)
    pairs = []
    for reference in index.tasks:
        name = Path(reference).name
        candidates = (
            ([folder / reference] if (folder / reference).is_file() else [])
            or images.get(name, [])
            or images.get(_UPLOAD_PREFIX.sub("", name), [])
        )
        problem = None
        if not candidates:
            problem = f"{path}: image {reference} not found under {folder}"
        elif len(candidates) > 1:
            problem = f"{path}: image {name} is ambiguous ({', '.join(map(str, candidates[:3]))})"
        if problem is None:
            pairs.append((candidates[0], path))
        elif unpaired is None:
            raise DataError(problem)
        else:
            unpaired.append(problem)
    return pairs, names


def labelstudio_mask(
    index: LabelStudioIndex, image: Path, names: Sequence[str], background: bool
) -> np.ndarray:
    name = image.name
    task = _lookup_by_path(index.tasks, image) or next(
        (
            t
            for ref, t in index.tasks.items()
            if Path(ref).name in (name,) or _UPLOAD_PREFIX.sub("", Path(ref).name) == name
        ),
        None,
    )
    if task is None:
        raise DataError(f"{index.path}: no task for image {image}")
    source = f"{index.path} ({task.image})"
    labels = {n: i for i, n in enumerate(names)}
    size = None
    objects = []
    for order, result in enumerate(task.results):
        value = result.get("value", {})
        height, width = result.get("original_height"), result.get("original_width")
        if not isinstance(height, int) or not isinstance(width, int):
            raise DataError(f"{source}: result {result.get('id')} has no original_height/width")
        if size is not None and size != (height, width):
            raise DataError(f"{source}: results disagree on the image size")
        size = (height, width)
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise DataError(f"{source}: result {result.get('id')} is not an RLE brush")
        try:
            flat = decode_brush_rle(value["rle"])
        except (ValueError, TypeError) as exc:
            raise DataError(f"{source}: result {result.get('id')}: bad brush RLE ({exc})") from None
        if flat.size != height * width * 4:
            raise DataError(
                f"{source}: result {result.get('id')}: brush RLE holds {flat.size} values, "
                f"not {height}×{width}×4 (RGBA)"
            )
        # The brush is stored as an RGBA image; its alpha channel is the painted area.
        mask = flat.reshape(height, width, 4)[..., 3] > 0
        for label_name in value.get("brushlabels", []):
            if str(label_name) not in labels:
                raise DataError(f"{source}: brush label {label_name!r} is not among {list(names)}")
            objects.append((labels[str(label_name)], mask, False, order))
    if size is None:
        size = image_size(image)
    return paint_objects(size[0], size[1], objects, background)
