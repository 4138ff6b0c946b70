"""rlhf.train.common's precision choice: bf16 only where the CPU multiplies it natively, fp32 elsewhere."""

from __future__ import annotations

import logging

import pytest

from rlhf.train import common
from rlhf.train.common import native_bf16, resolve_precision

XEON_AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
EPYC_AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
EPYC_AVX2 = {"avx2", "fma"}


@pytest.mark.parametrize(
    ("flags", "capability", "onednn", "expected"),
    [
        (XEON_AMX, "AVX512", None, True),
        (EPYC_AVX512_BF16, "AVX512", None, True),
        (EPYC_AVX2, "AVX2", None, False),
        (XEON_AMX, "AVX2", None, False),  # ATEN_CPU_CAPABILITY=avx2: torch's own kernels held to AVX2
        (XEON_AMX, "AVX512", "avx2", False),  # ONEDNN_MAX_CPU_ISA=avx2: bf16 matmuls emulated
        (XEON_AMX, "AVX512", "AVX512_CORE", False),
        (XEON_AMX, "AVX512", "AVX512_CORE_AMX", True),
        ({"avx512f"}, "AVX512", None, False),  # AVX-512 without its bf16 extension
        (set(), "DEFAULT", None, False),  # another architecture
    ],
)
def test_native_bf16_needs_the_flag_and_no_lower_kernel_limit(flags, capability, onednn, expected) -> None:
    assert native_bf16(flags, capability, onednn) is expected


@pytest.mark.parametrize(("native", "chosen"), [(True, "bf16"), (False, "no")])
def test_auto_precision_follows_the_cpu_and_is_logged_once(monkeypatch, caplog, native, chosen) -> None:
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: native)
    common._auto_precision.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="rlhf.train.common"):
            assert resolve_precision("auto") == chosen
            assert resolve_precision("auto") == chosen
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto")]
        assert len(lines) == 1 and lines[0].startswith(f"precision auto: {'bf16' if native else 'fp32'}")
        assert resolve_precision("fp32") == "no" and resolve_precision("bf16") == "bf16"
    finally:
        common._auto_precision.cache_clear()
