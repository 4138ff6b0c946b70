import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf.config import ArchConfig
from rlhf.engine import fast_decode
from rlhf.engine.decoding import left_pad
from rlhf.engine.fast_decode import LlamaDecoder
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer
from tests.cpu import needs_native_bf16


@pytest.fixture(scope="module")
def gqa_model():
    """Two query heads per KV head, so the grouped-attention path is exercised."""
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    arch = ArchConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return build_causal_lm(arch, tok, seed=3).eval()


def _prefill_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    width = prompt_mask.size(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (causal & prompt_mask.bool()[:, None, None, :]) | torch.eye(width, dtype=torch.bool)


@torch.no_grad()
def test_prefill_and_decode_match_the_transformers_forward(gqa_model) -> None:
    model = gqa_model
    assert LlamaDecoder.supports(model)
    prompt_ids, prompt_mask = left_pad([[5, 9, 14, 20, 7], [11, 3]], pad_id=0)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    decoder = LlamaDecoder(model, batch=2, max_len=8, dtype=torch.float32)
    logits = decoder.forward(prompt_ids, positions, _prefill_mask(prompt_mask), start=0)  # (B, V)
    expected = model(prompt_ids, attention_mask=prompt_mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    # one decoding step over the cache equals a full forward over prompt + the new token
    new = torch.tensor([[30], [40]])
    keys = torch.cat([prompt_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = decoder.forward(new, positions[:, -1:] + 1, keys.bool()[:, None, None, :], start=5)
    full = model(
        torch.cat([prompt_ids, new], dim=1),
        attention_mask=keys,
        position_ids=torch.cat([positions, positions[:, -1:] + 1], dim=1),
    ).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_long_decoding_over_a_growing_cache_matches_the_transformers_forward(gqa_model) -> None:
    """On a CPU the cache grows by blocks of slots as decoding goes on; every step's logits still equal a full
    forward over the prompt and the tokens so far, also after rows leave the batch."""
    prompt_ids, prompt_mask = left_pad([[5, 9, 14, 20, 7], [11, 3], [8, 8, 8]], pad_id=0)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    steps = fast_decode._SLOT_BLOCK + 8
    decoder = LlamaDecoder(gqa_model, batch=3, max_len=5 + steps, dtype=torch.float32)
    decoder.forward(prompt_ids, positions, _prefill_mask(prompt_mask), start=0)
    ids, mask, pos = prompt_ids, prompt_mask, positions
    tokens = torch.randint(4, 250, (3, steps), generator=torch.Generator().manual_seed(0))
    sizes = set()
    for step in range(steps):
        if step == steps - 4:  # the middle row leaves
            decoder.keep(torch.tensor([0, 2]))
            ids, mask, pos, tokens = ids[[0, 2]], mask[[0, 2]], pos[[0, 2]], tokens[[0, 2]]
        new, new_pos = tokens[:, step : step + 1], pos[:, -1:] + 1
        ids, mask = torch.cat([ids, new], dim=1), torch.cat([mask, torch.ones_like(new)], dim=1)
        pos = torch.cat([pos, new_pos], dim=1)
        logits = decoder.forward(new, new_pos, mask.bool()[:, None, None, :], start=4 + step + 1)
        full = gqa_model(ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-4)
        sizes.add(decoder.keys[0].size(2))
    assert len(sizes) >= 2  # the cache did grow on the way


@needs_native_bf16
@torch.no_grad()
def test_bf16_matmuls_stay_as_close_to_fp32_as_autocast(gqa_model) -> None:
    """Under autocast the residual stream and norms stay fp32 and only the matmuls run in bf16; so here."""
    prompt_ids, prompt_mask = left_pad([[5, 9, 14, 20, 7, 8, 30], [11, 3, 4]], pad_id=0)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    fp32 = gqa_model(prompt_ids, attention_mask=prompt_mask, position_ids=positions).logits[:, -1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = gqa_model(prompt_ids, attention_mask=prompt_mask, position_ids=positions).logits[:, -1]
        ours = LlamaDecoder(gqa_model, batch=2, max_len=8, dtype=torch.bfloat16).forward(
            prompt_ids, positions, _prefill_mask(prompt_mask), start=0
        )
    assert ours.dtype == torch.float32
    assert (ours - fp32).abs().max() <= 2 * (autocast.float() - fp32).abs().max() + 1e-4


def test_supports_plain_llama_only(gqa_model) -> None:
    lora = get_peft_model(
        build_causal_lm(
            ArchConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            ),
            train_bpe_tokenizer(["a b c"] * 10, vocab_size=270),
        ),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    assert not LlamaDecoder.supports(lora)  # the adapter's forward is not reproduced: transformers runs it
    gqa_model.config.rope_parameters = {**gqa_model.config.rope_parameters, "rope_type": "linear"}
    try:
        assert not LlamaDecoder.supports(gqa_model)
    finally:
        gqa_model.config.rope_parameters = {**gqa_model.config.rope_parameters, "rope_type": "default"}
