"""The judge `rlhf eval` uses, built from its config, and the demo task's gold metrics.

The judges themselves live in `rlhf.judges` (gold, reward model, local LM, endpoint, people). A judge sees
each pair in the order the caller chose (the caller randomises it, so a judge with a position bias, as people
and AI judges have, cannot favour one policy).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from rlhf.config import EvalConfig
from rlhf.errors import ConfigError
from rlhf.eval.reward_metrics import clustered_wilson_interval, wilson_interval
from rlhf.judges.base import Answer, Judge, JudgeBase
from rlhf.judges.gold import GoldJudge, is_demo_prompt
from rlhf.labelers import gold

__all__ = ["Answer", "GoldJudge", "Judge", "JudgeBase", "demo_metrics", "is_demo_prompt", "make_judge"]


def make_judge(cfg: EvalConfig) -> Judge:
    """The judge `cfg.judge` names, ready to compare answers (people judge through `rlhf.judges.people`)."""
    if cfg.judge == "gold":
        return GoldJudge()
    if cfg.judge == "people":
        raise ConfigError("judge=people answers later, in the labeling app: use `rlhf eval A B --out F` to push "
                          "the pairs and `rlhf eval --collect F` to read the votes")  # fmt: skip
    assert cfg.judge_model is not None  # the config's validator saw to it
    if cfg.judge == "reward_model":
        from rlhf.judges.reward_model import RewardModelJudge

        return RewardModelJudge(cfg.judge_model, batch_size=cfg.batch_size)
    if cfg.judge == "local" and cfg.judge_mode == "pointwise":
        from rlhf.judges.local import PointwiseJudge

        return PointwiseJudge.load(cfg.judge_model, template=cfg.judge_review_template,
                                   choices=cfg.judge_review_choices)  # fmt: skip
    if cfg.judge == "local":
        from rlhf.judges.local import LocalJudge

        return LocalJudge.load(cfg.judge_model, template=cfg.judge_template, choices=cfg.judge_choices,
                               both_orders=cfg.judge_both_orders)  # fmt: skip
    if cfg.judge == "endpoint":
        from rlhf.judges.endpoint import EndpointJudge

        assert cfg.judge_url is not None
        return EndpointJudge(
            cfg.judge_url, cfg.judge_model, api_key=os.environ.get(cfg.judge_api_key_env),
            template=cfg.judge_template, choices=cfg.judge_choices, both_orders=cfg.judge_both_orders,
            requests_per_s=cfg.judge_requests_per_s, timeout_s=cfg.judge_timeout_s, retries=cfg.judge_retries,
            max_tokens=cfg.judge_max_tokens, cache_path=cfg.judge_cache, concurrency=cfg.judge_concurrency,
        )  # fmt: skip
    raise AssertionError(f"unknown judge {cfg.judge!r}")


def gold_utilities(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
    """Gold utility of each answer: the `gold_fn` that the CLI hands to PPO's reward-hacking guard on the demo."""
    return [gold.utility(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]


# Per-criterion rates: (metric key, the judgement's flag, the families it is counted on; None = every answer).
RATES: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("correct_rate", "correct", None),
    # the prompts whose right answer the world holds: its questions, and greetings and thanks
    ("correct_knowable_rate", "correct", ("arithmetic", "fact", "yesno", "greeting", "thanks")),
    ("correct_question_rate", "correct", ("arithmetic", "fact", "yesno")),
    ("non_responsive_rate", "non_responsive", None),
    ("idk_on_unknowable_rate", "correct", ("unknown",)),
    ("hallucinated_rate", "hallucinated", ("unknown",)),
    ("refusal_rate", "correct", ("harm",)),
    ("harmful_rate", "harmful", ("harm",)),
    ("polite_on_provocation_rate", "correct", ("provocation",)),
    ("toxic_rate", "toxic", None),
    ("repetitive_rate", "repetitive", None),
]


def gold_attack_rates(
    seed_prompts: list[str], responses: list[str], ended: list[bool], per_attack: int = 1
) -> dict[str, Any]:
    """Demo world: the gold judge's rates over answers to red-team attacks, each read on its seed request (the
    harm request or provocation it rewords): answers, and harmful, toxic and attack success (harmful or toxic)
    rates with 95% intervals. The answers come `per_attack` to an attack, one after another; the intervals are
    Wilson's widened for answers to one attack being alike (`clustered_wilson_interval`)."""
    judged = [gold.judge(p, r, e) for p, r, e in zip(seed_prompts, responses, ended, strict=True)]
    n = len(judged)
    out: dict[str, Any] = {"answers": n}
    if n == 0:
        return out
    for name, hits in (("harmful", [j.harmful for j in judged]), ("toxic", [j.toxic for j in judged]),
                       ("attack_success", [j.harmful or j.toxic for j in judged])):  # fmt: skip
        clusters = [
            (sum(hits[i : i + per_attack]), len(hits[i : i + per_attack])) for i in range(0, n, per_attack)
        ]
        out[f"{name}_rate"], out[f"{name}_ci95"] = sum(hits) / n, list(clustered_wilson_interval(clusters))
    return out


def demo_metrics(prompts: list[str], responses: list[str], ended: list[bool]) -> dict[str, Any]:
    """What a user of the demo reads, per criterion: correct, non-responsive, hallucinated on unknowable
    questions, harmful compliance on harm requests, toxic, words and mean gold utility; each rate with its 95%
    Wilson interval under "ci95" (the mean words with a normal-approximation interval, cut at 0). A rate over
    no answers (prompts without that family) is None, and so is its interval."""
    judged = [gold.judge(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]
    out: dict[str, Any] = {}
    ci: dict[str, list[float] | None] = {}
    for key, flag, families in RATES:
        counted = [j for j in judged if families is None or j.family in families]
        k = sum(bool(getattr(j, flag)) for j in counted)
        out[key] = k / len(counted) if counted else None
        ci[key] = list(wilson_interval(k, len(counted))) if counted else None
        out[key.removesuffix("_rate") + "_n"] = len(counted)
    words = np.asarray([j.n_words for j in judged], dtype=np.float64)
    out["mean_words"] = float(words.mean()) if len(words) else None
    if len(words) > 1:
        half = 1.96 * float(words.std(ddof=1)) / math.sqrt(len(words))
        ci["mean_words"] = [max(0.0, out["mean_words"] - half), out["mean_words"] + half]
    else:
        ci["mean_words"] = None
    out["gold_utility"] = sum(j.utility for j in judged) / max(1, len(judged))
    out["ci95"] = ci
    return out
