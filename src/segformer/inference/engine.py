"""Inference engines: how a model's forward pass is executed. One module per backend;
``create_engine`` picks one.

Every engine maps normalised pixel values (B, 3, H, W) to float32 logits
(B, num_labels, ⌈H/4⌉, ⌈W/4⌉), contiguous, like the model itself. ``create_engine`` picks one:

===============  ========================================================================
backend          what runs
===============  ========================================================================
``eager``        the model as written (the reference).
``fast``         ``FastSegformer``: the same function, rearranged (below). Exact in fp32:
                 it differs from the model by rounding only (‖Δ‖/‖logits‖ ≈ 3e-7).
``compiled``     ``FastSegformer`` compiled ahead of time by Inductor with its weights
                 frozen in, fp32 or bf16 (``CompiledEngine``); programs are cached on disk.
``onnxruntime``  an ONNX export of ``FastSegformer`` run by onnxruntime (``segformer
                 export`` writes such files; a model is exported to the cache on first use).
``openvino``     ``FastSegformer`` converted to OpenVINO and compiled for the CPU
                 (``OpenVinoEngine``): fp32 (exact), bf16 where the CPU has it, and int8 from
                 the quantized IR ``segformer quantize`` saves beside a model's weights.
===============  ========================================================================

``"auto"`` on an x86 CPU is ``openvino`` (the fastest exact engine there; bf16 too where the
CPU has bf16 instructions, else ``compiled``). Where OpenVINO is missing or fails, ``auto``
says so in one warning line and runs ``fast`` for fp32 and ``compiled`` for bf16 (bf16 pays
off on the CPU only when compiled: eager bf16 kernels convert back and forth around every op).
On CUDA ``auto`` is ``fast``. ``int8`` runs with ``openvino`` only.

``FastSegformer`` (``segformer.models.fast``) explains the re-association.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from segformer.errors import CheckpointError, SegformerError
from segformer.inference.backends import openvino as openvino_backend
from segformer.inference.backends.base import Engine
from segformer.inference.backends.compiled import CompiledEngine
from segformer.inference.backends.onnx_runtime import OnnxRuntimeEngine
from segformer.inference.backends.openvino import OpenVinoEngine
from segformer.inference.backends.pytorch import TorchEngine
from segformer.inference.export import cached_onnx_export
from segformer.models.fast import FastSegformer
from segformer.models.segformer import SegformerForSemanticSegmentation

log = logging.getLogger("segformer")

BACKENDS = ("eager", "fast", "compiled", "onnxruntime", "openvino")
# Accepted spellings of a backend, mapped onto BACKENDS.
_BACKEND_ALIASES = {
    "optimized": "fast",
    "optimised": "fast",
    "compile": "compiled",
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
    "ov": "openvino",
}
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_PRECISION_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}


def _normalise(value: str, choices: Sequence[str], aliases: dict[str, str], what: str) -> str:
    key = str(value).strip().lower()
    key = aliases.get(key, key)
    if key not in choices:
        raise SegformerError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
    return key


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the first CUDA GPU if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SegformerError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SegformerError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here")
    return resolved


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _openvino_has_bf16() -> bool:
    """Whether OpenVINO can run bf16 here; True when OpenVINO is missing, so that ``auto``
    tries it and says why it runs something else."""
    if not openvino_backend.available():
        return True
    try:
        return openvino_backend.cpu_has_bf16()
    except Exception:  # a broken OpenVINO install: the engine's creation reports it
        return True


def default_backend(precision: str, device: torch.device) -> str:
    """What ``backend="auto"`` runs (see the module docstring): on an x86 CPU ``openvino``
    (bf16 only where the CPU has bf16, else ``compiled``), elsewhere ``fast`` for fp32 and
    ``compiled`` for bf16 on the CPU; int8 always ``openvino``."""
    if precision == "int8":
        return "openvino"
    if device.type != "cpu":
        return "fast"
    if _x86() and (precision == "fp32" or _openvino_has_bf16()):
        return "openvino"
    return "compiled" if precision == "bf16" else "fast"


def _openvino_engine(
    model: SegformerForSemanticSegmentation,
    precision: str,
    threads: int | None,
    dynamic: bool | None,
) -> OpenVinoEngine:
    ir_path = None
    if precision == "int8":
        ir_path = openvino_backend.int8_ir_of(model)
        if ir_path is None:
            raise SegformerError(
                f"int8 runs a quantized model, and {model.metadata.source or 'this model'} has "
                f"no {openvino_backend.INT8_IR} beside its weights: make one with `segformer quantize`"
            )
    return OpenVinoEngine(
        model.eval().to("cpu"), precision, ir_path=ir_path, threads=threads, static=not dynamic
    )


def create_engine(
    model: SegformerForSemanticSegmentation | str | os.PathLike[str],
    backend: str = "auto",
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    dynamic: bool | None = None,
    threads: int | None = None,
) -> Engine:
    """The engine for ``model`` with ``backend`` ("auto", "eager", "fast", "compiled",
    "onnxruntime") at ``precision`` ("fp32", "bf16", "fp16" on CUDA) on ``device``.

    ``model`` is a segmentation model, or for onnxruntime also the path of an ``.onnx`` file;
    given a model, onnxruntime runs an export of its ``FastSegformer`` kept in ``cache_dir()``.
    ``dynamic``: see ``CompiledEngine``; for openvino True compiles once for any input shape
    instead of per shape. ``threads``: onnxruntime's intra-op or OpenVINO's inference threads.
    The model is put in eval mode and moved to ``device``.
    """
    backend = _normalise(backend, ("auto", *BACKENDS), _BACKEND_ALIASES, "backend")
    precision = _normalise(precision, PRECISIONS, _PRECISION_ALIASES, "precision")
    device = resolve_device(device)
    onnx_file = not isinstance(model, nn.Module)
    if onnx_file:
        if Path(model).suffix.lower() != ".onnx":
            raise SegformerError(
                f"{model}: create_engine takes a model, or the path of an .onnx file"
            )
        if backend not in ("auto", "onnxruntime"):
            raise SegformerError(
                f"{model}: an ONNX file runs with the onnxruntime backend, not {backend!r}"
            )
        backend = "onnxruntime"
    elif not isinstance(model, SegformerForSemanticSegmentation):
        raise CheckpointError(
            f"an inference engine needs a semantic-segmentation model, not {type(model).__name__}"
        )
    if precision == "int8" and backend not in ("auto", "openvino"):
        raise SegformerError(f"int8 runs with the openvino backend, not {backend}")
    automatic = backend == "auto"
    if automatic:
        backend = default_backend(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise SegformerError("fp16 is for CUDA GPUs; on the CPU use bf16 (or fp32)")
    if backend == "openvino":
        if device.type != "cpu":
            raise SegformerError(f"the openvino backend runs on the CPU, not {device}")
        try:
            return _openvino_engine(model, precision, threads, dynamic)
        except Exception as exc:
            if not automatic or precision == "int8":
                raise
            backend = "compiled" if precision == "bf16" else "fast"
            log.warning(
                "OpenVINO is unavailable or failed (%s): running the %s PyTorch engine instead",
                " ".join(str(exc).split())[:300],
                backend,
            )
    if backend == "onnxruntime":
        if precision != "fp32":
            raise SegformerError(f"the onnxruntime backend runs fp32 only, not {precision}")
        if onnx_file:
            return OnnxRuntimeEngine(model, device, threads=threads)
        model.eval()
        return OnnxRuntimeEngine(cached_onnx_export(model), device, model=model, threads=threads)

    model = model.eval().to(device)
    if backend == "eager":
        return TorchEngine(model, model, "eager", precision, device)
    if backend == "fast":
        return TorchEngine(model, FastSegformer(model), "fast", precision, device)
    return CompiledEngine(model, precision, device, dynamic=dynamic)
