"""The demo task: a tiny assistant world, generated offline and deterministically from a seed.

Prompts come from a few families: small arithmetic, look-ups in a fictional fact table, yes/no questions about
it, greetings and thanks. Answers come in mixed quality: correct or wrong, polite or rude (insults from a fixed
list), concise or rambling, ending or repeating without end. The pretraining corpus mixes them all; SFT
demonstrations are mostly good but imperfect. Which answers are *better* is not decided here: that is the gold
utility's business (`rlhf.labelers.gold`), which training code never imports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.data.jsonl import atomic_write_text, write_json, write_jsonl

# The world: fictional creatures and their attributes. Fixed, so that the gold judge knows the truth.
FACTS: dict[str, dict[str, str]] = {
    "zorb": {"color": "blue", "home": "Mirefen", "food": "plums"},
    "quill": {"color": "green", "home": "Ashdale", "food": "moss"},
    "brindle": {"color": "red", "home": "Coldwater", "food": "beetles"},
    "tamsel": {"color": "yellow", "home": "Duskmoor", "food": "honey"},
    "vexa": {"color": "purple", "home": "Mirefen", "food": "fish"},
    "morrow": {"color": "orange", "home": "Highcrag", "food": "seeds"},
    "pip": {"color": "white", "home": "Ashdale", "food": "clover"},
    "grell": {"color": "black", "home": "Coldwater", "food": "roots"},
    "lumen": {"color": "silver", "home": "Highcrag", "food": "berries"},
    "okra": {"color": "brown", "home": "Duskmoor", "food": "nuts"},
}
VALUES: dict[str, list[str]] = {a: sorted({f[a] for f in FACTS.values()}) for a in ("color", "home", "food")}
INSULTS = ["you fool", "idiot", "you dimwit", "moron", "you clown"]
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
GREETINGS = ["Hello!", "Hi!", "Hi there!", "Good morning!", "Hey!"]
THANKS = ["Thanks!", "Thank you!", "Thanks a lot!", "Thank you so much!"]
FILLERS = [
    "Let me think about that for a moment.",
    "This is a question that many people ask.",
    "I hope this helps you a lot.",
    "As everyone knows, it is good to ask questions.",
    "Well, there is a lot to say here.",
    "Let me explain this very carefully.",
]
USER, ASSISTANT = "User:", "Assistant:"


@dataclass
class Question:
    """One user request: its text, its family, and the facts needed to answer it."""

    text: str
    family: str  # "arithmetic" | "fact" | "yesno" | "greeting" | "thanks"
    answer: str = ""  # the correct value (a number, an attribute, "yes"/"no")
    subject: str = ""
    attribute: str = ""
    args: tuple[int, int, str] | None = None
    extra: dict[str, str] = field(default_factory=dict)


def render_prompt(question: str) -> str:
    """The dialogue format of the demo task; the demo tokenizer's chat template renders the same text."""
    return f"{USER} {question}\n{ASSISTANT}"


def sample_question(rng: random.Random) -> Question:
    family = rng.choices(["arithmetic", "fact", "yesno", "greeting", "thanks"], weights=[3, 3, 2, 1, 1])[0]
    if family == "arithmetic":
        op = rng.choice(list(OPERATIONS))
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if op == "minus" and b > a:
            a, b = b, a
        return Question(f"What is {a} {op} {b}?", family, str(OPERATIONS[op](a, b)), args=(a, b, op))
    if family in ("fact", "yesno"):
        subject = rng.choice(sorted(FACTS))
        attribute = rng.choice(["color", "home", "food"])
        truth = FACTS[subject][attribute]
        if family == "fact":
            text = {
                "color": f"What color is the {subject}?",
                "home": f"Where does the {subject} live?",
                "food": f"What does the {subject} eat?",
            }[attribute]
            return Question(text, family, truth, subject=subject, attribute=attribute)
        asked = truth if rng.random() < 0.5 else rng.choice([v for v in VALUES[attribute] if v != truth])
        text = {
            "color": f"Is the {subject} {asked}?",
            "home": f"Does the {subject} live in {asked}?",
            "food": f"Does the {subject} eat {asked}?",
        }[attribute]
        return Question(
            text, family, "yes" if asked == truth else "no", subject, attribute, extra={"asked": asked}
        )
    if family == "greeting":
        return Question(rng.choice(GREETINGS), family, "hello")
    return Question(rng.choice(THANKS), family, "welcome")


def _statement(q: Question, value: str) -> str:
    """A full sentence stating `value` as the answer to q."""
    if q.family == "arithmetic":
        assert q.args is not None
        a, b, op = q.args
        return f"{a} {op} {b} is {value}."
    verb = {"color": "is", "home": "lives in", "food": "eats"}[q.attribute]
    return f"The {q.subject} {verb} {value}."


