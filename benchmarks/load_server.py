"""Bounded load test of `segformer serve`: N concurrent clients for T seconds on 127.0.0.1.

Starts the server through the real command line (so it gets the same allocator and thread
settings a user gets), waits until it answers /healthz, then runs N client threads that each
send POST /v1/segment back to back for T seconds, and stops everything. Reports successful
images per second, p50/p90/p95/p99 latency of successful requests, every status seen, 503s,
failures (anything but 200 and an explicit 503 with Retry-After), and the server's peak
resident memory (VmHWM).

How clients take a 503 (``--retry``): ``honour`` waits the Retry-After it was given (at most
0.5 s, so a short run still sees retries), ``ignore`` retries at once, as a flood of careless
clients would; ``both`` runs the two one after the other against the same server and reports
the ratio of their successful throughputs.

    python benchmarks/load_server.py --model /path/to/segformer-b0-cityscapes \
        --image photo.png --clients 4 --seconds 20 [--workers 1] [--queue 8] \
        [--retry honour|ignore|both] [--json out.json]

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_clients(
    url: str,
    image: bytes,
    clients: int,
    seconds: float,
    form: dict[str, str],
    retry: str,
    server_pid: int,
) -> dict:
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
                if response.status_code == 503 and retry == "honour":
                    time.sleep(min(float(response.headers.get("retry-after", 1)), 0.5))

    # CPU time tells where a flood's cost goes: the server, or the clients retrying (which
    # share this machine's cores with the server's workers).
    server_cpu, clients_cpu = cpu_seconds(server_pid), time.process_time()
    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    server_cpu, clients_cpu = (
        cpu_seconds(server_pid) - server_cpu,
        time.process_time() - clients_cpu,
    )
    latency_ms = {f"p{q}": percentile(latencies, q) for q in (50, 90, 95, 99)}
    latency_ms["mean"] = statistics.fmean(latencies) if latencies else None
    return {
        "retry": retry,
        "wall_s": round(wall, 2),
        "ok": len(latencies),
        "images_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {k: None if v is None else round(v * 1000, 1) for k, v in latency_ms.items()},
        "statuses": dict(statuses),
        "busy_503": statuses.get("503", 0),
        "server_cpu_s": round(server_cpu, 1),
        "clients_cpu_s": round(clients_cpu, 1),
        # On a machine shared with other jobs the server's share of the cores wanders between
        # runs; images per CPU second of the server does not.
        "images_per_server_cpu_s": round(len(latencies) / server_cpu, 2) if server_cpu else None,
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
    parser.add_argument(
        "--retry",
        choices=["honour", "ignore", "both"],
        default="honour",
        help="after a 503: wait its Retry-After, retry at once, or run both ways (default: honour)",
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
        modes = ["honour", "ignore"] if args.retry == "both" else [args.retry]
        runs = [
            run_clients(url, image, args.clients, args.seconds, form, mode, server.pid)
            for mode in modes
        ]
        from segformer.tools.bench import cpu_model  # after the run: it loads torch

        results = {
            "runs": runs,
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
        if len(runs) == 2 and runs[0]["images_per_s"]:
            results["ignore_vs_honour"] = round(
                runs[1]["images_per_s"] / runs[0]["images_per_s"], 3
            )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    print(
        f"{results['clients']} clients × {results['seconds']:g} s, {results['workers']} worker(s), queue {results['queue']}, "
        f"{results['model']} on {results['image']}:"
    )
    for run in runs:
        lat = run["latency_ms"]
        print(
            f"  Retry-After {run['retry']}: {run['images_per_s']} images/s ({run['ok']} ok), latency p50 "
            f"{lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms; 503 busy: {run['busy_503']}, "
            f"other failures: {run['failures']}; statuses {run['statuses']}; CPU s: server "
            f"{run['server_cpu_s']}, clients {run['clients_cpu_s']} "
            f"({run['images_per_server_cpu_s']} images per server CPU s)"
        )
        if run["failure_examples"]:
            print("    e.g. " + "; ".join(run["failure_examples"]))
    if "ignore_vs_honour" in results:
        print(f"  ignoring Retry-After keeps {results['ignore_vs_honour']:.0%} of the throughput")
    print(
        f"  server peak RSS {results['server_peak_rss_mb']} MB (after start-up {results['server_rss_after_start_mb']} MB)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if all(run["failures"] == 0 for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
