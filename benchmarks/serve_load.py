"""Load test of `rlhf serve`: tokens/s and latency with 1, 8 and 32 concurrent clients.

    python -m benchmarks.serve_load                        # builds a demo-size tiny Llama, serves it, measures
    python -m benchmarks.serve_load --model runs/demo/sft/final --seconds 30
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --model-name sft/final   # a running server

Each client sends /v1/completions requests back to back (closed loop) for `--seconds`, with a fixed
max_tokens and temperature 1. Throughput counts the completion tokens the server reports (usage), over the
wall time from the first request to the last answer, and (when this script starts the server) over the
server process's CPU time in that span. The server runs in its own process, so the clients do not share
its interpreter. Results: benchmarks/results/serve_load.json, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
PROMPTS = [
    "User: What is 3 plus 4?\nAssistant:",
    "User: Hello!\nAssistant:",
    "User: Is the sky green?\nAssistant:",
    "User: What colour is the zorblat?\nAssistant:",
    "User: Thank you!\nAssistant:",
]


def build_demo_model(out: Path) -> Path:
    """A demo-size Llama (hidden 128, 4 layers, context 256), untrained, with a BPE tokenizer (vocab 512)."""
    from rlhf.config import ArchConfig
    from rlhf.data.demo_task import make_response, render_prompt, sample_question
    from rlhf.models.loading import build_causal_lm
    from rlhf.models.tokenizer import train_bpe_tokenizer

    rng = random.Random(0)
    texts = []
    for _ in range(2000):
        q = sample_question(rng)
        texts.append(f"{render_prompt(q.text)} {make_response(q, rng)}")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    model = build_causal_lm(ArchConfig(), tokenizer, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def start_server(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "rlhf.cli", "serve", model, "--port", str(port), "--model-name", "bench",
        "--max-batch-size", str(args.max_batch_size), "--threads", str(args.threads), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


async def run_level(
    url: str, model: str, clients: int, seconds: float, max_tokens: int, server_pid: int | None = None
) -> dict[str, Any]:
    """`clients` closed-loop clients for `seconds`; requests in flight at the deadline are waited for."""
    latencies: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(i: int, deadline: float) -> None:
            nonlocal tokens
            n = 0
            while time.perf_counter() < deadline:
                body = {
                    "model": model,
                    "prompt": PROMPTS[(i + n) % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                }
                start = time.perf_counter()
                r = await http.post("/v1/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
                tokens += r.json()["usage"]["completion_tokens"]
                n += 1

        cpu_start = process_cpu_s(server_pid) if server_pid else 0.0
        start = time.perf_counter()
        await asyncio.gather(*(client(i, start + seconds) for i in range(clients)))
        elapsed = time.perf_counter() - start
        cpu = process_cpu_s(server_pid) - cpu_start if server_pid else None
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "completion_tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "server_cpu_s": None if cpu is None else round(cpu, 2),
        "tokens_per_server_cpu_s": None if not cpu else round(tokens / cpu, 1),
    }


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from benchmarks.common import machine as host

    # the CPU's family, model and bf16/AMX flags, the date and torch as every results file has them; the server
    # runs in its own process with its own threads, so "torch_threads" is this process's
    return {
        **host(torch.get_num_threads()),
        "cpu": cpu,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir to serve (default: build a demo-size tiny Llama)")
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--model-name", default="bench", help="model id to request (with --url)")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's torch threads (0 = torch's default); 1 suits a small model on a shared CPU",
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    host = machine()  # before the load: the load average says how busy the machine was without us

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (None if args.url else str(build_demo_model(Path(tmp) / "demo-size-llama")))
        url, model_name = args.url, args.model_name
        if url is None:
            assert model is not None
            proc = start_server(model, args.port, args)
            url, model_name = f"http://127.0.0.1:{args.port}", "bench"
        pid = proc.pid if proc is not None else None
        try:
            asyncio.run(run_level(url, model_name, 4, 3, args.max_tokens))  # warm-up
            results = []
            for clients in levels:
                results.append(
                    asyncio.run(run_level(url, model_name, clients, args.seconds, args.max_tokens, pid))
                )
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)

    by_clients = {r["clients"]: r for r in results}
    report = {
        "benchmark": "serve_load",
        "command": "python -m benchmarks.serve_load " + shlex.join(sys.argv[1:]),
        "machine": host,
        "model": model
        if args.model or args.url
        else "demo-size tiny Llama (hidden 128, 4 layers, vocab 512), untrained",
        "max_tokens": args.max_tokens,
        "seconds_per_level": args.seconds,
        "server": {"max_batch_size": args.max_batch_size, "threads": args.threads},
        "results": results,
    }
    if 1 in by_clients and max(levels) in by_clients and max(levels) > 1:
        top = max(levels)
        report[f"throughput_ratio_{top}_vs_1"] = round(
            by_clients[top]["tokens_per_s"] / by_clients[1]["tokens_per_s"], 2
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| clients | requests | tokens/s | tokens per server CPU-s | requests/s | p50 latency (s) | p99 latency (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']} | {r['tokens_per_server_cpu_s']} "
            f"| {r['requests_per_s']} | {r['p50_latency_s']} | {r['p99_latency_s']} |"
        )
    for key, value in report.items():
        if key.startswith("throughput_ratio"):
            print(f"\n{key}: {value}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
