"""The decoding batch (rlhf.engine.decode_batch) under continuous batching: rows that join a running batch
mid-way (left-padded along the slots) and leave it at different steps (their slots cut once no row uses
them) draw exactly the tokens that `generate` draws for each row alone, with the same log-probs in fp32, over
a `SlotCache` and over transformers' `DynamicCache`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from rlhf.engine import decode_batch, decode_cache
from rlhf.engine.decode_batch import DecodeBatch
from rlhf.engine.decoding import generate, left_pad, never_sampled
from rlhf.engine.sampling import RowStreams, SamplingParams, sample, stream_keys
from rlhf.models.loading import context_length, load_causal_lm, load_tokenizer
from tests.archs import ALIBI, save_tiny

# (prompt length, the step it joins at, the tokens it draws): rows join a wider and a narrower batch, leave
# before and after the others, and the cache grows past one block of slots (32)
SCHEDULE = [(5, 0, 12), (9, 0, 3), (2, 2, 30), (7, 4, 6), (1, 4, 17), (11, 9, 40), (3, 20, 5)]
PARAMS = SamplingParams(temperature=0.9, top_p=0.9)


def _model(arch: str, root: Path):  # type: ignore[no-untyped-def]
    path = str(save_tiny(arch, root / arch))
    tok = load_tokenizer(path)
    return load_causal_lm(path, tokenizer=tok).eval(), tok


def _decode_together(model, prompts: list[list[int]], keys: Tensor, pad_id: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Decode SCHEDULE's rows as a server does: newcomers prefilled as a batch of their own and joined to the
    running one, one step for every row, finished rows dropped and padding-only slots cut."""
    never = never_sampled(pad_id, [])
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    logprobs: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    batch: DecodeBatch | None = None
    rows: list[int] = []  # the sequence of each row of the batch
    next_ids = torch.zeros(0, dtype=torch.long)
    trimmed, widest, step = 0, 0, 0

    def draw(logits: Tensor, which: list[int]) -> Tensor:
        counters = torch.tensor([len(tokens[i]) for i in which])
        token, logprob = sample(logits, PARAMS, RowStreams(keys[which], counters), never)
        for i, t, lp in zip(which, token.tolist(), logprob.tolist(), strict=True):
            tokens[i].append(t)
            logprobs[i].append(lp)
        return token

    def prune() -> None:
        nonlocal batch, rows, next_ids, trimmed
        assert batch is not None
        keep = [r for r, i in enumerate(rows) if len(tokens[i]) < SCHEDULE[i][2]]
        if not keep:  # the batch has ended
            rows = []
        elif len(keep) < len(rows):
            before = batch.length
            assert batch.keep(torch.tensor(keep, dtype=torch.long))
            batch.trim()
            trimmed += before - batch.length
            rows, next_ids = [rows[r] for r in keep], next_ids[keep]

    while step == 0 or rows or any(join >= step for _, join, _ in SCHEDULE):
        newcomers = [i for i, (_, join, _) in enumerate(SCHEDULE) if join == step]
        if newcomers:
            fresh = DecodeBatch(model, context_length(model))
            logits = fresh.prefill(*left_pad([prompts[i] for i in newcomers], pad_id))
            first = draw(logits, newcomers)
            if batch is None or not rows:
                batch, rows, next_ids = fresh, newcomers, first
            else:
                batch.join(fresh)
                rows, next_ids = rows + newcomers, torch.cat([next_ids, first])
            prune()
        if batch is not None and rows:
            next_ids = draw(batch.step(next_ids), rows)
            widest = max(widest, batch.length)
            prune()
        step += 1
    assert batch is not None
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "trimmed": trimmed,
        "widest": widest,
        "slotted": batch.slotted,
    }


@pytest.mark.parametrize(
    ("arch", "slots"), [("llama", True), ("qwen2", True), ("llama", False), ("falcon_alibi", False)]
)
def test_rows_joining_and_leaving_draw_what_each_draws_alone(
    arch: str, slots: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = _model(arch, tmp_path)
    if not slots:
        monkeypatch.setattr(decode_cache, "supports", lambda model, length: False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, len(tok), (n,), generator=gen).tolist() for n, _, _ in SCHEDULE]
    keys = stream_keys(11, torch.arange(len(SCHEDULE)))  # (N,)
    pad = int(tok.pad_token_id)
    together = _decode_together(model, prompts, keys, pad)
    assert together["slotted"] == slots
    assert together["widest"] > 32  # past the first block of slots
    assert together["trimmed"] > 0  # the padding of rows that left was cut
    for i, (prompt, (_, _, n)) in enumerate(zip(prompts, SCHEDULE, strict=True)):
        params = SamplingParams(max_new_tokens=n, temperature=PARAMS.temperature, top_p=PARAMS.top_p)
        alone = generate(model, [prompt], params, eos_id=-1, pad_id=pad, seeds=keys[i : i + 1])
        assert together["tokens"][i] == alone.response_ids[0].tolist()  # type: ignore[index]
        got = torch.tensor(together["logprobs"][i])  # type: ignore[index]
        # a batched product rounds differently from a row's own: some units of fp32's last place, relative to
        # the log-prob's size (how many depends on the kernels a CPU's instruction set selects)
        torch.testing.assert_close(got, alone.logprobs[0], rtol=4e-6, atol=2e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "bloom", "falcon_alibi"])
