"""Batched sampling with a KV cache: temperature, top-k, top-p (nucleus), each sequence stopping at EOS.

Prompts are left-padded so that every row's next token sits in the last column; responses come back
right-padded with a mask. The log-probs returned are those of the sampled tokens under softmax(logits / T),
the distribution PPO recomputes (without the top-k/top-p truncation, as in TRL and OpenRLHF).
"""

from __future__ import annotations

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


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Generation:
    """Sample one response per prompt (token id lists), stopping each row at EOS or after max_new_tokens."""
    device = next(model.parameters()).device
    if generator is None and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    batch = prompt_ids.size(0)
    attention = prompt_mask.clone()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, masks = [], [], []
    input_ids, past = prompt_ids, None
    for _ in range(params.max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()  # (B, V)
        if params.temperature > 0:
            scaled = logits / params.temperature
            probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        else:
            scaled = logits
            next_token = logits.argmax(dim=-1)
        logprob = torch.log_softmax(scaled, dim=-1).gather(-1, next_token[:, None]).squeeze(-1)  # (B,)
        alive = ~finished
        tokens.append(torch.where(alive, next_token, torch.full_like(next_token, pad_id)))
        logprobs.append(torch.where(alive, logprob, torch.zeros_like(logprob)))
        masks.append(alive.long())
        finished = finished | (next_token == eos_id)
        if bool(finished.all()):
            break
        input_ids = tokens[-1][:, None]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
    response_ids = torch.stack(tokens, dim=1)  # (B, T)
    response_mask = torch.stack(masks, dim=1)
    return Generation(
        prompt_ids, prompt_mask, response_ids, response_mask, torch.stack(logprobs, dim=1), finished
    )


def decode_responses(tokenizer, gen: Generation) -> list[str]:  # type: ignore[no-untyped-def]
    """Response texts without EOS and padding."""
    texts = []
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True):
        real = [t for t, m in zip(ids, mask, strict=True) if m and t != tokenizer.eos_token_id]
        # a byte-level model can sample a NUL byte, which text stores and JSON tools refuse: shown as U+FFFD
        texts.append(tokenizer.decode(real, skip_special_tokens=True).replace("\x00", "\ufffd"))
    return texts
