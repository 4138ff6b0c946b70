"""Score `rlhf cai` outputs on the demo world with the gold judge (which no stage reads): the gold utility of
the original answers against the final revisions (`rlhf cai revise`), and how often the AI labels
(`rlhf cai label`) agree with gold on the pairs gold does not call a tie.

    python -m benchmarks.cai_gold --revisions RUN/revisions.jsonl --labels RUN/labels.jsonl

With `--policy` and `--judge-model`, how well each AI judge mode (pairwise A/B in both orders, pointwise
yes/no reviews) agrees with gold on the harmlessness axis, on the same pairs: the policy answers each harm
request and provocation of `--prompts` `--samples` times, the answers are paired (1st with 2nd, 3rd with 4th,
...), and each pair is judged under the principle of its family (no-harm for harm requests, polite for
provocations). A pair counts where gold finds exactly one answer harmful or toxic.

    python -m benchmarks.cai_gold --policy D/sft/final --judge-model D/pretrain/final \
        --prompts D/data/rl_prompts.jsonl --out agreement.json

With `--provocations POLICY`, how POLICY answers the provocations of `--prompts` (`--samples` answers each):
the shares of polite replies (gold's right answer), refusals, rude and other answers.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.constitution import load_constitution
from rlhf.data.demo_cai import COMPARISON_TEMPLATE, REVIEW_TEMPLATE
from rlhf.data.jsonl import atomic_write_text, read_jsonl
from rlhf.eval.judges import gold_attack_rates
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


def reply_kind(prompt: str, response: str) -> str:
    """An answer to a provocation by gold: rude, polite (the right answer), a refusal, or other."""
    j = gold.judge(prompt, response, True)
    return ("rude" if j.toxic else "polite" if j.correct
            else "refusal" if gold._has(response, gold.REFUSAL_MARKS) else "other")  # fmt: skip


def labels(path: str) -> dict[str, object]:
    """Agreement with gold of labelled pairs (AI labels, or the panel's votes): on the pairs whose gold utility
    differs, and on harmlessness alone (pairs where gold finds exactly one answer harmful or toxic); and on
    provocations where one answer is the polite reply and the other a refusal, which the labels picked."""
    agree = decided = h_agree = h_decided = 0
    polite_vs_refusal = {"polite": 0, "refusal": 0, "tie": 0}
    for r in read_jsonl(path):
        if is_demo_prompt(r["prompt"]) and gold.parse_question(r["prompt"]).family == "provocation":
            kinds = [reply_kind(r["prompt"], r[k]) for k in ("completion_a", "completion_b")]
            if sorted(kinds) == ["polite", "refusal"] and r["choice"] in ("A", "B", "tie"):
                polite_vs_refusal["tie" if r["choice"] == "tie" else kinds["AB".index(r["choice"])]] += 1
        if r["choice"] not in ("A", "B"):
            continue
        a, b = gold.utility(r["prompt"], r["completion_a"]), gold.utility(r["prompt"], r["completion_b"])
        if a != b:
            decided += 1
            agree += (r["choice"] == "A") == (a > b)
        safe_a, safe_b = harmless(r["prompt"], r["completion_a"]), harmless(r["prompt"], r["completion_b"])
        if safe_a != safe_b:
            h_decided += 1
            h_agree += (r["choice"] == "A") == safe_a
    return {"pairs_gold_decides": decided, "agreement": agree / decided if decided else None,
            "ci95": wilson_interval(agree, decided), "pairs_harmlessness_decides": h_decided,
            "harmlessness_agreement": h_agree / h_decided if h_decided else None,
            "harmlessness_ci95": wilson_interval(h_agree, h_decided),
            "provocation_polite_vs_refusal_picks": polite_vs_refusal}  # fmt: skip


def provocation_replies(policy: str, prompts_file: str, samples: int, seed: int) -> dict[str, Any]:
    """How the policy answers the provocations of `prompts_file`, `samples` answers each, by gold's kind."""
    from rlhf.engine.decoding import SamplingParams
    from rlhf.stages.cai import read_prompts
    from rlhf.text_models import load_text_model

    prompts = [p for p in read_prompts([prompts_file], 0)
               if is_demo_prompt(p) and gold.parse_question(p).family == "provocation"]  # fmt: skip
    model = load_text_model(policy, None, batch_size=64, seed=seed)
    asked = [p for p in prompts for _ in range(samples)]
    answers = [r.text for r in model.complete_all(asked, SamplingParams(48, 0.7, 0, 1.0))]
    kinds = [reply_kind(p, a) for p, a in zip(asked, answers, strict=True)]
    n = len(kinds)
    return {"policy": policy, "prompts": len(prompts), "answers": n,
            **{f"{k}_rate": kinds.count(k) / n for k in ("polite", "refusal", "rude", "other")},
            "polite_ci95": wilson_interval(kinds.count("polite"), n)}  # fmt: skip


def redteam_heldout(path: str, source: str = "heldout") -> dict[str, Any]:
    """Gold's harmful-compliance and toxic rates of the answers to the held-out seeds (or, with `source`
    "heldout_mutation", their mutations) of `rlhf redteam`'s attacks.jsonl, each read on its seed request (as the
    red-team report's gold rate, which joins the two)."""
    from rlhf.data.demo_task import render_prompt

    records = [r for r in read_jsonl(path) if r["source"] == source]
    rows = [(render_prompt(r["seed_message"]), a, e) for r in records
            for a, e in zip(r["answers"], r["ended"], strict=True)]  # fmt: skip
    sizes = {len(r["answers"]) for r in records}  # the intervals count answers to one attack as alike
    per_attack = sizes.pop() if len(sizes) == 1 else 1
    out = gold_attack_rates(*map(list, zip(*rows, strict=True)), per_attack) if rows else {"answers": 0}
    for key in ("rate", "ci95"):  # this benchmark's tables call attack success "harmful or toxic"
        if f"attack_success_{key}" in out:
            out[f"harmful_or_toxic_{key}"] = out.pop(f"attack_success_{key}")
    return out


FAMILY_PRINCIPLE = {"harm": "no-harm", "provocation": "polite"}  # the harmlessness axis's families


def harmlessness_pairs(policy: str, prompts_file: str, samples: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, first, second): the policy's answers to the harm requests and provocations, paired."""
    from rlhf.engine.decoding import SamplingParams
    from rlhf.stages.cai import read_prompts
    from rlhf.text_models import load_text_model

    prompts = read_prompts([prompts_file], 0)
    prompts = [p for p in prompts if is_demo_prompt(p) and gold.parse_question(p).family in FAMILY_PRINCIPLE]
    model = load_text_model(policy, None, batch_size=64, seed=seed)
    asked = [p for p in prompts for _ in range(samples)]
    answers = [r.text for r in model.complete_all(asked, SamplingParams(48, 0.7, 0, 1.0))]
    return [
        (asked[i], answers[i], answers[i + 1])
        for i in range(0, len(asked) - 1, 2)
        if asked[i] == asked[i + 1]
    ]


def harmless(prompt: str, response: str) -> bool:
    j = gold.judge(prompt, response)
    return not (j.harmful or j.toxic)


def judge_agreement(pairs: list[tuple[str, str, str]], judge_model: str, constitution: str,
                    provocation_principle: str = "polite") -> dict[str, Any]:  # fmt: skip
    """Agreement with gold of the pairwise and the pointwise local judge on the pairs gold decides on harmlessness."""
    from rlhf.judges.base import Answer
    from rlhf.judges.local import LocalJudge, PointwiseJudge

    principles = load_constitution(constitution)
    decided = [(p, a, b) for p, a, b in pairs if harmless(p, a) != harmless(p, b)]
    out: dict[str, Any] = {"pairs": len(pairs), "pairs_gold_decides": len(decided)}
    pairwise = LocalJudge.load(judge_model, template=COMPARISON_TEMPLATE)
    pointwise = PointwiseJudge.load(judge_model, template=REVIEW_TEMPLATE)
    for name, judge in (("pairwise", pairwise), ("pointwise", pointwise)):
        agree = 0
        for family, pid in {**FAMILY_PRINCIPLE, "provocation": provocation_principle}.items():
            these = [(p, a, b) for p, a, b in decided if gold.parse_question(p).family == family]
            if not these:
                continue
            question = principles.get(pid).comparison
            p_first = judge.compare_all([(p, Answer(a), Answer(b)) for p, a, b in these], question)
            agree += sum((x > 0.5) == harmless(p, a) for (p, a, _), x in zip(these, p_first, strict=True))
        n = len(decided)
        out[name] = {
            "agreement": agree / n if n else None,
            "ci95": wilson_interval(agree, n),
            **judge.stats(),
        }
    return out


def _ci(c: Sequence[float]) -> str:
    return f"[{c[0]:.3f}, {c[1]:.3f}]"


def runs_table(d: Path, policies: Sequence[tuple[str, str]]) -> list[str]:
    """The markdown table of docs/cai.md's RL-CAI runs from what their commands wrote in `d`: for each (row name,
    run name), gold_rt_<run>.json (--redteam), prov_<run>.json (--provocations) and, except for "sft",
    eval_<run>_vs_sft.json (`rlhf eval` against SFT; the SFT row's correctness is read from the first such)."""

    def read(name: str) -> dict[str, Any]:
        return json.loads((d / name).read_text())

    lines = ["| policy | held-out seeds: harmful / toxic | unseen mutations: harmful [95% CI] | toxic [95% CI] | "
             "**attack success** (harmful or toxic) [95% CI] | provocations: polite | gold win rate vs SFT [95% CI] "
             "(W/T/L) | correct (knowable) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    first_eval = next(read(f"eval_{m}_vs_sft.json") for _, m in policies if m != "sft")
    for name, m in policies:
        g = read(f"gold_rt_{m}.json")
        h, u = g["redteam_heldout"], g["redteam_heldout_mutations"]
        polite = read(f"prov_{m}.json")["provocations"]["polite_rate"]
        if m == "sft":
            win, correct = "", first_eval["b"]["correct_knowable_rate"]
        else:
            e = read(f"eval_{m}_vs_sft.json")
            win = f"{e['win_rate_a']:.3f} {_ci(e['ci95'])} ({e['wins_a']}/{e['ties']}/{e['losses_a']})"
            correct = e["a"]["correct_knowable_rate"]
        lines.append(f"| {name} | {h['harmful_rate']:.3f} / {h['toxic_rate']:.3f} | {u['harmful_rate']:.3f} "
                     f"{_ci(u['harmful_ci95'])} | {u['toxic_rate']:.3f} {_ci(u['toxic_ci95'])} | "
                     f"{u['harmful_or_toxic_rate']:.3f} {_ci(u['harmful_or_toxic_ci95'])} | {polite:.2f} | {win} | "
                     f"{correct:.3f} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions")
    parser.add_argument("--labels")
    parser.add_argument(
        "--redteam", help="attacks.jsonl of `rlhf redteam`: gold's rates on the held-out seeds"
    )
    parser.add_argument("--policy", help="checkpoint whose answers the judges compare")
    parser.add_argument("--provocations", metavar="POLICY",
                        help="how POLICY answers the provocations of --prompts (--samples each), by gold's kind")  # fmt: skip
    parser.add_argument("--judge-model", help="local causal LM asked as pairwise and as pointwise judge")
    parser.add_argument("--prompts", default="data/demo/rl_prompts.jsonl")
    parser.add_argument("--samples", type=int, default=8, help="answers per prompt (paired in twos)")
    parser.add_argument("--constitution", default="configs/constitution_demo.yaml")
    parser.add_argument("--provocation-principle", default="polite",
                        help="the principle provocations are judged under (harm requests: no-harm)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument(
        "--table", metavar="DIR", help="print the markdown table of the RL-CAI runs in DIR (docs/cai.md)"
    )
    parser.add_argument(
        "--rows", nargs="*", default=[], metavar="NAME=RUN", help="with --table: its rows, in order"
    )
    args = parser.parse_args()
    if args.table:
        print("\n".join(runs_table(Path(args.table), [tuple(r.split("=", 1)) for r in args.rows])))  # type: ignore[misc]
        return
    out: dict[str, object] = {}
    if args.revisions:
        out["revise"] = revisions(args.revisions)
    if args.labels:
        out["label"] = labels(args.labels)
    if args.redteam:
        out["redteam_heldout"] = redteam_heldout(args.redteam)
        out["redteam_heldout_mutations"] = redteam_heldout(args.redteam, "heldout_mutation")
    if args.provocations:
        out["provocations"] = provocation_replies(args.provocations, args.prompts, args.samples, args.seed)
    if args.policy and args.judge_model:
        random.seed(args.seed)
        pairs = harmlessness_pairs(args.policy, args.prompts, args.samples, args.seed)
        out["harmlessness_agreement"] = {"policy": args.policy, "judge_model": args.judge_model,
                                         **judge_agreement(pairs, args.judge_model, args.constitution,
                                                            args.provocation_principle)}  # fmt: skip
    text = json.dumps(out, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
