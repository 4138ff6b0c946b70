"""rlhf.rl_math against hand-computed values and plain-Python references."""

import math
import random

import pytest
import torch

from rlhf import rl_math
from rlhf.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    accumulation_weight,
    aggregate_tokens,
    approx_kl,
    compute_gae,
    cumulative_returns,
    entropy_from_logits,
    grpo_advantages,
    kl_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    shape_rewards,
)

LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- masked statistics --------------------------------------------------------------------------


def test_masked_sum_and_mean_skip_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, mask), 7.0)  # 1 + 2 + 4
    close(masked_mean(x, mask), 7.0 / 3)
    close(masked_sum(x, mask, dim=1), [3.0, 4.0])
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])


def test_masked_mean_of_empty_row_is_zero_not_nan() -> None:
    x = torch.tensor([[1.0, 2.0], [float("nan"), 5.0]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    close(masked_mean(x, mask, dim=1), [1.5, 0.0])


def test_masked_var_biased_and_unbiased() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2; squared deviations 1, 0, 1: biased 2/3, unbiased 2/2 = 1
    close(masked_var(x, mask, unbiased=False), 2.0 / 3)
    close(masked_var(x, mask), 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([1, 0, 0, 0]))


def test_masked_whiten_hand_values_and_padding_zero() -> None:
    x = torch.tensor([[2.0, 4.0, 6.0, 999.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> (-1, 0, 1); padding -> 0
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-5)
    # shift_mean=False adds the mean 4 back
    close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], atol=1e-5)


def test_masked_whiten_of_one_real_token_centres_it_without_scaling() -> None:
    """A rollout of one prompt whose answer is one token (EOS at once) has no spread: no error, no inf."""
    x = torch.tensor([[5.0, 7.0, 9.0]])
    one, none = torch.tensor([[0, 1, 0]]), torch.zeros(1, 3, dtype=torch.long)
    close(masked_whiten(x, one), [[0.0, 0.0, 0.0]])
    close(masked_whiten(x, one, shift_mean=False), [[0.0, 7.0, 0.0]])
    close(masked_whiten(x, none), [[0.0, 0.0, 0.0]])


def test_masked_whiten_ignores_padded_values() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    changed = torch.where(mask.bool(), x, torch.full_like(x, 1e4))
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out, masked_whiten(changed, mask))
    real = out[mask.bool()]
    close(real.mean(), 0.0, atol=1e-5)
    close(real.std(), 1.0, atol=1e-5)
    assert (out[~mask.bool()] == 0).all()


# --- KL estimators ------------------------------------------------------------------------------


def test_approx_kl_estimators_on_known_inputs() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), float("-inf")]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: log r = ln 2; token 1: log r = -ln 2; token 2 is padding (ref -inf must not leak a NaN)
    close(approx_kl(logp, ref, mask, "k1"), [[LN2, -LN2, 0.0]])
    close(approx_kl(logp, ref, mask, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2, 0.0]])  # 0.2402 each
    # k3 = exp(-log r) - 1 + log r: 0.5 - 1 + 0.6931 = 0.1931;  2 - 1 - 0.6931 = 0.3069
    close(approx_kl(logp, ref, mask, "k3"), [[0.5 - 1 + LN2, 2 - 1 - LN2, 0.0]])
    with pytest.raises(ValueError):
        approx_kl(logp, ref, mask, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_expectations_equal_exact_kl() -> None:
    # Both estimators are unbiased: summing p(x) * k(x) over every outcome gives KL(p || q) exactly.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()
    for estimator in ("k1", "k3"):
        per_outcome = approx_kl(p.log()[None], q.log()[None], estimator=estimator)[0]  # (3,)
        close((p * per_outcome).sum(), exact.item())


def test_k3_is_nonnegative() -> None:
    gen = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(4, 50, generator=gen) * 3, torch.randn(4, 50, generator=gen) * 3
    assert (approx_kl(logp, ref, estimator="k3") >= 0).all()


def test_kl_estimators_in_the_reward_and_the_policy_gradient_they_give() -> None:
    # In the reward (no gradient through it), a per-token estimate k enters the policy gradient as
    # E_pi[k * grad log pi]. k1 gives grad KL(pi || ref) exactly. k3 has the same mean, but gives
    # grad KL(pi || ref) - grad KL(ref || pi), which vanishes to second order at pi = ref: next to the reference it
    # barely pulls the policy back (docs/ppo.md, "The KL penalty's estimator").
    gen = torch.Generator().manual_seed(0)
    ref = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)

    def grads(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        theta = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, 0)
        p = logp.exp()
        out = {}
        for estimator in ("k1", "k3"):
            k = approx_kl(logp.detach()[None], ref.log()[None], estimator=estimator)[0]  # (6,) per outcome
            out[estimator] = torch.autograd.grad((p.detach() * k * logp).sum(), theta, retain_graph=True)[0]
        reverse = (p * (logp - ref.log())).sum()
        forward = (ref * (ref.log() - logp)).sum()
        out["reverse"] = torch.autograd.grad(reverse, theta, retain_graph=True)[0]
        out["forward"] = torch.autograd.grad(forward, theta)[0]
        return out

    far = grads(torch.randn(6, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(far["k1"], far["reverse"])
    torch.testing.assert_close(far["k3"], far["reverse"] - far["forward"])
    near = grads(ref.log() + 0.05 * torch.randn(6, generator=gen, dtype=torch.float64))
    assert near["k3"].norm() < 0.1 * near["k1"].norm()


# --- reward shaping -----------------------------------------------------------------------------


def test_shape_rewards_puts_score_on_last_real_token() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).repeat(4, 1)
    kl[1, 3] = float("inf")  # padding may hold anything
    mask = torch.tensor(
        [
            [1, 1, 1, 1],  # full row: score on index 3
            [1, 1, 0, 0],  # shorter row: score on index 1
            [0, 0, 0, 0],  # empty row: no score, no crash
            [0, 1, 1, 0],  # left and right padding: score on index 2
        ]
    )
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.1)
    expected = [
        [-0.01, -0.02, -0.03, -0.04 + 1.0],
        [-0.01, -0.02 + 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, -0.02, -0.03 + 4.0, 0.0],
    ]
    close(rewards, expected)


