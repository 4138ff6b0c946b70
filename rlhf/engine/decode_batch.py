"""Rows decoded together: the KV cache, each row's attention mask and positions, and the moves that batching
needs, shared by `generate` (rlhf.engine.decoding) and the server's worker (rlhf.serve.engine).

    prefill(ids, mask)  start on left-padded prompts (their real tokens packed into rows where that saves
                        enough: `PackedPrefill`); the logits of each row's next token
    step(next_ids)      feed each row its next token; the logits of the token after it
    keep(rows)          keep these rows, in this order (finished rows leave)
    join(other)         append another batch's rows (continuous batching: newcomers join a running batch)
    trim()              cut leading columns that no row attends to any more

Rows are right-aligned: every row's next token goes into the same column (slot) of the cache, and each row
attends only to the slots it wrote itself (`live`), with its own position ids. So padding a row on the left,
as `join` does to the narrower batch, changes nothing it computes, and neither does cutting columns that only
padding fills.

On a CPU, for the models rlhf.engine.decode_cache serves, the cache is a `SlotCache` written in place, each
step runs under one additive mask with `decode_attention` and packed weights (`DecodeStep`); elsewhere (GPUs,
sliding windows shorter than the sequence, ALiBi, other attention kinds) over transformers' `DynamicCache`
with the model's own masks, built from each row's 2-D mask of the slots written. A `DynamicCache` whose layers are not all plain `DynamicLayer`s (sliding windows) cannot be
joined or trimmed (`joinable`).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from rlhf.engine import decode_cache
from rlhf.engine.decode_cache import DecodeStep, SlotCache
from rlhf.engine.packing import TokenLayout, layout, sliding_window, takes_4d_mask
from rlhf.models.heads import backbone

__all__ = ["CachedStep", "DecodeBatch"]


def _step_options(model: PreTrainedModel) -> dict[str, Any]:
    """Forward keywords for a decoding step that the model (or, under a LoRA wrapper, its base model) takes:
    logits for the last position only, and no router logits. A mixture of experts whose config asks for them
    (`output_router_logits`, for training) would compute its load-balancing loss at every step, over an
    attention mask that covers the cache while the router logits cover the new tokens: a size mismatch."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    accepted = inspect.signature(base.forward).parameters
    options = {"logits_to_keep": 1, "output_router_logits": False}
    return {k: v for k, v in options.items() if k in accepted}


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward's keyword for the KV cache: `cache` where the model takes it (transformers 5.2x on, which
    deprecates `past_key_values` and removes it in 5.40), else `past_key_values`."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _base(model: PreTrainedModel) -> PreTrainedModel:
    """The model under a LoRA wrapper (whose adapters sit in its modules), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class CachedStep:
    """One forward through a transformers model's own forward and KV cache: the last position's logits (B, V) in
    fp32, and the cache for the next step."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache_kw = cache_keyword(model)
        self.extra = _step_options(model)

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any
    ) -> tuple[Tensor, Any]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: cache},
            **self.extra,
        )
        return out.logits[:, -1, :].float(), returned_cache(out)


# A prefill packs the prompts' real tokens into rows (rlhf.engine.packing) where that leaves at most this share
# of the padded batch's positions to compute; above it, the rearranging of the cache and the block-diagonal
# mask cost about what packing saves.
_PACK_PREFILL_AT = 0.85


