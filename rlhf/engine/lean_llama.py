"""A lean, differentiable forward of the Llama-family backbone (Llama, Qwen2), for the training and scoring
passes.

On a CPU, and for small models anywhere, Hugging Face's forward costs more in framework overhead and in
elementwise passes than in matmuls. This one computes the same function with fewer, larger operations: one
fused QKV matmul and one fused gate/up matmul per layer (the weights are concatenated in the forward, so their
gradients flow back to the model's own parameters), rotary tables computed once and queries and keys rotated
in one pass, attention as baddbmm-softmax-matmul under one additive mask shared by all layers (scores rounded
to the matmuls' dtype, as in transformers' eager attention; the softmax computes in float32). The residual
stream and the norms stay in the weights' dtype and the matmuls run in autocast's, as under autocast.

It reads the weights directly, so it serves only a plain Llama or Qwen2 backbone whose parameters are whole on
this process (not sharded by FSDP or DeepSpeed ZeRO-3, not wrapped by LoRA layers): `supports` says when.
`tests/unit/test_lean_llama.py` checks outputs and gradients against transformers' forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

# the backbones this forward reproduces, with the causal-LM and sequence-classification models built on them:
# Llama and Qwen2 (Llama's layers with biases on the query, key and value projections)
LEAN_MODELS = {
    "LlamaModel": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "Qwen2Model": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
}


def plain_llama_config(cfg: Any) -> bool:
    """A Llama-family config whose forward the lean code reproduces: SiLU, unscaled RoPE, no tensor split, full
    attention in every layer (no sliding window)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    layer_types = getattr(cfg, "layer_types", None) or []
    return (
        cfg.hidden_act == "silu"
        and rope.get("rope_type", "default") == "default"
        and getattr(cfg, "pretraining_tp", 1) == 1
        and not getattr(cfg, "use_sliding_window", False)
        and all(t == "full_attention" for t in layer_types)
    )


def supports(model: Any) -> bool:
    """Whether `model` is a plain Llama-family causal LM or sequence classifier (LEAN_MODELS) this forward
    reproduces exactly, with its weights on the CPU (where it was measured faster; on a GPU the model's own
    SDPA/flash attention is)."""
    cfg = getattr(model, "config", None)
    if not on_cpu(model):
        return False
    core: Any = getattr(model, "model", None)
    if cfg is None or type(model).__name__ not in LEAN_MODELS.get(type(core).__name__, ()):
        return False
    projections = [getattr(block, name) for layer in core.layers
                   for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                        (layer.mlp, ("gate_proj", "up_proj", "down_proj")))
                   for name in names]  # fmt: skip
    fused: list[tuple[Any, ...]] = [
        (a.q_proj, a.k_proj, a.v_proj) for a in (layer.self_attn for layer in core.layers)
    ]
    fused += [(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in core.layers]
    # a fused matmul adds biases to all of its projections or to none
    same_bias = all(len({m.bias is None for m in group}) == 1 for group in fused)
    return (
        all(type(m) is torch.nn.Linear for m in projections)  # LoRA layers replace them
        and same_bias
        and plain_llama_config(cfg)
        and not getattr(cfg, "attention_dropout", 0.0)
    )


def on_cpu(model: Any) -> bool:
    """Whether the model's weights are on the CPU."""
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return first is not None and first.device.type == "cpu"


def rotary_tables(inv_freq: Tensor, scale: float, positions: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) for `rotate`, (R, W, 1, D) in fp32, for positions (R, W), to broadcast over the heads of an
    (R, W, heads, D) projection; sin's first half negated. The rotation is applied in fp32, as under autocast."""
    freqs = positions[..., None, None].float() * inv_freq.float()  # (R, W, 1, D/2)
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of x (..., D), with `rotary_tables`' cos and sin: x cos + rotate_half(x) sin,
    where rotate_half(x) sin = roll(x, D/2) times sin with its first half negated."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def attention_mask_4d(attention_mask: Tensor) -> Tensor:
    """(R, 1, W, W) bool, True = attend, from a packed layout's 4-D mask (returned as is: boolean, or additive
    with 0 for attend) or a padded layout's (R, W) 0/1 key mask (causal; a padding query sees only itself)."""
    if attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    width = attention_mask.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=attention_mask.device)
    return (causal & attention_mask.bool()[:, None, None, :]) | eye


