"""Batch prediction throughput: ``segformer predict`` over a folder of real photos against
transformers doing the same job, each in a fresh process, with the built-in ``camvid-b0``.

Photos: CamVid train + val (468 at 480×360, from ../shared) plus mirrored copies of the first
ones up to ``--images`` (default 500), written to a temporary folder (PNG, as CamVid's own).
Jobs (``--jobs`` picks):

- ``ours-default``: ``segformer predict DIR --out OUT``, today's outputs (label map, overlay, JSON).
- ``ours-labels``: the same with ``--save labels`` (what the transformers jobs produce).
- ``ours-fastest``: ``--save labels`` with ``--backend/--precision`` from ``--fastest``
  (default ``openvino:bf16``; compile time is not counted, programs are cached).
- ``ours-2x1``: ``--save labels`` under ``torchrun --nproc_per_node 2``, one thread per rank
  (to set against ``ours-labels``, one process with two threads).
- ``hf-pipeline``: transformers' ``pipeline("image-segmentation")`` over the same files.
- ``hf-loop``: a hand-written transformers loop: ``SegformerImageProcessor`` +
  ``SegformerForSemanticSegmentation`` + ``post_process_semantic_segmentation``, batches of
  8, label maps saved as PNG.

Images/s counts the segmenting loop only (model loading and compilation excluded) — for ours
the ``images_per_second`` of ``summary.json``. Memory: each process's peak resident set
(``VmHWM``) and whether it is flat: the peak of the last third of the run against the
middle third's (the first holds model loading; a leak grows with the number of images).

    python benchmarks/predict_throughput.py                     # 500 photos, every job
    python benchmarks/predict_throughput.py --limit 40 --fastest openvino:bf16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("SEGFORMER_SHARED", REPO.parent / "shared")) / "data" / "camvid"
JOBS = ("ours-default", "ours-labels", "ours-fastest", "ours-2x1", "hf-pipeline", "hf-loop")


# ---------------------------------------------------------------------------------------
# Inside a job process
# ---------------------------------------------------------------------------------------
class RssSampler:
    """VmRSS every 0.2 s in a background thread: the peaks of the middle and last third."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append((time.monotonic(), _status_kb("VmRSS")))

    def report(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join()
        samples = self.samples or [(time.monotonic(), _status_kb("VmRSS"))]
        # Thirds of the run: the first holds the model loading and warm-up; a leak shows as a
        # last third above the middle one.
        start, end = samples[0][0], samples[-1][0]
        cut1, cut2 = start + (end - start) / 3, start + 2 * (end - start) / 3
        middle = max((kb for t, kb in samples if cut1 < t <= cut2), default=0)
        last = max((kb for t, kb in samples if t > cut2), default=middle)
        return {
            "vmhwm_mb": round(_status_kb("VmHWM") / 1024, 1),
            "first_half_peak_mb": round(middle / 1024, 1),
            "second_half_peak_mb": round(last / 1024, 1),
            "flat": last <= middle * 1.05 + 20 * 1024,
        }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def job_ours(args: argparse.Namespace) -> dict[str, Any]:
    from segformer.cli import main

    sampler = RssSampler()
    extra = json.loads(args.extra)
    code = main(["predict", args.photos, "--out", args.out, "--no-progress", *extra])
    result = sampler.report()
    if code != 0:
        raise SystemExit(f"segformer predict failed with status {code}")
    if int(os.environ.get("RANK", "0")) == 0:
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        result["images"] = summary["succeeded"]
        result["images_per_second"] = summary["images_per_second"]
    return result


def _photos(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix == ".png")


def job_hf_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import pipeline

    torch.set_num_threads(2)
    segment = pipeline("image-segmentation", model=args.model_dir, device="cpu")
    files = _photos(args.photos)
    sampler = RssSampler()
    start = time.perf_counter()
    for path in files:
        segment(path)  # one mask per class present
    seconds = time.perf_counter() - start
    return {**sampler.report(), "images": len(files), "images_per_second": len(files) / seconds}


def job_hf_loop(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.set_num_threads(2)
    processor = SegformerImageProcessor.from_pretrained(args.model_dir)
    model = SegformerForSemanticSegmentation.from_pretrained(args.model_dir).eval()
    files = _photos(args.photos)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = RssSampler()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), 8):
            batch = files[i : i + 8]
            images = [Image.open(p).convert("RGB") for p in batch]
            inputs = processor(images=images, return_tensors="pt")
            outputs = model(**inputs)
            sizes = [(im.height, im.width) for im in images]
            maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            for path, labels in zip(batch, maps, strict=True):
                Image.fromarray(labels.numpy().astype(np.uint8)).save(out / Path(path).name)
    seconds = time.perf_counter() - start
    return {**sampler.report(), "images": len(files), "images_per_second": len(files) / seconds}


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------
def prepare_photos(folder: Path, count: int) -> int:
    """``count`` CamVid photos in ``folder``: train + val, then mirrored copies."""
    from PIL import Image, ImageOps

    sources = sorted((CAMVID / "train").glob("*.png")) + sorted((CAMVID / "val").glob("*.png"))
    if not sources:
        raise SystemExit(f"CamVid photos not found under {CAMVID}")
    for i in range(count):
        source = sources[i % len(sources)]
        target = folder / f"{i:05d}_{source.name}"
        if i < len(sources):
            target.symlink_to(source)
        else:
            ImageOps.mirror(Image.open(source)).save(target)
    return min(count, len(sources))


