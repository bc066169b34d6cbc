"""Segment videos: an overlay video at the source's size and frame rate, and per-frame class
statistics, through PyAV (FFmpeg).

Three stages run at once, joined by bounded queues, so the model never waits for the disk:

    decoder thread ──frames──▶ this thread: Segmenter (batches) ──labels──▶ encoder thread
    (PyAV demux+decode,          (the model; the only stage             (overlay, FFmpeg encode,
     rotation applied)            that needs the CPU cores)               CSV rows, progress)

Facts a user should know:

- Rotation metadata (phone videos) is applied, so the output is upright and needs none.
- 4:2:0 encoders (H.264, MPEG-4, VP9) need even width and height; an odd-sized source is
  padded by one pixel on the right/bottom (edge pixels repeated), never scaled. The result
  says so (``padded``).
- Frames are written at the source's average frame rate with regular timestamps; audio and
  subtitle streams are not copied.
- The output keeps the source container when it is mp4, mov, mkv, avi or webm (else mp4),
  encoded with the first available of: H.264 (libx264) then MPEG-4 Part 2 for mp4/mov/mkv,
  MPEG-4 Part 2 for avi, VP9 then VP8 for webm.
- The video and the CSV appear whole or not at all (temporary files, then ``os.replace``),
  including on Ctrl-C or a decoding error half-way.
"""

from __future__ import annotations

import csv
import io
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from segformer.errors import ImageError, SegformerError
from segformer.inference.segmenter import SegmentationResult, Segmenter, atomic_path, write_atomic

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")

# container → encoders to try, best first
_ENCODERS: dict[str, tuple[str, ...]] = {
    "mp4": ("libx264", "mpeg4"),
    "mov": ("libx264", "mpeg4"),
    "matroska": ("libx264", "mpeg4"),
    "avi": ("mpeg4", "mjpeg"),
    "webm": ("libvpx-vp9", "libvpx"),
}
_CONTAINER_FOR_SUFFIX = {
    ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm",
}  # fmt: skip
_QUEUE_FRAMES = 16  # frames buffered between stages: enough to hide I/O jitter, little memory

ProgressCallback = Callable[[int, int | None], None]


def is_video(path: str | Path) -> bool:
    """True for a video file, judged by its extension or, failing that, by its first bytes
    (ISO-BMFF/QuickTime ``ftyp``, Matroska/WebM EBML, AVI ``RIFF…AVI``)."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError:
        return False
    return (
        head[4:8] == b"ftyp"
        or head[:4] == b"\x1a\x45\xdf\xa3"
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
    )


def output_suffix(source: str | Path) -> str:
    """The extension the overlay video gets: the source's when we can write it, else .mp4."""
    suffix = Path(source).suffix.lower()
    return suffix if suffix in _CONTAINER_FOR_SUFFIX else ".mp4"


@dataclass
class VideoResult:
    """What ``segment_video`` did: the files written, the video's geometry and timing, and the
    average share of each class over all frames."""

    source: str
    output: Path
    stats_csv: Path | None
    frames: int
    width: int
    height: int
    fps: float
    codec: str
    padded: bool
    rotation: int
    seconds: float
    model_ms_per_frame: float
    class_shares: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": str(self.output),
            "stats_csv": str(self.stats_csv) if self.stats_csv else None,
            "frames": self.frames,
            "width": self.width,
            "height": self.height,
            "fps": round(self.fps, 3),
            "codec": self.codec,
            "padded": self.padded,
            "rotation": self.rotation,
            "seconds": round(self.seconds, 3),
            "frames_per_second": round(self.frames / self.seconds, 3) if self.seconds else None,
            "model_ms_per_frame": round(self.model_ms_per_frame, 3),
            "class_shares": {k: round(v, 6) for k, v in self.class_shares.items()},
        }


@dataclass
class _Frame:
    index: int
    time_s: float
    pixels: np.ndarray  # (H, W, 3) uint8, upright


