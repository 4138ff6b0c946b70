"""`rlhf eval A B`: two policies answer the same held-out prompts and a judge compares them.

The judge sees each pair in a random A/B order. The win rate of A counts ties as half a win; its 95% interval
comes from a bootstrap over prompts. Beside it, for each policy: its mean KL to a reference model, mean answer
length, EOS rate and, on the demo task, the per-criterion rates (correct, non-responsive,
hallucinated, harmful, toxic) with their 95% intervals, and gold utility.

Sampling defaults to temperature 0.7: policies are used by sampling, so judging samples shows what users would
see (greedy decoding hides failure modes such as the SFT model's occasional rudeness). A and B use different
seeds, so a policy compared with itself shows the sampling noise (win rate near 0.5, within the interval).

KL to the reference is the exact KL between the two next-token distributions (temperature 1), summed over the
answer's tokens, along each sampled answer: with temperature 1 this is a low-variance estimate of the sequence
KL that PPO's penalty holds down; at other temperatures it is the same quantity on that policy's samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.bon import best_of_n, kl_bound
from rlhf.config import EvalConfig
from rlhf.data.jsonl import field, iter_jsonl
from rlhf.errors import DataError, RlhfError
from rlhf.eval.judges import Answer, Judge, demo_metrics
from rlhf.generation import SamplingParams, decode_responses, generate
from rlhf.models.heads import load_reward_model
from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from rlhf.rl_math import masked_sum
from rlhf.train.common import resolve_precision

log = logging.getLogger(__name__)


@dataclass
class PolicyAnswers:
    """One policy's answers to the evaluation prompts."""

    texts: list[str]
    ended: list[bool]
    n_tokens: list[int]
    kl: list[float] | None  # nats per answer, to the reference; None without a reference


def read_prompts(path: str, limit: int) -> list[str]:
    prompts = [field(path, lineno, row, "prompt", str) for lineno, row in iter_jsonl(path)]
    if not prompts:
        raise DataError(f"{path}: no prompts (empty file)")
    return prompts[:limit] if limit else prompts


def load_policy(path: str, device: torch.device) -> PreTrainedModel:
    model = load_causal_lm(path).eval()
    model.to(device)  # type: ignore[arg-type]  # transformers' typing of .to is off
    disable_dropout(model)
    return model


def sequence_kl(policy: PreTrainedModel, reference: PreTrainedModel, ids: Tensor, mask: Tensor, n_prompt: int,
                response_mask: Tensor) -> Tensor:  # fmt: skip
    """KL(policy || reference) of each answer, (B,): exact per-token KL over the vocabulary, summed over tokens."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    logp = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
    logq = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
    logp = torch.log_softmax(logp[:, n_prompt - 1 : -1], dim=-1)  # (B, T, V)
    logq = torch.log_softmax(logq[:, n_prompt - 1 : -1], dim=-1)  # (B, T, V)
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    return masked_sum(per_token, response_mask, dim=1)  # (B,)


@torch.no_grad()
def answer(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: EvalConfig, seed: int,
    reference: PreTrainedModel | None, bf16: bool, reward_model: PreTrainedModel | None = None,
) -> PolicyAnswers:  # fmt: skip
    """Each prompt's sampled answer; with `reward_model`, the best of cfg.best_of_n samples by its score.
    KL for best-of-n is the analytic bound relative to the sampling policy (the reference when A is it)."""
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if reward_model is not None:  # best-of-n: its KL to the sampling policy is the bound log n - (n - 1) / n
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            picked = best_of_n(policy, reward_model, tokenizer, prompts, cfg.best_of_n, params,
                               batch_size=cfg.batch_size, generator=generator)  # fmt: skip
        bound = None if reference is None else [kl_bound(cfg.best_of_n)] * len(picked)
        return PolicyAnswers([r.answers[r.best] for r in picked], [r.ended[r.best] for r in picked],
                             [r.n_tokens[r.best] for r in picked], bound)  # fmt: skip
    out = PolicyAnswers([], [], [], [] if reference is not None else None)
    for i in range(0, len(prompts), cfg.batch_size):
        ids = tokenizer(prompts[i : i + cfg.batch_size], add_special_tokens=False)["input_ids"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            gen = generate(policy, ids, params, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
            if reference is not None and out.kl is not None:
                full = torch.cat([gen.prompt_ids, gen.response_ids], dim=1)  # (B, P + T)
                mask = torch.cat([gen.prompt_mask, gen.response_mask], dim=1)  # (B, P + T)
                kl = sequence_kl(policy, reference, full, mask, gen.prompt_ids.size(1), gen.response_mask)
                out.kl.extend(kl.tolist())
        out.texts.extend(decode_responses(tokenizer, gen))
        out.ended.extend(gen.ended.tolist())
        out.n_tokens.extend(gen.response_mask.sum(1).tolist())
    return out


def win_rate(outcomes: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean outcome (1 win, 0.5 tie, 0 loss) and its bootstrap 95% percentile interval over prompts."""
    rng = np.random.default_rng(seed)
    means = outcomes[rng.integers(0, len(outcomes), size=(n_boot, len(outcomes)))].mean(axis=1)  # (n_boot,)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(outcomes.mean()), float(low), float(high)


