"""Serving throughput: N requests at concurrency C against `qatune serve` on loopback.

Starts ``qatune serve MODEL`` in a process of its own on a free loopback port, waits for ``/health``, then sends
``--requests`` POST /answer requests (one question each, from articles 37-48 of the SQuAD dev file) from
``--concurrency`` client threads, each with its own keep-alive connection. Reported: requests/s and the p50/p95/p99
latency of a request as the client sees it; every answer must be a span of its context (the script exits non-zero
otherwise). Run it once with ``--concurrency 1`` to see what micro-batching gains at higher concurrency.

Run from the project root:  python benchmarks/bench_serve.py --model /tmp/qatune-bench/minilm-full-onnx-int8
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _table import markdown_table  # sibling module: scripts run as python benchmarks/x.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "squad" / "dev-v1.1.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"qatune serve exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("qatune serve did not become healthy")


def load(port: int, items: list[tuple[str, str]], concurrency: int) -> tuple[list[float], list[bool]]:
    """Send every item once from ``concurrency`` threads; per request: latency (s) and whether it was good."""
    local = threading.local()

    def send(item):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({"question": item[0], "context": item[1]})
        t = time.perf_counter()
        local.conn.request("POST", "/answer", body, {"Content-Type": "application/json"})
        r = local.conn.getresponse()
        answers = json.loads(r.read())
        elapsed = time.perf_counter() - t
        ok = r.status == 200 and item[1][answers[0]["start"] : answers[0]["end"]] == answers[0]["answer"]
        return elapsed, ok

    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(send, items))
    return [o[0] for o in out], [o[1] for o in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="what qatune serve loads: a run, model or export directory")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="client threads (one row each)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from qatune.data.splits import select_articles
    from qatune.data.squad import load_squad

    data = select_articles(load_squad(args.data), "37-48")
    items = [(ex.question, ex.context) for ex in data.examples]
    items = (items * (args.requests // len(items) + 1))[: args.requests]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qatune.cli", "serve", args.model, "--port", str(port),
                             "--max-batch", str(args.max_batch)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rows, results = [], {}
    try:
        wait_healthy(port, proc)
        load(port, items[:8], 2)  # warm-up
        for c in args.concurrency:
            t = time.perf_counter()
            latencies, good = load(port, items, c)
            wall = time.perf_counter() - t
            ms = 1000 * np.array(latencies)
            r = {"requests": len(items), "concurrency": c, "requests_per_s": len(items) / wall,
                 "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                 "p99_ms": float(np.percentile(ms, 99)), "mean_ms": statistics.fmean(ms), "good": sum(good)}
            results[c] = r
            rows.append([str(c), str(len(items)), f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.1f}",
                         f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['good']}/{len(items)}"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"qatune serve {args.model} (max batch {args.max_batch}), loopback, one question per request")
    markdown_table(["concurrency", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "good answers"], rows)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n")
    return 0 if all(r["good"] == r["requests"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
