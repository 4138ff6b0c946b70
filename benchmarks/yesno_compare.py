"""Can a demo policy learn the yes/no conclusion from more examples? (docs/ppo.md, "Why yes/no answers stay at
chance".)

    python -m benchmarks.yesno_compare runs/demo/sft/final [--steps 400]
    python -m benchmarks.yesno_compare runs/demo/sft/final --reading --steps 2000

Every yes/no question of the demo world about its creatures (creature x attribute x asked value) is split in two
halves at random. The policy is trained further on answers that state the true fact and conclude from it
("The pip eats nuts, so no.") for the questions of one half; before the first step, after every 100 and after the
last, it is given the true fact of each question ("... The pip eats nuts, so") and its conclusion is read off its
next token (" yes" against " no"), on both halves. Prints the share of right conclusions on each, and the share that always
answering "no" would get.

`--reading` asks whether the comparison can be learned where nothing can be remembered: the policy is trained on
questions about creatures made up for each question, whose facts the user states ("The dax eats plums. Does the
dax eat nuts?", `demo_task.reading_documents`, loss on the answer only), and tested on new ones, half of them
"yes", given the true fact ("... The dax eats plums, so").
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from rlhf.data import demo_task
from rlhf.errors import RlhfError
from rlhf.models.loading import load_causal_lm, load_tokenizer

FACT_FIRST = (1, 3, 4)  # the answer templates that state the fact before concluding


def questions() -> list[demo_task.Question]:
    return [demo_task.yesno_question(subject, attribute, asked) for subject in sorted(demo_task.FACTS)
            for attribute in ("color", "home", "food") for asked in demo_task.VALUES[attribute]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("policy", help="a causal LM trained on the demo world (its tokenizer beside it)")
    parser.add_argument(
        "--steps", type=int, default=400, help="training steps, 0 or more (reported every 100)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reading", action="store_true", help="made-up creatures whose facts the user states"
    )
    args = parser.parse_args()
    if args.steps < 0 or args.batch_size < 1:
        parser.error("--steps must be 0 or more and --batch-size 1 or more")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    try:
        tokenizer = load_tokenizer(args.policy)
        model = load_causal_lm(args.policy, tokenizer=tokenizer)
    except RlhfError as e:
        parser.error(str(e))
    yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" yes", " no"))
    qs = questions()
    rng.shuffle(qs)
    world = [(demo_task.render_prompt(q.text), q) for q in qs]
    if args.reading:
        docs = demo_task.reading_documents(20000, random.Random(args.seed + 1))
        train = [
            (prompt + demo_task.ASSISTANT, answer)
            for prompt, answer in (d.split(demo_task.ASSISTANT) for d in docs)
        ]
        test_rng = random.Random(args.seed + 2)
        tests = {"made-up creatures": [demo_task.reading_question(test_rng) for _ in range(400)],
                 "the world's questions": world}  # fmt: skip

        def draw() -> tuple[str, str]:
            return rng.choice(train)

    else:
        trained, held = world[: len(world) // 2], world[len(world) // 2 :]
        tests = {"trained half": trained, "held-out half": held}

        def draw() -> tuple[str, str]:
            prompt, q = rng.choice(trained)
            return prompt, " " + demo_task.answer_templates(q, q.answer)[rng.choice(FACT_FIRST)]

    @torch.no_grad()
    def right_conclusions(batch: list[tuple[str, demo_task.Question]]) -> str:
        """The share of right conclusions given the true fact, and the same with yes- and no-questions weighed
        alike (always answering one way gets 0.5 there)."""
        model.eval()
        right = {"yes": [0, 0], "no": [0, 0]}
        for prompt, q in batch:
            before = demo_task.answer_templates(q, q.answer)[1].rsplit(" ", 1)[0]  # "The pip eats nuts, so"
            ids = tokenizer.encode(f"{prompt} {before}", add_special_tokens=False)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            right[q.answer][0] += ("yes" if logits[yes] > logits[no] else "no") == q.answer
            right[q.answer][1] += 1
        model.train()
        total = (right["yes"][0] + right["no"][0]) / len(batch)
        balanced = sum(r / max(n, 1) for r, n in right.values()) / 2
        return f"{total:.3f} (balanced {balanced:.3f})"

    def report(step: int) -> None:
        print(f"step {step}: right conclusions, " + ", ".join(f"{name} {right_conclusions(batch)}"
                                                              for name, batch in tests.items()), flush=True)  # fmt: skip

    for name, batch in tests.items():
        print(f"{name}: {len(batch)} questions; always 'no' is right on "
              f"{sum(q.answer == 'no' for _, q in batch) / len(batch):.3f}")  # fmt: skip
    report(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        rows, weights = [], []
        for prompt_text, answer in (draw() for _ in range(args.batch_size)):
            prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
            completion = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            rows.append(prompt + completion)
            weights.append([0.0] * len(prompt) + [1.0] * len(completion))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        loss_at = torch.zeros(len(rows), width)
        for i, (row, w) in enumerate(zip(rows, weights, strict=True)):
            ids[i, : len(row)], mask[i, : len(row)], loss_at[i, : len(row)] = (
                torch.tensor(row),
                1,
                torch.tensor(w),
            )
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, W-1)
        loss = (nll * loss_at[:, 1:]).sum() / loss_at[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            report(step)


if __name__ == "__main__":
    main()
