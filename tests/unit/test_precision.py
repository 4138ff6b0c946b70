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


@pytest.mark.parametrize(
    ("flags", "capability", "expected"),
    [
        ("fpu avx2 fma avx512f avx512_bf16", "AVX512", True),  # EPYC Zen 4
        ("fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", "AVX512", True),  # Xeon Sapphire Rapids
        ("fpu avx2 fma", "AVX2", False),  # AVX2 only: bf16 emulated, fp32 chosen
        ("fpu avx2 fma avx512f avx512_bf16", "AVX2", False),  # torch's kernels held to AVX2
        (None, "AVX512", False),  # no /proc/cpuinfo (not Linux)
    ],
)
def test_cpu_has_bf16_reads_cpuinfo_and_torch_capability(
    monkeypatch, tmp_path, flags, capability, expected
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:  # one line per core, as Linux writes it
        cpuinfo.write_text("".join(f"processor\t: {i}\nflags\t\t: {flags}\n\n" for i in range(2)))
    monkeypatch.setattr(common, "CPUINFO", cpuinfo)
    monkeypatch.setattr(common.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    common.cpu_has_bf16.cache_clear()
    try:
        assert common.cpu_has_bf16() is expected
    finally:
        common.cpu_has_bf16.cache_clear()


@pytest.mark.parametrize(("bf16_supported", "chosen"), [(True, "bf16"), (False, "no")])
def test_auto_precision_on_cuda_follows_the_gpu_not_the_cpu(
    monkeypatch, caplog, bf16_supported, chosen
) -> None:
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: not bf16_supported)  # never consulted
    common._auto_precision.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="rlhf.train.common"):
            assert resolve_precision("auto") == chosen
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto")]
        assert len(lines) == 1 and "CUDA" in lines[0]
        assert resolve_precision("fp32") == "no"  # the setting overrides the choice
    finally:
        common._auto_precision.cache_clear()
