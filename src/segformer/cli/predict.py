"""``segformer predict``: segment images, folders, globs and videos into an output folder.

For each image ``DIR/<stem>.png`` (label map, palette PNG), ``DIR/<stem>_overlay.png`` and
``DIR/<stem>.json``; for each video ``DIR/<stem>_overlay.<ext>`` and ``DIR/<stem>_frames.csv``;
for the run ``DIR/summary.json`` and ``DIR/summary.csv``. Files found in a folder keep their
path below it (``photos/a/x.jpg`` → ``DIR/a/x.png``) so equal names never overwrite each other;
remaining clashes get a suffix. A bad file prints one ``error:`` line and the others go on;
the exit status is 1 when any input failed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segformer.errors import SegformerError

log = logging.getLogger("segformer")

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jfif",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images, folders and videos; write label maps, overlays and statistics",
        description=(
            "Segment images (files, folders searched recursively, glob patterns) and videos. "
            "Writes DIR/<stem>.png (palette label map), DIR/<stem>_overlay.png, DIR/<stem>.json per "
            "image; DIR/<stem>_overlay.mp4 (or the source's container) and DIR/<stem>_frames.csv per "
            "video; DIR/summary.json and DIR/summary.csv for the run."
        ),
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image or video files, folders, or glob patterns"
    )
    parser.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="output folder (created if needed)"
    )
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        help="built-in name, checkpoint file, model folder or hub id (default: the built-in model)",
    )
    add_mode_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--opacity", type=float, default=0.5, help="overlay colour opacity, 0–1 (default 0.5)"
    )
    out.add_argument("--no-overlay", action="store_true", help="do not write overlay images")
    out.add_argument("--no-legend", action="store_true", help="overlays without the legend")
    out.add_argument(
        "--max-frames", type=int, default=None, metavar="N", help="videos: stop after N frames"
    )
    out.add_argument(
        "--codec",
        default=None,
        help="videos: FFmpeg encoder to use (default: chosen per container)",
    )
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images (or video frames) per model call (default 4)",
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: auto)")
    run.add_argument(
        "--precision", default="fp32", help="fp32, bf16 … as the engine supports (default fp32)"
    )
    run.add_argument("--backend", default="auto", help="inference engine backend (default: auto)")
    run.add_argument(
        "--max-pixels", type=_max_pixels, default="100000000", metavar="N",
        help="refuse images larger than N pixels; 0 for no limit (default 100000000)",
    )  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_predict)


def _max_pixels(text: str) -> int | None:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of pixels: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the pixel limit cannot be negative")
    return value or None


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The inference-mode flags, shared by ``predict`` and ``eval`` (they run the same path)."""
    mode = parser.add_argument_group("inference mode")
    mode.add_argument(
        "--mode",
        choices=("whole", "slide"),
        default="whole",
        help="whole image, or sliding windows (default: whole)",
    )
    mode.add_argument(
        "--crop-size",
        type=int,
        nargs="+",
        metavar="N",
        help="slide window: one size or H W (default: the model's input size)",
    )
    mode.add_argument(
        "--stride",
        type=int,
        nargs="+",
        metavar="N",
        help="slide step: one size or H W (default: 2/3 of the window)",
    )
    mode.add_argument(
        "--scales",
        type=float,
        nargs="+",
        metavar="S",
        help="multi-scale test: resize factors, e.g. 0.5 0.75 1 1.25 1.5 1.75",
    )
    mode.add_argument("--flip", action="store_true", help="also run the mirrored image and average")
    mode.add_argument(
        "--average", choices=("logits", "softmax"), default="logits",
        help="how augmented passes are combined (softmax: as mmsegmentation; default: logits)",
    )  # fmt: skip


def mode_from_args(args: argparse.Namespace) -> Any:
    """The ``InferenceMode`` the flags of ``add_mode_arguments`` describe."""
    from segformer.inference.modes import InferenceMode

    if args.mode != "slide" and (args.crop_size or args.stride):
        log.warning(
            "warning: --crop-size and --stride apply to --mode slide; ignored in whole mode"
        )
    return InferenceMode(
        mode=args.mode,
        crop_size=_pair(args.crop_size, "--crop-size"),
        stride=_pair(args.stride, "--stride"),
        scales=tuple(args.scales) if args.scales else (1.0,),
        flip=args.flip,
        average=args.average,
    )


def _pair(values: list[int] | None, flag: str) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise SegformerError(f"{flag} takes one or two positive sizes (H W)")
    return (values[0], values[-1])


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
@dataclass
class Job:
    path: Path
    stem: str  # output name without extension, may contain folders ("a/b/x")
    video: bool


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _wanted(path: Path) -> bool:
    from segformer.inference.video import VIDEO_EXTENSIONS

    return path.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


