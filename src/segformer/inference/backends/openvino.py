"""The OpenVINO engine: ``FastSegformer`` converted to an OpenVINO model once, compiled for the
CPU plugin.

Why OpenVINO: on x86 CPUs its CPU plugin runs our graph faster than PyTorch, Inductor or
onnxruntime (B0 512², one thread: fp32 137 ms, bf16 88 ms, against 241 ms for ``fast`` and
776 ms for transformers), starts in well under a second once its files are cached, and runs
int8 models quantized by NNCF.

- **Conversion.** ``openvino.convert_model`` traces ``FastSegformer`` (our re-associated graph,
  not the model as written: it is faster in OpenVINO too) with a dynamic ``[?, 3, ?, ?]``
  input. The result (IR: ``.xml`` + ``.bin``) is kept in ``cache_dir()/openvino``, named after
  ``model_digest`` and the OpenVINO version, so a second process reads it instead of
  converting again (~8 s for B0). It is saved with fp32 weights: ``save_model``'s default
  fp16 compression would make it inexact.
- **Compiled blobs.** OpenVINO's own ``CACHE_DIR`` (``cache_dir()/openvino/blobs/<hint>``)
  keeps each compiled program, keyed by graph and weights, so the second process also skips
  compilation (first result in ~0.7 s for B0). One folder per precision hint because the key
  leaves the hint out: on a CPU with AMX (OpenVINO 2026.4), a bf16 program found the fp32
  program's blob under the same name and gave garbage or crashed.
- **Precision.** fp32 sets ``INFERENCE_PRECISION_HINT=f32`` explicitly: on CPUs with bf16
  instructions the plugin's default is bf16 (‖Δ‖/‖logits‖ ≈ 3e-3), with the hint it is exact
  (≈ 3e-7). bf16 sets the bf16 hint and is offered only where the CPU has bf16. int8 runs a
  quantized IR (``segformer quantize`` writes ``openvino_int8.xml`` into a model folder); its
  remaining float ops run in bf16 where the CPU has it (faster), else fp32.
- **Shapes.** Static shapes run about twice as fast as the dynamic model (B0 512², one thread:
  fp32 137 vs 276 ms), so by default the model is reshaped and compiled for each input shape
  met, keeping the last ``max_shapes`` compiled (blobs make a re-compile cheap).
  ``static=False`` compiles the dynamic model once instead, for inputs of ever-changing size.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segformer.errors import CheckpointError, SegformerError
from segformer.inference.backends.base import Engine, cache_dir, check_pixels, model_digest
from segformer.models.fast import FastSegformer
from segformer.models.segformer import SegformerForSemanticSegmentation

try:
    import openvino as ov
except ImportError:  # a declared dependency, but create_engine falls back without it
    ov = None

log = logging.getLogger("segformer")

# Compiled static shapes kept per engine; a batch of one at one size is the common case, a
# server that sees several photo sizes needs a few more.
MAX_SHAPES = 8
# The size traced at conversion; the converted model takes any size.
_TRACE_SIZE = (64, 64)
# INFERENCE_PRECISION_HINT per precision (int8: see _hint).
_HINTS = {"fp32": "f32", "bf16": "bf16"}
# The file ``segformer quantize`` writes beside a model's weights.
INT8_IR = "openvino_int8.xml"


def available() -> bool:
    """Whether the openvino package could be imported."""
    return ov is not None


def _require() -> None:
    if ov is None:
        raise SegformerError(
            "the openvino backend needs the openvino package (pip install openvino)"
        )


def _load_hwloc_normally() -> None:
    """Load OpenVINO's bundled hwloc before its CPU plugin starts, so that a preloaded malloc
    (tcmalloc, which ``segformer`` preloads; see ``segformer.tools.allocator``) works.

    Why: TBB ``dlopen``s its NUMA helper (libtbbbind) with ``RTLD_DEEPBIND``, which binds the
    helper's dependency libhwloc to glibc's ``malloc``/``free`` instead of the preloaded ones;
    hwloc then hands memory that tcmalloc allocated to glibc's ``free`` and the process aborts
    ("free(): invalid pointer") when the plugin starts. A library already loaded is not bound
    again, so loading hwloc here first, with ordinary symbol lookup, binds it to tcmalloc."""
    if not sys.platform.startswith("linux"):
        return
    for library in sorted((Path(ov.__file__).parent / "libs").glob("libhwloc.so*")):
        with contextlib.suppress(OSError):
            ctypes.CDLL(str(library))
            return


@functools.cache
def core() -> Any:
    """The process's ``openvino.Core`` (it owns the CPU plugin and its thread pools)."""
    _require()
    _load_hwloc_normally()
    return ov.Core()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 on this CPU (AVX512-BF16 or AMX)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(
    precision: str, threads: int | None = None, cache: bool = True, hint: str | None = None
) -> dict[str, Any]:
    """The CPU plugin configuration for ``precision`` ("fp32", "bf16", "int8"): latency-oriented
    (one stream, every thread on one request), the precision hint (``hint`` overrides it),
    threads (default: PyTorch's thread count) and, with ``cache``, the compiled-blob cache."""
    if hint is None:
        # int8: the hint is for the ops left unquantized, bf16 (faster) where the CPU has it.
        int8_hint = "bf16" if precision == "int8" and cpu_has_bf16() else "f32"
        hint = _HINTS.get(precision, int8_hint)
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": hint,
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
    }
    if cache:
        # OpenVINO's blob key leaves the precision hint out: one folder per hint.
        config["CACHE_DIR"] = str(ir_cache_dir() / "blobs" / hint)
    return config


