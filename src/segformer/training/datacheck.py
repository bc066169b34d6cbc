"""Checking a dataset before training on it: one pass over every image header and mask that
collects every problem (not just the first), counts pixels and images per class, and says
what the numbers suggest (a background class at 0, class weights against imbalance).

``check_dataset`` is the library function; ``segformer data check`` prints its report and
``segformer.training.datasets.scan`` (the trainer's and evaluator's pre-flight) raises on its
problems. ``write_preview`` draws random samples with their masks laid over them.
"""

from __future__ import annotations

import os
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segformer.errors import DataError
from segformer.inference.visualize import blend, generate_palette
from segformer.training.datasets import (
    IGNORE_INDEX,
    ScanReport,
    SegmentationDataset,
    outside_label_message,
)

# Problem kinds, in the order they are reported; each stops training.
MISSING = "images without a mask"
UNREADABLE = "unreadable files"
SIZES = "image and mask sizes differ"
COLOUR = "colour masks"
OUTSIDE = "labels outside the label set"
EMPTY = "no labelled pixels"
PROBLEM_KINDS = (MISSING, UNREADABLE, SIZES, COLOUR, OUTSIDE, EMPTY)

# Names that mean "no class" when they are label 0.
BACKGROUND_NAMES = {"background", "_background_", "bg", "unlabeled", "unlabelled", "other", "void"}
# Most pixels of the most frequent class per pixel of the rarest before we call it imbalanced.
IMBALANCE_RATIO = 50.0


