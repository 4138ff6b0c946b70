"""The sampler: one token per row of logits, each row with its own temperature, top-k, top-p and random stream.

`generate` (and so PPO rollouts, eval, best-of-n) and the server both draw through `sample`. A batch-wide
`SamplingParams` is the special case of equal rows. Each row draws from a counter-based stream: the uniforms of
a row's n-th token are a hash of (the row's key, n, attempt), so a seeded row gets the same tokens whichever
other rows share its batch and wherever it sits in it (up to floating-point differences of the batched forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


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


@dataclass(frozen=True)
class RowSampling:
    """Sampling parameters per row: temperature (B,), 0 = greedy; top_k (B,) int, 0 = off; top_p (B,) in (0, 1],
    1 = off."""

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor

    @staticmethod
    def of(params: SamplingParams, rows: int, device: torch.device | str = "cpu") -> RowSampling:
        """Every row with the batch-wide parameters."""
        return RowSampling(
            torch.full((rows,), float(params.temperature), device=device),
            torch.full((rows,), int(params.top_k), dtype=torch.long, device=device),
            torch.full((rows,), float(params.top_p), device=device),
        )

    def __getitem__(self, rows: Tensor) -> RowSampling:
        return RowSampling(self.temperature[rows], self.top_k[rows], self.top_p[rows])


# splitmix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators") on int64 tensors:
# multiplication wraps modulo 2^64, and a logical right shift is an arithmetic one with the sign bits masked off
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: Tensor, bits: int) -> Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Tensor) -> Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def _int64(value: int) -> int:
    """A Python int as the signed int64 with the same low 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def stream_keys(*parts: int | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Keys of random streams (int64), one per element of the broadcast `parts` (ints, or int tensors such as row
    or sample indices): `stream_keys(seed, iteration, index)` names the stream of one sample of one iteration."""
    key = torch.zeros((), dtype=torch.long, device=device)
    for part in parts:
        t = (
            part.to(device=device, dtype=torch.long)
            if isinstance(part, Tensor)
            else torch.tensor(_int64(part), device=device)
        )
        key = _mix64(key + _mix64(t + _GOLDEN))
    return key


# draws per token: the first, up to four redraws outside the nucleus, one for the sorted draw of rows still out
_ATTEMPTS = 6


@dataclass(frozen=True)
class RowStreams:
    """Counter-based random streams: row i's uniforms for its token number counters[i] depend on keys[i] and that
    number only."""

    keys: Tensor  # (B,) int64
    counters: Tensor | int  # (B,) int64, or one number for every row

    def uniform(self, attempt: int) -> Tensor:
        """(B,) in [0, 1), on a 2^-24 grid (as torch.rand's float32)."""
        if isinstance(self.counters, int):
            state = self.keys + _int64((self.counters * _ATTEMPTS + attempt + 1) * _GOLDEN)
        else:
            state = self.keys + (self.counters * _ATTEMPTS + attempt + 1) * _GOLDEN
        return _shr(_mix64(state), 40).float() * 2.0**-24

    def __getitem__(self, rows: Tensor) -> RowStreams:
        counters = self.counters if isinstance(self.counters, int) else self.counters[rows]
        return RowStreams(self.keys[rows], counters)


# below this temperature, logits / T may overflow float32 (logits of 1e4 reach 1e7 at 1e-3, far from 3e38)
_TINY_TEMPERATURE = 1e-3


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / the nucleus of mass top_p to -inf (at least one token always stays)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (so the first token always stays)
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = (before >= top_p) & (before > 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: Tensor,
    params: SamplingParams | RowSampling,
    draws: RowStreams | Tensor,
    never: Sequence[int] = (),
) -> tuple[Tensor, Tensor]:
    """(token, log-prob) per row, (B,) each; the log-prob is under softmax(logits / T), untruncated (the
    distribution PPO recomputes, as in TRL and OpenRLHF). Greedy rows (T = 0) take the argmax, their log-prob
    under softmax(logits).

    `draws`: the rows' random streams, or uniforms in [0, 1) given directly, (B,) or (B, A), A draws per row.
    `never`: token ids never drawn (PAD): their probability is set to 0 before the draw, not in the log-prob.

    The distribution is softmax(filter_logits(logits / T, top_k, top_p)), drawn without sorting the vocabulary:
    by inverse CDF (in vocabulary order) from the top-k truncated distribution, and a draw outside the nucleus is
    drawn again, which is exact rejection sampling (the nucleus holds at least top_p of the mass, so redraws are
    rare). Rows still outside after the redraws, and every nucleus row when only one uniform per row is given,
    draw by inverse CDF over the sorted nucleus with the last uniform. A sort of the vocabulary costs several
    times more than the rest of a decoding step on a CPU.
    """
    rows, vocab = logits.shape
    uniform: Callable[[int, Tensor | None], Tensor]  # (attempt, rows or None for all) -> (R,)
    if isinstance(draws, RowStreams):
        streams, attempts = draws, _ATTEMPTS
        uniform = lambda attempt, at: (streams if at is None else streams[at]).uniform(attempt)  # noqa: E731
    else:
        given = draws.reshape(rows, -1)  # (B, A)
        attempts = given.size(1)
        uniform = lambda attempt, at: given[:, attempt] if at is None else given[at, attempt]  # noqa: E731
    # a batch-wide SamplingParams stays scalar (no per-row tensors to build and compare)
    temperature: float | Tensor
    top_p: float | Tensor
    top_k: int | Tensor
    greedy: Tensor | None = None  # (B,) bool, given per row
    nucleus: Tensor | None = None  # (B,) bool, given per row
    if isinstance(params, SamplingParams):
        any_greedy = all_greedy = params.temperature <= 0
        temperature, top_p = (1.0 if all_greedy else params.temperature), params.top_p
        top_k = k_max = params.top_k if 0 < params.top_k < vocab else 0
        any_nucleus = not all_greedy and params.top_p < 1.0
    else:
        greedy = params.temperature <= 0
        any_greedy, all_greedy = bool(greedy.any()), bool(greedy.all())
        temperature = torch.where(greedy, 1.0, params.temperature)[:, None]  # (B, 1)
        top_k = torch.where(greedy | (params.top_k >= vocab), 0, params.top_k)  # (B,)
        k_max = int(top_k.max())
        top_p, nucleus = params.top_p[:, None], ~greedy & (params.top_p < 1.0)  # (B, 1), (B,)
        any_nucleus = bool(nucleus.any())
    logits = logits.float()
    if (bool((temperature < _TINY_TEMPERATURE).any()) if isinstance(temperature, Tensor)
            else temperature < _TINY_TEMPERATURE):  # fmt: skip
        # shifted by the row's largest logit before the division, so that a tiny temperature (1e-40) cannot
        # overflow float32 into inf - inf = NaN: the same distribution (softmax is shift-invariant); only
        # then, as it costs two more passes over the vocabulary
        logits = logits - logits.amax(dim=-1, keepdim=True)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
    probs = logp.exp()
    if never:
        probs = probs.index_fill(-1, torch.tensor(list(never), device=logits.device), 0.0)
    if all_greedy:  # nothing to draw
        token = probs.argmax(dim=-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)
    if k_max > 0:
        if isinstance(top_k, int):
            kth = torch.topk(probs, k_max, dim=-1).values[:, -1:]  # (B, 1)
            probs = probs.masked_fill(probs < kth, 0.0)
        else:
            kth = torch.topk(probs, k_max, dim=-1).values.gather(
                -1, (top_k.clamp(min=1) - 1)[:, None]
            )  # (B, 1)
            probs = probs.masked_fill((top_k[:, None] > 0) & (probs < kth), 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, V), computed once for the draw and its redraws
    token = _invert(cdf, uniform(0, None))  # (B,)
    if any_nucleus:
        top_p = torch.as_tensor(top_p, device=logits.device).expand(rows, 1)  # (B, 1)
        rejections = attempts - 1  # the last uniform is kept for the sorted draw
        if rejections:
            outside = _outside_nucleus(probs, cdf, token, top_p)  # (B,)
            outside = outside if nucleus is None else outside & nucleus
        else:
            outside = torch.ones(rows, dtype=torch.bool, device=logits.device) if nucleus is None else nucleus
        for attempt in range(1, rejections):
            out = outside.nonzero().squeeze(-1)  # (R,) rows drawn outside the nucleus
            if out.numel() == 0:
                break
            token[out] = _invert(cdf[out], uniform(attempt, out))
            outside[out] = _outside_nucleus(probs[out], cdf[out], token[out], top_p[out])
        out = outside.nonzero().squeeze(-1)
        if out.numel():
            token[out] = _draw_nucleus(probs[out], top_p[out], uniform(attempts - 1, out))
    if greedy is not None and any_greedy:
        token = torch.where(greedy, probs.argmax(dim=-1), token)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def raw_logprobs(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens' log-probabilities (R,) under the model's own distribution, log_softmax(logits) at temperature 1
    before any top-k / top-p, and each row's k likeliest tokens, (R, k) log-probs and (R, k) ids, most likely
    first: what vLLM's OpenAI server reports by default (its "raw_logprobs" mode) and OpenAI's API shows."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)  # (R,)
    top = torch.topk(logp, min(k, logp.size(-1)), dim=-1)  # sorted, largest first
    return chosen, top.values, top.indices


def _invert(cdf: Tensor, u: Tensor) -> Tensor:
    """One token per row (B,) by inverse CDF: the unnormalised cumulative probabilities (B, V), uniforms u (B,)."""
    target = u[:, None].to(cdf.dtype) * cdf[:, -1:]  # (B, 1)
    # right=True: the first index whose CDF exceeds the target, so a zero-probability token is never chosen
    return torch.searchsorted(cdf, target, right=True).clamp(max=cdf.size(-1) - 1).squeeze(-1)


def _outside_nucleus(probs: Tensor, cdf: Tensor, token: Tensor, top_p: Tensor) -> Tensor:
    """(B,) bool: the token's more probable tokens already hold top_p (B, 1) of the mass (the sorted rule)."""
    p = probs.gather(-1, token[:, None])  # (B, 1)
    above = torch.where(probs > p, probs, 0.0).sum(-1, keepdim=True)  # (B, 1)
    # `above > 0`: the most likely token is never outside, even where top_p * mass underflows to 0
    return ((above >= top_p * cdf[:, -1:]) & (above > 0)).squeeze(-1)


def _draw_nucleus(probs: Tensor, top_p: Tensor, u: Tensor) -> Tensor:
    """The inverse-CDF draw over the sorted nucleus, the smallest set of most likely tokens holding top_p (R, 1)
    of the mass (the most likely token always stays); uniforms u (R,)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (R, V)
    mass = sorted_probs.cumsum(dim=-1)
    # a token is dropped when the mass before it already reaches top_p (never the first: its mass before is 0)
    before = mass - sorted_probs
    kept = sorted_probs.masked_fill((before >= top_p * mass[:, -1:]) & (before > 0), 0.0)
    return order.gather(-1, _invert(kept.cumsum(dim=-1), u)[:, None]).squeeze(-1)