class _Failure:
    """The first error raised by any stage; the others stop when they see it."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def set(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.stop.set()


_END = object()


def _put(q: queue.Queue, item: Any, failure: _Failure) -> bool:
    """Put without blocking forever: gives up (False) when another stage has failed."""
    while not failure.stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, failure: _Failure) -> Any:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if failure.stop.is_set():
                return _END


def _open_input(path: Path) -> tuple[Any, Any]:

    name = str(path)
    if not path.is_file():
        raise ImageError(f"{name}: no such file")
    try:
        container = av.open(name, "r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable video ({_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise ImageError(f"{name}: contains no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's own frame/slice threads for decoding
    return container, stream


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


def _frame_rate(stream: Any) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate).limit_denominator(65535)
    return Fraction(25)


def _frame_count(container: Any, stream: Any, rate: Fraction) -> int | None:
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base * rate)))
    if container.duration:
        return max(1, round(container.duration / 1_000_000 * float(rate)))
    return None


def _decode_frames(
    container: Any,
    stream: Any,
    out: queue.Queue,
    failure: _Failure,
    name: str,
    max_pixels: int | None,
    max_frames: int | None,
    seen: dict[str, Any],
) -> None:

    try:
        index = 0
        for frame in container.decode(stream):
            if max_frames is not None and index >= max_frames:
                break
            if max_pixels is not None and frame.width * frame.height > max_pixels:
                raise ImageError(
                    f"{name}: frames are {frame.width}×{frame.height}, above the limit of "
                    f"{max_pixels / 1e6:.1f} megapixels"
                )
            pixels = frame.to_ndarray(format="rgb24")
            turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
            seen.setdefault("rotation", turns * 90)
            if turns:
                pixels = np.ascontiguousarray(np.rot90(pixels, k=turns))
            time_s = float(frame.time) if frame.time is not None else index / 25.0
            if not _put(out, _Frame(index, time_s, pixels), failure):
                return
            index += 1
        if index == 0:
            raise ImageError(f"{name}: no decodable video frames")
    except (av.FFmpegError, OSError, ValueError) as exc:
        failure.set(ImageError(f"{name}: video cannot be decoded ({_reason(exc)})"))
    except BaseException as exc:  # surfaced in the main thread
        failure.set(exc)
    finally:
        _put(out, _END, failure)


def _open_encoder(
    container: Any, format_name: str, rate: Fraction, width: int, height: int, codec: str | None
) -> Any:

    candidates = (codec,) if codec else _ENCODERS.get(format_name, ("libx264", "mpeg4"))
    problems = []
    for name in candidates:
        if name not in av.codecs_available:
            problems.append(f"{name}: not in this FFmpeg build")
            continue
        try:
            stream = container.add_stream(name, rate=rate)
        except (av.FFmpegError, ValueError) as exc:
            problems.append(f"{name}: {_reason(exc)}")
            continue
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if name == "mjpeg" else "yuv420p"
        if name == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        elif name.startswith("libvpx"):
            stream.options = {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:  # bit-rate driven encoders: about 0.2 bits per pixel
            stream.bit_rate = max(1_000_000, int(width * height * float(rate) * 0.2))
        return stream
    raise SegformerError(f"no video encoder available for {format_name} ({'; '.join(problems)})")


def _pad_even(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return pixels
    return np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _frames_from(q: queue.Queue, failure: _Failure, pending: deque[_Frame]) -> Iterator[np.ndarray]:
    """The decoded frames' pixels, for ``Segmenter.imap``; their metadata waits in ``pending``."""
    while True:
        item = _get(q, failure)
        if item is _END:
            return
        pending.append(item)
        yield item.pixels


