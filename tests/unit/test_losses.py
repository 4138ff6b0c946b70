"""rlhf.losses against hand-computed values."""

import math

import pytest
import torch

from rlhf.losses import (
    dpo_loss,
    grouped_bt_loss,
    kto_loss,
    orpo_loss,
    pairwise_bt_loss,
    ppo_policy_loss,
    sft_loss,
    simpo_loss,
    value_loss,
)

LN2 = math.log(2.0)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def nll_sigmoid(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


# --- SFT ----------------------------------------------------------------------------------------


def _sft_example() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0],  # predicts labels[1] = 2 under uniform: -ln(1/3) = ln 3
                [LN2, 0.0, 0.0],  # softmax (1/2, 1/4, 1/4), predicts labels[2] = 0: -ln(1/2) = ln 2
                [5.0, -3.0, 7.0],  # last position predicts nothing
            ]
        ]
    )
    labels = torch.tensor([[-100, 2, 0]])
    return logits, labels


def test_sft_loss_hand_value_with_shift() -> None:
    logits, labels = _sft_example()
    close(sft_loss(logits, labels), (math.log(3) + LN2) / 2)  # ln 6 / 2 = 0.8959
    close(sft_loss(logits, labels, reduction="sum"), math.log(3) + LN2)
    changed = logits.clone()
    changed[0, 2] = torch.tensor([-9.0, 9.0, 0.0])  # the last position's logits are never used
    close(sft_loss(changed, labels), (math.log(3) + LN2) / 2)


def test_sft_loss_ignores_ignore_index_positions() -> None:
    logits, labels = _sft_example()
    labels[0, 2] = -100  # position 1's target is now ignored
    close(sft_loss(logits, labels), math.log(3))
    changed = logits.clone()
    changed[0, 1] = torch.tensor([50.0, -50.0, 3.0])
    close(sft_loss(changed, labels), math.log(3))
    close(sft_loss(logits, torch.full_like(labels, -100)), 0.0)  # nothing to count: 0, not NaN


def test_sft_sum_over_global_token_count_equals_one_big_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 7, generator=gen)
    labels = torch.randint(0, 7, (4, 6), generator=gen)
    labels[0, 2:] = -100  # micro-batches with different token counts
    labels[3, 4:] = -100
    count = (labels[:, 1:] != -100).sum()
    summed = sft_loss(logits[:2], labels[:2], reduction="sum") + sft_loss(
        logits[2:], labels[2:], reduction="sum"
    )
    torch.testing.assert_close(summed / count, sft_loss(logits, labels))
    mean_of_means = (sft_loss(logits[:2], labels[:2]) + sft_loss(logits[2:], labels[2:])) / 2
    assert not torch.allclose(mean_of_means, sft_loss(logits, labels))


# --- Bradley-Terry --------------------------------------------------------------------------------


def test_pairwise_bt_equal_rewards_is_log2_and_margin_shifts() -> None:
    loss, _ = pairwise_bt_loss(torch.tensor([0.3, -1.0]), torch.tensor([0.3, -1.0]))
    close(loss, LN2)
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    close(pairwise_bt_loss(chosen, rejected)[0], nll_sigmoid(1.0))  # 0.3133
    close(pairwise_bt_loss(chosen, rejected, margin=1.0)[0], LN2)  # 1 - 0 - 1 = 0
    close(pairwise_bt_loss(chosen, rejected, margin=torch.tensor([-1.0]))[0], nll_sigmoid(2.0))  # 0.1269


def test_pairwise_bt_weights_and_accuracy() -> None:
    chosen, rejected = torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0])
    # pair losses: ln 2 = 0.6931, nll(2) = 0.1269, nll(-3) = 3.0486; accuracy: only pair 1 has r_c > r_r
    loss, stats = pairwise_bt_loss(chosen, rejected, weights=torch.tensor([3.0, 1.0, 0.0]))
    close(loss, (3 * LN2 + nll_sigmoid(2.0)) / 4)  # 0.5516
    close(stats["rm/accuracy"], 1 / 3)


def test_pairwise_bt_is_stable_for_large_gaps() -> None:
    loss, _ = pairwise_bt_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    close(loss, 400.0, atol=1e-3)


