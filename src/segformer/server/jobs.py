"""Video jobs: an upload becomes a job that segments the video in the background (its own
bounded pool, so videos never starve image requests of queue slots) and keeps the overlay
video and per-frame statistics until the job expires.

Every job lives in its own folder under the server's private work folder, named by a random
token that is the job's id; the id is checked against ``TOKEN`` before it comes near a path.
The upload is deleted as soon as the job stops; the folder goes when the job expires
(``job_ttl`` after it finished), is deleted by the client, is evicted to make room, or when
the server shuts down.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import av

from segformer.errors import ImageError, SegformerError, VideoRefused
from segformer.inference.video import frame_count_estimate, segment_video
from segformer.server.pool import PoolFull, Slot, WorkerPool
from segformer.server.registry import ModelRegistry
from segformer.server.settings import Settings
from segformer.server.store import TOKEN, new_token

log = logging.getLogger("segformer.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
FORMATS = {"mp4": "video/mp4", "webm": "video/webm"}


class _Stop(Exception):
    """Raised from the progress callback to stop a job (cancelled, deleted, out of time)."""


@dataclass
class VideoJob:
    id: str
    model: str
    mode: str | None
    folder: Path
    filename: str
    format: str
    opacity: float
    legend: bool
    created: float = field(default_factory=time.time)
    status: str = QUEUED
    frames_done: int = 0
    total_frames: int | None = None
    width: int | None = None
    height: int | None = None
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    deleted: bool = False
    future: Future | None = None

    @property
    def input(self) -> Path:
        return self.folder / "input"

    @property
    def output(self) -> Path:
        return self.folder / f"overlay.{self.format}"

    @property
    def stats_csv(self) -> Path:
        return self.folder / "frames.csv"

    @property
    def download_name(self) -> str:
        return f"{Path(self.filename).stem or 'video'}_segmented.{self.format}"

    def expires(self, ttl: float) -> float | None:
        return None if self.finished is None else self.finished + ttl

    def progress(self) -> float | None:
        if self.status == DONE:
            return 1.0
        if not self.total_frames:
            return None
        return min(self.frames_done / self.total_frames, 1.0)


def _clean_message(exc: BaseException, path: Path, name: str) -> str:
    """A one-line error with the server's file path replaced by the client's file name."""
    text = str(exc).replace(str(path), name).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_frame_stats(path: Path) -> dict[str, Any]:
    """The per-frame CSV as JSON: the class names and, per frame, its time, model time and
    each class's share (in label order)."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    header, body = rows[0], rows[1:]
    labels = header[3:]
    frames = [
        {
            "frame": int(row[0]),
            "time_s": float(row[1]),
            "model_ms": float(row[2]),
            "shares": [float(v) for v in row[3:]],
        }
        for row in body
    ]
    return {"labels": labels, "frames": frames}


