import copy

import pytest
import torch

from rlhf.config import ArchConfig
from rlhf.engine import decode_cache
from rlhf.engine import decoding as generation
from rlhf.engine.decode_batch import DecodeBatch
from rlhf.engine.decoding import SamplingParams, generate, left_pad
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer
from tests.archs import rigged


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def model_and_tok():
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    model = build_causal_lm(
        ArchConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        tok,
        seed=1,
    )
    return model.eval(), tok


def test_greedy_is_the_same_alone_and_left_padded_in_a_batch(model_and_tok) -> None:
    model, tok = model_and_tok
    short = tok("User: Hi", add_special_tokens=False)["input_ids"]
    long = tok("User: Hello there friend, how are you", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    alone = generate(model, [short], params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    batched = generate(model, [long, short], params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    n = int(alone.response_mask[0].sum())
    assert batched.response_ids[1, :n].tolist() == alone.response_ids[0, :n].tolist()
    # the KV-cache path gives the same next tokens as a full forward pass without cache
    full = torch.tensor([short + alone.response_ids[0, : n - 1].tolist()])
    expected = model(full).logits[0, len(short) - 1 :].argmax(-1).tolist()
    assert alone.response_ids[0, :n].tolist() == expected


def test_sampling_stops_at_eos_and_masks_the_rest(model_and_tok) -> None:
    model, tok = model_and_tok
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS the likeliest token after a few steps by biasing the output layer
        model.lm_head.weight[eos] += 0.0
    prompts = [tok("User: Hi", add_special_tokens=False)["input_ids"]] * 6
    gen = generate(
        model, prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=0), eos, tok.pad_token_id
    )
    for ids, mask, ended, lp in zip(
        gen.response_ids, gen.response_mask, gen.ended, gen.logprobs, strict=True
    ):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, then padding
        assert (ids[n:] == tok.pad_token_id).all() and (lp[n:] == 0).all()
        assert bool(ended) == (ids[n - 1].item() == eos)
        assert eos not in ids[: n - 1].tolist()  # nothing after the first EOS
        assert (lp[:n] <= 0).all()
    again = generate(
        model, prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=0), eos, tok.pad_token_id
    )
    assert torch.equal(gen.response_ids, again.response_ids)  # seeded sampling is reproducible


@pytest.mark.parametrize("slots", [True, False])
def test_finished_rows_leave_the_batch_without_changing_any_answer(model_and_tok, monkeypatch, slots) -> None:
    model, tok = model_and_tok
    texts = ["User: Hi", "User: Hello there", "Hi friend", "User: Hello there friend, how are you", "Assistant:",
             "User: you", "there", "Hello"]  # fmt: skip
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    if not slots:  # transformers' DynamicCache
        monkeypatch.setattr(decode_cache, "supports", lambda model, length: False)
    # any token can end an answer: take the first token of the most greedy answers (not of all of them)
    endless = generate(model, prompts, params, eos_id=-1, pad_id=tok.pad_token_id)
    firsts = endless.response_ids[:, 0].tolist()
    stop = max(set(firsts), key=firsts.count)
    # a batch where five answers end at once (it shrinks from 8 rows to 4) and three run on
    ending = [p for p, f in zip(prompts, firsts, strict=True) if f == stop]
    running = [p for p, f in zip(prompts, firsts, strict=True) if f != stop]
    prompts = (ending * 5)[:5] + running[:3]
    kept: list[int] = []
    keep_rows = DecodeBatch.keep

    def counting(batch: DecodeBatch, rows: torch.Tensor) -> bool:
        assert batch.slotted == slots
        kept.append(rows.numel())
        return keep_rows(batch, rows)

    monkeypatch.setattr(DecodeBatch, "keep", counting)
    compacted = generate(model, prompts, params, eos_id=stop, pad_id=tok.pad_token_id)
    monkeypatch.setattr(generation, "_COMPACT_AT", 0.0)  # never
    whole = generate(model, prompts, params, eos_id=stop, pad_id=tok.pad_token_id)
    assert kept == [4]  # the batch did shrink
    assert torch.equal(compacted.response_ids, whole.response_ids)
    assert torch.equal(compacted.response_mask, whole.response_mask)
    assert torch.equal(compacted.ended, whole.ended) and int(whole.ended.sum()) >= 5
    assert int(whole.response_mask.sum()) > 5 + 3 * 5  # the others ran on after the shrink
    torch.testing.assert_close(compacted.logprobs, whole.logprobs, atol=1e-5, rtol=0)


def test_prompts_longer_than_the_context_are_cut_from_the_left_on_a_learned_position_model(caplog) -> None:
    """GPT-2 has a position table of n_positions rows: a prompt plus its answer beyond it used to index past it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.errors import ConfigError

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    long, short = list(range(3, 43)), [5, 6, 7]  # 40 tokens: beyond the 32 positions on its own
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    with caplog.at_level("WARNING", logger="rlhf.engine.decoding"):
        out = generate(model, [long, short], params, eos_id=0, pad_id=1)
    assert out.response_ids.shape[0] == 2 and out.response_mask.sum(1).max() <= 8
    assert any("1 of 2 prompts longer than 24 tokens" in r.getMessage() for r in caplog.records)
    alone = generate(model, [long[-24:]], params, eos_id=0, pad_id=1)  # what the cut prompt is

    def answer(g: generation.Generation, row: int) -> list[int]:
        return g.response_ids[row][g.response_mask[row].bool()].tolist()

    assert answer(out, 0) == answer(alone, 0)
    with pytest.raises(ConfigError, match=r"max_new_tokens \(32\) leaves no room for a prompt"):
        generate(model, [short], SamplingParams(max_new_tokens=32), eos_id=0, pad_id=1)


def test_a_row_that_drew_pad_keeps_the_log_prob_of_the_unmasked_distribution(model_and_tok) -> None:
    """PAD redrawn: the new token's log-prob is under softmax(logits / T) with PAD's mass in it, as every
    other row's and as PPO's forward recomputes it (not under the renormalised distribution without PAD)."""
    model, tok = model_and_tok
    model = rigged(copy.deepcopy(model), favourite=tok.pad_token_id)  # PAD holds nearly all the mass
    prompts = [[5, 6, 7], [8]]
    params = SamplingParams(max_new_tokens=4, temperature=0.7, seed=0)
    gen = generate(model, prompts, params, eos_id=-1, pad_id=tok.pad_token_id)
    assert (gen.response_ids != tok.pad_token_id).all()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt + gen.response_ids[i].tolist()])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7  # (T, V)
            expected = logits.log_softmax(-1).gather(-1, gen.response_ids[i, :, None])[:, 0]
            torch.testing.assert_close(gen.logprobs[i], expected, rtol=1e-5, atol=1e-5)
            assert (expected < -5).all()  # PAD's mass is in the normaliser


@pytest.mark.parametrize("model_type", ["gpt2", "bloom", "llama"])
def test_a_model_training_with_gradient_checkpointing_samples_as_in_eval_mode(model_type: str) -> None:
    """PPO samples from the policy it trains: GPT-2 (and Bloom, Falcon) drop their KV cache in their own forward
    when `gradient_checkpointing and self.training`, and decoding failed on a shape mismatch. Sampling now runs
    in eval mode, each module's mode put back after."""
    from tests.archs import _spec, build_model, build_tokenizer

    tokenizer = build_tokenizer(_spec(model_type)[1])
    model = build_model(model_type, tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts, pad = [[5, 6, 7], [8, 9]], tokenizer.pad_token_id or 0
    eval_answer = generate(model.eval(), prompts, params, eos_id=-1, pad_id=pad)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.get_output_embeddings().eval()  # a module held in another mode keeps it
    answer = generate(model, prompts, params, eos_id=-1, pad_id=pad)
    assert torch.equal(answer.response_ids, eval_answer.response_ids)
    assert model.training and model.base_model.training and not model.get_output_embeddings().training
