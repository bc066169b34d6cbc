"""Limits: pixels, upload size, the bounded queue (503 with Retry-After), the request timeout,
and what is decided before the body of an upload is read. Streaming limits are checked against
a real uvicorn server over a socket, because an in-process test client reads the whole body
before the app sees it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from tests.server.helpers import (
    assert_one_line_error,
    client_for,
    hold_model,
    png_bytes,
    png_claiming_size,
    raw_request,
    segment,
    wait_until,
)


def test_pixel_limit(model_dir: Path, tmp_path: Path) -> None:
    with client_for(model_dir, tmp_path, max_pixels=1000) as client:
        detail = assert_one_line_error(segment(client, png_bytes(48, 40), "big.png"), 413)
        assert "48×40" in detail and "limit" in detail
        assert segment(client, png_bytes(30, 30)).status_code == 200
    # a header that claims 40000×40000 is refused from the header, before decoding
    with client_for(model_dir, tmp_path) as client:
        detail = assert_one_line_error(
            segment(client, png_claiming_size(40000, 40000), "bomb.png"), 413
        )
        assert "1600 megapixels" in detail and "limit of 40.0 megapixels" in detail


def test_upload_size_limit(model_dir: Path, tmp_path: Path) -> None:
    data = png_bytes(200, 200)  # about 120 kB of noise
    assert len(data) > 100_000
    with client_for(model_dir, tmp_path, max_upload_bytes=100_000) as client:
        detail = assert_one_line_error(segment(client, data), 413)
        assert "limit" in detail
        assert segment(client, png_bytes()).status_code == 200
        # a body far over the limit is refused from its Content-Length alone
        response = client.post(
            "/v1/segment",
            content=b"x" * 2_000_000,
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert_one_line_error(response, 413)


def test_full_queue_is_503_with_retry_after(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    with client_for(model_dir, tmp_path, workers=1, queue_size=1) as client:
        held = hold_model(client.app, monkeypatch)
        pool = client.app.state.server.pool
        with ThreadPoolExecutor(2) as threads:
            waiting = [threads.submit(segment, client, png_bytes()) for _ in range(2)]
            assert held.entered.acquire(timeout=10)  # one running …
            wait_until(lambda: pool.in_flight == 2)  # … and one queued
            response = segment(client, png_bytes())
            detail = assert_one_line_error(response, 503)
            assert "busy" in detail
            assert int(response.headers["retry-after"]) >= 1
            assert client.get("/healthz").json()["images"] == {"in_flight": 2, "capacity": 2}
            held.release.set()
            assert [f.result().status_code for f in waiting] == [200, 200]
        wait_until(lambda: pool.in_flight == 0)
        assert segment(client, png_bytes()).status_code == 200


def test_slow_request_is_504_and_keeps_its_slot_until_done(
    model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    with client_for(model_dir, tmp_path, workers=1, queue_size=1, request_timeout=0.3) as client:
        held = hold_model(client.app, monkeypatch)
        pool = client.app.state.server.pool
        with ThreadPoolExecutor(2) as threads:
            running = threads.submit(segment, client, png_bytes())
            assert held.entered.acquire(timeout=10)
            queued = threads.submit(segment, client, png_bytes())
            assert "limit of 0.3 s" in assert_one_line_error(running.result(), 504)
            assert_one_line_error(queued.result(), 504)
        # the queued task was dropped; the running one holds its worker until it returns
        wait_until(lambda: pool.in_flight == 1)
        held.release.set()
        wait_until(lambda: pool.in_flight == 0)


def test_declared_oversize_upload_is_refused_before_the_body(live_server) -> None:
    port = live_server.port
    head = (
        b"POST /v1/segment HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    response, sent = raw_request(port, head)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent == 0 and b"limit of" in response


def test_chunked_upload_is_cut_off_at_the_limit(live_server) -> None:
    port = live_server.port
    head = (
        b"POST /v1/segment HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n" % len(data) + data + b"\r\n"

    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    chunks = [chunk(part)] + [chunk(b"a" * 16384)] * 2000  # 32 MB offered
    response, sent = raw_request(port, head, chunks)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 2_000_000  # stopped near the 100 kB limit, not after everything


def test_reduced_decode_setting(model_dir: Path, tmp_path: Path) -> None:
    # The tiny model reads 64×64: a 384×256 JPEG upload is decoded at 1/4 when the server is
    # told to, and the result describes the decoded image.
    buffer = BytesIO()
    Image.fromarray(np.full((256, 384, 3), 90, dtype=np.uint8)).save(buffer, "JPEG")
    for reduced, size in ((False, (384, 256)), (True, (96, 64))):
        with client_for(model_dir, tmp_path, reduced_decode=reduced) as client:
            response = segment(client, buffer.getvalue(), "big.jpg")
            assert response.status_code == 200
            body = response.json()
            assert (body["width"], body["height"]) == size