def test_greedy_decoding_draws_what_transformers_generate_draws(arch: str, tmp_path: Path) -> None:
    """Left-padded prompts of different lengths, greedy: the same tokens as `model.generate(do_sample=False)`,
    over a `SlotCache` where the model takes one, and over `DynamicCache` for ALiBi models (Bloom, Falcon with
    `alibi`), whose position biases come from each row's 2-D mask."""
    model, tok = _model(arch, tmp_path)
    assert decode_cache.supports(model, 64) == (arch not in ALIBI)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, len(tok), (n,), generator=gen).tolist() for n in (6, 2, 9, 4)]
    eos, pad = int(tok.eos_token_id), int(tok.pad_token_id)
    ours = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0), eos, pad)
    ids, mask = left_pad(prompts, pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             eos_token_id=eos, pad_token_id=pad)  # fmt: skip
    assert int(ours.response_mask.sum()) > 2 * len(prompts)
    assert ours.response_ids.tolist() == out[:, ids.size(1) :].tolist()


def test_batches_of_different_caches_do_not_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = _model("llama", tmp_path)
    slotted = DecodeBatch(model, 64)
    slotted.prefill(*left_pad([[5, 6, 7]], int(tok.pad_token_id)))
    monkeypatch.setattr(decode_cache, "supports", lambda model, length: False)
    dynamic = DecodeBatch(model, 64)
    dynamic.prefill(*left_pad([[8, 9]], int(tok.pad_token_id)))
    assert slotted.slotted and not dynamic.slotted
    with pytest.raises(ValueError, match="cannot be joined"):
        slotted.join(dynamic)


@pytest.mark.parametrize("slots", [True, False], ids=["slot_cache", "dynamic_cache"])
def test_synced_decoding_keeps_no_graph_and_its_cache(
    slots: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`synced` (a policy sharded by FSDP, in training mode, as PPO rollouts decode it) runs outside inference
    mode but without gradients: with gradient checkpointing on, its layers keep the KV cache, and each step's
    logits are those of the same model decoding in eval mode."""
    model, tok = _model("llama", tmp_path)
    if not slots:
        monkeypatch.setattr(decode_cache, "supports", lambda model, length: False)
    trained = load_causal_lm(str(tmp_path / "llama"), tokenizer=tok)
    trained.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trained.train()
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], int(tok.pad_token_id))
    want, got = DecodeBatch(model, 64), DecodeBatch(trained, 64, synced=True)
    expected, logits = want.prefill(ids, mask), got.prefill(ids, mask)
    assert got.slotted == slots
    for _ in range(3):
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        next_ids = expected.argmax(-1)  # (B,)
        expected, logits = want.step(next_ids), got.step(next_ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert not logits.requires_grad


def test_a_mixture_of_experts_that_outputs_router_logits_decodes_as_one_that_does_not(tmp_path: Path) -> None:
    """A Mixtral whose config asks for router logits (`output_router_logits`, for its load-balancing loss in
    training) samples the same tokens as without them: the decoding steps turn them off."""
    path = save_tiny("mixtral", tmp_path / "moe")
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer=tok).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    plain = generate(model, prompts, params, int(tok.eos_token_id), int(tok.pad_token_id))
    model.config.output_router_logits = True
    routed = generate(model, prompts, params, int(tok.eos_token_id), int(tok.pad_token_id))
    assert int(plain.response_mask.sum()) > len(prompts)
    assert torch.equal(routed.response_ids, plain.response_ids)
    torch.testing.assert_close(routed.logprobs, plain.logprobs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_a_packed_prefill_computes_what_a_padded_one_does(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of very unequal lengths are prefilled packed (their real tokens end to end in rows, one
    block-diagonal mask): the prefill's logits, and those of the steps after it over the cache it laid out
    left-padded, are the padded prefill's (SDPA's boolean mask and eager attention's additive one)."""
    model, tok = _model(arch, tmp_path)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, len(tok), (n,), generator=gen).tolist() for n in (40, 3, 6, 2, 5, 4, 3, 6)]
    ids, mask = left_pad(prompts, int(tok.pad_token_id))
    packed, padded = DecodeBatch(model, 64), DecodeBatch(model, 64)
    assert packed.packed_prefill is not None and packed.packed_prefill.layout(ids, mask) is not None
    got = packed.prefill(ids, mask)
    monkeypatch.setattr(decode_batch, "_PACK_PREFILL_AT", 0.0)  # packing never saves enough
    assert padded.packed_prefill is not None and padded.packed_prefill.layout(ids, mask) is None
    want = padded.prefill(ids, mask)
    for _ in range(4):  # the first step reads what the prefill cached; the cache grows past one block at 32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        next_ids = want.argmax(-1)  # (B,)
        got, want = packed.step(next_ids), padded.step(next_ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert packed.length == padded.length == ids.size(1) + 4
