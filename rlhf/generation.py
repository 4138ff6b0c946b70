"""Batched sampling with a KV cache: temperature, top-k, top-p (nucleus), each sequence stopping at EOS (or at
another stop id: a chat template's end-of-turn token). PAD is never sampled.

Prompts are left-padded so that every row's next token sits in the last column; responses come back
right-padded with a mask. The log-probs returned are those of the sampled tokens under softmax(logits / T),
the distribution PPO recomputes (without the top-k/top-p truncation, as in TRL and OpenRLHF).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlhf.errors import ConfigError
from rlhf.fast_decode import LlamaDecoder
from rlhf.models.lean_llama import attention_mask_4d
from rlhf.models.loading import context_length
from rlhf.models.tokens import mask_pad, stop_ids

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """How to sample; stored with every completion so its lineage is known."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass
class Generation:
    """A batch of sampled responses."""

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, T) right-padded with pad_id; EOS included where the model stopped
    response_mask: Tensor  # (B, T) 1 on real response tokens (EOS included)
    logprobs: (
        Tensor  # (B, T) log-prob of each sampled token under softmax(logits / temperature); 0 on padding
    )
    ended: Tensor  # (B,) bool: the response ends with EOS (or another stop id)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask), both (B, max_len), sequences aligned to the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def fit_context(prompts: list[list[int]], context: int, max_new_tokens: int) -> list[list[int]]:
    """Prompts cut from the left to leave `max_new_tokens` of the model's context (the end of a prompt is what
    the answer follows); how many were cut is logged. A context that cannot hold one prompt token is an error."""
    limit = context - max_new_tokens
    if limit < 1:
        raise ConfigError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in a context of {context}"
        )
    cut = sum(len(p) > limit for p in prompts)
    if cut:
        log.warning(
            "%d of %d prompts longer than %d tokens (context %d - max_new_tokens %d) were cut from the left",
            cut, len(prompts), limit, context, max_new_tokens,
        )  # fmt: skip
        prompts = [p[-limit:] for p in prompts]
    return prompts


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / the nucleus of mass top_p to -inf (at least one token always stays)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (so the first token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """(token, log-prob) per row, (B,) each; the log-prob is under softmax(logits / T), untruncated.

    Same distribution as softmax(filter_logits(logits / T)) without sorting the vocabulary: a token is drawn by
    inverse CDF from the (top-k truncated) distribution, and a draw outside the nucleus is redrawn, which is
    exact rejection sampling (the nucleus holds at least top_p of the mass, so redraws are rare). Rows still
    outside after a few redraws take the sorted-nucleus draw. A sort and an exponential race over the vocabulary
    cost several times more than the rest of a decoding step on a CPU.
    """
    if params.temperature <= 0:
        token = logits.argmax(dim=-1)  # (B,)
        return token, torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / params.temperature, dim=-1)  # (B, V)
    probs = logp.exp()
    if 0 < params.top_k < logits.size(-1):
        kth = torch.topk(probs, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    token = _draw(probs, generator)  # (B, 1)
    if params.top_p < 1.0:
        outside = _outside_nucleus(probs, token, params.top_p)  # (B, 1)
        for _ in range(_REDRAWS):
            if not bool(outside.any()):
                break
            token = torch.where(outside, _draw(probs, generator), token)
            outside = _outside_nucleus(probs, token, params.top_p)
        if bool(outside.any()):
            rows = outside.squeeze(-1).nonzero().squeeze(-1)  # (R,)
            nucleus = filter_logits(probs[rows].log(), top_p=params.top_p).softmax(-1)
            token[rows] = _draw(nucleus, generator)
    return token.squeeze(-1), logp.gather(-1, token).squeeze(-1)


_REDRAWS = 4


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row (B, 1) drawn from unnormalised probabilities (B, V) by inverse CDF."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, device=probs.device, generator=generator) * cdf[:, -1:]  # (B, 1)
    # right=True: the first index whose CDF exceeds u, so a zero-probability token is never chosen
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.size(-1) - 1)


