"""Video jobs: upload a video (``POST /v1/videos``), poll its job, then fetch the overlay video
and the per-frame class statistics. The work itself is in ``segformer.server.jobs``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from fastapi.responses import FileResponse

from segformer.errors import VideoRefused
from segformer.server import schemas
from segformer.server.errors import busy, error, responses
from segformer.server.jobs import DONE, FORMATS, VideoJob, VideoJobs, read_frame_stats
from segformer.server.pool import PoolFull
from segformer.server.routes.images import display_name
from segformer.server.settings import MB
from segformer.server.state import (
    VIDEO_UPLOAD,
    PrefixDep,
    RegistryDep,
    ServerDep,
    SettingsDep,
    SlotDep,
    served_model,
)

router = APIRouter(tags=["videos"])


def _jobs(server: ServerDep) -> VideoJobs:
    return server.jobs


JobsDep = Annotated[VideoJobs, Depends(_jobs)]


def _job(job_id: str, jobs: JobsDep) -> VideoJob:
    """The job in the path; 404 when there is none (or it expired)."""
    job = jobs.get(job_id)
    if job is None:
        raise error(404, "no such video job (jobs expire; upload the video again)")
    return job


def _finished_job(job: Annotated[VideoJob, Depends(_job)]) -> VideoJob:
    """The job in the path, which must be done; 409 while it runs or when it failed."""
    if job.status == DONE:
        return job
    if job.status in ("queued", "running"):
        done = f"{job.frames_done}/{job.total_frames}" if job.total_frames else str(job.frames_done)
        raise error(409, f"the job is {job.status} ({done} frames); poll /v1/videos/{job.id}")
    raise error(409, f"the job {job.status}" + (f": {job.error}" if job.error else ""))


JobDep = Annotated[VideoJob, Depends(_job)]
FinishedJobDep = Annotated[VideoJob, Depends(_finished_job)]


def job_out(job: VideoJob, prefix: str, job_ttl: float) -> dict[str, Any]:
    base = f"{prefix}{VIDEO_UPLOAD}/{job.id}"
    return {
        "id": job.id,
        "status": job.status,
        "model": job.model,
        "filename": job.filename,
        "format": job.format,
        "frames_done": job.frames_done,
        "total_frames": job.total_frames,
        "progress": job.progress(),
        "width": job.width,
        "height": job.height,
        "created_at": job.created,
        "started_at": job.started,
        "finished_at": job.finished,
        "expires_at": job.expires(job_ttl),
        "error": job.error,
        "result": job.result,
        "links": {
            "status": base,
            "result": f"{base}/result",
            "frames": f"{base}/frames",
            "frames_csv": f"{base}/frames.csv",
        },
    }


@router.post(
    VIDEO_UPLOAD,
    status_code=202,
    response_model=schemas.VideoJobOut,
    responses=responses(400, 413, 415, 422, 503),
)
async def create_video_job(
    response: Response,
    server: ServerDep,
    settings: SettingsDep,
    registry: RegistryDep,
    prefix: PrefixDep,
    slot: SlotDep,
    video: Annotated[UploadFile, File(description="The video (MP4, MOV, MKV, WebM, AVI …).")],
    model: Annotated[str | None, Form(description="A model name from /v1/models.")] = None,
    mode: Annotated[Literal["whole", "slide"] | None, Form(description="Inference mode.")] = None,
    opacity: Annotated[float, Form(ge=0, le=1, description="Overlay opacity.")] = 0.5,
    legend: Annotated[bool, Form(description="Draw the frame's main classes in a corner.")] = True,
    format: Annotated[
        Literal["mp4", "webm"], Form(description="Container of the result (H.264 / VP9).")
    ] = "mp4",
) -> dict[str, Any]:
    """Start segmenting a video; poll the returned job for progress, then fetch its
    result video and per-frame class statistics."""
    served = served_model(registry, model)
    name = display_name(video.filename, "video")
    size = video.size or 0
    if size > settings.video_max_upload_bytes:
        raise error(
            413,
            f"{name}: larger than this server's limit of {settings.video_max_upload_bytes / MB:g} MB",
        )
    if size == 0:
        raise error(415, f"{name}: empty file, not a video")
    try:
        job = await asyncio.to_thread(
            server.jobs.create,
            video.file,
            filename=name,
            model=served.name,
            mode=mode,
            format=format,
            opacity=opacity,
            legend=legend,
            slot=slot,
        )
    except VideoRefused as exc:
        raise error(exc.status, str(exc)) from None
    except PoolFull as exc:
        raise busy(exc, "videos") from None
    out = job_out(job, prefix, settings.job_ttl)
    response.headers["Location"] = out["links"]["status"]
    return out


@router.get(
    "/v1/videos/{job_id}", response_model=schemas.VideoJobOut, responses=responses(404, 422)
)
async def video_job(job: JobDep, prefix: PrefixDep, settings: SettingsDep) -> dict[str, Any]:
    """A video job's status and progress."""
    return job_out(job, prefix, settings.job_ttl)


@router.delete(
    "/v1/videos/{job_id}",
    status_code=204,
    response_class=Response,
    responses=responses(404, 422),
)
async def delete_video_job(job_id: str, jobs: JobsDep) -> Response:
    """Cancel a job (if it is still going) and delete its files."""
    if not await asyncio.to_thread(jobs.delete, job_id):
        raise error(404, "no such video job")
    return Response(status_code=204)


@router.get(
    "/v1/videos/{job_id}/result",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"video/mp4": {}, "video/webm": {}},
            "description": "The overlay video.",
        },
        **responses(404, 409, 422),
    },
)
async def video_result(job: FinishedJobDep, download: bool = False) -> FileResponse:
    """The segmented video (``download=true`` to get it as an attachment)."""
    return FileResponse(
        job.output,
        media_type=FORMATS[job.format],
        filename=job.download_name,
        content_disposition_type="attachment" if download else "inline",
    )


@router.get(
    "/v1/videos/{job_id}/frames",
    response_model=schemas.FrameStats,
    responses=responses(404, 409, 422),
)
async def video_frames(job: FinishedJobDep) -> dict[str, Any]:
    """Per-frame class statistics: each class's share of every frame."""
    return await asyncio.to_thread(read_frame_stats, job.stats_csv)


@router.get(
    "/v1/videos/{job_id}/frames.csv",
    response_class=FileResponse,
    responses={
        200: {"content": {"text/csv": {}}, "description": "One row per frame."},
        **responses(404, 409, 422),
    },
)
async def video_frames_csv(job: FinishedJobDep) -> FileResponse:
    """Per-frame class statistics as CSV: frame, time_s, model_ms, then one column per class."""
    stem = Path(job.download_name).stem
    return FileResponse(job.stats_csv, media_type="text/csv", filename=f"{stem}_frames.csv")
