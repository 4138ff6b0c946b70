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

With `other_k`, each prompt also gets that many answers the policy gave to other prompts, drawn at random
with the seed: fluent, well-formed and off the question ("I don't know." to an arithmetic question, "You are
welcome!" to a request, the sum of other numbers). A policy optimised against the reward model drifts towards
such answers when the reward model scores them by their form alone; labels on them teach it that an answer
must fit its own question. Their sampling record says `"answer_to": <the other prompt's id>`.

With `extra_models`, each prompt also gets `extra_k` answers from each of those policies (an earlier or a
weaker checkpoint, such as the pretrained model), named by their own policy version: labels on answers of
several policies show the reward model mistakes one policy never makes and another optimised against it may
find (non-answers, answers of the wrong type, invented facts); Llama 2 sampled its comparison pairs from
different model variants for the same reason (Touvron et al. 2023, sec. 3.2.1).
"""

from __future__ import annotations

import logging
import random
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from rlhf.config import GenerateConfig
from rlhf.data.jsonl import check_output_file, write_jsonl
from rlhf.data.prompts import read_prompt_rows
from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts, stop_ids
from rlhf.train.common import resolve_precision

log = logging.getLogger(__name__)


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


def other_answers(
    n: int,
    prompts: list[tuple[str, str]],
    texts: list[str],
    ended: list[bool],
    cfg: GenerateConfig,
    policy: str,
    sampling: dict[str, Any],
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Up to cfg.other_k extra candidates for prompt n: answers sampled for other prompts (each a random answer
    of a random other prompt), none that would repeat one of prompt n's own answers or each other."""
    if cfg.other_k == 0 or len(prompts) < 2:
        return []
    own = {texts[j] for j in range(n * cfg.k, (n + 1) * cfg.k)}
    extra: list[dict[str, Any]] = []
    for _ in range(cfg.other_k):
        m = rng.randrange(len(prompts) - 1)
        m += m >= n  # any prompt but n
        j = m * cfg.k + rng.randrange(cfg.k)
        if texts[j] in own:
            continue
        own.add(texts[j])
        extra.append({"text": texts[j], "policy": policy, "sampling": {**sampling, "answer_to": prompts[m][0]},
                      "finish_reason": "stop" if ended[j] else "length"})  # fmt: skip
    return extra


def sample_answers(
    cfg: GenerateConfig, model: str, tokenizer: Any, prompts: list[str], k: int, seed: int
) -> tuple[list[str], list[bool]]:
    """k sampled answers to every prompt by `model`, in batches; item i is answer i % k of prompt i // k."""
    policy = load_causal_lm(model, tokenizer=tokenizer)
    policy.eval()
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, seed)
    generator = torch.Generator().manual_seed(seed)
    bf16 = resolve_precision(cfg.precision) == "bf16" and not torch.cuda.is_available()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    flat = [ids for ids in encode_prompts(tokenizer, prompts) for _ in range(k)]
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
        log.info("generate: %d / %d answers of %s", len(texts), len(flat), model)
    return texts, ended


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Sample cfg.k answers to every prompt in batches; write the candidates file; return a summary."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.add_pad_token)
    # read before any output: bad input leaves nothing behind
    prompts = read_prompt_rows(cfg.prompts_file, cfg.max_prompts, tokenizer)
    check_output_file(cfg.out, "generate.out")
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    sampling = {k: params.as_dict()[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")}
    policy_version = policy_name(cfg.model, cfg.policy_version)
    texts, ended = sample_answers(cfg, cfg.model, tokenizer, [p for _, p in prompts], cfg.k, cfg.seed)
    extra: list[tuple[str, dict[str, Any], list[str], list[bool]]] = []
    for i, model in enumerate(cfg.extra_models):
        extra_tokenizer = load_tokenizer(model, cfg.add_pad_token)
        # each policy samples from a seed of its own, so adding one changes no other policy's answers; its
        # answers record that seed
        seed = cfg.seed + 1 + i
        extra.append((policy_name(model, None), sampling | {"seed": seed}, *sample_answers(cfg, model,
                      extra_tokenizer, [p for _, p in prompts], cfg.extra_k, seed)))  # fmt: skip

    rows: list[dict[str, Any]] = []
    rng = random.Random(cfg.seed)
    for n, (prompt_id, prompt) in enumerate(prompts):
        answers = range(n * cfg.k, (n + 1) * cfg.k)
        completions = [
            {"text": texts[j], "policy": policy_version, "sampling": sampling,
             "finish_reason": "stop" if ended[j] else "length"}
            for j in answers
        ]  # fmt: skip
        completions += short_answers(completions, cfg.short_k)
        completions += other_answers(n, prompts, texts, ended, cfg, policy_version, sampling, rng)
        seen = {c["text"] for c in completions}
        for name, other_sampling, other_texts, other_ended in extra:
            for j in range(n * cfg.extra_k, (n + 1) * cfg.extra_k):
                if other_texts[j] not in seen:
                    seen.add(other_texts[j])
                    completions.append({"text": other_texts[j], "policy": name, "sampling": other_sampling,
                                        "finish_reason": "stop" if other_ended[j] else "length"})  # fmt: skip
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