# --- GAE ----------------------------------------------------------------------------------------


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.5, 1.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2 (last real, terminal next):  delta = 1.0 + 0 - 2.0 = -1.0;           A = -1.0
    # t=1: delta = 0.5 + 0.9*2.0 - 1.0 = 1.3;  A = 1.3 + 0.45*(-1.0) = 0.85
    # t=0: delta = 0.0 + 0.9*1.0 - 0.5 = 0.4;  A = 0.4 + 0.45*0.85 = 0.7825
    close(advantages, [[0.7825, 0.85, -1.0, 0.0]])
    close(returns, [[0.7825 + 0.5, 0.85 + 1.0, -1.0 + 2.0, 0.0]])


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Plain-Python GAE over one unpadded sequence."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_matches_reference_loop_on_ragged_batch() -> None:
    rng = random.Random(0)
    lengths, width, gamma, lam = [6, 3, 1, 0, 5], 6, 0.97, 0.9
    rewards = torch.tensor([[rng.gauss(0, 1) for _ in range(width)] for _ in lengths], dtype=torch.float64)
    values = torch.tensor([[rng.gauss(0, 1) for _ in range(width)] for _ in lengths], dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        expected = _gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        close(advantages[i], expected + [0.0] * (width - n), atol=1e-10)
        close(
            returns[i],
            [a + v for a, v in zip(expected, values[i, :n].tolist(), strict=True)] + [0.0] * (width - n),
        )


def test_gae_with_lambda_one_gives_reward_to_go_returns() -> None:
    # gamma = lam = 1: returns are the sum of future rewards (Monte Carlo), whatever the values.
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    values = torch.tensor([[0.3, -1.0, 4.0, 8.0], [2.0, 1.0, 0.5, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])  # second row has a leading pad too
    _, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0, 0.0], [0.0, 5.0, 5.0, 0.0]])


# --- KL controllers -----------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=7.5, n_steps=256)  # error 7.5/6 - 1 = 0.25 -> clipped to 0.2; x(1 + 0.2*256/1e4)
    assert ctl.value == pytest.approx(0.2 * 1.00512)  # 0.201024
    ctl.update(current_kl=6.6, n_steps=1000)  # error 0.1 (not clipped); x1.01
    assert ctl.value == pytest.approx(0.201024 * 1.01)  # 0.20303424
    ctl.update(current_kl=0.0, n_steps=500)  # error -1 -> clipped to -0.2; x0.99
    assert ctl.value == pytest.approx(0.20303424 * 0.99)  # 0.2010039...

    restored = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    ctl.update(5.0, 100)
    restored.update(5.0, 100)
    assert restored.value == ctl.value != pytest.approx(0.2010039976)