def judge_pairs(
    judge: Judge, prompts: list[str], a: PolicyAnswers, b: PolicyAnswers, seed: int
) -> tuple[np.ndarray, list[bool]]:
    """Outcome for A on each prompt (1, 0.5, 0), and whether A was shown first; the order is random."""
    rng = np.random.default_rng(seed)
    a_first = (rng.random(len(prompts)) < 0.5).tolist()
    outcomes = []
    for i, prompt in enumerate(prompts):
        answer_a, answer_b = Answer(a.texts[i], a.ended[i]), Answer(b.texts[i], b.ended[i])
        if a_first[i]:
            outcomes.append(judge.compare(prompt, answer_a, answer_b))
        else:
            outcomes.append(1.0 - judge.compare(prompt, answer_b, answer_a))
    return np.asarray(outcomes, dtype=np.float64), a_first


def policy_metrics(prompts: list[str], answers: PolicyAnswers, demo: bool) -> dict[str, Any]:
    n = len(prompts)
    metrics: dict[str, Any] = {
        "kl_to_reference": None if answers.kl is None else sum(answers.kl) / n,
        "mean_tokens": sum(answers.n_tokens) / n,
        "eos_rate": sum(answers.ended) / n,
    }
    if demo:
        metrics |= demo_metrics(prompts, answers.texts, answers.ended)
    return metrics


def compare(policy_a: str, policy_b: str, cfg: EvalConfig, judge: Judge) -> dict[str, Any]:
    """Answer, judge and summarise; returns the JSON summary."""
    prompts = read_prompts(cfg.prompts_file, cfg.n_prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = resolve_precision(cfg.precision) == "bf16"
    tokenizer = load_tokenizer(policy_a)
    for path in (policy_b, *([cfg.reference] if cfg.reference else [])):
        if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise RlhfError(f"{path} uses a different tokenizer from {policy_a}; they cannot be compared")
    reference = load_policy(cfg.reference, device) if cfg.reference else None
    bon = None
    if cfg.best_of_n > 1 and cfg.reward_model:
        bon = load_reward_model(cfg.reward_model).eval().to(device)  # type: ignore[arg-type]
    answers = {}
    for name, path, seed in (("a", policy_a, cfg.seed), ("b", policy_b, cfg.seed + 1)):
        log.info("eval: policy %s (%s) answers %d prompts", name.upper(), path, len(prompts))
        answers[name] = answer(load_policy(path, device), tokenizer, prompts, cfg, seed, reference, bf16,
                               bon if name == "a" else None)  # fmt: skip
    outcomes, a_first = judge_pairs(judge, prompts, answers["a"], answers["b"], cfg.seed)
    rate, low, high = win_rate(outcomes, cfg.bootstrap, cfg.seed)
    demo = judge.name == "gold"
    rows = [
        {"prompt": p, "a": answers["a"].texts[i], "b": answers["b"].texts[i], "ended_a": answers["a"].ended[i],
         "ended_b": answers["b"].ended[i], "a_first": a_first[i], "outcome_a": float(outcomes[i])}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    return {
        "policy_a": policy_a,
        "policy_b": policy_b,
        "best_of_n_a": cfg.best_of_n,
        "reference": cfg.reference,
        "judge": judge.name,
        "n_prompts": len(prompts),
        "prompts_file": cfg.prompts_file,
        "sampling": {
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed_a": cfg.seed,
            "seed_b": cfg.seed + 1,
        },  # fmt: skip
        "win_rate_a": rate,
        "ci95": [low, high],
        "wins_a": int((outcomes == 1.0).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses_a": int((outcomes == 0.0).sum()),
        "a": policy_metrics(prompts, answers["a"], demo),
        "b": policy_metrics(prompts, answers["b"], demo),
        "samples": rows[:20],
        "rows": rows,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: one row per metric, a column per policy."""
    lines = [
        f"A = {summary['policy_a']}"
        + (f" (best of {n})" if (n := summary.get("best_of_n_a", 1)) > 1 else ""),
        f"B = {summary['policy_b']}",
        f"win rate of A over B ({summary['judge']} judge, {summary['n_prompts']} prompts, ties = 1/2): "
        f"{summary['win_rate_a']:.3f}  95% CI [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]  "
        f"(W/T/L {summary['wins_a']}/{summary['ties']}/{summary['losses_a']})",
        f"{'metric':<28}{'A':>10}{'B':>10}",
    ]
    ci_a, ci_b = summary["a"].get("ci95", {}), summary["b"].get("ci95", {})
    for key in summary["a"]:
        a, b = summary["a"][key], summary["b"][key]
        if isinstance(a, dict):
            continue
        cell = lambda v: f"{v:>10.3f}" if isinstance(v, float | int) else f"{'-':>10}"  # noqa: E731
        interval = lambda c: f"  [{c[0]:.3f}, {c[1]:.3f}]" if c else ""  # noqa: E731
        line = f"{key:<28}{cell(a)}{cell(b)}"
        if key in ci_a:
            line += f"   95% CI A{interval(ci_a[key])} B{interval(ci_b.get(key))}"
        lines.append(line)
    if summary["reference"]:
        lines.append(f"(KL in nats per answer, to {summary['reference']})")
    return "\n".join(lines)
