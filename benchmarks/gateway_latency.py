"""Latency the A/B feedback gateway adds: the same requests sent to `rlhf serve` directly and through
`rlhf gateway` in front of it, interleaved one by one.

    python -m benchmarks.gateway_latency                  # 5 rounds of 100 requests per path and kind
    python -m benchmarks.gateway_latency --quick          # 2 rounds of 30

The upstream serves a demo-size untrained Llama (built in a temp dir) and each request asks for one token,
so most of a request's time is HTTP and the server's own work. Requests go one at a time (no queueing),
alternating direct / gateway, for a plain and a streamed chat completion. Reported per kind: p50 and p99
of each path, and the added latency: the median over rounds of (gateway median - direct median).
Writes benchmarks/results/gateway_latency.json.
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
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine, replace_doc_section
from benchmarks.serve_load import build_demo_model
from rlhf.feedback.loadtest import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gateway_latency.json"
MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]


def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", *cmd, "--port", str(port), "--log-level", "warning"]
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not start within 180 s")


def one(http: httpx.Client, url: str, stream: bool) -> float:
    """Seconds until the whole answer has arrived."""
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": 1, "stream": stream}
    start = time.perf_counter()
    if stream:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for _ in r.iter_bytes():
                pass
    else:
        http.post(url + "/v1/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="requests per path, kind and round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 30 requests")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests = 2, 30
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_model(Path(tmp) / "model")
        up_port, gw_port = free_port(), free_port()
        upstream = start(["serve", str(model), "--model-name", "bench"], up_port)
        direct, through = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
        gateway = start(["gateway", "--upstream", direct + "/v1"], gw_port)
        results = {}
        try:
            with httpx.Client(timeout=60) as http:
                for url in (direct, through):  # warm both paths (connections, first-request work)
                    for stream in (False, True):
                        for _ in range(10):
                            one(http, url, stream)
                for kind, stream in (("chat", False), ("chat_stream", True)):
                    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
                    added = []
                    for _ in range(args.rounds):
                        rnd: dict[str, list[float]] = {"direct": [], "gateway": []}
                        for _ in range(args.requests):
                            rnd["direct"].append(one(http, direct, stream))
                            rnd["gateway"].append(one(http, through, stream))
                        added.append(statistics.median(rnd["gateway"]) - statistics.median(rnd["direct"]))
                        for path in samples:
                            samples[path] += rnd[path]
                    results[kind] = {
                        "direct_ms": {
                            "p50": pct(samples["direct"], 0.5),
                            "p99": pct(samples["direct"], 0.99),
                        },
                        "gateway_ms": {
                            "p50": pct(samples["gateway"], 0.5),
                            "p99": pct(samples["gateway"], 0.99),
                        },
                        "added_p50_ms": round(1000 * statistics.median(added), 3),
                        "added_p50_ms_per_round": [round(1000 * a, 3) for a in added],
                        "requests_per_path": len(samples["direct"]),
                    }
        finally:
            for proc in (gateway, upstream):
                proc.terminate()
                proc.wait(timeout=30)
    print(
        f"{'kind':<12} {'direct p50':>10} {'direct p99':>10} {'gw p50':>8} {'gw p99':>8} {'added p50 ms':>12}"
    )
    for kind, r in results.items():
        print(
            f"{kind:<12} {r['direct_ms']['p50']:>10} {r['direct_ms']['p99']:>10} {r['gateway_ms']['p50']:>8}"
            f" {r['gateway_ms']['p99']:>8} {r['added_p50_ms']:>12}"
        )
    out = {
        "benchmark": "gateway_latency",
        "command": "python -m benchmarks.gateway_latency " + " ".join(sys.argv[1:]),
        "machine": machine(threads=1),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "rounds": args.rounds,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.out == str(RESULTS) and not args.quick:  # a smoke pass leaves the measured section as it is
        update_doc(out)


def update_doc(out: dict[str, Any]) -> None:
    """docs/scaling.md's table of this run, between its markers."""
    start, end = "<!-- gateway_latency:start -->", "<!-- gateway_latency:end -->"
    names = {"chat": "chat completion", "chat_stream": "chat completion, streamed"}
    rows = [
        f"| {names[kind]} | {r['direct_ms']['p50']:.1f} / {r['direct_ms']['p99']:.1f} "
        f"| {r['gateway_ms']['p50']:.1f} / {r['gateway_ms']['p99']:.1f} | {r['added_p50_ms']:.1f} "
        f"({', '.join(f'{a:.1f}' for a in r['added_p50_ms_per_round'])}) |"
        for kind, r in out["results"].items()
    ]
    m = out["machine"]
    section = "\n".join([
        start, f"`{out['command'].strip()}` on {m['cpu']} ({m['cores']} cores), load average "
        f"{out['load_average_at_start'][0]:.1f} at the start and {out['load_average_at_end'][0]:.1f} at the end; "
        f"`benchmarks/results/gateway_latency.json`.", "",
        "| request | direct p50 / p99 ms | through the gateway p50 / p99 ms | added p50 ms (per round) |",
        "|---|---|---|---|", *rows, end,
    ])  # fmt: skip
    replace_doc_section(start, end, section, ROOT / "docs" / "scaling.md")


if __name__ == "__main__":
    main()
