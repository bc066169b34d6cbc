"""The web app: a REST API over ``Segmenter`` and ``segment_video``, and the page at ``/``.

``create_app(settings)`` returns a FastAPI application; ``segformer serve`` runs it with
uvicorn. Design points a reviewer should know:

- Inference never runs on the event loop: image requests go to a bounded ``WorkerPool``
  (503 with Retry-After when it is full, 504 when a request runs past its timeout), videos to
  a second one, so a long video never blocks a photo's queue slot.
- Upload limits are enforced while the body streams in (``UploadLimit``): a declared
  Content-Length over the limit is refused before a byte is read, and a body that grows past
  it is cut off. Images are judged by their content (Pillow), never by name or header.
- Image uploads stay in memory (bounded by the limit) and their results are kept in memory
  for ``output=url``; the only files on disk are video jobs, in a private folder that is
  removed when jobs expire and on shutdown.
- Every error is ``{"detail": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from html import escape
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segformer import __version__
from segformer.errors import CheckpointError, ImageError, SegformerError
from segformer.inference.segmenter import SegmentationResult
from segformer.server import schemas
from segformer.server.jobs import DONE, FORMATS, VideoJob, VideoJobs, VideoRefused, read_frame_stats
from segformer.server.pool import PoolFull, WorkerPool
from segformer.server.registry import ModelRegistry, ServedModel
from segformer.server.settings import MB, Settings
from segformer.server.store import ResultStore, StoredFile

log = logging.getLogger("segformer.server")

STATIC = Path(__file__).parent / "static"
# Room for the multipart framing and the small form fields around an upload.
MULTIPART_OVERHEAD = 64 * 1024
PICTURES = ("label_map", "overlay", "colored")
RESULT_FILES = {f"{name}.png": name for name in PICTURES}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
        b"style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
        b"base-uri 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
]


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=_one_line(message), headers=headers)


def _busy(exc: PoolFull, what: str) -> HTTPException:
    return _error(
        503,
        f"the server is busy with other {what}; try again in {exc.retry_after} s",
        {"Retry-After": str(exc.retry_after)},
    )


def _display_name(filename: str | None, fallback: str) -> str:
    """The client's file name, safe to echo in a one-line message (no path, no control chars)."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", Path(filename or "").name)[:100]
    return name or fallback


