"""What the benchmarks share: model sizes, the demo tokenizer, machine description, results and the docs table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from rlhf.config import ArchConfig
from rlhf.data import demo_task
from rlhf.models.loading import build_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.train.common import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"

# tiny = the demo's model (configs/demo.yaml); small = a width and depth where matmuls dominate
SIZES = {
    "tiny": ArchConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=256),
    "small": ArchConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8, max_position_embeddings=256),
    # the sizes of the benchmark over architectures (benchmarks/architectures.py): about 4M and 30M weights
    "4M": ArchConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=256),
    "30M": ArchConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=9, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=256),
}  # fmt: skip
# Hugging Face model types the benchmarks build besides Llama, each from the same ArchConfig
ARCHS = ("llama", "qwen2", "gpt_neox", "gpt2", "gemma", "mistral")


@cache
def tokenizer_dir() -> Path:
    """The demo task's BPE tokenizer (vocab 512, PAD distinct from EOS), trained once per process."""
    work = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    demo_task.generate(work / "data", seed=0, n_pretrain=2000, n_sft=10, n_rl_prompts=10, n_eval_prompts=10)
    corpus = (work / "data" / "pretrain.txt").read_text().split("\n\n")
    train_bpe_tokenizer(corpus, vocab_size=512).save_pretrained(work / "tok")
    return work / "tok"


def build_model(size: str, device: str = "cpu", seed: int = 0, arch: str = "llama") -> tuple[Any, Any]:
    """(model, tokenizer): a model of type `arch` (ARCHS) of the given size with random weights, on `device`."""
    tokenizer = load_tokenizer(str(tokenizer_dir()))
    return build_arch(arch, SIZES[size], tokenizer, seed).to(device), tokenizer


def build_arch(arch: str, cfg: ArchConfig, tokenizer: Any, seed: int = 0) -> Any:
    """A random-init causal LM of Hugging Face model type `arch` with `cfg`'s width, depth and heads, and about
    the same weights whatever the type: a two-matrix MLP (GPT-2, GPT-NeoX) is 1.5x as wide as a gated one."""
    if arch == "llama":
        return build_causal_lm(cfg, tokenizer, seed=seed)
    heads, mlp = cfg.num_attention_heads, cfg.intermediate_size
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": cfg.tie_word_embeddings,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    if arch == "gpt2":
        fields = {"n_embd": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "n_head": heads, "n_inner": mlp * 3 // 2,
                  "n_positions": cfg.max_position_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
    else:
        fields = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": heads,
                  "max_position_embeddings": cfg.max_position_embeddings}  # fmt: skip
        if arch == "gpt_neox":
            fields |= {"intermediate_size": mlp * 3 // 2, "hidden_dropout": 0.0, "attention_dropout": 0.0}
        else:
            fields |= {"intermediate_size": mlp, "num_key_value_heads": cfg.num_key_value_heads,
                       "head_dim": cfg.hidden_size // heads}  # fmt: skip
    config = CONFIG_MAPPING[arch](**common, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternating_medians(call: Callable[[bool], float], calls: int, warmup: int = 2) -> tuple[float, float]:
    """(median with the option on, median with it off) of `call(on)`'s milliseconds: the two alternate call by call,
    each going first every other round, after `warmup` rounds that are not counted."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(calls + warmup):
        for on in (True, False) if i % 2 else (False, True):
            ms = call(on)
            if i >= warmup:
                times[on].append(ms)
    return statistics.median(times[True]), statistics.median(times[False])


def machine(threads: int, device: str = "cpu") -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())  # fmt: skip
    field = {
        k.strip(): v.strip()
        for k, _, v in (line.partition(":") for line in cpuinfo.split("\n\n")[0].splitlines())
    }
    info = {"cpu": cpu, "cpu_family": field.get("cpu family"), "cpu_model": field.get("model"), "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in cpuinfo, "amx_bf16": "amx_bf16" in cpuinfo, "device": device,
            "load_average_at_start": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_generation(m: dict[str, Any]) -> str:
    """'family 26 model 2' where the record names them ('' in older records): the model name alone does not tell
    one EPYC from another."""
    return f"family {m['cpu_family']} model {m['cpu_model']}" if m.get("cpu_family") else ""


def capabilities() -> dict[str, Any]:
    """What the CPU offers the matmuls: torch's kernel level, the flags that decide bf16, and the precision the
    stages choose here (rlhf.train.common)."""
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in wanted if f in flags],
        "native_bf16": cpu_has_bf16(),
        "precision": "bf16 autocast" if cpu_has_bf16() else "fp32",
    }


def shape_sweep(
    shapes: list[Any], lengths: list[int], reps: int, quick: bool,
    measure: Callable[[Any, int, int], dict[str, Any]], show: Callable[[dict[str, Any]], str],
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """(one row per shape and sequence length, the repetitions used) on one torch thread: `measure(shape, length,
    reps)` gives a row's timings by label, `show(row)` its progress line. `quick`: the first shape, the first two
    lengths, one repetition."""
    torch.set_num_threads(1)
    shapes, lengths, reps = (shapes[:1], lengths[:2], 1) if quick else (shapes, lengths, reps)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for length in lengths:
            rows.append({"shape": list(shape), "length": length, **measure(shape, length, reps)})
            print(shape, length, show(rows[-1]), flush=True)
    return rows, reps


def save_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def update_doc(name: str, title: str, result: dict[str, Any], body: list[str]) -> None:
    """Replace (or append) this benchmark's section of docs/performance.md, between its markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    m = result["machine"]
    gpu = f"GPU {m['gpu']}, " if m.get("gpu") else ""
    section = "\n".join([
        start, f"## {title}", "", f"Command: `{result['command']}` ({result['date']}).", "",
        f"Machine: {gpu}{m['cpu']}{f' ({cpu_generation(m)})' if cpu_generation(m) else ''}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
        f"AVX512-BF16 {'yes' if m['avx512_bf16'] else 'no'}, AMX {'yes' if m['amx_bf16'] else 'no'}; shared with "
        f"other work (load average {m['load_average_at_start']} at the start), so only ratios measured side by "
        "side, alternating, are meaningful; absolute rates vary from run to run.", "", *body, end,
    ])  # fmt: skip
    replace_doc_section(start, end, section)


def replace_doc_section(start: str, end: str, section: str, doc: Path = DOC) -> None:
    """Put `section` (which begins with `start` and ends with `end`) in place of the doc's text between those
    markers, or append it where the doc has none."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if start in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