def _ranking_batch() -> tuple[torch.Tensor, ...]:
    # group 0 ranks completions 0 > 1 > 2 (3 pairs); group 1 has completions 3 and 4 (1 pair)
    rewards = torch.tensor([2.0, 1.0, 0.0, 0.5, 0.5])
    chosen = torch.tensor([0, 0, 1, 3])
    rejected = torch.tensor([1, 2, 2, 4])
    groups = torch.tensor([0, 0, 0, 1])
    return rewards, chosen, rejected, groups


def test_grouped_bt_each_group_weighs_as_one() -> None:
    rewards, chosen, rejected, groups = _ranking_batch()
    loss, stats = grouped_bt_loss(rewards, chosen, rejected, groups, num_groups=2)
    # group 0: gaps 1, 2, 1 -> (0.3133 + 0.1269 + 0.3133) / 3 = 0.2511;  group 1: gap 0 -> ln 2 = 0.6931
    group0 = (2 * nll_sigmoid(1.0) + nll_sigmoid(2.0)) / 3
    close(loss, (group0 + LN2) / 2)  # 0.4721, where a flat mean over 4 pairs would be 0.3616
    assert abs(loss.item() - (3 * group0 + LN2) / 4) > 0.1
    close(stats["rm/accuracy"], 3 / 4)  # the tied pair does not count as correct


def test_grouped_bt_pair_weights_margin_and_empty_group() -> None:
    rewards, chosen, rejected, groups = _ranking_batch()
    weights = torch.tensor([1.0, 1.0, 2.0, 5.0])
    # group 0: weight 4/3 (its pairs' mean) times (nll(1) + nll(2) + 2 nll(1)) / 4; group 1: 5 ln 2
    expected = ((3 * nll_sigmoid(1.0) + nll_sigmoid(2.0)) / 3 + 5 * LN2) / 2
    loss, _ = grouped_bt_loss(rewards, chosen, rejected, groups, num_groups=3, weights=weights)
    close(loss, expected)  # group 2 has no pairs and is left out of the mean
    # a labeler's weight counts even where all its pairs are in one group: a quarter of the loss, not the same
    one_group = torch.tensor([0, 0, 0, 0])
    full, _ = grouped_bt_loss(rewards, chosen, rejected, one_group, num_groups=1)
    quarter, _ = grouped_bt_loss(
        rewards, chosen, rejected, one_group, num_groups=1, weights=torch.full((4,), 0.25)
    )
    close(quarter, full / 4)
    # a margin of 1 turns group 0's gaps into 0, 1, 0 and group 1's into -1
    loss, _ = grouped_bt_loss(rewards, chosen, rejected, groups, num_groups=2, margin=1.0)
    close(loss, ((2 * LN2 + nll_sigmoid(1.0)) / 3 + nll_sigmoid(-1.0)) / 2)


# --- PPO ----------------------------------------------------------------------------------------


def test_ppo_policy_loss_clipped_regime() -> None:
    ratios = torch.tensor([[1.5, 0.5, 1.1, math.exp(5.0)]])
    old = torch.zeros(1, 4)
    logprobs = ratios.log().requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # token 0: A=1,  r=1.5: max(-1.5, -1.2) = -1.2  (clipped active)
    # token 1: A=-1, r=0.5: max(0.5, 0.8)   = 0.8   (clipped active)
    # token 2: A=2,  r=1.1: max(-2.2, -2.2) = -2.2  (inside the range)
    # token 3: padding
    close(loss, (-1.2 + 0.8 - 2.2) / 3)  # -0.8667
    close(stats["ppo/clipfrac"], 2 / 3)
    loss.backward()
    assert logprobs.grad is not None
    # clipped tokens pass no gradient; token 2's is d(-A r / 3)/d logp = -A r / 3
    close(logprobs.grad, [[0.0, 0.0, -2.0 * 1.1 / 3, 0.0]], atol=1e-6)


