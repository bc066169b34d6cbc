"""The compiled engine: ``FastSegformer`` compiled ahead of time by AOTInductor, programs
cached on disk."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from segformer.inference.backends.base import DTYPES, cache_dir, model_digest
from segformer.inference.backends.pytorch import TorchEngine
from segformer.models.fast import FastSegformer
from segformer.models.segformer import SegformerForSemanticSegmentation

log = logging.getLogger("segformer")


class CompiledEngine(TorchEngine):
    """``FastSegformer`` compiled ahead of time by Inductor (AOTInductor) with its weights
    frozen in: linear and conv weights pre-packed for the CPU's matmul kernels, bias,
    activation and residual arithmetic fused into them, elementwise chains fused into
    generated C++ (or Triton on CUDA). bf16 and fp16 run with half-precision weights and
    activations (norms and softmax accumulate in fp32 inside the generated kernels) and
    attention spelled out as matmuls, which compile into faster code than the fused attention
    kernel's half-precision path on CPUs.

    Each compiled program is a package file in ``cache_dir() / "compiled"``, named after the
    model's weights, the precision, the input size, the thread count and the machine, so a
    second process (or the next run) loads it in well under a second instead of compiling
    again (about a minute for B0 on two cores). Batch size is always free. ``dynamic``: None
    compiles for the first input size and, if another size comes, once more for any size;
    True compiles for any size straight away; False compiles for every size separately
    (fastest code). Sizes a dynamic program cannot take (tiny inputs) run uncompiled.
    """

    def __init__(
        self,
        model: SegformerForSemanticSegmentation,
        precision: str,
        device: torch.device,
        dynamic: bool | None = None,
    ) -> None:
        half = precision != "fp32"
        fast = FastSegformer(model, explicit_attention=True if half else None)
        super().__init__(model, fast, "compiled", precision, device)
        self.dynamic = dynamic
        self._digest = model_digest(model)
        self._programs: dict[tuple[int, int] | None, Callable[[Tensor], Tensor] | None] = {}
        self._first_size: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def _compiled_module(self) -> nn.Module:
        """What gets compiled: ``FastSegformer`` with its weights in the engine's precision
        (a copy when that is not fp32, so the caller's model keeps its fp32 weights)."""
        module = self.module
        if self.precision != "fp32":
            module = copy.deepcopy(module).to(DTYPES[self.precision])
        return _CastingWrapper(module, DTYPES[self.precision]).eval()

    def package_path(self, size: tuple[int, int] | None) -> Path:
        """Where the program for input ``size`` (None: any size) is cached."""
        where = "any" if size is None else f"{size[0]}x{size[1]}"
        if self.device.type == "cuda":
            machine = torch.cuda.get_device_name(self.device).replace(" ", "-")
        else:
            machine = f"{torch.backends.cpu.get_cpu_capability()}-t{torch.get_num_threads()}"
        torch_version = torch.__version__.split("+")[0]
        return (
            cache_dir()
            / "compiled"
            / f"{self._digest}-{self.precision}-{where}-{machine}-torch{torch_version}.pt2"
        )

    def _program(self, size: tuple[int, int]) -> Callable[[Tensor], Tensor] | None:
        with self._lock:
            if self._first_size is None:
                self._first_size = size
            specialise = self.dynamic is False or (
                self.dynamic is None and size == self._first_size
            )
            key = size if specialise else None
            if key not in self._programs:
                self._programs[key] = self._load_or_compile(key)
            return self._programs[key]

    def _load_or_compile(self, size: tuple[int, int] | None) -> Callable[[Tensor], Tensor] | None:
        path = self.package_path(size)
        if not path.is_file():
            started = time.perf_counter()
            log.info(
                "compiling %s for %s input (once; cached in %s)",
                self.precision,
                "any" if size is None else f"{size[0]}×{size[1]}",
                path.parent,
            )
            try:
                _compile_package(self._compiled_module(), size, self.device, path)
            except Exception as exc:  # an Inductor failure must not stop inference
                log.warning(
                    "compilation failed, running uncompiled instead: %s",
                    " ".join(str(exc).split())[:300],
                )
                return None
            log.info("compiled in %.0f s", time.perf_counter() - started)
        try:
            return torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # a damaged or incompatible cache entry: compile it again
            log.warning(
                "cached program %s cannot be loaded (%s); compiling again",
                path.name,
                str(exc)[:200],
            )
            path.unlink(missing_ok=True)
            try:
                _compile_package(self._compiled_module(), size, self.device, path)
                return torch._inductor.aoti_load_package(str(path))
            except Exception:
                return None

    def _run(self, pixel_values: Tensor) -> Tensor:
        program = self._program((pixel_values.shape[2], pixel_values.shape[3]))
        if program is not None:
            try:
                return program(pixel_values)
            except RuntimeError as exc:  # e.g. an input smaller than a dynamic program allows
                log.debug("compiled program refused input %s: %s", tuple(pixel_values.shape), exc)
        with self._autocast():
            return self.module(pixel_values)


class _CastingWrapper(nn.Module):
    """float32 pixels in, float32 logits out, the module's own precision in between."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.module(pixel_values.to(self.dtype)).float()


def use_compile_cache() -> Path:
    """Point Inductor's own on-disk caches (generated kernels) at ``cache_dir() / "inductor"``
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set already; returns the folder."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor")))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _compile_package(
    module: nn.Module, size: tuple[int, int] | None, device: torch.device, path: Path
) -> None:
    """Export ``module`` (batch always dynamic; height and width fixed to ``size``, or
    dynamic when None), compile it with AOTInductor and weight freezing, and write the package
    to ``path`` atomically."""
    import torch._inductor.config as inductor_config

    use_compile_cache()
    height, width = size or (512, 512)
    # Batch 2 in the example: export would fix a dimension of size 1 to 1.
    example = torch.randn(2, 3, height, width, device=device)
    dims: dict[int, Any] = {0: torch.export.Dim.DYNAMIC}
    if size is None:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    module = module.to(device)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={"pixel_values": dims})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".pt2")
    os.close(handle)
    try:
        with inductor_config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(program, package_path=temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