class PackedPrefill:
    """A prefill over the prompts' real tokens only, packed end to end into rows with a block-diagonal mask
    (as the training forwards are), through the model's own backbone and output layer: the LM head runs at
    each prompt's last token alone, and the cache's keys and values are then laid out left-padded, as a
    padded prefill leaves them. Left padding costs a batch of prompts of unequal lengths the widest one's
    compute in every row (vLLM packs its prefills for the same reason)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.base = _base(model)
        self.backbone = backbone(self.base)
        self.cache_kw = (
            "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"
        )
        accepted = inspect.signature(self.backbone.forward).parameters
        self.extra = {"output_router_logits": False} if "output_router_logits" in accepted else {}
        self.ok, self.additive = takes_4d_mask(self.base)
        self.window = sliding_window(self.base)
        self.pad_id = getattr(self.base.config, "pad_token_id", None) or 0

    def layout(self, ids: Tensor, mask: Tensor) -> TokenLayout | None:
        """The packed layout of left-padded prompts, or None where the model cannot take it (a mask the
        attention does not read as is, a prompt without tokens) or it saves too little to pay."""
        if not self.ok or ids.size(0) < 2:
            return None
        hidden = getattr(self.base.config, "hidden_size", None)
        lay = layout(ids, mask, ids.size(1), self.pad_id, True, self.additive, hidden, self.window)
        packed = lay.attention_mask.dim() == 4
        return lay if packed and lay.tokens <= _PACK_PREFILL_AT * ids.numel() else None

    def __call__(self, lay: TokenLayout, mask: Tensor, cache: SlotCache) -> Tensor:
        """Run the packed prefill into `cache` and lay its keys and values out as the left-padded `mask` (B, P)
        says; the logits (B, V) of each prompt's next token, in fp32."""
        from rlhf.models.wrappers import lm_head  # the wrappers import the engine

        out = self.backbone(**lay.inputs, use_cache=True, **{self.cache_kw: cache}, **self.extra)
        logits = lm_head(self.base, lay.last(out.last_hidden_state)).float()  # (B, V)
        real = mask.bool()  # (B, P): each row's real tokens, right-aligned and in order
        lengths = real.sum(1)  # (B,)
        starts = lay.last_at - lengths + 1  # (B,) flat position of each prompt's first token
        packed_at = (starts[:, None] + real.cumsum(1) - 1)[real]  # (N,) in row-major order of `real`
        cache.unpack(packed_at, real)
        return logits


