"""The fused CPU kernels (rlhf.engine.cpu_kernels) compute what torch's ops compute: each kernel's output and
gradients against an fp32 autograd reference rounded to bf16, the whole lean forward against its torch-ops
path and fp32, on one thread and two; and the library is skipped, not failed, where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from rlhf.config import ArchConfig
from rlhf.engine import cpu_kernels, lean_llama
from rlhf.engine.packing import packed_layout
from rlhf.models.loading import build_causal_lm
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.train.common import cpu_has_bf16

# The kernels serve bf16 autocast, which is chosen only where the CPU multiplies bf16 natively: elsewhere they
# are not built (nor tested); the fallback when they cannot be built is tested everywhere.
needs_kernels = pytest.mark.skipif(
    not cpu_has_bf16() or cpu_kernels.library() is None,
    reason="bf16 kernels: built where the CPU multiplies bf16 natively and a C compiler is found",
)
BF16 = torch.bfloat16


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between two bf16 tensors, in units of bf16's spacing at b's magnitude."""
    spacing = torch.finfo(BF16).eps * b.float().abs().clamp_min(1e-30)
    return ((a.float() - b.float()).abs() / spacing).max().item()


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_kernels
def test_rms_norm_cast_and_its_gradients(threads: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 7, 96, generator=g) * 3).requires_grad_()
    w = (torch.rand(96, generator=g) + 0.5).requires_grad_()
    gy = torch.randn(5, 7, 96, generator=g).to(BF16)
    y = cpu_kernels.rms_norm_cast(x, w, 1e-6)
    assert y.dtype == BF16 and y.shape == x.shape
    ref = F.rms_norm(x, (96,), w, 1e-6)
    assert ulps(y, ref.detach().to(BF16)) <= 1
    (gx, gw) = torch.autograd.grad(y, (x, w), gy)
    (rx, rw) = torch.autograd.grad(ref, (x, w), gy.float())
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-4)  # summed over rows, across threads


@needs_kernels
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rotary_split_rotates_queries_and_keys_and_passes_values(threads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(1)
    rows, width, heads, dim = 3, 10, 4, 16
    qkv = torch.randn(rows, width, heads + 2 * kv_heads, dim, generator=g).to(BF16).requires_grad_()
    positions = torch.randint(0, 50, (rows, width), generator=g)
    cos, sin = lean_llama.rotary_tables(1.0 / 10000 ** (torch.arange(0, dim, 2) / dim), 1.0, positions)
    q, k, v = cpu_kernels.rotary_split(qkv, cos, sin, heads, kv_heads)
    # the reference: lean_llama.rotate in fp32, then split into heads-first layouts
    x = qkv.detach().float().requires_grad_()
    qk = lean_llama.rotate(x[:, :, : heads + kv_heads], cos, sin).transpose(1, 2)
    rq, rk = qk.split([heads, kv_heads], dim=1)
    rv = x[:, :, heads + kv_heads :].transpose(1, 2)
    assert q.shape == (rows, heads, width, dim) and k.shape == v.shape == (rows, kv_heads, width, dim)
    for ours, ref in ((q, rq), (k, rk)):
        assert ulps(ours, ref.detach().to(BF16)) <= 1
    assert torch.equal(v, rv.detach().to(BF16))
    grads = [torch.randn(t.shape, generator=g).to(BF16) for t in (q, k, v)]
    (ours,) = torch.autograd.grad((q, k, v), qkv, grads)
    (ref,) = torch.autograd.grad((rq, rk, rv), x, [t.float() for t in grads])
    assert ours.dtype == BF16
    assert ulps(ours, ref.to(BF16)) <= 1
    with pytest.raises(ValueError, match="rotary tables"):  # tables for other rows than qkv's
        cpu_kernels.rotary_split(qkv, cos[:1], sin[:1], heads, kv_heads)


@needs_kernels
def test_swiglu_and_its_gradient(threads: int) -> None:
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(4, 6, 2 * 40, generator=g) * 4).to(BF16).requires_grad_()
    y = cpu_kernels.swiglu(gate_up)
    x = gate_up.detach().float().requires_grad_()
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert y.shape == (4, 6, 40) and ulps(y, ref.detach().to(BF16)) <= 1
    gy = torch.randn(y.shape, generator=g).to(BF16)
    (ours,) = torch.autograd.grad(y, gate_up, gy)
    (theirs,) = torch.autograd.grad(ref, x, gy.float())
    assert ulps(ours, theirs.to(BF16)) <= 1


