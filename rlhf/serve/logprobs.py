"""The log-probs a generated choice reports (OpenAI's `logprobs` / `top_logprobs`): each sampled token's log-prob
and its likeliest alternatives, placed where the token's text begins in the choice's, and reported with the
delta whose text completes that token's (never for an ending EOS / end-of-turn token or a stop string's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from rlhf.engine.sampling import raw_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-prob under the model's raw distribution (temperature 1, before top-k / top-p), its
    likeliest alternatives as (id, log-prob), most likely first, and where its text starts in the choice's."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int = 0


def sampled_logprobs(logits: Tensor, tokens: Tensor, rows: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """For each of `rows` of a batch's logits (B, V): its sampled token's log-prob and its `top_n` likeliest
    alternatives; only those rows pay for a log-softmax over the vocabulary."""
    at = torch.tensor(rows, device=logits.device)  # (R,)
    chosen, top_values, top_ids = raw_logprobs(logits[at], tokens[at], max(top_n))  # (R,), (R, k), (R, k)
    return [
        TokenLogprob(token, logprob, list(zip(ids[:n], values[:n], strict=True)))
        for token, logprob, values, ids, n in zip(
            tokens[at].tolist(), chosen.tolist(), top_values.tolist(), top_ids.tolist(), top_n, strict=True
        )
    ]


@dataclass
class ChoiceLogprobs:
    """One choice's log-probs: one entry per token, each at the offset where its text begins, and how many of
    them were reported already."""

    entries: list[TokenLogprob] = field(default_factory=list)
    reported: int = 0  # entries already reported
    pending: TokenLogprob | None = None  # of the token just sampled, until it is appended

    def place(self, begins: int) -> None:
        """Add the pending token's log-prob where its text begins; tokens not yet reported that seemed to begin
        later (parts of a character this token completes) begin there too."""
        if self.pending is None:
            return
        for i in range(len(self.entries) - 1, self.reported - 1, -1):
            if self.entries[i].offset <= begins:
                break
            self.entries[i] = replace(self.entries[i], offset=begins)
        self.entries.append(replace(self.pending, offset=begins))
        self.pending = None

    def completed(self, ready: int, decoded: int) -> list[TokenLogprob]:
        """While running: the entries not yet reported of the tokens whose text ends within the first `ready`
        characters (a token's text ends where the next one's begins; the last one's, at `decoded`)."""
        end = self.reported
        while (
            end < len(self.entries)
            and (self.entries[end + 1].offset if end + 1 < len(self.entries) else decoded) <= ready
        ):
            end += 1
        return self._report(end)

    def remaining(self, text: str, cut: bool, ends_with_stop_token: bool) -> list[TokenLogprob]:
        """At the end: the entries not yet reported of the tokens of the choice's `text`, that is, neither an
        ending EOS / end-of-turn token nor, where the text was `cut` at a stop string, that string's tokens."""
        if cut:
            end = sum(1 for e in self.entries if e.offset < len(text))
        else:
            end = len(self.entries) - (1 if ends_with_stop_token else 0)
        return self._report(end)

    def _report(self, end: int) -> list[TokenLogprob]:
        out = self.entries[self.reported : end]
        self.reported = max(self.reported, end)
        return out