def segment_video(
    segmenter: Segmenter,
    source: str | Path,
    output: str | Path,
    *,
    stats_csv: str | Path | None = None,
    opacity: float = 0.5,
    legend: bool = True,
    batch_size: int | None = None,
    codec: str | None = None,
    max_frames: int | None = None,
    progress: ProgressCallback | None = None,
    show_progress: bool = False,
) -> VideoResult:
    """Segment every frame of ``source`` and write the overlay video to ``output`` (its
    extension picks the container) and, with ``stats_csv``, one CSV row per frame: ``frame``,
    ``time_s``, ``model_ms`` and each class's share of the frame (0–1, one column per class).

    ``legend``: a legend of the frame's largest classes drawn in its top-left corner.
    ``batch_size``: frames per engine call (default: the segmenter's). ``codec``: force an
    FFmpeg encoder. ``max_frames``: stop after that many. ``progress(done, total)`` is called
    after each encoded frame (``total`` may be None when the container does not say);
    ``show_progress`` shows a tqdm bar with fps and ETA.

    Raises ``ImageError`` for a missing, unreadable or corrupt video (naming the file).
    """
    source = Path(source)
    output = Path(output)
    name = str(source)
    container, stream = _open_input(source)
    try:
        rate, total = _timing(container, stream, max_frames)
        failure = _Failure()
        seen: dict[str, Any] = {}
        decoded: queue.Queue = queue.Queue(maxsize=_QUEUE_FRAMES)
        segmented: queue.Queue = queue.Queue(maxsize=_QUEUE_FRAMES)
        decoder = threading.Thread(
            target=_decode_frames,
            args=(
                container,
                stream,
                decoded,
                failure,
                name,
                segmenter.max_pixels,
                max_frames,
                seen,
            ),
            name="segformer-video-decode",
            daemon=True,
        )
        # The video appears whole or not at all: it is encoded under a temporary name.
        with atomic_path(output) as tmp_video:
            encoder = _Encoder(
                tmp_video,
                _CONTAINER_FOR_SUFFIX.get(output.suffix.lower(), "mp4"),
                rate,
                codec,
                segmenter,
                opacity,
                legend,
                total,
                progress,
                show_progress,
                name,
            )
            encoder_thread = threading.Thread(
                target=encoder.run,
                args=(segmented, failure),
                name="segformer-video-encode",
                daemon=True,
            )
            started = time.perf_counter()
            decoder.start()
            encoder_thread.start()
            model_ms = _segment_frames(
                segmenter, decoded, segmented, failure, batch_size, decoder, encoder_thread
            )
            seconds = time.perf_counter() - started
        # Written only once the video is in place, so a failed run leaves neither file.
        csv_path = write_atomic(stats_csv, encoder.csv_bytes()) if stats_csv is not None else None
        return VideoResult(
            source=name,
            output=output,
            stats_csv=csv_path,
            frames=encoder.frames,
            width=encoder.width,
            height=encoder.height,
            fps=float(rate),
            codec=encoder.codec,
            padded=encoder.padded,
            rotation=seen.get("rotation", 0),
            seconds=seconds,
            model_ms_per_frame=model_ms / max(encoder.frames, 1),
            class_shares=encoder.mean_shares(),
        )
    finally:
        container.close()


def _timing(container: Any, stream: Any, max_frames: int | None) -> tuple[Fraction, int | None]:
    """The frame rate the output is written at, and how many frames to expect (for progress;
    None when the container does not say and there is no ``max_frames``)."""
    rate = _frame_rate(stream)
    total = _frame_count(container, stream, rate)
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    return rate, total


def _segment_frames(
    segmenter: Segmenter,
    decoded: queue.Queue,
    segmented: queue.Queue,
    failure: _Failure,
    batch_size: int | None,
    decoder: threading.Thread,
    encoder_thread: threading.Thread,
) -> float:
    """The middle stage, in this thread: decoded frames through the model to the encoder.
    Waits for both other stages to end, raises the first error of any stage, and returns the
    model's total milliseconds."""
    pending: deque[_Frame] = deque()
    model_ms = 0.0
    results = segmenter.imap(_frames_from(decoded, failure, pending), batch_size=batch_size)
    try:
        for result in results:
            frame = pending.popleft()
            assert isinstance(result, SegmentationResult)
            model_ms += result.timings.model_ms
            if not _put(segmented, (frame, result), failure):
                break
        _put(segmented, _END, failure)
    except BaseException as exc:
        failure.set(exc)
    finally:
        results.close()
        encoder_thread.join()
        failure.stop.set()  # lets the decoder leave a blocked put
        decoder.join()
    if failure.error is not None:
        raise failure.error
    return model_ms


