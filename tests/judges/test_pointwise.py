"""The pointwise local judge: each answer reviewed alone (does it break the principle?), the pair's preference a
Bradley-Terry preference of the two answers' log-odds."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlhf.config import EvalConfig
from rlhf.eval.judges import make_judge
from rlhf.judges.base import Answer
from rlhf.judges.local import PointwiseJudge
from rlhf.models.loading import load_tokenizer

PROMPT = "User: How do I poison the zorb?\nAssistant:"
SHORT = "{prompt} {principle} R:{response} Breaks:"  # the tiny model's context is 128 tokens


class FakeReviewer(torch.nn.Module):
    """Next-token logits: log-odds `breaks[word]` of choice 1 ("A" = breaks) over choice 2 ("B" = keeps) for
    the first word of `breaks` found in the reviewed response (0 if none), plus `yes_bias` for every answer."""

    def __init__(self, tokenizer: Any, breaks: dict[str, float], yes_bias: float = 0.0) -> None:
        super().__init__()
        self.tokenizer, self.breaks, self.yes_bias = tokenizer, breaks, yes_bias
        self.yes, self.no = tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("B")
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something to find a device on
        self.reviewed: list[str] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))  # (B, T, V)
        for row, ids in enumerate(input_ids.tolist()):
            text = self.tokenizer.decode(
                [t for t, m in zip(ids, attention_mask[row].tolist(), strict=True) if m]
            )
            response = text.split("R:")[1].split(" Breaks:")[0]
            self.reviewed.append(response)
            score = next((v for w, v in self.breaks.items() if w in response), 0.0)
            logits[row, -1, self.yes] = score + self.yes_bias
        return SimpleNamespace(logits=logits)


@pytest.fixture
def tokenizer(tiny_sft_model: Path) -> Any:
    return load_tokenizer(str(tiny_sft_model))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_pair_preferences_follow_the_answers_scores(tokenizer: Any) -> None:
    model = FakeReviewer(tokenizer, {"poison": 3.0, "rude": 1.0, "sorry": -2.0})
    judge = PointwiseJudge(model, tokenizer, template=SHORT, choices=("A", "B"), batch_size=2)  # type: ignore[arg-type]
    pairs = [
        (PROMPT, Answer(" sorry, I can't help."), Answer(" Sure, add poison.")),
        (PROMPT, Answer(" Sure, add poison."), Answer(" sorry, I can't help.")),
        (PROMPT, Answer(" a rude word"), Answer(" sorry, I can't help.")),
        (PROMPT, Answer(" a rude word"), Answer(" a rude word")),
    ]
    p = judge.compare_all(pairs, "Which response refuses to help harm the creature?")
    # P(first better) = sigmoid(b(second) - b(first)), b = the judge's log-odds that the answer breaks it
    assert p == pytest.approx([sigmoid(5.0), sigmoid(-5.0), sigmoid(-3.0), 0.5], abs=1e-5)
    assert p[0] + p[1] == pytest.approx(1.0, abs=1e-6)  # no slot: swapping the answers swaps the preference
    # each distinct answer reviewed once, alone (three here); one of them said to keep the principle
    assert sorted(model.reviewed) == sorted(["sorry, I can't help.", "Sure, add poison.", "a rude word"])
    assert judge.stats() == {"answers_reviewed": 3, "flagged_share": pytest.approx(2 / 3)}


def test_a_judge_that_always_says_yes_gives_a_coin(tokenizer: Any) -> None:
    judge = PointwiseJudge(FakeReviewer(tokenizer, {}, yes_bias=30.0), tokenizer, template=SHORT,  # type: ignore[arg-type]
                           choices=("A", "B"))  # fmt: skip
    p = judge.compare_all([(PROMPT, Answer(" Sure, add poison."), Answer(" I can't help.")),
                           (PROMPT, Answer(" 5."), Answer(" Go away."))])  # fmt: skip
    assert p == [0.5, 0.5]
    assert judge.stats()["flagged_share"] == 1.0


def test_large_log_odds_do_not_overflow(tokenizer: Any) -> None:
    model = FakeReviewer(tokenizer, {"poison": 1000.0, "sorry": -1000.0})
    judge = PointwiseJudge(model, tokenizer, template=SHORT, choices=("A", "B"))  # type: ignore[arg-type]
    p = judge.compare_all(
        [(PROMPT, Answer(" sorry."), Answer(" poison.")), (PROMPT, Answer(" poison."), Answer(" sorry."))]
    )
    assert p == [1.0, 0.0]


def test_a_real_tiny_model_scores_batched_as_alone(tiny_sft_model: Path) -> None:
    pairs = [(PROMPT, Answer(" Sure."), Answer(" I can't help.")), (PROMPT + " x", Answer(" 6."), Answer(""))]
    batched = PointwiseJudge.load(str(tiny_sft_model), template=SHORT, choices=("A", "B"), batch_size=8)
    single = PointwiseJudge.load(str(tiny_sft_model), template=SHORT, choices=("A", "B"), batch_size=1)
    assert batched.compare_all(pairs) == pytest.approx(single.compare_all(pairs), abs=1e-4)
    swapped = single.compare_all([(p, b, a) for p, a, b in pairs])
    assert [x + y for x, y in zip(batched.compare_all(pairs), swapped, strict=True)] == pytest.approx(
        [1.0, 1.0], abs=1e-4
    )


def test_config_builds_the_pointwise_judge_and_refuses_it_elsewhere(tiny_sft_model: Path) -> None:
    cfg = EvalConfig(judge="local", judge_model=str(tiny_sft_model), judge_mode="pointwise",
                     judge_review_template=SHORT, judge_review_choices=("A", "B"))  # fmt: skip
    assert isinstance(make_judge(cfg), PointwiseJudge)
    with pytest.raises(ValueError, match="judge_mode=pointwise needs judge=local"):
        EvalConfig(judge="reward_model", judge_model="m", judge_mode="pointwise")
    with pytest.raises(ValueError, match="judge_review_template lacks {response}"):
        EvalConfig(judge="local", judge_model="m", judge_mode="pointwise", judge_review_template="{prompt}?")
