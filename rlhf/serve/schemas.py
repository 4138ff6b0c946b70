"""Request and response schemas of the OpenAI-compatible API (pydantic), plus the A/B feedback endpoint.

Inputs follow OpenAI's field names and ranges, every number bounded; fields this server does not know are
ignored, as OpenAI clients and frameworks send extras (`store`, `metadata`, ...). Fields it knows but does
not implement (penalties, tools, tool_choice, response_format, echo, ...) are refused with a 400 naming the
field rather than silently dropped. Extensions: `top_k`, and `ab` (opt in to A/B).
Outputs carry `feedback_id` and `feedback_token` only on A/B responses, and `logprobs` when asked for.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rlhf.feedback.schemas import KEY_PATTERN

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_INT = 2**31 - 1
MAX_LOGPROBS = 20  # most alternatives per token: OpenAI's chat bound, and vLLM's default max_logprobs
Unit = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[Stop], Field(max_length=MAX_STOP)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]], Field(min_length=1)]


# OpenAI fields this server cannot honour, and the values that ask for nothing (so clients that send the
# default explicitly still work); anything else is a 400 naming the field.
NEUTRAL: dict[str, list[Any]] = {
    "tool_choice": ["none"],
    "function_call": ["none"],
    "response_format": [{"type": "text"}],
    "modalities": [["text"]],
    "audio": [],
    "prediction": [],
    "reasoning_effort": [],
    "web_search_options": [],
}


class StreamOptions(BaseModel):
    # extra="allow": options other servers define (vLLM's continuous_usage_stats) still count as given
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False

    def given(self) -> bool:
        """Whether any option is set: `{}` asks for nothing, as vLLM reads it."""
        return bool(self.model_fields_set or self.model_extra)


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, sampling parameters, streaming, A/B opt-in."""

    # strict: "2" for n or "true" for stream is a client's mistake (OpenAI refuses it too), not a number
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(description="a model id from /v1/models")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = Field(
        None, description="most tokens to generate per choice (default: the rest of the context)"
    )
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = Field(
        None, description="sampling temperature; 0 = greedy (default 1)"
    )
    top_p: Unit | None = Field(None, description="nucleus sampling mass in (0, 1] (default 1 = off)")
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT)] | None = Field(
        None, description="keep the k likeliest tokens; 0 or -1 (vLLM's off) = off"
    )
    n: Annotated[int, Field(ge=1, le=128)] | None = Field(None, description="choices to generate (default 1)")
    stop: Stop | StopList | None = Field(
        None, description="up to 4 strings; the text is cut at the first one"
    )
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = Field(
        None, description="same seed and request, same answer"
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    ab: bool | None = Field(None, description="opt in to A/B pairs (also: header X-RLHF-AB: 1)")
    # Known to OpenAI clients, not implemented here: refused unless left at their neutral values.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: list[Any] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        if self.logit_bias:
            return "logit_bias"
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of"
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.tools:
            return "tools"
        if self.functions:
            return "functions"
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value not in neutral:
                return name
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: Any = Field(None, description="refused: this server calls no tools (an assistant turn that did "
                            "would be shown without them)")  # fmt: skip
    function_call: Any = Field(None, description="refused, as tool_calls")

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_tool_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value:  # an empty list (some clients always send one) calls nothing
            raise ValueError(f"'{info.field_name}' in a message is not supported: this server calls no tools")
        return value

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        # as OpenAI's API: only an assistant's turn (one that called tools) may come without its text
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(f"a {info.data['role']} message needs its content")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = Field(
        None, description="the newer name of max_tokens"
    )
    logprobs: bool | None = Field(None, description="return each answer token's log-probability")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description="with logprobs: also the 0-20 likeliest tokens at each position"
    )


# a prompt, a list of prompts, a prompt's token ids, or a list of those (as OpenAI and vLLM take them)
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingRequest):
    prompt: Prompt = Field(
        description="a prompt, a list of prompts, a prompt's token ids, or a list of those"
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description="return each token's log-probability and those of the 0-20 likeliest tokens"
    )


class FeedbackIn(BaseModel):
    """A user's choice between the two answers of an A/B response."""

    model_config = ConfigDict(extra="forbid", strict=True)
    feedback_id: Annotated[str, Field(min_length=1, max_length=128)]
    feedback_token: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="the feedback_token sent with the A/B response: proof of having received it"
    )
    choice: Literal["A", "B", "tie", "both_bad"]
    user: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="optional; must be the `user` the completion request named, if any (any id it took)"
    )
    idempotency_key: Annotated[str, Field(pattern=KEY_PATTERN)] | None = Field(
        None,
        description="8-128 of [A-Za-z0-9_.:-]; or the Idempotency-Key header. A retry never counts twice",
    )


# ---- responses ----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


# The answers every endpoint may give besides its own: documented, so clients and schema checks know them.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("malformed JSON, a missing or out-of-range field, an unsupported parameter, too long a prompt"),
    413: _err("request body over the size limit"),
    422: _err("an idempotency key reused for a different vote (feedback)"),
    500: _err("the generation failed (the request's own rows only)"),
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    **API_ERRORS,
    404: _err("no served model with this id"),
    429: _err("the generation queue is full; retry shortly"),
}
FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    **API_ERRORS,
    403: _err("a feedback_token not issued with this feedback_id, or a user other than the response's"),
    404: _err(
        "no A/B pair with this feedback_id, or this server runs without a feedback store (no_feedback)"
    ),
    409: _err("the A/B pair already has its vote"),
    429: _err("over the vote rate limit per client address or per user (see Retry-After)"),
}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the UTF-8 bytes of `token`")


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        description="the likeliest tokens at this position, most likely first"
    )


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(
        description="per token: the likeliest tokens and the sampled one, token -> log-prob"
    )
    text_offset: list[int] = Field(description="where each token's text begins in the choice's text")


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    feedback_id: str | None = Field(None, exclude_if=lambda v: v is None)
    feedback_token: str | None = Field(None, exclude_if=lambda v: v is None)


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=lambda v: v is None)
    system_fingerprint: str | None = None
    feedback_id: str | None = Field(None, exclude_if=lambda v: v is None)
    feedback_token: str | None = Field(None, exclude_if=lambda v: v is None)


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = Field(None, exclude_if=lambda v: v is None)
    system_fingerprint: str | None = None
    feedback_id: str | None = Field(None, exclude_if=lambda v: v is None)
    feedback_token: str | None = Field(None, exclude_if=lambda v: v is None)


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-loop"
    version: str = Field(description="name@digest of the checkpoint: the policy version votes are tied to")
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class FeedbackOut(BaseModel):
    object: Literal["feedback"] = "feedback"
    feedback_id: str
    choice: str
    vote_id: int
    replayed: bool = Field(description="true when this repeats an earlier request with the same key")


# ---- server-sent events ---------------------------------------------------------------------------------


def sse(event: BaseModel | dict[str, Any]) -> str:
    """One server-sent event in OpenAI's framing."""
    body = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
