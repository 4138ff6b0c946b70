"""`rlhf eval A B`: two policies answer the same held-out prompts and a judge compares them.

The judge (`rlhf.judges`: gold, a reward model, a local LM, an endpoint; people through `push_to_people` and
`collect_from_people`) sees each pair in a random A/B order. The win rate of A is the mean of the judge's
P(A better), ties counted as half a win; its 95% interval comes from a bootstrap over prompts. Beside it, for
each policy: its mean KL to a reference model, mean answer length, EOS rate and, on the demo task's prompts
only, the per-criterion rates (correct, non-responsive, hallucinated, harmful, toxic) with their 95%
intervals, and gold utility.

Sampling defaults to temperature 0.7: policies are used by sampling, so judging samples shows what users would
see (greedy decoding hides failure modes such as the SFT model's occasional rudeness). A and B use different
seeds, so a policy compared with itself shows the sampling noise (win rate near 0.5, within the interval).

With `redteam_samples` (demo world), both policies also answer `rlhf redteam`'s held-out attacks and their
unseen rewordings, and the gold judge gives each policy's attack success rate (harmful or toxic answers).

KL to the reference is the exact KL between the two next-token distributions (temperature 1), summed over the
answer's tokens, along each sampled answer: with temperature 1 this is a low-variance estimate of the sequence
KL that PPO's penalty holds down; at other temperatures it is the same quantity on that policy's samples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import EvalConfig
from rlhf.data.prompts import read_prompts
from rlhf.engine.best_of_n import best_of_n, kl_bound
from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.errors import RlhfError, from_setting
from rlhf.eval.judges import Answer, Judge, demo_metrics, gold_attack_rates, is_demo_prompt
from rlhf.models.heads import load_reward_model
from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts, stop_ids
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


# Answers sampled under one evaluation's settings, by (policy, seed, prompts, best-of-n, KL measured): a policy
# compared twice in one run (the demo's SFT policy, B against PPO and against the pretrained model) answers once.
Answered = dict[tuple[str, int, tuple[str, ...], bool, bool], PolicyAnswers]


def answered_key(
    policy: str, seed: int, prompts: list[str], best_of_n: bool = False, kl: bool = False
) -> tuple[str, int, tuple[str, ...], bool, bool]:
    """A policy's answers' key in `Answered`."""
    return str(Path(policy).resolve()), seed, tuple(prompts), best_of_n, kl


def load_policy(path: str, device: torch.device, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    model = load_causal_lm(path, tokenizer=tokenizer).eval()
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
        ids = encode_prompts(tokenizer, prompts[i : i + cfg.batch_size])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            gen = generate(policy, ids, params, stop_ids(tokenizer), tokenizer.pad_token_id, generator)
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
    judge: Judge,
    prompts: list[str],
    a: PolicyAnswers,
    b: PolicyAnswers,
    seed: int,
    principle: str | None = None,
) -> tuple[np.ndarray, list[bool]]:
    """Outcome for A on each prompt (the judge's probability that A is better: 1, 0.5, 0 for a judge that
    only says which), and whether A was shown first; the order is random. Two answers that are one answer (the
    same text, both ended or both cut off) are a tie, whatever the judge's rounding says (a reward model scores
    one text a little differently in another batch row: 0.49999988)."""
    rng = np.random.default_rng(seed)
    a_first = (rng.random(len(prompts)) < 0.5).tolist()
    pairs = []
    for i, prompt in enumerate(prompts):
        answer_a, answer_b = Answer(a.texts[i], a.ended[i]), Answer(b.texts[i], b.ended[i])
        pairs.append((prompt, answer_a, answer_b) if a_first[i] else (prompt, answer_b, answer_a))
    first_wins = judge.compare_all(pairs, principle)
    outcomes = [0.5 if first == second else p if f else 1.0 - p
                for p, f, (_, first, second) in zip(first_wins, a_first, pairs, strict=True)]  # fmt: skip
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


def best_of_n_picker(cfg: EvalConfig, tokenizer: Any, device: torch.device) -> PreTrainedModel | None:
    """The reward model that picks A's best of cfg.best_of_n samples, where that is asked; None otherwise."""
    if cfg.best_of_n > 1 and cfg.reward_model:
        return load_reward_model(cfg.reward_model, tokenizer=tokenizer).eval().to(device)  # type: ignore[arg-type]
    return None


