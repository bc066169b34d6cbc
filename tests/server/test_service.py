"""The page, health, models, OpenAPI, benchmark results, and a fuzz of the whole documented
API (schemathesis)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import segformer
from tests.server.helpers import (
    LABELS,
    assert_one_line_error,
    client_for,
    png_bytes,
    segment,
)


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
        url = live_server.url
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
