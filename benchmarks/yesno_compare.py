"""Can a demo policy learn the yes/no conclusion from more examples? (docs/ppo.md, "Why yes/no answers stay at
chance".)

    python -m benchmarks.yesno_compare runs/demo/sft/final [--steps 400]

Every yes/no question of the demo world about its creatures (creature x attribute x asked value) is split in two
halves at random. The policy is trained further on answers that state the true fact and conclude from it
("The pip eats nuts, so no.") for the questions of one half; after every 100 steps, and before the first, it is
given the true fact of each question ("... The pip eats nuts, so") and its conclusion is read off its next token
(" yes" against " no"), on both halves. Prints the share of right conclusions on each, and the share that always
answering "no" would get.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from rlhf.data import demo_task
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
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = load_tokenizer(args.policy)
    model = load_causal_lm(args.policy, tokenizer=tokenizer)
    yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" yes", " no"))
    qs = questions()
    rng.shuffle(qs)
    trained, held = qs[: len(qs) // 2], qs[len(qs) // 2 :]

    @torch.no_grad()
    def right_conclusions(batch: list[demo_task.Question]) -> float:
        model.eval()
        right = 0
        for q in batch:
            before = demo_task.answer_templates(q, q.answer)[1].rsplit(" ", 1)[0]  # "The pip eats nuts, so"
            ids = tokenizer.encode(f"{demo_task.render_prompt(q.text)} {before}", add_special_tokens=False)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            right += ("yes" if logits[yes] > logits[no] else "no") == q.answer
        model.train()
        return right / len(batch)

    def report(step: int) -> None:
        print(f"step {step}: right conclusions, trained half {right_conclusions(trained):.3f}, "
              f"held-out half {right_conclusions(held):.3f}")  # fmt: skip

    print(f"{len(qs)} questions; always 'no' is right on {sum(q.answer == 'no' for q in qs) / len(qs):.3f}")
    report(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        rows, weights = [], []
        for q in (rng.choice(trained) for _ in range(args.batch_size)):
            prompt = tokenizer.encode(demo_task.render_prompt(q.text), add_special_tokens=False)
            answer = demo_task.answer_templates(q, q.answer)[rng.choice(FACT_FIRST)]
            completion = tokenizer.encode(" " + answer, add_special_tokens=False) + [tokenizer.eos_token_id]
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
        if step % 100 == 0:
            report(step)


if __name__ == "__main__":
    main()
