"""How the server says no: every error is ``{"detail": "<one line>"}`` with a documented status.

``error`` builds the HTTPException a route raises, ``responses`` documents a route's error
statuses in the OpenAPI schema, and ``install_error_handlers`` makes FastAPI's own errors
(validation, unexpected exceptions) take the same one-line shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from segformer.server import schemas
from segformer.server.pool import PoolFull

log = logging.getLogger("segformer.server")

ERRORS = {
    400: "A malformed request body (e.g. broken multipart framing).",
    404: "Not found (or expired).",
    409: "The video job has not finished (or failed).",
    413: "Upload larger than the server's limit, or an image/video over its pixel or frame limit.",
    415: "The upload is not an image (or not a video), judged by its content.",
    422: "Invalid parameters, or a damaged image.",
    500: "The server could not load a configured model.",
    503: "Busy: every worker is taken and the queue is full (see Retry-After).",
    504: "The request took longer than the server's timeout.",
}


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=one_line(message), headers=headers)


def busy_message(what: str, retry_after: int) -> str:
    return f"the server is busy with other {what}; try again in {retry_after} s"


def busy(exc: PoolFull, what: str) -> HTTPException:
    return error(503, busy_message(what, exc.retry_after), {"Retry-After": str(exc.retry_after)})


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry for a route that can answer these error statuses."""
    return {code: {"model": schemas.ErrorResponse, "description": ERRORS[code]} for code in codes}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"detail": one_line(str(exc.detail))}, exc.status_code, headers=exc.headers)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for problem in exc.errors():
        # "body.opacity" reads better as "opacity": where a field came from is no news
        where = ".".join(
            str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path", "header")
        )
        message = str(problem.get("msg", "invalid"))
        parts.append(f"{where}: {message}" if where else message)
    return JSONResponse({"detail": one_line("; ".join(parts) or "invalid request")}, 422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _internal_error)