def collect_jobs(inputs: list[str], out_dir: Path) -> tuple[list[Job], list[tuple[str, str]]]:
    """The files to process, each with a unique output stem, and the inputs that matched
    nothing (with why). Folders are searched recursively for image and video extensions;
    files named explicitly are always tried. Anything inside ``out_dir`` is skipped, so a
    second run over a folder does not segment the first run's overlays."""
    from segformer.inference.video import is_video

    out_resolved = out_dir.resolve()
    found: list[tuple[Path, str]] = []  # (file, preferred stem)
    problems: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_file():
            found.append((path, path.stem))
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and _wanted(p) and not _is_inside(p, out_resolved)
            )
            if not files:
                problems.append((text, "folder holds no image or video files"))
            found.extend((p, p.relative_to(path).with_suffix("").as_posix()) for p in files)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.is_file() and not _is_inside(m, out_resolved)]
            for folder in (m for m in matches if m.is_dir()):
                files.extend(sorted(p for p in folder.rglob("*") if p.is_file() and _wanted(p)))
            if not files:
                reason = (
                    "no files match this pattern"
                    if glob.has_magic(text)
                    else "no such file or folder"
                )
                problems.append((text, reason))
            found.extend((p, p.stem) for p in files)

    jobs: list[Job] = []
    seen_files: set[Path] = set()
    # output stem (lower case: some file systems ignore case) → the extension that took it
    taken: dict[str, str] = {"summary": ""}
    for path, stem in found:
        key = path.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        suffix = path.suffix.lower()
        unique = stem
        if unique.lower() in taken and suffix and taken[unique.lower()] != suffix:
            unique = f"{stem}_{suffix.lstrip('.')}"  # photo.jpg beside photo.png → photo_jpg
        number = 2
        while unique.lower() in taken:
            unique = f"{stem}-{number}"
            number += 1
        taken[unique.lower()] = suffix
        jobs.append(Job(path, unique, is_video(path)))
    return jobs, problems


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def _error_line(text: str, path: Path | str) -> str:
    """``error: <file>: <reason>``, naming the file once."""
    return f"error: {text}" if str(path) in text else f"error: {path}: {text}"


def _domain_warning(result: Any, path: Path | str) -> str:
    """One line for a picture unlike the model's training data."""
    trained_on = f" ({result.domain})" if result.domain else ""
    return (
        f"warning: {path}: does not look like what {result.model_name} was trained on"
        f"{trained_on}: its labels are likely wrong (out-of-domain score "
        f"{result.domain_score:.2f}); for such pictures use another --model"
    )


def _top_classes(classes: list[Any], count: int = 5) -> str:
    return "; ".join(f"{c.name} {c.share * 100:.1f}%" for c in classes[:count])


