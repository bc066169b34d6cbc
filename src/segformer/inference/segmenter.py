"""Segment images for people: ``Segmenter`` turns photos into label maps at their original size,
with class names, the share of the picture each class covers, per-stage timings, and
pictures (overlay with legend, coloured map, palette PNG) ready to look at or save.

    from segformer import Segmenter
    segmenter = Segmenter.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512")
    result = segmenter("street.jpg")             # or a PIL image, numpy array, bytes, a list …
    result.classes[0]                            # ClassShare(id=6, name='road', share=0.41, …)
    result.overlay().show()
    result.save("out", "street")                 # street.png, street_overlay.png, street.json

The command line (``segformer predict``) and the web server call exactly this API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from segformer.errors import CheckpointError, ImageError, SegformerError
from segformer.inference import visualize
from segformer.inference.backends.base import Engine
from segformer.inference.domain import DomainCheck
from segformer.inference.engine import create_engine, resolve_device
from segformer.inference.modes import InferenceMode, predict_labels_scored
from segformer.inference.processing import (
    DEFAULT_MAX_PIXELS,
    ImageProcessor,
    ImageSource,
    read_image,
)
from segformer.models.macs import count_macs
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.weights.builtin import DEFAULT_MODEL
from segformer.weights.checkpoints import load_segmentation_model


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassShare:
    """One class present in a label map: its id and name, how many pixels it covers and what
    share of the image that is (0–1), and its colour in the overlay."""

    id: int
    name: str
    pixels: int
    share: float
    color: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "pixels": self.pixels,
            "share": self.share,
            "color": list(self.color),
        }


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds spent per stage for one image. Images that go through the model as one
    batch share the batch's model and post-processing time equally."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    model_ms: float = 0.0
    postprocess_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.preprocess_ms + self.model_ms + self.postprocess_ms

    def to_dict(self) -> dict[str, float]:
        data = {f.name: round(getattr(self, f.name), 3) for f in dataclasses.fields(self)}
        data["total_ms"] = round(self.total_ms, 3)
        return data


def class_shares(labels: np.ndarray, names: Sequence[str], palette: np.ndarray) -> list[ClassShare]:
    """The classes present in ``labels``, largest area first."""
    counts = np.bincount(labels.ravel(), minlength=len(names))
    total = max(int(labels.size), 1)
    present = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    return [
        ClassShare(
            id=int(i),
            name=names[i] if i < len(names) else f"class_{i}",
            pixels=int(counts[i]),
            share=float(counts[i]) / total,
            color=tuple(int(c) for c in palette[i]) if i < len(palette) else (0, 0, 0),
        )
        for i in present
    ]


@dataclass
class SegmentationResult:
    """What a ``Segmenter`` returns for one image.

    ``labels``: (height, width) class ids at the image's original size (uint8, or uint16 for
    models with more than 256 classes). ``classes``: the classes present, largest first.
    ``timings``: per-stage milliseconds. ``image``: the decoded RGB picture. ``label_names`` /
    ``palette``: the model's classes and their colours. ``source``: the file name when the
    image came from a file. ``domain``: what the model is for, in words. ``domain_score``: how
    unlike the model's training pictures this one looks (see ``segformer.inference.domain``);
    ``out_of_domain``: True when the score is above the model's threshold, so that the labels
    are likely wrong. Both are None for models without a measured threshold."""

    labels: np.ndarray
    image: Image.Image
    classes: list[ClassShare]
    timings: StageTimings
    label_names: list[str]
    palette: np.ndarray
    model_name: str
    source: str | None = None
    mode: str = "whole"
    domain: str | None = None
    domain_score: float | None = None
    out_of_domain: bool | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL gives image sizes."""
        return (int(self.labels.shape[1]), int(self.labels.shape[0]))

    @property
    def width(self) -> int:
        return int(self.labels.shape[1])

    @property
    def height(self) -> int:
        return int(self.labels.shape[0])

    def overlay(
        self, opacity: float = 0.5, legend: bool | str = True, outline: bool = True
    ) -> Image.Image:
        """The photo with class colours blended in at ``opacity``; with ``legend`` a panel on
        the right lists each class present with its colour and area (``legend="inside"``
        draws it over the top-left corner instead, keeping the image size)."""
        return visualize.overlay(
            self.image, self.labels, self.palette, self.classes, opacity, legend, outline
        )

    def colored(self) -> Image.Image:
        """The label map in class colours (RGB)."""
        return visualize.colorize(self.labels, self.palette)

    def label_png(self) -> bytes:
        """The label map as PNG bytes: palette-indexed 8-bit (pixel value = class id, shown in
        class colours by any viewer), or 16-bit greyscale for more than 256 classes."""
        return encode_label_png(self.labels, self.palette)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the pixels, JSON-ready."""
        return {
            "source": self.source,
            "model": self.model_name,
            "mode": self.mode,
            "width": self.width,
            "height": self.height,
            "num_labels": len(self.label_names),
            "domain": self.domain,
            "out_of_domain": self.out_of_domain,
            "domain_score": None if self.domain_score is None else round(self.domain_score, 4),
            "classes": [c.to_dict() for c in self.classes],
            "timings": self.timings.to_dict(),
        }

    def save(
        self,
        out_dir: str | os.PathLike,
        stem: str,
        opacity: float = 0.5,
        overlay: bool = True,
        legend: bool | str = True,
        kinds: Sequence[str] | None = None,
    ) -> dict[str, Path]:
        """Write ``<stem>.png`` (label map, see ``label_png``), ``<stem>_overlay.png`` (unless
        ``overlay=False``) and ``<stem>.json`` (``to_dict`` plus the file names) into
        ``out_dir``; ``kinds`` (a subset of ``"labels"``, ``"overlay"``, ``"json"``) picks
        the files instead. ``stem`` may contain folders (``"a/b/photo"``). Each file appears
        whole or not at all. Returns the paths by kind."""
        if kinds is None:
            kinds = ("labels", "overlay", "json") if overlay else ("labels", "json")
        base = Path(out_dir) / stem
        base.parent.mkdir(parents=True, exist_ok=True)
        names = {"labels": ".png", "overlay": "_overlay.png", "json": ".json"}
        paths = {kind: base.with_name(base.name + names[kind]) for kind in names if kind in kinds}
        if "labels" in paths:
            write_atomic(paths["labels"], self.label_png())
        if "overlay" in paths:
            picture = self.overlay(opacity, legend)
            # zlib level 1: half the encoding time of level 4 for files ~5 % larger (a 480×360
            # photo: 15 vs 28 ms), and encoding is most of the time an overlay costs.
            write_atomic(
                paths["overlay"], lambda f: picture.save(f, format="PNG", compress_level=1)
            )
        if "json" in paths:
            record = self.to_dict()
            record["files"] = {kind: path.name for kind, path in paths.items() if kind != "json"}
            write_atomic(paths["json"], (json.dumps(record, indent=2) + "\n").encode())
        return paths


def encode_label_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """PNG bytes for a label map; see ``SegmentationResult.label_png``."""
    buffer = io.BytesIO()
    if len(palette) <= 256 and labels.max(initial=0) < 256:
        picture = Image.fromarray(labels.astype(np.uint8, copy=False), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(palette)] = palette
        picture.putpalette(flat.ravel().tolist())
    else:
        picture = Image.fromarray(labels.astype(np.uint16, copy=False))  # 16-bit greyscale PNG
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[Any], None]) -> Path:
    """Write ``data`` (bytes, or a function given the open binary file) to ``path`` through a
    temporary file in the same folder and ``os.replace``: readers see the old file or the
    whole new one, never a part, even if this process is interrupted."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        if callable(data):
            data(file)
        else:
            file.write(data)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same extension, so format-sniffing writers work) that
    replaces ``path`` when the block succeeds and is removed when it fails or is interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            # Created like any new file (mode 0666 less the umask), unlike mkstemp's 0600.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------