def _outside_nucleus(probs: Tensor, token: Tensor, top_p: float) -> Tensor:
    """(B, 1) bool: the token's more probable tokens already hold top_p of the mass (the sorted rule)."""
    p = probs.gather(-1, token)  # (B, 1)
    above = (probs * (probs > p)).sum(-1, keepdim=True) / probs.sum(-1, keepdim=True)
    return above >= top_p


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether the model (or, under a LoRA wrapper, its base model) can compute logits for the last positions only."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward's keyword for the KV cache: `cache` where the model takes it (transformers 5.2x on, which
    deprecates `past_key_values` and removes it in 5.40), else `past_key_values`."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# Finished rows leave the decoded batch once at most half of it still runs, and it shrinks to a power of two
# (finished rows fill the rest): each shrink copies the cache, and each new batch size costs new matmul
# kernels (oneDNN and cuBLAS build one per shape), so a few sizes are reused across batches. On the tiny PPO
# workload's rollouts this took generation from 0.198 to 0.159 s (thresholds 0.5-0.75 gave 0.147-0.159 s).
_COMPACT_AT = 0.5

# (input_ids, positions, step) -> last-position logits (B, V)
Forward = Callable[[Tensor, Tensor, int], Tensor]
Keep = Callable[[Tensor], bool]  # keep only these rows of the batch (cache included); False: cannot


def _transformers_forward(model: PreTrainedModel, attention: Tensor, width: int) -> tuple[Forward, Keep]:
    """Decoding steps through the model's own forward and cache."""
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    cache_kw = cache_keyword(model)
    past: Any = None

    def forward(input_ids: Tensor, positions: Tensor, step: int) -> Tensor:
        nonlocal past
        out = model(
            input_ids=input_ids,
            attention_mask=attention[:, : width + step],
            position_ids=positions,
            use_cache=True,
            **{cache_kw: past},
            **extra,
        )
        past = returned_cache(out)
        return out.logits[:, -1, :].float()

    def keep(rows: Tensor) -> bool:
        nonlocal attention
        if not callable(getattr(past, "reorder_cache", None)):
            return False
        past.reorder_cache(rows)
        attention = attention[rows]
        return True

    return forward, keep