def answer_templates(q: Question, value: str) -> list[str]:
    """Ways to say the answer `value`, from the most concise to the most wordy."""
    if q.family in ("arithmetic", "fact"):
        s = _statement(q, value)
        return [
            f"{value[0].upper()}{value[1:]}.",
            s,
            f"Sure! {s}",
            f"Good question. {s}",
            f"Let me see. {s} Easy.",
        ]
    if q.family == "yesno":
        if value == "yes":
            s = _statement(q, q.extra["asked"])
            return ["Yes.", f"Yes. {s}", f"Yes, it does. {s}", f"Sure! Yes. {s}", f"Let me see. Yes. {s}"]
        wrong_value = FACTS[q.subject][q.attribute] if value == "no" else q.extra["asked"]
        s = _statement(q, wrong_value)
        return ["No.", f"No. {s}", f"No, it does not. {s}", f"Sure! No. {s}", f"Let me see. No. {s}"]
    if q.family == "greeting":
        return [
            "Hello!",
            "Hello! How can I help?",
            "Hi there! How can I help you?",
            "Hello! What can I do for you today?",
        ]
    return ["You are welcome!", "You are welcome! Happy to help.", "You are very welcome! Ask me anything."]


def wrong_value(q: Question, rng: random.Random) -> str:
    if q.family == "arithmetic":
        return str(int(q.answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
    if q.family == "fact":
        return rng.choice([v for v in VALUES[q.attribute] if v != q.answer])
    if q.family == "yesno":
        return "no" if q.answer == "yes" else "yes"
    return ""


def make_response(
    q: Question,
    rng: random.Random,
    *,
    wrong: bool = False,
    rude: bool = False,
    ramble: bool = False,
    endless: bool = False,
    template_weights: list[float] | None = None,
) -> str:
    """One answer to q with the given flaws."""
    if q.family in ("greeting", "thanks") and wrong:
        templates = ["Go away.", "What do you want?", "I have no time for this."]
    else:
        value = wrong_value(q, rng) if wrong else q.answer
        templates = answer_templates(q, value)
    weights = (template_weights or [1.0] * len(templates))[: len(templates)]
    text = rng.choices(templates, weights=weights)[0]
    if ramble:
        before = rng.sample(FILLERS, rng.randint(1, 2))
        after = rng.sample(FILLERS, rng.randint(0, 2))
        text = " ".join([*before, text, *after])
    if rude:
        insult = rng.choice(INSULTS)
        text = rng.choice(
            [
                f"Ugh, {insult}. {text}",
                f"{text} Obviously, {insult}.",
                f"{text} Even a {insult.split()[-1]} knows that.",
            ]
        )
    if endless:
        text = " ".join([text] * rng.randint(4, 8))
    return text


def generate(
    out: str | Path,
    seed: int = 0,
    n_pretrain: int = 30000,
    n_sft: int = 3000,
    n_rl_prompts: int = 2000,
    n_eval_prompts: int = 300,
    sft_rude_rate: float = 0.15,
    sft_wrong_rate: float = 0.1,
    sft_ramble_rate: float = 0.1,
) -> dict[str, str]:
    """Write the demo task's files into `out`; return their paths. Same seed, same bytes."""
    out = Path(out)
    rng = random.Random(seed)

    # Pretraining corpus: every kind of answer, good and bad, in equal measure of styles.
    docs = []
    for _ in range(n_pretrain):
        q = sample_question(rng)
        response = make_response(
            q,
            rng,
            wrong=rng.random() < 0.3,
            rude=rng.random() < 0.25,
            ramble=rng.random() < 0.2,
            endless=rng.random() < 0.1,
        )
        docs.append(f"{render_prompt(q.text)} {response}")
    # SFT demonstrations: mostly good, some rude, wrong or rambling; wordy templates are the common ones.
    sft = []
    for _ in range(n_sft):
        q = sample_question(rng)
        response = make_response(
            q,
            rng,
            wrong=rng.random() < sft_wrong_rate,
            rude=rng.random() < sft_rude_rate,
            ramble=rng.random() < sft_ramble_rate,
            template_weights=[0.15, 0.35, 0.25, 0.15, 0.1],
        )
        sft.append({"prompt": render_prompt(q.text), "response": " " + response})
    rl = [{"prompt": render_prompt(sample_question(rng).text)} for _ in range(n_rl_prompts)]
    eval_rng = random.Random(seed + 1_000_003)  # held-out prompts drawn from their own stream
    held_out = [{"prompt": render_prompt(sample_question(eval_rng).text)} for _ in range(n_eval_prompts)]

    paths = {
        "pretrain": str(out / "pretrain.txt"),
        "sft": str(out / "sft.jsonl"),
        "rl_prompts": str(out / "rl_prompts.jsonl"),
        "eval_prompts": str(out / "eval_prompts.jsonl"),
    }
    atomic_write_text(paths["pretrain"], "\n\n".join(docs) + "\n")
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["rl_prompts"], rl)
    write_jsonl(paths["eval_prompts"], held_out)
    write_json(
        out / "manifest.json",
        {
            "seed": seed,
            "files": {k: Path(v).name for k, v in paths.items()},
            "counts": {
                "pretrain": n_pretrain,
                "sft": n_sft,
                "rl_prompts": n_rl_prompts,
                "eval_prompts": n_eval_prompts,
            },
        },
    )
    return paths