def model_info(
    model: SegformerForSemanticSegmentation,
    name: str | None = None,
    *,
    processor: ImageProcessor | None = None,
    macs_at: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A model described for people and programs (JSON-ready): name, variant, parameters,
    labels, palette and where its colours come from, preprocessing, source, checkpoint format,
    licence and metrics when known; with ``macs_at=(height, width)`` also its multiply-
    accumulates at that size (see ``segformer.inference.modes.count_macs``)."""

    meta = model.metadata
    labels = list(model.labels)
    processor = processor or ImageProcessor.from_model(model)
    info: dict[str, Any] = {
        "name": name or meta.name or meta.source,
        "variant": model.config.variant or "custom",
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_labels": len(labels),
        "labels": labels,
        "palette": visualize.palette_for(labels, meta.palette).tolist(),
        "palette_source": visualize.palette_name(labels, meta.palette),
        "preprocessing": processor.to_dict(),
        "domain": meta.domain,
        "out_of_domain": meta.out_of_domain,
        "source": meta.source,
        "format": meta.format,
        "license": meta.license,
        "metrics": meta.metrics,
    }
    if macs_at is not None:
        info["macs"] = {
            "height": macs_at[0],
            "width": macs_at[1],
            "macs": count_macs(model, macs_at),  # the architecture as published
            "macs_computed": count_macs(model, macs_at, as_published=False),  # what runs here
        }
    return info


class _TimedEngine:
    """Wraps an engine to add up the time spent inside it (synchronising CUDA so that the time
    is the model's, not the launch's)."""

    def __init__(self, engine: Callable[[Tensor], Tensor], device: str) -> None:
        self.engine = engine
        self.cuda = device.startswith("cuda")
        self.seconds = 0.0

    def __call__(self, pixel_values: Tensor) -> Tensor:
        start = time.perf_counter()
        logits = self.engine(pixel_values)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return logits


@dataclass
class _Decoded:
    """One input after the background thread's work: decoded and preprocessed, or an error."""

    image: Image.Image | None
    source: str | None
    decode_ms: float = 0.0
    pixel_values: Tensor | None = None  # (3, H, W)
    preprocess_ms: float = 0.0
    error: SegformerError | None = None


def _source_name(source: Any) -> str | None:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


def _is_single(images: Any) -> bool:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim in (2, 3)  # one image; (N, H, W, C) or (N, C, H, W) is a batch
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))