class VideoJobs:
    def __init__(self, settings: Settings, registry: ModelRegistry, root: Path) -> None:
        self.settings = settings
        self.registry = registry
        self.root = root
        self.pool = WorkerPool(settings.video_workers, settings.video_queue, "segformer-video")
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()

    # -- lookup ------------------------------------------------------------------------------
    def get(self, job_id: str) -> VideoJob | None:
        if not TOKEN.fullmatch(job_id):
            return None
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None and self._expired(job, time.time()):
            self.sweep()
            return None
        return job

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def active(self) -> int:
        with self._lock:
            return sum(job.status not in FINISHED for job in self._jobs.values())

    # -- creating ----------------------------------------------------------------------------
    def create(
        self,
        upload: IO[bytes],
        *,
        filename: str,
        model: str,
        mode: str | None,
        format: str,
        opacity: float,
        legend: bool,
        slot: Slot | None = None,
    ) -> VideoJob:
        """Copy ``upload`` into a new job folder, check it is a video within the limits, and
        queue it (in ``slot`` when the request reserved one in ``self.pool``). Blocking (file
        copy, container probe): call from a thread. Raises VideoRefused (415 not a video, 413
        over a limit) or PoolFull (503)."""
        self.sweep()
        self._make_room()
        job_id = new_token()
        folder = self.root / job_id
        folder.mkdir(parents=True)
        job = VideoJob(job_id, model, mode, folder, filename, format, opacity, legend)
        try:
            with open(job.input, "wb") as out:
                shutil.copyfileobj(upload, out, 1024 * 1024)
            self._probe(job)
            with self._lock:
                self._jobs[job_id] = job
            try:
                job.future = self.pool.submit(self._run, job, slot=slot)
            except PoolFull:
                with self._lock:
                    self._jobs.pop(job_id, None)
                raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job

    def _make_room(self) -> None:
        """Evict the oldest finished jobs while the store is full; 503 when none is finished."""
        with self._lock:
            finished = sorted(
                (j for j in self._jobs.values() if j.status in FINISHED),
                key=lambda j: j.finished or 0,
            )
            excess = len(self._jobs) - self.settings.max_jobs + 1
            evicted = finished[: max(excess, 0)]
            for job in evicted:
                del self._jobs[job.id]
            full = len(self._jobs) >= self.settings.max_jobs
        for job in evicted:
            shutil.rmtree(job.folder, ignore_errors=True)
        if full:
            raise PoolFull(self.pool.retry_after())

    def _probe(self, job: VideoJob) -> None:
        """Refuse what is not a video (by content) or is over the limits, before queueing."""

        settings = self.settings
        try:
            frames = frame_count_estimate(job.input)
            with av.open(str(job.input)) as container:
                demuxer = container.format.name
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
        except ImageError as exc:
            raise VideoRefused(415, _clean_message(exc, job.input, job.filename)) from None
        except Exception as exc:  # FFmpeg reports malformed files in many ways
            raise VideoRefused(
                415,
                f"{job.filename}: not a readable video ({_clean_message(exc, job.input, job.filename)})",
            ) from None
        # FFmpeg reads still images as one-frame videos; they belong to /v1/segment
        if demuxer == "image2" or demuxer.endswith("_pipe"):
            raise VideoRefused(
                415, f"{job.filename}: a still image, not a video; send it to /v1/segment"
            )
        if not width or not height:
            raise VideoRefused(415, f"{job.filename}: the video stream has no frame size")
        if width * height > settings.video_max_pixels:
            raise VideoRefused(
                413,
                f"{job.filename}: frames are {width}×{height} ({width * height / 1e6:.1f} megapixels), "
                f"above this server's limit of {settings.video_max_pixels / 1e6:.1f} megapixels",
            )
        if frames is not None and frames > settings.video_max_frames:
            raise VideoRefused(
                413,
                f"{job.filename}: {frames} frames, above this server's limit of {settings.video_max_frames} frames",
            )
        job.total_frames, job.width, job.height = frames, width, height

    # -- running -----------------------------------------------------------------------------
    def _run(self, job: VideoJob) -> None:

        if job.stop.is_set():
            self._finish(job, CANCELLED, None)
            return
        job.status, job.started = RUNNING, time.time()
        deadline = job.started + self.settings.video_timeout

        def progress(done: int, total: int | None) -> None:
            job.frames_done = done
            if total:
                job.total_frames = total
            if job.stop.is_set():
                raise _Stop()
            if time.time() > deadline:
                job.stop_reason = "timeout"
                raise _Stop()

        try:
            served = self.registry.get(job.model)
            assert served is not None  # checked when the job was made
            segmenter = served.segmenter(job.mode)
            result = segment_video(
                segmenter,
                job.input,
                job.output,
                stats_csv=job.stats_csv,
                opacity=job.opacity,
                legend=job.legend,
                max_frames=self.settings.video_max_frames,
                progress=progress,
            )
        except _Stop:
            if job.stop_reason == "timeout":
                message = f"stopped after {self.settings.video_timeout:g} s, this server's limit per video"
                self._finish(job, FAILED, message)
            else:
                self._finish(job, CANCELLED, None)
        except SegformerError as exc:
            self._finish(job, FAILED, _clean_message(exc, job.input, job.filename))
        except Exception as exc:
            log.exception("video job %s failed", job.id)
            self._finish(job, FAILED, f"internal error ({type(exc).__name__})")
        else:
            info = result.to_dict()
            job.result = {
                "frames": info["frames"],
                "width": info["width"],
                "height": info["height"],
                "fps": info["fps"],
                "codec": info["codec"],
                "seconds": info["seconds"],
                "frames_per_second": info["frames_per_second"],
                "model_ms_per_frame": info["model_ms_per_frame"],
                "class_shares": info["class_shares"],
            }
            job.frames_done = result.frames
            job.total_frames = result.frames
            self._finish(job, DONE, None)

    def _finish(self, job: VideoJob, status: str, error: str | None) -> None:
        job.input.unlink(missing_ok=True)
        job.status, job.error, job.finished = status, error, time.time()
        if job.deleted:
            shutil.rmtree(job.folder, ignore_errors=True)

    # -- ending ------------------------------------------------------------------------------
    def delete(self, job_id: str) -> bool:
        """Cancel a job if it is still going and remove it and its files."""
        with self._lock:
            job = self._jobs.pop(job_id, None) if TOKEN.fullmatch(job_id) else None
        if job is None:
            return False
        self._discard(job)
        return True

    def _discard(self, job: VideoJob) -> None:
        job.deleted = True
        job.stop.set()
        if job.future is not None and job.future.cancel():
            job.status, job.finished = CANCELLED, time.time()
        if job.status in FINISHED:
            shutil.rmtree(job.folder, ignore_errors=True)
        # else: the worker removes the folder when it stops, at its next frame

    def _expired(self, job: VideoJob, now: float) -> bool:
        expires = job.expires(self.settings.job_ttl)
        return expires is not None and expires <= now

    def sweep(self, now: float | None = None) -> int:
        """Remove expired jobs and their files; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [job for job in self._jobs.values() if self._expired(job, now)]
            for job in expired:
                del self._jobs[job.id]
        for job in expired:
            self._discard(job)
        return len(expired)

    def shutdown(self, wait: float = 10.0) -> None:
        """Stop every job, wait up to ``wait`` seconds for running ones to notice, and remove
        all files."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.deleted = True
            job.stop.set()
        self.pool.shutdown()
        deadline = time.monotonic() + wait
        for job in jobs:
            if job.future is not None and not job.future.done():
                # cancelled, or still running after the wait: either way, go on
                with contextlib.suppress(Exception):
                    job.future.exception(timeout=max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self.root, ignore_errors=True)
