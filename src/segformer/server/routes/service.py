"""The page at ``/``, liveness and load, the models served, and benchmark results."""

from __future__ import annotations

import asyncio
import json
from html import escape
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from segformer import __version__
from segformer.server import schemas
from segformer.server.errors import error, responses
from segformer.server.state import PrefixDep, RegistryDep, ServerDep, SettingsDep, on_worker

STATIC = Path(__file__).parents[1] / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page(prefix: PrefixDep) -> HTMLResponse:
    html = await asyncio.to_thread((STATIC / "index.html").read_text, encoding="utf-8")
    # <base> makes the page's relative links work under any proxy prefix
    html = html.replace('<base href="/">', f'<base href="{escape(prefix)}/">')
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/healthz", response_model=schemas.Health, tags=["service"])
async def healthz(server: ServerDep, settings: SettingsDep) -> dict[str, Any]:
    """Liveness and load: models, how full the image and video queues are, and the limits."""
    return {
        "status": "ok",
        "version": __version__,
        "models": [{"name": m.name, "loaded": m.loaded} for m in server.registry.models.values()],
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


@router.get("/v1/models", response_model=schemas.ModelList, tags=["models"])
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    """The models served here. Details (labels, palette, variant …) are given for loaded
    models; ask ``/v1/models/{name}`` to load one and get them."""
    models = []
    for name, served in registry.models.items():
        info = served.info() if served.loaded else {"name": name, "loaded": False}
        models.append({**info, "default": name == registry.default})
    return {"default": registry.default, "models": models}


@router.get(
    "/v1/models/{name}",
    response_model=schemas.ModelInfo,
    responses=responses(404, 422, 500, 503, 504),
    tags=["models"],
)
async def model_info(name: str, server: ServerDep, registry: RegistryDep) -> dict[str, Any]:
    """One model's labels, palette, variant, parameters, source and licence (loading it
    first if it has not been used yet)."""
    served = registry.get(name)
    if served is None:
        raise error(404, f"no model named {name!r} here; available: {', '.join(registry.names)}")
    if not served.loaded:
        await on_worker(server, served.segmenter)
    return {**served.info(), "default": served.name == registry.default}


@router.get("/v1/bench", response_model=schemas.BenchResults, tags=["service"])
async def bench_results(settings: SettingsDep) -> dict[str, Any]:
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
