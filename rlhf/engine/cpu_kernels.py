"""Fused CPU kernels (cpu_kernels.c) for the lean Llama forward: RMS norm with its cast to bf16, the QKV split
with queries and keys rotated, and SwiGLU, each with its backward, as autograd functions; and, for the decoder
(rlhf.engine.fast_decode), attention over its KV cache.

Under bf16 autocast on a CPU the passes between a layer's matmuls are bound by memory, and torch runs each
elementwise chain as several passes (a norm's backward alone as a dozen). These do each chain in one pass.
The C source is compiled on first use with the system's C compiler (`CC`, else `cc`) for this CPU
(`-march=native`) and cached under `$RLHF_KERNEL_CACHE` (default `~/.cache/rlhf-loop`), keyed by the source,
the flags and the CPU's features. Without a compiler, or with `RLHF_CPU_KERNELS=0`, `library()` is None
and the lean forward keeps torch's ops; `tests/unit/test_cpu_kernels.py` checks both give the same values
and gradients.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -O2 with the vectorizer, not -O3: gcc 12's -O3 made the SwiGLU forward 5x slower here
FLAGS = "-O2 -ftree-vectorize -march=native -fno-math-errno -fno-trapping-math -shared -fPIC".split()
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # argument types; the last of each is the thread count
    "rms_norm_fwd": [_P, _P, _I, _I, _F, _P, _P, ctypes.c_int],
    "rms_norm_bwd": [_P, _P, _P, _P, _I, _I, _P, _P, ctypes.c_int],
    "rotary_split_fwd": [_P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P, ctypes.c_int],
    "rotary_split_bwd": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P, ctypes.c_int],
    "swiglu_fwd": [_P, _I, _I, _P, ctypes.c_int],
    "swiglu_bwd": [_P, _P, _I, _I, _P, ctypes.c_int],
    "cached_attention": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P, ctypes.c_int],
}


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's flags (Linux), else the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(compiler: str, target: Path) -> None:
    """Build the shared library into `target` atomically, with OpenMP where the compiler has it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for extra in (["-fopenmp"], []):
            done = subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", str(out), "-lm"],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode == 0:
                os.replace(out, target)
                return
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise OSError(f"{compiler} could not build {SOURCE.name}: {last}")


@functools.cache
def library() -> Any:
    """The loaded kernels (ctypes.CDLL), built on first use; None where they cannot be, which is logged once."""
    if os.environ.get("RLHF_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler found: the lean forward uses torch's ops for its elementwise chains")
        return None
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *FLAGS, compiler, _cpu_features()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("RLHF_KERNEL_CACHE") or Path.home() / ".cache" / "rlhf-loop")
    target = cache / f"cpu_kernels-{key}.so"
    try:
        if not target.exists():
            log.info("building the fused CPU kernels into %s", target)
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        log.warning("fused CPU kernels unavailable, using torch's ops: %s", e)
        return None
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def applies(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels serve a forward whose residual stream is `x` and whose matmuls run in `dtype`:
    on a CPU, an fp32 stream under bf16 autocast, and the library built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and dtype == torch.bfloat16
        and library() is not None
    )


