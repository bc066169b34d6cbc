"""What the routes share, and the FastAPI dependencies that hand it to them.

``create_app`` puts the settings and the model registry on ``app.state`` when it builds the
app, and the lifespan adds a ``ServerState`` (worker pool, result store, video jobs, private
work folder) when the app starts. Routes never close over these: they declare them as
parameters (``settings: SettingsDep``), so a route reads like its signature says.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from segformer.errors import CheckpointError, ImageError, SegformerError
from segformer.server.errors import busy, error
from segformer.server.jobs import VideoJobs
from segformer.server.pool import PoolFull, Slot, WorkerPool
from segformer.server.registry import ModelRegistry, ServedModel
from segformer.server.settings import Settings
from segformer.server.store import ResultStore

# The two routes that take uploads; the middleware decides about them before their body arrives.
IMAGE_UPLOAD = "/v1/segment"
VIDEO_UPLOAD = "/v1/videos"
# Where the admission middleware leaves the pool place it took for an upload (ASGI scope key).
SLOT_KEY = "segformer.slot"


class ServerState:
    """The parts of a running server that live from its start to its shutdown."""

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


def running_state(app: FastAPI) -> ServerState:
    """The state of a started app (the lifespan has run)."""
    return app.state.server


# -- dependencies ---------------------------------------------------------------------------
def _server(request: Request) -> ServerState:
    return running_state(request.app)


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _prefix(request: Request) -> str:
    """The URL prefix a proxy serves the app under ('' when none): links the server hands out
    must carry it."""
    return request.scope.get("root_path", "")


def _slot(request: Request) -> Slot | None:
    return request.scope.get(SLOT_KEY)


ServerDep = Annotated[ServerState, Depends(_server)]
SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
PrefixDep = Annotated[str, Depends(_prefix)]
SlotDep = Annotated[Slot | None, Depends(_slot)]


# -- helpers the routes share ----------------------------------------------------------------
def served_model(registry: ModelRegistry, name: str | None) -> ServedModel:
    """The model a request's ``model`` field names (None: the default); 422 when unknown."""
    served = registry.get(name)
    if served is None:
        raise error(
            422, f"model: no model named {name!r} here; available: {', '.join(registry.names)}"
        )
    return served


async def on_worker(server: ServerState, fn: Any, *args: Any, slot: Slot | None = None) -> Any:
    """``fn(*args)`` on the image pool (in ``slot`` when the request reserved one), with the
    server's answers for full, slow and broken. ImageError is left to the caller, which knows
    the upload's name."""
    settings = server.settings
    try:
        return await server.pool.run(fn, *args, timeout=settings.request_timeout, slot=slot)
    except PoolFull as exc:
        raise busy(exc, "requests") from None
    except TimeoutError:
        raise error(
            504,
            f"the request took longer than this server's limit of {settings.request_timeout:g} s",
        ) from None
    except CheckpointError as exc:
        raise error(500, f"the model could not be loaded: {exc}") from None
    except ImageError:
        raise
    except SegformerError as exc:
        raise error(422, str(exc)) from None
