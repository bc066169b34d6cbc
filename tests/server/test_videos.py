"""Video jobs: a job from upload to result, refusals, the video queue, cancel and expiry."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from segformer.server.store import TOKEN
from tests.server.helpers import (
    LABELS,
    assert_one_line_error,
    client_for,
    hold_model,
    png_bytes,
    video_bytes,
    wait_for_job,
    wait_until,
)


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
        held = hold_model(client.app, monkeypatch)
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

        held = hold_model(client.app, monkeypatch)
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