@needs_kernels
def test_lean_forward_with_kernels_is_as_close_to_fp32_as_with_torch_ops(monkeypatch, threads: int) -> None:
    """Outputs and every weight's gradient under bf16 autocast, fused and not, against the fp32 forward."""
    arch = ArchConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)  # fmt: skip
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    model = build_causal_lm(arch, tok, seed=3)
    ids = torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, 9:] = 0
    lay = packed_layout(ids * mask, mask, 6, pad_id=0)
    weights = torch.linspace(-1, 1, 64)

    def run(autocast: bool, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(cpu_kernels, "applies", lambda x, dtype: fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            hidden = lean_llama.hidden_states(model, *lay.inputs.values())
        (hidden * weights).square().sum().backward()
        return hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fp32, fp32_grads = run(autocast=False, fused=False)
    torch_ops, torch_grads = run(autocast=True, fused=False)
    fused, fused_grads = run(autocast=True, fused=True)
    assert len(fused_grads) == len(fp32_grads) == len(list(model.model.parameters()))
    assert not torch.equal(fused, torch_ops)  # the fused path did run
    assert (fused - fp32).abs().max() <= 1.5 * (torch_ops - fp32).abs().max() + 1e-4
    for ref, a, b in zip(fp32_grads, torch_grads, fused_grads, strict=True):
        assert (b - ref).norm() <= 1.5 * (a - ref).norm() + 1e-3 * ref.norm()


@needs_kernels
def test_applies_only_to_an_fp32_stream_under_bf16_on_a_cpu() -> None:
    x = torch.zeros(2, 3)
    assert cpu_kernels.applies(x, BF16)
    assert not cpu_kernels.applies(x, torch.float32)  # no autocast: torch's ops
    assert not cpu_kernels.applies(x, torch.float16)
    assert not cpu_kernels.applies(x.to(BF16), BF16)  # a bf16 residual stream


def test_library_is_skipped_where_it_cannot_be_built(monkeypatch, tmp_path, caplog) -> None:
    cpu_kernels.library.cache_clear()
    try:
        monkeypatch.setenv("RLHF_KERNEL_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        with caplog.at_level(logging.WARNING, logger="rlhf.engine.cpu_kernels"):
            assert cpu_kernels.library() is None
        assert "could not build cpu_kernels.c" in caplog.text
        assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind
        assert not cpu_kernels.applies(torch.zeros(2, 3), BF16)
        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setenv("RLHF_CPU_KERNELS", "0")
        assert cpu_kernels.library() is None
    finally:
        cpu_kernels.library.cache_clear()


@needs_kernels
@pytest.mark.parametrize("steps", [1, 5], ids=["decode", "prefill"])
def test_cached_attention_is_softmax_attention_over_the_allowed_slots(threads: int, steps: int) -> None:
    g = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, slots, dim = 3, 4, 2, 40, 16
    q = torch.randn(batch, heads, steps, dim, generator=g).to(BF16)
    keys, values = (torch.randn(batch, kv_heads, slots, dim, generator=g).to(BF16) for _ in range(2))
    allowed = torch.rand(batch, 1, steps, slots, generator=g) < 0.6
    allowed[..., 0] = True
    values[:, :, 1] = float("nan")  # an unwritten slot: masked out, so never read
    allowed[..., 1] = False
    out = cpu_kernels.cached_attention(q, keys, values, allowed, dim**-0.5)
    # reference in fp32: each query head reads its KV head (heads grouped KV-major)
    k, v = (t.float().repeat_interleave(heads // kv_heads, dim=1) for t in (keys, values))
    scores = (q.float() @ k.mT * dim**-0.5).masked_fill(~allowed, float("-inf"))
    ref = scores.softmax(-1).nan_to_num() @ v.nan_to_num()
    assert out.shape == q.shape and out.dtype == BF16 and torch.isfinite(out.float()).all()
    assert ulps(out, ref.to(BF16)) <= 2


@needs_kernels
@torch.no_grad()
def test_decoder_with_kernels_decodes_as_close_to_fp32_as_with_torch_ops(monkeypatch) -> None:
    """bf16 decoding over a growing cache, a row leaving midway: logits of the fused decoder and of the
    torch-ops one against transformers' fp32 forward, step by step."""
    from rlhf.engine import fast_decode
    from rlhf.engine.decoding import left_pad

    arch = ArchConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)  # fmt: skip
    tok = train_bpe_tokenizer(["User: Hello there friend\nAssistant: Hi!"] * 30, vocab_size=280)
    model = build_causal_lm(arch, tok, seed=3).eval()
    ids, mask = left_pad([[5, 9, 14, 20, 7], [11, 3], [8, 8, 8, 1]], pad_id=0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    width = ids.size(1)
    prefill = (torch.ones(width, width, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]) | torch.eye(
        width, dtype=torch.bool
    )
    steps = fast_decode._SLOT_BLOCK + 6
    decoders = {}
    for fused in (False, True):
        monkeypatch.setattr(cpu_kernels, "applies", lambda x, dtype, fused=fused: fused)
        decoders[fused] = fast_decode.LlamaDecoder(model, batch=3, max_len=width + steps, dtype=BF16)
        decoders[fused].forward(ids, pos, prefill, start=0)
    tokens = torch.randint(4, 250, (3, steps), generator=torch.Generator().manual_seed(0))
    worst = {False: 0.0, True: 0.0}
    for step in range(steps):
        if step == steps - 3:  # the middle row leaves
            for d in decoders.values():
                d.keep(torch.tensor([0, 2]))
            ids, mask, pos, tokens = ids[[0, 2]], mask[[0, 2]], pos[[0, 2]], tokens[[0, 2]]
        new, new_pos = tokens[:, step : step + 1], pos[:, -1:] + 1
        ids, mask = torch.cat([ids, new], dim=1), torch.cat([mask, torch.ones_like(new)], dim=1)
        pos = torch.cat([pos, new_pos], dim=1)
        fp32 = model(ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        for fused, d in decoders.items():
            monkeypatch.setattr(cpu_kernels, "applies", lambda x, dtype, fused=fused: fused)
            logits = d.forward(new, new_pos, mask.bool()[:, None, None, :], start=width + step)
            worst[fused] = max(worst[fused], (logits - fp32).abs().max().item())
    assert 0 < worst[True] <= 1.5 * worst[False] + 1e-3
