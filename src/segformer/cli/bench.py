"""``segformer bench``: our engines and transformers side by side on this machine."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("segformer")


def _engine_list(text: str) -> list[tuple[str, str]]:
    """``fast,compiled:bf16,onnxruntime`` → [(backend, precision)] (precision default fp32)."""
    engines = []
    for item in text.split(","):
        item = item.strip()
        if item:
            backend, _, precision = item.partition(":")
            engines.append((backend, precision or "fp32"))
    return engines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time our engines and transformers side by side: table, JSON and chart",
        description=(
            "Time a model's forward pass through each engine, and transformers' model on the "
            "same weights and input, interleaved, each in a process of its own (medians, ratios, images/s, "
            "accuracy against the reference). Optionally a photo → labels job, peak memory "
            "per job in fresh processes, and the compiled backend's first-call time with an "
            "empty and a warm cache. Prints a table; writes JSON (read by `segformer serve`'s "
            "comparison page) and optionally a PNG chart."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="built-in name, checkpoint, folder or hub id; or b0…b5 for random weights (default: the built-in model)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="input size (default: 512 512)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument(
        "--engines",
        type=_engine_list,
        default=None,
        help="comma-separated BACKEND[:PRECISION] list (default: eager,fast,compiled,compiled:bf16,onnxruntime,openvino,openvino:bf16, and openvino:int8 for a folder with a quantized IR)",
    )
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers out")
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="leave out transformers on OpenVINO and on onnxruntime (its own ONNX export), the routes a user has without us",
    )
    parser.add_argument(
        "--transformers-compiled",
        action="store_true",
        help="also time transformers compiled with torch.compile under bf16 autocast (compiles for a minute or more)",
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="timed calls per engine (default 10)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per engine first (default 1)"
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=2,
        help="calls per engine per round, only the last timed: warm caches (default 2; 1 = strict alternation)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="PyTorch (and onnxruntime) threads"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="time every engine in this one process instead of each in its own, as a user would run it",
    )
    parser.add_argument(
        "--image", default=None, help="a real photo to feed the model (label agreement needs one)"
    )
    parser.add_argument(
        "--photo", default=None, help="also time photo file → full-resolution labels on this image"
    )
    parser.add_argument(
        "--rss", action="store_true", help="also measure peak memory per job in fresh processes"
    )
    parser.add_argument(
        "--compile-cache",
        action="store_true",
        help="also time start-up, compiled bf16 and OpenVINO fp32: first process (empty cache) vs second",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="where to write the results (default: ~/.cache/segformer/bench.json)",
    )
    parser.add_argument("--chart", default=None, help="also write a PNG chart here")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from segformer.errors import SegformerError
    from segformer.tools import bench

    if args.threads is not None:
        if args.threads < 1:
            raise SegformerError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.batch < 1 or args.rounds < 1 or args.burst < 1 or args.warmup < 0:
        raise SegformerError(
            "--batch, --rounds and --burst must be at least 1, --warmup at least 0"
        )
    size = tuple(args.size) if args.size else (512, 512)
    if min(size) < 32:
        raise SegformerError("--size takes two numbers of at least 32 (H W)")
    model, source = _load(args.model)
    engines = args.engines or bench.default_engines(model)
    with_transformers = not args.no_transformers
    if with_transformers and not bench.transformers_available():
        log.info("transformers is not installed: timing our engines only")
        with_transformers = False

    results = bench.new_results()
    job = bench.run_model_job(
        model,
        size,
        batch=args.batch,
        engines=engines,
        with_transformers=with_transformers,
        with_transformers_compiled=with_transformers and args.transformers_compiled,
        with_peers=with_transformers and not args.no_peers,
        rounds=args.rounds,
        warmup=args.warmup,
        image=args.image,
        burst=args.burst,
        isolate=not args.in_process,
    )
    results["jobs"].append(job)
    if args.photo:
        photo_engines = [(b, p) for b, p in engines if b != "eager"] or engines
        results["jobs"].append(
            bench.run_photo_job(
                model,
                args.photo,
                engines=photo_engines,
                with_transformers=with_transformers,
                rounds=args.rounds,
                burst=args.burst,
                isolate=not args.in_process,
            )
        )
    if args.rss:
        _add_peak_rss(results, source, size)
    if args.compile_cache:
        results["compile_cache"] = bench.measure_compile_cache(source, "bf16", size)
        results["openvino_start"] = bench.measure_compile_cache(
            source, "fp32", size, backend="openvino"
        )
    print(bench.format_table(results))
    for key, what in (("compile_cache", "compiled bf16"), ("openvino_start", "openvino fp32")):
        if key in results:
            cache = results[key]
            print(
                f"\n{what}, creation to first result: {cache['first_process_s']:.1f} s in a first "
                f"process, {cache['second_process_s']:.1f} s in a second one (warm cache)"
            )
    path = bench.save_results(results, args.json or bench.default_results_path())
    print(f"\nresults: {path}")
    if args.chart:
        print(f"chart: {bench.save_chart(results, args.chart)}")
    return 0


def _load(name: str | None):
    """The model to time and a source a subprocess can load it from again."""
    import tempfile

    from segformer.models.config import VARIANTS, SegformerConfig
    from segformer.models.segformer import SegformerForSemanticSegmentation
    from segformer.weights.builtin import DEFAULT_MODEL
    from segformer.weights.checkpoints import load_segmentation_model, save

    if name is not None and name.lower() in VARIANTS:
        model = SegformerForSemanticSegmentation(
            SegformerConfig.from_variant(name, num_labels=150)
        ).eval()
        folder = tempfile.mkdtemp(prefix=f"segformer-bench-{name}-")
        save(model, folder)
        return model, folder
    return load_segmentation_model(name, purpose="bench"), name or DEFAULT_MODEL


def _add_peak_rss(results: dict, source: str, size: tuple[int, int]) -> None:
    from segformer.tools import bench

    for job in results["jobs"]:
        photo = job.get("image") if job["kind"] == "photo" else None
        for row in job["results"]:
            runner = bench.TRANSFORMERS if row["engine"] == bench.TRANSFORMERS else "segformer"
            row["peak_rss_mb"] = bench.measure_peak_rss(
                source,
                runner,
                backend=row["backend"],
                precision=row["precision"],
                photo=photo,
                size=size,
            )