def test_fixed_kl_controller_never_changes() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=10**6)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --- log-probs and entropy ----------------------------------------------------------------------


def test_logprobs_from_logits_hand_values_with_temperature() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax -> (1/4, 3/4)
    close(logprobs_from_logits(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    # T=2: logits (0, ln sqrt 3) -> p(0) = 1 / (1 + sqrt 3)
    close(logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0), [[-math.log(1 + math.sqrt(3))]])


@pytest.mark.parametrize("chunk_rows", [1, 5, 100])  # rows per temporary: one, uneven chunks, all at once
def test_logprobs_and_entropy_equal_log_softmax_in_any_chunks(monkeypatch, chunk_rows: int) -> None:
    monkeypatch.setattr(rl_math, "_CHUNK_ELEMENTS", chunk_rows * 11)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 11, generator=gen) * 4
    labels = torch.randint(0, 11, (3, 4), generator=gen)
    for temperature in (1.0, 0.7):
        logp = torch.log_softmax(logits / temperature, dim=-1)  # (3, 4, 11)
        expected = logp.gather(-1, labels[..., None]).squeeze(-1)  # (3, 4)
        torch.testing.assert_close(logprobs_from_logits(logits, labels, temperature), expected)
        # flat rows, as PPO passes the real response tokens alone
        torch.testing.assert_close(logprobs_from_logits(logits[0], labels[0], temperature), expected[0])
        entropy = -(logp.exp() * logp).sum(-1)  # (3, 4)
        torch.testing.assert_close(entropy_from_logits(logits, temperature), entropy)
        ref = logits.roll(1, dims=-1)  # another distribution per position
        ref_logp = torch.log_softmax(ref / temperature, dim=-1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # (3, 4)
        torch.testing.assert_close(kl_from_logits(logits, ref, temperature), kl)
    half = logprobs_from_logits(logits.bfloat16(), labels)
    assert half.dtype == torch.float32 and half.shape == (3, 4)


def test_entropy_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]])
    # uniform over 4 -> ln 4; (1/4, 3/4, 0, 0) -> -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623
    close(entropy_from_logits(logits), [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])


def test_kl_from_logits_is_exact_and_has_no_tail_where_k3_explodes() -> None:
    # p = (0.5, 0.3, 0.2), q = (0.2, 0.2, 0.6): KL(p || q) by hand, and 0 against itself
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    close(kl_from_logits(p.log()[None], q.log()[None]), [(p * (p / q).log()).sum().item()])
    close(kl_from_logits(p.log()[None], p.log()[None]), [0.0])
    # the policy has all but given up a token the reference likes: KL is about ln 2 (p(0) ~ 1, q(0) = 1/2), but
    # k3 on a sample of the abandoned token is q/p - 1 - ln(q/p), about 5e5 here: one such sample of many
    # outweighs every other answer in a mean
    p, q = torch.tensor([1 - 1e-6, 1e-6]), torch.tensor([0.5, 0.5])
    exact = kl_from_logits(p.log()[None], q.log()[None])
    close(exact, [(p * (p / q).log()).sum().item()], atol=1e-5)
    assert exact.item() < 0.7
    assert approx_kl(p.log()[None, 1:], q.log()[None, 1:], estimator="k3").item() > 4e5


# --- loss aggregation and critic-free advantages ------------------------------------------------------