def test_ppo_policy_loss_unclipped_regime_and_kl_stat() -> None:
    # Out-of-range ratios whose pessimistic term is the unclipped one are not clipped.
    logprobs = torch.tensor([[math.log(0.5), math.log(1.5)]])
    old = torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # token 0: max(-0.5, -0.8) = -0.5; token 1: max(1.5, 1.2) = 1.5
    close(loss, 0.5)
    close(stats["ppo/clipfrac"], 0.0)
    # k3: (r - 1) - ln r: 0.5: -0.5 + 0.6931 = 0.1931;  1.5: 0.5 - 0.4055 = 0.0945
    close(stats["ppo/approx_kl"], ((-0.5 - math.log(0.5)) + (0.5 - math.log(1.5))) / 2)


def test_value_loss_clipping() -> None:
    values = torch.tensor([[1.5, 1.1, 0.5, 9.0]])
    old_values = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: v_clip 1.2: max(0.25, 0.64) = 0.64 (clipped active)
    # token 1: v_clip 1.1: max(1.21, 1.21) = 1.21
    # token 2: v_clip 0.8: max(2.25, 1.44) = 2.25
    close(loss, 0.5 * (0.64 + 1.21 + 2.25) / 3)  # 0.6833
    close(stats["ppo/vf_clipfrac"], 1 / 3)


@pytest.mark.parametrize("clip_range", [0.2, 10.0])
def test_value_loss_without_active_clip_is_half_mse(clip_range: float) -> None:
    values = torch.tensor([[1.05, 0.9]])
    loss, stats = value_loss(
        values, torch.ones(1, 2), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), clip_range
    )
    close(loss, 0.5 * (0.95**2 + 0.9**2) / 2)
    close(stats["ppo/vf_clipfrac"], 0.0)


def test_ppo_policy_loss_clip_higher_widens_only_the_upper_bound() -> None:
    # DAPO: token 0 (A=1, r=1.5) is clipped at 1 + eps_high instead of 1 + eps; token 1 (A=-1, r=0.5) still at 0.8
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5)]])
    advantages, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, _ = ppo_policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(loss, (-1.28 + 0.8) / 2)
    symmetric, _ = ppo_policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, clip_eps=0.2)
    close(symmetric, (-1.2 + 0.8) / 2)


def test_ppo_policy_loss_sequence_aggregation() -> None:
    # inside the clip range the per-token loss is -A * r = -A at r = 1
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    zeros = torch.zeros(2, 3)
    by_seq, _ = ppo_policy_loss(zeros, zeros, advantages, mask, aggregation="seq_mean_token_mean")
    close(by_seq, -(2.0 + 4.0) / 2)
    by_const, _ = ppo_policy_loss(
        zeros, zeros, advantages, mask, aggregation="seq_mean_token_sum_norm", max_len=5
    )
    close(by_const, -10.0 / (2 * 5))


# --- DPO and its variants -------------------------------------------------------------------------


def test_dpo_at_equal_log_ratios_is_log2() -> None:
    policy_c, policy_r = torch.tensor([-3.0, -7.0]), torch.tensor([-4.0, -2.0])
    loss, stats = dpo_loss(policy_c, policy_r, policy_c - 1.0, policy_r - 1.0, beta=0.1)  # both ratios 1
    close(loss, LN2)
    close(stats["dpo/margin"], 0.0)
    close(stats["dpo/accuracy"], 0.0)  # a tie is not a correct ranking
    close(stats["dpo/chosen_reward"], 0.1)


def test_dpo_sigmoid_hand_values_and_gradient() -> None:
    # pair 0: h = (-1 - -2) - (-3 - -3) = 1; pair 1: h = (-5 - -4) - (-2 - -2) = -1; beta = 0.5
    policy_c = torch.tensor([-1.0, -5.0], requires_grad=True)
    policy_r, ref_c, ref_r = (
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -4.0]),
        torch.tensor([-3.0, -2.0]),
    )
    loss, stats = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    close(loss, (nll_sigmoid(0.5) + nll_sigmoid(-0.5)) / 2)
    close(stats["dpo/accuracy"], 0.5)
    close(stats["dpo/margin"], (0.5 - 0.5) / 2)
    loss.backward()
    # d/dlogp_c of -log sigmoid(beta h) / P = -beta * sigmoid(-beta h) / P
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    close(policy_c.grad, [-0.5 * sig(-0.5) / 2, -0.5 * sig(0.5) / 2])


