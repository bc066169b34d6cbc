"""Helpers shared by the server tests: a settings builder, test clients, synthetic images and
videos, a model that waits for the test, a real uvicorn server in a thread and raw HTTP over a
socket. Fixtures built from them are in conftest.py."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from segformer.server import Settings, create_app
from segformer.server.registry import ServedModel

LABELS = {0: "background", 1: "thing", 2: "stuff"}


def make_settings(model_dir: Path, tmp_path: Path, **overrides) -> Settings:
    options = {
        "models": [f"tiny={model_dir}"],
        "device": "cpu",
        "work_dir": tmp_path / "work",
        "bench_results": tmp_path / "bench.json",
    }
    options.update(overrides)
    return Settings(**options)


@contextlib.contextmanager
def client_for(model_dir: Path, tmp_path: Path, **overrides):
    app = create_app(make_settings(model_dir, tmp_path, **overrides))
    with TestClient(app) as client:
        yield client


def png_bytes(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header says width×height but that holds almost no data: a decoder that
    trusted it would allocate the whole image before finding out."""
    data = bytearray(png_bytes(8, 8))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def video_bytes(frames: int = 5, width: int = 64, height: int = 48) -> bytes:
    import av

    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def segment(client: TestClient, data: bytes, name: str = "photo.png", **form):
    return client.post("/v1/segment", files={"image": (name, data, "image/png")}, data=form)


def served(app: FastAPI, name: str = "tiny") -> ServedModel:
    return app.state.server.registry.models[name]


class HeldSegmenter:
    """Stands in for a model that takes as long as the test wants: every call waits for
    ``release`` (then runs the real segmenter)."""

    def __init__(self, real) -> None:
        self.real = real
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def _hold(self) -> None:
        self.entered.release()
        if not self.release.wait(30):
            raise RuntimeError("test never released the held segmenter")

    def __call__(self, *args, **kwargs):
        self._hold()
        return self.real(*args, **kwargs)

    def imap(self, *args, **kwargs):  # what segment_video uses
        self._hold()
        yield from self.real.imap(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def hold_model(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> HeldSegmenter:
    model = served(app)
    held = HeldSegmenter(model.segmenter())
    monkeypatch.setattr(model, "segmenter", lambda mode=None: held)
    return held


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def wait_for_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"video job still {job['status']}"
        time.sleep(0.05)


def assert_one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    assert "\n" not in body["detail"] and body["detail"]
    return body["detail"]


@dataclass
class Live:
    """A running server: its address and the app it serves (to look at its state)."""

    url: str
    port: int
    app: FastAPI


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[Live]:
    """The app under a real uvicorn server in a thread, on a free loopback port."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=60)
        assert server.started, "the server did not start"
        yield Live(f"http://127.0.0.1:{port}", port, app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def raw_request(port: int, head: bytes, chunks=(), timeout: float = 10.0) -> tuple[bytes, int]:
    """Send ``head`` then ``chunks`` (stopping as soon as the server answers); returns the
    response and how many body bytes were sent."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        response = b""
        for chunk in chunks:
            with contextlib.suppress(BlockingIOError):
                response += sock.recv(65536)
            if response:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                break
            sent += len(chunk)
            time.sleep(0.002)
        sock.setblocking(True)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n\r\n" not in response or not response.endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                response += data
    return response, sent


# The shape `segformer bench` writes (schema segformer-bench/1); the numbers are made up.
BENCH_SAMPLE = {
    "schema": "segformer-bench/1",
    "created": "2026-01-01T12:00:00+00:00",
    "machine": {"cpu": "Test CPU", "threads": 2, "allocator": "tcmalloc", "torch": "2.13.0"},
    "jobs": [
        {
            "name": "b0 512×512",
            "kind": "model",
            "results": [
                {"engine": "transformers", "backend": "transformers", "precision": "fp32", "median_ms": 190.0,
                 "p10_ms": 185.0, "p90_ms": 200.0, "images_per_s": 5.3, "ratio": 1.0},
                {"engine": "fast fp32", "backend": "fast", "precision": "fp32", "median_ms": 40.0,
                 "p10_ms": 38.0, "p90_ms": 45.0, "images_per_s": 25.0, "ratio": 0.21, "label_agreement": 1.0},
                {"engine": "compiled bf16", "backend": "compiled", "precision": "bf16", "median_ms": 18.0,
                 "p10_ms": 17.0, "p90_ms": 19.0, "images_per_s": 55.6, "ratio": 0.095, "label_agreement": 0.998},
            ],
        },
        {
            "name": "photo 640×480 → labels",
            "kind": "photo",
            "results": [
                {"engine": "transformers", "median_ms": 300.0, "p10_ms": 290.0, "p90_ms": 320.0, "images_per_s": 3.3, "ratio": 1.0},
                {"engine": "fast fp32", "median_ms": 45.0, "p10_ms": 44.0, "p90_ms": 47.0, "images_per_s": 22.2, "ratio": 0.15},
            ],
        },
    ],
}  # fmt: skip


def multipart(name: str, filename: str, data: bytes, **fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body as httpx encodes it, and its Content-Type."""
    request = httpx.Request(
        "POST", "http://test/", files={name: (filename, data, "image/png")}, data=fields
    )
    return request.read(), request.headers["content-type"]


def upload_head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (what the app always sends), read from a
    socket that may carry more after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response"
        body += chunk
    return int(status_line.split()[1]), headers, body