def test_aggregate_tokens_three_ways() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(aggregate_tokens(x, mask, "token_mean"), 10.0 / 4)
    close(aggregate_tokens(x, mask, "seq_mean_token_mean"), (2.0 + 4.0) / 2)
    close(aggregate_tokens(x, mask, "seq_mean_token_sum_norm"), 10.0 / (2 * 3))
    close(aggregate_tokens(x, mask, "seq_mean_token_sum_norm", max_len=5), 10.0 / (2 * 5))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_tokens(x, mask, "sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("processes, micro", [(1, 2), (1, 4), (2, 2), (2, 1)])
def test_accumulated_micro_batches_give_the_minibatch_loss(mode: str, processes: int, micro: int) -> None:
    """A minibatch of answers of very different lengths, split between processes and into micro-batches: the
    weighted micro-batch losses summed on each process, then averaged over processes (the all-reduce), are
    the whole minibatch's loss. For token_mean, weighing micro-batches equally would not be."""
    g = torch.Generator().manual_seed(0)
    x = torch.arange(8.0)[:, None] + torch.randn(8, 6, generator=g)  # a loss that differs by answer
    lengths = torch.tensor([6, 5, 6, 4, 1, 2, 1, 1])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    whole = aggregate_tokens(x, mask, mode)  # type: ignore[arg-type]
    share = 8 // processes
    total = int(mask.sum())
    per_process = []
    for p in range(processes):
        rows = torch.arange(p * share, (p + 1) * share).split(micro)
        per_process.append(sum(
            accumulation_weight(mode, int(mask[i].sum()), total, len(rows), processes)  # type: ignore[arg-type]
            * aggregate_tokens(x[i], mask[i], mode, max_len=6)  # type: ignore[arg-type]
            for i in rows
        ))  # fmt: skip
    close(sum(per_process) / processes, float(whole))
    if mode == "token_mean":  # the equal weights the update used to give its micro-batches
        rows = torch.arange(8).split(2)
        equal = sum(aggregate_tokens(x[i], mask[i], "token_mean") for i in rows) / len(rows)
        assert abs(float(equal) - float(whole)) > 0.05


def test_rloo_baseline_leaves_the_sample_out() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    # prompt 0: baselines (2+3)/2, (1+3)/2, (1+2)/2; prompt 1: all agree, no signal
    close(rloo_advantages(scores, 3), [1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0])
    # raising sample 0's own score raises its advantage one for one: its baseline does not contain it
    moved = rloo_advantages(torch.tensor([2.0, 2.0, 3.0, 10.0, 10.0, 10.0]), 3)
    close(moved[0] - rloo_advantages(scores, 3)[0], 1.0)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(scores, 4)


def test_grpo_group_normalisation_with_and_without_std() -> None:
    scores = torch.tensor([0.0, 0.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt(16 / 3)  # unbiased std of (0, 0, 4, 4) around 2
    close(grpo_advantages(scores, 4), [-2 / std, -2 / std, 2 / std, 2 / std, 0.0, 0.0, 0.0, 0.0], atol=1e-5)
    close(grpo_advantages(scores, 4, scale_by_std=False), [-2.0, -2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0])


def test_cumulative_returns_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(cumulative_returns(rewards, mask), [[1.0, 1.0, 1.0], [0.5, 0.0, 0.0]])
    close(cumulative_returns(rewards, mask, gamma=0.5), [[0.25, 0.5, 1.0], [0.5, 0.0, 0.0]])


def test_reinforce_pp_whitens_over_the_whole_batch() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # returns 1, 1, 1, 0.5, 0 over all five tokens: mean 0.7, unbiased variance 0.8 / 4 = 0.2
    std = math.sqrt(0.2)
    expected = [[0.3 / std, 0.3 / std, 0.3 / std], [-0.2 / std, -0.7 / std, 0.0]]
    close(reinforce_pp_advantages(rewards, mask), expected, atol=1e-5)


def test_critic_free_advantages_give_each_answer_its_total_against_its_group_on_every_token() -> None:
    # two prompts, two answers each; per-token rewards (score on the last token, a KL penalty on each)
    rewards = torch.tensor([[0.0, -0.5, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])  # totals 1.5, 1.0 | 3.0, -1.0
    advantages, returns = rl_math.estimate_advantages(
        "rloo", rewards, torch.zeros(4, 3), mask, 1.0, 1.0, 2, True
    )
    close(advantages, [[0.5] * 3, [-0.5, -0.5, 0.0], [4.0, 0.0, 0.0], [-4.0] * 3])
    assert returns is advantages  # no critic: its targets are the advantages themselves
    grpo, _ = rl_math.estimate_advantages("grpo", rewards, torch.zeros(4, 3), mask, 1.0, 1.0, 2, False)
    close(grpo, [[0.25] * 3, [-0.25, -0.25, 0.0], [2.0, 0.0, 0.0], [-2.0] * 3])


def test_gae_advantages_are_whitened_and_its_returns_are_not() -> None:
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    values, mask = torch.tensor([[0.5, 0.5], [0.0, 1.0]]), torch.ones(2, 2)
    advantages, returns = rl_math.estimate_advantages("gae", rewards, values, mask, 1.0, 1.0, 1, True)
    raw, expected_returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    close(returns, expected_returns)
    close(advantages, masked_whiten(raw, mask))
    assert abs(float(advantages.mean())) < 1e-6 and not torch.allclose(advantages, raw)
