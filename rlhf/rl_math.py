"""The numerical core of RLHF, in pure torch: masked statistics and loss aggregation, KL estimators, reward
shaping, advantages (GAE; the critic-free RLOO, GRPO and REINFORCE++), KL-coefficient controllers, and
log-probabilities/entropy from logits.

Shapes: B = batch (rollouts), T = tokens (response positions), V = vocabulary. A `mask` is 1 (or True)
at real tokens and 0 at padding; padding never enters a statistic and comes back as 0.
"""

from __future__ import annotations

from typing import Literal

import torch

# ---------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is 1 (over all elements, or along `dim`).

    Padding is selected away rather than multiplied by 0, so inf or NaN there cannot leak in.
    """
    masked = torch.where(mask.bool(), x, torch.zeros_like(x))  # same shape as x
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (OpenRLHF/TRL `masked_mean`).

    A row (or the whole tensor) with no real token gives 0 rather than NaN, so a batch holding an
    empty response does not poison the loss.
    """
    count = masked_sum(torch.ones_like(x), mask, dim).clamp(min=1.0)
    return masked_sum(x, mask, dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is 1 (TRL `masked_var`).

    With `unbiased` the Bessel correction n/(n-1) is applied; that needs at least two real tokens,
    and fewer raise ValueError rather than return inf.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(mask.sum().item())
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 real tokens, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to mean 0 and std 1 over the real tokens; padded positions are set to 0.

    Follows TRL/summarize-from-feedback `whiten`: with `shift_mean=False` only the scale changes and the
    mean is added back (used for rewards, whose sign carries meaning). Fewer than two real tokens have no
    spread to scale by (TRL raises there): the scale stays 1, so one token's whitened advantage is 0 and its
    reward is kept as it is.
    """
    mean = masked_mean(x, mask)
    if int(mask.sum()) < 2:
        return torch.where(mask.bool(), x - mean if shift_mean else x, torch.zeros_like(x))
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # same shape as x
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def aggregate_tokens(
    x: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token_mean", max_len: int | None = None
) -> torch.Tensor:
    """A per-token loss (B, T) reduced to a scalar, as the critic-free papers disagree on:
    token_mean               sum over all real tokens / their count: every token weighs the same (PPO as
                             in OpenRLHF; DAPO, Yu et al. 2025, arXiv:2503.14476, sec. 3.3);
    seq_mean_token_mean      each sequence's token mean, then the mean over sequences (GRPO, Shao et al.
                             2024): a token of a long answer weighs less, which Dr. GRPO (Liu et al. 2025,
                             arXiv:2503.20783) shows biases towards long wrong answers;
    seq_mean_token_sum_norm  sum over real tokens / (B * max_len), a constant (Dr. GRPO's fix); `max_len`
                             defaults to T.
    """
    if mode == "token_mean":
        return masked_mean(x, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(x, mask, dim=1).mean()
    if mode == "seq_mean_token_sum_norm":
        return masked_sum(x, mask) / (x.size(0) * (x.size(1) if max_len is None else max_len))
    raise ValueError(
        f"unknown aggregation {mode!r}; expected token_mean, seq_mean_token_mean or seq_mean_token_sum_norm"
    )


def accumulation_weight(
    mode: Aggregation, micro_tokens: int, minibatch_tokens: int, n_micro: int, processes: int = 1
) -> float:
    """What one micro-batch's aggregated loss is multiplied by before its backward, so that the gradients
    summed over a minibatch's `n_micro` micro-batches on each process, then averaged over `processes` (as DDP
    and FSDP reduce them), are those of the whole minibatch's aggregate (`aggregate_tokens`). For token_mean
    that is the micro-batch's share of the minibatch's real tokens (`minibatch_tokens`, over all processes):
    divided by `n_micro` instead, a token of a micro-batch of short answers would weigh more than one of a
    micro-batch of long ones, and `micro_batch_size`, a memory setting, would change what is optimised. The
    per-sequence modes are means over sequences, which micro-batches of equal size split evenly."""
    if mode == "token_mean":
        return micro_tokens * processes / max(minibatch_tokens, 1)
    return 1.0 / n_micro


# ---------------------------------------------------------------------------------------------------
# KL penalty and reward shaping
# ---------------------------------------------------------------------------------------------------


def approx_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: Literal["k1", "k2", "k3"] = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (shape (B, T)).

    With log r = logp - ref_logp (OpenRLHF `compute_approx_kl`; Schulman, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html):
      k1 = log r                      unbiased, high variance, can be negative per token;
      k2 = 0.5 * (log r)^2            biased, low variance, >= 0;
      k3 = exp(-log r) - 1 + log r    unbiased, low variance, >= 0.
    Unbiased for the value, not for its gradient: as a reward (no gradient through it) the policy gradient
    E_pi[k grad log pi] is grad KL(pi || pi_ref) for k1, but grad KL(pi || pi_ref) - grad KL(pi_ref || pi) for k3,
    which vanishes to second order at pi = pi_ref. k2 and k3 belong in a loss term, k1 in the reward.
    Positions where `mask` is 0 are 0.
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    elif estimator == "k3":
        # r' = pi_ref / pi = exp(-log r); k3 = r' - 1 - log r' >= 0 because log x <= x - 1.
        kl = torch.exp(-log_ratio) - 1.0 + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")
    if mask is None:
        return kl
    # where, not multiply: a padded log-prob of -inf would turn 0 * inf into NaN.
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where `mask` is 1 in each row, or -1 for a row with none; (B,) long."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl at every response token, plus the sequence score on the
    last real token (the EOS); padding gets 0.

    This is the KL-penalised reward of Ziegler et al. 2019 / InstructGPT (Ouyang et al. 2022, eq. 2),
    spread per token as in summarize-from-feedback and OpenRLHF `compute_reward`. A row whose mask is
    all zeros gets no score.
    """
    penalty = -kl_coef * kl  # (B, T)
    rewards = torch.where(mask.bool(), penalty, torch.zeros_like(penalty))  # (B, T)
    last = _last_token_index(mask)  # (B,)
    has_token = last >= 0  # (B,)
    score_at_last = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))  # (B,)
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), score_at_last.unsqueeze(1))  # (B, T)


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438), as in OpenRLHF
    `get_advantages_and_returns` and TRL's PPO trainer. Returns (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns = A + V.
    The step after the last real token is terminal (V = 0, A = 0). Real tokens must be contiguous in
    each row (leading and trailing padding are both fine); padded entries come back as 0.
    """
    fmask = mask.to(values.dtype)  # (B, T)
    values = values * fmask  # (B, T); zero past the end makes the terminal step's value 0
    rewards = rewards * fmask  # (B, T)
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)  # (B,)
    next_advantage = torch.zeros_like(next_value)  # (B,)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = delta + gamma * lam * next_advantage  # (B,)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * fmask  # (B, T)
    returns = advantages + values  # (B, T); values already 0 at padding
    return advantages, returns


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) scores of k consecutive samples per prompt -> (N / k, k); ValueError unless k divides N."""
    if k < 2 or scores.numel() % k:
        raise ValueError(
            f"group advantages need k >= 2 samples per prompt dividing the batch ({scores.numel()}), got k={k}"
        )
    return scores.view(-1, k)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740): each of the k
    samples of a prompt is compared with the mean of the OTHER k - 1, so the baseline never contains the
    sample itself and stays unbiased:  A_i = r_i - (sum_j r_j - r_i) / (k - 1).
    `scores` (N,) hold k consecutive samples per prompt; returns (N,)."""
    grouped = _groups(scores, k)  # (G, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (G, k)
    return (grouped - baseline).view(-1)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, arXiv:2402.03300, sec. 4.1.2):
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the std unbiased as in TRL's GRPOTrainer. Dr. GRPO
    (Liu et al. 2025, arXiv:2503.20783) drops the std (`scale_by_std=False`): dividing by it up-weights prompts
    that are nearly always right or wrong. `scores` (N,) hold k consecutive samples per prompt; returns (N,)."""
    grouped = _groups(scores, k)  # (G, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, k)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


