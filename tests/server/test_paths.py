"""Paths and temporary files: traversal attempts are 404 (also as raw, unnormalised paths over
a socket), job ids never reach the filesystem, and nothing is left on disk."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.server.helpers import (
    client_for,
    png_bytes,
    raw_request,
    segment,
    video_bytes,
    wait_for_job,
)

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


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server/app.py",
        "/static/../../segformer/server/app.py",
        "/v1/videos/../../../etc/passwd",
    ],
)
def test_literal_dot_segments_are_404(live_server, path: str) -> None:
    port = live_server.port
    response, _ = raw_request(
        port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.split(b" ", 2)[1] in (b"404", b"400"), response[:200]
    assert b"create_app" not in response
