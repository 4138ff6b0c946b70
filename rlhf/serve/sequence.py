"""What the generation worker (rlhf.serve.engine) and the requests it serves exchange: the sampling parameters
of one choice, the `Sequence` the worker keeps for it, the `Delta`s it reports; and how much of a running
choice's text may be sent."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf.engine.sampling import stream_keys
from rlhf.serve.detokenize import IncrementalText
from rlhf.serve.logprobs import ChoiceLogprobs, TokenLogprob


@dataclass(frozen=True)
class RowParams:
    """How one choice is sampled (the OpenAI request's parameters, resolved)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # chat: the answer is shown without its leading whitespace, so no stop string is looked for in it
    skip_leading_space: bool = False
    # report each token's log-prob and this many likeliest alternatives; None = off
    logprobs: int | None = None


@dataclass
class Delta:
    """What a sequence reports: new text; at the end, also why it stopped and how many tokens it made."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | None while running
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # rows that ask: the tokens whose text this delta completes


@dataclass(eq=False)
class Sequence:
    """One choice being generated, and the state the worker keeps for it."""

    prompt_ids: list[int]
    params: RowParams
    index: int
    emit: Callable[[Delta], None]
    stream: bool = False
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (streaming, stop strings or logprobs only), cut at a stop string
    detokenizer: IncrementalText = field(default_factory=IncrementalText)  # decodes `text` token by token
    sent: int = 0  # characters of `text` already emitted
    decoded: int = 0  # characters the tokens decode to, before any cut
    cut: bool = False  # the text was cut at a stop string
    logprobs: ChoiceLogprobs = field(default_factory=ChoiceLogprobs)  # one per token (rows that ask)
    finish_reason: str | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    stream_key: int | None = None  # the key of the random stream of its tokens; from the seed, if any

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.stream_key = int(stream_keys(self.params.seed))

    @property
    def tracks_text(self) -> bool:
        """Whether its text is decoded at every token: to stream it, find stop strings or place logprobs."""
        return self.stream or bool(self.params.stop) or self.params.logprobs is not None


class Overloaded(Exception):
    """The queue is full; the request should be retried later."""


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of a running sequence's text can be sent: not a trailing partial character (U+FFFD from
    half a UTF-8 byte sequence), nor a tail that may grow into a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                hold = max(hold, k)
                break
    return end - hold


def leading_space(text: str) -> int:
    """How many whitespace characters `text` starts with (as `str.lstrip` strips them), without copying it."""
    match = re.match(r"\s*", text)
    return match.end() if match else 0
