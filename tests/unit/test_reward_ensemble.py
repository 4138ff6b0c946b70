"""The reward-model ensemble PPO scores with: the members' mean, less a penalty on their disagreement."""

from __future__ import annotations

import torch

from rlhf.models.wrappers import RewardEnsemble


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