def run_job(job: str, photos: Path, work: Path, model_dir: Path, fastest: str) -> dict[str, Any]:
    out = work / f"out-{job}"
    result_files = work / f"result-{job}"
    result_files.mkdir()
    base = [sys.executable, __file__, "--_job"]
    common = ["--photos", str(photos), "--out", str(out), "--model-dir", str(model_dir)]
    # Every job with the allocator `segformer` picks (tcmalloc where installed), set here so
    # that no job re-executes itself.
    from segformer.tools.allocator import environment

    env = {**os.environ, **environment()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    model = ["--model", "camvid-b0"]
    backend, precision = fastest.split(":")
    if job.startswith("ours"):
        extra = {
            "ours-default": [*model, "--threads", "2"],
            "ours-labels": [*model, "--threads", "2", "--save", "labels"],
            "ours-fastest": [
                *model,
                "--threads",
                "2",
                "--save",
                "labels",
                "--backend",
                backend,
                "--precision",
                precision,
            ],
            "ours-2x1": [*model, "--threads", "1", "--save", "labels"],
        }[job]
        command = [*base, "ours", *common, "--extra", json.dumps(extra), "--result", str(result_files)]  # fmt: skip
        if job == "ours-2x1":
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "2", *command[1:]]  # fmt: skip
    else:
        command = [*base, job, *common, "--result", str(result_files)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"job": job, "error": done.stderr.strip().splitlines()[-1:]}
    ranks = [json.loads(p.read_text()) for p in sorted(result_files.glob("rank*.json"))]
    if not ranks:
        return {"job": job, "error": done.stderr.strip().splitlines()[-3:]}
    head = ranks[0]
    return {
        "job": job,
        "images": head.get("images"),
        "images_per_second": round(head["images_per_second"], 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "vmhwm_mb_per_rank": [r["vmhwm_mb"] for r in ranks],
        "flat": all(r["flat"] for r in ranks),
        "rss_middle_last_mb": [(r["first_half_peak_mb"], r["second_half_peak_mb"]) for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="photos in the folder (default 500)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos (smoke run)")  # fmt: skip
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated, from: " + ", ".join(JOBS))  # fmt: skip
    parser.add_argument("--fastest", default="openvino:bf16", help="BACKEND:PRECISION of ours-fastest")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    for name in ("--photos", "--out", "--model-dir", "--extra", "--result"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._job:
        job = {"ours": job_ours, "hf-pipeline": job_hf_pipeline, "hf-loop": job_hf_loop}[args._job]
        result = job(args)
        rank = os.environ.get("RANK", "0")
        (Path(args.result) / f"rank{rank}.json").write_text(json.dumps(result))
        return

    import segformer

    count = args.limit or args.images
    with tempfile.TemporaryDirectory(prefix="predict-throughput-") as tmp:
        work = Path(tmp)
        photos = work / "photos"
        photos.mkdir()
        real = prepare_photos(photos, count)
        model_dir = work / "camvid-b0-hf"
        segformer.save(segformer.load("camvid-b0"), model_dir)  # HF layout: transformers reads it
        from segformer.tools.allocator import allocator_in_use, environment

        allocator = environment().get("LD_PRELOAD", allocator_in_use())
        print(f"allocator {allocator}; {count} photos ({real} CamVid train+val at 480×360, {count - real} mirrored copies); "
              f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", file=sys.stderr)  # fmt: skip
        rows = []
        for job in args.jobs.split(","):
            row = run_job(job.strip(), photos, work, model_dir, args.fastest)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print("\n| job | images/s | peak RSS per rank (MB) | flat | wall s |\n|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['job']} | failed: {row['error']} | | | |")
            continue
        rss = " + ".join(f"{mb:.0f}" for mb in row["vmhwm_mb_per_rank"])
        print(f"| {row['job']} | {row['images_per_second']:.2f} | {rss} | {'yes' if row['flat'] else 'no'} | {row['wall_s']} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
