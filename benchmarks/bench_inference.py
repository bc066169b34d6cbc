"""Inference benchmark behind benchmarks/README.md: our engines against transformers' model on
the same weights, inputs, threads and allocator, interleaved, each engine in a process of its own
(`--in-process`: all in this one).

Jobs (the targets of the engine issue):

1. B0 at 512×512, real Cityscapes weights, a real street photo: every engine (OpenVINO fp32,
   bf16, and int8 with ``--int8 FOLDER``), against transformers eager and the routes a user
   has without us: transformers' graph on OpenVINO fp32/bf16 and transformers' own ONNX
   export on onnxruntime (``peer_ratio``: against the fastest of those).
2. B2 at 512×512, random weights: the exact path and the fast path.
3. B0 at 1024×2048 (Cityscapes' full resolution), real weights: the exact path.
4. A 640×480 photo file to full-resolution labels (decode → preprocess → model → labels)
   against transformers' processor + model + post_process_semantic_segmentation.
5. ``labels_from_logits`` against upsample-every-class-then-argmax on real logits.
6. Peak resident memory of job 4, each pipeline alone in a fresh process.
7. Start-up, creation to first result, in a first process (empty cache: compile, or for
   OpenVINO convert + compile) and in a second one (warm cache): compiled bf16, OpenVINO fp32.
8. Label agreement of the fast paths with the exact path over real photos.
9. Parameters and GMACs of every variant (the paper's table) and the floors on this machine.

    python benchmarks/bench_inference.py                  # everything (~15 min on 2 cores)
    python benchmarks/bench_inference.py --quick          # fewer rounds and jobs, a smoke test
    python benchmarks/bench_inference.py --int8 FOLDER    # job 1 from a `segformer quantize`
                                                          # folder of the same weights: + int8

Needs ../shared (real weights and photos) and transformers. Writes JSON (``--out``), a PNG
chart (``--chart``) and prints the Markdown tables that README.md shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from segformer.tools.allocator import use_fast_allocator

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFORMER_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "segformer-b0-cityscapes"
STREET = SHARED / "data" / "cityscapes-sample" / "stuttgart_demo_1024x512.png"


def real_photos() -> list[Path]:
    """Real photos for label agreement: the Cityscapes street, ADE20K and CamVid samples."""
    photos = [STREET]
    photos += sorted((SHARED / "data" / "ade20k-sample" / "images").rglob("*.jpg"))[:3]
    photos += sorted((SHARED / "data" / "camvid" / "val").glob("*.png"))[:4]
    return [p for p in photos if p.is_file()]


def photo_640x480(folder: Path) -> Path:
    """A 640×480 JPEG cut from the Cityscapes street photo (a typical phone-camera size)."""
    from PIL import Image

    with Image.open(STREET) as image:
        width, height = image.size
        crop_width = height * 4 // 3
        left = (width - crop_width) // 2
        picture = (
            image.convert("RGB")
            .crop((left, 0, left + crop_width, height))
            .resize((640, 480), Image.BILINEAR)
        )
    path = folder / "street_640x480.jpg"
    picture.save(path, quality=92)
    return path


def markdown(results: dict) -> str:
    """The tables README.md shows."""
    from segformer.tools import bench
    from segformer.tools.bench import floors_ms

    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']} ({', '.join(machine.get('cpu_features', []))}), {bench.thread_count_text(machine)}, "
        f"allocator {machine['allocator']}; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine.get('transformers', '–')}, onnxruntime {machine.get('onnxruntime', '–')}, "
        f"openvino {machine.get('openvino', '–')}. "
        f"Peak matmul measured: fp32 {machine['peak_gmacs_per_s']['fp32']:.0f} GMAC/s, "
        f"bf16 {machine['peak_gmacs_per_s']['bf16']:.0f} GMAC/s. Load average during the run: "
        f"{results.get('load_average', '?')}.",
        "",
    ]
    for job in results["jobs"]:
        title = f"**{job['name']}**"
        if job.get("gmacs"):
            floors = floors_ms(job, machine)
            title += (
                f" — {job['gmacs']:.1f} GMACs as published, {job['executed_gmacs']:.1f} executed by `fast`; "
                f"floor {floors.get('fp32', 0):.1f} ms fp32 / {floors.get('bf16', 0):.1f} ms bf16"
            )
        if "labels_identical_to_upsample_argmax" in job:
            title += f" — labels identical to upsample-then-argmax: {job['labels_identical_to_upsample_argmax']}"
        if "identical" in job:
            title += f" — identical: {job['identical']}"
        if job.get("best_peer"):
            title += f" — best route without us: {job['best_peer']}"
        lines += [title, ""]
        lines.append(
            "| engine | median ms | p10–p90 ms | images/s | ratio | vs best peer | rel. error | labels = exact | peak RSS |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in job["results"]:
            ratio = f"{row['ratio']:.3f}×" if row.get("ratio") is not None else "–"
            peer = f"{row['peer_ratio']:.3f}×" if row.get("peer_ratio") is not None else "–"
            error = f"{row['relative_error']:.1e}" if row.get("relative_error") is not None else "–"
            agreement = (
                f"{row['label_agreement'] * 100:.2f}%"
                if row.get("label_agreement") is not None
                else "–"
            )
            rss = f"{row['peak_rss_mb']:.0f} MiB" if row.get("peak_rss_mb") is not None else "–"
            lines.append(
                f"| {row['engine']} | {row['median_ms']:.1f} | {row['p10_ms']:.1f}–{row['p90_ms']:.1f} | "
                f"{row['images_per_s']:.2f} | {ratio} | {peer} | {error} | {agreement} | {rss} |"
            )
        lines.append("")
    if "agreement" in results:
        lines += [
            "**Label agreement with the exact path over real photos** (full-resolution labels)",
            "",
        ]
        lines += ["| engine | photos | pixels agreeing |", "|---|---:|---:|"]
        for row in results["agreement"]:
            lines.append(f"| {row['engine']} | {row['photos']} | {row['agreement'] * 100:.3f}% |")
        lines.append("")
    for key, what in (("compile_cache", "Compiled bf16"), ("openvino_start", "OpenVINO fp32")):
        if key in results:
            cache = results[key]
            lines += [
                f"**{what}, B0 512², creation to first result:** {cache['first_process_s']:.1f} s in a first "
                f"process (empty cache), {cache['second_process_s']:.1f} s in a second process (warm cache); "
                f"steady state {cache['steady_ms']:.1f} ms.",
                "",
            ]
    if "variants" in results:
        lines += [
            "**Variants** (150 classes; B0–B4 at 512², B5 at 640², as in the paper's table)",
            "",
        ]
        lines += [
            "| variant | parameters | GMACs as published | GMACs executed by `fast` |",
            "|---|---:|---:|---:|",
        ]
        for row in results["variants"]:
            lines.append(
                f"| {row['variant']} | {row['params_m']:.1f} M | {row['gmacs']:.1f} | {row['executed_gmacs']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per engine and job")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, B0 jobs only, no subprocess jobs"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--burst",
        type=int,
        default=2,
        help="calls per engine per round, the last one timed (warm caches; default 2; 1: strict alternation)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="time every engine in this one process instead of each in its own",
    )
    parser.add_argument(
        "--int8",
        default=None,
        help="a `segformer quantize` folder of the Cityscapes B0 weights (HF files + openvino_int8.xml): adds OpenVINO int8 to job 1",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inference.json"))
    parser.add_argument("--chart", default=str(REPO / "benchmarks" / "results" / "inference.png"))
    args = parser.parse_args()

    import torch

    from segformer.inference.engine import create_engine
    from segformer.inference.processing import ImageProcessor, read_image
    from segformer.models.config import SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation
    from segformer.tools import bench
    from segformer.weights.checkpoints import load

    if not WEIGHTS.is_dir():
        print(f"needs the real weights at {WEIGHTS}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    started = time.time()
    with open("/proc/loadavg") as stream:
        load_before = " ".join(stream.read().split()[:3])
    results = bench.new_results()
    b0 = load(WEIGHTS)
    # From the quantized folder, the same weights come with their int8 IR (default_engines
    # then adds the int8 row).
    b0_job1 = load(args.int8) if args.int8 else b0
    everything = bench.default_engines(b0_job1)
    openvino_rows = [(b, p) for b, p in everything if b == "openvino" and p != "int8"]

    def step(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="segformer-bench-") as scratch:
        scratch_dir = Path(scratch)
        photo = photo_640x480(scratch_dir)

        step("B0 512×512, real weights")
        results["jobs"].append(
            bench.run_model_job(
                b0_job1,
                (512, 512),
                engines=everything,
                with_transformers_compiled=not args.quick,
                with_peers=True,
                rounds=rounds,
                burst=args.burst,
                isolate=not args.in_process,
                image=STREET,
                name="B0 512×512 (Cityscapes weights, street photo)",
            )
        )
        step("photo 640×480 → labels")
        results["jobs"].append(
            bench.run_photo_job(
                b0,
                photo,
                engines=[
                    ("auto", "fp32"),  # our default, labelled by the backend it picks
                    ("fast", "fp32"),
                    ("compiled", "bf16"),
                    ("onnxruntime", "fp32"),
                    *openvino_rows,
                ],
                rounds=rounds,
                burst=args.burst,
                isolate=not args.in_process,
                name="640×480 JPEG → full-resolution labels (B0 Cityscapes)",
            )
        )
        step("labels_from_logits on real logits")
        pixels = ImageProcessor.from_model(b0)(read_image(photo))["pixel_values"]
        logits = create_engine(b0, "fast")(pixels)
        results["jobs"].append(
            bench.run_labels_job(
                logits,
                (480, 640),
                rounds=rounds,
                burst=args.burst,
                name="logits 19×128×128 → labels 480×640",
            )
        )
        if not args.quick:
            step("B2 512×512, random weights")
            torch.manual_seed(0)
            b2 = SegformerForSemanticSegmentation(
                SegformerConfig.from_variant("b2", num_labels=150)
            ).eval()
            results["jobs"].append(
                bench.run_model_job(
                    b2,
                    (512, 512),
                    engines=[
                        ("fast", "fp32"),
                        ("compiled", "fp32"),
                        ("compiled", "bf16"),
                        *openvino_rows,
                    ],
                    rounds=rounds,
                    burst=args.burst,
                    isolate=not args.in_process,
                    image=STREET,
                    name="B2 512×512 (random weights, 150 classes)",
                )
            )
            del b2
            step("B0 1024×2048, real weights")
            results["jobs"].append(
                bench.run_model_job(
                    b0,
                    (1024, 2048),
                    engines=[
                        ("eager", "fp32"),
                        ("fast", "fp32"),
                        ("compiled", "fp32"),
                        ("compiled", "bf16"),
                        *openvino_rows,
                    ],
                    rounds=max(3, rounds // 2),
                    image=STREET,
                    isolate=not args.in_process,
                    name="B0 1024×2048 (Cityscapes weights, street photo)",
                )
            )
            step("peak RSS per pipeline, fresh processes")
            photo_job = results["jobs"][1]
            for row in photo_job["results"]:
                runner = bench.TRANSFORMERS if row["engine"] == bench.TRANSFORMERS else "segformer"
                row["peak_rss_mb"] = bench.measure_peak_rss(
                    str(WEIGHTS),
                    runner,
                    backend=row["backend"],
                    precision=row["precision"],
                    photo=str(photo),
                )
            step("compile cache: first vs second process")
            results["compile_cache"] = bench.measure_compile_cache(str(WEIGHTS), "bf16", (512, 512))
            if openvino_rows:
                results["openvino_start"] = bench.measure_compile_cache(
                    str(WEIGHTS), "fp32", (512, 512), backend="openvino"
                )
            step("label agreement over real photos")
            photos = real_photos()
            results["agreement"] = [
                {
                    "engine": bench.engine_name(backend, precision),
                    "photos": len(photos),
                    "agreement": bench.labels_agreement_on_images(b0, photos, backend, precision),
                }
                for backend, precision in [
                    ("compiled", "bf16"),
                    ("onnxruntime", "fp32"),
                    *[(b, p) for b, p in openvino_rows if p != "fp32"],
                ]
            ]
        results["variants"] = bench.variant_table()

    with open("/proc/loadavg") as stream:
        results["load_average"] = (
            f"{load_before} at the start, {' '.join(stream.read().split()[:3])} at the end"
        )
    results["seconds"] = time.time() - started
    bench.save_results(results, args.out)
    bench.save_chart(results, args.chart)
    print(bench.format_table(results))
    print()
    print(markdown(results))
    print(f"\nresults: {args.out}\nchart: {args.chart}")
    return 0


if __name__ == "__main__":
    # The allocator the command line uses (tcmalloc or tuned glibc), in place before torch
    # loads: this re-executes the script once (see segformer.tools.allocator).
    use_fast_allocator(sys.argv[1:], script=True)
    raise SystemExit(main())
