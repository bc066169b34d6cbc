"""ASGI middleware: what is decided about a request before (or while) its body arrives, and the
headers every answer carries. ``install_middleware`` adds them in the order that matters:

    RootPath → SecurityHeaders → UploadLimit → Admission → MultipartFraming → the routes

- ``UploadLimit``: 413 for a body over the limit, from its Content-Length before a byte is
  read, or as soon as a streamed body passes it.
- ``Admission``: 503 with Retry-After, before the body is read, for an upload that could not
  be served anyway (its queue is full, or too many uploads are arriving at once). The upload
  takes its queue place here and hands it to its task, so a place cannot be lost between the
  check and the work. Refusing before the body matters under a flood: clients that retry at
  once would otherwise make the server parse every refused body, on the thread that also
  feeds the workers. The connection stays open; the server discards the unread body.
- ``MultipartFraming``: 400 for a multipart body that ends without its closing boundary (an
  incomplete upload, whose last part the form parser would silently drop).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import FastAPI, HTTPException
from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segformer.server.errors import busy_message, one_line
from segformer.server.pool import PoolFull
from segformer.server.settings import MB, Settings
from segformer.server.state import IMAGE_UPLOAD, SLOT_KEY, VIDEO_UPLOAD, running_state

# How long a refusal for being busy waits before it is sent (see _refuse_busy).
REFUSAL_PAUSE_S = 0.5
# Room for the multipart framing and the small form fields around an upload.
MULTIPART_OVERHEAD = 64 * 1024
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


def route_path(scope: Scope) -> str:
    """The path the app routes on: behind a proxy that keeps the prefix, without root_path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def upload_kind(scope: Scope) -> str | None:
    """'image' or 'video' for a request that uploads one, else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    return {IMAGE_UPLOAD: "image", VIDEO_UPLOAD: "video"}.get(route_path(scope))


def _header(scope: Scope, name: bytes) -> bytes | None:
    return dict(scope["headers"]).get(name)


async def send_json(
    send: Send,
    status: int,
    detail: str,
    close: bool = False,
    headers: dict[str, str] | None = None,
) -> None:
    """An answer in the routes' error shape, from middleware (where no route handler runs)."""
    body = json.dumps({"detail": one_line(detail)}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def run_watching_body(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, watch: Callable[[bytes, bool], None]
) -> None:
    """Run ``app`` with ``watch(chunk, last)`` called on every body chunk as it arrives.
    ``watch`` refuses a body by raising HTTPException: a route reading the body gets it
    answered by FastAPI as it is; raised where no route handler runs, it is answered here (and
    the connection closed, since the rest of the body is not wanted)."""
    started = False

    async def watched_receive() -> Message:
        event = await receive()
        if event["type"] == "http.request":
            watch(event.get("body", b""), not event.get("more_body", False))
        return event

    async def tracking_send(event: Message) -> None:
        nonlocal started
        started = started or event["type"] == "http.response.start"
        await send(event)

    try:
        await app(scope, watched_receive, tracking_send)
    except HTTPException as exc:
        if started:
            raise
        await send_json(send, exc.status_code, str(exc.detail), close=True)


class UploadLimit:
    """Refuses request bodies over the limit with 413, counting bytes as they arrive: a
    Content-Length over the limit is refused before anything is read, a chunked body is cut
    off as soon as it passes the limit. Video uploads have their own, larger limit."""

    def __init__(self, app: ASGIApp, image_limit: int, video_limit: int) -> None:
        self.app = app
        self.limits = {
            "image": (image_limit + MULTIPART_OVERHEAD, image_limit / MB),
            "video": (video_limit + MULTIPART_OVERHEAD, video_limit / MB),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Every other route takes the image limit: none of them needs a larger body.
        limit, megabytes = self.limits["video" if upload_kind(scope) == "video" else "image"]
        message = f"the upload is larger than this server's limit of {megabytes:g} MB"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_json(send, 413, message, close=True)
            return
        received = 0

        def count(chunk: bytes, last: bool) -> None:
            nonlocal received
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, message)

        await run_watching_body(self.app, scope, receive, send, count)


class Admission:
    """Refuses an upload with 503 and Retry-After before its body is read when its queue is
    full or ``max_uploads`` bodies are already arriving; otherwise takes its queue place (left
    in the scope under ``SLOT_KEY`` for the route) and gives it back if the route does not
    use it."""

    def __init__(self, app: ASGIApp, max_uploads: int) -> None:
        self.app = app
        self.max_uploads = max_uploads
        self.reading = 0  # bodies arriving now; only the event loop's thread touches it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = upload_kind(scope)
        if kind is None:
            await self.app(scope, receive, send)
            return
        if self.reading >= self.max_uploads:
            await _refuse_busy(send, "uploads", 1)
            return
        server = running_state(scope["app"])
        pool = server.pool if kind == "image" else server.jobs.pool
        try:
            slot = pool.reserve()
        except PoolFull as exc:
            await _refuse_busy(send, "requests" if kind == "image" else "videos", exc.retry_after)
            return
        self.reading += 1
        reading = True

        def done_reading() -> None:
            nonlocal reading
            if reading:
                reading = False
                self.reading -= 1

        async def receive_counted() -> Message:
            event = await receive()
            if event["type"] != "http.request" or not event.get("more_body", False):
                done_reading()
            return event

        try:
            await self.app({**scope, SLOT_KEY: slot}, receive_counted, send)
        finally:
            done_reading()
            slot.release()


async def _refuse_busy(send: Send, what: str, retry_after: int) -> None:
    # A client that ignores Retry-After and retries at once would spin, and its CPU comes out
    # of the workers' share of the machine: answering after a short pause (an idle coroutine,
    # no cost here) holds it to a few attempts a second. Retry-After is never shorter.
    await asyncio.sleep(REFUSAL_PAUSE_S)
    # The connection is kept: the ASGI server discards the unread body before the next request.
    message = busy_message(what, retry_after)
    await send_json(send, 503, message, headers={"Retry-After": str(retry_after)})


class MultipartFraming:
    """Refuses with 400 a multipart upload whose body ends without the closing boundary
    (``--BOUNDARY--``). The boundary string cannot occur inside a part, so finding it anywhere
    in the stream is the test; the parts themselves are left to the form parser."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = _header(scope, b"content-type") if upload_kind(scope) else None
        media_type, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if (
            media_type != b"multipart/form-data" or not boundary
        ):  # the form parser says what is wrong
            await self.app(scope, receive, send)
            return
        closing = b"--" + boundary + b"--"
        tail = b""
        seen = False

        def look(chunk: bytes, last: bool) -> None:
            nonlocal tail, seen
            # The closing boundary may straddle two chunks: look across the seam too.
            if not seen:
                seen = closing in chunk or closing in tail + chunk[: len(closing) - 1]
                tail = (tail + chunk)[-(len(closing) - 1) :]
            if last and not seen:
                raise HTTPException(
                    400,
                    "the multipart body ends without its closing boundary: the upload is "
                    "incomplete (was the request cut short?)",
                )

        await run_watching_body(self.app, scope, receive, send, look)


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


def install_middleware(app: FastAPI, settings: Settings) -> None:
    # add_middleware puts each new one outside the ones before it: innermost first.
    app.add_middleware(MultipartFraming)
    app.add_middleware(Admission, max_uploads=settings.max_uploads)
    app.add_middleware(
        UploadLimit,
        image_limit=settings.max_upload_bytes,
        video_limit=settings.video_max_upload_bytes,
    )
    app.add_middleware(SecurityHeaders)
    if settings.root_path:
        app.add_middleware(RootPath, root_path=settings.root_path)