def run_predict(args: argparse.Namespace) -> int:
    from segformer.inference.segmenter import Segmenter, write_atomic

    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise SegformerError(f"{out_dir}: exists and is not a folder")
    if not 0.0 <= args.opacity <= 1.0:
        raise SegformerError("--opacity must be between 0 and 1")
    if args.batch_size < 1:
        raise SegformerError("--batch-size must be at least 1")
    mode = mode_from_args(args)
    jobs, problems = collect_jobs(args.inputs, out_dir)
    for text, reason in problems:
        print(f"error: {text}: {reason}", file=sys.stderr)
    if not jobs:
        raise SegformerError("nothing to segment: no readable inputs given")

    segmenter = Segmenter.from_pretrained(
        args.model,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        mode=mode,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegformerError(
            f"{out_dir}: cannot create the output folder ({exc.strerror or exc})"
        ) from None
    if segmenter.domain:
        log.info("%s is for %s", segmenter.name, segmenter.domain)
    else:
        log.info("%s does not say what pictures it is for: see its documentation", segmenter.name)
    log.info("%r on %d input(s) → %s", segmenter, len(jobs), out_dir)

    records: list[dict[str, Any]] = [
        {"input": text, "kind": "unknown", "status": "error", "error": reason}
        for text, reason in problems
    ]
    started = time.perf_counter()
    images = [job for job in jobs if not job.video]
    videos = [job for job in jobs if job.video]
    legend = not args.no_legend
    if images:
        records.extend(_run_images(segmenter, images, out_dir, args, legend))
    for job in videos:
        records.append(_run_video(segmenter, job, out_dir, args, legend))
    seconds = time.perf_counter() - started

    failures = [r for r in records if r["status"] != "ok"]
    done_images = sum(1 for r in records if r["status"] == "ok" and r["kind"] == "image")
    summary = {
        "model": segmenter.name,
        "mode": segmenter.mode.to_dict(),
        "device": segmenter.device,
        "backend": getattr(segmenter.engine, "backend", None),
        "precision": getattr(segmenter.engine, "precision", None),
        "inputs": len(records),
        "succeeded": len(records) - len(failures),
        "failed": len(failures),
        "seconds": round(seconds, 3),
        "images_per_second": round(done_images / seconds, 3) if seconds and done_images else None,
        "results": records,
    }
    write_atomic(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_atomic(out_dir / "summary.csv", _summary_csv(records))
    rate = f" ({done_images / seconds:.2f} images/s)" if done_images and seconds else ""
    print(
        f"segmented {len(records) - len(failures)} of {len(records)} input(s) in {seconds:.1f} s{rate}; outputs in {out_dir}",
        file=sys.stderr,
    )
    if failures:
        print(
            f"error: {len(failures)} of {len(records)} input(s) failed: "
            + ", ".join(r["input"] for r in failures),
            file=sys.stderr,
        )
        return 1
    return 0


def _progress(total: int, unit: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr)


def _run_images(
    segmenter: Any, jobs: list[Job], out_dir: Path, args: argparse.Namespace, legend: bool
) -> Iterator[dict[str, Any]]:
    records = []
    with _progress(len(jobs), "img", args.no_progress) as bar:
        results = segmenter.imap((job.path for job in jobs), errors="return")
        for job, result in zip(jobs, results, strict=True):
            record: dict[str, Any] = {"input": str(job.path), "kind": "image"}
            if isinstance(result, SegformerError):
                bar.write(_error_line(str(result), job.path), file=sys.stderr)
                record.update(status="error", error=str(result))
            else:
                try:
                    paths = result.save(
                        out_dir,
                        job.stem,
                        opacity=args.opacity,
                        overlay=not args.no_overlay,
                        legend=legend,
                    )
                except OSError as exc:
                    message = f"{job.path}: cannot write outputs ({exc.strerror or exc})"
                    bar.write(f"error: {message}", file=sys.stderr)
                    record.update(status="error", error=message)
                else:
                    if result.out_of_domain:
                        bar.write(_domain_warning(result, job.path), file=sys.stderr)
                    record.update(
                        status="ok",
                        outputs={
                            kind: str(path.relative_to(out_dir)) for kind, path in paths.items()
                        },
                        width=result.width,
                        height=result.height,
                        out_of_domain=result.out_of_domain,
                        domain_score=result.to_dict()["domain_score"],
                        classes=[c.to_dict() for c in result.classes],
                        timings=result.timings.to_dict(),
                    )
            records.append(record)
            bar.update(1)
    return records


def _run_video(
    segmenter: Any, job: Job, out_dir: Path, args: argparse.Namespace, legend: bool
) -> dict[str, Any]:
    from segformer.inference.video import output_suffix, segment_video

    record: dict[str, Any] = {"input": str(job.path), "kind": "video"}
    video_path = out_dir / f"{job.stem}_overlay{output_suffix(job.path)}"
    csv_path = out_dir / f"{job.stem}_frames.csv"
    try:
        result = segment_video(
            segmenter,
            job.path,
            video_path,
            stats_csv=csv_path,
            opacity=args.opacity,
            legend=legend,
            codec=args.codec,
            max_frames=args.max_frames,
            show_progress=not args.no_progress,
        )
    except SegformerError as exc:
        print(_error_line(str(exc), job.path), file=sys.stderr)
        record.update(status="error", error=str(exc))
        return record
    data = result.to_dict()
    record.update(
        status="ok",
        outputs={
            "overlay": str(video_path.relative_to(out_dir)),
            "frames_csv": str(csv_path.relative_to(out_dir)),
        },
        width=result.width,
        height=result.height,
        frames=result.frames,
        fps=data["fps"],
        codec=result.codec,
        padded=result.padded,
        classes=[{"name": name, "share": share} for name, share in data["class_shares"].items()],
        seconds=data["seconds"],
    )
    return record


def _summary_csv(records: list[dict[str, Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(
        [
            "input",
            "kind",
            "status",
            "error",
            "width",
            "height",
            "frames",
            "top_classes",
            "total_ms",
            "outputs",
        ]
    )
    for r in records:
        classes = r.get("classes") or []
        top = "; ".join(f"{c['name']} {c['share'] * 100:.1f}%" for c in classes[:5])
        total_ms = (
            r.get("timings", {}).get("total_ms", "")
            if r["kind"] == "image"
            else (round(r["seconds"] * 1000, 1) if "seconds" in r else "")
        )
        outputs = " ".join(sorted((r.get("outputs") or {}).values()))
        writer.writerow(
            [
                r["input"],
                r["kind"],
                r["status"],
                r.get("error", ""),
                r.get("width", ""),
                r.get("height", ""),
                r.get("frames", ""),
                top,
                total_ms,
                outputs,
            ]
        )
    return text.getvalue().encode()
