"""A lean forward pass for sampling from Llama-family models: preallocated KV cache, fused projections.

At the sizes RLHF runs on a CPU (and in small-batch decoding anywhere), a decoding step costs more in framework
overhead than in arithmetic: module calls, mask building, cache bookkeeping. This forward does the same maths as
transformers' `LlamaForCausalLM` with about a third of the tensor operations per layer: one fused QKV matmul, one
fused gate/up matmul, `F.rms_norm`, rotary embeddings computed once per step for all layers, and a KV cache
written in place into buffers sized for the whole generation. Models it does not cover (other architectures, biases, scaled RoPE variants, LoRA
wrappers) use transformers' forward instead: see `LlamaDecoder.supports`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from rlhf.engine.lean_llama import norm, on_cpu, plain_llama_config, rotary_tables, rotate, swiglu

_SLOT_BLOCK = 32


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


@dataclass
class _Layer:
    input_norm: Tensor  # (d,)
    qkv: Tensor  # ((H + 2 H_kv) D, d)
    out: Tensor  # (d, H D)
    post_norm: Tensor  # (d,)
    gate_up: Tensor  # (2 I, d)
    down: Tensor  # (d, I)


class LlamaDecoder:
    """Prefill and decode steps over a static KV cache for one batch of left-padded prompts."""

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        """Whether `model` is a plain Llama causal LM whose forward this class reproduces exactly (its output
        layer too: a bias-free Linear, whose weight is all this class reads)."""
        cfg = getattr(model, "config", None)
        head = getattr(model, "lm_head", None)
        return (
            cfg is not None
            and type(model).__name__ == "LlamaForCausalLM"
            and type(head) is torch.nn.Linear
            and head.bias is None
            and plain_llama_config(cfg)
            and on_cpu(model)  # on a GPU, the model's own attention kernels
        )

    def __init__(self, model: PreTrainedModel, batch: int, max_len: int, dtype: torch.dtype) -> None:
        """`dtype`: the matmuls' dtype (autocast's, or the weights' own). As under autocast, the residual stream
        and the norms stay in the weights' dtype; attention runs in the cache's dtype."""
        cfg, core = model.config, model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps, self.dtype = cfg.rms_norm_eps, dtype
        self.scaling = self.head_dim**-0.5
        self.embed = core.embed_tokens.weight
        self.final_norm = core.norm.weight
        device = self.embed.device
        self.on_cpu = device.type != "cuda"
        pack = packer(device, dtype, batch)
        self.lm_head = pack(model.lm_head.weight.to(dtype))
        self.inv_freq = core.rotary_emb.inv_freq.float()  # (D/2,)
        self.rope_scale = float(getattr(core.rotary_emb, "attention_scaling", 1.0))
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).to(dtype)),
                pack(a.o_proj.weight.to(dtype)),
                layer.post_attention_layernorm.weight,
                pack(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).to(dtype)),
                pack(layer.mlp.down_proj.weight.to(dtype)),
            )
            for layer in core.layers
            for a in [layer.self_attn]
        ]
        # The cache is in the matmuls' dtype: reading it is most of a decoding step's memory traffic. On a GPU it
        # is allocated for the whole generation and SDPA reads a slice of it. On a CPU a slice of the slot axis
        # is not contiguous, and the batched matmuls copy such operands whole at every step; so there the
        # buffers hold exactly the slots attention reads, and grow by blocks of _SLOT_BLOCK slots (one copy per
        # block, where a slice would cost one per step). Unwritten slots are zero and masked out.
        self.max_len = max_len
        shape = (batch, self.kv_heads, 0 if self.on_cpu else max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]

    def keep(self, rows: Tensor) -> None:
        """Only these rows of the batch from now on (finished ones leave): their caches move into buffers of the
        new batch size."""
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                cache[i] = old.index_select(0, rows)

    def _reserve(self, slots: int) -> None:
        """CPU: grow the buffers to `slots` slots, the written ones copied over and the new ones zero."""
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                if old.size(2) < slots:
                    grown = old.new_empty(old.size(0), old.size(1), slots, old.size(3))
                    grown[:, :, : old.size(2)] = old
                    grown[:, :, old.size(2) :] = 0
                    cache[i] = grown

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, end: int, key_mask: Tensor) -> Tensor:
        """Attention of q (B, H, S, D) over the first `end` cache slots; key_mask (B, 1, S, end) bool."""
        q = q.to(keys.dtype)
        if not self.on_cpu:
            return F.scaled_dot_product_attention(
                q,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=key_mask,
                scale=self.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
        # On a CPU, for one new token over a short cache, matmul-softmax-matmul (softmax in fp32) is several times
        # faster than SDPA's kernel, in bf16 far more. Query heads sharing a KV head are stacked as extra rows.
        # The buffers hold exactly `end` slots (see `__init__`); K @ q^T reads the keys as they lie.
        batch, _, steps, dim = q.shape
        group = self.heads // self.kv_heads
        q = q.reshape(batch, self.kv_heads, group * steps, dim)  # (B, H_kv, G S, D)
        scores = (keys @ q.mT).mT.float() * self.scaling  # (B, H_kv, G S, L)
        scores = scores.masked_fill(~key_mask.repeat(1, 1, group, 1), float("-inf"))
        probs = scores.softmax(-1).to(values.dtype)
        return (probs @ values).view(batch, self.heads, steps, dim)

    def forward(self, input_ids: Tensor, positions: Tensor, key_mask: Tensor, start: int) -> Tensor:
        """Logits (B, V) in fp32 at the last of `input_ids` (B, S), whose tokens sit at cache slots start..start+S.

        key_mask (B, 1, S, start + S) bool: which cached positions each new token attends to.
        """
        batch, steps = input_ids.shape
        end = read = start + steps
        if self.on_cpu:
            # attend over whole blocks of _SLOT_BLOCK cache slots, the slots not yet written masked out: a matmul
            # of a new shape costs a new oneDNN kernel (0.4-0.6 ms here), and `end` grows by one every step
            read = min(-(-end // _SLOT_BLOCK) * _SLOT_BLOCK, self.max_len)
            key_mask = F.pad(key_mask, (0, read - end), value=False)
            self._reserve(read)
        cos, sin = rotary_tables(self.inv_freq, self.rope_scale, positions)  # (B, S, 1, D)
        x = F.embedding(input_ids, self.embed)  # (B, S, d) the residual stream, in the weights' dtype
        width, residual = x.size(-1), x.dtype
        q_size = self.heads * self.head_dim
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            h = norm(x, layer.input_norm, self.eps, self.dtype)
            qkv = packed_linear(h, layer.qkv).view(
                batch, steps, self.heads + 2 * self.kv_heads, self.head_dim
            )
            # queries and keys rotated together, in fp32
            qk = rotate(qkv[:, :, : self.heads + self.kv_heads], cos, sin)
            q, k = qk.transpose(1, 2).split([self.heads, self.kv_heads], dim=1)  # (B, H or H_kv, S, D)
            keys[:, :, start:end] = k
            values[:, :, start:end] = qkv[:, :, self.heads + self.kv_heads :].transpose(1, 2)
            attn = self._attend(q, keys, values, read, key_mask)  # (B, H, S, D)
            x = x + packed_linear(
                attn.transpose(1, 2).reshape(batch, steps, q_size).to(self.dtype), layer.out
            ).to(residual)
            h = norm(x, layer.post_norm, self.eps, self.dtype)
            x = x + packed_linear(swiglu(packed_linear(h, layer.gate_up)), layer.down).to(residual)
        last = F.rms_norm(x[:, -1], (width,), self.final_norm, self.eps).to(self.dtype)  # (B, d)
        return packed_linear(last, self.lm_head).float()  # (B, V)
