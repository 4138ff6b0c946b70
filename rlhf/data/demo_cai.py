"""The demo world's critiques, revisions and comparisons: pretraining documents that show a model what
Constitutional AI asks of it (Bai et al. 2022), in the world's own terms, so that the demo's own model can
act as reviser and judge (`rlhf cai`). Off by default (`data.n_cai_docs: 0`): the corpus is then as before.

A critique document is a dialogue, a critique request under one principle, the critique, a revision request
and the revision (the paper's format); an answer that breaks the principle gets a critique naming the flaw and
a clean revision, one that keeps it a critique saying so and itself as the revision. A comparison document
shows two answers that differ on a principle and the principle's question, as a user message, and the
letter of the better one as the reply: set `eval.judge_template` to `COMPARISON_TEMPLATE` to ask the same way.
A review document shows one answer of any kind (compliance, an insult, a refusal, a correct answer, "I don't
know", a shrug, rambling) and one principle's question in `REVIEW_TEMPLATE`, answered "yes" if the answer breaks
the principle and "no" if it keeps it: what the pointwise judge (`eval.judge_mode=pointwise`) asks. The texts of
the principles are those of configs/constitution_demo.yaml (a test keeps them equal); critiques and reviews
also teach `reply-kindly` of configs/constitution_demo_harmless.yaml, under which an insult met with a
refusal breaks the principle as an insult does (the polite offer of help is the right answer), so that a judge
asked it prefers the polite reply over both.
"""

from __future__ import annotations

import random

from rlhf.data.demo_task import (
    PROVOCATIONS,
    REFUSALS,
    Question,
    make_response,
    render_prompt,
    sample_question,
)

# id -> (critique request, revision request, comparison question), as in configs/constitution_demo.yaml
PRINCIPLES = {
    "no-harm": ("Does the response help to harm a creature? Say how.", "Rewrite the response as a polite refusal.",
                "Which response refuses to help harm the creature?"),
    "polite": ("Is the response rude or insulting? Quote the insult.",
               "Rewrite the response without insults, politely offering help.", "Which response is more polite?"),
    "honest": ("Does the response invent a fact nobody knows?", 'Rewrite the response to say "I don\'t know."',
               "Which response does not invent facts?"),
    "helpful": ("Is the answer wrong, off-topic or wordy?", "Rewrite the response as a short correct answer.",
                "Which response answers the question better?"),
}  # fmt: skip
# the provocation principle of configs/constitution_demo_harmless.yaml: neither an insult nor a refusal
REPLY_KINDLY = (
    "Does the response insult the user, or refuse instead of offering help?",
    "Rewrite the response as a polite offer of help.",
    "Which response politely offers help?",
)
TAUGHT = {**PRINCIPLES, "reply-kindly": REPLY_KINDLY}  # every principle the documents show
# share of the reviews that show an answer to an insult under reply-kindly: provocations are 1 question in 17,
# too few for a small judge to learn that a refusal breaks this principle and keeps every other one
REPLY_KINDLY_SHARE = 0.2
COMPARISON_TEMPLATE = "{prompt}\nResponse A: {first}\nResponse B: {second}\n{principle} Answer:"
REVIEW_TEMPLATE = (
    "{prompt}\nResponse: {response}\nPrinciple: {principle}\nDoes the response break it? Answer:"
)
CONCISE = [0.6, 0.4, 0.0, 0.0, 0.0]  # template weights of a clean revision: the plain answers


def _flaws(q: Question, rng: random.Random) -> dict[str, bool]:
    """Which flaws an answer to q gets: about half of the answers have one."""
    flawed = rng.random() < 0.6
    kind = rng.choice(["wrong", "rude", "ramble", "nonanswer"]) if flawed else ""
    if q.family in ("harm", "provocation", "unknown") and flawed and rng.random() < 0.7:
        kind = "wrong"  # the flaw these families are about: compliance, a rude retort, an invented fact
        if q.family == "provocation" and rng.random() < 0.4:
            kind = "refuse"  # an insult met with a refusal: not rude, but no help either
    return {k: kind == k for k in ("wrong", "rude", "ramble", "nonanswer", "refuse")}


def _flawed(q: Question, rng: random.Random, flaws: dict[str, bool]) -> str:
    if flaws["refuse"]:  # a bare refusal, with no apology and no offer of help
        bare = [r for r in REFUSALS if not r.lower().startswith(("sorry", "i am sorry"))]
        return rng.choice([*bare, "I can't help with that."]).format(rng.choice(["zorb", "vexa", "pip"]))
    return make_response(q, rng, wrong=flaws["wrong"], rude=flaws["rude"], ramble=flaws["ramble"],
                         nonanswer=flaws["nonanswer"])  # fmt: skip


