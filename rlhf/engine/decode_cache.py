"""Decoding through any transformers causal LM's own forward on a CPU, without the per-step costs of its
generic machinery: a KV cache written a column per step, one attention mask per step shared by every layer,
and an attention kernel for one new token over that cache.

Each piece plugs into an extension point transformers maintains, so no architecture is re-implemented:
  `SlotCache`        a `Cache` whose layers hold their keys and values in buffers that grow by blocks of
                     _SLOT_BLOCK slots (one copy per block) and are written in place, where `DynamicCache`
                     concatenates, copying the whole cache, at every step and layer.
  4-D masks          a (B, 1, 1, slots) mask passed as `attention_mask` is used as is by `masking_utils` (no
                     mask built per step): additive, from a boolean one whose column the decoder writes per step.
  `decode_attention` registered in `AttentionInterface` and selected for the decoding steps only (the prefill
                     runs the model's configured attention and builds its own mask): matmul-softmax-matmul,
                     or SDPA's fused kernel where that measured faster (`_fused_in`).
`supports` says which models this serves; the others decode through `DynamicCache` (rlhf.engine.decoding).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.activations import FastGELUActivation, NewGELUActivation
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.pytorch_utils import Conv1D

from rlhf.engine.lean_llama import on_cpu
from rlhf.engine.packing import sliding_window, uses_alibi, within_window


def packer(device: torch.device, dtype: torch.dtype, batch: int) -> Callable[[Tensor], Tensor]:
    """How to hold a weight for `packed_linear`: on a CPU with oneDNN, in fp32 or bf16, prepacked once into oneDNN's
    blocked layout for this batch size; as is elsewhere. A plain product repacks the weight at every call: at
    batch 64 the packed product of a (3072, 512) bf16 weight took 0.56 ms against 0.74 ms here, the same
    numbers out."""
    mkldnn = torch.ops.mkldnn
    if (device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available() or not hasattr(mkldnn, "_reorder_linear_weight")):  # fmt: skip
        return lambda weight: weight

    def pack(weight: Tensor) -> Tensor:
        try:
            return mkldnn._reorder_linear_weight(weight.detach(), batch)  # type: ignore[no-any-return]
        except RuntimeError:  # a oneDNN build without this layout for the dtype: the plain product
            return weight

    return pack


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias), for a weight as `packer` holds it (a bias in the weight's dtype)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")
    return x @ weight.T if bias is None else x @ weight.T + bias


DECODE_ATTENTION = "rlhf_cpu_decode"
# a matmul of a new shape costs a new oneDNN kernel, and the cache grows by one slot per step: attention reads
# whole blocks of slots, the ones not yet written masked out
_SLOT_BLOCK = 32
# layer kinds whose masks a full causal mask over the cache reproduces (a sliding window only while it spans
# the whole sequence: see `supports`)
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def supports(model: PreTrainedModel, length: int) -> bool:
    """Whether `model` decodes exactly through this module over sequences of up to `length` tokens: a CPU model
    with SDPA or eager attention whose layers are all full attention, or sliding windows at least `length`
    wide (then the window never cuts), without attention sinks or attention dropout, and without ALiBi (Bloom
    and Falcon's `alibi` build their position biases from a 2-D mask of the slots written: they decode over
    `DynamicCache` with the model's own masks, as `generate` does)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    cfg = getattr(base, "config", None)
    if cfg is None or not on_cpu(base):
        return False
    return (
        cfg._attn_implementation in ("sdpa", "eager")
        and set(getattr(cfg, "layer_types", None) or []) <= _LAYER_TYPES
        and within_window(sliding_window(base), length)
        and not getattr(cfg, "is_encoder_decoder", False)
        and not uses_alibi(cfg)
        # attention dropout in training mode, and attention sinks (GPT-OSS), are not in `decode_attention`
        and not (base.training and getattr(cfg, "attention_dropout", 0.0))
        and not any(hasattr(m, "sinks") for m in base.modules())
    )


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values (B, H_kv, slots, D): the prefill's as they come, then one slot per step
    written in place into buffers that `SlotCache.reserve` grows."""

    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # slots written

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.keys, self.values = key_states.contiguous(), value_states.contiguous()
        self.length = key_states.size(-2)
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        device = key_states.device.type
        if torch.is_autocast_enabled(device):
            # attention's matmuls (SDPA or eager) would cast them to autocast's dtype at every step: held in it,
            # the cache is read in half the bytes
            dtype = torch.get_autocast_dtype(device)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if not self.is_initialized:  # the prefill: attention reads exactly these
            self.lazy_initialization(key_states, value_states)
        else:
            assert self.keys is not None and self.values is not None
            start, end = self.length, self.length + key_states.size(-2)
            self.keys[:, :, start:end] = key_states
            self.values[:, :, start:end] = value_states
            self.length = end
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def reserve(self, slots: int) -> None:
        """Grow the buffers to `slots` slots, the written ones copied over and the new ones zero."""
        assert self.keys is not None and self.values is not None
        if self.keys.size(-2) < slots:
            self.keys, self.values = (torch.cat([t, t.new_zeros(*t.shape[:2], slots - t.size(2), t.size(3))], dim=2)
                                      for t in (self.keys, self.values))  # fmt: skip

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.keys is not None and self.values is not None:
            self.keys, self.values = (
                self.keys.index_select(0, beam_idx),
                self.values.index_select(0, beam_idx),
            )


class SlotCache(Cache):
    """A KV cache for one batch's decoding: layers created on first use, buffers grown by `reserve` before a
    decoding step so that every layer's attention reads exactly `slots` slots (the step's mask covers as many)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_SlotLayer)

    @staticmethod
    def slots(end: int, limit: int) -> int:
        """The slots attention reads once `end` are written: whole blocks, at most `limit`."""
        return min(-(-end // _SLOT_BLOCK) * _SLOT_BLOCK, max(limit, end))

    def reserve(self, slots: int) -> None:
        for layer in self.layers:
            layer.reserve(slots)  # type: ignore[attr-defined]

    def unpack(self, packed_at: Tensor, real: Tensor) -> None:
        """Lay out a packed prefill's keys and values (R, H_kv, W, D) as a left-padded one's (B, H_kv, P, D):
        `real` (B, P) marks each row's prompt tokens, and `packed_at` (N,) gives, in the row-major order of
        `real`, where each sits among the packed rows' R x W positions. Padding slots hold zeros."""
        rows, cols = real.nonzero(as_tuple=True)  # (N,) each
        for layer in self.layers:
            for name in ("keys", "values"):
                packed = getattr(layer, name)  # (R, H_kv, W, D)
                flat = packed.transpose(1, 2).flatten(0, 1)  # (R W, H_kv, D)
                out = packed.new_zeros(real.size(0), real.size(1), *packed.shape[1:2], packed.size(3))
                out[rows, cols] = flat[packed_at]
                setattr(layer, name, out.transpose(1, 2).contiguous())  # (B, H_kv, P, D)
            layer.length = real.size(1)  # type: ignore[attr-defined]


def decode_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of query (B, H, S, D) over the cache's key and value (B, H_kv, L, D) under a mask (B, 1, S, L),
    boolean or additive in fp32 (0 or -inf: one add per layer, the form `generate` passes); (B, S, H, D), as
    transformers' attention functions return it. Query heads sharing a KV head are stacked as extra rows, for
    `matmul_attention` or, where it is the faster (`_fused_in`), `fused_attention`."""
    assert attention_mask is not None
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("decode_attention: attention sinks and position biases are not supported")
    batch, heads, steps, dim = query.shape
    scale = dim**-0.5 if scaling is None else scaling
    kv_heads, group = key.size(1), heads // key.size(1)
    q = query.to(key.dtype).reshape(batch, kv_heads, group * steps, dim)  # (B, H_kv, G S, D)
    mask = attention_mask if steps == 1 else attention_mask.repeat(1, 1, group, 1)  # rows (G, S) as q's
    attend = fused_attention if softcap is None and _fused_in(q, key) else matmul_attention
    out = attend(q, key, value, mask, scale, softcap)  # (B, H_kv, G S, D)
    return out.view(batch, heads, steps, value.size(-1)).transpose(1, 2).contiguous(), None


def matmul_attention(
    q: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float, softcap: float | None = None
) -> Tensor:
    """q (B, H_kv, R, D) over key and value (B, H_kv, L, D) under a mask (B, 1, R, L), boolean or additive:
    (B, H_kv, R, D). Scores in the cache's dtype, the softmax in fp32 (as transformers' eager attention)."""
    scores = (q @ key.mT).float() * scale  # (B, H_kv, R, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    return scores.softmax(-1).to(value.dtype) @ value


def fused_attention(
    q: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float, softcap: float | None = None
) -> Tensor:
    """`matmul_attention` in SDPA's fused kernel (without soft-capping, which SDPA does not apply)."""
    assert softcap is None
    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def _fused_in(q: Tensor, key: Tensor) -> bool:
    """Whether attention of `q` (B, H_kv, R, D) over the cache runs faster in SDPA's fused CPU kernel than as
    matmul-softmax-matmul: for one query row per KV head over a bf16/fp16 cache, on a CPU with AMX, where each
    row's matmuls are matrix-vector products. With grouped queries stacked as rows, and in fp32, neither form
    was the faster throughout; on an AVX512-BF16 CPU without AMX the fused kernel took 1.7-3.4x the matmuls'
    time in bf16 (`python -m benchmarks.decode_attention`, docs/performance.md, "Attention of one new
    token")."""
    return (
        q.size(2) == 1
        and key.dtype in (torch.bfloat16, torch.float16)
        and key.device.type == "cpu"
        and _amx()
    )


@functools.cache
def _amx() -> bool:
    """The CPU has AMX tiles enabled and torch's kernels are not held below AVX-512 (ATEN_CPU_CAPABILITY)."""
    return torch.cpu._is_amx_tile_supported() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _packed_forward(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, x: Tensor) -> Tensor:
    return packed_linear(x.to(dtype), weight, bias)


class DecodeStep:
    """What a decoding step of `model` runs with: `decode_attention`, and each plain `nn.Linear` (or GPT-2's
    `Conv1D`) multiplying by a copy of its weight in the matmuls' dtype (autocast's, else the weight's),
    prepacked once for oneDNN (see `packer`), as a product under autocast casts its input and weight; and
    transformers' tanh-approximated GELUs written as seven operations (GPT-2's `gelu_new`, `gelu_fast`) as
    torch's one (the same function, within 3e-7 in fp32).
    The copies are made once per batch; the model is changed only inside `with step.on():`, so between
    steps (and after an error) it is as it was."""

    def __init__(self, model: PreTrainedModel, batch: int | None, whole_weights: bool = True) -> None:
        """`batch`: the batch size the weights are packed for; None: not packed (the products as the modules
        compute them). `whole_weights`: the weights are this process's alone (not shards that a wrapper
        gathers at each forward, as FSDP's); only then are they packed."""
        get_base = getattr(model, "get_base_model", None)
        self.config = (get_base() if callable(get_base) else model).config
        weight = next(model.parameters())
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.linears: list[tuple[torch.nn.Module, Any]] = []
        self.activations = [(m, _gelu_tanh) for m in model.modules() if type(m) in _TANH_GELUS]
        # what `packed` swaps in: the activations, and the products packed below
        self.swaps = self.activations
        if batch is None or not whole_weights:
            return
        pack = packer(weight.device, dtype, batch)
        for module in model.modules():
            # transformers' Conv1D (GPT-2's products) holds its weight as (in, out): x @ W + b
            if type(module) not in (torch.nn.Linear, Conv1D) or not _plain(module.weight):
                continue
            w = module.weight.detach()
            packed = pack((w.t() if type(module) is Conv1D else w).contiguous().to(dtype))
            if packed.is_mkldnn:  # elsewhere the module's own product is as fast
                bias = None if module.bias is None else module.bias.detach().to(dtype)
                self.linears.append((module, functools.partial(_packed_forward, packed, bias, dtype)))
        self.swaps = self.linears + self.activations

    @contextmanager
    def on(self) -> Iterator[None]:
        """A decoding step: `decode_attention` and the packed weights."""
        configured = self.config._attn_implementation
        self.config._attn_implementation = DECODE_ATTENTION  # the attention layers look it up at each call
        try:
            with self.packed():
                yield
        finally:
            self.config._attn_implementation = configured

    @contextmanager
    def packed(self) -> Iterator[None]:
        """The packed weights and fused activations alone, without `decode_attention` (the prefill's, which
        would otherwise cast every weight at every product, as autocast does outside grad mode)."""
        # an instance attribute, which nn.Module.__call__ runs (hooks included); set in the instance's dict, as
        # nn.Module.__setattr__ costs more than the rest of this per step
        for module, forward in self.swaps:
            module.__dict__["forward"] = forward
        try:
            yield
        finally:
            for module, _ in self.swaps:
                del module.__dict__["forward"]


# 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in several operations each: one fused kernel in torch. GPT-2's
# generation against `generate()` went from 1.52x to 1.72x at 4M and 1.47x to 1.62x at 30M with it (docs/performance.md).
_TANH_GELUS = (NewGELUActivation, FastGELUActivation)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _plain(weight: Tensor) -> bool:
    """A weight held whole as an ordinary tensor (not a DTensor shard, not a meta or quantized one)."""
    return (
        type(weight) is torch.nn.Parameter and weight.dtype.is_floating_point and weight.device.type == "cpu"
    )