class Segmenter:
    """A model ready to segment images: its processor, an inference engine, the inference mode
    and the class palette, bundled.

    ``Segmenter(model, processor=None, *, device="auto", precision="fp32", backend="auto",
    mode="whole", batch_size=None, max_pixels=..., name=None, engine=None, reduced_decode=False,
    **mode_options)``;
    usually built with ``Segmenter.from_pretrained``. ``engine``: an existing engine for this
    model to share (``backend`` and ``precision`` are then its own). ``mode``: ``"whole"``, ``"slide"`` or an ``InferenceMode``;
    ``mode_options``: its fields (``crop_size``, ``stride``, ``scales``, ``flip``, ``average``).
    In slide mode images keep their full resolution (the processor's fixed-size resize is
    turned off; a keep-ratio rescale is kept) and the crop defaults to the model's training
    size. ``max_pixels``: larger images are refused (``None``: no limit). ``batch_size``:
    images per engine call (default: 1 on a CPU, 4 on a GPU). ``reduced_decode``: decode
    JPEG files at the largest of libjpeg's reductions (1/2, 1/4, 1/8) that is still at least
    the model's input size (``read_image``'s ``reduce_for``): much faster for photos several
    times larger than the input, at the price of results (labels, overlay) at the decoded
    size and labels that differ from a full decode's on a small share of pixels.

    Call it on one image (path, bytes, PIL image, HxWx3 uint8 array) to get a
    ``SegmentationResult``, or on a list to get a list; lists are processed ``batch_size``
    images at a time. ``imap`` streams results for long lists and can report bad files
    instead of stopping at the first.
    """

    def __init__(
        self,
        model: SegformerForSemanticSegmentation,
        processor: ImageProcessor | None = None,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        backend: str = "auto",
        mode: str | InferenceMode = "whole",
        batch_size: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        name: str | None = None,
        engine: Engine | None = None,
        reduced_decode: bool = False,
        **mode_options: Any,
    ) -> None:
        if not isinstance(model, SegformerForSemanticSegmentation):
            raise CheckpointError(
                f"Segmenter needs a semantic-segmentation model, not {type(model).__name__}"
            )
        if batch_size is not None and batch_size < 1:
            raise SegformerError("batch_size must be at least 1")
        if isinstance(mode, InferenceMode):
            inference_mode = dataclasses.replace(mode, **mode_options) if mode_options else mode
        else:
            inference_mode = InferenceMode(mode=mode, **mode_options)
        processor = processor if processor is not None else ImageProcessor.from_model(model)
        if inference_mode.mode == "slide":
            inference_mode = inference_mode.with_defaults(tuple(processor.size))
            if processor.do_resize and not (processor.keep_ratio or processor.shortest_edge):
                # A fixed-size resize would undo the point of sliding: keep full resolution.
                processor = processor.replace(do_resize=False)
        self.model = model
        self.device = str(resolve_device(device))
        # A given engine (another Segmenter's, for another mode) is shared rather than built
        # again: a compiled program or onnxruntime session is loaded once per model.
        self.engine = engine or create_engine(
            model, backend=backend, precision=precision, device=self.device
        )
        self.processor = processor
        self.mode = inference_mode
        # On a CPU one image per call is as fast as four and needs less memory (B0, 480×360,
        # OpenVINO: 17.5 vs 16.2 images/s, peak 560 vs 720 MB); a GPU wants batches.
        self.batch_size = batch_size or (4 if self.device.startswith("cuda") else 1)
        self.max_pixels = max_pixels
        self.reduced_decode = reduced_decode
        self.name = name or str(model.metadata.name or model.metadata.source or "segformer")
        self.labels: list[str] = list(model.labels)
        self.palette: np.ndarray = visualize.palette_for(self.labels, model.metadata.palette)
        self._label_dtype = np.uint8 if len(self.labels) <= 256 else np.uint16
        self.domain: str | None = model.metadata.domain
        self.domain_check: DomainCheck | None = DomainCheck.from_metadata(model.metadata)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        mode: str | InferenceMode = "whole",
        backend: str = "auto",
        revision: str | None = None,
        **options: Any,
    ) -> Segmenter:
        """Load a model (built-in name, checkpoint file, Hugging Face folder or hub id — anything
        ``segformer.load`` takes; ``None``: the package's built-in model) and wrap it. Other
        options go to ``Segmenter(...)`` (``batch_size``, ``max_pixels``, ``crop_size`` …)."""

        model = load_segmentation_model(name_or_path, revision=revision)
        options.setdefault("name", str(name_or_path or DEFAULT_MODEL))
        return cls(model, device=device, precision=precision, backend=backend, mode=mode, **options)

    # -- describing ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What this segmenter runs: ``model_info`` plus the inference mode, device, engine
        backend and precision, and whether JPEGs are decoded reduced. JSON-ready."""
        data = model_info(self.model, self.name, processor=self.processor)
        data.update(
            {
                "mode": self.mode.to_dict(),
                "device": self.device,
                "backend": getattr(self.engine, "backend", type(self.engine).__name__),
                "precision": getattr(self.engine, "precision", None),
                "reduced_decode": self.reduced_decode,
            }
        )
        return data

    def __repr__(self) -> str:
        return (
            f"Segmenter({self.name!r}, {len(self.labels)} labels, {self.mode.describe()}, "
            f"device={self.device!r}, backend={getattr(self.engine, 'backend', '?')!r})"
        )

    # -- running ---------------------------------------------------------------------------
    def __call__(
        self, images: ImageSource | Sequence[ImageSource], *, batch_size: int | None = None
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image (→ a result) or a sequence of images (→ a list of results, in
        order). Raises ``ImageError`` for the first image that cannot be read."""
        if _is_single(images):
            (result,) = self.imap([images], batch_size=1)  # runs the generator to its end
            return result  # type: ignore[return-value]
        return list(self.imap(images, batch_size=batch_size))  # type: ignore[arg-type]

    def imap(
        self, images: Iterable[ImageSource], *, batch_size: int | None = None, errors: str = "raise"
    ) -> Iterator[SegmentationResult | SegformerError]:
        """Results one by one, in input order, for any number of images. The next batch is
        decoded and preprocessed in a background thread while the model works on this one. ``errors="raise"``
        stops at an unreadable image; ``errors="return"`` yields its ``ImageError`` in its place
        and goes on with the others."""
        if errors not in ("raise", "return"):
            raise ValueError("errors must be 'raise' or 'return'")
        size = batch_size or self.batch_size
        pending: deque[Future[_Decoded]] = deque()
        sources = iter(images)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segformer-decode") as pool:

            def fill() -> None:
                while len(pending) < size:  # one batch ahead: bounded memory
                    try:
                        source = next(sources)
                    except StopIteration:
                        return
                    pending.append(pool.submit(self._decode, source))

            fill()
            while pending:
                batch = [pending.popleft().result() for _ in range(min(size, len(pending)))]
                fill()  # decode the next batch while this one runs
                good = [d for d in batch if d.error is None]
                results = iter(self._segment_decoded(good)) if good else iter(())
                for decoded in batch:
                    if decoded.error is None:
                        yield next(results)
                    elif errors == "raise":
                        raise decoded.error
                    else:
                        yield decoded.error

    def _decode(self, source: ImageSource) -> _Decoded:
        """Decode and preprocess one input (runs in the background thread)."""
        name = _source_name(source)
        start = time.perf_counter()
        try:
            image = read_image(
                source,
                max_pixels=self.max_pixels,
                name=name,
                reduce_for=self._input_size if self.reduced_decode else None,
            )
            self._check_size(image, name)
        except SegformerError as exc:
            return _Decoded(None, name, error=exc)
        decoded = time.perf_counter()
        resized = self.processor.resize(
            image, self.processor.output_size(image.height, image.width)
        )
        pixel_values = self.processor.normalize(np.asarray(resized))
        done = time.perf_counter()
        return _Decoded(
            image, name, (decoded - start) * 1000, pixel_values, (done - decoded) * 1000
        )

    def _input_size(self, height: int, width: int) -> tuple[int, int]:
        """The largest (height, width) the model reads an image of this size at: the
        processor's size times the largest test-time scale."""
        resized = self.processor.output_size(height, width)
        largest = max(self.mode.scales)
        return (math.ceil(resized[0] * largest), math.ceil(resized[1] * largest))

    def _check_size(self, image: Image.Image, name: str | None) -> None:
        """Refuse, with a clear message, an image the model cannot take in this mode (the
        encoder's strided convs need a minimum side)."""
        height, width = self.processor.output_size(image.height, image.width)
        side = min(height, width)
        if self.mode.mode == "slide":
            side = min(side, *self.mode.window[0])
        side = int(side * min(self.mode.scales) + 0.5)
        needed = self.model.encoder.min_size
        if side < needed:
            raise ImageError(
                f"{name or '<image>'}: {image.width}×{image.height} is too small for this model in "
                f"{self.mode.describe()} mode (the network needs at least {needed} pixels per side)"
            )

    def _segment_decoded(self, decoded: list[_Decoded]) -> list[SegmentationResult]:
        results: list[SegmentationResult] = []
        # Neighbouring images whose tensors share a shape go through the engine together.
        i = 0
        while i < len(decoded):
            shape = decoded[i].pixel_values.shape  # type: ignore[union-attr]
            j = i + 1
            while j < len(decoded) and decoded[j].pixel_values.shape == shape:  # type: ignore[union-attr]
                j += 1
            group = decoded[i:j]
            pixel_values = torch.stack([d.pixel_values for d in group])  # type: ignore[misc]
            results.extend(self._run_group(group, pixel_values))
            i = j
        return results

    def _run_group(self, decoded: list[_Decoded], pixel_values: Tensor) -> list[SegmentationResult]:
        timed = _TimedEngine(self.engine, self.device)
        start = time.perf_counter()
        sizes = [(d.image.height, d.image.width) for d in decoded]  # type: ignore[union-attr]
        check = self.domain_check
        label_maps, scores = predict_labels_scored(
            timed, pixel_values, self.mode, sizes, check.scores if check else None
        )
        label_maps = [
            m.to("cpu", torch.uint8 if self._label_dtype is np.uint8 else torch.int32).numpy()
            for m in label_maps
        ]
        inference_s = time.perf_counter() - start
        count = len(decoded)
        model_ms = timed.seconds * 1000 / count
        shared_post_ms = (inference_s - timed.seconds) * 1000 / count
        results = []
        for i, (d, labels) in enumerate(zip(decoded, label_maps, strict=True)):
            start = time.perf_counter()
            score = scores[i] if scores is not None else None
            labels = labels.astype(self._label_dtype, copy=False)
            classes = class_shares(labels, self.labels, self.palette)
            post_ms = shared_post_ms + (time.perf_counter() - start) * 1000
            results.append(
                SegmentationResult(
                    labels=labels,
                    image=d.image,  # type: ignore[arg-type]
                    classes=classes,
                    timings=StageTimings(d.decode_ms, d.preprocess_ms, model_ms, post_ms),
                    label_names=self.labels,
                    palette=self.palette,
                    model_name=self.name,
                    source=d.source,
                    mode=self.mode.describe(),
                    domain=self.domain,
                    domain_score=score,
                    out_of_domain=check.flags(score) if check and score is not None else None,
                )
            )
        return results


__all__ = [
    "ClassShare",
    "SegmentationResult",
    "Segmenter",
    "StageTimings",
    "atomic_path",
    "class_shares",
    "encode_label_png",
    "write_atomic",
]