def norm(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """RMS norm of the residual stream, cast to the matmuls' dtype."""
    return F.rms_norm(x, (x.size(-1),), weight, eps).to(dtype)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for the fused gate/up projection (..., 2 I), gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_linear(x: Tensor, layers: tuple[torch.nn.Linear, ...], dtype: torch.dtype) -> Tensor:
    """The outputs of `layers` side by side from one matmul in `dtype`: their weights (and biases, where they
    have them) concatenated in the forward, so the gradients flow back to each layer's own parameters."""
    weight: Tensor = layers[0].weight if len(layers) == 1 else torch.cat([m.weight for m in layers])
    biases: list[Tensor] = [m.bias for m in layers if m.bias is not None]
    bias = None if not biases else biases[0] if len(biases) == 1 else torch.cat(biases)
    return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))


def hidden_states(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
) -> Tensor:
    """The backbone's final-normed hidden states (R, W, d), in the weights' dtype; matmuls in autocast's dtype
    if autocast is on, else in the weights'."""
    cfg, core = model.config, model.model  # type: ignore[attr-defined]
    device_type = input_ids.device.type
    weights = core.embed_tokens.weight
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weights.dtype
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group, eps = heads // kv_heads, cfg.rms_norm_eps
    allowed = attention_mask_4d(attention_mask)  # (R, 1, W, W)
    with torch.autocast(device_type, enabled=False):
        x = F.embedding(input_ids, weights)  # (R, W, d) the residual stream
        rows, width, d = x.shape
        scale = float(getattr(core.rotary_emb, "attention_scaling", 1.0))
        cos, sin = rotary_tables(core.rotary_emb.inv_freq, scale, position_ids)  # (R, W, 1, D)
        # the mask as an additive bias in the matmuls' dtype, one (W, W) block per row and head, made once for
        # all layers: baddbmm then adds it and scales q k^T in one pass
        bias = torch.zeros(allowed.shape, dtype=dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        bias = bias.expand(rows, heads, width, width).reshape(rows * heads, width, width)
        for layer in core.layers:
            a, mlp = layer.self_attn, layer.mlp
            h = norm(x, layer.input_layernorm.weight, eps, dtype)
            qkv = fused_linear(h, (a.q_proj, a.k_proj, a.v_proj), dtype)
            qkv = qkv.view(rows, width, heads + 2 * kv_heads, head_dim)
            # queries and keys rotated together, in fp32 as under autocast
            qk = rotate(qkv[:, :, : heads + kv_heads], cos, sin).to(dtype).transpose(1, 2)
            q, k = qk.split([heads, kv_heads], dim=1)  # (R, H or H_kv, W, D)
            v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.baddbmm(  # (R H, W, W), rounded to the matmuls' dtype as transformers' eager path
                bias, q.reshape(-1, width, head_dim), k.reshape(-1, width, head_dim).mT, alpha=head_dim**-0.5
            )
            probs = scores.softmax(-1)  # bf16 in and out, fp32 inside
            attn = (probs @ v.reshape(-1, width, head_dim)).view(rows, heads, width, head_dim)
            attn = attn.transpose(1, 2).reshape(rows, width, heads * head_dim)
            x = x + fused_linear(attn, (a.o_proj,), dtype).to(x.dtype)
            h = norm(x, layer.post_attention_layernorm.weight, eps, dtype)
            gate_up = fused_linear(h, (mlp.gate_proj, mlp.up_proj), dtype)
            x = x + fused_linear(swiglu(gate_up), (mlp.down_proj,), dtype).to(x.dtype)
        return F.rms_norm(x, (d,), core.norm.weight, eps)
