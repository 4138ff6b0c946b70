"""How PPO combines reward models: an ensemble's mean, less a penalty on the members' disagreement; a safety
reward model for the prompts tagged as safety-relevant (Llama 2's two reward models)."""

from __future__ import annotations

import torch

from rlhf.config import PPOConfig
from rlhf.models.wrappers import RewardEnsemble, SafetyRouted, safety_tagged


class Fixed(torch.nn.Module):
    """A stand-in reward model that gives every batch the same scores."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, lay: object) -> torch.Tensor:
        return self.scores


def test_ensemble_scores_the_mean_less_the_penalty_times_the_members_std() -> None:
    members = [Fixed([1.0, 0.0, 2.0]), Fixed([3.0, 0.0, 2.0])]
    assert torch.equal(RewardEnsemble(members, penalty=0.0)(None), torch.tensor([2.0, 0.0, 2.0]))
    ensemble = RewardEnsemble(members, penalty=0.5)
    # the first answer: mean 2, std 1 (the members disagree); the others: std 0, no penalty
    assert torch.allclose(ensemble(None), torch.tensor([1.5, 0.0, 2.0]))
    assert ensemble.last_std is not None and torch.allclose(ensemble.last_std, torch.tensor([1.0, 0.0, 0.0]))


def test_the_safety_model_scores_the_tagged_rows_and_with_a_threshold_any_it_scores_below_it() -> None:
    helpful, safety = Fixed([1.0, 2.0, 3.0, 4.0]), Fixed([-1.0, 0.5, -2.0, 5.0])
    tagged = torch.tensor([True, False, False, True])
    routed = SafetyRouted(helpful, safety, threshold=None)
    assert torch.equal(routed(None, tagged), torch.tensor([-1.0, 2.0, 3.0, 5.0]))
    # the third answer's prompt is not tagged, but the safety model finds it unsafe: its score counts
    routed = SafetyRouted(helpful, safety, threshold=0.0)
    assert torch.equal(routed(None, tagged), torch.tensor([-1.0, 2.0, -2.0, 5.0]))
    assert routed.last_routed is not None and routed.last_routed.tolist() == [True, False, True, True]


def test_prompts_are_tagged_by_any_pattern_case_insensitively() -> None:
    prompts = ["How do I POISON the vexa?", "What does the pip eat?", "You are useless.", "Trapped?"]
    cfg = PPOConfig(safety_reward_model="rm", safety_prompts=[r"\bpoison\b", r"\b(useless|stupid)\b"])
    tagged = safety_tagged(cfg, prompts)
    assert tagged is not None and tagged.tolist() == [True, False, True, False]
    assert safety_tagged(PPOConfig(), prompts) is None  # no safety model: nothing is routed


def test_final_scores_fix_an_unended_answer_and_take_the_length_penalty_per_token() -> None:
    from rlhf.stages.ppo import final_scores

    rm = torch.tensor([1.0, 2.0, 0.5])
    ended = torch.tensor([True, False, True])
    n_tokens = torch.tensor([4, 48, 10])
    cfg = PPOConfig(policy="p", reward_model="r", prompts_file="f", no_eos_penalty=-3.0)
    assert torch.equal(final_scores(rm, ended, n_tokens, cfg), torch.tensor([1.0, -3.0, 0.5]))
    cfg = cfg.model_copy(update={"length_penalty": 0.05})
    assert torch.allclose(final_scores(rm, ended, n_tokens, cfg), torch.tensor([0.8, -5.4, 0.0]))
    cfg = cfg.model_copy(
        update={"no_eos_penalty": None}
    )  # the reward model's score stands for an unended answer
    assert torch.allclose(final_scores(rm, ended, n_tokens, cfg), torch.tensor([0.8, -0.4, 0.0]))


def test_the_length_penalty_and_every_other_number_of_a_config_are_finite() -> None:
    import pytest
    from pydantic import ValidationError

    for name, bad in (("length_penalty", -0.05), ("length_penalty", float("inf")), ("length_penalty", float("nan")),
                      ("kl_coef", float("inf")), ("lr", float("nan"))):  # fmt: skip
        with pytest.raises(ValidationError, match=name):
            PPOConfig(policy="p", reward_model="r", prompts_file="f", **{name: bad})