@dataclass
class DataCheck:
    """What ``check_dataset`` found. Per train id v (0..255): ``value_pixels[v]`` pixels,
    ``value_images[v]`` images holding it, ``present_pixels[v]`` all pixels of those images."""

    name: str
    images: int
    num_labels: int | None
    labels: list[str] | None
    value_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    value_images: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    present_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    # The train ids each image holds, by dataset index (empty for an unreadable sample).
    image_classes: list[np.ndarray] = field(default_factory=list)
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    @property
    def ignored_pixels(self) -> int:
        return int(self.value_pixels[IGNORE_INDEX])

    def class_count(self) -> int:
        """The label set's size, or (none known) one past the largest label found."""
        if self.num_labels is not None:
            return self.num_labels
        found = np.nonzero(self.value_pixels[:IGNORE_INDEX])[0]
        return int(found.max()) + 1 if len(found) else 0

    def scan_report(self) -> ScanReport:
        k = self.class_count()
        return ScanReport(
            self.checked,
            self.value_pixels[:k].copy(),
            self.present_pixels[:k].copy(),
            self.ignored_pixels,
            [classes[classes < k] for classes in self.image_classes],
        )

    def problem_lines(self) -> list[str]:
        """One line per kind of problem: how many, and the first few."""
        lines = []
        for kind in PROBLEM_KINDS:
            messages = self.problems.get(kind, [])
            if not messages:
                continue
            more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
            lines.append(f"{kind}: {messages[0]}{more}")
        return lines

    def class_name(self, value: int) -> str:
        if self.labels is not None and value < len(self.labels):
            return self.labels[value]
        return f"class {value}"

    def summary_lines(self) -> list[str]:
        """The report ``segformer data check`` prints (problems are printed apart)."""
        lines = [f"{self.name}: {self.images} image/mask pairs, {self.checked} read"]
        k = self.class_count()
        total = max(int(self.value_pixels.sum()), 1)
        if k:
            width = max(len(self.class_name(v)) for v in range(k))
            lines.append(f"  {'id':>3}  {'class':<{width}}  {'pixels':>12}  {'share':>6}  images")
            for value in range(k):
                pixels = int(self.value_pixels[value])
                lines.append(
                    f"  {value:>3}  {self.class_name(value):<{width}}  {pixels:>12,}  "
                    f"{100 * pixels / total:5.1f}%  {int(self.value_images[value])}"
                )
        lines.append(
            f"  ignore (255): {self.ignored_pixels:,} pixels ({100 * self.ignored_pixels / total:.1f}%) "
            f"in {int(self.value_images[IGNORE_INDEX])} images"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


def _is_colour_mask(path: str) -> bool:
    try:
        with Image.open(path) as image:
            if image.mode not in ("RGB", "RGBA"):
                return False
            bands = np.asarray(image.convert("RGB"))
    except (OSError, ValueError):
        return False
    return not (
        np.array_equal(bands[..., 0], bands[..., 1])
        and np.array_equal(bands[..., 0], bands[..., 2])
    )


def _check_one(
    dataset: SegmentationDataset, index: int
) -> tuple[str, str] | tuple[None, np.ndarray]:
    """(kind, message) for a bad sample, or (None, value counts) for a good one."""
    try:
        height, width = dataset.image_size(index)
    except DataError as exc:
        return UNREADABLE, str(exc)
    try:
        label = dataset.read_label(index)
    except DataError as exc:
        if Path(dataset.mask_source(index)).is_file() and _is_colour_mask(
            dataset.mask_source(index)
        ):
            return COLOUR, f"{dataset.mask_source(index)} holds colours, not class indices"
        return UNREADABLE, str(exc)
    if label.shape != (height, width):
        return SIZES, (
            f"{dataset.describe(index)}: image is {width}×{height} but its mask "
            f"{dataset.mask_source(index)} is {label.shape[1]}×{label.shape[0]}"
        )
    return None, np.bincount(label.ravel(), minlength=256)


def check_dataset(
    dataset: SegmentationDataset,
    num_labels: int | None = None,
    *,
    unpaired: list[str] | None = None,
    workers: int = 4,
    advice: bool = True,
) -> DataCheck:
    """Read every mask and image header of ``dataset`` once. ``num_labels``: the size of the
    label set (default: the dataset's own labels, if it has them); labels at or past it
    (other than ignore) are problems. ``unpaired``: images ``open_dataset`` found without a
    mask. With ``advice``, notes on class 0, absent classes and imbalance are added."""
    labels = list(dataset.labels) if dataset.labels is not None else None
    if num_labels is None and labels is not None:
        num_labels = len(labels)
    report = DataCheck(dataset.name, len(dataset), num_labels, labels)
    for message in unpaired or []:
        report.add(MISSING, message)
    if len(dataset) == 0:
        report.add(EMPTY, f"{dataset.name}: the dataset is empty")
        return report
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: _check_one(dataset, i), range(len(dataset)))
        for index, (kind, result) in enumerate(results):
            if kind is not None:
                report.add(kind, result)
                report.image_classes.append(np.zeros(0, np.int64))
                continue
            counts = result
            report.image_classes.append(np.nonzero(counts[:IGNORE_INDEX])[0])
            if num_labels is not None:
                outside = np.nonzero(counts[num_labels:])[0] + num_labels
                outside = outside[outside != dataset.ignore_index]
                if len(outside):
                    report.add(
                        OUTSIDE, outside_label_message(dataset, index, int(outside[0]), num_labels)
                    )
            report.checked += 1
            report.value_pixels += counts
            present = counts > 0
            report.value_images += present
            report.present_pixels += np.where(present, counts.sum(), 0)
    if report.checked and not report.value_pixels[:IGNORE_INDEX].any():
        report.add(EMPTY, f"{dataset.name}: every mask is entirely ignore (255)")
    if advice and report.checked:
        report.notes.extend(_advice(report, dataset))
    return report


