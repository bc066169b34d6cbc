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
===============  ========================================================================

``"auto"`` is ``fast`` for fp32 and, on the CPU, ``compiled`` for bf16 (bf16 pays off on the
CPU only when compiled: eager bf16 kernels convert back and forth around every op).

``FastSegformer`` (``segformer.models.fast``) explains the re-association.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from segformer.errors import CheckpointError, SegformerError
from segformer.inference.backends.base import Engine
from segformer.inference.backends.compiled import CompiledEngine
from segformer.inference.backends.onnx_runtime import OnnxRuntimeEngine
from segformer.inference.backends.pytorch import TorchEngine
from segformer.inference.export import cached_onnx_export
from segformer.models.fast import FastSegformer
from segformer.models.segformer import SegformerForSemanticSegmentation

log = logging.getLogger("segformer")

BACKENDS = ("eager", "fast", "compiled", "onnxruntime")
# Accepted spellings of a backend, mapped onto BACKENDS.
_BACKEND_ALIASES = {
    "optimized": "fast",
    "optimised": "fast",
    "compile": "compiled",
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
}
PRECISIONS = ("fp32", "bf16", "fp16")
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


def default_backend(precision: str, device: torch.device) -> str:
    """What ``backend="auto"`` runs: ``fast`` (exact, no start-up cost), except bf16 on the
    CPU, which only pays off compiled."""
    if device.type == "cpu" and precision == "bf16":
        return "compiled"
    return "fast"


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
    ``dynamic``: see ``CompiledEngine``. ``threads``: onnxruntime's intra-op threads.
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
    if backend == "auto":
        backend = default_backend(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise SegformerError("fp16 is for CUDA GPUs; on the CPU use bf16 (or fp32)")
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
