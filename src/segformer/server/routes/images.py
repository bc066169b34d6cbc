"""Segment one image (``POST /v1/segment``) and fetch the pictures of an ``output=url`` result.

An image upload stays in memory (bounded by the upload limit); decoding, inference and PNG
encoding run on a worker, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from PIL import Image

from segformer.errors import ImageError
from segformer.inference.segmenter import SegmentationResult
from segformer.server import schemas
from segformer.server.errors import error, responses
from segformer.server.registry import ServedModel
from segformer.server.settings import MB
from segformer.server.state import (
    IMAGE_UPLOAD,
    PrefixDep,
    RegistryDep,
    ServerDep,
    SettingsDep,
    SlotDep,
    on_worker,
    served_model,
)
from segformer.server.store import ResultStore, StoredFile

PICTURES = ("label_map", "overlay", "colored")
RESULT_FILES = {f"{name}.png": name for name in PICTURES}

router = APIRouter(tags=["images"])


def display_name(filename: str | None, fallback: str) -> str:
    """The client's file name, safe to echo in a one-line message (no path, no control chars)."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", Path(filename or "").name)[:100]
    return name or fallback


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


def named(message: str, name: str) -> str:
    """The library's message about an unnamed input (it says ``<bytes>`` or ``<image>``),
    naming the upload instead."""
    return re.sub(r"^<[a-z ]+>", lambda _: name, message)


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


def _pictures(
    files: dict[str, bytes], output: str, store: ResultStore, prefix: str
) -> tuple[dict[str, Any], float | None]:
    """The pictures as the response carries them, inline or as links to the result store."""
    if output == "inline":
        return {
            k: {"media_type": "image/png", "base64": base64.b64encode(v).decode("ascii")}
            for k, v in files.items()
        }, None
    stored = store.put({f"{k}.png": StoredFile(v, "image/png") for k, v in files.items()})
    if stored is None:
        raise error(
            413,
            "the result pictures are larger than this server keeps for output=url; use output=inline",
        )
    token, expires = stored
    base = f"{prefix}/v1/results/{token}"
    return {k: {"media_type": "image/png", "url": f"{base}/{k}.png"} for k in files}, expires


@router.post(
    IMAGE_UPLOAD,
    response_model=schemas.SegmentResponse,
    responses=responses(400, 413, 415, 422, 500, 503, 504),
)
async def segment(
    server: ServerDep,
    settings: SettingsDep,
    registry: RegistryDep,
    prefix: PrefixDep,
    slot: SlotDep,
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
        Form(description="Pictures to return (repeat the field); default label_map and overlay."),
    ] = None,
) -> dict[str, Any]:
    """Segment one image: the classes present with their share of the picture, per-stage
    timings, and the label map and overlay as PNG."""
    received = time.perf_counter()
    served = served_model(registry, model)
    data = await image.read(settings.max_upload_bytes + 1)
    name = display_name(image.filename, "image")
    if len(data) > settings.max_upload_bytes:
        raise error(
            413, f"{name}: larger than this server's limit of {settings.max_upload_bytes / MB:g} MB"
        )
    if not data:
        raise error(415, f"{name}: empty file, not an image")
    pictures = [p for p in PICTURES if p in (include or ("label_map", "overlay"))]
    try:
        result, files, queue_ms, encode_ms = await on_worker(
            server, _segment, served, mode, data, pictures, opacity, legend, time.perf_counter(),
            slot=slot,
        )  # fmt: skip
    except ImageError as exc:
        status, message = await asyncio.to_thread(refusal, data, name, settings.max_pixels)
        raise error(status, message or named(str(exc), name)) from None
    record = result.to_dict()
    record.pop("source", None)
    record["timings"].update(queue_ms=round(queue_ms, 3), encode_ms=round(encode_ms, 3))
    record["timings"]["server_ms"] = round((time.perf_counter() - received) * 1000, 3)
    images, expires = _pictures(files, output, server.store, prefix)
    return {**record, "images": images, "expires_at": expires}


@router.get(
    "/v1/results/{token}/{filename}",
    responses={
        200: {"content": {"image/png": {}}, "description": "The picture."},
        **responses(404, 422),
    },
    response_class=Response,
)
async def result_file(
    token: str, filename: str, server: ServerDep, settings: SettingsDep
) -> Response:
    """A picture of an earlier ``output=url`` segmentation, until it expires."""
    stored = server.store.get(token, filename) if filename in RESULT_FILES else None
    if stored is None:
        raise error(404, "no such result (results expire; segment the image again)")
    max_age = max(int(settings.result_ttl), 0)
    return Response(
        stored.data,
        media_type=stored.media_type,
        headers={"Cache-Control": f"private, max-age={max_age}"},
    )
