"""POST /v1/chat/completions: messages rendered by the policy's chat template; JSON or a stream of chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from rlhf.models.tokens import encode_prompts
from rlhf.serve.deps import StateDep
from rlhf.serve.errors import APIError, error_body
from rlhf.serve.policy import Policy
from rlhf.serve.schemas import (
    MODEL_ERRORS,
    SSE_DONE,
    SSE_HEADERS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChunkDelta,
    ResponseMessage,
    Usage,
    sse,
)
from rlhf.serve.sequence import RowParams
from rlhf.serve.service import (
    CLIENT_CLOSED_REQUEST,
    ChoiceRun,
    chat_logprobs,
    check_supported,
    plan_choices,
    row_params,
    save_ab,
    wants_ab,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=MODEL_ERRORS)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep
) -> ChatCompletion | StreamingResponse | Response:
    policy = state.policy(body.model)
    check_supported(body)
    prompt = render_chat(policy, body.messages)
    prompt_ids = encode_prompts(policy.tokenizer, [prompt])[0]
    if not prompt_ids:
        raise APIError("The messages render to an empty prompt.", param="messages", code="empty_prompt")
    params = chat_params(body, policy, prompt_ids)
    ab = wants_ab(state, body, request, 1)
    specs = plan_choices(state, policy, [prompt_ids], params, body.n or 1, ab)
    for spec in specs:
        if spec.policy is not policy:  # an A/B pair's other policy reads the chat in its own chat template
            spec.prompt_ids = encode_prompts(
                spec.policy.tokenizer, [render_chat(spec.policy, body.messages)]
            )[0]
            spec.params = replace(chat_params(body, spec.policy, spec.prompt_ids), seed=spec.params.seed)
    tokenizers = {spec.index: spec.policy.tokenizer for spec in specs}
    meta: dict[str, Any] = {
        "endpoint": "chat.completions",
        "model": policy.name,
        "messages": [m.model_dump(exclude_none=True) for m in body.messages],
        "request_user": body.user,
    }
    run = ChoiceRun(specs, stream=bool(body.stream))
    run.start()
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(state, run, ab, ident, created, policy, len(prompt_ids), include_usage, prompt, meta)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    results = await run.results_unless_gone(request)
    if results is None:  # the client went away: nobody to answer, no A/B pair to store
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    ab_pair = await save_ab(state, specs, results, prompt, meta) if ab else None
    completion_tokens = sum(r.completion_tokens for r in results)
    return ChatCompletion(
        id=ident,
        created=created,
        model=policy.name,
        choices=[
            ChatChoice(
                index=r.index,
                message=ResponseMessage(content=r.text.lstrip()),
                logprobs=None if r.logprobs is None else chat_logprobs(tokenizers[r.index], r.logprobs),
                finish_reason=r.finish_reason,
            )
            for r in results
        ],
        usage=Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt_ids) + completion_tokens,
        ),
        **(ab_pair.fields() if ab_pair else {}),
    )


def chat_params(body: ChatCompletionRequest, policy: Policy, prompt_ids: list[int]) -> RowParams:
    """The request's sampling parameters for `policy` given the chat rendered as `prompt_ids`."""
    params = row_params(
        body,
        body.max_completion_tokens or body.max_tokens,
        len(prompt_ids),
        policy,
        "messages",
        "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        asked_logprobs(body),
    )
    # the answer's leading whitespace (the space after "Assistant:") is dropped below: stops skip it too
    return replace(params, skip_leading_space=True)


def asked_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives to report with each token's log-prob, or None when log-probs are off; a 400 for
    top_logprobs without logprobs (as OpenAI and vLLM answer it; 0 asks for nothing and passes)."""
    if body.top_logprobs and not body.logprobs:
        raise APIError("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def render_chat(policy: Policy, messages: list[ChatMessage]) -> str:
    """The prompt text the policy sees: its chat template applied, ending with the assistant's turn."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if not getattr(policy.tokenizer, "chat_template", None):
        raise APIError(
            f"The model '{policy.name}' has no chat template; use /v1/completions with a plain prompt.",
            param="messages",
            code="no_chat_template",
        )
    try:
        return str(policy.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
    except Exception as e:  # templates raise their own errors for sequences they do not accept
        raise APIError(f"The chat template rejected these messages: {e}", param="messages") from None


async def _stream(
    state: StateDep,
    run: ChoiceRun,
    ab: bool,
    ident: str,
    created: int,
    policy: Policy,
    prompt_tokens: int,
    include_usage: bool,
    prompt: str,
    meta: dict[str, Any],
) -> AsyncIterator[str]:
    """Chunks: the role first, then content deltas, then each choice's finish_reason; a last chunk with
    the usage (when asked) and the feedback id (A/B pairs); then [DONE]."""

    def chunk(
        index: int, delta: ChunkDelta, finish_reason: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return sse(ChatCompletionChunk(id=ident, created=created, model=policy.name, choices=[choice]))

    tokenizers = {spec.index: spec.policy.tokenizer for spec in run.specs}
    started: set[int] = set()  # choices whose content has begun (leading whitespace is dropped before)
    try:
        for spec in run.specs:
            yield chunk(spec.index, ChunkDelta(role="assistant", content=""))
        async for d in run.deltas():
            content = d.text if d.index in started else d.text.lstrip()
            if content:
                started.add(d.index)
            if content or d.logprobs:  # the tokens of dropped leading whitespace still have their log-probs
                logprobs = chat_logprobs(tokenizers[d.index], d.logprobs) if d.logprobs else None
                yield chunk(d.index, ChunkDelta(content=content), logprobs=logprobs)
            if d.finish_reason is not None:
                yield chunk(d.index, ChunkDelta(), d.finish_reason)
        results = run.finished()
        ab_pair = await save_ab(state, run.specs, results, prompt, meta) if ab else None
        if include_usage or ab_pair:
            done = sum(r.completion_tokens for r in results)
            usage = Usage(
                prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
            )
            yield sse(
                ChatCompletionChunk(
                    id=ident,
                    created=created,
                    model=policy.name,
                    choices=[],
                    usage=usage if include_usage else None,
                    **(ab_pair.fields() if ab_pair else {}),
                )
            )
    except APIError as e:
        yield sse(error_body(e.message, e.status, e.param, e.code))
    finally:
        run.cancel()
    yield SSE_DONE
