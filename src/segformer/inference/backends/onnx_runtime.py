"""The onnxruntime engine: an ONNX export of ``FastSegformer`` (or any SegFormer ONNX file)
run by onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from segformer.errors import CheckpointError, SegformerError
from segformer.inference.backends.base import Engine, check_pixels
from segformer.models.segformer import SegformerForSemanticSegmentation


class OnnxRuntimeEngine(Engine):
    """An ONNX file (``segformer export``'s output, or any SegFormer export with one input
    ``pixel_values`` and one output ``logits``) run by onnxruntime. ``threads``: intra-op
    threads (default: PyTorch's thread count, so both runtimes compare fairly)."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: torch.device,
        model: SegformerForSemanticSegmentation | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(model, "fp32", device)
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - a declared dependency
            raise SegformerError(
                "the onnxruntime backend needs the onnxruntime package (pip install onnxruntime)"
            ) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CheckpointError(
                f"{self.path}: onnxruntime cannot load this file ({' '.join(str(exc).split())[:300]})"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CheckpointError(
                f"{self.path}: expected one input (pixel values), the model has {len(inputs)}"
            )
        self.input_name = inputs[0].name

    def __call__(self, pixel_values: Tensor) -> Tensor:
        check_pixels(pixel_values)
        x = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
        return logits.to(self.device) if self.device.type != "cpu" else logits
