"""Packed rows (rlhf.engine.packing): first-fit packing, the block-diagonal mask, and PPO's forwards giving the
same log-probs, values, rewards and gradients packed as padded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from rlhf.engine import packing
from rlhf.engine.packing import layout, pack_rows, packed_layout, padded_layout, tree_attention_mask
from rlhf.models.heads import build_scalar_model
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.wrappers import Actor, Critic, response_values, reward_scores
from rlhf.rl_math import logprobs_from_logits
from rlhf.train.common import policy_forward
from tests.archs import build_tokenizer, save_tiny

# prompt lengths (left-padded to 5) and response lengths (right-padded to 6) of four rollouts
PROMPTS, RESPONSES = [5, 2, 3, 1], [2, 6, 1, 2]


def rollout(pad_id: int, prompts: list[int] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, mask, P): random tokens, each prompt left-padded to the widest, each response right-padded."""
    gen = torch.Generator().manual_seed(0)
    p, t = max(prompts), max(RESPONSES)
    ids = torch.randint(3, 200, (len(prompts), p + t), generator=gen)
    mask = torch.zeros_like(ids)
    for i, (n_p, n_r) in enumerate(zip(prompts, RESPONSES, strict=True)):
        mask[i, p - n_p : p + n_r] = 1
    return torch.where(mask.bool(), ids, pad_id), mask, p


def test_rows_are_packed_no_wider_than_the_widest() -> None:
    widths = [9, 2, 7, 4, 5, 1, 8, 3]
    rows = pack_rows(widths)
    assert sorted(g for row in rows for g in row) == list(range(8))
    assert all(sum(widths[g] for g in row) <= 9 for row in rows) and len(rows) == 5
    assert all(sum(widths[g] for g in row) <= 12 for row in pack_rows(widths, capacity=12))
    assert len(pack_rows(widths, capacity=12)) == 4


def test_row_width_trades_padding_against_attention() -> None:
    lengths = [70] * 8  # alone in rows of 80: 12% padding; two to a row of 144: 3%
    assert packing.row_width(lengths) == 80  # no model width given: the narrowest
    assert packing.row_width(lengths, hidden_size=512) == 144  # matmuls dominate: fewer padded positions
    assert packing.row_width(lengths, hidden_size=16) == 80  # attention dominates: short rows
    assert packing.row_width([60] * 8, hidden_size=512) == 64  # they fill rows of 64 already


def test_without_branches_the_mask_is_block_diagonal_and_causal() -> None:
    mask = tree_attention_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False]  # its own sequence only
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself
    additive = tree_attention_mask(torch.tensor([[0, 1]]), additive=True)[0, 0]
    assert additive[1, 0] == torch.finfo(torch.float32).min and additive[1, 1] == 0


def test_packed_layout_puts_each_sequence_end_to_end_with_its_own_positions(monkeypatch) -> None:
    ids, mask, p = rollout(pad_id=0)
    rounded = packed_layout(ids, mask, p, pad_id=0)  # rows of 16 tokens, 4 rows at a time
    assert rounded.input_ids.shape == (4, 16) and (rounded.input_ids[3] == 0).all()
    assert rounded.attention_mask[3, 0].equal(torch.eye(16, dtype=torch.bool))  # padding sees only itself
    monkeypatch.setattr(packing, "WIDTH_MULTIPLE", 1)
    monkeypatch.setattr(packing, "ROW_MULTIPLE", 1)
    lay = packed_layout(ids, mask, p, pad_id=0)
    lengths = [a + b for a, b in zip(PROMPTS, RESPONSES, strict=True)]  # 7, 8, 4, 3: rows [8], [7], [4, 3]
    assert lay.input_ids.shape == (3, 8) and lay.tokens < ids.numel()
    flat_ids, flat_pos = lay.input_ids.flatten(), lay.position_ids.flatten()
    expected_at = []
    for i, n in enumerate(lengths):
        start = int(lay.last_at[i]) - n + 1
        assert flat_ids[start : start + n].tolist() == ids[i][mask[i].bool()].tolist()
        assert flat_pos[start : start + n].tolist() == list(range(n))
        # the output before response token j is the one at prompt length + j - 1 of the sequence
        expected_at += [start + PROMPTS[i] + j - 1 for j in range(RESPONSES[i])]
    assert lay.response_at.tolist() == expected_at  # the real response tokens only, in (B, T) order
    assert lay.response_mask.sum(1).tolist() == RESPONSES
    padded = padded_layout(ids, mask, p)
    assert padded.response_at.tolist()[2:8] == [11 + 4 + j for j in range(6)]  # row 1, from position P - 1
    assert padded.last_at.tolist() == [11 * i + p + r - 1 for i, r in enumerate(RESPONSES)]
    values = torch.arange(1.0, 12.0)  # one per real response token
    assert lay.padded(values)[1].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert lay.padded(values)[2].tolist() == [9.0] + [0.0] * 5


