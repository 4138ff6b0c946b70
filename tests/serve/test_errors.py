"""Bad input gets a 4xx with OpenAI's error object, never a 500 or a dead worker."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests import aio

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

CASES: list[tuple[str, str, Any, int, str | None]] = [
    # (name, path, JSON body or raw bytes, status, param)
    ("invalid json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("max_tokens beyond context", "/v1/completions", {**COMPLETION, "max_tokens": 10_000}, 400, "max_tokens"),
    (
        "max_completion_tokens beyond context",
        "/v1/chat/completions",
        {**CHAT, "max_completion_tokens": 10_000},
        400,
        "max_completion_tokens",
    ),
    ("max_tokens zero", "/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", "/v1/chat/completions", {**CHAT, "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p"),
    (
        "prompt longer than the context",
        "/v1/completions",
        {**COMPLETION, "prompt": "word " * 400},
        400,
        "prompt",
    ),
    ("n too large", "/v1/chat/completions", {**CHAT, "n": 50}, 400, "n"),
    ("n zero", "/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("five stop strings", "/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop not a string", "/v1/completions", {**COMPLETION, "stop": ["a", 3]}, 400, "stop.1"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    (
        "unknown role",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    (
        "user content null",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": None}]},
        400,
        "messages.0.content",
    ),
    (
        "top_logprobs above 20",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    (
        "negative top_logprobs",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": -1},
        400,
        "top_logprobs",
    ),
    (
        "top_logprobs without logprobs",
        "/v1/chat/completions",
        {**CHAT, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("chat logprobs not a boolean", "/v1/chat/completions", {**CHAT, "logprobs": 1}, 400, "logprobs"),
    ("logprobs above 20", "/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs"),
    ("negative logprobs", "/v1/completions", {**COMPLETION, "logprobs": -1}, 400, "logprobs"),
    (
        "completion logprobs not a number",
        "/v1/completions",
        {**COMPLETION, "logprobs": True},
        400,
        "logprobs",
    ),
    ("echo", "/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}, 400, "echo"),
    ("top_k beyond int64", "/v1/completions", {**COMPLETION, "top_k": 2**63}, 400, "top_k"),
    ("seed beyond uint64", "/v1/completions", {**COMPLETION, "seed": 2**64}, 400, "seed"),
    ("n beyond any batch", "/v1/completions", {**COMPLETION, "n": 2**40}, 400, "n"),
    (
        "penalty out of range",
        "/v1/completions",
        {**COMPLETION, "presence_penalty": 1e300},
        400,
        "presence_penalty",
    ),
    ("empty prompt without BOS", "/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt"),
    ("token id out of vocabulary", "/v1/completions", {**COMPLETION, "prompt": [5, 10**6]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {**COMPLETION, "prompt": [[5], [-2]]}, 400, "prompt.1.0"),
    ("empty token ids", "/v1/completions", {**COMPLETION, "prompt": [[]]}, 400, "prompt.0"),
    (
        "stream_options without stream",
        "/v1/chat/completions",
        {**CHAT, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "stream_options with stream false",
        "/v1/completions",
        {**COMPLETION, "stream": False, "stream_options": {"include_usage": False}},
        400,
        "stream_options",
    ),
    ("empty stop string", "/v1/completions", {**COMPLETION, "stop": ""}, 400, "stop"),
    ("empty stop in a list", "/v1/completions", {**COMPLETION, "stop": ["a", ""]}, 400, "stop.1"),
    (
        "response_format json",
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("tool_choice", "/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    (
        "modalities audio",
        "/v1/chat/completions",
        {**CHAT, "modalities": ["text", "audio"]},
        400,
        "modalities",
    ),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("n as a string", "/v1/completions", {**COMPLETION, "n": "2"}, 400, "n"),
    ("stream as a string", "/v1/completions", {**COMPLETION, "stream": "true"}, 400, "stream"),
    (
        "NaN temperature",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "hi", "temperature": NaN}',
        400,
        None,
    ),
    (
        "Infinity in logit_bias",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "hi", "logit_bias": {"1": -Infinity}}',
        400,
        None,
    ),
    (
        "lone surrogate in content",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        400,
        None,
    ),
    (
        "lone surrogate as model",
        "/v1/chat/completions",
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        400,
        None,
    ),
    (
        "feedback without a key",
        "/v1/feedback",
        {"feedback_id": "ab-x", "feedback_token": "0" * 64, "choice": "A"},
        400,
        "idempotency_key",
    ),
    (
        "feedback bad choice",
        "/v1/feedback",
        {"feedback_id": "ab-x", "feedback_token": "0" * 64, "choice": "C", "idempotency_key": "k" * 10},
        400,
        "choice",
    ),
    (  # an assistant turn that called a tool was shown without its calls
        "a message with tool calls",
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
                {"role": "user", "content": "and?"},
            ],
        },
        400,
        "messages.1.tool_calls",
    ),
    ("functions", "/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
    (  # any user id the completion request took (a digest of 64 characters, a name with a space)
        "feedback for a long user id, with a token not issued for it",
        "/v1/feedback",
        {
            "feedback_id": "ab-x",
            "feedback_token": "0" * 64,
            "choice": "A",
            "idempotency_key": "k" * 10,
            "user": "John Doe " + "a" * 64,
        },
        403,
        None,
    ),
    (
        "feedback with a token not issued for it",
        "/v1/feedback",
        {"feedback_id": "ab-x", "feedback_token": "0" * 64, "choice": "A", "idempotency_key": "k" * 10},
        403,
        None,
    ),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error(
    server: dict[str, Any], name: str, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(server["url"] + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server["url"] + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"].endswith("_error")
    assert error["param"] == param


def test_neutral_values_of_unsupported_fields_are_accepted(server: dict[str, Any]) -> None:
    body = {
        **CHAT,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "store": False,
        "logprobs": False,
        # an assistant turn with an empty list of tool calls (some clients always send one) called none
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!", "tool_calls": []},
            {"role": "user", "content": "and?"},
        ],
    }
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_stream_options_that_ask_for_nothing_need_no_stream(server: dict[str, Any]) -> None:
    """As vLLM reads them: null or {} without `stream` is no request for stream options."""
    for options in (None, {}):
        r = httpx.post(server["url"] + "/v1/chat/completions", json={**CHAT, "stream_options": options})
        assert r.status_code == 200, r.text


def test_top_k_minus_one_is_off_as_vllm_clients_send_it(server: dict[str, Any]) -> None:
    body = {**COMPLETION, "seed": 7, "temperature": 1.0, "max_tokens": 6}
    texts = [
        httpx.post(server["url"] + "/v1/completions", json={**body, "top_k": k}, timeout=60).json()["choices"][0]["text"]
        for k in (0, -1)
    ]  # fmt: skip
    assert texts[0] == texts[1]
    r = httpx.post(server["url"] + "/v1/completions", json={**body, "top_k": -2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_empty_body_says_what_is_missing(server: dict[str, Any]) -> None:
    r = httpx.post(
        server["url"] + "/v1/completions", content=b"", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "None" not in r.json()["error"]["message"]
    assert "empty" in r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_a_json_body_without_a_json_content_type_says_so(
    server: dict[str, Any], content_type: str | None
) -> None:
    body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(server["url"] + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type", r.text
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_oversized_body_is_413_in_openai_shape(server: dict[str, Any]) -> None:
    r = httpx.post(server["url"] + "/v1/completions", json={**COMPLETION, "prompt": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_is_404_in_openai_shape(server: dict[str, Any]) -> None:
    r = httpx.get(server["url"] + "/v1/engines")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_server_still_answers_after_bad_input(server: dict[str, Any]) -> None:
    r = httpx.post(server["url"] + "/v1/completions", json=COMPLETION, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_requests_among_32_generations_in_flight_harm_none(server: dict[str, Any]) -> None:
    """32 well-formed generations run together while malformed requests arrive among them: every
    well-formed one succeeds, every malformed one gets its own 4xx."""
    bad: list[Any] = [
        {**COMPLETION, "prompt": ""},
        {**COMPLETION, "top_k": 2**63},
        {**COMPLETION, "stop": ""},
        b'{"model": "tiny", "prompt": "hi", "temperature": NaN}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        b'{"model": "\\ud800", "prompt": "hi"}',
        b'{"model": "tiny", "prompt": [',
        {**CHAT, "response_format": {"type": "json_object"}},
        {**COMPLETION, "prompt": [[5, 6], [10**6]]},
        {**CHAT, "stream_options": {"include_usage": True}},
    ]

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as http:

            async def good(i: int) -> httpx.Response:
                if i % 2:
                    body = {**COMPLETION, "prompt": f"User: {i} plus 1?\nAssistant:", "max_tokens": 8}
                    return await http.post("/v1/completions", json=body)
                return await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8})

            async def malformed(i: int) -> httpx.Response:
                await asyncio.sleep(0.01 * i)  # arrive while the good ones are decoding
                body = bad[i % len(bad)]
                path = "/v1/completions" if b"prompt" in str(body).encode() else "/v1/chat/completions"
                if isinstance(body, bytes):
                    headers = {"content-type": "application/json"}
                    return await http.post(path, content=body, headers=headers)
                return await http.post(path, json=body)

            results = await asyncio.gather(*(good(i) for i in range(32)), *(malformed(i) for i in range(16)))
            return list(results[:32]), list(results[32:])

    # in a thread of its own: a session fixture (Playwright's sync API) may hold this thread's event loop
    with ThreadPoolExecutor(1) as pool:
        goods, bads = pool.submit(asyncio.run, main()).result()
    assert [r.status_code for r in goods] == [200] * 32, [r.text for r in goods if r.status_code != 200]
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in goods)
    assert all(400 <= r.status_code < 500 for r in bads), [(r.status_code, r.text) for r in bads]


def test_head_healthz_is_200(server: dict[str, Any]) -> None:
    r = httpx.head(server["url"] + "/healthz")
    assert r.status_code == 200 and r.content == b""


def test_a_full_queue_is_a_429_that_says_when_to_retry() -> None:
    """The engine refuses more waiting rows than max_queue: the request's rows already queued are cancelled,
    and the answer carries Retry-After, as every 429 of the server does."""
    from types import SimpleNamespace

    from rlhf.serve.errors import APIError
    from rlhf.serve.sequence import Overloaded, RowParams
    from rlhf.serve.service import ChoiceRun, ChoiceSpec

    class FullAfterOne:
        def __init__(self) -> None:
            self.queued: list[Any] = []

        def submit(self, seqs: list[Any]) -> None:
            if self.queued:
                raise Overloaded("engine: more than 1 sequences waiting")
            self.queued += seqs

    engine = FullAfterOne()
    policy: Any = SimpleNamespace(engine=engine)

    async def start() -> None:
        run = ChoiceRun(
            [ChoiceSpec(i, policy, [1, 2], RowParams(max_tokens=4)) for i in range(2)], stream=False
        )
        with pytest.raises(APIError) as e:
            run.start()
        assert e.value.status == 429 and e.value.code == "overloaded"
        assert e.value.headers == {"Retry-After": "1"}
        assert all(seq.cancelled for seq in engine.queued)

    aio.run(start())


def test_requests_answered_before_routing_are_counted_under_their_route(server: dict[str, Any]) -> None:
    """A body the middleware refuses (NaN) and a HEAD of a GET route: bounded labels, but the route's own."""

    def count(endpoint: str, status: int) -> float:
        prefix = f'rlhf_serve_requests_total{{endpoint="{endpoint}",status="{status}"}}'
        lines = [x for x in httpx.get(server["url"] + "/metrics").text.splitlines() if x.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count("/v1/completions", 400), count("/healthz", 200)
    body = b'{"model": "tiny", "prompt": "hi", "temperature": NaN}'
    r = httpx.post(
        server["url"] + "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert httpx.head(server["url"] + "/healthz").status_code == 200
    assert (count("/v1/completions", 400), count("/healthz", 200)) == (before[0] + 1, before[1] + 1)


def test_a_long_invalid_value_is_not_echoed_whole() -> None:
    """A 100,000-character `user` is refused with a short message naming the field, not echoed back."""
    from rlhf.serve.errors import validation_error

    err = validation_error(
        [{"type": "string_too_long", "loc": ("body", "user"), "msg": "too long", "input": "u" * 100_000}]
    )
    assert err.param == "user" and "100000 characters" in err.message and len(err.message) < 200
    short = validation_error([{"type": "int_parsing", "loc": ("body", "n"), "msg": "no", "input": "2"}])
    assert short.message == "Invalid value for 'n': no (got '2')."