@torch.no_grad()
def cumulative_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s - t) r_s per row, (B, T); padding gives and gets 0."""
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))  # (B, T)
    returns = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(mask.bool(), returns, torch.zeros_like(returns))


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262; OpenRLHF): the reward-to-go of the per-token rewards
    (score on the last token, the KL penalty on each), whitened over every real token of the whole batch,
    not per prompt group: the global statistics keep the estimate stable where one prompt's samples agree.
    rewards, mask (B, T); returns (B, T), 0 at padding."""
    return masked_whiten(cumulative_returns(rewards, mask, gamma), mask)


AdvantageEstimator = Literal["gae", "rloo", "grpo", "reinforce_pp"]


def estimate_advantages(
    estimator: AdvantageEstimator, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
    gamma: float, lam: float, k: int, grpo_scale_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(advantages, returns), (B, T) each, from the per-token rewards (the score on the last token, the KL
    penalty, if any, on each). gae: GAE on the critic's values, whitened. rloo, grpo: each answer's total reward
    against the other answers to its prompt (k consecutive rows), the same advantage on all its tokens.
    reinforce_pp: reward-to-go whitened over the whole batch. Returns are the critic's targets, equal to the
    advantages where there is no critic."""
    if estimator == "gae":
        advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
        return masked_whiten(advantages, mask), returns
    if estimator == "reinforce_pp":
        advantages = reinforce_pp_advantages(rewards, mask, gamma)
    else:
        totals = masked_sum(rewards, mask, dim=1)  # (B,) score - beta * KL of each answer
        if estimator == "rloo":
            per_answer = rloo_advantages(totals, k)
        else:
            per_answer = grpo_advantages(totals, k, grpo_scale_by_std)  # (B,)
        advantages = per_answer[:, None] * mask  # (B, T)
    return advantages, advantages


# ---------------------------------------------------------------------------------------------------
# KL-coefficient controllers
# ---------------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", sec. 2.2; OpenRLHF/TRL `AdaptiveKLController`).

    Each update moves `value` towards the coefficient that keeps the measured KL at `target`:
    e = clip(KL / target - 1, -0.2, 0.2);  value *= 1 + e * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust `value` after `n_steps` samples (episodes) that showed mean KL `current_kl`."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


class FixedKLController:
    """Constant KL coefficient, with the interface of AdaptiveKLController (update does nothing)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep `value` unchanged."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = AdaptiveKLController | FixedKLController


# ---------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ---------------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32, so that logsumexp over a large vocabulary stays accurate."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# rows of logits per temporary in the functions below: 4M elements, 16 MB in float32
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The logits (..., V) as chunks of whole rows (n, V), bounding the float32 temporaries."""
    vocab = logits.size(-1)
    return logits.reshape(-1, vocab).split(max(1, _CHUNK_ELEMENTS // vocab))


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[labels] per position: (..., V), (...) -> (...), e.g. (B, T, V) ->
    (B, T), or (N, V) -> (N,) for the real response tokens alone.

    Divide by the sampling temperature so that PPO's log-probs are those of the distribution the
    rollout was sampled from (summarize-from-feedback; OpenRLHF). Computed a chunk of rows at a time, as TRL's
    `selective_log_softmax` goes row by row, so only a bounded temporary exists beside the logits; the result
    is logit[label] - logsumexp(logits). Half-precision logits give float32 log-probs.
    """
    chunks = _row_chunks(logits)
    picked = []
    for chunk, chunk_labels in zip(chunks, labels.reshape(-1).split(chunks[0].size(0)), strict=True):
        scaled = _upcast(chunk) if temperature == 1.0 else _upcast(chunk) / temperature  # (n, V)
        label_logits = scaled.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1)  # (n,)
        picked.append(label_logits - torch.logsumexp(scaled, dim=-1))  # (n,)
    return torch.cat(picked).view(labels.shape)


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(logits / T) || softmax(ref_logits / T)) per position, summed over the whole vocabulary:
    (..., V), (..., V) -> (...), a chunk of rows at a time.

    Where `approx_kl` estimates the KL from the one sampled token, this is its exact value at each visited
    prefix (the Rao-Blackwellised estimator: the same expectation over prefixes, no variance from the token).
    Summed over an answer it estimates the answer's KL without the k3 estimator's exponential tail, where one
    token the policy finds far less likely than the reference contributes exp(log pi_ref - log pi).
    """
    out = []
    for chunk, ref_chunk in zip(_row_chunks(logits), _row_chunks(ref_logits), strict=True):
        logp = torch.log_softmax(_upcast(chunk) / temperature, dim=-1)  # (n, V)
        ref_logp = torch.log_softmax(_upcast(ref_chunk) / temperature, dim=-1)  # (n, V)
        out.append((logp.exp() * (logp - ref_logp)).sum(dim=-1))  # (n,)
    return torch.cat(out).view(logits.shape[:-1])


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (..., V) -> (...), a chunk of rows at a time.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v (OpenRLHF/TRL `entropy_from_logits`).
    """
    entropies = []
    for chunk in _row_chunks(logits):
        z = _upcast(chunk) if temperature == 1.0 else _upcast(chunk) / temperature  # (n, V)
        probs = torch.softmax(z, dim=-1)  # (n, V)
        entropies.append(torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1))  # (n,)
    return torch.cat(entropies).view(logits.shape[:-1])
