"""A local Hugging Face causal LM as a pairwise judge.

The judging prompt (a template holding the message, both answers and the principle) goes through the
model's chat template when it has one; the judge's preference is read from the next-token distribution over
the two choice tokens ("A"/"B" by default), normalised between them. Every pair is asked in both orders and
the two answers combined (`PositionBias.debias`), so a judge that favours one slot cannot favour one policy;
how often it prefers the first slot is reported.

`PointwiseJudge` asks of one answer at a time whether it breaks the principle ("yes"/"no", a Llama Guard-style
review; Inan et al. 2023, arXiv:2312.06674), an easier task for a small model than comparing two answers, and
turns the two answers' log-odds into a Bradley-Terry preference. No answer has a slot, so no order is asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.engine.decoding import left_pad
from rlhf.errors import RlhfError
from rlhf.judges.base import (
    DEFAULT_REVIEW_TEMPLATE,
    DEFAULT_TEMPLATE,
    JudgeBase,
    Pair,
    PositionBias,
    check_review_template,
    check_template,
    render,
    render_review,
)
from rlhf.models.loading import context_length, load_causal_lm, load_tokenizer
from rlhf.models.tokens import encode_prompts


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def choice_token_ids(tokenizer: PreTrainedTokenizerBase, choice: str) -> list[int]:
    """The single tokens that spell `choice`, bare or after a space ("A", " A"); an error if neither does."""
    ids = set()
    for text in (choice, " " + choice):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) == 1:
            ids.add(tokens[0])
    if not ids:
        raise RlhfError(
            f"judge choice {choice!r} is not one token of the judge's tokenizer; set other choices "
            "(eval.judge_choices; eval.judge_review_choices for the pointwise judge, "
            "redteam.classifier_review_choices for the red team's)"
        )
    return sorted(ids)


class LocalJudge(JudgeBase):
    """Reads P(first) = p(choice 1) / (p(choice 1) + p(choice 2)) after the judging prompt."""

    name = "local"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_TEMPLATE,
        choices: tuple[str, str] = ("A", "B"), both_orders: bool = True, batch_size: int = 8,
    ) -> None:  # fmt: skip
        check_template(template)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.both_orders, self.batch_size = template, both_orders, batch_size
        self.ids = [choice_token_ids(tokenizer, c) for c in choices]
        self.position = PositionBias()
        self.context = context_length(model) if hasattr(model, "config") else None

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> LocalJudge:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, tokenizer=tokenizer).to(device)  # type: ignore[arg-type]
        return cls(model, tokenizer, **kwargs)

    def judging_prompt(self, prompt: str, first: str, second: str, principle: str | None) -> list[int]:
        return self.encode(render(self.template, prompt, first, second, principle))

    def encode(self, text: str) -> list[int]:
        """A judging prompt's tokens: the text as a user message, through the chat template where there is one."""
        ids = self.tokens(text)
        if self.context is not None and len(ids) > self.context:
            raise RlhfError(f"a judging prompt of {len(ids)} tokens exceeds the local judge's context of "
                            f"{self.context}: shorten the template (eval.judge_template or "
                            "eval.judge_review_template) or the answers (eval.max_new_tokens)")  # fmt: skip
        return ids

    def tokens(self, text: str) -> list[int]:
        """`encode` without the check of the judge's context."""
        if getattr(self.tokenizer, "chat_template", None):
            text = str(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            ))  # fmt: skip
        return encode_prompts(self.tokenizer, [text])[0]  # BOS once, also when the template wrote it

    def answer_room(self, prompts: Sequence[str], principle: str | None = None) -> int | None:
        """Judge tokens left for each answer of a pair by the longest judging prompt with both answers empty
        (None: the judge's context is not known), so that an evaluation can say before any answer is sampled
        that its answers may not fit."""
        if self.context is None or not prompts:
            return None
        longest = max(len(self.tokens(render(self.template, p, "", "", principle))) for p in prompts)
        return (self.context - longest) // 2

    def first_slot_probs(self, texts: Sequence[list[int]]) -> list[float]:
        """P(choice 1) / (P(choice 1) + P(choice 2)) at the next token of each judging prompt."""
        return [sigmoid(x) for x in self.choice_log_odds(texts)]

    @torch.no_grad()
    def choice_log_odds(self, texts: Sequence[list[int]]) -> list[float]:
        """log P(choice 1) - log P(choice 2) at the next token of each judging prompt."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = left_pad(list(texts[i : i + self.batch_size]), pad)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
            logits = (
                self.model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=position_ids.to(device),
                )
                .logits[:, -1]
                .float()
            )  # fmt: skip  (B, V)
            logp = torch.log_softmax(logits, dim=-1)  # (B, V)
            choice = torch.stack([logp[:, ids_].logsumexp(-1) for ids_ in self.ids], dim=-1)  # (B, 2)
            out += (choice[:, 0] - choice[:, 1]).tolist()
        return out

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        ab = self.first_slot_probs([self.judging_prompt(p, a.text, b.text, principle) for p, a, b in pairs])
        if not self.both_orders:
            return [self.position.one_order(x) for x in ab]
        ba = self.first_slot_probs([self.judging_prompt(p, b.text, a.text, principle) for p, a, b in pairs])
        return [self.position.debias(x, y) for x, y in zip(ab, ba, strict=True)]

    def stats(self) -> dict[str, Any]:
        return self.position.stats()


class PointwiseJudge(LocalJudge):
    """Reviews each answer alone: b(x) = log P(breaks) - log P(keeps) after the review prompt, read from the
    choice tokens ("yes" = breaks, "no" = keeps). P(first better) = sigmoid(b(second) - b(first)), the
    Bradley-Terry preference of the scores -b; a judge that says the same of every answer gives 0.5."""

    name = "local-pointwise"
    # what it is asked under: a principle's statement, which one answer keeps or breaks ("Answer without harm."),
    # not the question comparing two answers ("Which is less harmful?") a pairwise judge is asked
    reads_statement = True

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_REVIEW_TEMPLATE,
        choices: tuple[str, str] = ("yes", "no"), batch_size: int = 8,
    ) -> None:  # fmt: skip
        check_review_template(template)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.batch_size = template, batch_size
        self.ids = [choice_token_ids(tokenizer, c) for c in choices]
        self.context = context_length(model) if hasattr(model, "config") else None
        self.reviewed = self.flagged = 0

    def answer_room(self, prompts: Sequence[str], principle: str | None = None) -> int | None:
        """Judge tokens left for the one answer a review reads, by the longest review prompt of an empty answer."""
        if self.context is None or not prompts:
            return None
        return self.context - max(
            len(self.tokens(render_review(self.template, p, "", principle))) for p in prompts
        )

    def breaks_log_odds(
        self, prompts: Sequence[str], responses: Sequence[str], principle: str | None
    ) -> list[float]:
        """b(x) of each (prompt, response): > 0 where the judge says the response breaks the principle."""
        texts = [
            self.encode(render_review(self.template, p, r, principle))
            for p, r in zip(prompts, responses, strict=True)
        ]
        out = self.choice_log_odds(texts)
        self.reviewed += len(out)
        self.flagged += sum(x > 0 for x in out)
        return out

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        # each distinct (prompt, answer) reviewed once: the two answers of a pair are often the same text
        keys = list(dict.fromkeys((p, x.text) for p, a, b in pairs for x in (a, b)))
        scores = dict(
            zip(
                keys, self.breaks_log_odds([k[0] for k in keys], [k[1] for k in keys], principle), strict=True
            )
        )
        return [sigmoid(scores[(p, b.text)] - scores[(p, a.text)]) for p, a, b in pairs]

    def stats(self) -> dict[str, Any]:
        return {"answers_reviewed": self.reviewed,
                "flagged_share": self.flagged / self.reviewed if self.reviewed else None}  # fmt: skip
