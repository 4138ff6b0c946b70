"""Batched sampling with a KV cache: temperature, top-k, top-p (nucleus), each sequence stopping at EOS.

Prompts are left-padded so that every row's next token sits in the last column; responses come back
right-padded with a mask. The log-probs returned are those of the sampled tokens under softmax(logits / T),
the distribution PPO recomputes (without the top-k/top-p truncation, as in TRL and OpenRLHF).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel


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
    ended: Tensor  # (B,) bool: the response ends with EOS


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

    Same distribution as softmax(filter_logits(logits / T)), with one sort and no scatter: the truncation is
    done in sorted order, and the draw is an exponential race (argmax p_i / E_i, E_i ~ Exp(1), picks i with
    probability p_i), cheaper than `torch.multinomial` on CPU.
    """
    if params.temperature <= 0:
        token = logits.argmax(dim=-1)  # (B,)
        return token, torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / params.temperature, dim=-1)  # (B, V)
    truncate_k = 0 < params.top_k < logits.size(-1)
    if truncate_k or params.top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)  # (B, V)
        probs = sorted_logp.exp()
        if truncate_k:
            probs[:, params.top_k :] = 0.0
            probs = probs / probs.sum(-1, keepdim=True)  # top-p applies to the renormalised top-k
        if params.top_p < 1.0:
            # drop a token when the mass before it already reaches top_p (so the first token always stays)
            probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= params.top_p, 0.0)
    else:
        probs, order = logp.exp(), None
    race = probs / torch.empty_like(probs).exponential_(generator=generator)  # (B, V)
    index = race.argmax(dim=-1, keepdim=True)  # (B, 1)
    token = index if order is None else order.gather(-1, index)
    return token.squeeze(-1), logp.gather(-1, token).squeeze(-1)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether the model (or, under a LoRA wrapper, its base model) can compute logits for the last positions only."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Generation:
    """Sample one response per prompt (token id lists), stopping each row at EOS or after max_new_tokens.

    The hot loop does no Python work per row: the attention mask and the outputs are preallocated and
    written a column per step, and the prefill computes logits for the last position only.
    """
    device = next(model.parameters()).device
    if generator is None and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    (batch, width), steps = prompt_ids.shape, params.max_new_tokens
    attention = torch.ones(batch, width + steps, dtype=torch.long, device=device)  # (B, P + T)
    attention[:, :width] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    response_ids = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)  # (B, T)
    logprobs = torch.zeros(batch, steps, device=device)  # (B, T)
    response_mask = torch.zeros(batch, steps, dtype=torch.long, device=device)  # (B, T)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    input_ids, past, n = prompt_ids, None, 0
    for step in range(steps):
        out = model(
            input_ids=input_ids,
            attention_mask=attention[:, : width + step],
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            **extra,
        )
        past = out.past_key_values
        next_token, logprob = sample(out.logits[:, -1, :].float(), params, generator)  # (B,) each
        alive = ~finished
        response_ids[:, step] = torch.where(alive, next_token, pad_id)
        logprobs[:, step] = torch.where(alive, logprob, 0.0)
        response_mask[:, step] = alive
        finished |= next_token == eos_id
        n = step + 1
        if bool(finished.all()):
            break
        input_ids = response_ids[:, step : step + 1]
        positions = positions[:, -1:] + 1
    return Generation(
        prompt_ids, prompt_mask, response_ids[:, :n], response_mask[:, :n], logprobs[:, :n], finished
    )


def decode_responses(tokenizer, gen: Generation) -> list[str]:  # type: ignore[no-untyped-def]
    """Response texts without EOS and padding."""
    texts = []
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True):
        real = [t for t, m in zip(ids, mask, strict=True) if m and t != tokenizer.eos_token_id]
        # a byte-level model can sample a NUL byte, which text stores and JSON tools refuse: shown as U+FFFD
        texts.append(tokenizer.decode(real, skip_special_tokens=True).replace("\x00", "\ufffd"))
    return texts