def test_conservative_dpo_mixes_both_labels() -> None:
    c, r, zero = torch.tensor([0.0]), torch.tensor([-2.0]), torch.zeros(1)  # h = 2
    loss, _ = dpo_loss(c, r, zero, zero, beta=0.5, label_smoothing=0.1)
    close(loss, 0.9 * nll_sigmoid(1.0) + 0.1 * nll_sigmoid(-1.0))


def test_ipo_targets_half_inverse_beta() -> None:
    zero = torch.zeros(2)
    # beta = 0.25: target h = 1 / (2 beta) = 2; h = 2 gives 0, h = 0 gives 4
    loss, _ = dpo_loss(torch.tensor([2.0, 0.0]), zero, zero, zero, beta=0.25, loss_type="ipo")
    close(loss, (0.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(zero, zero, zero, zero, loss_type="hinge")  # type: ignore[arg-type]


def test_simpo_uses_mean_log_probs_and_a_margin() -> None:
    # beta = 2, gamma = 0.5: logits = 2 * -1 - 2 * -2 - 0.5 = 1.5
    loss, stats = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5)
    close(loss, nll_sigmoid(1.5))
    close(stats["dpo/margin"], 2.0)
    close(stats["dpo/accuracy"], 1.0)
    equal, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), beta=2.0, gamma=0.0)
    close(equal, LN2)


def test_orpo_adds_an_odds_ratio_term_to_the_chosen_answers_nll() -> None:
    # mean log-probs ln 0.5 and ln 0.2: odds 1 and 0.25, log odds ratio ln 4; NLL ln 2 (of the chosen only)
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, stats = orpo_loss(chosen, rejected, lam=0.1)
    close(loss, LN2 + 0.1 * nll_sigmoid(math.log(4.0)))
    close(stats["dpo/nll"], LN2)
    close(stats["dpo/log_odds_ratio"], math.log(4.0))
    close(stats["dpo/accuracy"], 1.0)
    # equal answers: the odds term is log 2 whatever their probability
    equal, _ = orpo_loss(torch.tensor([-3.0, -0.01]), torch.tensor([-3.0, -0.01]), lam=1.0)
    close(equal, 3.01 / 2 + LN2)
    # a chosen answer the policy is all but certain of: finite, and its gradient pushes the rejected down
    certain = torch.tensor([-1e-9], requires_grad=True)
    other = torch.tensor([-1.0], requires_grad=True)
    loss, _ = orpo_loss(certain, other, lam=0.1)
    loss.backward()
    assert math.isfinite(float(loss)) and other.grad is not None and float(other.grad) > 0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_weighs_each_answer_against_a_reference_point_from_other_prompts_answers() -> None:
    # log-ratios 2 (desirable) and 1 (undesirable); mismatched answers' log-ratios 0.5 and 1.5: z = 1
    policy, ref = torch.tensor([2.0, 1.0]), torch.zeros(2)
    desirable = torch.tensor([True, False])
    kl_policy, kl_ref = torch.tensor([0.5, 1.5]), torch.zeros(2)
    loss, stats = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=0.5, desirable_weight=2.0)
    close(loss, (2.0 * (1 - sigmoid(0.5 * (2 - 1))) + 1.0 * (1 - sigmoid(0.5 * (1 - 1)))) / 2)
    close(stats["dpo/kl"], 1.0)
    close(stats["dpo/chosen_reward"], 1.0)
    close(stats["dpo/rejected_reward"], 0.5)
    close(stats["dpo/accuracy"], 0.5)  # the desirable answer above z; the undesirable one at it, not below
    # a negative estimate is floored at 0, and the reference point takes no gradient
    kl_policy = torch.tensor([-3.0], requires_grad=True)
    loss, stats = kto_loss(policy.requires_grad_(), ref, desirable, kl_policy, torch.zeros(1), beta=0.5)
    close(stats["dpo/kl"], 0.0)
    loss.backward()
    assert kl_policy.grad is None or float(kl_policy.grad.abs().sum()) == 0.0
    # no mismatched answers (one judgement alone): z = 0
    loss, stats = kto_loss(policy, ref, desirable, torch.zeros(0), torch.zeros(0), beta=0.5)
    close(loss, ((1 - sigmoid(1.0)) + (1 - sigmoid(-0.5))) / 2)
