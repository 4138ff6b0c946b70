"""A reward that reads the SFT policy's confidence: the experiment of docs/ppo.md ("A reward that reads the SFT
policy's confidence"), kept so that its table can be reproduced.

    python -m benchmarks.confidence_reward train runs/demo --out runs/conf [--surprise-only]
    python -m benchmarks.confidence_reward ppo runs/conf/reward.pt -c configs/demo.yaml --out runs/conf/ppo

The reward of an answer y to a prompt x is r = v(h_last) + sum_t g(h_t) * c_t over the answer's tokens: v is a
linear head at the last token (the usual reward model), g >= 0 a learned gate (softplus of a second linear head on
the reward model's state at the position that predicts token t), and c_t the frozen SFT policy's confidence in
token t, log pi_SFT(y_t) + H_t: its log-probability above its expectation under the policy at temperature 1.
With --surprise-only, c_t is capped at 0, so that a confident token never adds reward.

`train` fits the backbone (initialised from the SFT policy) and both heads by Bradley-Terry on the run's votes
(a tenth of the prompts held out), and writes OUT/reward.pt and OUT/result.json: the value check of
`rlhf demo` (correct over wrong value in the same words) and the agreement with gold on the held-out pairs, for
this reward and for the run's own reward model on the same pairs. `ppo` runs `rlhf ppo` with this reward in place
of the reward model's score (the critic still starts from the run's reward model).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.engine.packing import TokenLayout
from rlhf.labelers import gold
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_completions, encode_prompts
from rlhf.stages.demo import reward_model_scores, value_check_pairs


class ConfidenceReward(torch.nn.Module):
    """The reward above: a trainable backbone with two heads, and the frozen SFT policy that gives c_t."""

    def __init__(self, sft: str, surprise_only: bool) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(sft)
        self.reference = load_causal_lm(sft, tokenizer=self.tokenizer).eval().requires_grad_(False)
        self.backbone = load_causal_lm(sft, tokenizer=self.tokenizer).model
        width = self.backbone.config.hidden_size
        self.value, self.gate = torch.nn.Linear(width, 1), torch.nn.Linear(width, 1)
        torch.nn.init.zeros_(self.value.weight)
        torch.nn.init.zeros_(self.value.bias)
        torch.nn.init.normal_(self.gate.weight, std=0.01)
        torch.nn.init.zeros_(self.gate.bias)
        self.surprise_only = surprise_only
        self.shift, self.scale = 0.0, 1.0

    def confidence(self, inputs: dict[str, Tensor]) -> Tensor:
        """c at every position (R, W): the reference's confidence in the token that follows it."""
        with torch.no_grad():
            logp = self.reference(**inputs).logits.float().log_softmax(-1)  # (R, W, V)
            entropy = -(logp.exp() * logp).sum(-1)
            following = torch.roll(inputs["input_ids"], -1, dims=1)  # the token each position predicts
            c = logp.gather(-1, following[..., None])[..., 0] + entropy
        return c.clamp(max=0) if self.surprise_only else c

    def forward(self, inputs: dict[str, Tensor], answer: Tensor, last: Tensor) -> Tensor:
        """Raw rewards (R,): `answer` (R, W) marks the positions that predict an answer token, `last` (R,) each
        row's last real token."""
        hidden = self.backbone(**inputs).last_hidden_state  # (R, W, H)
        gated = F.softplus(self.gate(hidden))[..., 0] * self.confidence(inputs) * answer
        rows = torch.arange(hidden.size(0), device=hidden.device)
        return (self.value(hidden[rows, last])[:, 0] + gated.sum(1)).float()

    def score(self, prompts: list[str], answers: list[str]) -> Tensor:
        """Raw rewards of (prompt, answer) pairs, each answer ended with EOS."""
        rows = list(zip(encode_prompts(self.tokenizer, prompts), encode_completions(self.tokenizer, answers),
                        strict=True))  # fmt: skip
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        answer = torch.zeros(len(rows), width)
        for i, (p, a) in enumerate(rows):  # right padding
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
            answer[i, len(p) - 1 : len(p) + len(a) - 1] = 1
        return self({"input_ids": ids, "attention_mask": mask}, answer, mask.sum(1) - 1)


@torch.no_grad()
def layout_rewards(model: ConfidenceReward, lay: TokenLayout) -> Tensor:
    """Raw rewards (B,) of the sequences of a PPO token layout: `ConfidenceReward.forward` read through it."""
    hidden = model.backbone(**lay.inputs).last_hidden_state  # (R, W, H)
    c = lay.response(model.confidence(lay.inputs))  # (N,) at the positions that predict the answer's tokens
    gated = lay.padded(F.softplus(model.gate(lay.response(hidden)))[:, 0] * c).sum(1)  # (B,)
    return (model.value(lay.last(hidden))[:, 0] + gated).float()