def _advice(report: DataCheck, dataset: SegmentationDataset) -> list[str]:
    notes = []
    k = report.class_count()
    if k == 0:
        return notes
    if report.labels is None:
        notes.append(
            f"no class names: labels 0..{k - 1} are in use; name them with a labels JSON "
            "(--labels, or labels.json at the dataset root)"
        )
    # Class 0: many datasets store "nothing / background" there.
    zero_images = int(report.value_images[0])
    zero_share = report.value_pixels[0] / max(int(report.value_pixels[:k].sum()), 1)
    named = report.labels is not None and report.labels[0].strip().lower() in BACKGROUND_NAMES
    counts = report.value_pixels[:k]
    looks = zero_images >= 0.9 * report.checked and counts[0] == counts.max()
    if (named or looks) and zero_images:
        why = (
            f"named {report.labels[0]!r}"
            if named
            else f"in {zero_images} of {report.checked} images and the largest class"
        )
        notes.append(
            f"label 0 looks like a background class ({why}, {100 * zero_share:.1f}% of labelled "
            f"pixels): it is trained as a class; reduce_labels would ignore it instead "
            f"(0 → 255, k → k−1, {k - 1} classes)"
        )
    absent = [report.class_name(v) for v in range(k) if report.value_pixels[v] == 0]
    if absent:
        notes.append(f"classes never present: {', '.join(absent)}")
    used = np.nonzero(counts)[0]
    if len(used) > 1:
        rare, common = int(used[np.argmin(counts[used])]), int(np.argmax(counts))
        ratio = float(counts[common] / counts[rare])
        weights = report.scan_report().class_weights("median-frequency")
        imbalanced = ratio >= IMBALANCE_RATIO
        notes.append(
            (
                f"class imbalance: {report.class_name(common)} has {ratio:.0f}× the pixels of "
                f"{report.class_name(rare)}; consider class_weights: median-frequency, which gives "
                if imbalanced
                else "median-frequency class weights would be "
            )
            + "["
            + ", ".join(f"{w:.3g}" for w in weights)
            + "]"
        )
    return notes


# ---------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------
def write_preview(
    dataset: SegmentationDataset,
    path: str | os.PathLike[str],
    samples: int = 8,
    seed: int = 0,
    columns: int = 4,
    tile_height: int = 180,
    palette: list[list[int]] | None = None,
) -> Path:
    """A PNG grid of ``samples`` random images (fixed by ``seed``) with their masks laid over
    them at half opacity and their file names; ignored pixels are grey. Samples that cannot
    be read are skipped. Written through a temporary file, then renamed."""
    path = Path(path)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    colours = np.zeros((256, 3), np.uint8)
    colours[:] = generate_palette(256)
    given = palette or dataset.palette
    if given is not None:
        colours[: len(given)] = np.asarray(given, np.uint8)
    colours[IGNORE_INDEX] = (128, 128, 128)
    tiles = []
    for index in order:
        if len(tiles) == samples:
            break
        try:
            image, label = dataset.load(index)
        except DataError:
            continue
        tile = blend(Image.fromarray(image), label, colours, opacity=0.5)
        width = max(1, round(tile.width * tile_height / tile.height))
        tile = tile.resize((width, tile_height), Image.Resampling.BILINEAR)
        ImageDraw.Draw(tile).text((4, 4), Path(dataset.describe(index)).name, fill=(255, 255, 255))
        tiles.append(tile)
    if not tiles:
        raise DataError(f"{dataset.name}: no sample could be read for the preview")
    columns = min(columns, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    cell = max(t.width for t in tiles)
    grid = Image.new("RGB", (columns * cell, rows * tile_height), (32, 33, 36))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * cell, (i // columns) * tile_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            grid.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def scan(dataset: SegmentationDataset, num_labels: int, workers: int = 4) -> ScanReport:
    """Read every mask (and every image header) once; raise DataError naming the bad files,
    one kind of problem after another: unreadable, image/mask sizes differ, colour masks,
    labels ≥ ``num_labels`` other than ignore. The checks are those of ``segformer data
    check`` (``check_dataset``)."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.name}: the dataset is empty")
    report = check_dataset(dataset, num_labels, workers=workers, advice=False)
    problems = [
        line for line in report.problem_lines() if not line.startswith("no labelled pixels")
    ]
    if problems:
        raise DataError("; ".join(problems))
    return report.scan_report()
