"""Batched sampling with a KV cache: temperature, top-k, top-p (nucleus), each sequence stopping at EOS (or at
another stop id: a chat template's end-of-turn token). PAD is never sampled.

Prompts are left-padded so that every row's next token sits in the last column; responses come back
right-padded with a mask. The log-probs returned are those of the sampled tokens under softmax(logits / T),
the distribution PPO recomputes (without the top-k/top-p truncation, as in TRL and OpenRLHF).

The rows decode as one `DecodeBatch` (rlhf.engine.decode_batch, which the server's worker decodes through too):
every model steps through its own transformers forward, on a CPU over a cache written in place, with one mask
per step and an attention kernel for one new token (rlhf.engine.decode_cache); elsewhere (GPUs, sliding windows
shorter than the sequence, ALiBi, other attention kinds) over transformers' `DynamicCache`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlhf.engine.decode_batch import DecodeBatch
from rlhf.engine.sampling import RowStreams, SamplingParams, sample, stream_keys
from rlhf.errors import ConfigError
from rlhf.models.loading import context_length
from rlhf.models.tokens import stop_ids

__all__ = ["Generation", "SamplingParams", "decode_responses", "fit_context", "generate", "left_pad"]

log = logging.getLogger(__name__)


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


def never_sampled(pad_id: int, stops: Sequence[int], model: Any = None) -> list[int]:
    """The token ids a response never samples: PAD, unless PAD also ends a response, and the model's
    generation config's `suppress_tokens` (the rows past its tokenizer's last id: rlhf.models.tokens)."""
    suppressed = list(getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or ())
    return ([] if pad_id in stops else [pad_id]) + [t for t in suppressed if t != pad_id and t not in stops]


# Finished rows leave the decoded batch once at most half of it still runs, and it shrinks to a power of two
# (finished rows fill the rest): each shrink copies the cache, and each new batch size costs new matmul
# kernels (oneDNN and cuBLAS build one per shape), so a few sizes are reused across batches. On the tiny PPO
# workload's rollouts this took generation from 0.198 to 0.159 s (thresholds 0.5-0.75 gave 0.147-0.159 s).
_COMPACT_AT = 0.5


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    synced: bool = False,
    seeds: Tensor | None = None,
) -> Generation:
    """Sample one response per prompt (token id lists), stopping each row at EOS (`eos_id`: one id, or the
    stop ids of rlhf.models.tokens.stop_ids) or after max_new_tokens. PAD is masked out of sampling.

    `synced`: every process decodes until all processes' rows have ended, as a model sharded across them
    (FSDP) needs: each step's forward gathers its weights from all of them.

    Each row draws from its own random stream (rlhf.engine.sampling): `seeds` (B,) int64 are their keys (see
    `stream_keys`), so a row's tokens do not depend on the rows beside it. Without them the keys come from
    `generator`, else from `params.seed` and the row's index, else from torch's global generator.

    The hot loop does no Python work per row: the outputs are preallocated and written a column per step,
    the cache and masks grow by whole blocks (rlhf.engine.decode_batch), the prefill computes logits for the
    last position only, and the forwards run in inference mode. Finished rows leave the batch (see _COMPACT_AT), so a batch of mostly short answers
    does not pay for its longest.
    """
    with evaluating(model):
        return _generate(model, prompts, params, eos_id, pad_id, generator, synced, seeds)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode while it samples, each module's mode put back after: a model in training mode
    with gradient checkpointing drops its KV cache in some architectures' own forwards (GPT-2, Bloom, Falcon:
    `gradient_checkpointing and self.training`, whether or not gradients are on), and PPO samples from the
    policy it trains. Dropout is off in every stage's models, so nothing else changes."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | None,
    synced: bool,
    seeds: Tensor | None,
) -> Generation:
    device = next(model.parameters()).device
    prompts = fit_context(prompts, context_length(model), params.max_new_tokens)
    stops_list = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    stops = torch.tensor(stops_list, dtype=torch.long, device=device)
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    (batch, width), steps = prompt_ids.shape, params.max_new_tokens
    response_ids = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)  # (B, T)
    logprobs = torch.zeros(batch, steps, device=device)  # (B, T)
    response_mask = torch.zeros(batch, steps, dtype=torch.long, device=device)  # (B, T)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    if seeds is None:
        seeds = _row_keys(batch, params, generator)
    row_keys = seeds.to(device)  # (b,) each row's random stream
    never = never_sampled(pad_id, stops_list, model)
    decoding = DecodeBatch(model, width + steps, synced=synced)
    rows = torch.arange(batch, device=device)  # (b,) the row of each sequence still decoded
    logits, n = decoding.prefill(prompt_ids, prompt_mask), 0  # (b, V)
    for step in range(steps):
        if step > 0:  # the previous step's tokens in (PAD for finished rows, masked out of the answers)
            logits = decoding.step(response_ids[rows, step - 1])  # (b, V)
        next_token, logprob = sample(logits, params, RowStreams(row_keys, step), never)  # (b,) each
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
                continue
        elif n_running == 0:
            break
        # finished rows leave the batch (and the cache) once enough of them have, not at every step
        if n_running <= _COMPACT_AT * rows.numel():
            size = 1 << (n_running - 1).bit_length()
            # the running rows, and finished ones to fill the bucket, in their order
            kept = running.float().argsort(descending=True, stable=True)[:size].sort().values  # (size,)
            if size < rows.numel() and decoding.keep(kept):
                decoding.trim()
                rows, row_keys = rows[kept], row_keys[kept]
    return Generation(
        prompt_ids, prompt_mask, response_ids[:, :n], response_mask[:, :n], logprobs[:, :n], finished
    )


def _row_keys(batch: int, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """(B,) stream keys: drawn from `generator`, or from `params.seed` and the row index, or from torch's global
    generator."""
    if generator is None and params.seed is not None:
        return stream_keys(params.seed, torch.arange(batch))
    device = generator.device if generator is not None else "cpu"
    return torch.randint(-(2**63), 2**63 - 1, (batch,), generator=generator, device=device)


def decode_responses(tokenizer, gen: Generation) -> list[str]:  # type: ignore[no-untyped-def]
    """Response texts without EOS (or the end-of-turn token) and padding."""
    texts, stops = [], set(stop_ids(tokenizer))
    for ids, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist(), strict=True):
        real = [t for t, m in zip(ids, mask, strict=True) if m and t not in stops]
        # a byte-level model can sample a NUL byte, which text stores and JSON tools refuse: shown as U+FFFD
        texts.append(tokenizer.decode(real, skip_special_tokens=True).replace("\x00", "\ufffd"))
    return texts
