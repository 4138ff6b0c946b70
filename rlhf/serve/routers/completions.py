"""POST /v1/completions: prompts (one or a list, as text or token ids) continued as they are; JSON or a stream."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
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
    Completion,
    CompletionRequest,
    Prompt,
    TextChoice,
    Usage,
    sse,
)
from rlhf.serve.service import (
    CLIENT_CLOSED_REQUEST,
    ChoiceRun,
    check_supported,
    completion_logprobs,
    plan_choices,
    row_params,
    save_ab,
    wants_ab,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=MODEL_ERRORS)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep
) -> Completion | StreamingResponse | Response:
    policy = state.policy(body.model)
    check_supported(body)
    prompts, texts = encode(policy, body.prompt)
    # One set of parameters for all prompts, so the longest prompt decides whether max_tokens fits.
    params = row_params(
        body, body.max_tokens, max(len(p) for p in prompts), policy, "prompt", logprobs=body.logprobs
    )
    ab = wants_ab(state, body, request, len(prompts))
    specs = plan_choices(state, policy, prompts, params, body.n or 1, ab)
    meta: dict[str, Any] = {"endpoint": "completions", "model": policy.name, "request_user": body.user}
    prompt_tokens = sum(len(p) for p in prompts)
    run = ChoiceRun(specs, stream=bool(body.stream))
    run.start()
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(state, run, ab, ident, created, policy, prompt_tokens, include_usage, texts[0], meta)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    results = await run.results_unless_gone(request)
    if results is None:  # the client went away: nobody to answer, no A/B pair to store
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    ab_pair = await save_ab(state, specs, results, texts[0], meta) if ab else None
    completion_tokens = sum(r.completion_tokens for r in results)
    return Completion(
        id=ident,
        created=created,
        model=policy.name,
        choices=[
            TextChoice(
                index=r.index,
                text=r.text,
                logprobs=None if r.logprobs is None else completion_logprobs(policy.tokenizer, r.logprobs),
                finish_reason=r.finish_reason,
            )
            for r in results
        ],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        **(ab_pair.fields() if ab_pair else {}),
    )


def encode(policy: Policy, prompt: Prompt) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and text. Text is encoded after the tokenizer's BOS, if it adds one; token ids
    are taken as they are (as OpenAI and vLLM take them) and decoded for the feedback store."""
    # one prompt (text or ids) becomes a list of one; the schema makes every list all text or all ids
    items: list[Any] = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
    if isinstance(items[0], str):
        prompts = encode_prompts(policy.tokenizer, items)
        if not all(prompts):
            raise APIError(
                f"An empty prompt cannot be continued: the model '{policy.name}' has no BOS token to start "
                "from.",
                param="prompt",
                code="empty_prompt",
            )
        return prompts, items
    vocab = policy.engine.vocab_size
    bad = next((t for ids in items for t in ids if t >= vocab), None)
    if bad is not None:
        raise APIError(
            f"Token id {bad} is out of vocabulary: the model '{policy.name}' takes ids 0 to {vocab - 1}.",
            param="prompt",
            code="invalid_token_id",
        )
    return items, [str(policy.tokenizer.decode(ids)) for ids in items]


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
    """Text chunks as they come, each choice's last one with its finish_reason; a last chunk with the
    usage (when asked) and the feedback id (A/B pairs); then [DONE]."""

    def chunk(choices: list[TextChoice], **extra: Any) -> str:
        return sse(Completion(id=ident, created=created, model=policy.name, choices=choices, **extra))

    try:
        async for d in run.deltas():
            if d.text or d.finish_reason is not None:
                logprobs = None if d.logprobs is None else completion_logprobs(policy.tokenizer, d.logprobs)
                yield chunk(
                    [TextChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)]
                )
        results = run.finished()
        ab_pair = await save_ab(state, run.specs, results, prompt, meta) if ab else None
        if include_usage or ab_pair:
            done = sum(r.completion_tokens for r in results)
            usage = Usage(
                prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
            )
            yield chunk([], usage=usage if include_usage else None, **(ab_pair.fields() if ab_pair else {}))
    except APIError as e:
        yield sse(error_body(e.message, e.status, e.param, e.code))
    finally:
        run.cancel()
    yield SSE_DONE
