"""Large JPEGs: a photo file to labels with a full decode against ``reduced_decode`` (libjpeg's
1/2, 1/4 or 1/8 reduction, never below the model's input size), and against transformers'
image processor + model + post-processing where its preprocessing is the model's own.

Photos: the Cityscapes street from ../shared resized (Lanczos) to 2048×1024 and 4032×2016 and
saved as JPEG (quality 92). Models: the built-in ``camvid-b0`` (reads a short side of 480;
transformers' processor has no such mode, so no transformers row) and the Cityscapes B0
weights. Each route is timed in this one process, interleaved round by round, on the same
engine for both decodes. "labels alike": the full decode's labels sampled at the reduced
grid (the full-size pixel nearest each reduced pixel's centre) against the reduced run's.

    python benchmarks/reduced_decode.py --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segformer.inference.segmenter import Segmenter
from segformer.tools.allocator import use_fast_allocator
from segformer.tools.bench import transformers_photo_pipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFORMER_SHARED", REPO.parent / "shared"))
STREET = SHARED / "data" / "cityscapes-sample" / "stuttgart_demo_1024x512.png"
CITYSCAPES_B0 = SHARED / "weights" / "segformer-b0-cityscapes"
SIZES = ((2048, 1024), (4032, 2016))


def median_ms(routes: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each route once untimed, then ``rounds`` rounds running every route once, in turn."""
    for run in routes.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(rounds):
        for name, run in routes.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not STREET.is_file() or not CITYSCAPES_B0.is_dir():
        print(f"needs ../shared (the street photo and {CITYSCAPES_B0.name})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    street = Image.open(STREET).convert("RGB")
    lines = [
        "| model | JPEG | transformers | full decode | reduced decode | decoded at | labels alike |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        photos = []
        for width, height in SIZES:
            path = Path(scratch) / f"street_{width}x{height}.jpg"
            street.resize((width, height), Image.Resampling.LANCZOS).save(path, quality=92)
            photos.append(path)
        for name, source in (("built-in camvid-b0", None), ("Cityscapes B0", CITYSCAPES_B0)):
            full = Segmenter.from_pretrained(source, device="cpu")
            reduced = Segmenter(full.model, engine=full.engine, name=name, reduced_decode=True)
            reference = transformers_photo_pipeline(full.model) if source else None
            for path in photos:
                routes: dict[str, Callable[[], object]] = {
                    "full": functools.partial(full, path),
                    "reduced": functools.partial(reduced, path),
                }
                if reference is not None:
                    routes["transformers"] = functools.partial(reference, path)
                ms = median_ms(routes, args.rounds)
                whole, small = full(path).labels, reduced(path).labels
                sy, sx = whole.shape[0] // small.shape[0], whole.shape[1] // small.shape[1]
                alike = (whole[sy // 2 :: sy, sx // 2 :: sx] == small).mean() * 100
                transformers = f"{ms['transformers']:.1f} ms" if reference else "–"
                lines.append(
                    f"| {name} | {path.stem.split('_')[1]} | {transformers} | {ms['full']:.1f} ms "
                    f"| {ms['reduced']:.1f} ms | {small.shape[1]}×{small.shape[0]} "
                    f"| {alike:.2f}% |"
                )
                print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    # The allocator the command line uses, in place before torch loads (re-executes once).
    use_fast_allocator(sys.argv[1:], script=True)
    raise SystemExit(main())
