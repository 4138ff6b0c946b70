"""`rlhf generate`: K candidate answers per prompt from a policy, the comparison tasks labelers judge.

Writes the candidates JSONL that the labeling app imports, one row per prompt:
  {"prompt", "prompt_id", "completions": [{"text", "policy", "sampling": {...}, "finish_reason"}]}
Each completion carries its lineage: the policy version and the sampling parameters that made it.
finish_reason is "stop" when the policy ended with EOS, "length" when it ran out of max_new_tokens.

With `short_k`, each prompt also gets the policy's own answers cut short: the first sentence of sampled answer
j < short_k ("Sure!", "Good question.", "Yes."), or the empty answer where that sentence is already a
candidate. A policy optimised against the reward model finds such answers when it learns to stop early; a
reward model that never saw them cannot know they are bad (Gao et al. 2022 on overoptimisation), so labelers
judge them beside the full answers. Their sampling record says `"truncated": "first_sentence"`.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from rlhf.config import GenerateConfig
from rlhf.data.jsonl import write_jsonl
from rlhf.data.prompts import read_prompt_rows
from rlhf.generation import SamplingParams, decode_responses, generate
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts, stop_ids
from rlhf.train.common import resolve_precision

log = logging.getLogger(__name__)


def read_prompts(path: str | Path, max_prompts: int = 0, tokenizer: Any = None) -> list[tuple[str, str]]:
    """(prompt_id, prompt) pairs of a {prompt} or {messages} source (rlhf.data.prompts); the id is the row's
    `prompt_id` (or `id`), else "<file stem>:<row>"; messages go through the tokenizer's chat template."""
    return read_prompt_rows(path, max_prompts, tokenizer)


def policy_name(model: str, policy_version: str | None) -> str:
    """The policy version stored with each completion: the given name, else the checkpoint's directory name
    (its parent's too when that is a generic 'final', e.g. runs/sft/final -> 'sft/final')."""
    if policy_version:
        return policy_version
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.name == "final" and path.parent.name else path.name


def first_sentence(text: str) -> str:
    """The answer up to its first sentence end, leading space kept: " Sure! 3 plus 4 is 7." -> " Sure!"."""
    match = re.search(r"[.!?](?=\s|$)", text)
    return text[: match.end()] if match else text


def short_answers(completions: list[dict[str, Any]], short_k: int) -> list[dict[str, Any]]:
    """Up to short_k extra candidates: the first sentence of answer j, or the empty answer where that sentence
    is already a candidate; none that would repeat a candidate."""
    seen = {c["text"] for c in completions}
    extra = []
    for c in completions[:short_k]:
        text = first_sentence(c["text"])
        if text in seen:
            text = ""
        if text in seen:
            continue
        seen.add(text)
        extra.append({"text": text, "policy": c["policy"], "sampling": {**c["sampling"], "truncated": "first_sentence"},
                      "finish_reason": "stop"})  # fmt: skip
    return extra


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Sample cfg.k answers to every prompt in batches; write the candidates file; return a summary."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.add_pad_token)
    # read before any output: bad input leaves nothing behind
    prompts = read_prompts(cfg.prompts_file, cfg.max_prompts, tokenizer)
    policy = load_causal_lm(cfg.model, tokenizer=tokenizer)
    policy.eval()
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    sampling = {k: params.as_dict()[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")}
    policy_version = policy_name(cfg.model, cfg.policy_version)
    generator = torch.Generator().manual_seed(cfg.seed)
    bf16 = resolve_precision(cfg.precision) == "bf16" and not torch.cuda.is_available()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    # Every prompt K times, sampled in batches; row i of the flat list is answer i % k of prompt i // k.
    prompt_ids = encode_prompts(tokenizer, [p for _, p in prompts])
    flat = [ids for ids in prompt_ids for _ in range(cfg.k)]
    texts: list[str] = []
    ended: list[bool] = []
    for i in range(0, len(flat), cfg.batch_size):
        with autocast:
            gen = generate(
                policy, flat[i : i + cfg.batch_size], params, stop_ids(tokenizer),
                tokenizer.pad_token_id, generator=generator,
            )  # fmt: skip
        texts.extend(decode_responses(tokenizer, gen))
        ended.extend(bool(e) for e in gen.ended.tolist())
        log.info("generate: %d / %d answers", len(texts), len(flat))

    rows: list[dict[str, Any]] = []
    for n, (prompt_id, prompt) in enumerate(prompts):
        answers = range(n * cfg.k, (n + 1) * cfg.k)
        completions = [
            {"text": texts[j], "policy": policy_version, "sampling": sampling,
             "finish_reason": "stop" if ended[j] else "length"}
            for j in answers
        ]  # fmt: skip
        completions += short_answers(completions, cfg.short_k)
        rows.append({"prompt": prompt, "prompt_id": prompt_id, "completions": completions})
    write_jsonl(cfg.out, rows)
    seconds = time.perf_counter() - start
    return {
        "prompts": len(rows),
        "completions": sum(len(r["completions"]) for r in rows),
        "eos_rate": ended.count(True) / len(ended),
        "distinct_per_prompt": sum(len({c["text"] for c in r["completions"]}) for r in rows) / len(rows),
        "seconds": seconds,
        "policy": policy_version,
        "out": cfg.out,
    }