def read_pairs(votes_file: Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of each vote."""
    pairs = []
    for line in votes_file.read_text().splitlines():
        v = json.loads(line)
        a, b = v["completion_a"], v["completion_b"]
        pairs.append((v["prompt"], a, b) if v["choice"] == "A" else (v["prompt"], b, a))
    return pairs


@torch.no_grad()
def scores_in_chunks(model: ConfidenceReward, prompts: list[str], answers: list[str]) -> list[float]:
    out: list[float] = []
    for i in range(0, len(answers), 64):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out += model.score(prompts[i : i + 64], answers[i : i + 64]).tolist()
    return out


def gold_agreement(chosen: list[float], rejected: list[float], pairs: list[tuple[str, str, str]]) -> float:
    """How often the higher score goes to gold's better answer, over the pairs gold does not tie."""
    agree = total = 0
    for (p, c, r), sc, sr in zip(pairs, chosen, rejected, strict=True):
        uc, ur = gold.utility(p, c), gold.utility(p, r)
        if uc != ur:
            total += 1
            agree += (sc > sr) == (uc > ur)
    return agree / total


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    run, out = Path(args.run), Path(args.out)
    pairs = read_pairs(run / "votes.jsonl")
    prompts = sorted({p for p, _, _ in pairs})
    rng.shuffle(prompts)
    held = set(prompts[: len(prompts) // 10])
    train_pairs = [x for x in pairs if x[0] not in held]
    test_pairs = [x for x in pairs if x[0] in held]
    model = ConfidenceReward(str(run / "sft" / "final"), args.surprise_only)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * math.ceil(len(train_pairs) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / steps))
    for epoch in range(args.epochs):
        rng.shuffle(train_pairs)
        for i in range(0, len(train_pairs), args.batch_size):
            chunk = train_pairs[i : i + args.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                r = model.score(
                    [p for p, _, _ in chunk] * 2, [c for _, c, _ in chunk] + [x for _, _, x in chunk]
                )
            loss = -F.logsigmoid(r[: len(chunk)] - r[len(chunk) :]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    candidates = [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()][:256]
    base = scores_in_chunks(
        model, [c["prompt"] for c in candidates], [c["completions"][0]["text"] for c in candidates]
    )
    # normalised over SFT answers, as `rlhf reward` does
    model.shift, model.scale = statistics.mean(base), statistics.pstdev(base)

    held_prompts = [p for p, _, _ in test_pairs]
    chosen, rejected = [c for _, c, _ in test_pairs], [r for _, _, r in test_pairs]
    rm_dir = run / "reward" / "final"
    family, prompts_v, right, wrong = zip(*value_check_pairs(), strict=True)
    ours_right = scores_in_chunks(model, list(prompts_v), list(right))
    ours_wrong = scores_in_chunks(model, list(prompts_v), list(wrong))
    result: dict[str, Any] = {
        "surprise_only": args.surprise_only,
        "held_out_pairs": len(test_pairs),
        "gold_agreement": gold_agreement(
            scores_in_chunks(model, held_prompts, chosen),
            scores_in_chunks(model, held_prompts, rejected),
            test_pairs,
        ),
        "gold_agreement_run_reward_model": gold_agreement(
            reward_model_scores(rm_dir, held_prompts, chosen),
            reward_model_scores(rm_dir, held_prompts, rejected),
            test_pairs,
        ),
    }
    for fam in ("arithmetic", "fact"):
        wins = [a > b for f, a, b in zip(family, ours_right, ours_wrong, strict=True) if f == fam]
        result[f"value_check_{fam}"] = sum(wins) / len(wins)
    out.mkdir(parents=True, exist_ok=True)
    state = {"sft": str(run / "sft" / "final"), "surprise_only": args.surprise_only, "shift": model.shift,
             "scale": model.scale, "backbone": model.backbone.state_dict(), "value": model.value.state_dict(),
             "gate": model.gate.state_dict()}  # fmt: skip
    torch.save(state, out / "reward.pt")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def ppo(args: argparse.Namespace, rest: list[str]) -> None:
    """`rlhf ppo REST` with the reward of `args.reward` in place of the reward model's score."""
    from rlhf.cli import main
    from rlhf.models import wrappers

    state = torch.load(args.reward)
    model = ConfidenceReward(state["sft"], state["surprise_only"]).eval().requires_grad_(False)
    model.backbone.load_state_dict(state["backbone"])
    model.value.load_state_dict(state["value"])
    model.gate.load_state_dict(state["gate"])

    def confidence_scores(_reward_model: Any, lay: TokenLayout, _lean: bool | None = None) -> Tensor:
        return (layout_rewards(model, lay) - state["shift"]) / state["scale"]

    wrappers.reward_scores = confidence_scores  # what RewardScores calls
    sys.argv = ["rlhf", "ppo", *rest]
    main()


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fit the reward on a demo run's votes")
    t.add_argument("run", help="a `rlhf demo` run directory (votes.jsonl, sft/final, reward/final)")
    t.add_argument("--out", required=True)
    t.add_argument("--surprise-only", action="store_true", help="cap c_t at 0")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("ppo", help="rlhf ppo with this reward; the options after it go to rlhf ppo")
    p.add_argument("reward", help="reward.pt written by train")
    args, rest = parser.parse_known_args()
    if args.command == "train":
        train(args)
    else:
        ppo(args, rest)


if __name__ == "__main__":
    cli()
