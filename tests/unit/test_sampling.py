"""rlhf.engine.sampling: the truncated distribution, per-row greedy, top-k, top-p and temperature checked against
hand-computed cases, and per-row random streams."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.config import ArchConfig
from rlhf.engine.decoding import generate
from rlhf.engine.sampling import (
    RowSampling,
    RowStreams,
    SamplingParams,
    filter_logits,
    raw_logprobs,
    sample,
    stream_keys,
)
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # probabilities 0.5, 0.3, 0.15, 0.05


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """The tokens `sample` draws with one given uniform per row."""
    return sample(logits, RowSampling(temperature, top_k, top_p), uniforms)[0]


def _rows(n: int, **per_row: float) -> dict[str, torch.Tensor]:
    return {
        "temperature": torch.full((n,), per_row.get("temperature", 1.0)),
        "top_p": torch.full((n,), per_row.get("top_p", 1.0)),
        "top_k": torch.full((n,), int(per_row.get("top_k", 0))),
    }


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 < 0.7 so the second token is needed too; 0.8 >= 0.7 so the third is dropped
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (0, 0.7), (3, 1.0), (3, 0.6), (0, 0.3)])
def test_sample_draws_from_the_truncated_distribution(top_k: int, top_p: float) -> None:
    logits = torch.log(torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.07]))
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    n = 40_000
    tokens, logprobs = sample(logits.expand(n, -1), params, RowStreams(stream_keys(0, torch.arange(n)), 0))
    expected = torch.softmax(filter_logits(logits[None] / 0.8, top_k=top_k, top_p=top_p), dim=-1)[0]
    observed = torch.bincount(tokens, minlength=6).float() / n
    # 4 standard errors of a binomial proportion: a draw from the wrong set or with the wrong weights fails
    assert (observed - expected).abs().max() <= 4 * (0.25 / n) ** 0.5 + 1e-6
    assert observed[expected == 0].sum() == 0  # nothing outside the top-k / the nucleus, ever
    # the log-prob is the untruncated one under softmax(logits / T), the distribution PPO recomputes
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / 0.8, -1)[tokens])


def test_uniform_maps_to_the_token_whose_cdf_interval_holds_it() -> None:
    # cumulative 0.5, 0.8, 0.95, 1.0
    uniforms = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.96, 0.9999])
    tokens = sample_rows(LOGITS.expand(7, 4), **_rows(7), uniforms=uniforms)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_each_row_keeps_its_own_parameters() -> None:
    logits = LOGITS.expand(4, 4)
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 0.6, 1.0, 1.0])  # row 1: nucleus {0, 1} (0.5 < 0.6 <= 0.8)
    top_k = torch.tensor([0, 0, 1, 0])  # row 2: only the argmax
    uniforms = torch.tensor([0.99, 0.99, 0.99, 0.99])
    tokens = sample_rows(logits, temperature, top_p, top_k, uniforms)
    assert tokens.tolist() == [0, 1, 0, 3]  # greedy; nucleus ends at 1; top-1; untruncated tail


def test_nucleus_renormalises_the_kept_mass() -> None:
    # top_p 0.6 keeps tokens 0 and 1 with mass 0.8: token 0 has 0.5 / 0.8 = 0.625 of it
    uniforms = torch.tensor([0.62, 0.63])
    tokens = sample_rows(LOGITS.expand(2, 4), **_rows(2, top_p=0.6), uniforms=uniforms)
    assert tokens.tolist() == [0, 1]


def test_temperature_sharpens_the_distribution() -> None:
    # at T = 0.5 the probabilities go as p^2: 0.25, 0.09, ... over 0.365 -> token 0 has 0.685
    mass0 = 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025)
    uniforms = torch.tensor([mass0 - 1e-3, mass0 + 1e-3])
    tokens = sample_rows(LOGITS.expand(2, 4), **_rows(2, temperature=0.5), uniforms=uniforms)
    assert tokens.tolist() == [0, 1] and math.isclose(mass0, 0.6849, abs_tol=1e-4)


def test_mixed_rows_draw_each_from_its_own_distribution() -> None:
    # even rows top-k 2 at T = 0.8, odd rows nucleus 0.5 at T = 1.3, in one batch
    logits = torch.log(torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.07]))
    n = 40_000
    even = torch.arange(n) % 2 == 0
    rows = RowSampling(
        torch.where(even, 0.8, 1.3),
        torch.where(even, 2, 0),
        torch.where(even, torch.tensor(1.0), torch.tensor(0.5)),
    )
    tokens, logprobs = sample(logits.expand(n, -1), rows, RowStreams(stream_keys(1, torch.arange(n)), 0))
    for mask, t, k, p in ((even, 0.8, 2, 1.0), (~even, 1.3, 0, 0.5)):
        expected = torch.softmax(filter_logits(logits[None] / t, top_k=k, top_p=p), dim=-1)[0]
        observed = torch.bincount(tokens[mask], minlength=6).float() / int(mask.sum())
        assert (observed - expected).abs().max() <= 4 * (0.25 / (n / 2)) ** 0.5
        assert observed[expected == 0].sum() == 0
        torch.testing.assert_close(logprobs[mask], torch.log_softmax(logits / t, -1)[tokens[mask]])


def test_a_token_that_is_never_drawn_is_not_drawn_but_keeps_its_log_prob() -> None:
    logits = LOGITS.expand(1000, 4)
    tokens, logprobs = sample(
        logits, SamplingParams(top_p=0.9), RowStreams(stream_keys(2, torch.arange(1000)), 0), [0]
    )
    assert 0 not in tokens.tolist() and {1, 2} <= set(tokens.tolist())
    torch.testing.assert_close(logprobs, LOGITS[tokens])  # under the whole distribution, PAD included


@pytest.mark.parametrize("per_row", [False, True])
def test_a_tiny_temperature_or_top_p_draws_the_top_token_never_nan_or_pad(per_row: bool) -> None:
    """Values inside the documented ranges at float32's edge: logits / 1e-40 overflow to inf (inf - inf = NaN in
    the softmax), top_p 1e-300 is 0 in float32 (and 0 >= 0 would drop even the top token)."""
    logits = torch.tensor([[3.0, 40.0, -2.0, 39.0]]).expand(64, 4)
    uniforms = torch.rand(64, 3, generator=torch.Generator().manual_seed(0))
    for temperature, top_p in ((1e-40, 1.0), (1e-40, 0.5), (0.7, 1e-300), (1e-40, 1e-300)):
        params = (RowSampling(torch.full((64,), temperature), torch.zeros(64, dtype=torch.long), torch.full((64,), top_p))
                  if per_row else SamplingParams(temperature=temperature, top_p=top_p))  # fmt: skip
        tokens, logprobs = sample(logits, params, uniforms, never=[0])
        assert tokens.tolist() == [1] * 64, (temperature, top_p)
        assert torch.isfinite(logprobs).all(), (temperature, top_p)
    assert torch.isfinite(filter_logits(logits[:1], top_p=1e-300)).tolist() == [[False, True, False, False]]


def test_a_row_draws_the_same_whichever_rows_share_its_batch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g) * 2  # (8, V)
    keys = stream_keys(7, torch.arange(8))
    rows = RowSampling(torch.full((8,), 0.9), torch.zeros(8, dtype=torch.long), torch.full((8,), 0.8))
    for step in range(20):  # every row of the batch, then each alone
        together = sample(logits, rows, RowStreams(keys, step))[0]
        alone = [int(sample(logits[i : i + 1], rows[torch.tensor([i])], RowStreams(keys[i : i + 1], step))[0])
                 for i in range(8)]  # fmt: skip
        assert together.tolist() == alone
    # and in another order, beside rows with other parameters
    order = torch.randperm(8, generator=g)
    other = RowSampling(
        torch.where(order % 2 == 0, 0.9, 0.0), torch.zeros(8, dtype=torch.long), torch.full((8,), 0.8)
    )
    shuffled = sample(logits[order], other, RowStreams(keys[order], 3))[0]
    sampled = order % 2 == 0
    assert shuffled[sampled].tolist() == sample(logits, rows, RowStreams(keys, 3))[0][order][sampled].tolist()
    # a stream's draws differ from step to step and from key to key
    draws = RowStreams(keys, 0).uniform(0)
    assert len(set(draws.tolist())) == 8 and not torch.equal(draws, RowStreams(keys, 1).uniform(0))


@pytest.fixture(scope="module")
def model_and_tok():
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    model = build_causal_lm(
        ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2),
        tok,
        seed=1,
    )  # fmt: skip
    return model.eval(), tok


def test_generate_gives_a_seeded_row_the_same_answer_in_any_batch(model_and_tok) -> None:
    model, tok = model_and_tok
    texts = ["User: Hi", "User: Hello there friend, how are you", "Hello", "User: there"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9)
    seeds = stream_keys(5, torch.arange(4))
    batch = generate(model, prompts, params, tok.eos_token_id, tok.pad_token_id, seeds=seeds)
    pairs = [(3, 0), (1, 2)]  # rows in other batches, in another order
    for i, j in pairs:
        other = generate(model, [prompts[i], prompts[j]], params, tok.eos_token_id, tok.pad_token_id,
                         seeds=seeds[[i, j]])  # fmt: skip
        for row, k in enumerate((i, j)):
            n = int(batch.response_mask[k].sum())
            assert other.response_ids[row, :n].tolist() == batch.response_ids[k, :n].tolist()
    # other seeds, other answers
    again = generate(
        model, prompts, params, tok.eos_token_id, tok.pad_token_id, seeds=stream_keys(6, torch.arange(4))
    )
    assert not torch.equal(again.response_ids[:, :4], batch.response_ids[:, :4])


def test_raw_logprobs_are_log_softmax_at_temperature_one_with_the_top_tokens_first() -> None:
    # probabilities 1/8, 3/8, 4/8: logits ln 1, ln 3, ln 4
    logits = torch.tensor([[0.0, math.log(3.0), math.log(4.0)]])
    chosen, values, ids = raw_logprobs(logits, torch.tensor([1]), 2)
    assert chosen.tolist() == pytest.approx([math.log(3 / 8)])
    assert ids.tolist() == [[2, 1]] and values[0].tolist() == pytest.approx(
        [math.log(4 / 8), math.log(3 / 8)]
    )
    assert raw_logprobs(logits, torch.tensor([0]), 0)[1].shape == (1, 0)
