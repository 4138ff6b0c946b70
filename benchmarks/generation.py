"""Generation throughput (tokens/s): `rlhf.engine.decoding.generate` vs transformers' `model.generate()`.

    python -m benchmarks.generation [--reps 3] [--batch 64] [--new-tokens 48] [--sizes tiny small]

The same model (a Llama built from a config, random weights), the same left-padded prompts of mixed lengths,
batch 64, nucleus sampling at temperature 1, and exactly `new-tokens` tokens per row for both: ours with EOS
never matching (eos_id=-1), transformers with `min_new_tokens=max_new_tokens`. Both run under the same
precision (bf16 autocast where the CPU has AVX512-BF16/AMX, or on a GPU); transformers is also timed in fp32
without autocast, the way most users call it. The systems alternate; the median of the repetitions is
reported. Results: benchmarks/results/generation.json and a table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

from benchmarks.common import SIZES, build_model, machine, save_result, sync, update_doc
from rlhf.engine.decoding import SamplingParams, generate
from rlhf.engine.sampling import stream_keys
from rlhf.train.common import cpu_has_bf16


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of 8..24 tokens (ids above the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (batch,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def run_ours(
    model: Any,
    ids: list[list[int]],
    new_tokens: int,
    pad_id: int,
    amp: bool,
    device: str,
) -> tuple[float, float]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.95)
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp else nullcontext()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with ctx:
        gen = generate(
            model, ids, params, eos_id=-1, pad_id=pad_id, seeds=stream_keys(0, torch.arange(len(ids)))
        )
    sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert int(gen.response_mask.sum()) == len(ids) * new_tokens
    return len(ids) * new_tokens / elapsed, len(ids) * new_tokens / cpu


def run_hf(model: Any, ids: list[list[int]], new_tokens: int, pad_id: int, eos_id: int, amp: bool,
           device: str) -> tuple[float, float]:  # fmt: skip
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in ids], device=device)
    mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - len(p) for p in ids], device=device)[:, None]).long()  # fmt: skip
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp else nullcontext()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with ctx, torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                             top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                             eos_token_id=eos_id)  # fmt: skip
    sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] - width == new_tokens
    return len(ids) * new_tokens / elapsed, len(ids) * new_tokens / cpu


def bench_size(
    size: str, batch: int, new_tokens: int, reps: int, device: str, arch: str = "llama"
) -> dict[str, Any]:
    """Ours, HF generate() under the same precision and HF in fp32, alternating, on a model of type `arch`."""
    model, tokenizer = build_model(size, device, arch=arch)
    model.eval()
    amp = device.startswith("cuda") or cpu_has_bf16()
    ids = prompts(batch, len(tokenizer))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # warm-up at the measured shapes: first calls allocate and pick kernels (oneDNN builds one per new shape)
    run_ours(model, ids, new_tokens, pad, amp, device)
    run_hf(model, ids, new_tokens, pad, eos, amp, device)
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": [], "hf_fp32": []}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for system in order:
            if system == "ours":
                runs[system].append(run_ours(model, ids, new_tokens, pad, amp, device))
            else:
                runs[system].append(run_hf(model, ids, new_tokens, pad, eos, amp and system == "hf", device))
        print(f"{size} rep {rep} tok/s (wall, CPU): " + ", ".join(f"{k} {v[-1][0]:.0f} {v[-1][1]:.0f}" for k, v in runs.items()),
              flush=True)  # fmt: skip
    r: dict[str, Any] = {
        "precision": "bf16 autocast" if amp else "fp32",
        "params": sum(p.numel() for p in model.parameters()),
    }
    for k, v in runs.items():
        r[k] = [x[0] for x in v]
        r[f"{k}_cpu"] = [x[1] for x in v]
        r[f"{k}_median"] = statistics.median(r[k])
        r[f"{k}_cpu_median"] = statistics.median(r[f"{k}_cpu"])
    r["ratio"] = r["ours_median"] / r["hf_median"]
    r["ratio_vs_fp32"] = r["ours_median"] / r["hf_fp32_median"]
    r["cpu_ratio"] = r["ours_cpu_median"] / r["hf_cpu_median"]
    r["cpu_ratio_vs_fp32"] = r["ours_cpu_median"] / r["hf_fp32_cpu_median"]
    return r


def doc_section(result: dict[str, Any]) -> list[str]:
    rows = ["| model | precision | ours tok/s | HF generate tok/s | **ours / HF** (target 2x) | ours / HF, CPU time | HF fp32 tok/s | ours / HF fp32 | runs ours; HF |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in result["sizes"].items():
        rows.append(f"| {size} ({r['params'] / 1e6:.1f}M) | {r['precision']} | {r['ours_median']:.0f} | {r['hf_median']:.0f} | "
                    f"**{r['ratio']:.2f}x** | {r['cpu_ratio']:.2f}x | {r['hf_fp32_median']:.0f} | {r['ratio_vs_fp32']:.2f}x | "
                    f"{', '.join(f'{v:.0f}' for v in r['ours'])}; {', '.join(f'{v:.0f}' for v in r['hf'])} |")  # fmt: skip
    return [
        f"Batch {result['batch']}, prompts of 8-24 tokens (left-padded), {result['new_tokens']} new tokens per row "
        "for both (EOS never stops a row), nucleus sampling (T=1, top-p 0.95), the same precision for both (HF is "
        "also shown in fp32 without autocast). tok/s = tokens / wall time (median); the CPU-time ratio divides by "
        "the process's CPU time instead, steadier on a shared machine.",
        "", *rows,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per system (median reported)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke pass: tiny model, 1 repetition, 8 tokens")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.reps, args.new_tokens = ["tiny"], 1, 8
    result: dict[str, Any] = {"command": "python -m benchmarks.generation " + " ".join(sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.threads, args.device),
                              "batch": args.batch, "new_tokens": args.new_tokens, "reps": args.reps, "sizes": {}}  # fmt: skip
    for size in args.sizes:
        r = bench_size(size, args.batch, args.new_tokens, args.reps, args.device)
        result["sizes"][size] = r
        print(f"{size}: ours {r['ours_median']:.0f} tok/s, HF {r['hf_median']:.0f} tok/s: {r['ratio']:.2f}x "
              f"(CPU time {r['cpu_ratio']:.2f}x; vs HF fp32 {r['ratio_vs_fp32']:.2f}x)", flush=True)  # fmt: skip
    on_gpu = args.device.startswith("cuda")  # a GPU's results sit beside the CPU's, not over them
    name = "generation" + (".cuda" if on_gpu else "")
    save_result(name + (".quick" if args.quick else ""), result)  # a smoke pass keeps the real results
    if not args.no_doc and not args.quick:
        title = "Generation throughput: `rlhf.engine.decoding.generate` vs transformers `generate()`"
        update_doc(name.replace(".", "_"), title + (" (GPU)" if on_gpu else ""), result, doc_section(result))


if __name__ == "__main__":
    main()
