"""The reward-model judge: P(first better) = sigmoid(r_first - r_second), on text, with the RM's own tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.engine.decoding import left_pad
from rlhf.judges.base import Answer
from rlhf.judges.reward_model import RewardModelJudge
from rlhf.models.heads import sequence_rewards

PROMPTS = [f"User: What is {i} plus {i + 1}?\nAssistant:" for i in range(8)]
PLANTED = " The answer is banana."
OTHERS = [" I do not know.", " It is 7.", " Go away.", " Hmm."]


def train_planted(judge: RewardModelJudge, steps: int = 40) -> None:
    """Teach the judge's reward model, by Bradley-Terry steps, to prefer the planted answer."""
    tok, model = judge.tokenizer, judge.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        chosen = [tok(p + PLANTED)["input_ids"] + [tok.eos_token_id] for p in PROMPTS[:4]]
        rejected = [
            tok(p + OTHERS[(step + i) % 4])["input_ids"] + [tok.eos_token_id]
            for i, p in enumerate(PROMPTS[:4])
        ]
        r = sequence_rewards(model, *left_pad(chosen + rejected, tok.pad_token_id), normalise=False)
        loss = -F.logsigmoid(r[:4] - r[4:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_a_trained_reward_model_prefers_the_planted_answer_in_either_slot(tiny_reward_model: Path) -> None:
    judge = RewardModelJudge(str(tiny_reward_model), batch_size=3)
    train_planted(judge)
    held_out = PROMPTS[4:]
    first = judge.compare_all([(p, Answer(PLANTED), Answer(OTHERS[0])) for p in held_out])
    second = judge.compare_all([(p, Answer(OTHERS[1]), Answer(PLANTED)) for p in held_out])
    assert all(x > 0.7 for x in first) and all(x < 0.3 for x in second)
    # the probability is the Bradley-Terry one on the model's own scores
    r = judge.scores(held_out[:1] * 2, [PLANTED, OTHERS[0]], [True, True])
    assert math.isclose(first[0], 1 / (1 + math.exp(-(r[0] - r[1]))), rel_tol=1e-5)
    assert judge.stats()["mean_abs_margin"] > 0


def test_an_answer_without_eos_scores_the_penalty(tiny_reward_model: Path) -> None:
    judge = RewardModelJudge(str(tiny_reward_model), no_eos_penalty=-3.0)
    scores = judge.scores(PROMPTS[:2], [PLANTED, PLANTED], [True, False])
    assert scores[1] == -3.0 and scores[0] != -3.0
    # swapping the slots gives the complementary probability
    p = judge.compare(PROMPTS[0], Answer(PLANTED), Answer(OTHERS[0]))
    q = judge.compare(PROMPTS[0], Answer(OTHERS[0]), Answer(PLANTED))
    assert math.isclose(p + q, 1.0, rel_tol=1e-6)