class DecodeBatch:
    """A batch of rows decoding through `model`'s own forward. `limit`: the most slots the batch is expected to
    span (prompt columns, padding included, then new tokens); `decode_cache.supports` checks the model against
    it (a sliding window must span it), and a step's attention reads whole blocks of slots up to it.

    `decode_step`: the packed weights and attention of the decoding steps over a `SlotCache` (one can serve
    every batch of a model); without it, one is made at the prefill, packed for the prefill's batch size.
    `synced`: the model is sharded across processes (FSDP), whose weights are gathered at each forward: they
    are not packed, and the forwards run outside inference mode (the gathered weights live in buffers that
    training updates in place)."""

    def __init__(
        self,
        model: PreTrainedModel,
        limit: int,
        decode_step: DecodeStep | None = None,
        synced: bool = False,
    ) -> None:
        self.model = model
        self.limit = limit
        self.slotted = decode_cache.supports(model, limit)
        self.decode_step = decode_step
        self.synced = synced
        self.forward = CachedStep(model)
        self.packed_prefill = PackedPrefill(model) if self.slotted and not synced else None
        self.cache: Any = None
        self.live = torch.zeros(0, 0, dtype=torch.bool)  # (B, capacity) the slots each row attends to
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,) position id of each row's next token
        self.length = 0  # slots written, the same for every row

    def __len__(self) -> int:
        return self.live.size(0)

    def no_grad(self) -> Any:
        """Inference mode; plain no_grad where `synced` (the gathered weights live in buffers that training
        updates in place). Not `inference_mode(False)`, which turns gradients back on: the forwards would keep
        their graphs, and a model with gradient checkpointing in training mode would drop its KV cache."""
        return torch.no_grad() if self.synced else torch.inference_mode()

    @property
    def joinable(self) -> bool:
        """Whether `join` and `trim` can reshape the cache (every layer holds whole keys and values)."""
        layers = getattr(self.cache, "layers", None)
        return self.slotted or (layers is not None and all(type(layer) is DynamicLayer for layer in layers))

    def prefill(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Start on left-padded prompts `ids`, `mask` (B, P), with the model's configured attention and masks:
        the logits (B, V) of each row's next token. Over a `SlotCache` the prompts' real tokens are packed
        (`PackedPrefill`) where that saves enough; a sharded model (`synced`) runs its whole forward, which
        gathers its weights."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        batch, width = ids.shape
        with self.no_grad():
            cache = None
            if self.slotted:
                if self.decode_step is None:
                    self.decode_step = DecodeStep(self.model, batch, whole_weights=not self.synced)
                cache = SlotCache()
            packing = self.packed_prefill
            lay = packing.layout(ids, mask) if packing is not None else None
            with self.decode_step.packed() if self.decode_step is not None else nullcontext():
                if lay is not None:
                    assert packing is not None and cache is not None
                    logits, self.cache = packing(lay, mask, cache), cache
                else:
                    logits, self.cache = self.forward(ids, mask, positions, cache)
            self.live = torch.zeros(batch, width, dtype=torch.bool, device=ids.device)
            self.live[:] = mask.bool()
            self.positions = positions[:, -1] + 1
        self.length = width
        return logits

    def step(self, next_ids: Tensor) -> Tensor:
        """Feed each row its next token (B,): the logits (B, V) of the token after it."""
        end = self.length + 1
        slots = SlotCache.slots(end, self.limit)  # whole blocks: see decode_cache
        with self.no_grad():
            if self.live.size(1) < slots:
                self.live = _right_aligned([(self.live, self.length)], self.length, slots, dim=1)
            self.live[:, end - 1] = True
            input_ids, positions = next_ids[:, None], self.positions[:, None]  # (B, 1) each
            if self.slotted:
                assert self.decode_step is not None
                self.cache.reserve(slots)
                # additive, so each layer adds it to its scores (attention takes a 4-D mask as is)
                mask = torch.where(self.live[:, None, None, :slots], 0.0, float("-inf"))  # (B, 1, 1, slots)
                with self.decode_step.on():
                    logits = self.forward(input_ids, mask, positions, self.cache)[0]
            else:
                logits, self.cache = self.forward(input_ids, self.live[:, :end], positions, self.cache)
            self.positions = self.positions + 1
        self.length = end
        return logits

    def keep(self, rows: Tensor) -> bool:
        """Keep only `rows` (B',) of the batch, in their order, the cache's included; False (and nothing changed)
        where the cache cannot select rows."""
        if not callable(getattr(self.cache, "reorder_cache", None)):
            return False
        with self.no_grad():
            self.cache.reorder_cache(rows)
            self.live, self.positions = self.live[rows], self.positions[rows]
        return True

    def join(self, other: DecodeBatch) -> None:
        """Append `other`'s rows after these (`other` is used up): the narrower of the two left-padded to the
        wider along the slots, so that the next tokens of all rows go into one column."""
        if not (self.joinable and other.joinable and self.slotted == other.slotted):
            raise ValueError("these batches' caches cannot be joined")
        width = max(self.length, other.length)
        # a SlotCache's buffers of whole blocks (what the next step reserves); a DynamicCache's, exact
        capacity = SlotCache.slots(width, self.limit) if self.slotted else width
        parts = ((self, self.length), (other, other.length))
        with self.no_grad():
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
                for name in ("keys", "values"):  # (B, H_kv, slots, D)
                    kv = [
                        (getattr(layer, name), n) for layer, (_, n) in zip((mine, theirs), parts, strict=True)
                    ]
                    setattr(mine, name, _right_aligned(kv, width, capacity, dim=2))
                if self.slotted:
                    mine.length = width
            self.live = _right_aligned([(b.live, n) for b, n in parts], width, capacity, dim=1)
            self.positions = torch.cat([self.positions, other.positions])
        self.length = width

    def trim(self) -> None:
        """Cut the leading slots that no row attends to (left padding of rows that have left the batch)."""
        if not self.joinable or len(self) == 0:
            return
        lead = int(self.live[:, : self.length].any(dim=0).long().argmax())  # the first slot some row uses
        if lead == 0:
            return
        width = self.length - lead
        with self.no_grad():
            for layer in self.cache.layers:
                if (
                    self.slotted
                ):  # contiguous buffers of whole blocks, so each step's products read them as they lie
                    capacity = SlotCache.slots(width, self.limit)
                    layer.keys, layer.values = (_right_aligned([(t[:, :, lead:], width)], width, capacity, dim=2)
                                                for t in (layer.keys, layer.values))  # fmt: skip
                    layer.length = width
                else:  # the next step's concatenation copies them anyway
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.live = self.live[:, lead:]
        self.length = width


def _right_aligned(parts: list[tuple[Tensor, int]], width: int, capacity: int, dim: int) -> Tensor:
    """The parts stacked along the batch (dim 0), each part's first n entries along `dim` moved to end at
    `width`, zeros (or False) around them, `capacity` entries along `dim` in all."""
    first = parts[0][0]
    shape = list(first.shape)
    shape[0], shape[dim] = sum(t.size(0) for t, _ in parts), capacity
    out = first.new_zeros(shape)
    row = 0
    for t, n in parts:
        out.narrow(0, row, t.size(0)).narrow(dim, width - n, n).copy_(t.narrow(dim, 0, n))
        row += t.size(0)
    return out
