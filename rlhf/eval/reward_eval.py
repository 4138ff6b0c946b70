"""The key check of a reward model on the demo task: does it agree with the hidden gold utility at least as
often as the labelers it learned from do?

On the held-out pairs the training stage scored (RUN/heldout_pairs.jsonl), both are measured against the gold
ordering: the reward model's (r_chosen > r_rejected?) and the labels' own (is "chosen" gold-better?). Pairs
that gold rates equal have no right answer and are skipped. A reward model that averages out the labelers'
noise beats their agreement; one that memorises it does not.

This module imports the gold judge, so training code must not import it: `rlhf reward` calls it after the
stage when `reward.gold_eval` is true.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rlhf.data.jsonl import write_json
from rlhf.data.preferences import Format, PairwiseVote, Ranking, Record, read_preferences
from rlhf.eval.reward_metrics import EVAL_FILE, ScoredPair, accuracy_summary, read_scored_pairs
from rlhf.labelers.panel import gold_order

EndedLookup = dict[tuple[str, str], bool]


def ended_lookup(records: Iterable[Record]) -> EndedLookup:
    """(prompt, completion) -> did the policy end it with EOS, from the records' meta where they say
    (votes: meta.ended_a / meta.ended_b, as label_offline writes; rankings: meta.ended, one per completion)."""
    ended: EndedLookup = {}
    for r in records:
        if isinstance(r, PairwiseVote):
            for text, key in ((r.completion_a, "ended_a"), (r.completion_b, "ended_b")):
                if isinstance(r.meta.get(key), bool):
                    ended[(r.prompt, text)] = r.meta[key]
        elif isinstance(r, Ranking) and isinstance(r.meta.get("ended"), list):
            for text, flag in zip(r.completions, r.meta["ended"], strict=False):
                if isinstance(flag, bool):
                    ended[(r.prompt, text)] = flag
    return ended


def gold_comparison(pairs: Sequence[ScoredPair], ended: EndedLookup | None = None) -> dict[str, Any]:
    """Reward model vs gold and labels vs gold on the same pairs (gold-equal pairs skipped).

    `ended` says which completions ended with EOS; those absent are judged from their text.
    """
    ended = ended or {}
    rm_right: list[bool] = []
    labels_right: list[bool] = []
    prompts: list[str] = []  # the pairs of one prompt are alike: the intervals count them as one cluster
    for p in pairs:
        order = gold_order(
            p.prompt, p.chosen, p.rejected, ended.get((p.prompt, p.chosen)), ended.get((p.prompt, p.rejected))
        )
        if order == 0:
            continue
        labels_right.append(order > 0)
        rm_right.append((p.delta > 0) if order > 0 else (p.delta < 0))
        prompts.append(p.prompt)
    rm, labels = accuracy_summary(rm_right, prompts), accuracy_summary(labels_right, prompts)
    return {
        "gold/rm_accuracy": rm,
        "gold/label_agreement": labels,
        "gold/pairs": len(rm_right),
        "gold/skipped_equal": len(pairs) - len(rm_right),
        "gold/rm_minus_labels": rm["accuracy"] - labels["accuracy"] if rm_right else float("nan"),
    }


def add_gold_eval(
    run_dir: str | Path, preference_files: Sequence[str], fmt: Format = "auto"
) -> dict[str, Any]:
    """Compare RUN's held-out pairs with gold and add the result to RUN/eval.json; return the gold section."""
    run_dir = Path(run_dir)
    records = [r for path in preference_files for r in read_preferences(path, fmt)]
    result = gold_comparison(read_scored_pairs(run_dir), ended_lookup(records))
    eval_path = run_dir / EVAL_FILE
    report = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.exists() else {}
    write_json(eval_path, {**report, **result}, strict=True)  # a mean of nothing is null, as JSON has it
    return result
