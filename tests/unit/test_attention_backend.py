"""rlhf.train.common.short_attention: SDPA's math backend for short bf16 training forwards on a CPU only."""

from __future__ import annotations

import torch

from rlhf.train.common import MATH_ATTENTION_MAX_LEN, short_attention

CPU = torch.device("cpu")


def flash_allowed() -> bool:
    return torch.backends.cuda.flash_sdp_enabled()


def test_a_short_bf16_training_forward_on_a_cpu_takes_the_math_backend() -> None:
    assert flash_allowed()
    with short_attention(MATH_ATTENTION_MAX_LEN, CPU, half=True):
        assert not flash_allowed() and torch.backends.cuda.math_sdp_enabled()
    assert flash_allowed()  # restored on exit


def test_fp32_long_sequences_gpus_and_no_grad_keep_torchs_choice() -> None:
    cases = [(52, CPU, False), (MATH_ATTENTION_MAX_LEN + 1, CPU, True), (52, torch.device("cuda"), True)]
    for length, device, half in cases:
        with short_attention(length, device, half):
            assert flash_allowed(), (length, device, half)
    with torch.no_grad(), short_attention(52, CPU, half=True):
        assert flash_allowed()


def test_the_math_backend_gives_the_same_attention_and_gradients() -> None:
    q, k, v = (torch.randn(2, 4, 52, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(52, 52, dtype=torch.bool).tril()
    results = []
    for half in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), short_attention(52, CPU, half):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        (grad,) = torch.autograd.grad(out.float().square().sum(), q)
        results.append((out.float(), grad))
    (out_flash, grad_flash), (out_math, grad_math) = results
    torch.testing.assert_close(out_math, out_flash, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(grad_math, grad_flash, atol=1e-1, rtol=5e-2)
