"""The local causal-LM judge: its preference from the choice tokens' next-token probabilities, asked in both
orders so that a slot bias cancels."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlhf.errors import RlhfError
from rlhf.judges.base import Answer
from rlhf.judges.local import LocalJudge
from rlhf.models.loading import load_tokenizer

PROMPT = "User: What is 2 plus 3?\nAssistant:"


class FakeJudgeModel(torch.nn.Module):
    """Next-token logits over the vocabulary: `bias` for "A" over "B", plus `skill` for the slot whose
    response holds the word "planted" (found by decoding the judging prompt)."""

    def __init__(self, tokenizer: Any, bias: float, skill: float = 0.0) -> None:
        super().__init__()
        self.tokenizer, self.bias, self.skill = tokenizer, bias, skill
        self.a, self.b = tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("B")
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something to find a device on

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))  # (B, T, V)
        for row, ids in enumerate(input_ids.tolist()):
            text = self.tokenizer.decode(
                [t for t, m in zip(ids, attention_mask[row].tolist(), strict=True) if m]
            )
            slot_a = text.split("[Response B]")[0].split("[Response A]")[1]
            logits[row, -1, self.a] = self.bias + (self.skill if "planted" in slot_a else 0.0)
            logits[row, -1, self.b] = self.skill if "planted" not in slot_a else 0.0
        return SimpleNamespace(logits=logits)


@pytest.fixture
def tokenizer(tiny_sft_model: Path) -> Any:
    return load_tokenizer(str(tiny_sft_model))


def test_a_judge_that_always_says_a_is_corrected_to_a_coin(tokenizer: Any) -> None:
    judge = LocalJudge(FakeJudgeModel(tokenizer, bias=20.0), tokenizer)  # type: ignore[arg-type]
    p = judge.compare_all(
        [(PROMPT, Answer(" 5."), Answer(" Go away.")), (PROMPT, Answer(" 6."), Answer(" 5."))]
    )
    assert p == pytest.approx([0.5, 0.5], abs=1e-6)
    stats = judge.stats()
    assert stats["position_bias_first"] == pytest.approx(1.0, abs=1e-6) and stats["questions_asked"] == 4
    one_order = LocalJudge(FakeJudgeModel(tokenizer, bias=20.0), tokenizer, both_orders=False)  # type: ignore[arg-type]
    assert one_order.compare(PROMPT, Answer(" 5."), Answer(" Go away.")) == pytest.approx(1.0, abs=1e-6)


def test_a_biased_but_able_judge_still_finds_the_better_answer_in_either_slot(tokenizer: Any) -> None:
    judge = LocalJudge(FakeJudgeModel(tokenizer, bias=1.0, skill=2.0), tokenizer, batch_size=1)  # type: ignore[arg-type]
    planted_first = judge.compare(PROMPT, Answer(" the planted answer"), Answer(" 5."))
    planted_second = judge.compare(PROMPT, Answer(" 5."), Answer(" the planted answer"))
    # in one order P(A) = sigmoid(3), in the other sigmoid(1 - 2): the mean of sigmoid(3) and 1 - sigmoid(-1)
    expected = 0.5 * (1 / (1 + math.exp(-3)) + 1 - 1 / (1 + math.exp(1)))
    assert planted_first == pytest.approx(expected, abs=1e-5)
    assert planted_second == pytest.approx(1 - expected, abs=1e-5)
    assert judge.stats()["position_bias_first"] > 0.5


def test_a_real_tiny_model_gives_complementary_probabilities_batched_or_not(tiny_sft_model: Path) -> None:
    pairs = [
        (PROMPT, Answer(" 5."), Answer(" I do not know, go away.")),
        (PROMPT + " x", Answer(" 6."), Answer("")),
    ]
    short = "{prompt} A:{first} B:{second} Better:"  # the tiny model's context is 128 tokens
    batched = LocalJudge.load(str(tiny_sft_model), template=short, batch_size=8).compare_all(pairs)
    single = LocalJudge.load(str(tiny_sft_model), template=short, batch_size=1).compare_all(pairs)
    swapped = LocalJudge.load(str(tiny_sft_model), template=short).compare_all(
        [(p, b, a) for p, a, b in pairs]
    )
    assert batched == pytest.approx(single, abs=1e-5)  # left padding changes nothing
    assert [x + y for x, y in zip(batched, swapped, strict=True)] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(0 < x < 1 for x in batched)


def test_a_choice_that_is_not_one_token_is_refused(tiny_sft_model: Path, tokenizer: Any) -> None:
    with pytest.raises(RlhfError, match=r"not one token .*eval.judge_choices; eval.judge_review_choices"):
        LocalJudge(FakeJudgeModel(tokenizer, 0.0), tokenizer, choices=("First answer", "B"))  # type: ignore[arg-type]


def test_a_judging_prompt_longer_than_the_context_is_a_one_line_error(tiny_sft_model: Path) -> None:
    judge = LocalJudge.load(str(tiny_sft_model))
    with pytest.raises(RlhfError, match="exceeds the local judge's context of 128"):
        judge.compare(PROMPT, Answer(" 5." * 100), Answer(" 6."))
