"""int8 post-training quantization of a SegFormer with OpenVINO and NNCF, checked for accuracy.

``quantize(model, calibration, validation)`` converts the model's ``FastSegformer`` graph
(the exact re-associated forward pass every fast engine runs) to OpenVINO, quantizes it with
NNCF on calibration images preprocessed exactly as prediction does, then scores the fp32
model and the int8 IR on a labelled validation split through the prediction path
(``Segmenter``, full-resolution labels) and returns both results with their pixel agreement.
``write_quantized`` writes a model folder: the model in Hugging Face layout
(``segformer.save``), ``openvino_int8.xml`` / ``.bin`` and ``quantization.json``, all at once
or not at all, and refuses when int8 loses more than ``max_drop`` mIoU points.

The recipe (``RECIPE``; measured on CamVid val with the built-in camvid-b0: 99.80% label
agreement with fp32, mIoU 67.27 vs 67.26, from 100 CamVid train images):

- ``model_type=TRANSFORMER``, ``preset=MIXED`` (symmetric weights, asymmetric activations;
  the PERFORMANCE preset's symmetric activations drop agreement to 22%: the activations after
  GELU and the attention softmax are far from zero-centred).
- SmoothQuant off for MatMuls and convolutions. It is NNCF's TRANSFORMER default (alpha 0.95)
  and wrecks this graph (22% agreement; 47% at alpha 0.5).
- Per-tensor activation ranges. NNCF's CPU config allows per-channel ranges on a depthwise
  conv's input and takes axis 1 as the channel axis; in our token layout (B, N, C) that is
  the token axis, so the ranges would be [1, N, 1] tensors that tie the IR to the
  calibration size (another input size then fails to reshape) and are wrong in principle.
- Kept in float: the decoder (its folded per-stage projections and classifier, where the
  class scores are decided) and the first 7×7 patch-embedding conv (it sees raw pixels).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nncf
import numpy as np
import openvino as ov
import torch
from nncf.quantization.advanced_parameters import (
    AdvancedQuantizationParameters,
    AdvancedSmoothQuantParameters,
    QuantizationParameters,
)
from tqdm.auto import tqdm

import segformer
from segformer.errors import AccuracyError, CheckpointError, DataError, InputError, SegformerError
from segformer.inference.backends.openvino import OpenVinoEngine, convert
from segformer.inference.processing import ImageProcessor, read_image
from segformer.inference.segmenter import Segmenter
from segformer.models.fast import FastSegformer
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.training.datasets import SegmentationDataset
from segformer.training.metrics import ConfusionMatrix, SegmentationMetrics
from segformer.weights.checkpoints import save

log = logging.getLogger("segformer")

# What a quantized model folder holds besides the model itself. The inference backend runs
# IR_XML when a loaded folder has it.
IR_XML = "openvino_int8.xml"
IR_BIN = "openvino_int8.bin"
REPORT_JSON = "quantization.json"
INPUT_NAME = "pixel_values"  # float32 (B, 3, H, W), every dimension but channels dynamic
OUTPUT_NAME = "logits"  # float32 (B, K, ceil(H/4), ceil(W/4))

# OpenVINO node-name patterns of the converted graph; the names come from FastSegformer's
# module paths, so they hold for every variant and set of weights.
IGNORED_PATTERNS = (
    r"__module\.decoder/.*",
    r"__module\.encoder\.stages\.0\.patch_embed\.proj/.*",
)
RECIPE: dict[str, Any] = {
    "method": "nncf.quantize (post-training, int8)",
    "model_type": "TRANSFORMER",
    "preset": "MIXED",
    "smooth_quant": "off (matmul and convolution alphas -1)",
    "activation_ranges": "per-tensor",
    "fast_bias_correction": True,
    "ignored_patterns": list(IGNORED_PATTERNS),
}
# The conversion must be exact before quantization is judged: FastSegformer in OpenVINO fp32
# against PyTorch is ~3e-7 relative error.
CONVERSION_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------
# Conversion and quantization
# ---------------------------------------------------------------------------------------
def pixel_values(processor: ImageProcessor, image: np.ndarray) -> np.ndarray:
    """One image as the model's (1, 3, H, W) float32 input, resized and normalised exactly as
    ``Segmenter`` (and so ``segformer predict``) does it."""
    picture = read_image(image)
    resized = processor.resize(picture, processor.output_size(picture.height, picture.width))
    return processor.normalize(np.asarray(resized))[None].numpy()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """‖other − reference‖ / ‖reference‖ over the whole tensor."""
    reference, other = reference.double(), other.double()
    return float((other - reference).norm() / reference.norm().clamp_min(1e-30))


def check_conversion(
    ir: ov.Model, model: SegformerForSemanticSegmentation, sample: np.ndarray
) -> float:
    """The fp32 IR's logits against PyTorch's on ``sample``; raises when they differ by more
    than rounding. Returns the relative error."""
    with torch.no_grad():
        expected = FastSegformer(model)(torch.from_numpy(sample))
    got = OpenVinoEngine(None, "fp32", program=ir, cache=False)(torch.from_numpy(sample))
    error = relative_error(expected, got)
    if not error <= CONVERSION_TOLERANCE:
        raise AccuracyError(
            f"the OpenVINO conversion changed the logits (relative error {error:.1e}, "
            f"allowed {CONVERSION_TOLERANCE:.0e}); nothing was quantized"
        )
    return error


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs one INFO line per op it leaves unquantized (hundreds, the ignored scope by
    design); only show them when segformer itself logs at DEBUG (``segformer -v``)."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    if not log.isEnabledFor(logging.DEBUG):
        nncf_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_log.setLevel(level)


def quantize_ir(ir: ov.Model, calibration: list[np.ndarray]) -> ov.Model:
    """The recipe of the module docstring applied to an fp32 IR; every calibration input is
    used. Returns the int8 ``openvino.Model``."""
    advanced = AdvancedQuantizationParameters(
        activations_quantization_params=QuantizationParameters(per_channel=False),
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1, convolution=-1),
    )
    with _quiet_nncf():
        quantized = nncf.quantize(
            ir,
            nncf.Dataset(calibration),
            preset=nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            fast_bias_correction=True,
            ignored_scope=nncf.IgnoredScope(patterns=list(IGNORED_PATTERNS)),
            advanced_parameters=advanced,
        )
    check_any_size(quantized)
    return quantized


def check_any_size(
    ir: ov.Model, shapes: tuple[tuple[int, ...], ...] = ((2, 3, 96, 160), (1, 3, 333, 517))
) -> None:
    """Raise if the IR cannot take other input sizes than the calibration images' (some
    quantizer constant would then depend on their size)."""
    for shape in shapes:
        try:
            ir.clone().reshape({0: list(shape)})
        except Exception as exc:  # OpenVINO raises a bare RuntimeError on inconsistent shapes
            raise SegformerError(
                f"the quantized model only takes the calibration images' size "
                f"({str(exc).splitlines()[0]})"
            ) from None


# ---------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------
def pick(count: int, samples: int | None, seed: int) -> list[int]:
    """``samples`` indices of ``range(count)``, a fixed random choice (all when None or more
    than there are), in order."""
    if samples is None or samples >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), samples))


def compare(
    model: SegformerForSemanticSegmentation,
    engine: OpenVinoEngine,
    dataset: SegmentationDataset,
    indices: list[int],
    processor: ImageProcessor,
    progress: bool = False,
) -> tuple[SegmentationMetrics, SegmentationMetrics, float]:
    """Metrics of the PyTorch model in fp32 and of ``engine`` on ``dataset[indices]``, both
    through ``Segmenter`` (labels at each label map's size, as ``segformer eval`` scores
    them), and the share of all pixels where their labels agree."""
    names = list(model.labels)
    runs = {
        "fp32": Segmenter(model, processor, device="cpu", backend="fast", max_pixels=None),
        "int8": Segmenter(model, processor, device="cpu", engine=engine, max_pixels=None),
    }
    confusion = {name: ConfusionMatrix(len(names)) for name in runs}
    agree = total = 0
    for index in tqdm(indices, desc="fp32 vs int8", unit="image", disable=not progress):
        item = dataset[index]
        image = item["image"].numpy()
        predicted = {name: run(image).labels for name, run in runs.items()}
        agree += int((predicted["fp32"] == predicted["int8"]).sum())
        total += predicted["fp32"].size
        for name, labels in predicted.items():
            try:
                confusion[name].update(torch.from_numpy(labels.astype(np.int64)), item["labels"])
            except ValueError as exc:
                raise DataError(f"{dataset.describe(index)}: {exc}") from None
    return confusion["fp32"].compute(names), confusion["int8"].compute(names), agree / total


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100 * float(value), 4)


@dataclass
class QuantizationReport:
    """What was done and how accurate it is; ``to_dict()`` is quantization.json."""

    calibration: dict[str, Any]
    validation: dict[str, Any]
    fp32: SegmentationMetrics
    int8: SegmentationMetrics
    agreement: float  # share of pixels whose label is the same in fp32 and int8
    conversion_error: float  # fp32 IR against PyTorch, relative
    rest_precision: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        """fp32 mIoU − int8 mIoU, in points (NaN when the split has no labelled pixels)."""
        return 100 * (self.fp32.mean_iou - self.int8.mean_iou)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": RECIPE,
            "calibration": self.calibration,
            "validation": self.validation,
            "fp32": self.fp32.summary(),
            "int8": self.int8.summary(),
            "units": "percent",
            "mIoU_drop": None if math.isnan(self.drop) else round(self.drop, 4),
            "pixel_agreement": round(100 * self.agreement, 4),
            "per_class_iou": {
                name: {"fp32": _percent(a), "int8": _percent(b)}
                for name, a, b in zip(self.fp32.labels, self.fp32.iou, self.int8.iou, strict=True)
            },
            "ir": {
                "xml": IR_XML,
                "bin": IR_BIN,
                "input": INPUT_NAME,
                "input_shape": "[?,3,?,?] float32",
                "output": OUTPUT_NAME,
                "output_shape": "[?,K,ceil(H/4),ceil(W/4)] float32",
                "float_ops_precision": self.rest_precision,
                "conversion_relative_error": float(f"{self.conversion_error:.3g}"),
            },
            "versions": {
                "segformer": segformer.__version__,
                "nncf": nncf.__version__,
                "openvino": ov.get_version(),
                "torch": torch.__version__,
            },
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }

    def summary(self) -> str:
        """Two lines for the terminal."""
        return (
            f"mIoU fp32 {100 * self.fp32.mean_iou:.2f}, int8 {100 * self.int8.mean_iou:.2f} "
            f"(drop {self.drop:.2f} points); pixel agreement {100 * self.agreement:.2f}% "
            f"on {self.validation['images']} images of {self.validation['data']}\n"
            f"calibration: {self.calibration['images']} images of {self.calibration['data']}"
        )

    def table(self) -> str:
        """Per-class IoU, fp32 against int8."""
        width = max([len("class"), *(len(n) for n in self.fp32.labels)])
        lines = [f"{'class':<{width}}  {'fp32':>6}  {'int8':>6}"]
        for name, a, b in zip(self.fp32.labels, self.fp32.iou, self.int8.iou, strict=True):
            cells = ["   n/a" if math.isnan(v) else f"{100 * v:6.2f}" for v in (a, b)]
            lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
        return "\n".join(lines)


@dataclass
class QuantizedModel:
    """The int8 IR (in memory) and its report."""

    ir: ov.Model
    report: QuantizationReport


def _check_labels(model: SegformerForSemanticSegmentation, dataset: SegmentationDataset) -> None:
    if dataset.labels is not None and len(dataset.labels) != len(model.labels):
        raise DataError(
            f"{dataset.name}: the dataset has {len(dataset.labels)} classes but the model "
            f"predicts {len(model.labels)}"
        )


def quantize(
    model: SegformerForSemanticSegmentation,
    calibration: SegmentationDataset,
    validation: SegmentationDataset,
    *,
    samples: int = 100,
    val_samples: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
) -> QuantizedModel:
    """int8-quantize ``model`` on ``samples`` images of ``calibration`` (a fixed random choice
    by ``seed``; only the images are used) and score fp32 and int8 on ``val_samples`` images
    of ``validation`` (default all). Images are preprocessed with the model's own processor.
    ``threads``: OpenVINO's inference threads (default: all cores)."""
    if not isinstance(model, SegformerForSemanticSegmentation):
        raise CheckpointError(
            f"quantization needs a segmentation model, not {type(model).__name__}"
        )
    if samples < 1 or (val_samples is not None and val_samples < 1):
        raise SegformerError("samples and val_samples must be at least 1")
    _check_labels(model, validation)
    model = model.eval().to("cpu")
    processor = ImageProcessor.from_model(model)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    chosen = pick(len(calibration), samples, seed)
    inputs = [pixel_values(processor, calibration.read_image(i)) for i in chosen]
    fp32_ir = convert(model)
    conversion_error = check_conversion(fp32_ir, model, inputs[0])
    seconds["convert"] = time.perf_counter() - started
    started = time.perf_counter()
    int8_ir = quantize_ir(fp32_ir, inputs)
    seconds["quantize"] = time.perf_counter() - started
    started = time.perf_counter()
    engine = OpenVinoEngine(None, "int8", program=int8_ir, threads=threads, cache=False)
    val_indices = pick(len(validation), val_samples, seed)
    fp32, int8, agreement = compare(model, engine, validation, val_indices, processor, progress)
    seconds["evaluate"] = time.perf_counter() - started
    report = QuantizationReport(
        calibration={"data": calibration.name, "images": len(chosen), "seed": seed},
        validation={"data": validation.name, "images": len(val_indices), "seed": seed},
        fp32=fp32,
        int8=int8,
        agreement=agreement,
        conversion_error=conversion_error,
        rest_precision=engine.config["INFERENCE_PRECISION_HINT"],
        seconds=seconds,
    )
    return QuantizedModel(int8_ir, report)


