"""Writing any readable dataset in the canonical folder layout, the one the ``folder`` format
reads with names and colours:

    OUT/images/<split>/<name>.<ext>   the images, byte for byte (or PNG when not from a file)
    OUT/masks/<split>/<name>.png      train ids 0..K−1, 255 = ignore, as palette PNGs
    OUT/labels.json                   {"labels": [...], "palette": [[r, g, b], ...]}

Everything is written into a temporary folder beside OUT and renamed to OUT at the end, so
OUT either appears complete or not at all; OUT must not exist yet, nor lie inside the input
(or the input inside it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segformer.errors import DataError
from segformer.inference.visualize import generate_palette
from segformer.training.datasets import IMAGE_SUFFIXES, SegmentationDataset

log = logging.getLogger("segformer")


@dataclass
class Converted:
    out: Path
    splits: dict[str, int]  # split → images written
    labels: list[str]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(out: Path, sources: Sequence[Path]) -> None:
    out = out.expanduser().resolve()
    if out.exists():
        raise DataError(f"{out}: already exists; give a new folder to write the dataset to")
    for source in sources:
        source = source.expanduser().resolve()
        folder = source if source.is_dir() else source.parent
        if _inside(out, folder) or _inside(folder, out):
            raise DataError(
                f"{out}: inside the input dataset {folder}; write the converted dataset elsewhere"
            )


def _mask_png(label: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.fromarray(label, mode="L").convert("P")
    image.putpalette(palette.reshape(-1).tolist())
    return image


def _unique_name(stem: str, taken: set[str]) -> str:
    name, number = stem, 2
    while name in taken:  # the same file name in two source folders
        name, number = f"{stem}_{number}", number + 1
    taken.add(name)
    return name


def convert_dataset(
    datasets: dict[str, SegmentationDataset],
    out: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    sources: Sequence[Path] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Converted:
    """Write ``datasets`` (split name → dataset, as ``open_dataset`` returns them) to ``out``.
    Class names and colours: ``labels``/``palette`` when given, else the datasets'; without
    names, ``class_<k>`` up to the largest label found. Any mask that cannot be read, or does
    not fit its image, stops the conversion with nothing written."""
    out = Path(out).expanduser()
    check_destination(out, sources)
    first = next(iter(datasets.values()))
    names = list(labels) if labels is not None else (list(first.labels) if first.labels else None)
    colours = palette if palette is not None else (first.palette if labels is None else None)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}-tmp-"))
    try:
        written: dict[str, int] = {}
        largest = -1
        table = np.zeros((256, 3), np.uint8)
        table[:] = generate_palette(256)
        if colours is not None:
            table[: len(colours)] = np.asarray(colours, np.uint8)
        table[255] = (255, 255, 255)
        for split, dataset in datasets.items():
            image_dir, mask_dir = staging / "images" / split, staging / "masks" / split
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            taken: set[str] = set()
            for index in range(len(dataset)):
                image, label = dataset.load(index)  # decoded, so sizes and labels are checked
                top = int(label[label != 255].max(initial=0)) if (label != 255).any() else -1
                if names is not None and top >= len(names):
                    raise DataError(
                        f"{dataset.mask_source(index)}: label {top}, but there are {len(names)} classes"
                    )
                largest = max(largest, top)
                source = Path(dataset.describe(index))
                name = _unique_name(source.stem, taken)
                if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
                    # The same bytes: the image (and its EXIF orientation) reads back unchanged.
                    shutil.copyfile(source, image_dir / f"{name}{source.suffix.lower()}")
                else:
                    Image.fromarray(image).save(image_dir / f"{name}.png")
                _mask_png(label, table).save(mask_dir / f"{name}.png")
                if progress is not None:
                    progress(split, index + 1, len(dataset))
            written[split] = len(dataset)
        if names is None:
            names = [f"class_{k}" for k in range(largest + 1)]
            log.warning("no class names: writing %d generic ones", len(names))
        info = {"labels": names, "palette": table[: len(names)].tolist()}
        (staging / "labels.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Converted(out, written, names)
