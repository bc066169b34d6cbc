"""The web app and REST API (segformer.server): every endpoint and every limit.

A tiny model saved to a temporary folder stands in for a real one; slow-model cases hold the
workers on an Event instead of waiting on real inference. Streaming limits and raw paths are
checked against a real uvicorn server over a socket, because an in-process test client reads
the whole body before the app sees it and normalises paths.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import segformer
from segformer.errors import SegformerError
from segformer.server import Settings, create_app
from segformer.server.settings import ModelSpec
from segformer.server.store import TOKEN

LABELS = {0: "background", 1: "thing", 2: "stuff"}


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny segmentation model in Hugging Face layout, with a small input size so that
    inference takes milliseconds. Heads [1, 2, 5, 8] as every published MiT has them."""
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = SegformerConfig(
        hidden_sizes=[8, 16, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=16,
        id2label=LABELS,
    )
    model = SegformerForSemanticSegmentation(config).eval()
    from segformer.inference.processing import ImageProcessor

    model.metadata.preprocessing = ImageProcessor(size=(64, 64)).to_dict()
    model.metadata.license = "apache-2.0"
    folder = tmp_path_factory.mktemp("models") / "tiny-model"
    segformer.save(model, folder)
    return folder


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


@pytest.fixture
def client(model_dir: Path, tmp_path: Path):
    with client_for(model_dir, tmp_path) as client:
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


def served(client: TestClient, name: str = "tiny"):
    return client.app.state.server.registry.models[name]


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


def hold_model(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> HeldSegmenter:
    model = served(client)
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


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def test_segment_inline_matches_the_library(client: TestClient, model_dir: Path) -> None:
    from segformer.inference.segmenter import Segmenter

    data = png_bytes()
    response = segment(client, data, include=["label_map", "overlay", "colored"], opacity="0.4")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["width"], body["height"], body["num_labels"]) == ("tiny", 48, 40, 3)

    expected = Segmenter.from_pretrained(model_dir, device="cpu")(data)
    label_map = Image.open(io.BytesIO(base64.b64decode(body["images"]["label_map"]["base64"])))
    assert label_map.mode == "P" and label_map.size == (48, 40)
    labels = np.asarray(label_map)
    np.testing.assert_array_equal(labels, expected.labels)

    # classes: exactly those in the label map, with their pixel counts, largest first
    counts = np.bincount(labels.ravel(), minlength=3)
    assert [c["id"] for c in body["classes"]] == sorted(
        np.flatnonzero(counts), key=lambda i: -counts[i]
    )
    for c in body["classes"]:
        assert c["name"] == LABELS[c["id"]]
        assert c["pixels"] == counts[c["id"]]
        assert c["share"] == pytest.approx(counts[c["id"]] / labels.size)

    colored = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(body["images"]["colored"]["base64"]))).convert("RGB")
    )
    for c in body["classes"]:
        assert (colored[labels == c["id"]] == c["color"]).all()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["images"]["overlay"]["base64"])))
    assert overlay.size == (48, 40)

    timings = body["timings"]
    for key in (
        "decode_ms",
        "preprocess_ms",
        "model_ms",
        "postprocess_ms",
        "queue_ms",
        "encode_ms",
    ):
        assert timings[key] >= 0
    assert timings["total_ms"] == pytest.approx(
        timings["decode_ms"]
        + timings["preprocess_ms"]
        + timings["model_ms"]
        + timings["postprocess_ms"],
        abs=0.01,
    )
    assert timings["server_ms"] >= timings["total_ms"]


def test_segment_returns_only_the_pictures_asked_for(client: TestClient) -> None:
    body = segment(client, png_bytes()).json()
    assert set(body["images"]) == {"label_map", "overlay"}  # the default
    body = segment(client, png_bytes(), include="colored").json()
    assert set(body["images"]) == {"colored"}


def test_overlay_legend_changes_the_picture(client: TestClient) -> None:
    plain = segment(client, png_bytes(), include="overlay").json()["images"]["overlay"]["base64"]
    side = segment(client, png_bytes(), include="overlay", legend="side").json()["images"][
        "overlay"
    ]["base64"]
    assert Image.open(io.BytesIO(base64.b64decode(plain))).size == (48, 40)
    assert Image.open(io.BytesIO(base64.b64decode(side))).size[0] > 48  # legend panel beside it