def _lean_forward(model: PreTrainedModel, attention: Tensor, width: int) -> tuple[Forward, Keep]:
    """The same through `LlamaDecoder` (its own KV cache, fused and prepacked projections), in the autocast dtype
    if one is on."""
    device_type = attention.device.type
    dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else next(model.parameters()).dtype
    )
    decoder = LlamaDecoder(model, attention.size(0), attention.size(1), dtype)
    keys = attention.bool()  # (B, P + T)
    # causal over the prompts; a padding query attends to itself only, so no row of the mask is empty
    prefill = attention_mask_4d(attention[:, :width])  # (B, 1, P, P)

    def forward(input_ids: Tensor, positions: Tensor, step: int) -> Tensor:
        start = 0 if step == 0 else width + step - 1
        mask = prefill if step == 0 else keys[:, None, None, : width + step]
        with torch.autocast(device_type, enabled=False):
            return decoder.forward(input_ids, positions, mask, start)

    def keep(rows: Tensor) -> bool:
        nonlocal keys
        decoder.keep(rows)
        keys = keys[rows]
        return True

    return forward, keep


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    synced: bool = False,
) -> Generation:
    """Sample one response per prompt (token id lists), stopping each row at EOS (`eos_id`: one id, or the
    stop ids of rlhf.models.tokens.stop_ids) or after max_new_tokens. PAD is masked out of sampling.

    `synced`: every process decodes until all processes' rows have ended, as a model sharded across them
    (FSDP) needs: each step's forward gathers its weights from all of them.

    The hot loop does no Python work per row: the attention mask and the outputs are preallocated and
    written a column per step, and the prefill computes logits for the last position only. Finished rows
    leave the batch (see _COMPACT_AT), so a batch of mostly short answers does not pay for its longest.
    """
    device = next(model.parameters()).device
    if generator is None and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    prompts = fit_context(prompts, context_length(model), params.max_new_tokens)
    stops_list = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    stops = torch.tensor(stops_list, dtype=torch.long, device=device)
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    (batch, width), steps = prompt_ids.shape, params.max_new_tokens
    attention = torch.ones(batch, width + steps, dtype=torch.long, device=device)  # (B, P + T)
    attention[:, :width] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    response_ids = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)  # (B, T)
    logprobs = torch.zeros(batch, steps, device=device)  # (B, T)
    response_mask = torch.zeros(batch, steps, dtype=torch.long, device=device)  # (B, T)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    forward, keep = (
        _lean_forward(model, attention, width)
        if LlamaDecoder.supports(model)
        else _transformers_forward(model, attention, width)
    )
    rows = torch.arange(batch, device=device)  # (b,) the row of each sequence still decoded
    input_ids, n = prompt_ids, 0
    for step in range(steps):
        logits = forward(input_ids, positions, step)  # (b, V)
        next_token, logprob = sample(logits, params, generator)  # (b,) each
        # PAD is never sampled: a row that drew it draws again without it (rejection sampling, the same
        # distribution as masking PAD out). The redraw has a random stream of its own, so every other row
        # draws as it would have. Its log-prob is under the unmasked softmax(logits / T), as every other row's
        # and as PPO's forward recomputes it.
        redraw = next_token == pad_id  # (b,)
        if pad_id not in stops_list and bool(redraw.any()):
            masked = mask_pad(logits[redraw], pad_id, stops_list)  # (r, V)
            own = torch.Generator(device=device).manual_seed((params.seed or 0) * 1_000_003 + step)
            redrawn, _ = sample(masked, params, own)  # (r,)
            temperature = params.temperature if params.temperature > 0 else 1.0
            next_token[redraw] = redrawn
            logprob[redraw] = (
                (logits[redraw] / temperature).log_softmax(-1).gather(-1, redrawn[:, None])[:, 0]
            )
        alive = ~finished[rows]  # (b,)
        response_ids[rows, step] = torch.where(alive, next_token, pad_id)
        logprobs[rows, step] = torch.where(alive, logprob, 0.0)
        response_mask[rows, step] = alive.long()
        finished[rows] |= torch.isin(next_token, stops)
        n = step + 1
        running = ~finished[rows]  # (b,)
        n_running = int(running.sum())
        if synced:
            left = torch.tensor([n_running], device=device)
            torch.distributed.all_reduce(left)
            if int(left) == 0:
                break
            if n_running == 0:  # this process is done; it keeps stepping (masked) while the others finish
                input_ids = response_ids[rows, step : step + 1]
                positions = positions[:, -1:] + 1
                continue
        elif n_running == 0:
            break
        # finished rows leave the batch (and the cache) once enough of them have, not at every step
        if n_running <= _COMPACT_AT * rows.numel():
            size = 1 << (n_running - 1).bit_length()
            # the running rows, and finished ones to fill the bucket, in their order
            kept = running.float().argsort(descending=True, stable=True)[:size].sort().values  # (size,)
            if size < rows.numel() and keep(kept):
                rows, positions = rows[kept], positions[kept]
        input_ids = response_ids[rows, step : step + 1]
        positions = positions[:, -1:] + 1
    return Generation(
        prompt_ids, prompt_mask, response_ids[:, :n], response_mask[:, :n], logprobs[:, :n], finished
    )


def decode_responses(tokenizer, gen: Generation) -> list[str]:  # type: ignore[no-untyped-def]
    """Response texts without EOS (or the end-of-turn token) and padding."""
    texts, stops = [], set(stop_ids(tokenizer))
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True):
        real = [t for t, m in zip(ids, mask, strict=True) if m and t not in stops]
        # a byte-level model can sample a NUL byte, which text stores and JSON tools refuse: shown as U+FFFD
        texts.append(tokenizer.decode(real, skip_special_tokens=True).replace("\x00", "\ufffd"))
    return texts
