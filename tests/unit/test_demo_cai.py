"""The demo world's critique and comparison documents: off by default (the demo's data unchanged), seeded,
in the constitution's words, and their verdicts agree with the gold judge."""

from __future__ import annotations

import random
import re
from pathlib import Path

from rlhf.constitution import load_constitution
from rlhf.data import demo_task
from rlhf.data.demo_cai import (
    COMPARISON_TEMPLATE,
    PRINCIPLES,
    REVIEW_TEMPLATE,
    TAUGHT,
    cai_documents,
    comparison_document,
    review_document,
)
from rlhf.labelers import gold

ROOT = Path(__file__).resolve().parents[2]


def test_documents_leave_the_rest_of_the_data_as_it_was(tmp_path: Path) -> None:
    sizes = {"n_pretrain": 50, "n_sft": 20, "n_rl_prompts": 10, "n_eval_prompts": 10, "n_tune_prompts": 10}
    demo_task.generate(tmp_path / "off", seed=1, **sizes)  # type: ignore[arg-type]
    demo_task.generate(tmp_path / "on", seed=1, n_cai_docs=8, **sizes)  # type: ignore[arg-type]
    demo_task.generate(tmp_path / "again", seed=1, n_cai_docs=8, **sizes)  # type: ignore[arg-type]
    for name in ("sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl", "tune_prompts.jsonl"):
        assert (tmp_path / "off" / name).read_bytes() == (tmp_path / "on" / name).read_bytes()
    off, on = ((tmp_path / d / "pretrain.txt").read_text() for d in ("off", "on"))
    assert (
        on.startswith(off.rstrip("\n"))
        and on.count("CritiqueRequest:") == 3
        and on.count("Does the response break it?") == 2
    )
    assert on == (tmp_path / "again" / "pretrain.txt").read_text()


def test_principles_are_the_demo_constitutions() -> None:
    constitution = load_constitution(ROOT / "configs" / "constitution_demo.yaml")
    assert {
        p.id: (p.critique_request, p.revision_request, p.comparison) for p in constitution.principles
    } == PRINCIPLES


def test_comparisons_prefer_what_gold_prefers() -> None:
    rng = random.Random(0)
    for _ in range(300):
        doc = comparison_document(rng)
        m = re.fullmatch(r"User: (User: .*?\nAssistant:)\nResponse A: (.*)\nResponse B: (.*)\n(.*) Answer:\n"
                         r"Assistant:([AB])", doc, flags=re.S)  # fmt: skip
        assert m is not None, doc
        prompt, a, b, question, letter = m.groups()
        assert question in {c for _, _, c in PRINCIPLES.values()}
        better, worse = (a, b) if letter == "A" else (b, a)
        assert gold.utility(prompt, better) > gold.utility(prompt, worse), doc
    assert "{principle}" in COMPARISON_TEMPLATE


def test_critiques_revise_what_breaks_the_principle() -> None:
    docs = cai_documents(600, random.Random(0))[::3]
    fixed = kept = improved = 0
    for doc in docs:
        dialogue, rest = doc.split("\n\nCritiqueRequest: ", 1)
        prompt, answer = dialogue.split("\nAssistant: ", 1)
        revision = rest.rsplit("\nRevision: ", 1)[1]
        if "fine as it is" in rest:
            kept += 1
            assert revision == answer
        else:
            fixed += 1
            improved += gold.utility(f"{prompt}\nAssistant:", revision) > gold.utility(
                f"{prompt}\nAssistant:", answer
            )
    # gold counts a few flawed greetings as fine ("Good question." greets), so not every revision gains
    assert fixed > 50 and kept > 20 and improved >= 0.9 * fixed


def _review_parts(doc: str) -> tuple[str, ...]:
    """(prompt, response, principle question, verdict) of a review document."""
    m = re.fullmatch(r"User: (User: .*?\nAssistant:)\nResponse: (.*)\nPrinciple: (.*)\nDoes the response break "
                     r"it\? Answer:\nAssistant: (yes|no)", doc, flags=re.S)  # fmt: skip
    assert m is not None, doc
    return m.groups()


def test_reviews_say_yes_where_gold_finds_harm_or_an_insult() -> None:
    rng = random.Random(0)
    seen = {"yes": 0, "no": 0}
    for _ in range(1500):
        doc = review_document(rng)
        prompt, answer, question, verdict = _review_parts(doc)
        seen[verdict] += 1
        j = gold.judge(prompt, answer)
        if question == PRINCIPLES["no-harm"][2] and j.family == "harm":
            assert (verdict == "yes") == j.harmful, doc
        if question == PRINCIPLES["polite"][2]:
            assert (verdict == "yes") == j.toxic, doc
    assert min(seen.values()) > 300  # both verdicts common
    assert "{response}" in REVIEW_TEMPLATE


def test_reviews_under_reply_kindly_want_a_polite_offer_of_help() -> None:
    """Under reply-kindly an insult met with an insult, a bare refusal or a shrug breaks the principle, and the
    polite offer of help keeps it."""
    rng = random.Random(1)
    question = TAUGHT["reply-kindly"][2]
    verdicts: dict[str, set[str]] = {"refusal": set(), "insult": set(), "shrug": set(), "polite": set()}
    for _ in range(4000):
        doc = review_document(rng)
        prompt, answer, asked, verdict = _review_parts(doc)
        j = gold.judge(prompt, answer)
        if asked != question or j.family != "provocation":
            continue
        if j.toxic:
            verdicts["insult"].add(verdict)
        elif answer in demo_task.POLITE:
            verdicts["polite"].add(verdict)
            assert j.correct  # gold's right answer
        elif "can't help" in answer:
            verdicts["refusal"].add(verdict)
            assert not j.correct  # gold: no polite reply
        elif answer in demo_task.non_answers(gold.parse_question(prompt)):
            verdicts["shrug"].add(verdict)
    assert verdicts == {"refusal": {"yes"}, "insult": {"yes"}, "shrug": {"yes"}, "polite": {"no"}}


def test_the_harmlessness_constitution_uses_the_taught_principles() -> None:
    constitution = load_constitution(ROOT / "configs" / "constitution_demo_harmless.yaml")
    assert {
        p.id: (p.critique_request, p.revision_request, p.comparison) for p in constitution.principles
    } == {k: TAUGHT[k] for k in ("no-harm", "polite", "reply-kindly")}
    assert "reply-kindly" not in PRINCIPLES  # the pairwise comparisons keep the demo constitution's questions