def ir_cache_dir() -> Path:
    return cache_dir() / "openvino"


def convert(model: SegformerForSemanticSegmentation) -> Any:
    """``model``'s ``FastSegformer`` as an ``openvino.Model`` taking pixel values of any batch
    and size (input ``pixel_values``, output ``logits``)."""
    _require()
    sample = torch.randn(1, model.config.num_channels, *_TRACE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace is deprecated but is what OpenVINO's PyTorch frontend reads (it
        # would call it itself): not a warning for our users.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Traced here rather than by convert_model, to skip torch.jit's trace check (it runs
        # the model twice more: half the conversion time of a small model). Batch, height and
        # width stay dynamic in the converted model.
        traced = torch.jit.trace(FastSegformer(model.eval().to("cpu")), sample, check_trace=False)
        converted = ov.convert_model(traced, example_input=sample)
    converted.inputs[0].get_tensor().set_names({"pixel_values"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted


def save_ir(converted: Any, xml_path: Path) -> None:
    """Write ``converted`` as ``xml_path`` and its ``.bin`` so that readers see both files
    whole or none: the ``.bin`` first, then the ``.xml`` (the marker that the pair is there),
    each through a temporary name and ``os.replace``. fp32 weights (no fp16 compression)."""
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=xml_path.parent, prefix=f".{xml_path.stem}-", suffix=".xml"
    )
    os.close(handle)
    temporary_xml = Path(temporary)
    temporary_bin = temporary_xml.with_suffix(".bin")
    try:
        ov.save_model(converted, str(temporary_xml), compress_to_fp16=False)
        for written in (temporary_xml, temporary_bin):
            os.chmod(written, 0o644)  # mkstemp makes private files; the cache may be shared
        os.replace(temporary_bin, xml_path.with_suffix(".bin"))
        os.replace(temporary_xml, xml_path)
    finally:
        for leftover in (temporary_xml, temporary_bin):
            leftover.unlink(missing_ok=True)


def cached_ir(model: SegformerForSemanticSegmentation) -> tuple[Path, bool]:
    """The path of ``model``'s IR in the cache, converted and saved first if it is not there.
    Returns (path, whether it was converted now)."""
    _require()
    version = ov.get_version().split("-")[0]
    path = ir_cache_dir() / f"{model_digest(model)}-ov{version}.xml"
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path, False
    started = time.perf_counter()
    log.info("converting the model for OpenVINO (once; cached in %s)", path.parent)
    save_ir(convert(model), path)
    log.info("converted in %.1f s", time.perf_counter() - started)
    return path, True


def int8_ir_of(model: SegformerForSemanticSegmentation) -> Path | None:
    """The quantized IR saved beside ``model``'s weights (``segformer quantize``), if any."""
    source = model.metadata.source
    if source and Path(source).is_dir() and (Path(source) / INT8_IR).is_file():
        return Path(source) / INT8_IR
    return None


class OpenVinoEngine(Engine):
    """Pixel values (B, C, H, W) → float32 logits (B, K, ⌈H/4⌉, ⌈W/4⌉) on the CPU, run by
    OpenVINO (see the module docstring).

    ``model``: the model to convert (its IR is cached). ``ir_path``: an IR file to run instead
    (an int8 model from ``segformer quantize``); ``model`` is then only recorded.
    ``precision``: "fp32" (exact), "bf16" (CPUs with bf16 only) or "int8" (with ``ir_path``).
    ``threads``: ``INFERENCE_NUM_THREADS`` (default: PyTorch's thread count).
    ``program``: an ``openvino.Model`` in memory to run instead (e.g. a quantized model before
    it is saved). ``hint``: override the precision hint (e.g. "f32" for an int8 program's
    float ops). ``static``: compile per input shape (faster; the last ``max_shapes`` kept)
    rather than once for any shape. ``cache``: keep the IR and compiled blobs on disk.
    ``converted`` says whether this engine had to convert the model.
    """

    backend = "openvino"

    def __init__(
        self,
        model: SegformerForSemanticSegmentation | None,
        precision: str = "fp32",
        *,
        ir_path: str | os.PathLike[str] | None = None,
        program: Any | None = None,
        hint: str | None = None,
        threads: int | None = None,
        static: bool = True,
        max_shapes: int = MAX_SHAPES,
        cache: bool = True,
    ) -> None:
        _require()
        super().__init__(model, precision, torch.device("cpu"))
        if precision not in ("fp32", "bf16", "int8"):
            raise SegformerError(f"the openvino backend runs fp32, bf16 or int8, not {precision}")
        if precision == "int8" and ir_path is None and program is None:
            raise SegformerError("int8 runs a quantized IR (a file, or a model in memory)")
        if ir_path is not None and precision != "int8":
            raise SegformerError("an IR file runs as int8 (it is a quantized model)")
        if precision == "bf16" and not cpu_has_bf16():
            raise SegformerError("this CPU has no bf16 instructions OpenVINO can use: use fp32")
        if max_shapes < 1:
            raise SegformerError("max_shapes must be at least 1")
        self.static = static
        self.max_shapes = max_shapes
        self.config = compile_config(precision, threads, cache, hint)
        self._lock = threading.Lock()  # an infer request runs one call at a time
        self._model: Any | None = None  # the dynamic openvino.Model, read when first needed
        if program is not None:
            self.ir_path, self.converted, self._model = None, False, program
        elif ir_path is not None:
            self.ir_path = Path(ir_path)
            if not self.ir_path.is_file() or not self.ir_path.with_suffix(".bin").is_file():
                raise CheckpointError(f"{self.ir_path}: no OpenVINO IR (.xml and .bin) there")
            self.converted = False
        elif model is None:
            raise SegformerError("OpenVinoEngine needs a model or an IR file")
        elif cache:
            self.ir_path, self.converted = cached_ir(model)
        else:
            self.ir_path, self.converted, self._model = None, True, convert(model)
        # Compiled models with their infer request, by input shape (None: any shape).
        self._compiled: collections.OrderedDict[tuple[int, ...] | None, tuple[Any, Any]] = (
            collections.OrderedDict()
        )
        if not static:
            self._compiled_for(None)

    def _dynamic_model(self) -> Any:
        if self._model is None:
            self._model = core().read_model(str(self.ir_path))
        return self._model

    def _compiled_for(self, shape: tuple[int, ...] | None) -> tuple[Any, Any]:
        """(compiled model, infer request) for ``shape`` (None: any shape), compiled now if it
        is not among the ones kept."""
        entry = self._compiled.get(shape)
        if entry is not None:
            self._compiled.move_to_end(shape)
            return entry
        if shape is None and self.ir_path is not None:
            # From the file, OpenVINO finds a cached blob without reading the model at all.
            compiled = core().compile_model(str(self.ir_path), "CPU", self.config)
        else:
            program = self._dynamic_model()
            if shape is not None:
                program = program.clone()
                program.reshape({0: list(shape)})
            compiled = core().compile_model(program, "CPU", self.config)
        entry = (compiled, compiled.create_infer_request())
        self._compiled[shape] = entry
        while len(self._compiled) > self.max_shapes:
            self._compiled.popitem(last=False)
        return entry

    @property
    def shapes(self) -> list[tuple[int, ...] | None]:
        """The input shapes compiled programs are kept for, oldest first (None: any shape)."""
        return list(self._compiled)

    @property
    def compiled_model(self) -> Any:
        """The most recently used compiled model (its properties say how it runs)."""
        if not self._compiled:
            raise SegformerError("nothing compiled yet: the first call compiles")
        return next(reversed(self._compiled.values()))[0]

    def __call__(self, pixel_values: Tensor) -> Tensor:
        check_pixels(pixel_values)
        channels = self.model.config.num_channels if self.model is not None else 3
        if pixel_values.shape[1] != channels:
            raise SegformerError(
                f"pixel values have {pixel_values.shape[1]} channels, the model takes {channels}"
            )
        x = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            _, request = self._compiled_for(tuple(x.shape) if self.static else None)
            # share_inputs: OpenVINO reads x in place. The output buffer belongs to the request
            # and is overwritten by its next call: copy it out.
            request.infer({0: x}, share_inputs=True)
            return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

    def __repr__(self) -> str:
        return (
            f"OpenVinoEngine(precision={self.precision!r}, static={self.static}, "
            f"threads={self.config['INFERENCE_NUM_THREADS']})"
        )