class _RMSNormCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # every tensor whose address C reads is held by a name for the call's length
        x, weight = x.contiguous(), weight.contiguous()
        d = x.size(-1)
        y = torch.empty(x.shape, dtype=torch.bfloat16)
        rstd = torch.empty(x.numel() // d)
        library().rms_norm_fwd(x.data_ptr(), weight.data_ptr(), rstd.numel(), d, eps, y.data_ptr(),
                               rstd.data_ptr(), torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        gy = gy.to(torch.bfloat16).contiguous()
        threads = torch.get_num_threads()
        gx = torch.empty_like(x)
        gw = torch.zeros(threads, x.size(-1))
        library().rms_norm_bwd(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), gy.data_ptr(), rstd.numel(),
                               x.size(-1), gx.data_ptr(), gw.data_ptr(), threads)  # fmt: skip
        return gx, (gw.sum(0) if ctx.needs_input_grad[1] else None), None


def rms_norm_cast(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm of fp32 `x` (..., d) with fp32 `weight`, rounded to bf16: F.rms_norm(x, (d,), weight, eps)
    .to(torch.bfloat16) in one pass, and its backward in one."""
    return _RMSNormCast.apply(x, weight, eps)


class _RotarySplit(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        rows, width, _, dim = qkv.shape
        if cos.shape != (rows, width, 1, dim) or sin.shape != cos.shape or cos.dtype != torch.float32:
            raise ValueError(
                f"rotary tables {tuple(cos.shape)} {cos.dtype}: need ({rows}, {width}, 1, {dim}) fp32"
            )
        q = torch.empty(rows, heads, width, dim, dtype=torch.bfloat16)
        k = torch.empty(rows, kv_heads, width, dim, dtype=torch.bfloat16)
        v = torch.empty_like(k)
        library().rotary_split_fwd(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, width, heads, kv_heads,
                                   dim, q.data_ptr(), k.data_ptr(), v.data_ptr(), torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(cos, sin)
        ctx.shape = qkv.shape
        return q, k, v

    @staticmethod
    def backward(ctx: Any, gq: Tensor, gk: Tensor, gv: Tensor) -> tuple[Tensor, None, None, None, None]:
        cos, sin = ctx.saved_tensors
        rows, width, all_heads, dim = ctx.shape
        heads = gq.size(1)
        kv_heads = (all_heads - heads) // 2
        gqkv = torch.empty(ctx.shape, dtype=torch.bfloat16)
        gq, gk, gv = (g.to(torch.bfloat16).contiguous() for g in (gq, gk, gv))
        library().rotary_split_bwd(gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                   rows, width, heads, kv_heads, dim, gqkv.data_ptr(),
                                   torch.get_num_threads())  # fmt: skip
        return gqkv, None, None, None, None


def rotary_split(
    qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection `qkv` (R, W, H + 2 H_kv, D) bf16 as queries (R, H, W, D), keys and values
    (R, H_kv, W, D), queries and keys rotated by `lean_llama.rotate` with its fp32 tables (R, W, 1, D)."""
    q, k, v = _RotarySplit.apply(qkv, cos, sin, heads, kv_heads)
    return q, k, v


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up: Tensor) -> Tensor:
        gate_up = gate_up.contiguous()
        inner = gate_up.size(-1) // 2
        y = torch.empty(*gate_up.shape[:-1], inner, dtype=torch.bfloat16)
        library().swiglu_fwd(
            gate_up.data_ptr(), y.numel() // inner, inner, y.data_ptr(), torch.get_num_threads()
        )
        ctx.save_for_backward(gate_up)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        gy = gy.to(torch.bfloat16).contiguous()
        inner = gate_up.size(-1) // 2
        grad = torch.empty_like(gate_up)
        library().swiglu_bwd(gate_up.data_ptr(), gy.data_ptr(), gy.numel() // inner, inner, grad.data_ptr(),
                             torch.get_num_threads())  # fmt: skip
        return grad


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for the fused gate/up projection (..., 2 I) bf16 (gate first), in bf16."""
    return _SwiGLU.apply(gate_up)


def cached_attention(q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Decoding attention, no gradient: queries q (B, H, S, D) over a KV cache keys, values (B, H_kv, L, D) bf16,
    allowed (B, 1, S, L) bool; (B, H, S, D) bf16. Softmax and the weighted sum in fp32, slots not allowed
    skipped."""
    batch, heads, steps, dim = q.shape
    kv_heads, slots = keys.size(1), keys.size(2)
    if (
        keys.dtype != torch.bfloat16
        or values.shape != keys.shape
        or allowed.shape != (batch, 1, steps, slots)
    ):
        raise ValueError(f"cache {tuple(keys.shape)} {keys.dtype}, mask {tuple(allowed.shape)}: do not fit")
    q, keys, values = q.to(torch.bfloat16).contiguous(), keys.contiguous(), values.contiguous()
    allowed = allowed.contiguous()
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    library().cached_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), allowed.data_ptr(), batch,
                               kv_heads, heads // kv_heads, steps, slots, dim, scale, out.data_ptr(),
                               torch.get_num_threads())  # fmt: skip
    return out