def test_segment_by_url_and_expiry(client: TestClient) -> None:
    body = segment(client, png_bytes(), output="url", include=["label_map", "colored"]).json()
    assert body["expires_at"] > time.time()
    for name in ("label_map", "colored"):
        image = body["images"][name]
        assert image["base64"] is None and image["url"].endswith(f"/{name}.png")
        fetched = client.get(image["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (48, 40)

    url = body["images"]["label_map"]["url"]
    token = url.split("/")[-2]
    assert TOKEN.fullmatch(token)
    assert_one_line_error(
        client.get(url.replace("label_map.png", "overlay.png")), 404
    )  # not asked for
    assert_one_line_error(client.get(f"/v1/results/{'A' * 22}/label_map.png"), 404)
    client.app.state.server.store.sweep(now=body["expires_at"] + 1)
    assert_one_line_error(client.get(url), 404)


def test_mode_option_uses_slide_inference(client: TestClient) -> None:
    body = segment(client, png_bytes(96, 80), mode="slide").json()
    assert body["mode"].startswith("slide")
    assert segment(client, png_bytes()).json()["mode"] == "whole"
    # Both modes run on one engine: a compiled program or session is not loaded twice.
    model = served(client)
    assert model.segmenter("slide").engine is model.segmenter("whole").engine


def test_content_decides_not_name_or_header(client: TestClient) -> None:
    data = png_bytes()
    response = client.post("/v1/segment", files={"image": ("notes.txt", data, "text/plain")})
    assert response.status_code == 200
    detail = assert_one_line_error(segment(client, b"hello, this is text\n" * 20, "photo.png"), 415)
    assert detail.startswith("photo.png: not an image")
    assert_one_line_error(segment(client, b"", "empty.png"), 415)
    assert_one_line_error(segment(client, b"%PDF-1.7\n" + bytes(200), "doc.jpg"), 415)


def test_truncated_image_is_422(client: TestClient) -> None:
    data = png_bytes()
    detail = assert_one_line_error(segment(client, data[: len(data) // 2], "cut.png"), 422)
    assert "truncated" in detail or "corrupt" in detail


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


def test_invalid_options_are_one_line_422(client: TestClient) -> None:
    data = png_bytes()
    assert "opacity" in assert_one_line_error(segment(client, data, opacity="1.5"), 422)
    assert "mode" in assert_one_line_error(segment(client, data, mode="sideways"), 422)
    assert "output" in assert_one_line_error(segment(client, data, output="email"), 422)
    assert "no model named 'nope'" in assert_one_line_error(
        segment(client, data, model="nope"), 422
    )
    assert "image" in assert_one_line_error(
        client.post("/v1/segment", data={"opacity": "0.5"}), 422
    )


# ---------------------------------------------------------------------------------------
# Workers, queue and timeout
# ---------------------------------------------------------------------------------------
def test_full_queue_is_503_with_retry_after(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    with client_for(model_dir, tmp_path, workers=1, queue_size=1) as client:
        held = hold_model(client, monkeypatch)
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
        held = hold_model(client, monkeypatch)
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


# ---------------------------------------------------------------------------------------
# Models, health, page, bench
# ---------------------------------------------------------------------------------------
def test_models_and_lazy_loading(model_dir: Path, tmp_path: Path) -> None:
    from segformer.weights.checkpoints import load

    with client_for(model_dir, tmp_path, models=[f"tiny={model_dir}", str(model_dir)]) as client:
        listing = client.get("/v1/models").json()
        assert listing["default"] == "tiny"
        by_name = {m["name"]: m for m in listing["models"]}
        assert set(by_name) == {"tiny", "tiny-model"}  # a bare path is named after its folder
        tiny = by_name["tiny"]
        assert tiny["loaded"] and tiny["default"]
        assert tiny["labels"] == list(LABELS.values())
        assert len(tiny["palette"]) == 3 and all(len(c) == 3 for c in tiny["palette"])
        assert tiny["parameters"] == sum(p.numel() for p in load(model_dir).parameters())
        assert tiny["variant"] == "custom" and tiny["license"] == "apache-2.0"
        assert tiny["source"] == "tiny-model" and str(tmp_path) not in json.dumps(listing)

        assert by_name["tiny-model"]["loaded"] is False and by_name["tiny-model"]["labels"] is None
        info = client.get("/v1/models/tiny-model").json()
        assert info["loaded"] and info["labels"] == list(LABELS.values()) and not info["default"]
        assert client.get("/v1/models").json()["models"][1]["loaded"]
        assert segment(client, png_bytes(), model="tiny-model").json()["model"] == "tiny-model"
        assert_one_line_error(client.get("/v1/models/nope"), 404)


def test_healthz(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["version"] == segformer.__version__
    assert health["models"] == [{"name": "tiny", "loaded": True}]
    assert health["images"] == {"in_flight": 0, "capacity": 9}
    assert health["limits"]["max_upload_bytes"] == 20 * 1024 * 1024


def test_openapi_documents_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    expected = {
        "/healthz", "/v1/models", "/v1/models/{name}", "/v1/segment", "/v1/results/{token}/{filename}",
        "/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/result", "/v1/videos/{job_id}/frames",
        "/v1/videos/{job_id}/frames.csv", "/v1/bench",
    }  # fmt: skip
    assert expected <= set(paths)
    post = paths["/v1/segment"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SegmentResponse"
    )
    for code in ("413", "415", "422", "503", "504"):
        assert post["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    assert (
        "HTTPValidationError" not in schema["components"]["schemas"]
    )  # errors are one line everywhere
    assert paths["/v1/videos"]["post"]["responses"]["202"]


def test_page_static_files_and_security_headers(
    model_dir: Path, tmp_path: Path, client: TestClient
) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<base href="/">' in page.text and 'src="static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    with client_for(model_dir, tmp_path, root_path="/segformer") as behind_proxy:
        page = behind_proxy.get("/")
        assert '<base href="/segformer/">' in page.text
        body = segment(behind_proxy, png_bytes(), output="url").json()
        assert body["images"]["overlay"]["url"].startswith("/segformer/v1/results/")


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


def test_bench_results(model_dir: Path, tmp_path: Path, client: TestClient) -> None:
    missing = client.get("/v1/bench").json()
    assert missing["available"] is False and "segformer bench" in missing["message"]
    (tmp_path / "bench.json").write_text("{not json", encoding="utf-8")
    assert client.get("/v1/bench").json()["available"] is False
    results = {
        "machine": {"cpu": "test"},
        "results": [{"model": "b0", "backend": "eager", "median_ms": 12.5}],
    }
    (tmp_path / "bench.json").write_text(json.dumps(results), encoding="utf-8")
    body = client.get("/v1/bench").json()
    assert body["available"] is True and body["results"] == results and body["modified_at"] > 0


# ---------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------
def test_video_job_runs_to_the_end(client: TestClient) -> None:
    import av

    response = client.post(
        "/v1/videos", files={"video": ("street.mp4", video_bytes(5), "video/mp4")}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert TOKEN.fullmatch(job["id"]) and response.headers["location"] == f"/v1/videos/{job['id']}"
    assert job["total_frames"] == 5 and (job["width"], job["height"]) == (64, 48)

    job = wait_for_job(client, job["id"])
    assert job["status"] == "done", job["error"]
    assert job["progress"] == 1.0 and job["frames_done"] == 5 and job["expires_at"] > time.time()
    assert job["result"]["frames"] == 5 and (job["result"]["width"], job["result"]["height"]) == (
        64,
        48,
    )
    assert set(job["result"]["class_shares"]) <= set(LABELS.values())

    video = client.get(job["links"]["result"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.headers["content-disposition"].startswith("inline")
    with av.open(io.BytesIO(video.content)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (64, 48)
    download = client.get(job["links"]["result"], params={"download": "true"})
    assert download.headers["content-disposition"].startswith(
        'attachment; filename="street_segmented.mp4"'
    )

    stats = client.get(job["links"]["frames"]).json()
    assert stats["labels"] == list(LABELS.values())
    assert [f["frame"] for f in stats["frames"]] == [0, 1, 2, 3, 4]
    for frame in stats["frames"]:
        assert sum(frame["shares"]) == pytest.approx(1.0, abs=1e-4)
    csv_text = client.get(job["links"]["frames_csv"]).text
    assert csv_text.splitlines()[0] == "frame,time_s,model_ms,background,thing,stuff"
    assert len(csv_text.splitlines()) == 6


def test_video_webm_output(client: TestClient) -> None:
    response = client.post(
        "/v1/videos",
        files={"video": ("a.mp4", video_bytes(3), "video/mp4")},
        data={"format": "webm"},
    )
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "done", job["error"]
    video = client.get(job["links"]["result"])
    assert (
        video.headers["content-type"] == "video/webm" and video.content[:4] == b"\x1a\x45\xdf\xa3"
    )


def test_video_refusals(model_dir: Path, tmp_path: Path) -> None:
    with client_for(
        model_dir,
        tmp_path,
        video_max_frames=3,
        video_max_pixels=50_000,
        video_max_upload_bytes=200_000,
    ) as client:

        def post(data: bytes, name: str = "clip.mp4"):
            return client.post("/v1/videos", files={"video": (name, data, "video/mp4")})

        detail = assert_one_line_error(post(b"this is not a video" * 50), 415)
        assert detail.startswith("clip.mp4:") and str(tmp_path) not in detail
        assert_one_line_error(post(png_bytes(), "photo.mp4"), 415)
        assert_one_line_error(post(b""), 415)
        assert "5 frames" in assert_one_line_error(post(video_bytes(5)), 413)
        assert "megapixels" in assert_one_line_error(post(video_bytes(2, 320, 240)), 413)
        assert_one_line_error(post(bytes(300_000)), 413)
        assert "no model" in assert_one_line_error(
            client.post(
                "/v1/videos",
                files={"video": ("a.mp4", video_bytes(2), "video/mp4")},
                data={"model": "x"},
            ),
            422,
        )
        # nothing is left behind by refused uploads
        assert list((client.app.state.server.work_dir / "videos").iterdir()) == []


def test_video_queue_full_is_503_and_unfinished_result_is_409(
    model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    with client_for(model_dir, tmp_path, video_workers=1, video_queue=0) as client:
        held = hold_model(client, monkeypatch)
        first = client.post(
            "/v1/videos", files={"video": ("a.mp4", video_bytes(2), "video/mp4")}
        ).json()
        assert held.entered.acquire(timeout=10)
        response = client.post(
            "/v1/videos", files={"video": ("b.mp4", video_bytes(2), "video/mp4")}
        )
        assert "busy" in assert_one_line_error(response, 503)
        assert int(response.headers["retry-after"]) >= 1
        assert client.get(f"/v1/videos/{first['id']}").json()["status"] == "running"
        assert "running" in assert_one_line_error(client.get(first["links"]["result"]), 409)
        assert_one_line_error(client.get(first["links"]["frames"]), 409)
        held.release.set()
        assert wait_for_job(client, first["id"])["status"] == "done"


def test_video_cancel_delete_and_expiry_remove_files(
    model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    with client_for(model_dir, tmp_path, job_ttl=60) as client:
        server = client.app.state.server
        videos = server.work_dir / "videos"

        done = client.post(
            "/v1/videos", files={"video": ("a.mp4", video_bytes(2), "video/mp4")}
        ).json()
        job = wait_for_job(client, done["id"])
        assert sorted(p.name for p in (videos / done["id"]).iterdir()) == [
            "frames.csv",
            "overlay.mp4",
        ]  # upload gone
        server.jobs.sweep(now=job["expires_at"] + 1)
        assert not (videos / done["id"]).exists()
        assert_one_line_error(client.get(f"/v1/videos/{done['id']}"), 404)

        held = hold_model(client, monkeypatch)
        running = client.post(
            "/v1/videos", files={"video": ("b.mp4", video_bytes(4), "video/mp4")}
        ).json()
        assert held.entered.acquire(timeout=10)
        assert client.delete(f"/v1/videos/{running['id']}").status_code == 204
        assert_one_line_error(client.get(f"/v1/videos/{running['id']}"), 404)
        held.release.set()
        wait_until(lambda: not (videos / running["id"]).exists())  # the worker stops and cleans up
        assert_one_line_error(client.delete(f"/v1/videos/{running['id']}"), 404)
    assert not server.work_dir.exists()  # shutdown removes the private work folder


# ---------------------------------------------------------------------------------------
# Paths and temporary files
# ---------------------------------------------------------------------------------------
TRAVERSALS = [
    "/v1/videos/..%2F..%2Fetc%2Fpasswd",
    "/v1/videos/%2e%2e",
    "/v1/videos/....%2F%2F....%2F%2Fetc",
    "/v1/videos/..%5C..%5Cwindows",
    "/v1/videos/%2e%2e/result",
    f"/v1/videos/{'A' * 22}/result",
    f"/v1/videos/{'A' * 21}%2E/frames.csv",
    "/v1/results/..%2F..%2Fapp.py/label_map.png",
    "/v1/results/AAAAAAAAAAAAAAAAAAAAAA/..%2Fsettings.py",
    "/static/..%2Fapp.py",
    "/static/%2e%2e/app.py",
    "/static/%2e%2e%2f%2e%2e%2fserver%2fapp.py",
    "/static/..%5Capp.py",
    "/static/%00app.js",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert "import" not in response.text


def test_job_ids_never_reach_the_filesystem(client: TestClient) -> None:
    jobs = client.app.state.server.jobs
    for job_id in ("..", "../../etc/passwd", "a/b", "A" * 21 + "/", "A" * 23, "", "A" * 21 + "."):
        assert jobs.get(job_id) is None
        assert jobs.delete(job_id) is False


def test_temporary_files_are_cleaned(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    with client_for(model_dir, tmp_path, work_dir=None) as client:
        work = client.app.state.server.work_dir
        assert work.parent == system_tmp
        big = png_bytes(700, 700)  # over Starlette's 1 MB in-memory threshold for uploads
        assert len(big) > 1024 * 1024
        assert segment(client, big).status_code == 200
        assert segment(client, b"junk" * 1000).status_code == 415
        assert segment(client, big[:-5000]).status_code == 422
        job = client.post(
            "/v1/videos", files={"video": ("a.mp4", video_bytes(2), "video/mp4")}
        ).json()
        assert wait_for_job(client, job["id"])["status"] == "done"
        assert (
            client.post(
                "/v1/videos", files={"video": ("a.mp4", b"junk" * 1000, "video/mp4")}
            ).status_code
            == 415
        )
        assert client.delete(f"/v1/videos/{job['id']}").status_code == 204
        assert list(system_tmp.iterdir()) == [work]
        assert [p.name for p in work.rglob("*") if p.is_file()] == []
    assert list(system_tmp.iterdir()) == []


# ---------------------------------------------------------------------------------------
# A real server over a socket: streaming limits and raw paths
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(settings: Settings):
    """The app under a real uvicorn server in a thread, on a free loopback port."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=60)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def live_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with serving(
        make_settings(model_dir, tmp_path_factory.mktemp("live"), max_upload_bytes=100_000)
    ) as address:
        yield address


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


def test_declared_oversize_upload_is_refused_before_the_body(live_server) -> None:
    _, port = live_server
    head = (
        b"POST /v1/segment HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    response, sent = raw_request(port, head)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent == 0 and b"limit of" in response


def test_chunked_upload_is_cut_off_at_the_limit(live_server) -> None:
    _, port = live_server
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


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server/app.py",
        "/static/../../segformer/server/app.py",
        "/v1/videos/../../../etc/passwd",
    ],
)
def test_literal_dot_segments_are_404(live_server, path: str) -> None:
    _, port = live_server
    response, _ = raw_request(
        port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.split(b" ", 2)[1] in (b"404", b"400"), response[:200]
    assert b"create_app" not in response


# ---------------------------------------------------------------------------------------
# Schemathesis: no server errors anywhere in the documented API. Every operation in
# /openapi.json gets 25 generated requests (SEGFORMER_FUZZ_EXAMPLES=300 for a deeper run);
# each answer must be a documented status with a body matching its documented schema.
# ---------------------------------------------------------------------------------------
try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extra is not installed
    schemathesis = None

if schemathesis is not None:

    @pytest.fixture
    def api_schema(live_server):
        url, _ = live_server
        return schemathesis.openapi.from_url(f"{url}/openapi.json")

    openapi = schemathesis.pytest.from_fixture("api_schema")

    @openapi.parametrize()
    @settings(
        max_examples=int(os.environ.get("SEGFORMER_FUZZ_EXAMPLES", "25")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def test_api_fuzz_has_no_server_errors(case) -> None:
        from schemathesis.checks import (
            content_type_conformance,
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
        )

        case.call_and_validate(
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
            timeout=30,
        )

else:

    @pytest.mark.skip(reason="schemathesis is not installed (pip install -e '.[test]')")
    def test_api_fuzz_has_no_server_errors() -> None:
        pass


# ---------------------------------------------------------------------------------------
# Settings and the command line
# ---------------------------------------------------------------------------------------
def test_model_specs() -> None:
    assert ModelSpec.parse("city=/data/weights/b0") == ModelSpec("city", "/data/weights/b0")
    assert ModelSpec.parse("/data/weights/segformer-b0/") == ModelSpec(
        "segformer-b0", "/data/weights/segformer-b0/"
    )
    assert (
        ModelSpec.parse("nvidia/segformer-b0-finetuned-ade-512-512").name
        == "segformer-b0-finetuned-ade-512-512"
    )
    assert ModelSpec.parse("ckpt/model.safetensors").name == "model"
    with pytest.raises(SegformerError, match="NAME=SOURCE"):
        ModelSpec.parse("bad name=/x")
    with pytest.raises(SegformerError, match="two models"):
        Settings(models=["/a/b0", "/b/b0"])
    for bad in (
        {"workers": 0},
        {"queue_size": -1},
        {"request_timeout": 0},
        {"port": 70000},
        {"root_path": "seg/"},
    ):
        with pytest.raises(SegformerError):
            Settings(**bad)


def test_cli_serve(tmp_path: Path, capsys) -> None:
    from segformer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--model",
        "--host",
        "--port",
        "--workers",
        "--queue",
        "--max-upload-mb",
        "--max-pixels",
        "--timeout",
        "--root-path",
        "--bench-results",
    ):
        assert flag in help_text
    # a model that cannot be loaded stops the start with a one-line error, before binding
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--model", "x=" + str(tmp_path), "--workers", "0"]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err


def test_segment_says_what_the_model_is_for_and_flags_other_pictures(
    model_dir: Path, tmp_path: Path
) -> None:
    from segformer.inference.segmenter import Segmenter

    # The tiny model with a domain and two thresholds: one every picture is above, one none is.
    folders = {}
    for name, threshold in (("strict", -1e9), ("lenient", 1e9)):
        model = segformer.load(model_dir)
        model.metadata.domain = "test pictures"
        model.metadata.out_of_domain = {"score": "energy", "threshold": threshold}
        folders[name] = segformer.save(model, tmp_path / name)
    models = [f"{name}={folder}" for name, folder in folders.items()]
    data = png_bytes()
    with client_for(model_dir, tmp_path, models=models) as client:
        for name, flagged in (("strict", True), ("lenient", False)):
            response = segment(client, data, model=name, include=["label_map"])
            assert response.status_code == 200, response.text
            body = response.json()
            expected = Segmenter.from_pretrained(folders[name], device="cpu")(data)
            assert body["domain"] == "test pictures"
            assert body["out_of_domain"] is flagged
            assert body["domain_score"] == pytest.approx(expected.domain_score, abs=1e-4)
            info = client.get(f"/v1/models/{name}").json()
            assert info["domain"] == "test pictures"
            assert info["out_of_domain"]["score"] == "energy"
        schema = client.get("/openapi.json").json()["components"]["schemas"]["SegmentResponse"]
        assert {"domain", "out_of_domain", "domain_score"} <= set(schema["properties"])
    # a model without them answers null, not a missing field
    with client_for(model_dir, tmp_path / "plain") as client:
        body = segment(client, data, include=["label_map"]).json()
        assert body["domain"] is None and body["out_of_domain"] is None
