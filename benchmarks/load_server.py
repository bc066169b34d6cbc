"""Bounded load test of `segformer serve`: N concurrent clients for T seconds on 127.0.0.1.

Starts the server through the real command line (so it gets the same allocator and thread
settings a user gets), waits until it answers /healthz, then runs N client threads that each
send POST /v1/segment back to back for T seconds, and stops everything. Reports requests per
second, p50/p90/p99 latency of successful requests, every status seen, failures (anything but
200 and an explicit 503 with Retry-After), and the server's peak resident memory (VmHWM).

    python benchmarks/load_server.py --model /path/to/segformer-b0-cityscapes \
        --image photo.png --clients 4 --seconds 20 [--workers 1] [--queue 8] [--json out.json]

Only ever talks to the server it started, on loopback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CITYSCAPES_B0 = REPO.parent / "shared" / "weights" / "segformer-b0-cityscapes"
STUTTGART = REPO.parent / "shared" / "data" / "cityscapes-sample" / "stuttgart_demo_1024x512.png"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    """The process's high-water resident set size (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def default_image() -> bytes:
    if STUTTGART.is_file():
        return STUTTGART.read_bytes()
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_clients(url: str, image: bytes, clients: int, seconds: float, form: dict[str, str]) -> dict:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    response = http.post(
                        "/v1/segment", files={"image": ("photo.png", image, "image/png")}, data=form
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        statuses["error"] += 1
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[str(response.status_code)] += 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    elif response.status_code == 503 and response.headers.get("retry-after"):
                        pass  # an explicit "busy": the bounded queue doing its job
                    else:
                        failures.append(f"{response.status_code}: {response.text[:200]}")
                if response.status_code == 503:
                    time.sleep(min(float(response.headers.get("retry-after", 1)), 0.5))

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    return {
        "wall_s": round(wall, 2),
        "ok": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {
            "p50": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
            "p90": round(percentile(latencies, 90) * 1000, 1) if latencies else None,
            "p99": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        },
        "statuses": dict(statuses),
        "busy_503": statuses.get("503", 0),
        "failures": len(failures),
        "failure_examples": failures[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CITYSCAPES_B0) if CITYSCAPES_B0.exists() else None)
    parser.add_argument(
        "--image", type=Path, help="image to send (default: the Cityscapes Stuttgart demo)"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument(
        "--include", default="label_map,overlay", help="pictures each response carries"
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model is required (../shared is not there)")
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 600:
        parser.error("keep it bounded: 1–64 clients for at most 600 s")
    image = args.image.read_bytes() if args.image else default_image()
    width, height = Image.open(io.BytesIO(image)).size

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "segformer.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(args.workers), "--queue", str(args.queue),
    ]  # fmt: skip
    # stderr to a file, not a pipe: a chatty server must never block on a full pipe
    with tempfile.TemporaryFile("w+") as log:
        return _run(args, command, url, image, width, height, log)


def _run(
    args: argparse.Namespace,
    command: list[str],
    url: str,
    image: bytes,
    width: int,
    height: int,
    log,
) -> int:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                print(log.read()[-3000:], file=sys.stderr)
                print("error: the server did not start", file=sys.stderr)
                return 1
            try:
                health = httpx.get(url + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    print("error: the server did not answer within 120 s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        rss_idle = peak_rss_mb(server.pid)
        form = {"include": args.include.split(",")}
        results = run_clients(url, image, args.clients, args.seconds, form)
        from segformer.tools.bench import cpu_model  # after the run: it loads torch

        results.update(
            {
                "model": Path(args.model).name,
                "image": f"{width}x{height}",
                "clients": args.clients,
                "seconds": args.seconds,
                "workers": args.workers,
                "queue": args.queue,
                "include": args.include,
                "server_peak_rss_mb": round(peak_rss_mb(server.pid) or 0, 1),
                "server_rss_after_start_mb": round(rss_idle or 0, 1),
                "capacity": health["images"]["capacity"],
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
            }
        )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    lat = results["latency_ms"]
    print(
        f"{results['clients']} clients × {results['seconds']:g} s, {results['workers']} worker(s), queue {results['queue']}, "
        f"{results['model']} on {results['image']}:\n"
        f"  {results['requests_per_s']} requests/s ({results['ok']} ok), latency p50 {lat['p50']} ms, "
        f"p90 {lat['p90']} ms, p99 {lat['p99']} ms\n"
        f"  statuses {results['statuses']}, failures {results['failures']} (503 busy: {results['busy_503']})\n"
        f"  server peak RSS {results['server_peak_rss_mb']} MB (after start-up {results['server_rss_after_start_mb']} MB)"
    )
    if results["failure_examples"]:
        print("  e.g. " + "; ".join(results["failure_examples"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if results["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