def answer_both(
    policy_a: str, policy_b: str, cfg: EvalConfig, answered: Answered | None = None
) -> tuple[list[str], PolicyAnswers, PolicyAnswers]:
    """The evaluation prompts and each policy's answers to them (A with seed, B with seed + 1); answers found in
    `answered` are taken from it, and those sampled are added to it."""
    with from_setting("policy A"):
        tokenizer = load_tokenizer(policy_a, cfg.add_pad_token)
    with from_setting("eval.prompts_file"):
        prompts = read_prompts(cfg.prompts_file, cfg.n_prompts, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = resolve_precision(cfg.precision) == "bf16"
    for name, path in (
        ("policy B", policy_b),
        *([("eval.reference", cfg.reference)] if cfg.reference else []),
    ):
        with from_setting(name):
            other = load_tokenizer(path, cfg.add_pad_token)
        if other.get_vocab() != tokenizer.get_vocab():
            raise RlhfError(f"{path} uses a different tokenizer from {policy_a}; they cannot be compared")
    reference = load_policy(cfg.reference, device, tokenizer) if cfg.reference else None
    bon = best_of_n_picker(cfg, tokenizer, device)
    # best-of-n's KL is known (the bound) only to the policy that samples it: to the reference when A is it
    a_reference = reference
    if bon is not None and cfg.reference and Path(policy_a).resolve() != Path(cfg.reference).resolve():
        log.warning("eval: A answers best-of-%d of %s, not of the reference %s: its KL to the reference is "
                    "left out (the bound log n - (n - 1)/n is to A's own samples)", cfg.best_of_n, policy_a,
                    cfg.reference)  # fmt: skip
        a_reference = None
    answers, answered = {}, {} if answered is None else answered
    for name, path, seed in (("a", policy_a, cfg.seed), ("b", policy_b, cfg.seed + 1)):
        ref, picker = (a_reference, bon) if name == "a" else (reference, None)
        key = answered_key(path, seed, prompts, best_of_n=picker is not None, kl=ref is not None)
        if key in answered:
            log.info(
                "eval: policy %s (%s) answered these %d prompts already", name.upper(), path, len(prompts)
            )
        else:
            log.info("eval: policy %s (%s) answers %d prompts", name.upper(), path, len(prompts))
            policy = load_policy(path, device, tokenizer)
            answered[key] = answer(policy, tokenizer, prompts, cfg, seed, ref, bf16, picker)
        answers[name] = answered[key]
    return prompts, answers["a"], answers["b"]


def gold_metrics_apply(demo: bool, judge: str) -> bool:
    """Whether the demo's gold metrics mean anything here: on the demo's prompts, or when asked for (gold)."""
    if not demo and judge == "gold":
        log.warning("eval: these prompts are not the demo task's, yet the judge is its gold utility: "
                    "the win rate and the gold metrics (correct, toxic, ...) measure the demo's criteria only")  # fmt: skip
    elif not demo:
        log.warning("eval: these prompts are not the demo task's: its gold metrics (correct, toxic, ...) are "
                    "left out; the win rate is the %s judge's", judge)  # fmt: skip
    return demo or judge == "gold"


def summarise(
    policy_a: str, policy_b: str, cfg: EvalConfig, prompts: list[str], a: PolicyAnswers, b: PolicyAnswers,
    a_first: list[bool],
) -> dict[str, Any]:  # fmt: skip
    """The JSON summary without the verdicts: per-policy statistics and one row per prompt."""
    demo = all(is_demo_prompt(p) for p in prompts)
    gold_metrics = gold_metrics_apply(demo, cfg.judge)
    rows = [
        {"prompt": p, "a": a.texts[i], "b": b.texts[i], "ended_a": a.ended[i], "ended_b": b.ended[i],
         "a_first": a_first[i], "outcome_a": None}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    return {
        "policy_a": policy_a,
        "policy_b": policy_b,
        "best_of_n_a": cfg.best_of_n,
        "reference": cfg.reference,
        "judge": cfg.judge,
        # what the judge read: settings a judge has no use for are not its provenance
        "judge_model": cfg.judge_model if cfg.judge in ("reward_model", "local", "endpoint") else None,
        "both_orders": cfg.judge_both_orders if cfg.judge in ("local", "endpoint") else None,
        "n_prompts": len(prompts),
        "prompts_file": cfg.prompts_file,
        "demo_prompts": demo,
        "sampling": {
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed_a": cfg.seed,
            "seed_b": cfg.seed + 1,
        },  # fmt: skip
        "a": policy_metrics(prompts, a, gold_metrics),
        "b": policy_metrics(prompts, b, gold_metrics),
        "rows": rows,
    }


def add_verdicts(summary: dict[str, Any], outcomes: list[float | None], cfg: EvalConfig,
                 judge_stats: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Fill in the win rate of A (over the prompts with a verdict), its bootstrap CI, W/T/L (A's probability
    above, at or below 1/2) and the judge's own statistics."""
    for row, outcome in zip(summary["rows"], outcomes, strict=True):
        row["outcome_a"] = outcome
    judged = np.asarray([o for o in outcomes if o is not None], dtype=np.float64)
    if len(judged) == 0:
        raise RlhfError("no verdicts yet: nothing to compute a win rate from")
    rate, low, high = win_rate(judged, cfg.bootstrap, cfg.seed)
    summary |= {
        "n_judged": len(judged),
        "win_rate_a": rate,
        "ci95": [low, high],
        "wins_a": int((judged > 0.5).sum()),
        "ties": int((judged == 0.5).sum()),
        "losses_a": int((judged < 0.5).sum()),
        "judge_stats": judge_stats or {},
        "soft": bool(((judged > 0) & (judged < 1) & (judged != 0.5)).any()),
        "samples": summary["rows"][:20],
    }
    if summary["soft"]:  # a judge's probabilities pull the mean toward 1/2: also count whom it prefers
        hard = np.where(judged > 0.5, 1.0, np.where(judged < 0.5, 0.0, 0.5))
        rate, low, high = win_rate(hard, cfg.bootstrap, cfg.seed)
        summary |= {"win_rate_hard_a": rate, "ci95_hard": [low, high]}
    return summary


def redteam_rates(
    policy_a: str, policy_b: str, cfg: EvalConfig, answered: Answered | None = None
) -> dict[str, Any]:
    """Demo world: each policy answers `rlhf redteam`'s held-out attacks (its default split: seeds no search
    saw, and mutations of them no training data holds word for word) cfg.redteam_samples times; the gold judge
    reads each answer on its seed request. Per policy and set: answers, harmful, toxic and attack success
    (harmful or toxic) rates with 95% intervals (Wilson's, widened for answers to one attack being alike).
    With `best_of_n` and a reward model, A's answers are the best of n, as its answers to the prompts are.
    Answers found in `answered` are taken from it, and those sampled are added to it."""
    from rlhf.config import RedteamConfig
    from rlhf.data.attacks import Attack, heldout_demo_attacks
    from rlhf.data.demo_task import render_prompt

    defaults = RedteamConfig()
    seeds, mutations = heldout_demo_attacks(defaults.refusal, defaults.heldout_fraction, defaults.seed,
                                            cfg.redteam_mutations)  # fmt: skip
    tokenizer = load_tokenizer(policy_a, cfg.add_pad_token)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = resolve_precision(cfg.precision) == "bf16"

    def rates(attacks: list[Attack], answers: PolicyAnswers) -> dict[str, Any]:
        seed_prompts = [render_prompt(a.seed_message) for a in attacks for _ in range(cfg.redteam_samples)]
        return gold_attack_rates(seed_prompts, answers.texts, answers.ended, cfg.redteam_samples)

    result: dict[str, Any] = {"attacks": {"heldout": len(seeds), "heldout_mutations": len(mutations)},
                              "samples_per_attack": cfg.redteam_samples}  # fmt: skip
    answered = {} if answered is None else answered
    # A answers the attacks as it answered the prompts: best of n by the reward model, where that is asked
    bon = cfg.best_of_n > 1 and cfg.reward_model is not None
    for name, path, seed in (("a", policy_a, cfg.seed), ("b", policy_b, cfg.seed + 1)):
        policy, picker = None, None
        result[name] = {}
        for part, attacks in (("heldout", seeds), ("heldout_mutations", mutations)):
            prompts = [render_prompt(a.message) for a in attacks for _ in range(cfg.redteam_samples)]
            key = answered_key(path, seed, prompts, best_of_n=bon and name == "a")
            if key not in answered:  # the models are loaded only for answers not sampled already
                if policy is None:
                    policy = load_policy(path, device, tokenizer)
                    picker = best_of_n_picker(cfg, tokenizer, device) if name == "a" else None
                answered[key] = answer(policy, tokenizer, prompts, cfg, seed, None, bf16, picker)
            result[name][part] = rates(attacks, answered[key])
    return result


def compare(
    policy_a: str, policy_b: str, cfg: EvalConfig, judge: Judge, answered: Answered | None = None
) -> dict[str, Any]:
    """Answer, judge and summarise; returns the JSON summary. `answered`: answers sampled under `cfg` earlier in
    this run, taken from it and added to (`Answered`)."""
    check_answer_room(judge, policy_a, cfg)
    prompts, a, b = answer_both(policy_a, policy_b, cfg, answered)
    outcomes, a_first = judge_pairs(judge, prompts, a, b, cfg.seed, cfg.judge_principle)
    summary = summarise(policy_a, policy_b, cfg, prompts, a, b, a_first)
    summary["judge"] = judge.name
    if cfg.redteam_samples and summary["demo_prompts"]:
        summary["redteam"] = redteam_rates(policy_a, policy_b, cfg, answered)
    elif cfg.redteam_samples:
        log.warning("eval: redteam_samples is left out: the red team's held-out attacks are the demo world's, "
                    "read by its gold judge, and these are not the demo's prompts (rlhf redteam attacks any "
                    "policy: docs/cai.md)")  # fmt: skip
    return add_verdicts(summary, outcomes.tolist(), cfg, judge.stats())


def check_answer_room(judge: Judge, policy_a: str, cfg: EvalConfig) -> None:
    """Before any answer is sampled: an error where the judging prompts alone fill the judge's context, and a
    warning where answers of eval.max_new_tokens may not fit (a pair that does not stops the evaluation once
    both policies have answered every prompt)."""
    if getattr(judge, "context", None) is None:  # a judge without a context length (gold, endpoints)
        return
    with from_setting("policy A"):
        tokenizer = load_tokenizer(policy_a, cfg.add_pad_token)
    with from_setting("eval.prompts_file"):
        prompts = read_prompts(cfg.prompts_file, cfg.n_prompts, tokenizer)
    room = judge.answer_room(prompts, cfg.judge_principle)
    if room is None or room >= cfg.max_new_tokens:
        return
    if room <= 0:
        raise RlhfError(f"eval: the judging prompts fill the {judge.name} judge's context before any answer is in "
                        "them: shorten the template (eval.judge_template or eval.judge_review_template) or the "
                        "prompts, or choose a judge with a longer context")  # fmt: skip
    log.warning("eval: the %s judge has room for answers of about %d tokens each after the longest prompt, and "
                "answers may reach eval.max_new_tokens (%d); a pair that does not fit stops the evaluation once "
                "both policies have answered", judge.name, room, cfg.max_new_tokens)  # fmt: skip


def push_to_people(policy_a: str, policy_b: str, cfg: EvalConfig) -> dict[str, Any]:
    """Answer, then hand the pairs to people in the labeling app; returns the summary awaiting their votes
    (`collect_from_people` completes it). The app shows each pair in a random order of its own."""
    from rlhf.judges.people import evaluation_id, push_pairs

    prompts, a, b = answer_both(policy_a, policy_b, cfg)
    summary = summarise(policy_a, policy_b, cfg, prompts, a, b, [True] * len(prompts))
    eval_id = evaluation_id(prompts, a.texts, b.texts)
    counts = push_pairs(prompts, a.texts, b.texts, cfg.judge_project, db=cfg.judge_db, server=cfg.judge_server,
                        token=os.environ.get(cfg.judge_token_env), guidelines=cfg.judge_principle,
                        eval_id=eval_id)  # fmt: skip
    if counts.get("skipped"):
        log.warning("eval: %d pairs of this evaluation were already in project %s (pushed before) and were not "
                    "added again", counts["skipped"], cfg.judge_project)  # fmt: skip
    return summary | {"status": "awaiting votes", "project": cfg.judge_project, "pushed": counts,
                      "eval_id": eval_id}  # fmt: skip


def collect_from_people(pending: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """The votes people cast on a pushed evaluation, read back into its summary (prompts nobody voted on yet
    are left out of the win rate; identical answers are ties without a vote)."""
    from rlhf.judges.people import collect_outcomes

    if pending.get("judge") != "people" or "project" not in pending:
        raise RlhfError("--collect needs the summary that `rlhf eval` wrote when it pushed pairs to people")
    rows = pending["rows"]
    outcomes, n_votes = collect_outcomes(pending["project"], [(r["prompt"], r["a"], r["b"]) for r in rows],
                                         db=cfg.judge_db, server=cfg.judge_server,
                                         token=os.environ.get(cfg.judge_token_env))  # fmt: skip
    if n_votes == 0:
        raise RlhfError(f"no verdicts yet: nobody has voted on the pairs in project {pending['project']}")
    outcomes = [0.5 if o is None and r["a"] == r["b"] else o for o, r in zip(outcomes, rows, strict=True)]
    summary = add_verdicts(dict(pending), outcomes, cfg, {"votes": n_votes, "project": pending["project"]})
    return summary | {"status": "collected"}


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: one row per metric, a column per policy."""
    lines = [
        f"A = {summary['policy_a']}"
        + (f" (best of {n})" if (n := summary.get("best_of_n_a", 1)) > 1 else ""),
        f"B = {summary['policy_b']}",
        f"win rate of A over B ({summary['judge']} judge, {summary.get('n_judged', summary['n_prompts'])} "
        f"prompts, {'mean P(A better), W/T/L by P vs 1/2' if summary.get('soft') else 'ties = 1/2'}): "
        f"{summary['win_rate_a']:.3f}  95% CI [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]  "
        f"(W/T/L {summary['wins_a']}/{summary['ties']}/{summary['losses_a']})",
    ]
    if "win_rate_hard_a" in summary:
        low, high = summary["ci95_hard"]
        lines.append(f"counting only whom the judge prefers (P > 1/2 a win, ties = 1/2): "
                     f"{summary['win_rate_hard_a']:.3f}  95% CI [{low:.3f}, {high:.3f}]")  # fmt: skip
    if (waiting := summary["n_prompts"] - summary.get("n_judged", summary["n_prompts"])) > 0:
        lines.append(f"({waiting} of {summary['n_prompts']} prompts have no verdict yet and are left out)")
    stats = summary.get("judge_stats") or {}
    if stats.get("position_bias_first") is not None:
        lines.append(
            f"judge position bias: prefers the first slot {stats['position_bias_first']:.3f} of the time "
            f"(0.5 = none; {stats['questions_asked']} questions"
            + (", both orders asked: the win rate is corrected)" if summary.get("both_orders", True) else ")")
        )
    extra = {k: v for k, v in stats.items() if k in ("requests", "retries", "cache_hits", "read_unparsed")}
    if extra:
        lines.append("judge requests: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    if "correct_rate" not in summary["a"]:
        lines.append("(not the demo task's prompts: its gold metrics are left out)")
    lines.append(f"{'metric':<28}{'A':>10}{'B':>10}")
    ci_a, ci_b = summary["a"].get("ci95", {}), summary["b"].get("ci95", {})
    for key in summary["a"]:
        a, b = summary["a"][key], summary["b"][key]
        if isinstance(a, dict):
            continue
        # a count as a count (correct_n 30, not 30.000), a rate or a mean to three places
        cell = lambda v: (f"{v:>10d}" if isinstance(v, int) and not isinstance(v, bool) else f"{v:>10.3f}"  # noqa: E731
                          if isinstance(v, float | int) else f"{'-':>10}")  # fmt: skip
        interval = lambda c: f"  [{c[0]:.3f}, {c[1]:.3f}]" if c else ""  # noqa: E731
        line = f"{key:<28}{cell(a)}{cell(b)}"
        if key in ci_a:
            line += f"   95% CI A{interval(ci_a[key])} B{interval(ci_b.get(key))}"
        lines.append(line)
    if summary["reference"]:
        lines.append(f"(KL in nats per answer, to {summary['reference']})")
        if summary.get("best_of_n_a", 1) > 1 and summary["a"].get("kl_to_reference") is not None:
            lines.append("(A's KL is best-of-n's bound, log n - (n - 1) / n, not a measurement)")
    if rt := summary.get("redteam"):
        lines.append(f"red-team attack success (gold: harmful or toxic), {rt['samples_per_attack']} answers per "
                     "held-out attack:")  # fmt: skip
        for key, label in (("heldout", "held-out seeds"), ("heldout_mutations", "their mutations")):
            cells = [f"{p} {r['attack_success_rate']:.3f} [{r['attack_success_ci95'][0]:.3f}, "
                     f"{r['attack_success_ci95'][1]:.3f}]" for p in ("A", "B") if (r := rt[p.lower()][key])["answers"]]  # fmt: skip
            lines.append(f"  {label} ({rt['attacks'][key]} attacks): " + ("   ".join(cells) or "none"))
    return "\n".join(lines)
