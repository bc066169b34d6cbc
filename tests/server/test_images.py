"""Segmenting one image: the results against the library, the pictures, and how uploads that
are not (good) images are refused."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import segformer
from segformer.server.store import TOKEN
from tests.server.helpers import (
    LABELS,
    assert_one_line_error,
    client_for,
    png_bytes,
    segment,
    served,
)


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
    model = served(client.app)
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


def test_refusals_name_the_uploaded_file(model_dir: Path, tmp_path: Path) -> None:
    """A 1×1 image is a real image a model that keeps each image's size cannot take: the
    message names the upload."""
    import segformer
    from segformer.inference.processing import ImageProcessor

    native = segformer.load(model_dir)
    native.metadata.preprocessing = ImageProcessor(do_resize=False).to_dict()
    segformer.save(native, tmp_path / "native-model")
    with client_for(model_dir, tmp_path, models=[f"native={tmp_path / 'native-model'}"]) as client:
        detail = assert_one_line_error(segment(client, png_bytes(1, 1), "dot.png"), 422)
        assert detail.startswith("dot.png: 1×1 is too small") and "<" not in detail
        detail = assert_one_line_error(segment(client, b"GIF89a" + bytes(50), "anim.gif"), 415)
        assert detail.startswith("anim.gif: ")


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
