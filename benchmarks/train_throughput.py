"""Training throughput: our SegFormer-B0 against transformers' SegformerForSemanticSegmentation
doing the same training step, side by side in one run.

One step = forward on a batch of 512×512 crops, the loss (logits upsampled to the labels,
cross-entropy over non-ignored pixels, each library's own: ``segformer.training.loss.segmentation_loss``
for ours, ``labels=`` in transformers' forward), backward, and an AdamW step. Both models start from the same weights (ours saved and loaded by
transformers, checked to give the same logits) in train mode (dropout, stochastic depth).

Timing: both models live in one process and take turns, one step each, so that load from other
jobs on shared cores falls on both alike; the table gives each one's median step. Memory: each
model then trains a few steps alone in a fresh process, whose peak resident set is reported.

    python benchmarks/train_throughput.py                       # batch 8, 512², fp32 and bf16
    python benchmarks/train_throughput.py --steps 5 --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from segformer.tools.allocator import allocator_in_use, use_fast_allocator

MODELS = ("ours", "transformers")


def build(kind: str, labels: int) -> tuple[Any, Callable]:
    """The model and its training loss (pixels, labels → loss); both kinds get the same
    weights."""
    import torch

    import segformer
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation
    from segformer.training.loss import segmentation_loss

    torch.manual_seed(0)
    ours = SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=labels))
    if kind == "ours":
        return ours.train(), lambda pixels, target: segmentation_loss(ours(pixels), target)
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        segformer.save(ours, folder)
        theirs = transformers.SegformerForSemanticSegmentation.from_pretrained(folder)
    probe = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        if not torch.allclose(
            theirs.eval()(pixel_values=probe).logits, ours.eval()(probe), atol=1e-4
        ):
            raise SystemExit(
                "transformers' model does not reproduce ours: the weights did not transfer"
            )
    # transformers' own loss, as its users train: logits upsampled to the labels, then
    # cross-entropy ignoring 255 (its semantic_loss_ignore_index), averaged over the rest.
    return theirs.train(), lambda pixels, target: theirs(pixel_values=pixels, labels=target).loss


def make_step(kind: str, precision: str, labels: int, batch: int, size: int) -> Callable[[], float]:
    """A function that runs one training step and returns its wall time."""
    import torch

    from segformer.training.loop import autocast

    model, loss_of = build(kind, labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    target = torch.randint(0, labels, (batch, size, size), generator=generator)
    target[:, : size // 16] = 255  # some ignored pixels, as real masks have
    device = torch.device("cpu")

    def step() -> float:
        start = time.perf_counter()
        with autocast(device, precision):
            loss = loss_of(pixels, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def peak_memory(kind: str, precision: str, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a fresh process training ``kind`` for warm-up + 2 steps."""
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        kind,
        precision,
        "--batch-size",
        str(args.batch_size),
        "--size",
        str(args.size),
        "--labels",
        str(args.labels),
        "--warmup",
        str(args.warmup),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {precision} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--labels", type=int, default=150, help="classes (150: the ADE20K recipe)")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--memory-of", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:  # a child process: train one model alone, print its peak RSS
        step = make_step(*args.memory_of, args.labels, args.batch_size, args.size)
        for _ in range(args.warmup + 2):
            step()
        # VmHWM, not ru_maxrss: the latter keeps the parent's resident size from before exec.
        from segformer.tools.bench import peak_rss_mb

        print(peak_rss_mb())
        return

    results: list[dict[str, Any]] = []
    for precision in args.precisions:
        steps = {
            kind: make_step(kind, precision, args.labels, args.batch_size, args.size)
            for kind in MODELS
        }
        times: dict[str, list[float]] = {kind: [] for kind in MODELS}
        for round_ in range(args.warmup + args.steps):
            for kind in MODELS if round_ % 2 == 0 else MODELS[::-1]:
                seconds = steps[kind]()
                if round_ >= args.warmup:
                    times[kind].append(seconds)
        del steps
        for kind in MODELS:
            median = statistics.median(times[kind])
            memory = None if args.no_memory else peak_memory(kind, precision, args)
            results.append(
                {
                    "model": kind,
                    "precision": precision,
                    "step_s": median,
                    "images_per_s": args.batch_size / median,
                    "steps_s": times[kind],
                    "peak_rss_mb": memory,
                }
            )
            print(
                f"  {kind:<12} {precision}: {median:.2f} s/step ({', '.join(f'{t:.2f}' for t in times[kind])})"
                + (f", peak RSS {memory:.0f} MB" if memory else ""),
                file=sys.stderr,
                flush=True,
            )

    threads = args.threads or torch.get_num_threads()
    allocator = allocator_in_use()
    print(
        f"\nB0, batch {args.batch_size}, {args.size}×{args.size}, {args.labels} classes, forward + loss + backward + "
        f"AdamW; CPU, {threads} threads, {allocator}, torch {torch.__version__}\n"
    )
    print(
        "| precision | model | s/step (median) | images/s | peak RSS | ours ÷ transformers: time | RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        ours, theirs = (
            next(r for r in results if r["model"] == m and r["precision"] == precision)
            for m in MODELS
        )
        for r in (ours, theirs):
            rss = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] else "–"
            time_ratio = f"{ours['step_s'] / theirs['step_s']:.2f}×" if r is ours else ""
            rss_ratio = (
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}×"
                if r is ours and r["peak_rss_mb"]
                else ""
            )
            print(
                f"| {precision} | {r['model']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | {rss} | "
                f"{time_ratio} | {rss_ratio} |"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"threads": threads, "allocator": allocator, "results": results}, f, indent=2)


if __name__ == "__main__":
    # The allocator the command line uses (tcmalloc or tuned glibc), in place before torch
    # loads: this re-executes the script once (see segformer.tools.allocator).
    use_fast_allocator(sys.argv[1:], script=True)
    main()
