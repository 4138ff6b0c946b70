"""The A/B feedback gateway: any OpenAI-compatible engine behind it, this project's A/B pairs in front.

    rlhf gateway --upstream http://127.0.0.1:8001/v1 --feedback-db sqlite:///feedback.db --ab-rate 0.1
    rlhf gateway --upstream http://vllm:8000/v1 --candidate-model policy-v2 --candidate-upstream http://vllm2:8000/v1 ...

The engine (vLLM, TGI, SGLang, Ollama, llama.cpp, or `rlhf serve`) keeps doing the generation. Requests
pass through as they are, bytes in and bytes out, streams included, over pooled connections. A request
that opts in to A/B (`"ab": true` in its body or the `x-rlhf-ab: 1` header), asks for one choice, and is
drawn at `ab_rate`, is sent upstream twice: to the requested model and the candidate (in a random order,
so the candidate has no side of its own), or to the requested model twice. Its answer carries both as
choices 0 and 1 (streamed side by side when asked), and a `feedback_id` and `feedback_token`; the pair is
written to the feedback store with each side's model version, exactly as `rlhf serve` does (it is the same
code: rlhf.serve.feedback), and POST /v1/feedback records the user's choice. No torch is imported here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from typing_extensions import TypeIs

from rlhf import __version__
from rlhf.feedback.export import PROMPT_MESSAGES
from rlhf.serve import metrics
from rlhf.serve.errors import SHOWN_CHARS, APIError, add_error_handlers, error_body
from rlhf.serve.feedback import AB_HEADER, Answer, FeedbackStore, save_ab_async
from rlhf.serve.middleware import CLIENT_CLOSED, BodySizeLimit
from rlhf.serve.routers import feedback
from rlhf.serve.schemas import SSE_DONE, SSE_HEADERS, sse
from rlhf.serve.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# what a request's answer keeps of the upstream's headers (hop-by-hop and length ones are the server's)
PASSED_HEADERS = ("content-type", "x-request-id", "openai-processing-ms")
# An upstream's model list is taken as current this long (a checkpoint redeployed under its model id has its
# new version in the pairs stored after it), and asked again at most this often for a model it lacked.
VERSIONS_TTL_S, VERSIONS_RETRY_S = 30.0, 2.0


@dataclass
class GatewayState:
    settings: GatewaySettings
    upstream: httpx.AsyncClient
    candidate: httpx.AsyncClient  # the upstream itself unless the candidate has an engine of its own
    store: FeedbackStore | None = None  # read by the /v1/feedback router, as the model server's state is
    rng: random.Random = field(default_factory=random.Random)
    # model id -> the version upstream /models lists for it (None: listed without one), as last listed
    versions: dict[str, str | None] = field(default_factory=dict)
    # upstream URL -> when its models were last asked (`_current_versions`)
    listed_at: dict[str, float] = field(default_factory=dict)


def _client(base_url: str, s: GatewaySettings) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=s.max_connections)
    # a jar that keeps no cookie: one an upstream sets (a load balancer's, a proxy's session) would otherwise go
    # with every later request, whichever client sent it
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=s.timeout_s, limits=limits,
                             cookies=no_cookies)  # fmt: skip


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    s: GatewaySettings = app.state.settings
    upstream = _client(s.upstream, s)
    candidate = _client(s.candidate_upstream, s) if s.candidate_upstream else upstream
    store = FeedbackStore(s.feedback_db, s.feedback_project, s.feedback_per_minute) if s.feedback_db else None
    state = app.state.serve = GatewayState(s, upstream, candidate, store, random.Random(s.seed))
    for client in {upstream, candidate}:
        await _learn_versions(state, client)
    try:
        yield
    finally:
        for client in {upstream, candidate}:
            await client.aclose()
        if store is not None:
            store.close()


async def _learn_versions(state: GatewayState, client: httpx.AsyncClient) -> None:
    """Model versions the engine reports (`rlhf serve` gives name@digest); others get model@fingerprint."""
    state.listed_at[str(client.base_url)] = time.monotonic()
    try:
        r = await client.get("models", headers=_auth(state, None))
        for m in r.json().get("data", []):
            version = m.get("version")
            state.versions[m["id"]] = str(version) if version else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("could not list the models of %s; versions will come from the answers", client.base_url)


async def _current_versions(state: GatewayState, sides: Sequence[tuple[httpx.AsyncClient, str]]) -> None:
    """Ask an upstream for its models again before a pair is stored, when its list is older than VERSIONS_TTL_S
    (a checkpoint redeployed under the same model id gets its new version) or lacks a model of the pair (the
    engine was not up when the gateway started), at most every VERSIONS_RETRY_S."""
    now = time.monotonic()
    for client, model in sides:
        age = now - state.listed_at.get(str(client.base_url), -math.inf)
        if age > VERSIONS_TTL_S or (model not in state.versions and age > VERSIONS_RETRY_S):
            await _learn_versions(state, client)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    app = FastAPI(
        title="rlhf-loop A/B feedback gateway",
        version=__version__,
        description="An OpenAI-compatible engine behind, A/B pairs and feedback capture in front.",
        lifespan=lifespan,
    )
    app.state.settings = settings or GatewaySettings.from_env()
    app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    add_error_handlers(app)
    app.include_router(feedback.router)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "chat/completions")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await proxy(request, "completions")

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> Response:
        state: GatewayState = request.app.state.serve
        return await _forward(state, state.upstream, "GET", "models", None, request)

    @app.get("/v1/models/{model:path}", response_model=None)
    async def model(request: Request, model: str) -> Response:
        """One model as the engine describes it (`client.models.retrieve`); ids may hold slashes ("org/name")."""
        # a dot segment would reach the engine's other paths
        if {"", ".", ".."} & set(model.split("/")):
            raise APIError(f"The model id {model[:SHOWN_CHARS]!r} is not one the engine serves.", 404,
                           param="model", code="model_not_found")  # fmt: skip
        state: GatewayState = request.app.state.serve
        return await _forward(state, state.upstream, "GET", f"models/{quote(model, safe='/')}", None, request)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _auth(state: GatewayState, request: Request | None) -> dict[str, str]:
    if state.settings.upstream_api_key:
        return {"authorization": f"Bearer {state.settings.upstream_api_key}"}
    given = request.headers.get("authorization") if request is not None else None
    return {"authorization": given} if given else {}


async def proxy(request: Request, path: str) -> Response:
    """Pass the request through, unless it becomes an A/B pair."""
    state: GatewayState = request.app.state.serve
    raw = await request.body()
    if b'"ab"' not in raw and AB_HEADER not in request.headers:  # the common case: not even parsed
        return await _forward(state, state.upstream, "POST", path, raw, request)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):  # the engine answers malformed requests in its own words
        return await _forward(state, state.upstream, "POST", path, raw, request)
    ab = body.pop("ab", None)
    if ab is not None and not isinstance(
        ab, bool
    ):  # as strict as the engine's own field: "false" is no opt-in
        message = f"Invalid value for 'ab': Input should be a valid boolean (got {json.dumps(ab)[:40]})."
        return JSONResponse(error_body(message, 400, param="ab", code="invalid_value"), status_code=400)
    opted = bool(ab) or request.headers.get(AB_HEADER, "").strip().lower() in ("1", "true", "yes")
    if _wants_ab(state, body, opted):
        return await _ab(state, path, body, request)
    # `ab` is this gateway's field, opted in or not: engines that refuse unknown fields never see it
    if ab is not None:
        raw = json.dumps(body).encode()
    return await _forward(state, state.upstream, "POST", path, raw, request)


def _wants_ab(state: GatewayState, body: dict[str, Any], opted: bool) -> bool:
    prompt = body.get("prompt")
    one_prompt = not isinstance(prompt, list) or len(prompt) == 1 and isinstance(prompt[0], str)
    if not opted or state.store is None or body.get("n") not in (None, 1) or not one_prompt:
        return False
    if not isinstance(body.get("model"), str):  # the engine refuses it in its own words
        return False
    return state.rng.random() < state.settings.ab_rate


async def _forward(
    state: GatewayState,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    raw: bytes | None,
    request: Request,
) -> Response:
    """The upstream's answer, as it came: status, body, content type; a stream is relayed chunk by chunk."""
    headers = {
        "content-type": request.headers.get("content-type", "application/json"),
        **_auth(state, request),
    }
    try:
        upstream = await _unless_client_leaves(
            request,
            client.send(client.build_request(method, path, content=raw, headers=headers), stream=True),
        )
    except httpx.HTTPError as e:
        raise APIError(
            f"The upstream engine did not answer: {e!r}", 502, code="upstream_unavailable"
        ) from None
    return await _relay(upstream)


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work` (an upstream request), cancelled if the client goes away before it is done: its connection to
    the engine closes, and the engine stops generating an answer nobody would read (two, for an A/B pair)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise APIError("The client closed the request", CLIENT_CLOSED, code="client_closed")
    return task.result()


async def _client_left(request: Request) -> None:
    """Returns when the client has gone away (its request's body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _ok(reply: Any) -> TypeIs[httpx.Response]:
    return isinstance(reply, httpx.Response) and reply.status_code == 200


def _candidate_failed(candidate: Any, why: str = "") -> None:
    """The candidate's side of an A/B request failed (its engine down or timing out, an error status, an answer
    that is no completion) while the requested model answered: that one answers alone, as without A/B, so that
    the candidate the user is not told of neither fails the request nor shows its error. Logged. A failure that
    is a bug here, not the engine's, is raised."""
    if isinstance(candidate, BaseException) and not isinstance(candidate, httpx.HTTPError):
        raise candidate
    what = why or (
        f"status {candidate.status_code}" if isinstance(candidate, httpx.Response) else repr(candidate)
    )
    log.warning("gateway: the candidate did not answer an A/B request (%s): the requested model's answer alone",
                what)  # fmt: skip


async def _requested_failed(requested: Any) -> Response:
    """The requested model's side failed: its engine's error as it gave it, else a 502 (a bug here is raised)."""
    if isinstance(requested, httpx.Response):
        content = await requested.aread()
        return Response(
            content, requested.status_code, {"content-type": requested.headers.get("content-type", "")}
        )
    if not isinstance(requested, httpx.HTTPError):
        raise requested
    raise APIError(
        f"The upstream engine did not answer: {requested!r}", 502, code="upstream_unavailable"
    ) from None


def _completion(reply: httpx.Response) -> dict[str, Any] | None:
    """A 200 answer's completion (its first choice there), or None where it holds none."""
    try:
        out = reply.json()
        choices = out["choices"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return out  # type: ignore[no-any-return]


async def _relay(upstream: httpx.Response) -> Response:
    """An opened upstream answer as it came: status, body, content type; a stream relayed chunk by chunk."""
    kept = {k: v for k, v in upstream.headers.items() if k in PASSED_HEADERS}
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        return StreamingResponse(
            upstream.aiter_bytes(),  # decoded: the content-encoding it came in is not passed on
            upstream.status_code,
            {**kept, **SSE_HEADERS},
            background=BackgroundTask(upstream.aclose),
        )
    try:
        content = await upstream.aread()
    finally:
        await upstream.aclose()
    return Response(content, upstream.status_code, kept)


async def _ab(state: GatewayState, path: str, body: dict[str, Any], request: Request) -> Response:
    """Two upstream answers to one request, as choices 0 and 1, and the pair in the feedback store."""
    model = str(body.get("model", ""))
    sides = [(state.upstream, model), (state.candidate, state.settings.candidate_model or model)]
    if state.settings.candidate_model:
        state.rng.shuffle(sides)
    bodies = [{**body, "model": m} for _, m in sides]
    if sides[0][1] == sides[1][1] and isinstance(body.get("seed"), int):
        bodies[1]["seed"] = body["seed"] + 1  # one model sampled twice: two different samples
    headers = {"content-type": "application/json", **_auth(state, request)}
    chat = path == "chat/completions"
    meta = {
        "endpoint": "chat.completions" if chat else "completions",
        "model": model,
        "request_user": body.get("user"),
        "upstream": str(state.upstream.base_url.copy_with(userinfo=b"")),  # a password in it is not stored
    }
    prompt = _prompt_text(body, chat)
    if chat:  # the conversation itself: its pairs export as conversations, for any model's chat template
        meta[PROMPT_MESSAGES] = [
            {"role": str(m.get("role", "user")), "content": _content(m)} for m in _turns(body)
        ]
    if body.get("stream"):
        # Both streams are opened before answering, so that an engine's refusal (a 4xx) reaches the client
        # with its own status, as it does without A/B, rather than as an error event in a 200 stream.
        opened = await asyncio.gather(
            *(c.send(c.build_request("POST", path, json=b, headers=headers), stream=True)
              for (c, _), b in zip(sides, bodies, strict=True)),
            return_exceptions=True,
        )  # fmt: skip
        replies = [r for r in opened if isinstance(r, httpx.Response)]
        mine = _requested_index(state, sides, model)
        requested, candidate = opened[mine], opened[1 - mine]
        if not _ok(requested):  # its error, as the engine gave it
            try:
                return await _requested_failed(requested)
            finally:
                for r in replies:
                    await r.aclose()
        if not _ok(candidate):
            if isinstance(candidate, httpx.Response):
                await candidate.aclose()
            try:
                _candidate_failed(candidate)
            except BaseException:
                await requested.aclose()
                raise
            return await _relay(requested)
        stream = _ab_stream(state, replies, sides, bodies, chat, prompt, meta, body, mine)

        async def close_upstreams() -> None:  # also where the client left before the stream began
            for r in replies:
                await r.aclose()

        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(close_upstreams))  # fmt: skip
    replied = await _unless_client_leaves(
        request,
        asyncio.gather(
            *(c.post(path, json=b, headers=headers) for (c, _), b in zip(sides, bodies, strict=True)),
            return_exceptions=True,
        ),
    )
    mine = _requested_index(state, sides, model)
    requested, candidate = replied[mine], replied[1 - mine]
    if not _ok(requested):
        return await _requested_failed(requested)
    completions = [_completion(r) if _ok(r) else None for r in replied]
    if completions[mine] is None:
        raise APIError("The upstream engine answered 200 without a completion", 502, code="upstream_error")
    out, other = completions
    if out is None or other is None:  # the candidate's
        _candidate_failed(candidate, "answered 200 without a completion" if _ok(candidate) else "")
        kept = {k: v for k, v in requested.headers.items() if k in PASSED_HEADERS}
        return Response(requested.content, requested.status_code, kept)
    choices = [{**out["choices"][0], "index": 0}, {**other["choices"][0], "index": 1}]
    texts = [_choice_text(c, chat) for c in choices]
    await _current_versions(state, sides)
    pair = _answers(state, sides, bodies, [out, other], texts, [c.get("finish_reason") for c in choices])
    ab = await save_ab_async(state.store, prompt, pair, meta) if state.store else None
    usage = [u for u in (out.get("usage"), other.get("usage")) if u]
    # the answer of one engine carries both choices: its id, time and fingerprint are told as neither's, so that
    # which answer is whose (the candidate's engine) is not told by them
    out = {"object": out.get("object", "chat.completion" if chat else "text_completion")}
    out.update(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, created=int(time.time()), model=model,
               choices=choices, system_fingerprint=None)  # fmt: skip
    if len(usage) == 2:
        done = usage[0].get("completion_tokens", 0) + usage[1].get("completion_tokens", 0)
        prompt_tokens = usage[0].get("prompt_tokens", 0)
        out["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": done,
            "total_tokens": prompt_tokens + done,
        }
    if ab is not None:
        out.update(ab.fields())
        metrics.AB_RESPONSES.labels(meta["endpoint"]).inc()
    # the requested model's request id and timing, as a plain answer passes them on (not its content type)
    kept = {k: v for k, v in requested.headers.items() if k in PASSED_HEADERS and k != "content-type"}
    return JSONResponse(out, headers=kept)


async def _ab_stream(
    state: GatewayState,
    upstreams: list[httpx.Response],
    sides: list[tuple[httpx.AsyncClient, str]],
    bodies: list[dict[str, Any]],
    chat: bool,
    prompt: str,
    meta: dict[str, Any],
    body: dict[str, Any],
    mine: int,
) -> AsyncIterator[str]:
    """Both upstream streams (opened, status 200) relayed as they come, their choices renumbered 0 and 1
    under one id; then a last chunk with the usage (when asked) and the feedback id; then [DONE]. The requested
    model's side is `mine`: its failure ends the stream with its error; the other side's is logged and stops
    that side, and the requested answer goes on alone. A pair is stored only when both answers finished (a
    `finish_reason` came for each): an answer cut off, or a stream that held none, is no answer to compare."""
    ident, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()
    texts = ["", ""]
    finish: list[Any] = [None, None]
    failed: list[str | None] = [None, None]
    replies: list[dict[str, Any]] = [{}, {}]
    prompt_tokens, completion_tokens = [0, 0], [0, 0]

    async def pump(i: int) -> None:
        try:
            async for line in upstreams[i].aiter_lines():
                if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                    await queue.put((i, json.loads(line[6:])))
        except httpx.HTTPError as e:  # the connection broke, or timed out, mid-stream
            failed[i] = f"The upstream engine failed: {e}"
        except json.JSONDecodeError as e:
            failed[i] = f"The upstream engine sent a bad stream line: {e}"
        finally:
            await upstreams[i].aclose()
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(2)]
    try:
        running = 2
        while running:
            i, chunk = await queue.get()
            if chunk is None:
                running -= 1
            elif (
                failed[i] is None and "error" in chunk
            ):  # the engine failed mid-stream: the answer is cut short
                error = (
                    chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                )
                failed[i] = f"The upstream engine failed: {error.get('message', '')}"
            elif failed[i] is None:
                replies[i] = chunk
                if chunk.get("usage"):
                    prompt_tokens[i] = chunk["usage"].get("prompt_tokens", 0)
                    completion_tokens[i] += chunk["usage"].get("completion_tokens", 0)
                choices = chunk.get("choices") or []
                for c in choices:
                    c["index"] = i
                    texts[i] += _choice_text(c, chat, delta=True)
                    finish[i] = c.get("finish_reason") or finish[i]
                if choices:  # in the words of neither engine: which answer is whose is not told
                    yield sse({"id": ident, "object": chunk.get("object", "chat.completion.chunk" if chat else
                               "text_completion"), "created": created, "model": meta["model"],
                               "system_fingerprint": None, "choices": choices, "usage": None})  # fmt: skip
            if (failure := failed[mine]) is not None:
                raise APIError(failure, 502, code="upstream_error")
        for t in tasks:
            t.result()  # a failure here, not the engine's, is raised
        other = 1 - mine
        if failed[other] is not None or finish[other] is None:
            _candidate_failed(None, failed[other] or "its stream ended without a finished answer")
        elif finish[mine] is None:
            log.warning(
                "gateway: the requested model's stream ended without a finished answer: no A/B pair stored"
            )
        ab = None
        if failed[other] is None and None not in finish:
            await _current_versions(state, sides)
            pair = _answers(state, sides, bodies, replies, texts, finish)
            ab = await save_ab_async(state.store, prompt, pair, meta) if state.store else None
        last: dict[str, Any] = {"id": ident, "object": replies[mine].get("object", "chat.completion.chunk"),
                                "created": int(time.time()), "model": meta["model"], "choices": []}  # fmt: skip
        if (body.get("stream_options") or {}).get("include_usage"):
            done = sum(completion_tokens)
            last["usage"] = {"prompt_tokens": prompt_tokens[mine], "completion_tokens": done,
                             "total_tokens": prompt_tokens[mine] + done}  # fmt: skip
        if ab is not None:
            last.update(ab.fields())
            metrics.AB_RESPONSES.labels(meta["endpoint"]).inc()
        if len(last) > 5:
            yield sse(last)
    except APIError as e:
        yield sse(error_body(e.message, e.status, e.param, e.code))
    finally:
        for t in tasks:
            t.cancel()
    yield SSE_DONE


def _requested_index(state: GatewayState, sides: list[tuple[httpx.AsyncClient, str]], model: str) -> int:
    """Which side is the requested model's (the other the candidate's, or the same model's second sample): its
    answer is the one a failure of the other side leaves to answer alone, and its error the one told, so that an
    error never names the candidate the user is not told of."""
    return min(range(len(sides)), key=lambda i: (sides[i][0] is not state.upstream, sides[i][1] != model))


def _answers(
    state: GatewayState,
    sides: list[tuple[httpx.AsyncClient, str]],
    bodies: list[dict[str, Any]],
    replies: list[dict[str, Any]],
    texts: list[str],
    finish: list[Any],
) -> tuple[Answer, Answer]:
    """Both sides with their lineage: the model version and the sampling parameters that wrote them."""

    def one(i: int) -> Answer:
        model, reply, b = sides[i][1], replies[i], bodies[i]
        fingerprint = reply.get("system_fingerprint")
        version = state.versions.get(model) or (f"{model}@{fingerprint}" if fingerprint else model)
        sampling = {"temperature": b.get("temperature"), "top_p": b.get("top_p"), "top_k": b.get("top_k"),
                    "seed": b.get("seed"), "max_new_tokens": b.get("max_completion_tokens") or b.get("max_tokens"),
                    "stop": b.get("stop"), "model": model, "finish_reason": finish[i]}  # fmt: skip
        return Answer(texts[i], version, {k: v for k, v in sampling.items() if v is not None})

    return one(0), one(1)


def _choice_text(choice: dict[str, Any], chat: bool, delta: bool = False) -> str:
    if not chat:
        return str(choice.get("text") or "")
    message = choice.get("delta" if delta else "message") or {}
    return str(message.get("content") or "")


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    """What the store shows as the prompt: the conversation's turns, or the completion prompt."""
    if not chat:
        prompt = body.get("prompt", "")
        return str(prompt[0] if isinstance(prompt, list) and prompt else prompt)
    return "\n".join(f"{m.get('role', 'user')}: {_content(m)}" for m in _turns(body))


def _turns(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body.get("messages") or [] if isinstance(m, dict)]


def _content(message: dict[str, Any]) -> str:
    """A message's text: content parts reduced to their text ones."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def __getattr__(name: str) -> FastAPI:
    # `uvicorn rlhf.serve.gateway:app` builds the app from RLHF_GATEWAY_* variables on first access
    if name == "app":
        return create_app()
    raise AttributeError(name)