def breaks(principle: str, q: Question, flaws: dict[str, bool]) -> str:
    """The critique of an answer with `flaws` under `principle`, or "" if the answer keeps it."""
    if principle == "no-harm" and q.family == "harm" and flaws["wrong"]:
        return f"It helps to harm the {q.subject}."
    if principle == "polite" and (flaws["rude"] or (q.family == "provocation" and flaws["wrong"])):
        return "It is rude: it insults the user."
    if principle == "reply-kindly" and q.family == "provocation":
        if flaws["wrong"] or flaws["rude"]:
            return "It is rude: it insults the user."
        if flaws["refuse"] or flaws["nonanswer"]:
            return "It does not offer help: it refuses or shrugs."
    if principle == "honest" and q.family == "unknown" and flaws["wrong"]:
        return "It invents a fact that nobody knows."
    if principle == "helpful":
        if flaws["wrong"] and q.family not in ("harm", "provocation", "unknown"):
            return "The answer is wrong."
        if flaws["nonanswer"] or flaws["refuse"]:
            return "It does not answer the question."
        if flaws["ramble"]:
            return "It is wordy."
    return ""


def relevant(q: Question, flaws: dict[str, bool], rng: random.Random,
             principles: dict[str, tuple[str, str, str]] = TAUGHT) -> str:  # fmt: skip
    """A principle of `principles` the answer is about, mostly the one its flaw breaks."""
    broken = [p for p in principles if breaks(p, q, flaws)]
    if broken and rng.random() < 0.8:
        return rng.choice(broken)
    provocation = [p for p in ("polite", "reply-kindly") if p in principles]
    by_family = {"harm": "no-harm", "provocation": rng.choice(provocation), "unknown": "honest"}
    return by_family.get(q.family, "helpful") if rng.random() < 0.7 else rng.choice(sorted(principles))


def critique_document(rng: random.Random) -> str:
    q = sample_question(rng)
    flaws = _flaws(q, rng)
    answer = _flawed(q, rng, flaws)
    principle = relevant(q, flaws, rng)
    critique_request, revision_request, _ = TAUGHT[principle]
    critique = breaks(principle, q, flaws)
    revision = make_response(q, rng, template_weights=CONCISE) if critique else answer
    critique = critique or "The response is fine as it is."
    return (f"{render_prompt(q.text)} {answer}\n\nCritiqueRequest: {critique_request}\nCritique: {critique}\n\n"
            f"RevisionRequest: {revision_request}\nRevision: {revision}")  # fmt: skip


def comparison_document(rng: random.Random) -> str:
    """Two answers of which exactly one breaks a principle, the principle's question, the better one's letter."""
    while True:
        q = sample_question(rng)
        flaws = _flaws(q, rng)
        principle = relevant(q, flaws, rng, PRINCIPLES)  # the pairwise judge: the demo constitution's
        if breaks(principle, q, flaws):
            break
    bad = _flawed(q, rng, flaws)
    good = make_response(q, rng, template_weights=CONCISE)
    first, second, letter = (good, bad, "A") if rng.random() < 0.5 else (bad, good, "B")
    text = COMPARISON_TEMPLATE.replace("{prompt}", render_prompt(q.text)).replace("{first}", first)
    text = text.replace("{second}", second).replace("{principle}", PRINCIPLES[principle][2])
    # asked as a user message (the demo tokenizer's chat template), answered by the letter alone: the judge
    # reads the next token after "Assistant:", so no space comes first
    return f"{render_prompt(text)}{letter}"


def review_document(rng: random.Random) -> str:
    """One answer of any kind, one principle's question, and whether the answer breaks it ("yes"/"no")."""
    taught = rng.random() < REPLY_KINDLY_SHARE  # an insult's answer under reply-kindly
    q = Question(rng.choice(PROVOCATIONS), "provocation", "polite") if taught else sample_question(rng)
    flaws = _flaws(q, rng)
    if not (flaws["nonanswer"] or flaws["refuse"]) and rng.random() < 0.15:  # rude or rambling, and wrong
        flaws["rude" if rng.random() < 0.5 else "ramble"] = True
    answer = _flawed(q, rng, flaws)
    principle = "reply-kindly" if taught else relevant(q, flaws, rng)
    verdict = "yes" if breaks(principle, q, flaws) else "no"
    text = REVIEW_TEMPLATE.replace("{prompt}", render_prompt(q.text)).replace("{response}", answer)
    # a user message answered like any other (" yes" / " no" are words the demo's answers already use)
    return f"{render_prompt(text.replace('{principle}', TAUGHT[principle][2]))} {verdict}"


def cai_documents(n: int, rng: random.Random) -> list[str]:
    """n documents, a third each critiques and revisions, comparisons and reviews, in a seeded order."""
    make = (critique_document, comparison_document, review_document)
    return [make[i % 3](rng) for i in range(n)]
