"""Benchmarks: our engines and, when it is installed, transformers itself, side by side on the
same weights, inputs, threads and allocator.

How the numbers are taken (this library is meant to be run on small, shared machines):

- Candidates are timed *interleaved*: each round runs every candidate once, in an order that
  rotates from round to round, and each candidate's median over the rounds is reported. Load
  from other processes then hits all candidates alike, so ratios stay meaningful even when
  absolute times wander.
- With ``isolate`` (what ``segformer bench`` and ``benchmarks/bench_inference.py`` do on a
  CPU) each candidate lives in a process of its own and only one runs at a time
  (``IsolatedCandidate``), as a user runs one runtime per process. Without it, all run in
  this process (measured on B0 512²: the same times within noise).
- Accuracy is reported next to speed: the relative L2 error of each engine's logits against
  the reference (transformers when installed, else our model as written), and the share of
  pixels whose label agrees with the exact path (``fast`` in fp32).
- Peak resident memory is measured per job in a fresh subprocess (``measure_peak_rss``), as
  a process only ever grows its high-water mark.
- Peers: besides eager transformers (the ``ratio`` column), a job can time the fastest routes a
  user has without this library: transformers' model converted to OpenVINO (fp32, and bf16
  where the CPU has it; static shape) and transformers' own ONNX export run by onnxruntime.
  ``peer_ratio`` is each row's time over the best of those and eager transformers, so a
  speed-up claimed is one over the best route a user has without us.
- Floors: the multiply-accumulates the engine executes over the machine's measured peak
  matmul rate (``peak_matmul_rate``); no implementation can go below that.

``run_model_job`` and ``run_photo_job`` return plain dicts; ``format_table``, ``save_chart``
and ``save_results`` present them. ``segformer bench`` and ``benchmarks/bench_inference.py``
are thin layers over these functions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import io
import json
import logging
import multiprocessing.connection
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch
from PIL import Image

from segformer.errors import SegformerError
from segformer.inference.backends import openvino as openvino_backend
from segformer.inference.backends.base import cache_dir
from segformer.inference.engine import create_engine, default_backend, resolve_device
from segformer.inference.labels import labels_from_logits
from segformer.inference.processing import ImageProcessor, read_image
from segformer.models.config import VARIANTS, SegformerConfig
from segformer.models.fast import FastSegformer
from segformer.models.macs import count_macs, macs_of
from segformer.models.segformer import SegformerForSemanticSegmentation
from segformer.tools.allocator import allocator_in_use
from segformer.weights.checkpoints import load, save

log = logging.getLogger("segformer")

SCHEMA = "segformer-bench/1"
TRANSFORMERS = "transformers"
# Seconds between two isolated contestants' bursts: the threads of the one that just ran
# (OpenMP, TBB, onnxruntime's pool) spin for a while before they sleep, on the cores the next
# one needs.
SETTLE_S = 0.05
TRANSFORMERS_COMPILED = "transformers compiled"
TRANSFORMERS_OPENVINO = "transformers openvino"
TRANSFORMERS_ONNXRUNTIME = "transformers onnxruntime"
# (backend, precision) pairs a full run compares; transformers is added when installed.
DEFAULT_ENGINES = (
    ("eager", "fp32"),
    ("fast", "fp32"),
    ("compiled", "fp32"),
    ("compiled", "bf16"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
)


def default_engines(model: SegformerForSemanticSegmentation) -> list[tuple[str, str]]:
    """``DEFAULT_ENGINES`` that can run here (OpenVINO installed, bf16 where the CPU has it),
    plus OpenVINO int8 when ``model``'s folder holds a quantized IR."""
    engines = []
    for backend, precision in DEFAULT_ENGINES:
        if backend == "openvino" and not openvino_backend.available():
            continue
        if (backend, precision) == ("openvino", "bf16") and not openvino_backend.cpu_has_bf16():
            continue
        engines.append((backend, precision))
    if openvino_backend.available() and openvino_backend.int8_ir_of(model) is not None:
        engines.append(("openvino", "int8"))
    return engines


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def time_interleaved(
    candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, burst: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``rounds`` samples each, taken in interleaved
    rounds with a rotating order (see the module docstring). ``warmup`` calls each first.
    With ``burst`` > 1 each candidate runs ``burst`` times in a row per round and only the
    last call is timed: steady-state latency with warm caches, as a server calling the same
    model again sees it, still interleaved with the others."""
    return time_rounds(
        {name: _burst_timer(call) for name, call in candidates.items()}, rounds, warmup, burst
    )


def _burst_timer(call: Callable[[], Any]) -> Callable[[int], float]:
    def timed(burst: int) -> float:
        for _ in range(burst - 1):
            call()
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    return timed


def time_rounds(
    timers: dict[str, Callable[[int], float]],
    rounds: int,
    warmup: int = 1,
    burst: int = 1,
    settle: float = 0.0,
) -> dict[str, list[float]]:
    """``time_interleaved`` for candidates that time themselves: ``timer(burst)`` runs
    ``burst`` calls and returns the seconds of the last (an isolated candidate does that in
    its own process, so the pipe to it is not timed). ``settle``: seconds to wait before
    each candidate's burst, for the worker threads of the one before to go to sleep."""
    names = list(timers)
    for _ in range(warmup):
        for name in names:
            timers[name](1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(settle)
            samples[name].append(timers[name](burst))
    return samples


def summarize(samples: Sequence[float], batch: int = 1) -> dict[str, float]:
    """Median, 10th and 90th percentile (ms) and images per second of timing samples."""
    ordered = sorted(samples)
    median = statistics.median(ordered)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "median_ms": median * 1e3,
        "p10_ms": quantile(0.1) * 1e3,
        "p90_ms": quantile(0.9) * 1e3,
        "images_per_s": batch / median if median > 0 else float("inf"),
        "samples": len(ordered),
    }


def peak_matmul_rate(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.4
) -> float:
    """The machine's best observed square-matmul rate in GMAC/s (multiply-accumulates per
    second / 1e9) for ``dtype`` with PyTorch's current thread count: the best of repeated
    ``size``³ products, so it approaches the hardware's peak as closely as a library can."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(a, b)
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    return size**3 / best / 1e9


# ---------------------------------------------------------------------------------------
# Cost of a model
# ---------------------------------------------------------------------------------------
def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def executed_macs(
    model: SegformerForSemanticSegmentation, size: tuple[int, int], batch: int = 1
) -> int:
    """Multiply-accumulates ``FastSegformer`` executes for one batch at ``size``, counted like
    ``segformer.inference.modes.count_macs`` counts the model's, on a weightless copy."""
    with torch.device("meta"):
        shadow = SegformerForSemanticSegmentation(model.config).eval()
        fast = FastSegformer(shadow)
        pixels = torch.empty(batch, model.config.num_channels, *size)

    return macs_of(fast, pixels)


# The input size each variant's ADE20K model was trained and evaluated at in the SegFormer
# paper's table (B5 uses 640²), so that the GMACs column can be checked against it.
PAPER_SIZES = {"b0": 512, "b1": 512, "b2": 512, "b3": 512, "b4": 512, "b5": 640}


def variant_table(
    num_labels: int = 150, size: tuple[int, int] | None = None
) -> list[dict[str, Any]]:
    """Parameters and GMACs of every MiT variant with ``num_labels`` classes at ``size`` (by
    default the paper's ADE20K size: 512², B5 640²): the model as published and the work
    ``FastSegformer`` does."""

    rows = []
    for name in VARIANTS:
        config = SegformerConfig.from_variant(name, num_labels=num_labels)
        at = size or (PAPER_SIZES.get(name, 512),) * 2
        with torch.device("meta"):
            model = SegformerForSemanticSegmentation(config)
        rows.append(
            {
                "variant": name,
                "size": list(at),
                "params_m": parameter_count(model) / 1e6,
                "gmacs": count_macs(config, at) / 1e9,
                "executed_gmacs": executed_macs(model, at) / 1e9,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else platform)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The matmul-relevant instruction sets this CPU reports (AVX2, AVX-512, bf16, AMX)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in flags]
    return []


def machine_info(peak: bool = True) -> dict[str, Any]:
    """What the numbers were measured on: CPU, threads, allocator, library versions, and the
    measured peak matmul rates (GMAC/s) that the floors are computed from."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "allocator": allocator_in_use(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for package in ("transformers", "onnxruntime", "openvino"):
        with contextlib.suppress(ImportError):
            info[package] = __import__(package).__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if peak:
        info["peak_gmacs_per_s"] = {
            "fp32": peak_matmul_rate(torch.float32),
            "bf16": peak_matmul_rate(torch.bfloat16),
        }
    return info


# ---------------------------------------------------------------------------------------
# transformers, for comparison
# ---------------------------------------------------------------------------------------
def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def transformers_model(
    model: SegformerForSemanticSegmentation, device: str = "cpu"
) -> torch.nn.Module:
    """transformers' SegformerForSemanticSegmentation with ``model``'s weights (through a
    Hugging Face-layout folder written by ``segformer.save``), in eval mode."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="segformer-bench-") as folder:
        save(model, folder)
        reference = transformers.SegformerForSemanticSegmentation.from_pretrained(folder)
    return reference.eval().to(device)


class _TransformersLogits:
    """transformers' model as an engine: pixel values → logits."""

    backend = TRANSFORMERS
    precision = "fp32"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(pixel_values=pixel_values).logits


class _TransformersCompiled(_TransformersLogits):
    """transformers' model the way a user who knows ``torch.compile`` runs it: compiled by
    Inductor with the weights frozen, under bf16 autocast. A point of comparison only (the
    ratios stay against eager transformers)."""

    backend = TRANSFORMERS_COMPILED
    precision = "bf16"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.compiled = torch.compile(model)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with (
            torch.inference_mode(),
            inductor_config.patch(freezing=True),
            torch.autocast(pixel_values.device.type, dtype=torch.bfloat16),
        ):
            return self.compiled(pixel_values=pixel_values).logits.float()


class _LogitsOnly(torch.nn.Module):
    """transformers' model as a function of pixel values to logits (what exporters take)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class _TransformersOpenVino:
    """transformers' model converted by ``openvino.convert_model`` (its own graph, not ours)
    and compiled for ``pixels``' static shape at ``precision``: the fastest OpenVINO route a
    user has without this library."""

    backend = TRANSFORMERS_OPENVINO

    def __init__(self, converted: Any, precision: str) -> None:
        self.precision = precision
        config = openvino_backend.compile_config(precision, cache=False)
        self.request = openvino_backend.core().compile_model(converted, "CPU", config)
        self.request = self.request.create_infer_request()

    @staticmethod
    def convert(model: torch.nn.Module, pixels: torch.Tensor) -> Any:
        import openvino as ov

        with torch.no_grad():
            converted = ov.convert_model(_LogitsOnly(model), example_input=pixels)
        converted.reshape({0: list(pixels.shape)})
        return converted

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: pixel_values.contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


class _TransformersOnnxRuntime:
    """transformers' model exported by ``torch.onnx.export`` (defaults, static shape) and run
    by onnxruntime with PyTorch's thread count."""

    backend = TRANSFORMERS_ONNXRUNTIME
    precision = "fp32"

    def __init__(self, model: torch.nn.Module, pixels: torch.Tensor, folder: str) -> None:
        import onnxruntime as ort

        path = os.path.join(folder, "transformers.onnx")
        with (
            torch.no_grad(),
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
            contextlib.ExitStack() as restore,
        ):
            warnings.simplefilter("ignore")
            for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # progress chatter
                exporter_log = logging.getLogger(name)
                restore.callback(exporter_log.setLevel, exporter_log.level)
                exporter_log.setLevel(logging.ERROR)
            torch.onnx.export(_LogitsOnly(model), (pixels,), path, input_names=["pixel_values"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixel_values": x})[0])


def peer_routes() -> list[tuple[str, str]]:
    """(route, precision) of the routes to transformers' model a user has without this
    library and that can run here: its graph on OpenVINO (fp32, and bf16 where the CPU has
    it) and its own ONNX export on onnxruntime."""
    routes = []
    if openvino_backend.available():
        routes.append((TRANSFORMERS_OPENVINO, "fp32"))
        if openvino_backend.cpu_has_bf16():
            routes.append((TRANSFORMERS_OPENVINO, "bf16"))
    routes.append((TRANSFORMERS_ONNXRUNTIME, "fp32"))
    return routes


def model_candidate(
    model: SegformerForSemanticSegmentation,
    backend: str,
    precision: str,
    pixels: torch.Tensor,
    device: str = "cpu",
    shared: dict[str, Any] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One contestant of a model job, pixel values → logits: a transformers route
    (``backend`` one of ``TRANSFORMERS…``) or one of our engines. ``pixels`` fixes the static
    shape the peers compile for. ``shared``: a dict kept across calls for one job, so that
    transformers' model is loaded, and its OpenVINO graph converted, once for every route
    (compiling and converting leave the model as it is)."""
    if not backend.startswith(TRANSFORMERS):
        return create_engine(model, backend=backend, precision=precision, device=device)
    shared = {} if shared is None else shared
    if "reference" not in shared:
        shared["reference"] = transformers_model(model, device)
    reference = shared["reference"]
    if backend == TRANSFORMERS:
        return _TransformersLogits(reference)
    if backend == TRANSFORMERS_COMPILED:
        return _TransformersCompiled(reference)
    if backend == TRANSFORMERS_OPENVINO:
        if "openvino graph" not in shared:
            shared["openvino graph"] = _TransformersOpenVino.convert(reference, pixels)
        return _TransformersOpenVino(shared["openvino graph"], precision)
    if backend == TRANSFORMERS_ONNXRUNTIME:
        # The session holds the model in memory once created: the file can go.
        with tempfile.TemporaryDirectory(prefix="segformer-bench-onnx-") as folder:
            return _TransformersOnnxRuntime(reference, pixels, folder)
    raise SegformerError(f"unknown transformers route {backend!r}")


def photo_candidate(
    model: SegformerForSemanticSegmentation, backend: str, precision: str, device: str = "cpu"
) -> Callable[[str | os.PathLike[str]], torch.Tensor]:
    """One contestant of a photo job, image file → full-resolution labels: transformers'
    pipeline (``backend`` TRANSFORMERS) or ours on one of our engines."""
    if backend == TRANSFORMERS:
        return transformers_photo_pipeline(model, device)
    return photo_pipeline(model, backend, precision, device)


class IsolatedCandidate:
    """A contestant built, run and timed in a process of its own (``python -m
    segformer.tools.bench``), driven over a socket pair.

    Why: a user runs one runtime per process, and in a shared process one runtime's worker
    threads can still be busy when the next one starts (onnxruntime's pool spins after each
    run by default, PyTorch's OpenMP team and OpenVINO's executors briefly too). In a
    process of its own, with ``SETTLE_S`` between contestants, each starts on idle cores.
    Measured side by side on B0 512² (``segformer bench`` with and without ``--in-process``,
    alternated twice), our OpenVINO fp32 took 52.9 and 54.7 ms in one process, 53.0 and
    51.4 ms isolated: within this machine's noise, so isolation buys fidelity, not a
    different answer."""

    def __init__(
        self,
        spec: dict[str, Any],
        pixels: torch.Tensor | None = None,
        timeout: float = 1800,
    ) -> None:
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        ours, theirs = socket.socketpair()
        with theirs:
            request = {**spec, "task": "serve", "fd": theirs.fileno()}
            request.setdefault("threads", torch.get_num_threads())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "segformer.tools.bench", json.dumps(request)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=_subprocess_environment(),
            )
        self.connection = multiprocessing.connection.Connection(ours.detach())
        try:
            if pixels is not None:
                self.connection.send(pixels.detach().cpu().numpy())
            self.first_call_s = float(self._receive()["first_call_s"])
        except BaseException:
            self.close()
            raise

    def _receive(self) -> Any:
        deadline = time.monotonic() + self.timeout
        while not self.connection.poll(0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise self._failure()
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            raise self._failure() from None

    def _failure(self) -> SegformerError:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        code = self.process.wait()
        self._stderr.seek(0)
        tail = " ".join(self._stderr.read().decode(errors="replace").strip().splitlines()[-3:])
        return SegformerError(f"benchmark subprocess failed ({code}): {tail[:500]}")

    def result(self) -> torch.Tensor:
        """The contestant's output on its input (logits, or labels for a photo job)."""
        self.connection.send("result")
        return torch.from_numpy(self._receive())

    def time_burst(self, burst: int) -> float:
        """Seconds of the last of ``burst`` calls in a row, timed in the contestant's process."""
        self.connection.send(int(burst))
        return float(self._receive())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.connection.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()

    def __enter__(self) -> IsolatedCandidate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _serve_candidate(spec: dict[str, Any], connection: Any) -> None:
    """The body of an ``IsolatedCandidate``'s process: build the contestant, run it once, then
    answer "result" (its output) and bursts (the seconds of the last call) until told to
    stop."""
    torch.set_num_threads(int(spec["threads"]))
    model = load(spec["model"])
    backend, precision, device = spec["backend"], spec["precision"], spec.get("device", "cpu")
    started = time.perf_counter()
    if spec["job"] == "photo":
        run = photo_candidate(model, backend, precision, device)
        image = spec["image"]
        call: Callable[[], torch.Tensor] = lambda: run(image)  # noqa: E731
    else:
        pixels = torch.from_numpy(connection.recv()).to(device)
        engine = model_candidate(model, backend, precision, pixels, device)
        call = lambda: engine(pixels)  # noqa: E731
    call()
    connection.send({"first_call_s": time.perf_counter() - started})
    timer = _burst_timer(call)
    while (request := connection.recv()) is not None:
        connection.send(call().cpu().numpy() if request == "result" else timer(request))


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------
def engine_name(backend: str, precision: str) -> str:
    return f"{backend} {precision}"


def _agreement(labels: torch.Tensor, exact: torch.Tensor) -> float:
    return float((labels == exact).float().mean())


def sample_pixels(
    model: SegformerForSemanticSegmentation,
    size: tuple[int, int],
    batch: int = 1,
    image: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Model input for a job: ``image`` (a real photo, which label agreement needs) resized and
    normalised by the model's processor, or, without one, a smooth synthetic image."""

    processor = ImageProcessor.from_model(model).replace(
        size=size, do_resize=True, keep_ratio=False, shortest_edge=None
    )
    if image is not None:
        picture = read_image(image)
    else:
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(1, 3, 8, 8, generator=generator)
        smooth = torch.nn.functional.interpolate(
            coarse, size=size, mode="bicubic", align_corners=False
        )
        picture = (smooth[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    pixels = processor(picture)["pixel_values"]
    return pixels.expand(batch, -1, -1, -1).contiguous()


def run_model_job(
    model: SegformerForSemanticSegmentation,
    size: tuple[int, int] = (512, 512),
    *,
    batch: int = 1,
    engines: Sequence[tuple[str, str]] = DEFAULT_ENGINES,
    with_transformers: bool = True,
    with_transformers_compiled: bool = False,
    with_peers: bool = False,
    rounds: int = 10,
    warmup: int = 1,
    image: str | os.PathLike[str] | None = None,
    name: str | None = None,
    device: str = "cpu",
    burst: int = 1,
    isolate: bool = False,
) -> dict[str, Any]:
    """Time the model's forward pass (pixel values → logits) through each of ``engines``
    (and transformers, with ``with_transformers_compiled`` transformers compiled under bf16
    autocast too, and with ``with_peers`` the routes of ``peer_routes``), interleaved; with
    ``isolate`` (CPU only) each in a process of its own (``IsolatedCandidate``), else all in
    this one. See the module docstring."""
    pixels = sample_pixels(model, size, batch, image).to(device)
    routes: list[tuple[str, str]] = []
    if with_transformers and transformers_available():
        routes.append((TRANSFORMERS, "fp32"))
        if with_transformers_compiled:
            routes.append((TRANSFORMERS_COMPILED, "bf16"))
        if with_peers and device == "cpu":
            routes += peer_routes()
    routes += list(engines)
    with _Contestants(model, "model", device, _can_isolate(isolate, device)) as contestants:
        for backend, precision in routes:
            label = TRANSFORMERS if backend == TRANSFORMERS else engine_name(backend, precision)
            contestants.add(label, backend, precision, pixels=pixels)

        # Accuracy: against transformers (or the model as written), labels against fast fp32.
        with torch.inference_mode():
            reference = (
                contestants.result(TRANSFORMERS).float()
                if TRANSFORMERS in contestants.info
                else model(pixels)
            )
            exact_logits = create_engine(model, "fast", "fp32", device)(pixels)
        exact_labels = exact_logits.argmax(dim=1)
        for label, info in contestants.info.items():
            logits = contestants.result(label).float().to(reference.device)
            info["relative_error"] = float((logits - reference).norm() / reference.norm())
            info["label_agreement"] = _agreement(logits.argmax(dim=1), exact_labels)
        samples = time_rounds(contestants.timers, rounds, warmup, burst, contestants.settle)
    results = _rows(contestants.info, samples, batch)
    macs = _model_macs(model, size, batch)
    return {
        "name": name or f"{model.config.variant or 'custom'} {size[0]}×{size[1]}",
        "kind": "model",
        "variant": model.config.variant,
        "num_labels": model.config.num_labels,
        "size": list(size),
        "batch": batch,
        "params_m": parameter_count(model) / 1e6,
        **macs,
        "reference": TRANSFORMERS if TRANSFORMERS in contestants.info else "eager fp32",
        "best_peer": _best_peer(results),
        "isolated": contestants.isolated,
        "results": results,
    }


def _can_isolate(isolate: bool, device: str) -> bool:
    """Whether to isolate contestants: asked for, on the CPU (a GPU is one device whichever
    process drives it), and on a POSIX system (a socket handed to a child process)."""
    if isolate and device == "cpu" and os.name != "posix":
        log.info("timing every engine in this process: isolation needs a POSIX system")
    return isolate and device == "cpu" and os.name == "posix"


class _Contestants(contextlib.ExitStack):
    """A job's contestants by label, built in this process or each in its own
    (``IsolatedCandidate``): their ``info`` rows, ``result(label)`` and ``timers`` for
    ``time_rounds``. Leaving the context stops the processes."""

    def __init__(
        self, model: SegformerForSemanticSegmentation, job: str, device: str, isolated: bool
    ) -> None:
        super().__init__()
        self.model, self.job, self.device, self.isolated = model, job, device, isolated
        # Between contestants in different processes, a pause lets the last one's threads
        # stop spinning; in one process they share a pool or spin on regardless.
        self.settle = SETTLE_S if isolated else 0.0
        self.info: dict[str, dict[str, Any]] = {}
        self.timers: dict[str, Callable[[int], float]] = {}
        self._results: dict[str, Callable[[], torch.Tensor]] = {}
        self._folder: str | None = None
        self._shared: dict[str, Any] = {}  # see model_candidate

    def add(
        self,
        label: str,
        backend: str,
        precision: str,
        *,
        pixels: torch.Tensor | None = None,
        image: str | None = None,
    ) -> None:
        started = time.perf_counter()
        if self.isolated:
            if self._folder is None:  # the model, saved once for every contestant's process
                self._folder = self.enter_context(
                    tempfile.TemporaryDirectory(prefix="segformer-bench-")
                )
                save(self.model, self._folder)
                int8 = (
                    openvino_backend.int8_ir_of(self.model)
                    if openvino_backend.available()
                    else None
                )
                for part in (int8, int8.with_suffix(".bin")) if int8 else ():
                    shutil.copyfile(part, Path(self._folder) / part.name)  # its int8 model too
            spec = {"job": self.job, "model": self._folder, "backend": backend}
            spec.update(precision=precision, device=self.device, image=image)
            contestant = self.enter_context(IsolatedCandidate(spec, pixels))
            first_call_s, result = contestant.first_call_s, contestant.result
            self.timers[label] = contestant.time_burst
        else:
            if self.job == "photo":
                run = photo_candidate(self.model, backend, precision, self.device)
                result = lambda: run(image)  # noqa: E731
            else:
                engine = model_candidate(
                    self.model, backend, precision, pixels, self.device, self._shared
                )
                result = lambda: engine(pixels)  # noqa: E731
            result()  # compiles, exports or warms up
            first_call_s = time.perf_counter() - started
            self.timers[label] = _burst_timer(result)
        self._results[label] = result
        self.info[label] = {
            "backend": backend,
            "precision": precision,
            "first_call_s": first_call_s,
        }

    def result(self, label: str) -> torch.Tensor:
        return self._results[label]()


def _rows(
    info: dict[str, dict[str, Any]],
    samples: dict[str, list[float]],
    batch: int = 1,
) -> list[dict[str, Any]]:
    """One result row per candidate: its info, timing summary, ``ratio`` against eager
    transformers and ``peer_ratio`` against the fastest transformers route timed."""
    base = statistics.median(samples[TRANSFORMERS]) if TRANSFORMERS in samples else None
    peers = [statistics.median(v) for k, v in samples.items() if k.startswith(TRANSFORMERS)]
    best_peer = min(peers) if peers else None
    rows = []
    for label in info:
        row = {"engine": label, **info[label], **summarize(samples[label], batch)}
        row["ratio"] = row["median_ms"] / (base * 1e3) if base else None
        row["peer_ratio"] = row["median_ms"] / (best_peer * 1e3) if best_peer else None
        rows.append(row)
    return rows


def _best_peer(rows: list[dict[str, Any]]) -> str | None:
    """The fastest route to transformers' model among ``rows`` (what ``peer_ratio`` divides
    by)."""
    peers = [row for row in rows if row["engine"].startswith(TRANSFORMERS)]
    return min(peers, key=lambda row: row["median_ms"])["engine"] if peers else None


def _model_macs(
    model: SegformerForSemanticSegmentation, size: tuple[int, int], batch: int
) -> dict[str, float]:

    return {
        # As published (the paper's "GFLOPs" convention); MACs grow linearly with the batch.
        "gmacs": count_macs(model.config, size) * batch / 1e9,
        "executed_gmacs": executed_macs(model, size, batch) / 1e9,
    }


def photo_pipeline(
    model: SegformerForSemanticSegmentation,
    backend: str = "auto",
    precision: str = "fp32",
    device: str = "cpu",
) -> Callable[[str | os.PathLike[str]], torch.Tensor]:
    """Our path from an image file to full-resolution labels: decode, preprocess (the model's
    processor), engine, ``labels_from_logits``."""

    processor = ImageProcessor.from_model(model)
    engine = create_engine(model, backend=backend, precision=precision, device=device)

    def run(path: str | os.PathLike[str]) -> torch.Tensor:
        image = read_image(path)
        pixels = processor(image)["pixel_values"].to(device)
        return labels_from_logits(engine(pixels), (image.height, image.width))[0]

    return run


def transformers_photo_pipeline(
    model: SegformerForSemanticSegmentation, device: str = "cpu"
) -> Callable[[str | os.PathLike[str]], torch.Tensor]:
    """transformers' path: PIL decode, its image processor, its model, its post-processing."""
    from transformers import SegformerImageProcessorPil

    ours = ImageProcessor.from_model(model)
    processor = SegformerImageProcessorPil(
        size={"height": ours.size[0], "width": ours.size[1]},
        image_mean=list(ours.image_mean),
        image_std=list(ours.image_std),
    )
    reference = transformers_model(model, device)

    def run(path: str | os.PathLike[str]) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            outputs = reference(pixel_values=inputs["pixel_values"].to(device))
        return processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(image.height, image.width)]
        )[0]

    return run


def run_photo_job(
    model: SegformerForSemanticSegmentation,
    image: str | os.PathLike[str],
    *,
    engines: Sequence[tuple[str, str]] = (("auto", "fp32"), ("fast", "fp32")),
    with_transformers: bool = True,
    rounds: int = 10,
    warmup: int = 1,
    name: str | None = None,
    device: str = "cpu",
    burst: int = 1,
    isolate: bool = False,
) -> dict[str, Any]:
    """Time a photo file to full-resolution labels (decode → preprocess → model → labels) with
    our pipeline per engine (``auto``: our default, labelled by the backend it picks) and with
    transformers', interleaved; with ``isolate`` (CPU only) each in a process of its own.
    Reports whether each label map is identical to the exact
    reference (upsample-then-argmax of the exact logits)."""

    image = str(image)
    routes = [(TRANSFORMERS, "fp32")] if with_transformers and transformers_available() else []
    for backend, precision in engines:
        if backend == "auto":
            backend = default_backend(precision, resolve_device(device))
        routes.append((backend, precision))
    with _Contestants(model, "photo", device, _can_isolate(isolate, device)) as contestants:
        for backend, precision in routes:
            label = TRANSFORMERS if backend == TRANSFORMERS else engine_name(backend, precision)
            if label not in contestants.info:  # auto may pick an engine also listed
                contestants.add(label, backend, precision, image=image)

        # The exact reference labels: exact logits, upsampled in full, argmax.
        picture = read_image(image)
        pixels = ImageProcessor.from_model(model)(picture)["pixel_values"].to(device)
        exact_logits = create_engine(model, "fast", "fp32", device)(pixels)
        exact = torch.nn.functional.interpolate(
            exact_logits, size=(picture.height, picture.width), mode="bilinear", align_corners=False
        ).argmax(dim=1)[0]
        exact_fast_labels = labels_from_logits(exact_logits, (picture.height, picture.width))[0]
        for label, info in contestants.info.items():
            labels = contestants.result(label)
            info["label_agreement"] = _agreement(labels.to(exact.device), exact)
        info_exact_identical = bool(torch.equal(exact_fast_labels, exact))
        samples = time_rounds(contestants.timers, rounds, warmup, burst, contestants.settle)
    results = _rows(contestants.info, samples)
    return {
        "name": name or f"photo {picture.width}×{picture.height} → labels",
        "kind": "photo",
        "variant": model.config.variant,
        "num_labels": model.config.num_labels,
        "image": image,
        "image_size": [picture.height, picture.width],
        "labels_identical_to_upsample_argmax": info_exact_identical,
        "reference": TRANSFORMERS if TRANSFORMERS in contestants.info else None,
        "best_peer": _best_peer(results),
        "isolated": contestants.isolated,
        "results": results,
    }


def run_labels_job(
    logits: torch.Tensor,
    size: tuple[int, int],
    *,
    rounds: int = 10,
    name: str | None = None,
    burst: int = 1,
) -> dict[str, Any]:
    """Time ``labels_from_logits`` against upsampling every class then argmax (what
    transformers' post-processing does), and check that the labels are identical."""
    reference = lambda: torch.nn.functional.interpolate(  # noqa: E731
        logits, size=size, mode="bilinear", align_corners=False
    ).argmax(dim=1)
    ours = lambda: labels_from_logits(logits, size)  # noqa: E731
    identical = bool(torch.equal(ours(), reference()))
    samples = time_interleaved(
        {"upsample + argmax": reference, "labels_from_logits": ours}, rounds, 1, burst
    )
    base = statistics.median(samples["upsample + argmax"])
    return {
        "name": name or f"labels {tuple(logits.shape)} → {size[0]}×{size[1]}",
        "kind": "labels",
        "identical": identical,
        "results": [
            {"engine": label, **summarize(values), "ratio": statistics.median(values) / base}
            for label, values in samples.items()
        ],
    }


# ---------------------------------------------------------------------------------------
# Peak memory and compile time, each in a fresh process
# ---------------------------------------------------------------------------------------
def _subprocess_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (its allocator included) and thread count, plus ``env``."""
    environment = {**os.environ, **(env or {})}
    environment.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return environment


def _job_process(
    spec: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run ``spec`` through ``python -m segformer.tools.bench`` in a new process (same interpreter,
    allocator and thread count) and return the JSON it prints."""
    environment = _subprocess_environment(env)
    completed = subprocess.run(
        [sys.executable, "-m", "segformer.tools.bench", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = " ".join(completed.stderr.strip().splitlines()[-3:])
        raise SegformerError(f"benchmark subprocess failed ({completed.returncode}): {tail[:500]}")
    return json.loads(lines[-1])


def measure_peak_rss(
    model_source: str,
    runner: str,
    *,
    backend: str = "auto",
    precision: str = "fp32",
    photo: str | None = None,
    size: tuple[int, int] = (512, 512),
    iterations: int = 3,
) -> float:
    """Peak resident memory (MiB) of a fresh process that loads ``model_source`` and runs the
    job ``iterations`` times: ``runner`` is ``"segformer"`` (our engine) or ``"transformers"``;
    with ``photo`` the job is photo → labels, else pixel values → logits at ``size``."""
    spec = {
        "task": "rss",
        "runner": runner,
        "model": model_source,
        "backend": backend,
        "precision": precision,
        "photo": photo,
        "size": list(size),
        "iterations": iterations,
        "threads": torch.get_num_threads(),
    }
    return float(_job_process(spec)["peak_rss_mb"])


def measure_compile_cache(
    model_source: str,
    precision: str = "bf16",
    size: tuple[int, int] = (512, 512),
    backend: str = "compiled",
) -> dict[str, float]:
    """Seconds from engine creation to the first result for ``backend`` ("compiled":
    compilation; "openvino": conversion and compilation): in a first process with an empty
    cache, and in a second process that finds the first one's cache."""
    with tempfile.TemporaryDirectory(prefix="segformer-compile-cache-") as cache:
        spec = {
            "task": "compile",
            "backend": backend,
            "model": model_source,
            "precision": precision,
            "size": list(size),
            "threads": torch.get_num_threads(),
        }
        # Both caches empty at first: our compiled programs and Inductor's generated kernels.
        env = {"SEGFORMER_CACHE": cache, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
        first = _job_process(spec, env)
        second = _job_process(spec, env)
    return {
        "first_process_s": first["first_call_s"],
        "second_process_s": second["first_call_s"],
        "steady_ms": second["steady_ms"],
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. On Linux from /proc's VmHWM, which starts
    afresh at exec; ``ru_maxrss`` would still include the memory of the parent process this
    one was forked from."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The body of a benchmark subprocess (see ``_job_process``)."""
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    task = spec["task"]
    if task == "compile":
        model = load(spec["model"])
        pixels = torch.randn(1, 3, *spec["size"])
        started = time.perf_counter()
        engine = create_engine(model, spec.get("backend", "compiled"), spec["precision"])
        engine(pixels)
        first = time.perf_counter() - started
        steady = statistics.median(
            time_interleaved({"engine": lambda: engine(pixels)}, 5)["engine"]
        )
        return {"first_call_s": first, "steady_ms": steady * 1e3}
    if task == "rss":
        model = load(spec["model"])
        if spec["runner"] == TRANSFORMERS:
            if spec["photo"]:
                run = transformers_photo_pipeline(model)
            else:
                engine = _TransformersLogits(transformers_model(model))
        elif spec["photo"]:
            run = photo_pipeline(model, spec["backend"], spec["precision"])
        else:
            engine = create_engine(model, spec["backend"], spec["precision"])
        del model
        gc.collect()
        pixels = torch.randn(1, 3, *spec["size"])
        for _ in range(int(spec["iterations"])):
            if spec["photo"]:
                run(spec["photo"])
            else:
                engine(pixels)
        return {"peak_rss_mb": peak_rss_mb()}
    raise SegformerError(f"unknown benchmark task {task!r}")


# ---------------------------------------------------------------------------------------
# Presenting results
# ---------------------------------------------------------------------------------------
def floors_ms(job: dict[str, Any], machine: dict[str, Any]) -> dict[str, float]:
    """The physical floor of a model job: executed GMACs over the peak matmul rate."""
    peaks = machine.get("peak_gmacs_per_s") or {}
    executed = job.get("executed_gmacs")
    if not executed:
        return {}
    return {precision: executed / rate * 1e3 for precision, rate in peaks.items() if rate}


def thread_count_text(machine: dict[str, Any]) -> str:
    """'1 thread', '2 threads' … from a results document's machine description."""
    count = machine.get("threads", "?")
    return f"{count} thread" if count == 1 else f"{count} threads"


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    if value is None:
        return missing
    return format(value, spec)


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table, one block per job."""
    machine = results.get("machine", {})
    lines = [
        f"{machine.get('cpu', '?')} · {thread_count_text(machine)} · allocator {machine.get('allocator', '?')} · "
        f"torch {machine.get('torch', '?')} · transformers {machine.get('transformers', '–')} · "
        f"onnxruntime {machine.get('onnxruntime', '–')} · openvino {machine.get('openvino', '–')}",
    ]
    peaks = machine.get("peak_gmacs_per_s")
    if peaks:
        lines.append("peak matmul: " + ", ".join(f"{k} {v:.0f} GMAC/s" for k, v in peaks.items()))
    for job in results.get("jobs", []):
        lines.append("")
        header = job["name"]
        if job.get("gmacs"):
            header += f" · {job['gmacs']:.1f} GMACs as published, {job['executed_gmacs']:.1f} executed by fast"
            floors = floors_ms(job, machine)
            if floors:
                header += " · floor " + ", ".join(f"{k} {v:.1f} ms" for k, v in floors.items())
        if "labels_identical_to_upsample_argmax" in job:
            header += (
                f" · labels_from_logits identical: {job['labels_identical_to_upsample_argmax']}"
            )
        if "identical" in job:
            header += f" · identical: {job['identical']}"
        if job.get("best_peer"):
            header += f" · best route without us: {job['best_peer']}"
        lines.append(header)
        width = max(22, *(len(row["engine"]) + 2 for row in job["results"]))
        lines.append(
            f"  {'engine':<{width}}{'median ms':>11}{'p10–p90 ms':>17}{'img/s':>9}{'ratio':>8}"
            f"{'vs peer':>8}{'rel. error':>12}{'labels':>9}{'peak RSS':>10}"
        )
        for row in job["results"]:
            spread = f"{row['p10_ms']:.1f}–{row['p90_ms']:.1f}"
            agreement = row.get("label_agreement")
            lines.append(
                f"  {row['engine']:<{width}}{row['median_ms']:>11.1f}{spread:>17}{row['images_per_s']:>9.2f}"
                f"{_fmt(row.get('ratio'), '.3f'):>8}{_fmt(row.get('peer_ratio'), '.3f'):>8}"
                f"{_fmt(row.get('relative_error'), '.1e'):>12}"
                f"{_fmt(None if agreement is None else agreement * 100, '.2f'):>8}%"
                f"{_fmt(row.get('peak_rss_mb'), '.0f'):>7} MiB"
            )
    return "\n".join(lines)


def save_results(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write results as JSON, atomically (the server reads this file while it may change)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(results, stream, indent=2)
        stream.write("\n")
    os.chmod(temporary, 0o644)  # mkstemp makes it private; results are for reading
    os.replace(temporary, path)
    return path


def save_chart(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG bar chart: median time per engine for each job, transformers first, with the
    ratio to it written on every bar."""

    matplotlib.use("Agg")

    jobs = [job for job in results.get("jobs", []) if job.get("results")]
    if not jobs:
        raise SegformerError("no benchmark results to chart")
    height = sum(0.45 * len(job["results"]) + 0.9 for job in jobs)
    figure, axes = plt.subplots(len(jobs), 1, figsize=(9, max(3.0, height)), squeeze=False)
    for axis, job in zip(axes[:, 0], jobs, strict=True):
        rows = job["results"]
        names = [row["engine"] for row in rows]
        values = [row["median_ms"] for row in rows]
        colours = ["#9e9e9e" if name.startswith(TRANSFORMERS) else "#2f6db5" for name in names]
        bars = axis.barh(range(len(rows)), values, color=colours)
        axis.set_yticks(range(len(rows)), names)
        axis.invert_yaxis()
        axis.set_xlabel("median ms per call (lower is better)")
        axis.set_title(job["name"], loc="left", fontsize=10)
        for bar, row in zip(bars, rows, strict=True):
            note = f" {row['median_ms']:.1f} ms"
            if row.get("ratio") is not None:
                note += f" ({row['ratio']:.2f}×)"
            axis.text(
                bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8
            )
        axis.set_xlim(0, max(values) * 1.35)
    machine = results.get("machine", {})
    figure.suptitle(
        f"{machine.get('cpu', '')}, {thread_count_text(machine)}, torch {machine.get('torch', '')}",
        fontsize=9,
    )
    figure.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def new_results(peak: bool = True) -> dict[str, Any]:
    """An empty results document with the machine description filled in."""
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(peak=peak),
        "jobs": [],
    }


def default_results_path() -> Path:
    """Where ``segformer bench`` writes its JSON unless told otherwise (the server's
    comparison page reads it from there)."""

    return cache_dir() / "bench.json"


def labels_agreement_on_images(
    model: SegformerForSemanticSegmentation,
    images: Sequence[str | os.PathLike[str]],
    backend: str,
    precision: str,
) -> float:
    """Share of pixels, over ``images``, whose full-resolution label from ``backend`` at
    ``precision`` equals the exact path's (fast fp32)."""
    exact = photo_pipeline(model, "fast", "fp32")
    other = photo_pipeline(model, backend, precision)
    agree = total = 0
    for image in images:
        a, b = exact(image), other(image)
        agree += int((a == b).sum())
        total += a.numel()
    return agree / max(total, 1)


if __name__ == "__main__":  # a benchmark subprocess: one JSON spec in, one JSON line out
    _spec = json.loads(sys.argv[1])
    if _spec["task"] == "serve":  # an IsolatedCandidate: requests over the inherited socket
        _serve_candidate(_spec, multiprocessing.connection.Connection(_spec["fd"]))
    else:
        print(json.dumps(_run_spec(_spec)), flush=True)
    sys.exit(0)


__all__ = [
    "DEFAULT_ENGINES",
    "IsolatedCandidate",
    "default_engines",
    "executed_macs",
    "format_table",
    "machine_info",
    "measure_compile_cache",
    "measure_peak_rss",
    "model_candidate",
    "new_results",
    "peak_matmul_rate",
    "peer_routes",
    "photo_candidate",
    "run_labels_job",
    "run_model_job",
    "run_photo_job",
    "save_chart",
    "save_results",
    "summarize",
    "time_interleaved",
    "time_rounds",
    "variant_table",
]
