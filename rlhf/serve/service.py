"""What chat and text completions share: resolving parameters, running choices on the engines, A/B pairs.

A request becomes a list of `ChoiceSpec`s (one per choice: which policy, which prompt, how to sample);
`ChoiceRun` submits them to the engines and yields their `Delta`s as they arrive. An A/B request is two
choices: two samples of the requested policy, or the main policy and the candidate in a random order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from rlhf.serve import metrics
from rlhf.serve.deps import ServeState
from rlhf.serve.errors import APIError
from rlhf.serve.feedback import AB, AB_HEADER, Answer, save_ab_async
from rlhf.serve.logprobs import TokenLogprob
from rlhf.serve.policy import Policy
from rlhf.serve.schemas import (
    ChatLogprobs,
    CompletionLogprobs,
    SamplingRequest,
    TokenLogprobOut,
    TopLogprob,
)
from rlhf.serve.sequence import Delta, Overloaded, RowParams, Sequence

log = logging.getLogger(__name__)

SEED_MOD = 2**64


@dataclass
class ChoiceSpec:
    index: int
    policy: Policy
    prompt_ids: list[int]
    params: RowParams


@dataclass
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # of the text's tokens, when asked for


def check_supported(req: SamplingRequest) -> None:
    """A 400 for a parameter this server does not implement, or one that only applies to streams."""
    if req.stream_options is not None and req.stream_options.given() and not req.stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    field = req.unsupported()
    if field is not None:
        raise APIError(
            f"'{field}' is not supported by this server.", param=field, code="unsupported_parameter"
        )


def row_params(
    req: SamplingRequest,
    max_tokens: int | None,
    prompt_len: int,
    policy: Policy,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
    logprobs: int | None = None,
) -> RowParams:
    """The request's sampling parameters, checked against the model's context length; `max_tokens_param`
    names the field `max_tokens` came from (chat's `max_completion_tokens`), for the error; `logprobs`: how
    many alternatives to report with each token's log-prob (None: no log-probs)."""
    context = policy.context_length
    if prompt_len >= context:
        raise APIError(
            f"This model's maximum context length is {context} tokens. However, your "
            f"{'messages come to' if prompt_param == 'messages' else 'prompt is'} {prompt_len} tokens, which "
            "leaves no room for a completion. Please shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = context - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, {max_tokens} for the "
            f"completion). Please reduce the length of the prompt or {max_tokens_param}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return RowParams(
        max_tokens=max_tokens or room,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # -1: off, as vLLM's clients send it
        seed=req.seed,
        stop=stop,
        logprobs=logprobs,
    )


def wants_ab(state: ServeState, req: SamplingRequest, request: Request, n_prompts: int) -> bool:
    """A/B applies to opted-in single-prompt, single-choice requests, at the configured rate."""
    opted = bool(req.ab) or request.headers.get(AB_HEADER, "").strip().lower() in ("1", "true", "yes")
    if not opted or state.store is None or (req.n or 1) != 1 or n_prompts != 1:
        return False
    return state.rng.random() < state.settings.ab_rate


def plan_choices(
    state: ServeState, policy: Policy, prompts: list[list[int]], params: RowParams, n: int, ab: bool
) -> list[ChoiceSpec]:
    """One spec per choice: prompt p's j-th choice is index p * n + j; a seed moves on by j."""
    if len(prompts) * n > state.settings.max_n:
        raise APIError(
            f"At most {state.settings.max_n} choices per request (n times prompts); got {len(prompts) * n}.",
            param="n",
        )
    if ab:
        pair = [policy, policy]
        if state.candidate is not None and policy in (state.main, state.candidate):
            pair = [state.main, state.candidate]
            state.rng.shuffle(pair)  # which side the candidate is shown on is random: no position bias
        return [ChoiceSpec(i, p, prompts[0], _seeded(params, i)) for i, p in enumerate(pair)]
    return [
        ChoiceSpec(p * n + j, policy, ids, _seeded(params, j))
        for p, ids in enumerate(prompts)
        for j in range(n)
    ]


def _seeded(params: RowParams, offset: int) -> RowParams:
    if params.seed is None or offset == 0:
        return params
    return RowParams(**{**params.__dict__, "seed": (params.seed + offset) % SEED_MOD})


# the status logged for a request whose client went away (nginx's "client closed request": nobody reads it)
CLIENT_CLOSED_REQUEST = 499


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ChoiceRun:
    """The choices of one request on the engines. Iterate `deltas()`; `cancel()` frees rows left running."""

    def __init__(self, specs: list[ChoiceSpec], stream: bool) -> None:
        self.specs = specs
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.seqs = [Sequence(s.prompt_ids, s.params, s.index, self._emit, stream) for s in specs]
        self._texts: dict[int, list[str]] = {}
        self._logprobs = {s.index: list[TokenLogprob]() for s in specs if s.params.logprobs is not None}
        self._done: dict[int, ChoiceResult] = {}

    def _emit(self, delta: Delta) -> None:  # called on an engine's thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def start(self) -> None:
        try:
            for spec, seq in zip(self.specs, self.seqs, strict=True):
                spec.policy.engine.submit([seq])
        except Overloaded as e:
            self.cancel()
            raise APIError(
                f"The server is overloaded ({e}); retry shortly.",
                429,
                code="overloaded",
                headers={"Retry-After": "1"},
            ) from None

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancelled = True

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas until every choice has finished (then `finished()` has the results); a generation
        failure raises APIError (500)."""
        running = len(self.seqs)
        while running:
            delta = await self._queue.get()
            if delta.error is not None:
                self.cancel()
                raise APIError(delta.error, 500, code="generation_failed")
            self._texts.setdefault(delta.index, []).append(delta.text)
            if delta.logprobs:
                self._logprobs[delta.index].extend(delta.logprobs)
            if delta.finish_reason is not None:
                running -= 1
                text = "".join(self._texts[delta.index])
                self._done[delta.index] = ChoiceResult(
                    delta.index,
                    text,
                    delta.finish_reason,
                    delta.completion_tokens,
                    self._logprobs.get(delta.index),
                )
            yield delta

    def finished(self) -> list[ChoiceResult]:
        return [self._done[i] for i in sorted(self._done)]

    async def results(self) -> list[ChoiceResult]:
        """Run every choice to its end."""
        try:
            async for _ in self.deltas():
                pass
        finally:
            self.cancel()
        return self.finished()

    async def results_unless_gone(self, request: Request) -> list[ChoiceResult] | None:
        """`results()`, or None as soon as the client has gone away (a timeout, a closed connection): its rows
        are freed then, as a stream's are, instead of running to max_tokens for nobody. The server tells of
        the disconnect on the request's receive channel (the body is read by then), as Starlette's streaming
        responses listen for it."""
        results = asyncio.ensure_future(self.results())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
            if results.done():
                return results.result()
            self.cancel()
            return None
        finally:
            for task in (results, gone):
                if not task.done():
                    task.cancel()


# JSON has no -inf: a token the model rules out entirely is reported at this log-prob, as vLLM does
MIN_LOGPROB = -9999.0


def _token_texts(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]) -> dict[int, str]:
    """Each token's text, decoded alone (as vLLM shows tokens; a token holding part of a character reads
    U+FFFD)."""
    ids = {e.token for e in entries} | {t for e in entries for t, _ in e.top}
    return {t: str(tokenizer.decode([t])) for t in ids}


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's chat `logprobs`: per token its text, log-prob, UTF-8 bytes and top alternatives."""
    texts = _token_texts(tokenizer, entries)

    def top(token: int, logprob: float) -> TopLogprob:
        text = texts[token]
        return TopLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(text.encode()))

    content = [
        TokenLogprobOut(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
        for e in entries
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]
) -> CompletionLogprobs:
    """OpenAI's legacy `logprobs`: tokens, their log-probs, per token the likeliest tokens and the sampled one
    (up to N + 1, as OpenAI and vLLM give them), and where each token's text begins in the choice's text."""
    texts = _token_texts(tokenizer, entries)
    return CompletionLogprobs(
        tokens=[texts[e.token] for e in entries],
        token_logprobs=[max(e.logprob, MIN_LOGPROB) for e in entries],
        top_logprobs=[
            {texts[t]: max(lp, MIN_LOGPROB) for t, lp in [*e.top, (e.token, e.logprob)]} for e in entries
        ],
        text_offset=[e.offset for e in entries],
    )


def sampling_record(spec: ChoiceSpec, result: ChoiceResult) -> dict[str, Any]:
    """The sampling parameters stored with a production completion (its lineage), and how it ended."""
    p = spec.params
    return {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "max_new_tokens": p.max_tokens,
        "seed": p.seed,
        "stop": list(p.stop),
        "model": spec.policy.name,
        "finish_reason": result.finish_reason,
    }


async def save_ab(
    state: ServeState,
    specs: list[ChoiceSpec],
    results: list[ChoiceResult],
    prompt: str,
    meta: dict[str, Any],
) -> AB | None:
    """Write the A/B pair to the store; its feedback id and token, or None (identical answers, or the store
    failed: the user still gets the answers, only the vote is lost)."""
    assert state.store is not None and len(results) == 2
    answers = (
        Answer(results[0].text, specs[0].policy.version, sampling_record(specs[0], results[0])),
        Answer(results[1].text, specs[1].policy.version, sampling_record(specs[1], results[1])),
    )
    ab = await save_ab_async(state.store, prompt, answers, meta)
    if ab is not None:
        metrics.AB_RESPONSES.labels(meta.get("endpoint", "")).inc()
    return ab
