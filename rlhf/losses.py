"""Training losses in pure torch: SFT cross entropy, Bradley-Terry reward-model losses (pairwise and
InstructGPT K-way), PPO's clipped policy and value losses, and the direct preference losses (DPO, conservative
DPO, IPO, SimPO).

Each loss returns a scalar tensor; those with useful diagnostics also return a dict of detached
scalar tensors keyed by metric name (`rm/accuracy`, `ppo/clipfrac`, ...), left on the device so that
logging them costs no synchronisation until the caller asks for `.item()`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rlhf.rl_math import Aggregation, aggregate_tokens, masked_mean

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
    per prompt's ranking. Each group's loss is the mean over its pairs, and the loss is the mean over
    groups that have pairs: a ranking of K answers gives C(K, 2) pairs yet weighs as one batch element,
    which keeps the model from overfitting to prompts with many pairs. Per-pair `weights` (a labeler's
    reliability) weigh the pairs within their group and the group by their mean, so a group of weight w
    counts w times as much as one of weight 1, whatever else is in the batch. Stats: `rm/accuracy` over
    all pairs.
    """
    chosen = rewards[chosen_idx]  # (P,)
    rejected = rewards[rejected_idx]  # (P,)
    losses = _bt_pair_losses(chosen, rejected, margin)  # (P,)
    pair_weights = torch.ones_like(losses) if weights is None else weights.to(losses.dtype)  # (P,)
    weighted = losses.new_zeros(num_groups).index_add(0, group_idx, losses * pair_weights)  # (G,)
    n_pairs = losses.new_zeros(num_groups).index_add(0, group_idx, torch.ones_like(losses))  # (G,)
    has_pairs = n_pairs > 0  # (G,)
    # sum_p w_p l_p / n_pairs = (mean pair weight) * (weighted mean of the pair losses)
    loss = (weighted[has_pairs] / n_pairs[has_pairs]).mean()
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
    clip_eps_high: float | None = None,
    aggregation: Aggregation = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token and masked; all inputs (B, T).

    ratio = exp(logp - old_logp);  loss = agg(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))).
    `clip_eps_high` (default: eps) is DAPO's "clip-higher" (Yu et al. 2025, arXiv:2503.14476): a wider upper
    bound lets unlikely tokens with a positive advantage grow, against entropy collapse. `aggregation` over
    tokens and sequences is rl_math.aggregate_tokens's (token_mean: DAPO's token-level loss, and PPO's).
    Stats: `ppo/clipfrac`, the fraction of real tokens where the clipped term was the larger (active)
    one (summarize-from-feedback); `ppo/approx_kl`, the k3 estimate (ratio - 1) - log ratio of
    KL(pi_old || pi), as in cleanrl, which is >= 0 and unbiased under samples from pi_old.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)  # (B, T)
    loss = aggregate_tokens(torch.max(unclipped, clipped), mask, aggregation, max_len)
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
# Direct preference optimisation: DPO, conservative DPO, IPO, SimPO
# ---------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Stats]:
    """DPO's loss over P pairs from sequence log-probs (P,) each, summed over each answer's tokens.

    With h = (logp_c - ref_c) - (logp_r - ref_r), the difference of the two answers' log-ratios:
      sigmoid (DPO, Rafailov et al. 2023, arXiv:2305.18290, eq. 7):  -log sigmoid(beta * h); log 2 at h = 0.
        With `label_smoothing` eps, conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
        -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h), for labels flipped with probability eps.
      ipo (Azar et al. 2023, arXiv:2310.12036, eq. 17): (h - 1 / (2 beta))^2, a squared loss whose target
        keeps h finite even for pairs that are always preferred (DPO would push h to infinity).
    Stats: the implicit rewards beta * (logp - ref) of chosen and rejected answers (`dpo/chosen_reward`,
    `dpo/rejected_reward`), their mean difference `dpo/margin` and `dpo/accuracy`, the share of pairs whose
    chosen answer has the larger implicit reward (TRL's "rewards/accuracies").
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (P,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (P,)
    h = chosen_ratio - rejected_ratio  # (P,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected 'sigmoid' or 'ipo'")
    return losses.mean(), _implicit_reward_stats(beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Stats]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6) over P pairs: no reference model; the implicit reward
    is beta times the answer's MEAN log-prob per token (length-normalised), and the chosen answer must win by
    a margin gamma:  -log sigmoid(beta * avg_c - beta * avg_r - gamma), label-smoothed as in dpo_loss.
    Inputs (P,) each; stats as dpo_loss's, with these rewards."""
    chosen_reward, rejected_reward = beta * chosen_avg_logps, beta * rejected_avg_logps  # (P,) each
    logits = chosen_reward - rejected_reward - gamma  # (P,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), _implicit_reward_stats(chosen_reward, rejected_reward)


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lam: float = 0.1
) -> tuple[torch.Tensor, Stats]:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eq. 6-7) over P pairs: no reference model, and the SFT loss
    built in. With P(y) = exp(the answer's mean log-prob per token) and odds(y) = P / (1 - P):
      NLL of the chosen answer (its mean per token) - lam * log sigmoid(log odds(chosen) - log odds(rejected)).
    Inputs (P,) each. Stats as dpo_loss's with lam times the mean log-probs as rewards (as TRL logs them), and
    `dpo/nll` and `dpo/log_odds_ratio`."""
    log_odds_c = chosen_avg_logps - _log1mexp(chosen_avg_logps)  # (P,) log(P / (1 - P))
    log_odds_r = rejected_avg_logps - _log1mexp(rejected_avg_logps)  # (P,)
    nll = -chosen_avg_logps.mean()
    loss = nll - lam * F.logsigmoid(log_odds_c - log_odds_r).mean()
    stats = _implicit_reward_stats(lam * chosen_avg_logps, lam * rejected_avg_logps)
    with torch.no_grad():
        stats["dpo/nll"] = nll.detach()
        stats["dpo/log_odds_ratio"] = (log_odds_c - log_odds_r).mean()
    return loss, stats


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Stats]:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8) over A answers each judged alone, (A,) each, log-probs
    summed over each answer's tokens; `desirable` (A,) bool. With r = logp - ref, the answer's log-ratio, and z the
    reference point: the log-ratio of answers to other prompts (kl_*, (M,) each) averaged, floored at 0 and held
    constant (no gradient), TRL's KTOTrainer's estimate of the policy's KL to the reference, over the answers given
    (the caller's micro-batch: TRL averages it over the whole batch and every process):
      desirable:   desirable_weight * (1 - sigmoid(beta * (r - z)))
      undesirable: undesirable_weight * (1 - sigmoid(beta * (z - r)))
    The mean over the answers. Stats: `dpo/chosen_reward` and `dpo/rejected_reward` (beta * r of the desirable and
    undesirable answers; 0 where there are none), `dpo/kl` (z), `dpo/margin` (their difference) and `dpo/accuracy`
    (the share of answers on their label's side of z)."""
    r = policy_logps - ref_logps  # (A,)
    z = (
        (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
        if kl_policy_logps.numel()
        else r.new_zeros(())
    )
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
    )  # (A,)
    with torch.no_grad():
        good = (beta * r[desirable]).mean() if desirable.any() else r.new_zeros(())
        bad = (beta * r[~desirable]).mean() if (~desirable).any() else r.new_zeros(())
        stats: Stats = {
            "dpo/chosen_reward": good,
            "dpo/rejected_reward": bad,
            "dpo/margin": good - bad,
            "dpo/kl": z,
            "dpo/accuracy": torch.where(desirable, r > z, r < z).float().mean(),
        }
    return losses.mean(), stats


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without rounding 1 - exp(x) to 0 near x = 0 (Machler 2012)."""
    x = x.clamp(max=-1e-7)  # a mean log-prob of exactly 0 (certain of every token) has infinite odds
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _implicit_reward_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> Stats:
    with torch.no_grad():
        return {
            "dpo/chosen_reward": chosen_reward.mean(),
            "dpo/rejected_reward": rejected_reward.mean(),
            "dpo/margin": (chosen_reward - rejected_reward).mean(),
            "dpo/accuracy": (chosen_reward > rejected_reward).float().mean(),
        }