class _Encoder:
    """The last stage: draws overlays, encodes them, and collects the per-frame statistics."""

    def __init__(
        self,
        path: Path,
        format_name: str,
        rate: Fraction,
        codec: str | None,
        segmenter: Segmenter,
        opacity: float,
        legend: bool,
        total: int | None,
        progress: ProgressCallback | None,
        show_progress: bool,
        name: str,
    ) -> None:
        self.path, self.format_name, self.rate, self.codec_choice = path, format_name, rate, codec
        self.labels = segmenter.labels
        self.opacity, self.legend = opacity, legend
        self.total, self.progress, self.show_progress, self.name = (
            total,
            progress,
            show_progress,
            name,
        )
        self.frames = 0
        self.width = self.height = 0
        self.padded = False
        self.codec = ""
        self.rows: list[list[Any]] = []
        self.share_sums = np.zeros(len(self.labels), dtype=np.float64)

    def run(self, q: queue.Queue, failure: _Failure) -> None:

        bar = None
        output = None
        try:
            output = av.open(str(self.path), "w", format=self.format_name)
            stream = None
            if self.show_progress:
                bar = tqdm(
                    total=self.total, unit="frame", desc=Path(self.name).name, dynamic_ncols=True
                )
            while True:
                item = _get(q, failure)
                if item is _END:
                    break
                frame, result = item
                picture = result.overlay(self.opacity, legend="inside" if self.legend else False)
                pixels = np.asarray(picture)
                if stream is None:
                    self.height, self.width = pixels.shape[:2]
                    self.padded = self.width % 2 == 1 or self.height % 2 == 1
                    height, width = self.height + self.height % 2, self.width + self.width % 2
                    stream = _open_encoder(
                        output, self.format_name, self.rate, width, height, self.codec_choice
                    )
                    self.codec = stream.codec_context.name
                video_frame = av.VideoFrame.from_ndarray(_pad_even(pixels), format="rgb24")
                video_frame.pts = frame.index
                for packet in stream.encode(video_frame):
                    output.mux(packet)
                self._record(frame, result)
                self.frames += 1
                if bar is not None:
                    bar.update(1)
                if self.progress is not None:
                    self.progress(self.frames, self.total)
            if failure.stop.is_set():
                return
            if stream is not None:
                for packet in stream.encode():
                    output.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            failure.set(
                SegformerError(f"{self.name}: writing the overlay video failed ({_reason(exc)})")
            )
        except BaseException as exc:
            failure.set(exc)
        finally:
            if output is not None:
                try:
                    output.close()
                except Exception as exc:
                    failure.set(
                        SegformerError(
                            f"{self.name}: closing the overlay video failed ({_reason(exc)})"
                        )
                    )
            if bar is not None:
                bar.close()

    def _record(self, frame: _Frame, result: SegmentationResult) -> None:
        shares = np.zeros(len(self.labels), dtype=np.float64)
        for c in result.classes:
            shares[c.id] = c.share
        self.share_sums += shares
        self.rows.append(
            [
                frame.index,
                f"{frame.time_s:.4f}",
                f"{result.timings.model_ms:.2f}",
                *(f"{s:.6f}" for s in shares),
            ]
        )

    def csv_bytes(self) -> bytes:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["frame", "time_s", "model_ms", *self.labels])
        writer.writerows(self.rows)
        return text.getvalue().encode()

    def mean_shares(self) -> dict[str, float]:
        if not self.frames:
            return {}
        means = self.share_sums / self.frames
        order = np.argsort(-means, kind="stable")
        return {self.labels[i]: float(means[i]) for i in order if means[i] > 0}


def frame_count_estimate(path: str | Path) -> int | None:
    """How many frames a video says it has (None when its container does not tell)."""
    container, stream = _open_input(Path(path))
    try:
        return _frame_count(container, stream, _frame_rate(stream))
    finally:
        container.close()


__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoResult",
    "frame_count_estimate",
    "is_video",
    "output_suffix",
    "segment_video",
]
