"""Per-row sampling: every row of a batch has its own temperature, top-k, top-p and random stream.

`rlhf.generation.generate` samples a whole batch with one set of parameters and one generator. A server
batches unrelated requests, so each row carries its own: rows with temperature 0 take the argmax, the others
sample by inverse CDF from a uniform drawn from the row's own generator, so a seeded request gets the same
tokens whichever other requests share its batch (up to floating-point differences of the batched forward).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_rows(
    logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, uniforms: Tensor
) -> Tensor:
    """One token id per row.

    logits (B, V); temperature (B,), 0 = greedy; top_p (B,) in (0, 1], 1 = off; top_k (B,) int, 0 = off;
    uniforms (B,) in [0, 1), one draw per row. Truncation follows `rlhf.generation.filter_logits`: top-k,
    then the smallest nucleus whose mass reaches top_p (the most likely token always stays).
    """
    greedy = temperature <= 0  # (B,)
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if bool(((top_p < 1.0) | (top_k > 0)).any()):
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        rank = torch.arange(probs.size(-1), device=probs.device)[None, :]  # (1, V)
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        # a token is dropped when the mass before it already reaches top_p; rows with top_p = 1 keep all
        drop |= (top_p[:, None] < 1.0) & ((probs.cumsum(dim=-1) - probs) >= top_p[:, None])
        probs = probs.masked_fill(drop, 0.0)
    else:  # nothing to truncate: sample in vocabulary order, no sort
        probs, order = torch.softmax(scaled, dim=-1), None
    cdf = probs.cumsum(dim=-1)  # (B, V), unnormalised after truncation
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]  # (B, 1)
    # the first index whose cumulative mass exceeds the target; dropped tokens add no mass, so never win
    index = torch.searchsorted(cdf, target, right=True).clamp(max=probs.size(-1) - 1)  # (B, 1)
    sampled = (index if order is None else order.gather(-1, index)).squeeze(-1)  # (B,)
    return torch.where(greedy, scaled.argmax(dim=-1), sampled)
