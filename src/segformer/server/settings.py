"""What a running server is allowed to do: which models it serves, how much work it accepts at
once, and how large an upload may be. One dataclass, filled by ``segformer serve`` from its
flags or built directly in Python (``create_app(Settings(models=["my-model"]))``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from segformer.errors import SegformerError
from segformer.tools.bench import default_results_path
from segformer.weights.builtin import DEFAULT_MODEL

MB = 1024 * 1024
# A served model's public name: what clients put in the ``model`` field and what the page shows.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_bench_results() -> Path:
    """Where ``segformer bench`` writes its results unless told otherwise, and so where the
    comparison page looks for them."""

    return default_results_path()


@dataclass(frozen=True)
class ModelSpec:
    """One served model: the name clients use for it and where it is loaded from (anything
    ``Segmenter.from_pretrained`` takes; None: the package's built-in model)."""

    name: str
    source: str | None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=SOURCE`` or just ``SOURCE``; a bare source is named after its last path
        component, so the server's folders never show up in the API."""
        text = text.strip()
        if not text:
            raise SegformerError("an empty model name")
        name, sep, source = text.partition("=")
        if not sep:
            source = text
            name = Path(source.rstrip("/\\")).name
            if Path(name).suffix in (".safetensors", ".pth", ".pt", ".bin"):
                name = Path(name).stem
        if not MODEL_NAME.fullmatch(name):
            raise SegformerError(
                f"{text}: cannot serve this model under the name {name!r}; give it a name of "
                "letters, digits, '.', '_' and '-' as NAME=SOURCE"
            )
        if not source:
            raise SegformerError(f"{text}: no model after '='")
        return cls(name, source)


@dataclass
class Settings:
    """Everything ``create_app`` needs. Sizes are bytes, times are seconds.

    ``models``: model specs (``NAME=SOURCE`` or ``SOURCE``); the first is the default. Empty:
    the built-in model. The first model is loaded at start-up (a broken one stops the server
    from starting); the others on their first use, unless ``preload``.
    ``workers`` threads run image inference; up to ``queue_size`` more requests wait for one,
    and beyond that the server answers 503 with Retry-After. ``request_timeout``: an image
    request that has not finished by then gets 504. ``max_uploads``: request bodies (images and
    videos) read at once; one more is refused with 503 and Retry-After before its body is read.
    ``reduced_decode``: decode JPEG uploads at a libjpeg reduction no smaller than the model's
    input (``Segmenter(reduced_decode=True)``: faster for large photos, results at the decoded
    size).
    ``video_workers`` / ``video_queue`` / ``max_jobs``: video jobs running, waiting, and kept
    (finished ones are evicted oldest first; each also expires ``job_ttl`` after it finishes).
    ``work_dir``: where video uploads and results are kept while their job lives (a private
    folder is made inside it and removed on shutdown; default: the system's temporary folder).
    """

    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""
    device: str = "auto"
    backend: str = "auto"
    precision: str = "fp32"
    mode: str = "whole"
    preload: bool = False
    threads: int | None = None

    workers: int = 1
    queue_size: int = 8
    request_timeout: float = 60.0
    max_upload_bytes: int = 20 * MB
    max_pixels: int = 40_000_000
    max_uploads: int = 8
    reduced_decode: bool = False

    result_ttl: float = 600.0
    result_store_bytes: int = 256 * MB

    video_workers: int = 1
    video_queue: int = 4
    max_jobs: int = 32
    job_ttl: float = 3600.0
    video_max_upload_bytes: int = 200 * MB
    video_max_frames: int = 9000
    video_max_pixels: int = 3840 * 2160
    video_timeout: float = 1800.0

    bench_results: Path | None = None
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        positive_ints = ("workers", "max_jobs", "video_workers", "max_upload_bytes", "max_pixels")
        positive_ints += ("max_uploads",)
        positive_ints += ("video_max_upload_bytes", "video_max_frames", "video_max_pixels")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise SegformerError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("queue_size", "video_queue", "result_store_bytes"):
            if int(getattr(self, name)) < 0:
                raise SegformerError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("request_timeout", "result_ttl", "job_ttl", "video_timeout"):
            if not float(getattr(self, name)) > 0:
                raise SegformerError(
                    f"{name} must be a positive number of seconds, got {getattr(self, name)}"
                )
        if self.threads is not None and self.threads < 1:
            raise SegformerError(f"threads must be at least 1, got {self.threads}")
        if not 0 < self.port < 65536:
            raise SegformerError(f"port must be 1–65535, got {self.port}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise SegformerError(
                f"root_path must start with '/' and not end with one, got {self.root_path!r}"
            )
        if self.bench_results is not None:
            self.bench_results = Path(self.bench_results).expanduser()
        if self.work_dir is not None:
            self.work_dir = Path(self.work_dir).expanduser()
        specs = self.model_specs()
        names = [spec.name for spec in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SegformerError(
                f"two models would be served as {', '.join(repeated)}; name them apart with NAME=SOURCE"
            )

    def model_specs(self) -> list[ModelSpec]:
        if not self.models:
            return [ModelSpec(DEFAULT_MODEL, None)]
        return [ModelSpec.parse(text) for text in self.models]

    @property
    def bench_results_path(self) -> Path:
        return self.bench_results or default_bench_results()
