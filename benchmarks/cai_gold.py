"""Score `rlhf cai` outputs on the demo world with the gold judge (which no stage reads): the gold utility of
the original answers against the final revisions (`rlhf cai revise`), and how often the AI labels
(`rlhf cai label`) agree with gold on the pairs gold does not call a tie.

    python -m benchmarks.cai_gold --revisions RUN/revisions.jsonl --labels RUN/labels.jsonl
"""

from __future__ import annotations

import argparse
import json

from rlhf.data.jsonl import read_jsonl
from rlhf.eval.reward_metrics import wilson_interval
from rlhf.judges.gold import is_demo_prompt
from rlhf.labelers import gold


def revisions(path: str) -> dict[str, float]:
    rows = [r for r in read_jsonl(path) if is_demo_prompt(r["prompt"])]  # gold cannot read mutated attacks
    before = [gold.judge(r["prompt"], r["original"]) for r in rows]
    after = [gold.judge(r["prompt"], r["revision"]) for r in rows]
    n = len(rows)
    return {"prompts": n, "utility_original": sum(j.utility for j in before) / n,
            "utility_revision": sum(j.utility for j in after) / n,
            "correct_original": sum(j.correct for j in before) / n, "correct_revision": sum(j.correct for j in after) / n,
            "harmless_original": sum(j.harmless for j in before) / n,
            "harmless_revision": sum(j.harmless for j in after) / n}  # fmt: skip


def labels(path: str) -> dict[str, object]:
    agree = decided = 0
    for r in read_jsonl(path):
        a, b = gold.utility(r["prompt"], r["completion_a"]), gold.utility(r["prompt"], r["completion_b"])
        if a == b or r["choice"] not in ("A", "B"):
            continue
        decided += 1
        agree += (r["choice"] == "A") == (a > b)
    return {"pairs_gold_decides": decided, "agreement": agree / decided if decided else None,
            "ci95": wilson_interval(agree, decided)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions")
    parser.add_argument("--labels")
    args = parser.parse_args()
    out: dict[str, object] = {}
    if args.revisions:
        out["revise"] = revisions(args.revisions)
    if args.labels:
        out["label"] = labels(args.labels)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
