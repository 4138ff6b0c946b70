"""Training losses in pure torch: SFT cross entropy, Bradley-Terry reward-model losses (pairwise and
InstructGPT K-way), and PPO's clipped policy and value losses.

Each loss returns a scalar tensor; those with useful diagnostics also return a dict of detached
scalar tensors keyed by metric name (`rm/accuracy`, `ppo/clipfrac`, ...), left on the device so that
logging them costs no synchronisation until the caller asks for `.item()`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rlhf.rl_math import masked_mean

Stats = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------
# Supervised fine-tuning (and pretraining)
# ---------------------------------------------------------------------------------------------------


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Next-token cross entropy: logits[:, t] predicts labels[:, t + 1]; the shift happens here, so pass
    logits (B, T, V) and labels (B, T) aligned as the model saw them (Hugging Face convention).

    Positions whose label is `ignore_index` (prompt tokens, padding) carry no loss. "mean" averages
    over this batch's counted tokens (0 if there are none). "sum" returns the plain sum: under gradient
    accumulation or data parallelism, divide it by the token count of the whole global batch,
    `(labels[:, 1:] != ignore_index).sum()` summed over micro-batches and ranks, so every token weighs
    the same as in one big batch (a mean of per-micro-batch means would over-weight short ones).
    """
    shift_logits = logits[:, :-1, :]  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),  # (B*(T-1), V)
        shift_labels.reshape(-1),  # (B*(T-1),)
        ignore_index=ignore_index,
        reduction="sum",
    )
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (shift_labels != ignore_index).sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


# ---------------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry
# ---------------------------------------------------------------------------------------------------


def _bt_pair_losses(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None
) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin) per pair; logsigmoid stays finite for large gaps."""
    diff = chosen_rewards - rejected_rewards  # (P,)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)  # (P,)


def pairwise_bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Bradley-Terry loss -log sigmoid(r_c - r_r - margin) over P pairs, rewards (P,) each.

    The standard reward-model loss (Stiennon et al. 2020; Ouyang et al. 2022); the optional per-pair
    `margin` (P,) or scalar is Llama 2's margin for strongly preferred pairs. With `weights` (P,) the
    result is the weighted mean sum(w * l) / sum(w). Equal rewards give log 2.
    Stats: `rm/accuracy`, the unweighted fraction of pairs with r_c > r_r.
    """
    losses = _bt_pair_losses(chosen_rewards, rejected_rewards, margin)  # (P,)
    if weights is None:
        loss = losses.mean()
    else:
        loss = (losses * weights).sum() / weights.sum()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return loss, {"rm/accuracy": accuracy.detach()}


def grouped_bt_loss(
    rewards: torch.Tensor,
    chosen_idx: torch.Tensor,
    rejected_idx: torch.Tensor,
    group_idx: torch.Tensor,
    num_groups: int,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Bradley-Terry loss for K-way rankings, InstructGPT style (Ouyang et al. 2022, eq. 1).

    `rewards` (N,) scores every completion in the batch once; pair p compares completion
    `chosen_idx[p]` (preferred) with `rejected_idx[p]` and belongs to group `group_idx[p]`, one group
    per prompt's ranking. Each group's loss is the (weighted, by per-pair `weights`) mean over its
    pairs, and the loss is the mean over groups that have pairs: a ranking of K answers gives C(K, 2)
    pairs yet weighs as one batch element, which keeps the model from overfitting to prompts with
    many pairs. Stats: `rm/accuracy` over all pairs.
    """
    chosen = rewards[chosen_idx]  # (P,)
    rejected = rewards[rejected_idx]  # (P,)
    losses = _bt_pair_losses(chosen, rejected, margin)  # (P,)
    pair_weights = torch.ones_like(losses) if weights is None else weights.to(losses.dtype)  # (P,)
    group_loss = losses.new_zeros(num_groups).index_add(0, group_idx, losses * pair_weights)  # (G,)
    group_weight = losses.new_zeros(num_groups).index_add(0, group_idx, pair_weights)  # (G,)
    has_pairs = group_weight > 0  # (G,)
    loss = (group_loss[has_pairs] / group_weight[has_pairs]).mean()
    accuracy = (chosen > rejected).float().mean()
    return loss, {"rm/accuracy": accuracy.detach()}


# ---------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token and masked; all inputs (B, T).

    ratio = exp(logp - old_logp);  loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
    Stats: `ppo/clipfrac`, the fraction of real tokens where the clipped term was the larger (active)
    one (summarize-from-feedback); `ppo/approx_kl`, the k3 estimate (ratio - 1) - log ratio of
    KL(pi_old || pi), as in cleanrl, which is >= 0 and unbiased under samples from pi_old.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, {"ppo/clipfrac": clipfrac, "ppo/approx_kl": kl}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss (PPO2 baselines; summarize-from-feedback; OpenRLHF `ValueLoss`); inputs (B, T).

    v_clipped = old + clamp(v - old, -c, c);  loss = 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2)).
    Stats: `ppo/vf_clipfrac`, the fraction of real tokens where the clipped error was the larger.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"ppo/vf_clipfrac": clipfrac}


# ---------------------------------------------------------------------------------------------------
# Extension point: direct preference optimisation
# ---------------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023, arXiv:2305.18290) belongs here as
#   dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
# over sequence log-probs (rl_math.logprobs_from_logits summed with rl_math.masked_sum over response
# tokens); it is pairwise_bt_loss applied to beta * (log-ratio of chosen - log-ratio of rejected).