def _route_path(scope: Scope) -> str:
    """The path the app routes on: behind a proxy that keeps the prefix, without root_path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


# ---------------------------------------------------------------------------------------
# ASGI middleware
# ---------------------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


class UploadLimit:
    """Refuses request bodies over the limit with 413, counting bytes as they arrive: a
    Content-Length over the limit is refused before anything is read, a chunked body is cut
    off as soon as it passes the limit. Video uploads have their own, larger limit."""

    def __init__(self, app: ASGIApp, image_limit: int, video_limit: int) -> None:
        self.app = app
        self.image_limit = image_limit + MULTIPART_OVERHEAD
        self.video_limit = video_limit + MULTIPART_OVERHEAD
        self.image_mb = image_limit / MB
        self.video_mb = video_limit / MB

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        video = scope["method"] == "POST" and _route_path(scope) == "/v1/videos"
        limit = self.video_limit if video else self.image_limit
        megabytes = self.video_mb if video else self.image_mb
        message = f"the upload is larger than this server's limit of {megabytes:g} MB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, message, close=True)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message)  # FastAPI answers it as it is
            return event

        async def tracking_send(event: Message) -> None:
            nonlocal started
            if event["type"] == "http.response.start":
                started = True
            await send(event)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as exc:  # raised while reading outside a route (no handler ran)
            if started or exc.status_code != 413:
                raise
            await _send_json(send, 413, message, close=True)


class RootPath:
    """Tells the app the URL prefix a proxy serves it under, whatever ASGI server runs it
    (uvicorn's --root-path does the same; this keeps ``create_app`` self-contained)."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not scope.get("root_path"):
            scope = {**scope, "root_path": self.root_path}
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Headers that keep the page and the API from being framed, sniffed or leaking referrers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(event: Message) -> None:
            if event["type"] == "http.response.start":
                present = {name.lower() for name, _ in event.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                event = {**event, "headers": [*event.get("headers", []), *extra]}
            await send(event)

        await self.app(scope, receive, with_headers)


async def _send_json(send: Send, status: int, detail: str, close: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def refusal(data: bytes, name: str, max_pixels: int) -> tuple[int, str | None]:
    """The HTTP status for an upload the image reader refused: 415 when it is not an image by
    its content, 413 when it is one with too many pixels (with this server's wording), 422
    when it is a broken image. The message is None where the reader's own one fits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:  # past Pillow's own limit: it gives only the count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found[1]) / 1e6:.0f} megapixels" if found else "far too many pixels"
        return (
            413,
            f"{name}: image has {size}, above this server's limit of {max_pixels / 1e6:.1f} megapixels",
        )
    except Exception:  # Pillow raises many types for what it cannot identify
        return 415, None
    if width * height > max_pixels:
        return 413, (
            f"{name}: image is {width}×{height} ({width * height / 1e6:.1f} megapixels), above this "
            f"server's limit of {max_pixels / 1e6:.1f} megapixels"
        )
    return 422, None


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # 3× quicker than the default, ~15% larger
    return buffer.getvalue()


def _segment(
    served: ServedModel,
    mode: str | None,
    data: bytes,
    pictures: list[str],
    opacity: float,
    legend: str,
    submitted: float,
) -> tuple[SegmentationResult, dict[str, bytes], float, float]:
    """Runs on a worker: decode, segment, and encode the requested pictures."""
    queue_ms = (time.perf_counter() - submitted) * 1000
    result = served.segmenter(mode)(data)
    assert isinstance(result, SegmentationResult)
    start = time.perf_counter()
    files: dict[str, bytes] = {}
    for name in pictures:
        if name == "label_map":
            files[name] = result.label_png()
        elif name == "overlay":
            files[name] = _png(
                result.overlay(opacity, legend=False if legend == "none" else legend)
            )
        else:
            files[name] = _png(result.colored())
    return result, files, queue_ms, (time.perf_counter() - start) * 1000


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, settings: Settings, registry: ModelRegistry, work_dir: Path) -> None:
        self.settings = settings
        self.registry = registry
        self.work_dir = work_dir
        self.pool = WorkerPool(settings.workers, settings.queue_size, "segformer-infer")
        self.store = ResultStore(settings.result_store_bytes, settings.result_ttl)
        self.jobs = VideoJobs(settings, registry, work_dir / "videos")

    def sweep(self) -> None:
        self.store.sweep()
        self.jobs.sweep()

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.jobs.shutdown()
        shutil.rmtree(self.work_dir, ignore_errors=True)


ERRORS = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in {
        400: "A malformed request body (e.g. broken multipart framing).",
        404: "Not found (or expired).",
        409: "The video job has not finished (or failed).",
        413: "Upload larger than the server's limit, or an image/video over its pixel or frame limit.",
        415: "The upload is not an image (or not a video), judged by its content.",
        422: "Invalid parameters, or a damaged image.",
        500: "The server could not load a configured model.",
        503: "Busy: every worker is taken and the queue is full (see Retry-After).",
        504: "The request took longer than the server's timeout.",
    }.items()
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application for ``settings``. Models are loaded when the app starts (its
    lifespan), so a model that cannot be loaded stops the start with its error."""
    settings = settings or Settings()
    registry = ModelRegistry(settings)
    index_html = (STATIC / "index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(registry.load_at_start, settings.preload)
        if settings.work_dir is not None:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="segformer-serve-", dir=settings.work_dir))
        state = ServerState(settings, registry, work_dir)
        app.state.server = state
        sweeper = asyncio.create_task(_sweep_forever(state))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await asyncio.to_thread(state.shutdown)

    app = FastAPI(
        title="SegFormer",
        version=__version__,
        summary="Semantic segmentation of images and videos with SegFormer models.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; /openapi.json is what matters
        redoc_url=None,
    )
    app.state.registry = registry
    app.add_middleware(
        UploadLimit,
        image_limit=settings.max_upload_bytes,
        video_limit=settings.video_max_upload_bytes,
    )
    app.add_middleware(SecurityHeaders)
    if settings.root_path:
        app.add_middleware(RootPath, root_path=settings.root_path)
    app.mount("/static", StaticFiles(directory=STATIC, follow_symlink=False), name="static")

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": _one_line(str(exc.detail))}, exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(
                str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")
            )
            parts.append(
                f"{where}: {error.get('msg', 'invalid')}"
                if where
                else str(error.get("msg", "invalid"))
            )
        return JSONResponse({"detail": _one_line("; ".join(parts) or "invalid request")}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, 500)

    def state(request: Request) -> ServerState:
        return request.app.state.server

    def served_model(name: str | None) -> ServedModel:
        served = registry.get(name)
        if served is None:
            raise _error(
                422, f"model: no model named {name!r} here; available: {', '.join(registry.names)}"
            )
        return served

    def root(request: Request) -> str:
        return request.scope.get("root_path", "")

    # -- the page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        # <base> makes the page's relative links work under any proxy prefix
        html = index_html.replace('<base href="/">', f'<base href="{escape(root(request))}/">')
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    # -- service --------------------------------------------------------------------------
    @app.get("/healthz", response_model=schemas.Health, tags=["service"])
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness and load: models, how full the image and video queues are, and the limits."""
        server = state(request)
        return {
            "status": "ok",
            "version": __version__,
            "models": [{"name": m.name, "loaded": m.loaded} for m in registry.models.values()],
            "images": {"in_flight": server.pool.in_flight, "capacity": server.pool.capacity},
            "videos": {"in_flight": server.jobs.active(), "capacity": server.jobs.pool.capacity},
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "request_timeout_s": settings.request_timeout,
                "video_max_upload_bytes": settings.video_max_upload_bytes,
                "video_max_frames": settings.video_max_frames,
                "video_max_pixels": settings.video_max_pixels,
            },
        }

    @app.get("/v1/models", response_model=schemas.ModelList, tags=["models"])
    async def list_models() -> dict[str, Any]:
        """The models served here. Details (labels, palette, variant …) are given for loaded
        models; ask ``/v1/models/{name}`` to load one and get them."""
        models = []
        for name, served in registry.models.items():
            info = served.info() if served.loaded else {"name": name, "loaded": False}
            models.append({**info, "default": name == registry.default})
        return {"default": registry.default, "models": models}

    @app.get(
        "/v1/models/{name}",
        response_model=schemas.ModelInfo,
        responses=_errors(404, 422, 500, 503, 504),
        tags=["models"],
    )
    async def model_info(request: Request, name: str) -> dict[str, Any]:
        """One model's labels, palette, variant, parameters, source and licence (loading it
        first if it has not been used yet)."""
        served = registry.get(name)
        if served is None:
            raise _error(
                404, f"no model named {name!r} here; available: {', '.join(registry.names)}"
            )
        if not served.loaded:
            await _on_worker(state(request), served.segmenter)
        return {**served.info(), "default": served.name == registry.default}

    @app.get("/v1/bench", response_model=schemas.BenchResults, tags=["service"])
    async def bench_results() -> dict[str, Any]:
        """Latency per model and backend measured on this machine by ``segformer bench``."""
        path = settings.bench_results_path
        hint = (
            "run `segformer bench` on this machine (the server reads its default results file, "
            "or the one given with --bench-results) and reload"
        )
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            modified = path.stat().st_mtime
        except OSError:
            return {"available": False, "message": f"no benchmark results yet: {hint}"}
        try:
            results = json.loads(text)
        except json.JSONDecodeError:
            return {
                "available": False,
                "message": f"the benchmark results file is not valid JSON: {hint}",
            }
        if not isinstance(results, dict):
            return {
                "available": False,
                "message": f"the benchmark results file is not a JSON object: {hint}",
            }
        return {"available": True, "modified_at": modified, "results": results}

    # -- images ---------------------------------------------------------------------------
    @app.post(
        "/v1/segment",
        response_model=schemas.SegmentResponse,
        responses=_errors(400, 413, 415, 422, 500, 503, 504),
        tags=["images"],
    )
    async def segment(
        request: Request,
        image: Annotated[
            UploadFile, File(description="The image (JPEG, PNG, WebP, TIFF, BMP, GIF …).")
        ],
        model: Annotated[
            str | None,
            Form(description="A model name from /v1/models (default: the server's first)."),
        ] = None,
        mode: Annotated[
            Literal["whole", "slide"] | None,
            Form(description="Inference mode (default: the server's)."),
        ] = None,
        opacity: Annotated[
            float, Form(ge=0, le=1, description="Overlay opacity of the class colours.")
        ] = 0.5,
        legend: Annotated[
            Literal["none", "side", "inside"], Form(description="Legend on the overlay.")
        ] = "none",
        output: Annotated[
            Literal["inline", "url"], Form(description="Pictures as base64 or as URLs.")
        ] = "inline",
        include: Annotated[
            list[Literal["label_map", "overlay", "colored"]] | None,
            Form(
                description="Pictures to return (repeat the field); default label_map and overlay."
            ),
        ] = None,
    ) -> dict[str, Any]:
        """Segment one image: the classes present with their share of the picture, per-stage
        timings, and the label map and overlay as PNG."""
        received = time.perf_counter()
        server = state(request)
        served = served_model(model)
        data = await image.read(settings.max_upload_bytes + 1)
        name = _display_name(image.filename, "image")
        if len(data) > settings.max_upload_bytes:
            raise _error(
                413,
                f"{name}: larger than this server's limit of {settings.max_upload_bytes / MB:g} MB",
            )
        if not data:
            raise _error(415, f"{name}: empty file, not an image")
        pictures = [p for p in PICTURES if p in (include or ("label_map", "overlay"))]
        try:
            result, files, queue_ms, encode_ms = await _on_worker(
                server, _segment, served, mode, data, pictures, opacity, legend, time.perf_counter()
            )
        except ImageError as exc:
            status, message = await asyncio.to_thread(refusal, data, name, settings.max_pixels)
            raise _error(status, message or str(exc).replace("<bytes>", name)) from None
        record = result.to_dict()
        record.pop("source", None)
        record["timings"].update(queue_ms=round(queue_ms, 3), encode_ms=round(encode_ms, 3))
        record["timings"]["server_ms"] = round((time.perf_counter() - received) * 1000, 3)
        images, expires = _pictures(request, server, files, output)
        return {**record, "images": images, "expires_at": expires}

    def _pictures(
        request: Request, server: ServerState, files: dict[str, bytes], output: str
    ) -> tuple[dict[str, Any], float | None]:
        if output == "inline":
            return {
                k: {"media_type": "image/png", "base64": base64.b64encode(v).decode("ascii")}
                for k, v in files.items()
            }, None
        stored = server.store.put(
            {f"{k}.png": StoredFile(v, "image/png") for k, v in files.items()}
        )
        if stored is None:
            raise _error(
                413,
                "the result pictures are larger than this server keeps for output=url; use output=inline",
            )
        token, expires = stored
        base = f"{root(request)}/v1/results/{token}"
        return {k: {"media_type": "image/png", "url": f"{base}/{k}.png"} for k in files}, expires

    @app.get(
        "/v1/results/{token}/{filename}",
        responses={
            200: {"content": {"image/png": {}}, "description": "The picture."},
            **_errors(404, 422),
        },
        response_class=Response,
        tags=["images"],
    )
    async def result_file(request: Request, token: str, filename: str) -> Response:
        """A picture of an earlier ``output=url`` segmentation, until it expires."""
        stored = state(request).store.get(token, filename) if filename in RESULT_FILES else None
        if stored is None:
            raise _error(404, "no such result (results expire; segment the image again)")
        max_age = max(int(settings.result_ttl), 0)
        return Response(
            stored.data,
            media_type=stored.media_type,
            headers={"Cache-Control": f"private, max-age={max_age}"},
        )

    # -- videos ---------------------------------------------------------------------------
    def job_out(request: Request, job: VideoJob) -> dict[str, Any]:
        base = f"{root(request)}/v1/videos/{job.id}"
        return {
            "id": job.id,
            "status": job.status,
            "model": job.model,
            "filename": job.filename,
            "format": job.format,
            "frames_done": job.frames_done,
            "total_frames": job.total_frames,
            "progress": job.progress(),
            "width": job.width,
            "height": job.height,
            "created_at": job.created,
            "started_at": job.started,
            "finished_at": job.finished,
            "expires_at": job.expires(settings.job_ttl),
            "error": job.error,
            "result": job.result,
            "links": {
                "status": base,
                "result": f"{base}/result",
                "frames": f"{base}/frames",
                "frames_csv": f"{base}/frames.csv",
            },
        }

    def find_job(request: Request, job_id: str) -> VideoJob:
        job = state(request).jobs.get(job_id)
        if job is None:
            raise _error(404, "no such video job (jobs expire; upload the video again)")
        return job

    def finished_job(request: Request, job_id: str) -> VideoJob:
        job = find_job(request, job_id)
        if job.status != DONE:
            if job.status in ("queued", "running"):
                done = (
                    f"{job.frames_done}/{job.total_frames}"
                    if job.total_frames
                    else str(job.frames_done)
                )
                raise _error(
                    409, f"the job is {job.status} ({done} frames); poll /v1/videos/{job.id}"
                )
            raise _error(409, f"the job {job.status}" + (f": {job.error}" if job.error else ""))
        return job

    @app.post(
        "/v1/videos",
        status_code=202,
        response_model=schemas.VideoJobOut,
        responses=_errors(400, 413, 415, 422, 503),
        tags=["videos"],
    )
    async def create_video_job(
        request: Request,
        response: Response,
        video: Annotated[UploadFile, File(description="The video (MP4, MOV, MKV, WebM, AVI …).")],
        model: Annotated[str | None, Form(description="A model name from /v1/models.")] = None,
        mode: Annotated[
            Literal["whole", "slide"] | None, Form(description="Inference mode.")
        ] = None,
        opacity: Annotated[float, Form(ge=0, le=1, description="Overlay opacity.")] = 0.5,
        legend: Annotated[
            bool, Form(description="Draw the frame's main classes in a corner.")
        ] = True,
        format: Annotated[
            Literal["mp4", "webm"], Form(description="Container of the result (H.264 / VP9).")
        ] = "mp4",
    ) -> dict[str, Any]:
        """Start segmenting a video; poll the returned job for progress, then fetch its
        result video and per-frame class statistics."""
        server = state(request)
        served = served_model(model)
        name = _display_name(video.filename, "video")
        size = video.size or 0
        if size > settings.video_max_upload_bytes:
            raise _error(
                413,
                f"{name}: larger than this server's limit of {settings.video_max_upload_bytes / MB:g} MB",
            )
        if size == 0:
            raise _error(415, f"{name}: empty file, not a video")
        try:
            job = await asyncio.to_thread(
                server.jobs.create,
                video.file,
                filename=name,
                model=served.name,
                mode=mode,
                format=format,
                opacity=opacity,
                legend=legend,
            )
        except VideoRefused as exc:
            raise _error(exc.status, str(exc)) from None
        except PoolFull as exc:
            raise _busy(exc, "videos") from None
        out = job_out(request, job)
        response.headers["Location"] = out["links"]["status"]
        return out

    @app.get(
        "/v1/videos/{job_id}",
        response_model=schemas.VideoJobOut,
        responses=_errors(404, 422),
        tags=["videos"],
    )
    async def video_job(request: Request, job_id: str) -> dict[str, Any]:
        """A video job's status and progress."""
        return job_out(request, find_job(request, job_id))

    @app.delete(
        "/v1/videos/{job_id}",
        status_code=204,
        response_class=Response,
        responses=_errors(404, 422),
        tags=["videos"],
    )
    async def delete_video_job(request: Request, job_id: str) -> Response:
        """Cancel a job (if it is still going) and delete its files."""
        if not await asyncio.to_thread(state(request).jobs.delete, job_id):
            raise _error(404, "no such video job")
        return Response(status_code=204)

    @app.get(
        "/v1/videos/{job_id}/result",
        response_class=FileResponse,
        responses={
            200: {
                "content": {"video/mp4": {}, "video/webm": {}},
                "description": "The overlay video.",
            },
            **_errors(404, 409, 422),
        },
        tags=["videos"],
    )
    async def video_result(request: Request, job_id: str, download: bool = False) -> FileResponse:
        """The segmented video (``download=true`` to get it as an attachment)."""
        job = finished_job(request, job_id)
        return FileResponse(
            job.output,
            media_type=FORMATS[job.format],
            filename=job.download_name,
            content_disposition_type="attachment" if download else "inline",
        )

    @app.get(
        "/v1/videos/{job_id}/frames",
        response_model=schemas.FrameStats,
        responses=_errors(404, 409, 422),
        tags=["videos"],
    )
    async def video_frames(request: Request, job_id: str) -> dict[str, Any]:
        """Per-frame class statistics: each class's share of every frame."""
        job = finished_job(request, job_id)
        return await asyncio.to_thread(read_frame_stats, job.stats_csv)

    @app.get(
        "/v1/videos/{job_id}/frames.csv",
        response_class=FileResponse,
        responses={
            200: {"content": {"text/csv": {}}, "description": "One row per frame."},
            **_errors(404, 409, 422),
        },
        tags=["videos"],
    )
    async def video_frames_csv(request: Request, job_id: str) -> FileResponse:
        """Per-frame class statistics as CSV: frame, time_s, model_ms, then one column per class."""
        job = finished_job(request, job_id)
        stem = Path(job.download_name).stem
        return FileResponse(job.stats_csv, media_type="text/csv", filename=f"{stem}_frames.csv")

    return app


async def _on_worker(server: ServerState, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on the image pool, with the server's answers for full, slow and broken."""
    settings = server.settings
    try:
        return await server.pool.run(fn, *args, timeout=settings.request_timeout)
    except PoolFull as exc:
        raise _busy(exc, "requests") from None
    except TimeoutError:
        raise _error(
            504,
            f"the request took longer than this server's limit of {settings.request_timeout:g} s",
        ) from None
    except CheckpointError as exc:
        raise _error(500, f"the model could not be loaded: {exc}") from None
    except ImageError:
        raise
    except SegformerError as exc:
        raise _error(422, str(exc)) from None


async def _sweep_forever(state: ServerState) -> None:
    """Expire stored results and video jobs on a timer (they also expire when looked up)."""
    interval = max(0.5, min(30.0, state.settings.result_ttl / 4, state.settings.job_ttl / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(state.sweep)
        except Exception:  # keep sweeping; a failed rmtree is retried next time
            log.exception("sweeping expired results failed")
