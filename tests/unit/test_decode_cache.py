"""The generic decoding path (rlhf.engine.decode_cache) against transformers' own: the same answers and
log-probs as decoding over a `DynamicCache`, in fp32 and under bf16 autocast; the attention kernel against
SDPA; the model left as it was; and the models it must leave to the `DynamicCache` path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from rlhf.engine import decode_cache
from rlhf.engine.decode_cache import DecodeStep, decode_attention
from rlhf.engine.decoding import SamplingParams, generate
from rlhf.models.loading import load_causal_lm, load_tokenizer
from tests.archs import save_tiny

PROMPT_LENGTHS = [7, 2, 5, 1, 9, 3]  # left-padded
PARAMS = SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=3)


def _model(arch: str, root: Path):  # type: ignore[no-untyped-def]
    path = str(save_tiny(arch, root / arch))
    tok = load_tokenizer(path)
    return load_causal_lm(path, tokenizer=tok).eval(), tok


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _both(model, tok, monkeypatch, eos: int):  # type: ignore[no-untyped-def]
    """(slot path, DynamicCache path) generations of the same prompts."""
    prompts = _prompts(len(tok))
    assert decode_cache.supports(model, 9 + PARAMS.max_new_tokens)
    slots = generate(model, prompts, PARAMS, eos, int(tok.pad_token_id))
    with monkeypatch.context() as m:
        m.setattr(decode_cache, "supports", lambda model, length: False)
        dynamic = generate(model, prompts, PARAMS, eos, int(tok.pad_token_id))
    return slots, dynamic


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox", "gemma2", "gpt2"])
def test_slot_cache_decodes_as_the_dynamic_cache(arch: str, tmp_path: Path, monkeypatch) -> None:
    """fp32: the same tokens and log-probs, with rows ending early (the batch shrinks: the cache's rows go
    with it) and a cache that grows over more than one block of slots."""
    model, tok = _model(arch, tmp_path)
    # the answers' commonest first token ends a row: some rows stop at once, the others run on
    first = generate(model, _prompts(len(tok)), PARAMS, -1, int(tok.pad_token_id)).response_ids[:, 1]
    eos = int(first.mode().values)
    slots, dynamic = _both(model, tok, monkeypatch, eos)
    assert torch.equal(slots.response_ids, dynamic.response_ids)
    assert torch.equal(slots.response_mask, dynamic.response_mask)
    assert 0 < int(slots.ended.sum()) < len(PROMPT_LENGTHS)
    assert int(slots.response_mask.sum(-1).max()) > 32  # past the first block of slots
    torch.testing.assert_close(slots.logprobs, dynamic.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox", "gpt2"])
def test_under_bf16_autocast_the_slot_cache_decodes_as_the_dynamic_cache(
    arch: str, tmp_path: Path, monkeypatch
) -> None:
    """bf16: the cache in bf16, the fused attention kernel and the packed products give the log-probs that
    transformers' own bf16 forward gives, to bf16's precision (on a CPU without native bf16 too, emulated: a
    tiny model takes a second)."""
    model, tok = _model(arch, tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slots, dynamic = _both(model, tok, monkeypatch, -1)
    same = (slots.response_ids == dynamic.response_ids).cumprod(-1).bool()  # up to a row's first difference
    assert same[:, :8].all()
    torch.testing.assert_close(slots.logprobs[same], dynamic.logprobs[same], rtol=0, atol=0.05)


@pytest.mark.parametrize("amx", [False, True], ids=["no_amx", "amx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("additive", [False, True])
def test_decode_attention_is_sdpa_over_the_allowed_slots(
    dtype: torch.dtype, kv_heads: int, additive: bool, amx: bool, monkeypatch
) -> None:
    """Whichever form the CPU's kind selects (`_fused_in`): on an AMX CPU a bf16 cache read by one query row
    per KV head goes through SDPA's fused kernel, every other case through the matmuls."""
    monkeypatch.setattr(decode_cache, "_amx", lambda: amx)
    fused = amx and dtype == torch.bfloat16 and kv_heads == 4
    forms = {"fused": decode_cache.fused_attention, "matmul": decode_cache.matmul_attention}
    taken: list[str] = []
    for name, form in forms.items():
        monkeypatch.setattr(
            decode_cache,
            f"{name}_attention",
            lambda *a, _f=form, _n=name, **kw: taken.append(_n) or _f(*a, **kw),
        )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 16, generator=gen).to(dtype)
    k, v = (torch.randn(3, kv_heads, 40, 16, generator=gen).to(dtype) for _ in range(2))
    allowed = torch.rand(3, 1, 1, 40, generator=gen) > 0.3
    mask = torch.where(allowed, 0.0, float("-inf")) if additive else allowed
    out, _ = decode_attention(torch.nn.Module(), q, k, v, mask, scaling=0.3)  # (B, S, H, D)
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=allowed, scale=0.3, enable_gqa=kv_heads < 4
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0.02}
    torch.testing.assert_close(out.float(), expected.transpose(1, 2), **tol)
    assert taken == ["fused" if fused else "matmul"]


