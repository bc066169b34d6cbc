"""ONNX export: a model's ``FastSegformer`` (the re-associated, exact forward pass of
``segformer.models.fast``) as an ONNX graph with dynamic batch, height and width, checked against
the PyTorch model with onnxruntime.

The file has one input, ``pixel_values`` (float32, batch × 3 × height × width, normalised as
the model's preprocessing says) and one output, ``logits`` (float32, batch × classes ×
⌈height/4⌉ × ⌈width/4⌉). The labels, palette and preprocessing travel in the file's metadata
(``segformer.id2label``, ``segformer.preprocessing`` …, JSON strings) so that a deployment
needs nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from segformer.errors import CheckpointError, SegformerError
from segformer.inference.backends.base import cache_dir, model_digest
from segformer.inference.backends.onnx_runtime import OnnxRuntimeEngine
from segformer.inference.processing import ImageProcessor
from segformer.models.fast import FastSegformer
from segformer.models.segformer import SegformerForSemanticSegmentation

log = logging.getLogger("segformer")

DEFAULT_OPSET = 18
MIN_OPSET = 17
# Relative error ‖onnxruntime − torch‖ / ‖torch‖ that the check accepts.
CHECK_TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the check went."""

    path: str
    opset: int
    size_bytes: int
    seconds: float
    checked: list[dict[str, Any]] = field(default_factory=list)  # per input shape: shape, error

    @property
    def max_error(self) -> float | None:
        return max((c["relative_error"] for c in self.checked), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_error": self.max_error}


def export_onnx(
    model: SegformerForSemanticSegmentation,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    sample_size: tuple[int, int] = (512, 512),
    check: bool = True,
    check_sizes: list[tuple[int, int]] | None = None,
) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX (dynamic batch, height and width) and return a
    report. With ``check``, onnxruntime runs the file on random inputs of ``check_sizes``
    (default: the sample size with batch 1, and an odd size with batch 2, so the dynamic axes
    are exercised) and the logits must match the PyTorch model's within ``CHECK_TOLERANCE``
    (relative L2 error); a mismatch raises ``SegformerError`` and leaves no file behind.
    The file appears whole or not at all."""
    if not isinstance(model, SegformerForSemanticSegmentation):
        raise CheckpointError(
            f"ONNX export needs a semantic-segmentation model, not {type(model).__name__}"
        )
    if opset < MIN_OPSET:
        raise SegformerError(f"opset {opset} is too old: use {MIN_OPSET} or newer")
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise SegformerError(f"{path}: the output file should end in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = model.eval().to("cpu")
    module = FastSegformer(model)
    # Batch 2: an exported size-1 dimension would be fixed to 1 (PyTorch specialises 0 and 1).
    sample = torch.randn(2, model.config.num_channels, *sample_size)

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".onnx")
    os.close(handle)
    try:
        _export(module, sample, Path(temporary), opset)
        _add_metadata(Path(temporary), model)
        report = ExportReport(str(path), opset, Path(temporary).stat().st_size, 0.0)
        if check:
            sizes = check_sizes or [
                sample_size,
                (sample_size[0] // 2 + 13, sample_size[1] // 2 + 7),
            ]
            for batch, size in zip((1, 2, 1, 2), sizes, strict=False):
                report.checked.append(compare_with_torch(Path(temporary), model, size, batch))
            worst = report.max_error or 0.0
            if worst > CHECK_TOLERANCE:
                raise SegformerError(
                    f"the ONNX export does not match the PyTorch model: relative error {worst:.2e} "
                    f"> {CHECK_TOLERANCE:.0e} (shapes {[c['shape'] for c in report.checked]})"
                )
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    report.seconds = time.perf_counter() - started
    return report


def _export(module: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=8)
    width = torch.export.Dim("width", min=8)
    # The exporter reports progress and harmless warnings (e.g. about torchvision) on stdout
    # and through warnings/logging; a library call should stay quiet unless it fails.
    quiet = io.StringIO()
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (sample,),
                dynamo=True,
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:  # the exporter raises many types; say which step failed
        raise SegformerError(f"ONNX export failed: {' '.join(str(exc).split())[:400]}") from exc
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _add_metadata(path: Path, model: SegformerForSemanticSegmentation) -> None:

    proto = onnx.load(str(path))
    metadata = {
        "segformer.id2label": json.dumps(
            {str(i): name for i, name in model.config.id2label.items()}
        ),
        "segformer.config": json.dumps(model.config.to_hf_dict()),
    }
    # What the model expects, written out in full (defaults included) so a deployment can
    # prepare images without this library.
    metadata["segformer.preprocessing"] = json.dumps(ImageProcessor.from_model(model).to_dict())
    for key in ("palette", "license", "source"):
        if getattr(model.metadata, key) is not None:
            metadata[f"segformer.{key}"] = json.dumps(getattr(model.metadata, key))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "segformer"
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``segformer.*`` metadata of an exported file, decoded (keys without the prefix)."""

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable ONNX file ({' '.join(str(exc).split())[:200]})"
        ) from None
    found: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith("segformer."):
            try:
                found[entry.key.removeprefix("segformer.")] = json.loads(entry.value)
            except json.JSONDecodeError:
                found[entry.key.removeprefix("segformer.")] = entry.value
    return found


def cached_onnx_export(model: SegformerForSemanticSegmentation) -> Path:
    """The path of ``model``'s ONNX export in ``cache_dir() / "onnx"``, exporting it first
    when it is not there yet."""
    key = f"{model_digest(model)}-torch{torch.__version__.split('+')[0]}-opset{DEFAULT_OPSET}"
    path = cache_dir() / "onnx" / f"{key}.onnx"
    if not path.is_file():
        log.info("exporting the model to ONNX for onnxruntime (cached in %s)", path.parent)
        export_onnx(model, path, check=False)
    return path


def compare_with_torch(
    path: str | os.PathLike[str],
    model: SegformerForSemanticSegmentation,
    size: tuple[int, int],
    batch: int = 1,
) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and ``model`` (as written, eager fp32) on the same
    random input; returns the shape and the relative L2 error of the logits."""
    engine = OnnxRuntimeEngine(path, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, model.config.num_channels, *size, generator=generator)
    with torch.inference_mode():
        expected = model(pixels)
    got = engine(pixels)
    if got.shape != expected.shape:
        raise SegformerError(
            f"the ONNX model gives logits of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
        )
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    return {"shape": [batch, model.config.num_channels, *size], "relative_error": error}
