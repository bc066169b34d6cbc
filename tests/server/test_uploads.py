"""Uploads: what is decided before (and while) their body arrives. A busy server refuses an
upload with 503 and Retry-After before reading its body, caps the uploads arriving at once,
paces clients that retry without waiting, and refuses a multipart body that ends without its
closing boundary. Checked over real sockets against uvicorn, where "before the body" means
something (an in-process test client hands the app the whole body at once)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from segformer.server.middleware import REFUSAL_PAUSE_S, MultipartFraming
from tests.server.helpers import (
    assert_one_line_error,
    hold_model,
    make_settings,
    multipart,
    png_bytes,
    read_response,
    serving,
    upload_head,
    video_bytes,
    wait_until,
)


def test_full_queue_refuses_before_the_body_and_keeps_the_connection(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(make_settings(model_dir, tmp_path, workers=1, queue_size=0)) as live:
        held = hold_model(live.app, monkeypatch)
        pool = live.app.state.server.pool
        body, content_type = multipart("image", "photo.png", png_bytes())
        with ThreadPoolExecutor(1) as threads:
            running = threads.submit(
                httpx.post, live.url + "/v1/segment", content=body,
                headers={"content-type": content_type}, timeout=30,
            )  # fmt: skip
            assert held.entered.acquire(timeout=10)
            with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
                sock.sendall(upload_head("/v1/segment", content_type, len(body)))
                # only the head has been sent: the answer cannot have waited for the body
                status, headers, answer = read_response(sock)
                assert status == 503 and int(headers["retry-after"]) >= 1
                assert b"busy with other requests" in answer
                assert pool.in_flight == 1  # the refused upload took no place
                # the connection stays usable: the server skips the unread body
                sock.sendall(body + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                status, _, answer = read_response(sock)
                assert status == 200 and b'"status":"ok"' in answer
            held.release.set()
            assert running.result().status_code == 200
        wait_until(lambda: pool.in_flight == 0)


def test_video_queue_full_refuses_before_the_body(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(model_dir, tmp_path, video_workers=1, video_queue=0)
    with serving(settings) as live:
        held = hold_model(live.app, monkeypatch)
        first = httpx.post(
            live.url + "/v1/videos", files={"video": ("a.mp4", video_bytes(2), "video/mp4")}
        )
        assert first.status_code == 202 and held.entered.acquire(timeout=10)
        body, content_type = multipart("video", "b.mp4", video_bytes(2))
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(upload_head("/v1/videos", content_type, len(body)))
            status, headers, answer = read_response(sock)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert b"busy with other videos" in answer
        held.release.set()


def test_uploads_over_the_cap_are_refused_and_the_cap_is_given_back(
    model_dir: Path, tmp_path: Path
) -> None:
    with serving(make_settings(model_dir, tmp_path, max_uploads=1)) as live:
        pool = live.app.state.server.pool
        body, content_type = multipart("image", "photo.png", png_bytes())
        head = upload_head("/v1/segment", content_type, len(body))
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as slow:
            slow.sendall(head + body[:100])  # an upload still arriving
            wait_until(lambda: pool.in_flight == 1)
            refused = httpx.post(
                live.url + "/v1/segment", content=body, headers={"content-type": content_type}
            )
            assert "busy with other uploads" in assert_one_line_error(refused, 503)
            assert refused.headers["retry-after"] == "1"
            slow.sendall(body[100:])  # once it has arrived, the next upload is welcome
            status, _, _ = read_response(slow)
            assert status == 200
        ok = httpx.post(
            live.url + "/v1/segment", content=body, headers={"content-type": content_type}
        )
        assert ok.status_code == 200

        # an upload abandoned half-way gives back its upload and its queue place
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as abandoned:
            abandoned.sendall(head + body[:100])
            wait_until(lambda: pool.in_flight == 1)
        wait_until(lambda: pool.in_flight == 0)
        ok = httpx.post(
            live.url + "/v1/segment", content=body, headers={"content-type": content_type}
        )
        assert ok.status_code == 200


def test_clients_that_ignore_retry_after_are_paced(model_dir: Path, tmp_path: Path) -> None:
    """Six clients retry at once after every 503 for 1.5 s: every answer is a success or an
    explicit 503 with Retry-After, work gets done, and no client gets more refusals than the
    pause allows (without it, each would get hundreds)."""
    seconds, clients = 1.5, 6
    with serving(make_settings(model_dir, tmp_path, workers=1, queue_size=1)) as live:
        statuses: Counter[str] = Counter()
        refusals = Counter[int]()
        lock = threading.Lock()

        def flood(client_id: int) -> None:
            deadline = time.monotonic() + seconds
            with httpx.Client(base_url=live.url, timeout=30) as http:
                while time.monotonic() < deadline:
                    response = http.post(
                        "/v1/segment", files={"image": ("p.png", png_bytes(), "image/png")}
                    )
                    busy = response.status_code == 503 and "retry-after" in response.headers
                    with lock:
                        statuses["busy" if busy else str(response.status_code)] += 1
                        refusals[client_id] += busy

        with ThreadPoolExecutor(clients) as threads:
            list(threads.map(flood, range(clients)))
    assert set(statuses) <= {"200", "busy"} and statuses["200"] > 0, statuses
    assert statuses["busy"] > 0, "the flood never filled the queue"
    assert max(refusals.values()) <= seconds / REFUSAL_PAUSE_S + 1, refusals


# ---------------------------------------------------------------------------------------
# Multipart framing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "field", "accepted"), [("/v1/segment", "image", 200), ("/v1/videos", "video", 202)]
)
def test_multipart_without_closing_boundary_is_400(
    client: TestClient, path: str, field: str, accepted: int
) -> None:
    data = png_bytes() if field == "image" else video_bytes(2)
    body, content_type = multipart(field, "upload.bin", data, opacity="0.5")
    closing = body.rindex(b"--" + content_type.split("boundary=")[1].encode() + b"--")
    for cut in (body[:closing], body[:closing] + b"--", body[: len(body) // 2]):
        response = client.post(path, content=cut, headers={"content-type": content_type})
        assert "closing boundary" in assert_one_line_error(response, 400)
    complete = client.post(path, content=body, headers={"content-type": content_type})
    assert complete.status_code == accepted, complete.text


def test_closing_boundary_is_found_across_chunks() -> None:
    """The closing boundary split between two body chunks at every possible place."""
    body, content_type = multipart("image", "a.png", b"\x89PNG data")
    closing = body.rindex(b"--" + content_type.split("boundary=")[1].encode() + b"--")

    async def reader(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def post(chunks: list[bytes]) -> int:
        events = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        events[-1]["more_body"] = False
        sent: list[dict] = []

        async def receive() -> dict:
            return events.pop(0)

        async def send(event: dict) -> None:
            sent.append(event)

        scope = {
            "type": "http", "method": "POST", "path": "/v1/segment", "root_path": "",
            "headers": [(b"content-type", content_type.encode())],
        }  # fmt: skip
        await MultipartFraming(reader)(scope, receive, send)
        return sent[0]["status"]

    for split in range(closing, len(body)):
        assert asyncio.run(post([body[:split], body[split:]])) == 200, split
    assert asyncio.run(post([body[:closing], body[closing : closing + 4]])) == 400