def test_decode_attention_soft_caps_the_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 2, 1, 8, generator=gen),
        torch.randn(2, 2, 5, 8, generator=gen),
        torch.randn(2, 2, 5, 8),
    )
    allowed = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    out, _ = decode_attention(torch.nn.Module(), q * 10, k, v, allowed, scaling=1.0, softcap=2.0)
    scores = torch.tanh((q * 10) @ k.mT / 2.0) * 2.0
    torch.testing.assert_close(out, (scores.softmax(-1) @ v).transpose(1, 2))


def test_a_decoding_step_leaves_the_model_as_it_was_even_when_it_fails(tmp_path: Path) -> None:
    model, _ = _model("qwen2", tmp_path)
    step = DecodeStep(model, batch=4)
    assert step.linears  # the projections and the output layer are packed (oneDNN is in torch's CPU builds)
    with pytest.raises(RuntimeError, match="inside"):
        with step.on():
            assert model.config._attn_implementation == decode_cache.DECODE_ATTENTION
            assert "forward" in model.lm_head.__dict__
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    # sharded weights (FSDP) are not copied: only the attention changes
    assert DecodeStep(model, batch=4, whole_weights=False).linears == []


def test_gpt2s_conv1d_products_are_packed_as_the_linears_are(tmp_path: Path) -> None:
    """GPT-2 multiplies through transformers' Conv1D (x @ W + b, W held as (in, out)): packed transposed, each
    gives what the module gives."""
    from transformers.pytorch_utils import Conv1D

    model, _ = _model("gpt2", tmp_path)
    convs = [m for m in model.modules() if type(m) is Conv1D]
    step = DecodeStep(model, batch=3)
    assert convs and {id(m) for m in convs} <= {id(m) for m, _ in step.linears}
    x = torch.randn(3, 1, convs[0].weight.size(0))
    expected = convs[0](x)
    with step.packed():
        torch.testing.assert_close(convs[0](x), expected, rtol=1e-5, atol=1e-5)


def test_gpt2s_seven_operation_gelu_is_torchs_fused_one_inside_a_step_only(tmp_path: Path) -> None:
    from transformers.activations import NewGELUActivation

    model, _ = _model("gpt2", tmp_path)
    gelus = [m for m in model.modules() if type(m) is NewGELUActivation]
    step = DecodeStep(model, batch=None)  # unpacked products: the activations are fused all the same
    assert gelus and {id(m) for m, _ in step.activations} == {id(m) for m in gelus}
    x = 3 * torch.randn(4, 1, 64)
    expected = gelus[0](x)
    with step.packed():
        assert "forward" in gelus[0].__dict__
        torch.testing.assert_close(gelus[0](x), expected, rtol=0, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())


def _mistral(window: int | None):  # type: ignore[no-untyped-def]
    config = CONFIG_MAPPING["mistral"](vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, sliding_window=window)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def test_a_sliding_window_shorter_than_the_sequence_takes_the_dynamic_cache() -> None:
    """A window that could cut is left to transformers' own masks; one that spans the sequence cannot cut."""
    assert decode_cache.supports(_mistral(None), 100)
    assert decode_cache.supports(_mistral(100), 100)
    assert not decode_cache.supports(_mistral(99), 100)
    model = _mistral(4).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    gen = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0), -1, pad_id=0)
    for i, prompt in enumerate(prompts):
        full = torch.tensor([prompt + gen.response_ids[i, :-1].tolist()])
        with torch.no_grad():
            expected = model(full).logits[0, len(prompt) - 1 :, 1:].argmax(-1) + 1  # PAD is never sampled
        assert gen.response_ids[i].tolist() == expected.tolist()