# ---------------------------------------------------------------------------------------
# Writing the model folder
# ---------------------------------------------------------------------------------------
def check_out_folder(
    out: str | os.PathLike[str], protected: dict[str, str | os.PathLike[str]]
) -> Path:
    """``out`` resolved, if a quantized model folder may be written there: not one of the
    ``protected`` paths ({what: path}, e.g. the model's folder and the data), not inside or
    around one, and not an existing folder with other content than an earlier output."""
    target = Path(out).expanduser().resolve()
    for what, path in protected.items():
        kept = Path(path).expanduser().resolve()
        if target == kept or kept in target.parents:
            raise InputError(f"{out}: is or lies inside the {what} ({kept}); choose another --out")
        if target in kept.parents:
            raise InputError(f"{out}: contains the {what} ({kept}); choose another --out")
    if target.exists() and not target.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / REPORT_JSON).is_file():
        raise InputError(
            f"{out}: a folder with other files in it (not an earlier quantize output); "
            "choose a new --out"
        )
    return target


def write_quantized(
    model: SegformerForSemanticSegmentation,
    quantized: QuantizedModel,
    out: str | os.PathLike[str],
    *,
    max_drop: float = 1.0,
    protected: dict[str, str | os.PathLike[str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model folder ``out`` (the model in Hugging Face layout, ``openvino_int8.xml``
    / ``.bin``, ``quantization.json`` with ``extra`` merged in), replacing an earlier output
    there in one rename. Refuses, writing nothing, when int8 lost more than ``max_drop`` mIoU
    points or the accuracy could not be measured."""
    report = quantized.report
    if math.isnan(report.drop):
        raise AccuracyError(
            f"{report.validation['data']}: no labelled pixels, so int8 accuracy cannot be "
            "checked; nothing written"
        )
    if report.drop > max_drop:
        raise AccuracyError(
            f"int8 mIoU {100 * report.int8.mean_iou:.2f} vs fp32 {100 * report.fp32.mean_iou:.2f}: "
            f"a drop of {report.drop:.2f} points, more than the allowed {max_drop:g} "
            f"(pixel agreement {100 * report.agreement:.2f}%); nothing written"
        )
    target = check_out_folder(out, protected or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target (same file system) and renamed into place: a reader never sees
    # a folder with the model but without its IR, or an IR without its report.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save(model, staging)
        ov.save_model(quantized.ir, str(staging / IR_XML), compress_to_fp16=False)
        data = {**report.to_dict(), "max_drop": max_drop, **(extra or {})}
        (staging / REPORT_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is for sharing
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; an earlier folder there is moved aside first and removed
    only once the new one is in place."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rename(target, old / "previous")
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
