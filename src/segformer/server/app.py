"""The web app: a REST API over ``Segmenter`` and ``segment_video``, and the page at ``/``.

``create_app(settings)`` returns a FastAPI application; ``segformer serve`` runs it with
uvicorn. Design points a reviewer should know:

- Inference never runs on the event loop: image requests go to a bounded ``WorkerPool``
  (503 with Retry-After when it is full, 504 when a request runs past its timeout), videos to
  a second one, so a long video never blocks a photo's queue slot.
- Uploads are judged before their body is read where possible (``middleware``): over the
  size limit → 413, queue full or too many uploads arriving → 503 with Retry-After, and the
  body is counted while it streams in. Images are judged by their content (Pillow), never by
  name or header.
- Image uploads stay in memory (bounded by the limit) and their results are kept in memory
  for ``output=url``; the only files on disk are video jobs, in a private folder that is
  removed when jobs expire and on shutdown.
- Every error is ``{"detail": "<one line>"}`` (``errors``).

Layout: ``routes/`` (one router per area), ``state`` (what routes share, as dependencies),
``middleware``, ``errors``; the work itself is in ``pool``, ``jobs``, ``store``, ``registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from segformer import __version__
from segformer.server.errors import install_error_handlers
from segformer.server.middleware import install_middleware
from segformer.server.registry import ModelRegistry
from segformer.server.routes import images, service, videos
from segformer.server.settings import Settings
from segformer.server.state import ServerState

log = logging.getLogger("segformer.server")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application for ``settings``. Models are loaded when the app starts (its
    lifespan), so a model that cannot be loaded stops the start with its error."""
    settings = settings or Settings()
    app = FastAPI(
        title="SegFormer",
        version=__version__,
        summary="Semantic segmentation of images and videos with SegFormer models.",
        lifespan=_lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; /openapi.json is what matters
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = ModelRegistry(settings)
    install_middleware(app, settings)
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=service.STATIC, follow_symlink=False), name="static")
    app.include_router(service.router)
    app.include_router(images.router)
    app.include_router(videos.router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    await asyncio.to_thread(app.state.registry.load_at_start, settings.preload)
    if settings.work_dir is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="segformer-serve-", dir=settings.work_dir))
    state = ServerState(settings, app.state.registry, work_dir)
    app.state.server = state
    sweeper = asyncio.create_task(_sweep_forever(state))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await asyncio.to_thread(state.shutdown)


async def _sweep_forever(state: ServerState) -> None:
    """Expire stored results and video jobs on a timer (they also expire when looked up)."""
    interval = max(0.5, min(30.0, state.settings.result_ttl / 4, state.settings.job_ttl / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(state.sweep)
        except Exception:  # keep sweeping; a failed rmtree is retried next time
            log.exception("sweeping expired results failed")
