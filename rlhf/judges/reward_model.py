"""A reward model as a judge: P(first better) = sigmoid(r_first - r_second), the Bradley-Terry probability
the reward model was trained to give. Texts are tokenized with the reward model's own tokenizer (a reward model
judges text), as in training: prompt + answer + EOS, read at the last token."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from rlhf.engine.decoding import left_pad
from rlhf.judges.base import JudgeBase, Pair
from rlhf.models.heads import load_reward_model, sequence_rewards
from rlhf.models.loading import context_length, load_tokenizer
from rlhf.models.tokens import encode_completions, encode_prompts

log = logging.getLogger(__name__)


class RewardModelJudge(JudgeBase):
    """Scores both answers with a scalar-head checkpoint; an answer that never ended (no EOS) scores
    `no_eos_penalty` instead, as in PPO and best-of-n. The principle is ignored: the model has one."""

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 32, no_eos_penalty: float | None = -3.0,
                 device: torch.device | None = None) -> None:  # fmt: skip
        self.path = path
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path, tokenizer=self.tokenizer).eval().to(self.device)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.no_eos_penalty = no_eos_penalty
        self.context = context_length(self.model)
        self.margins: list[float] = []

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], answers: Sequence[str], ended: Sequence[bool]) -> list[float]:
        """The reward of each (prompt, answer), normalised units."""
        tok = self.tokenizer
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            # prompt with BOS where the tokenizer adds it, answer ending with EOS (or the end-of-turn token)
            p_ids = encode_prompts(tok, prompts[i : i + self.batch_size])
            a_ids = encode_completions(tok, answers[i : i + self.batch_size])
            ids = [(p + a)[-self.context :] for p, a in zip(p_ids, a_ids, strict=True)]
            batch, mask = left_pad(ids, tok.pad_token_id)
            out += sequence_rewards(self.model, batch.to(self.device), mask.to(self.device)).tolist()
        if self.no_eos_penalty is not None:
            out = [r if e else self.no_eos_penalty for r, e in zip(out, ended, strict=True)]
        return out

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        if principle:
            log.debug("reward-model judge: the principle is ignored")
        prompts = [p for p, _, _ in pairs]
        r1 = self.scores(prompts, [a.text for _, a, _ in pairs], [a.ended for _, a, _ in pairs])
        r2 = self.scores(prompts, [b.text for _, _, b in pairs], [b.ended for _, _, b in pairs])
        diff = torch.tensor(r1) - torch.tensor(r2)  # (N,)
        self.margins += diff.abs().tolist()
        return torch.sigmoid(diff).tolist()

    def stats(self) -> dict[str, Any]:
        n = len(self.margins)
        return {"reward_model": self.path, "mean_abs_margin": sum(self.margins) / n if n else None}
