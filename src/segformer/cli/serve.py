"""``segformer serve``: the web app and REST API (segformer.server) under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import TYPE_CHECKING

from segformer.errors import SegformerError

if TYPE_CHECKING:
    from segformer.server.settings import Settings

log = logging.getLogger("segformer")


def register(subparsers: argparse._SubParsersAction) -> None:
    from segformer.server.settings import MB, Settings

    defaults = Settings.__dataclass_fields__
    parser = subparsers.add_parser(
        "serve",
        help="run the web app and REST API",
        description=(
            "Serve models over HTTP: a page at / to segment photos and videos and compare "
            "models, and a REST API (/v1/segment, /v1/videos, /v1/models; OpenAPI at "
            "/openapi.json). Binds to loopback unless --host says otherwise; there is no "
            "authentication, so put it behind a proxy before exposing it."
        ),
    )
    parser.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="[NAME=]MODEL",
        help="a model to serve (built-in name, checkpoint file, folder or hub id), optionally "
        "named NAME; repeat to serve several, the first is the default "
        "(default: the built-in model)",
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host",
        metavar="ADDRESS",
        default=defaults["host"].default,
        help="address to bind (default: %(default)s)",
    )
    net.add_argument(
        "--port",
        type=int,
        metavar="N",
        default=defaults["port"].default,
        help="port (default: %(default)s)",
    )
    net.add_argument(
        "--root-path",
        default="",
        metavar="PREFIX",
        help="URL prefix when a proxy serves the app under a path, e.g. /segformer",
    )
    work = parser.add_argument_group("work and limits")
    work.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=defaults["workers"].default,
        help="inference threads (default: %(default)s)",
    )
    work.add_argument(
        "--queue", type=int, metavar="N", default=defaults["queue_size"].default,
        help="requests that may wait for a worker; beyond that, 503 (default: %(default)s)",
    )  # fmt: skip
    work.add_argument(
        "--timeout", type=float, metavar="S", default=defaults["request_timeout"].default,
        help="seconds before an image request gets 504 (default: %(default)s)",
    )  # fmt: skip
    work.add_argument(
        "--max-upload-mb", type=float, metavar="MB", default=defaults["max_upload_bytes"].default / MB,
        help="largest image upload in MB (default: %(default)g)",
    )  # fmt: skip
    work.add_argument(
        "--max-uploads", type=int, metavar="N", default=defaults["max_uploads"].default,
        help="uploads read at once; beyond that, 503 before the body is read (default: %(default)s)",
    )  # fmt: skip
    work.add_argument(
        "--max-pixels", type=int, metavar="N", default=defaults["max_pixels"].default,
        help="largest image in pixels (default: %(default)d)",
    )  # fmt: skip
    work.add_argument(
        "--reduced-decode", action="store_true",
        help="decode JPEG uploads at 1/2, 1/4 or 1/8 of their size, never below the model's "
        "input: faster for large photos; results come at the decoded size",
    )  # fmt: skip
    work.add_argument(
        "--video-max-upload-mb", type=float, metavar="MB", default=defaults["video_max_upload_bytes"].default / MB,
        help="largest video upload in MB (default: %(default)g)",
    )  # fmt: skip
    work.add_argument(
        "--video-max-frames", type=int, metavar="N", default=defaults["video_max_frames"].default,
        help="longest video in frames (default: %(default)d)",
    )  # fmt: skip
    work.add_argument(
        "--video-workers", type=int, metavar="N", default=defaults["video_workers"].default,
        help="videos segmented at once (default: %(default)s)",
    )  # fmt: skip
    work.add_argument(
        "--job-ttl", type=float, metavar="S", default=defaults["job_ttl"].default,
        help="seconds a finished video job and its files are kept (default: %(default)g)",
    )  # fmt: skip
    work.add_argument(
        "--work-dir",
        metavar="DIR",
        help="folder for video jobs' files (default: the system's temporary folder)",
    )
    model = parser.add_argument_group("inference")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: auto)")
    model.add_argument("--backend", default="auto", help="inference engine (default: auto)")
    model.add_argument("--precision", default="fp32", help="fp32, bf16 … (default: fp32)")
    model.add_argument(
        "--mode", default="whole", choices=["whole", "slide"], help="default inference mode"
    )
    model.add_argument(
        "--preload", action="store_true", help="load every model at start, not only the first"
    )
    model.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (default: the cores divided among the workers)",
    )
    parser.add_argument(
        "--bench-results", metavar="PATH", help="`segformer bench` JSON for the comparison page"
    )
    parser.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from segformer.server.settings import MB, Settings

    settings = Settings(
        models=args.model or [],
        host=args.host,
        port=args.port,
        root_path=args.root_path.rstrip("/"),
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        mode=args.mode,
        preload=args.preload,
        threads=args.threads,
        workers=args.workers,
        queue_size=args.queue,
        request_timeout=args.timeout,
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_pixels=args.max_pixels,
        max_uploads=args.max_uploads,
        reduced_decode=args.reduced_decode,
        video_workers=args.video_workers,
        video_max_upload_bytes=int(args.video_max_upload_mb * MB),
        video_max_frames=args.video_max_frames,
        job_ttl=args.job_ttl,
        bench_results=args.bench_results,
        work_dir=args.work_dir,
    )
    return serve(settings)


def serve(settings: Settings) -> int:
    """Load the models, then run the app until interrupted."""
    import torch
    import uvicorn

    from segformer.server import create_app

    # Each worker runs its own forward passes; sharing the cores out avoids oversubscription.
    # One worker keeps torch's default (every core).
    if settings.threads or settings.workers > 1:
        torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // settings.workers))
    app = create_app(settings)
    # Load before uvicorn starts, so that a bad model is a one-line error, not a traceback.
    app.state.registry.load_at_start(settings.preload)
    if not _is_loopback(settings.host):
        log.warning(
            "listening on %s: anyone who can reach this address can use the server (no authentication)",
            settings.host,
        )
    shown = "localhost" if settings.host in ("127.0.0.1", "::1") else settings.host
    log.info(
        "segformer serve: http://%s:%d%s/ (Ctrl-C to stop)",
        shown,
        settings.port,
        settings.root_path,
    )
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            timeout_graceful_shutdown=10,
        )
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind or start
        code = exc.code if isinstance(exc.code, int) else 1
        if code:
            raise SegformerError(
                f"the server could not start on {settings.host}:{settings.port} (see above)"
            ) from None
    return 0