def test_an_empty_prompt_falls_back_to_padded_rows() -> None:
    ids, mask, p = rollout(pad_id=0, prompts=[5, 0, 3, 1])
    assert layout(ids, mask, p, 0, pack=True, additive=False).attention_mask.dim() == 2
    assert layout(ids, mask, p, 0, pack=False, additive=False).attention_mask.dim() == 2
    ids, mask, p = rollout(pad_id=0)
    assert layout(ids, mask, p, 0, pack=True, additive=False).attention_mask.dim() == 4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_log_probs_values_rewards_and_gradients_of_padded_rows(
    tiny_sft_model: Path, attention: str
) -> None:
    tokenizer = load_tokenizer(str(tiny_sft_model))
    pad_id = tokenizer.pad_token_id
    policy = Actor(load_causal_lm(str(tiny_sft_model)))  # transformers' forward, as any attention takes
    critic = Critic(build_scalar_model(str(tiny_sft_model), seed=1))
    reward_model = build_scalar_model(str(tiny_sft_model), seed=2)
    for model in (policy.model, critic.hf_model, reward_model):
        model.config._attn_implementation = attention
    ids, mask, p = rollout(pad_id)
    response_mask = mask[:, p:]
    results = []
    for lay in (
        padded_layout(ids, mask, p),
        packed_layout(ids, mask, p, pad_id, additive=attention == "eager"),
    ):
        policy.zero_grad()
        critic.zero_grad()
        logits = policy_forward(policy, lay)  # (N, V)
        assert logits.shape == (sum(RESPONSES), policy.model.config.vocab_size)
        logprobs = lay.padded(logprobs_from_logits(logits, ids[:, p:][lay.response_mask]))  # (B, T)
        values = response_values(critic, lay)  # (B, T)
        assert (values[response_mask == 0] == 0).all()
        (logprobs.sum() + values.square().sum()).backward()
        grads = [q.grad.clone() for q in [*policy.parameters(), *critic.parameters()] if q.grad is not None]
        with torch.no_grad():
            rewards = reward_scores(reward_model, lay)  # (B,)
        results.append((logprobs.detach(), values.detach(), rewards, grads))
    (lp_a, v_a, r_a, g_a), (lp_b, v_b, r_b, g_b) = results
    assert lp_a.abs().sum() > 0 and v_a.abs().sum() > 0
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_b, v_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_b, r_a, atol=1e-5, rtol=0)
    assert len(g_a) == len(g_b) and all(torch.isfinite(g).all() for g in g_b)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_sliding_window_shorter_than_a_sequence_keeps_padded_rows(tmp_path: Path) -> None:
    """A custom 4-D mask replaces the model's own, sliding window included: a Mistral whose window (3) is
    shorter than the sequences gets padded rows, and its log-probs are those of each sequence alone; an ALiBi
    model (Bloom) takes no custom mask at all."""
    tokenizer = build_tokenizer("mistral")
    config = CONFIG_MAPPING["mistral"](
        vocab_size=len(tokenizer), sliding_window=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    pad_id = len(tokenizer) - 1
    ids, mask, p = rollout(pad_id)
    window = packing.sliding_window(model)
    assert window == 3 and not packing.within_window(window, 8) and packing.within_window(window, 3)
    lay = layout(ids, mask, p, pad_id, pack=True, additive=False, window=window)
    assert lay.attention_mask.dim() == 2  # padded rows: the model applies its window itself
    logprobs = logprobs_from_logits(policy_forward(Actor(model), lay), ids[:, p:][lay.response_mask])  # (N,)
    expected = []
    for i in range(len(ids)):
        seq = ids[i][mask[i].bool()][None]  # (1, L) the sequence alone
        n_prompt = int(mask[i, :p].sum())
        logits = model(input_ids=seq).logits[0, n_prompt - 1 : -1]
        expected.append(logits.log_softmax(-1).gather(-1, seq[0, n_prompt:, None])[:, 0])
    torch.testing.assert_close(logprobs, torch.cat(expected), rtol=1e-5, atol=1e-5)
    bloom = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", model_type="bloom"))
    assert packing.takes_4d_mask(bloom) == (False, False)


def test_packed_rows_give_a_mixture_of_experts_the_load_balancing_loss_of_padded_rows(tmp_path: Path) -> None:
    """A Mixtral whose config sets `output_router_logits`: the routers' loss over packed rows, each position
    weighted by `real`, is transformers' `aux_loss` over the same rollouts in padded rows (which a 4-D mask, as
    transformers would read it, does not give), and so are its gradients."""
    path = save_tiny("mixtral", tmp_path / "moe")
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer=tokenizer)
    model.config.output_router_logits = True
    policy = Actor(model)
    ids, mask, p = rollout(int(tokenizer.pad_token_id))
    expected = model(input_ids=ids, attention_mask=mask).aux_loss
    model.zero_grad()
    expected.backward()
    expected_grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    lay = packed_layout(ids, mask, p, int(tokenizer.pad_token_id))
    assert lay.input_ids.numel() > int(lay.real.sum()) == int(mask.sum())  # rows with padding
    policy_forward(policy, lay)
    model.zero_grad()
    aux = policy.aux_loss(lay.real)
    aux.backward()
    torch.testing.assert_close(aux, expected, atol=1e-6, rtol=0)
    grads = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    assert grads.keys() == expected_grads.keys() and any("gate" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_mixture_of_experts_whole_forward_takes_packed_rows(tmp_path: Path) -> None:
    """Where the LM head cannot run alone (weights sharded by FSDP), the whole causal-LM forward runs over the
    packed rows' 4-D mask: it gives the logits of the head alone and the same load-balancing loss, rather than
    failing in transformers' own `aux_loss`, which reads the mask as one weight per token."""
    path = save_tiny("mixtral", tmp_path / "moe")
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer=tokenizer)
    model.config.output_router_logits = True
    ids, mask, p = rollout(int(tokenizer.pad_token_id))
    lay = packed_layout(ids, mask, p, int(tokenizer.pad_token_id))
    assert lay.attention_mask.dim() == 4
    alone, whole = Actor(model), Actor(model)
    whole._head_alone = False  # as for sharded weights (`head_runs_alone`)
    expected = policy_forward(alone, lay)
    expected_aux = alone.aux_loss(lay.real)
    logits = policy_forward(whole, lay)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole.aux_loss(lay.real), expected_aux, atol=1e-6, rtol=0)
